"""The sha256 of weight files: streamed, and remembered by each file's stat stamp so that a file
that has not changed is not read again.

stuseg names weights by a sha256 (run logs, resume, the registry of fine-tuned models) and checks
a registered model's files against theirs whenever it loads them. Hashing reads the whole file,
about 0.55 s a GB on the machines measured (``benchmarks/bench_load.py``): before each
``predict`` of a five-fold STU-Net large that is the checkpoints' 17 GB, longer than a GPU takes
to segment the scan.

``remembered_sha256`` keeps each digest in ``<STUSEG_HOME>/digests.json`` with the file's
absolute path and stamp: size, modification and change times in nanoseconds, inode and device.
When a later call finds the same stamp, the file holds the bytes that were hashed: writing to a
file sets its change time to the present (no program can set it back, unlike the modification
time that ``cp -p`` or ``rsync -t`` restore), and a file replaced by another has another inode.
A file whose stamp is younger than ``RACY_SECONDS`` when it is hashed is not remembered (it
might still be written to within the same clock tick, the problem git calls "racy clean"); its
next use hashes it again and remembers it then. Any other stamp, a missing or unreadable memo,
or a ``STUSEG_HOME`` that cannot be written means hashing the file, as if nothing was
remembered. What the stamp cannot see is a change below the file system (a disk returning other
bytes than were written); the published weights' cache, read without hashing, trusts the same.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

__all__ = ["MEMO_NAME", "RACY_SECONDS", "Progress", "no_progress", "remembered_sha256", "sha256_file"]

MEMO_NAME = "digests.json"
RACY_SECONDS = 2.0  # a file changed this recently is hashed but not remembered
_MAX_ENTRIES = 2000  # the oldest are dropped beyond this
_CHUNK = 8 << 20
_LOCK = threading.Lock()

Progress = Callable[[str, int, "int | None"], None]
"""``progress(phase, done, total)``: ``phase`` is a short label, ``total`` may be None."""


def no_progress(phase: str, done: int, total: int | None) -> None:
    """A ``Progress`` that reports nowhere."""


def sha256_file(path: Path, progress: Progress | None = None, phase: str = "verify") -> str:
    """Streaming sha256 of a file, read whole every time.

    Args:
        path: the file.
        progress: called with ``(phase, bytes done, total bytes)`` as it goes.
        phase: the label passed to ``progress``.

    Returns:
        The hex digest.

    Raises:
        OSError: the file cannot be read.
    """
    progress = progress or no_progress
    total = path.stat().st_size
    digest = hashlib.sha256()
    done = 0
    progress(phase, 0, total)
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            done += len(chunk)
            progress(phase, done, total)
    return digest.hexdigest()


def remembered_sha256(path: Path) -> str:
    """The sha256 of ``path``: the one remembered for its present stat stamp, else hashed (and
    remembered where the file is not too new and the memo can be written; see the module).

    Raises:
        OSError: the file cannot be read.
    """
    path = Path(os.path.abspath(path))
    before = _stamp(path)
    memo_file = _memo_file()
    memo = _read(memo_file)
    entry = memo.get(str(path))
    if isinstance(entry, dict) and entry.get("stamp") == before and isinstance(entry.get("sha256"), str):
        return entry["sha256"]
    started = time.time_ns()
    sha = sha256_file(path)
    settled = started - max(before[1], before[2]) > RACY_SECONDS * 1e9
    if settled and _stamp(path) == before:  # unchanged while it was read
        _remember(memo_file, str(path), {"stamp": before, "sha256": sha, "at": started})
    return sha


def _stamp(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def _memo_file() -> Path:
    from stuseg.weights.cache import stuseg_home  # the cache module imports this one

    return stuseg_home() / MEMO_NAME


def _read(memo_file: Path) -> dict:
    try:
        memo = json.loads(memo_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return memo if isinstance(memo, dict) else {}


def _remember(memo_file: Path, key: str, entry: dict) -> None:
    """Add ``entry`` to the memo (read again first: another process may have added its own),
    replacing the file atomically; a memo that cannot be written is left as it is."""
    with _LOCK, contextlib.suppress(OSError):
        memo = _read(memo_file)
        memo[key] = entry
        if len(memo) > _MAX_ENTRIES:
            newest = sorted(memo.items(), key=lambda kv: kv[1].get("at", 0) if isinstance(kv[1], dict) else 0)
            memo = dict(newest[-_MAX_ENTRIES:])
        memo_file.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{MEMO_NAME}.", dir=memo_file.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(memo, fh)
            os.replace(tmp, memo_file)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
