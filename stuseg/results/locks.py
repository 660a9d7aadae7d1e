"""A lock on an output, so that two stuseg runs never write one result or one batch folder at once.

The lock of an output ``X`` (a mask folder, a ``--ml`` file, a batch folder) is the file
``.stuseg-lock-<name of X>`` beside it, held with ``flock`` for as long as the run works on ``X``
and removed when it ends. The kernel lets go of a ``flock`` when its process ends, however it
ends, so a lock file left by a killed run is free and taken over by the next one: no pid
guesswork, on this host or (through NFS's lock manager) another. The file holds its owner's
pid, host and start time, for the message the second run gives.

A second run into a held output is refused at once (``BusyError``, one line naming the owner),
before any work: it neither waits nor writes. So is a run into anything inside a held folder
(``stuseg predict CT results/case1`` while a batch writes ``results/``): each folder above the
output whose lock file exists is tested with a brief shared ``flock``. The same process may
take a lock it holds again, or write inside a folder it holds (``stuseg batch`` holds its
folder's lock while ``stuseg.batch.run`` takes it too; each case's own lock is taken by the
process writing it, the batch's or a Ray worker, without the test of the folders above).

Where no lock can be taken, the run goes on without one: the folder holding the output is missing
or read-only (the output checks that follow refuse it with their own message), the file system
has no ``flock`` (``ENOLCK``, ``EOPNOTSUPP``), or the system has no ``fcntl`` (Windows).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import json
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

from stuseg.errors import OutputError

try:
    import fcntl
except ImportError:  # Windows: no flock; runs go unlocked
    fcntl = None  # type: ignore[assignment]

__all__ = ["LOCK_PREFIX", "BusyError", "hold", "lock_path"]

LOCK_PREFIX = ".stuseg-lock-"
# Errors of flock on a file system that cannot lock: the run goes on unlocked.
_NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)

_HELD: dict[str, int] = {}  # lock file -> how many times this process holds it
_GUARD = threading.Lock()


class BusyError(OutputError):
    """Another stuseg run is writing the same output."""


def lock_path(output: str | os.PathLike[str]) -> Path:
    """The lock file of ``output``: ``.stuseg-lock-<name>`` in the folder holding it."""
    out = Path(os.path.abspath(output))
    return out.parent / f"{LOCK_PREFIX}{out.name}"


@contextlib.contextmanager
def hold(output: str | os.PathLike[str], *, enclosing: bool = True) -> Iterator[None]:
    """Hold the lock of ``output`` while the block runs (see the module's docstring).

    ``enclosing=False`` leaves out the test of the folders above ``output``: for a batch's own
    case writes, inside the folder its run holds (in this process, or on Ray in the driver's).

    Raises:
        BusyError: another process holds it; the message names its pid, host and start time.
    """
    path = lock_path(output)
    key = str(path)
    with _GUARD:
        nested = key in _HELD
        if nested:
            _HELD[key] += 1
    if nested:
        try:
            yield
        finally:
            with _GUARD:
                _HELD[key] -= 1
        return
    if enclosing:
        _check_enclosing(Path(output))
    fd = _acquire(path, Path(output))
    with _GUARD:
        _HELD[key] = 1
    try:
        yield
    finally:
        with _GUARD:
            del _HELD[key]
        if fd is not None:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()  # while still locked: a run waiting on this file retries on a new one
            os.close(fd)


def _acquire(path: Path, output: Path) -> int | None:
    """The open, locked lock file (its owner written in), or None where no lock can be taken."""
    if fcntl is None:
        return None
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:
            return None  # a missing or read-only folder: the output checks say so
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _owner(fd)
            os.close(fd)
            raise BusyError(f"another stuseg run ({owner}) is writing {output}; {_ADVICE}") from None
        except OSError as exc:
            os.close(fd)
            if exc.errno in _NO_FLOCK:
                return None
            raise OutputError(f"cannot lock {output} ({path}): {exc.strerror or exc}") from None
        # The previous owner removes the file as it lets go: a lock on a removed file locks
        # nothing, so try again on the file now there.
        try:
            current = os.stat(path)
        except FileNotFoundError:
            current = None
        if current is not None and os.path.samestat(os.fstat(fd), current):
            break
        os.close(fd)
    since = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    owner = {"pid": os.getpid(), "host": socket.gethostname(), "since": since}
    os.ftruncate(fd, 0)
    os.write(fd, (json.dumps(owner) + "\n").encode())
    return fd


_ADVICE = "wait for it to finish (or stop it), then run this again"


def _check_enclosing(output: Path) -> None:
    """Refuse ``output`` if another process holds the lock of a folder it lies in.

    Only the folders whose lock file exists are tested (a file opened, not created), each with a
    shared ``flock`` taken and dropped at once: it fails only where a run holds the folder.
    """
    if fcntl is None:
        return
    for folder in Path(os.path.abspath(output)).parents:
        path = lock_path(folder)
        with _GUARD:
            mine = str(path) in _HELD
        if mine or folder == folder.parent:
            continue
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue  # no lock file: no run holds this folder
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _owner(fd)
            raise BusyError(
                f"another stuseg run ({owner}) is writing {folder}, which holds {output}; {_ADVICE}"
            ) from None
        except OSError:
            continue  # a file system without flock: unlocked, as in _acquire
        finally:
            os.close(fd)


def _owner(fd: int) -> str:
    """``pid 123 on host, since ...`` from a held lock file, as far as it says."""
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        owner = json.loads(os.read(fd, 4096).decode())
        return f"pid {int(owner['pid'])} on {owner['host']}, since {owner['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "starting now"  # locked but not yet written, or written by something else
