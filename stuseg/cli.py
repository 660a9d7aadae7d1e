"""The ``stuseg`` command line: parse arguments, call the library, render the result.

No logic of its own. Heavy imports (torch) happen inside the commands so ``--help`` is fast.
Diagnostics go to stderr, data to stdout. A ``StusegError`` becomes one line on stderr and
exit status 1; nothing else is printed.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

from stuseg import __version__
from stuseg.errors import StusegError
from stuseg.labels import Group, Numbering

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


@app.command("labels")
@user_errors
def labels_cmd(
    group: Annotated[
        Group | None, typer.Option("--group", "-g", help="Only the structures of this group.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """List the 104 structures: label value (= model channel), name, group, TotalSegmentator v1 index."""
    from stuseg import labels

    rows = labels.describe(group)
    if as_json:
        import json

        keys = ("index", "name", "group", "totalsegmentator_v1_index")
        typer.echo(
            json.dumps(
                [dict(zip(keys, (r.index, r.name, r.group.value, r.totalseg_v1))) for r in rows], indent=1
            )
        )
        return
    from rich.table import Table

    table = Table(box=None, header_style="bold")
    for title in ("index", "name", "group", "TotalSeg v1"):
        table.add_column(title, justify="left" if title in ("name", "group") else "right")
    for r in rows:
        table.add_row(str(r.index), r.name, r.group.value, str(r.totalseg_v1))
    out.print(table)


@app.command("export-labels")
@user_errors
def export_labels_cmd(
    segmentation: Annotated[
        Path, typer.Argument(help="Multilabel file from 'predict --ml', or folder of masks from 'predict'.")
    ],
    output: Annotated[Path, typer.Argument(help="Folder for the masks, or the file to write with --ml.")],
    names: Annotated[
        list[str] | None,
        typer.Option(
            "--labels",
            "-l",
            metavar="NAME",
            help="Structure names, groups or patterns like 'rib_*'; repeat or use commas.",
        ),
    ] = None,
    groups: Annotated[
        list[Group] | None,
        typer.Option("--group", "-g", metavar="GROUP", help="organs, bones, muscles or vessels; repeatable."),
    ] = None,
    ml: Annotated[
        bool, typer.Option("--ml", help="Write one multilabel file instead of one mask per structure.")
    ] = False,
    numbering: Annotated[
        Numbering | None, typer.Option("--numbering", help="Label values in the --ml file.  [default: model]")
    ] = None,
    combine: Annotated[
        str | None,
        typer.Option("--combine", metavar="NAME", help="Write the union of the selection as NAME.nii.gz."),
    ] = None,
) -> None:
    """Export some structures of a segmentation: masks, one multilabel file, or their union."""
    from stuseg import labelmaps, labels

    patterns = [*(names or []), *(g.value for g in groups or [])]
    if not patterns:
        raise fail("name the structures to export with --labels or --group (see 'stuseg labels')")
    result = labelmaps.export_labels(
        segmentation, output, labels.select(patterns), ml=ml, numbering=numbering, combine=combine
    )

    def some(names: list[str]) -> str:  # keep the note one readable line
        if len(names) <= 6:
            return ", ".join(names)
        return f"{len(names)} structures ({', '.join(names[:3])}, ...)"

    if result.missing:
        err.print(f"note: {segmentation} has no mask for {some(result.missing)}", markup=False)
    if result.empty:
        err.print(f"note: no voxels for {some(result.empty)}", markup=False)
    for path in result.written:
        typer.echo(str(path))
    err.print(f"wrote {len(result.written)} files", markup=False)


def main() -> None:
    app()
