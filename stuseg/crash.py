"""Internal errors: what a bug becomes for a user - one line, and the traceback in a report file.

An exception that is not one of stuseg's own errors (``StusegError``: bad input, missing weights,
...) nor the system's (``OSError``: a full disk, a lost mount; ``MemoryError``) is a bug in stuseg
or in a library under it. The user is owed one line that says so and where the details are,
never a traceback in the terminal; whoever fixes it is owed the traceback, the versions and the
command. ``report`` writes that file; ``summary`` is the line's text. The command line prints the
line (``stuseg.cli.base``), a batch records both per case in its run log and goes on
(``stuseg.batch``).
"""

from __future__ import annotations

import os
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from pathlib import Path

from stuseg.errors import StusegError

__all__ = ["bug_traceback", "is_internal", "report", "summary", "traceback_text"]

# The exception's own text is cut to this many characters in the one line (the report has it whole).
_SUMMARY_CHARS = 300


def is_internal(exc: BaseException) -> bool:
    """Whether ``exc`` is a bug rather than a problem the user or the system can act on."""
    return isinstance(exc, Exception) and not isinstance(exc, StusegError | OSError | MemoryError)


def summary(exc: BaseException) -> str:
    """``TypeName: message`` on one line, the message cut to a readable length."""
    text = " ".join(str(exc).split())
    if len(text) > _SUMMARY_CHARS:
        text = text[: _SUMMARY_CHARS - 3] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def traceback_text(exc: BaseException) -> str:
    """The full traceback of ``exc``, chained causes included, as Python prints it."""
    return "".join(traceback.format_exception(exc))


def bug_traceback(exc: BaseException) -> str | None:
    """The traceback of ``exc`` if it is a bug (see ``is_internal``), else None."""
    return traceback_text(exc) if is_internal(exc) else None


def report(exc: BaseException, argv: Sequence[str] | None = None) -> Path | None:
    """Write the traceback of ``exc`` with the command and versions to a new report file.

    The file goes to ``<STUSEG_HOME>/logs/`` (see ``stuseg.weights.cache.stuseg_home``), or to the
    temporary folder when that cannot be written.

    Args:
        exc: the exception.
        argv: the command line (default ``sys.argv``).

    Returns:
        The report's path, or None if no folder could take it.
    """
    from stuseg import __version__
    from stuseg.weights.cache import stuseg_home

    argv = list(sys.argv if argv is None else argv)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    lines = [
        f"stuseg {__version__} internal error, {stamp}",
        f"command: stuseg {' '.join(argv[1:])}",
        f"python {platform.python_version()} on {platform.platform()}",
        f"torch {_version_of('torch')}, numpy {_version_of('numpy')}, nibabel {_version_of('nibabel')}",
        "",
        traceback_text(exc),
    ]
    text = "\n".join(lines)
    for folder in (stuseg_home() / "logs", Path(tempfile.gettempdir())):
        path = folder / f"stuseg-internal-error-{stamp}-{os.getpid()}.log"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
        except OSError:
            continue
        return path
    return None


def _version_of(module: str) -> str:
    """The version of an imported module, without importing it (``-`` where it was not loaded)."""
    loaded = sys.modules.get(module)
    return str(getattr(loaded, "__version__", "-")) if loaded is not None else "-"
