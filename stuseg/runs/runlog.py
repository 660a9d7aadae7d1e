"""The run log of a batch folder (``stuseg-batch.jsonl``): one typed JSON record per case.

``RunLog`` appends records safely (one line each, a torn line from a killed writer skipped),
``read_log`` reads them back, ``Recorder`` builds the record of one case (status, outputs, the
settings' fingerprint, timings, warnings, a failure's traceback) and ``CaseResult`` is what a run
yields per case. The names of the batch folder's own files are here too.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from stuseg import crash
from stuseg.errors import OutputError, StusegError
from stuseg.runs.cases import Case, resolved

if TYPE_CHECKING:
    from stuseg.runs.settings import Settings

__all__ = [
    "CaseResult",
    "Recorder",
    "RunLog",
    "Status",
    "failure",
    "one_line",
    "read_log",
]

Status = Literal["ok", "failed", "skipped"]


def read_log(path: Path) -> list[dict[str, Any]]:
    """The records of a run log, oldest first; lines that are not whole JSON objects are skipped.

    A process killed while appending can leave a torn last line; it is ignored here, and the next
    writer starts on a fresh line (see ``RunLog``), so one interruption never hides the records of
    the others. A missing log reads as empty.
    """
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise OutputError(f"cannot read the run log {path}: {exc.strerror or exc}") from None
    records = []
    for line in raw.split(b"\n"):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


class RunLog:
    """Append-only JSON-lines log: each record is one ``os.write`` of a whole line, then fsync.

    If the file does not end in a newline (a writer was killed mid-line), a newline is written
    first, so the torn line stays alone and ``read_log`` skips it. Safe to call from several
    threads.

    Raises:
        OutputError: the log cannot be opened or written (disk full, permission).
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        try:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            size = os.fstat(self._fd).st_size
            if size:
                with open(self.path, "rb") as fh:
                    fh.seek(size - 1)
                    torn = fh.read(1) != b"\n"
                if torn:
                    os.write(self._fd, b"\n")
        except OSError as exc:
            raise OutputError(f"cannot write the run log {self.path}: {exc.strerror or exc}") from None

    def write(self, record: Mapping[str, Any]) -> None:
        """Append ``record`` as one line and flush it to the disk."""
        data = (json.dumps(record, ensure_ascii=False, separators=(",", ":"), default=str) + "\n").encode()
        with self._lock:
            try:
                written = os.write(self._fd, data)
                if written != len(data):  # a short write to a regular file means the disk is full
                    raise OSError(28, "No space left on device")
                os.fsync(self._fd)
            except OSError as exc:
                raise OutputError(f"cannot write the run log {self.path}: {exc.strerror or exc}") from None

    def close(self) -> None:
        """Close the file; further writes fail."""
        with self._lock, contextlib.suppress(OSError):
            os.close(self._fd)

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class CaseResult:
    """How one case went: ``ok`` (written), ``failed`` (``error`` says why) or ``skipped``.

    ``record`` is the case's line in the run log. ``outputs`` are the paths written (for
    ``skipped``, the earlier result's).
    """

    case: Case | None
    status: Status
    outputs: list[Path] = field(default_factory=list)
    error: str | None = None
    record: dict[str, Any] = field(default_factory=dict)

    @property
    def warnings(self) -> list[str]:
        """The warnings the case raised (unusual input), as logged."""
        return list(self.record.get("warnings") or [])


def one_line(exc: BaseException) -> str:
    """A one-line reason for a failed case: a ``StusegError``'s message, else the exception named
    (a bug as ``internal error: ...``, its traceback in the record's ``traceback``)."""
    if crash.is_internal(exc):
        return f"internal error: {crash.summary(exc)} (its traceback is in the run log)"
    if isinstance(exc, StusegError):
        text = str(exc)
    elif isinstance(exc, MemoryError):
        text = "ran out of memory (RAM) for this case; run it alone, or with --fast"
    elif isinstance(exc, OSError):
        text = f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else "")
    else:
        text = f"{type(exc).__name__}: {exc}"
    return " ".join(text.split()) or type(exc).__name__


def failure(exc: BaseException) -> tuple[str, str]:
    """A failed case's one-line reason (``one_line``) and its traceback, kept in the run log."""
    return one_line(exc), crash.traceback_text(exc)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class Recorder:
    """Builds the run-log records of one batch run."""

    def __init__(self, settings: Settings, output: Path, run_id: str) -> None:
        from stuseg import __version__

        self.settings = settings
        self.output = Path(output)
        self.run_id = run_id
        self.version = __version__
        self.host = socket.gethostname()

    def record(
        self,
        case: Case | None,
        status: Status,
        *,
        outputs: Sequence[Path] = (),
        products: Sequence[str] = (),
        error: str | None = None,
        traceback: str | None = None,
        reason: str | None = None,
        input_path: Path | None = None,
        geometry: Mapping[str, Any] | None = None,
        seconds: Mapping[str, float] | None = None,
        wall: float | None = None,
        peak_rss: int | None = None,
        peak_gpu: int | None = None,
        device: str | None = None,
        warnings_: Sequence[str] = (),
        worker: str | None = None,
        quality: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        s = self.settings
        rec: dict[str, Any] = {
            "case": case.id if case is not None else None,
            "input": case.source if case is not None else str(resolved(input_path or Path("."))),
            "series": case.series if case is not None else None,
            "status": status,
            "error": error,
        }
        if traceback is not None:  # a bug: what its report needs, kept with the case
            rec["traceback"] = traceback
        if reason is not None:
            rec["reason"] = reason
        rec["outputs"] = [p.relative_to(self.output).as_posix() for p in outputs]
        if products:
            rec["products"] = list(products)
        rec.update(geometry or {"shape": None, "spacing": None})
        rec["seconds"] = {k: round(float(v), 3) for k, v in (seconds or {}).items()}
        rec["wall_seconds"] = round(wall, 3) if wall is not None else None
        rec["peak_rss_bytes"] = peak_rss
        rec["peak_gpu_bytes"] = peak_gpu
        rec["size"] = s.size
        rec["weights_sha256"] = s.weights_sha256
        rec["stuseg_version"] = self.version
        rec["options"] = s.options() | ({"device": device} if device else {})
        rec["fingerprint"] = s.fingerprint()
        rec["warnings"] = list(warnings_)
        if quality is not None:  # the case's quality flags in brief (stuseg.analysis.quality.summarize)
            rec["quality"] = dict(quality)
        rec["run"] = self.run_id
        rec["host"] = worker or self.host
        rec["time"] = _now()
        return rec
