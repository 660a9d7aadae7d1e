"""The ``stuseg`` command line: parse arguments, call the library, render the result.

No logic of its own. Heavy imports (torch) happen inside the commands so ``--help`` is fast.
Diagnostics go to stderr, data to stdout. A ``StusegError`` becomes one line on stderr and
exit status 1; nothing else is printed.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from rich.console import Console

from stuseg import __version__
from stuseg.errors import StusegError

app = typer.Typer(
    name="stuseg",
    help="Segment the 104 TotalSegmentator structures in CT scans with STU-Net.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
out = Console()
err = Console(stderr=True, highlight=False, soft_wrap=True)

F = TypeVar("F", bound=Callable[..., Any])


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print one error line on stderr; return the Exit to raise."""
    err.print(f"stuseg: error: {message}", markup=False)
    return typer.Exit(code)


def user_errors(fn: F) -> F:
    """Turn StusegError (and Ctrl-C) into one line on stderr and a non-zero exit."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except StusegError as exc:
            raise fail(str(exc)) from None
        except KeyboardInterrupt:
            raise fail("interrupted", code=130) from None

    return wrapper  # type: ignore[return-value]


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


def main() -> None:
    app()
