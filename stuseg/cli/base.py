"""The app every command registers on, and what wraps every command: one error line, exit codes.

Every command is wrapped by :func:`user_errors`: a ``StusegError`` becomes one line ``stuseg:
error: ...`` on stderr and exit status 1; a bug becomes one line ``stuseg: error: internal error:
...`` naming a report file with its traceback (``stuseg.crash``), status 1; Ctrl-C and SIGTERM
end it with one line and status 130 / 143. In every case the library has removed unfinished
outputs first. Diagnostics go to stderr, data to stdout.
"""

from __future__ import annotations

import functools
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import typer
from rich.console import Console

from stuseg import __version__
from stuseg.cli.helptext import App
from stuseg.errors import StusegError

__all__ = [
    "Terminated",
    "app",
    "err",
    "fail",
    "given_path",
    "internal_error_line",
    "out",
    "say",
    "user_errors",
]


app = App("stuseg", "Segment the 104 TotalSegmentator structures in CT scans with STU-Net.")


out = Console()


err = Console(stderr=True, highlight=False, soft_wrap=True, emoji=False)


_F = TypeVar("_F", bound=Callable[..., Any])


def say(line: str) -> None:
    """Write one line to stderr as is (no markup, no wrapping, never split across lines)."""
    text = " ".join(str(line).splitlines())
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print one error line on stderr; return the Exit to raise."""
    say(f"stuseg: error: {message}")
    return typer.Exit(code)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every ``finally`` and staged output cleans up."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated()


@contextmanager
def _sigterm_raises() -> Iterator[None]:
    """Turn SIGTERM into :class:`Terminated` for the duration (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def user_errors(fn: _F) -> _F:
    """Run a command so that whatever goes wrong ends in one line on stderr and a non-zero exit.

    ``StusegError`` -> its message, status 1. Ctrl-C -> 130, SIGTERM -> 143 (128 + signal). A
    truncated file that a third-party reader did not catch (``EOFError``, which click would turn
    into a bare "Aborted!") and running out of memory get one line too. Any other exception is a
    bug: one ``internal error`` line that names the report file holding its traceback. The
    command's name and arguments are recorded for the ``.stuseg-run.json`` marker of any folder
    it writes. Library warnings (``StusegWarning``) the command did not render itself are
    printed as ``stuseg: warning: ...`` lines after it succeeds (not with ``--quiet``);
    third-party warnings are not shown, and after an error only the error line is printed.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from stuseg.results import outputs

        command = fn.__name__.removesuffix("_cmd").replace("_", "-")  # export_labels_cmd -> export-labels
        try:
            with (
                _sigterm_raises(),
                outputs.recording(command, kwargs),
                warnings.catch_warnings(record=True) as caught,
            ):
                warnings.simplefilter("always")
                result = fn(*args, **kwargs)
        except StusegError as exc:
            raise fail(str(exc)) from None
        except Terminated:
            raise fail("terminated by SIGTERM", code=143) from None
        except KeyboardInterrupt:
            raise fail("interrupted by Ctrl-C", code=130) from None
        except EOFError as exc:
            detail = f" ({exc})" if str(exc) else ""
            raise fail(f"a file ended unexpectedly{detail}; it may be truncated, so copy it again") from None
        except MemoryError:
            raise fail(
                "ran out of memory; close other programs, or for predict use --fast or a smaller --size"
            ) from None
        except (typer.Exit, typer.Abort):
            raise  # the command's own exit (a RuntimeError, so it must pass before the next line)
        except Exception as exc:
            raise fail(internal_error_line(exc)) from None
        if caught and not kwargs.get("quiet"):  # warnings a command did not render itself, once each
            from stuseg.errors import StusegWarning

            mine = [str(w.message) for w in caught if issubclass(w.category, StusegWarning)]
            for message in dict.fromkeys(mine):
                say(f"stuseg: warning: {message}")
        return result

    return wrapper  # type: ignore[return-value]


def internal_error_line(exc: BaseException) -> str:
    """The one line for a bug: what it was, and the report file with its traceback."""
    from stuseg import crash

    path = crash.report(exc)
    where = f"please report it with the file {path}" if path else "its traceback could not be saved to a file"
    return f"internal error: {crash.summary(exc)}; {where}"


def given_path(raw: str, what: str) -> Path:
    """``raw`` as a Path; an empty argument is refused (``Path("")`` would be the current folder)."""
    if not raw.strip():
        raise fail(f"the {what} path is empty; give a file or folder name")
    return Path(raw)


def _version(value: bool) -> None:
    if value:
        out.print(f"stuseg {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version."
    ),
) -> None:
    """Segment the 104 TotalSegmentator structures in CT scans with STU-Net."""
