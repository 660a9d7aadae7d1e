"""``stuseg finetune``: the fine-tuning commands, a Typer sub-app that ``stuseg.cli`` registers.

Parse, call the library, render, as in ``stuseg.cli``. This module is imported whenever the
command line is, so it imports nothing but Typer at the top: the commands import the rest.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

app = typer.Typer(
    name="finetune",
    help="Fine-tune a pretrained STU-Net on your labelled CT scans (nnU-Net v2 trains it).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

F = TypeVar("F", bound=Callable[..., Any])


def user_errors(fn: F) -> F:
    """``stuseg.cli.user_errors`` around a command, looked up when the command runs (``stuseg.cli``
    imports this module to register the sub-app, so it cannot be imported from here up front)."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        from stuseg.cli import user_errors as guard

        return guard(fn)(*args, **kwargs)

    return run  # type: ignore[return-value]


@contextmanager
def _case_bar() -> Iterator[Callable[[int, int], None] | None]:
    """A progress bar over cases on stderr, only on a terminal."""
    from stuseg.cli import err

    if not err.is_terminal:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("cases"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err, transient=True) as bar:
        task = bar.add_task("cases", total=None)

        def report(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield report


@app.command("prepare")
@user_errors
def finetune_prepare_cmd(
    source: Annotated[
        Path,
        typer.Argument(
            metavar="SRC",
            help="A folder of image/label pairs (imagesTr/ + labelsTr/, images/ + labels/, or "
            "<case>.nii.gz beside <case>_seg.nii.gz) or a CSV with columns image,label "
            "(image_1, ... for more channels; case optional).",
        ),
    ],
    output: Annotated[
        Path,
        typer.Option(
            "--output",
            "-o",
            metavar="DATASET",
            help="The nnU-Net v2 raw dataset folder to write: imagesTr/, labelsTr/, dataset.json.",
        ),
    ],
    labels: Annotated[
        str,
        typer.Option(
            "--labels",
            "-l",
            metavar="FILE.json|NAME,NAME",
            help='Label names for values 1, 2, ...: liver,tumour, or a JSON file {"1": "liver"} or '
            '{"liver": 1}. Background is 0.',
        ),
    ],
    channel_names: Annotated[
        str,
        typer.Option("--channel-names", metavar="NAME,NAME", help="One name per input channel, e.g. CT,PET."),
    ] = "CT",
    overwrite: Annotated[
        bool,
        typer.Option("--overwrite", help="Replace an existing DATASET even if stuseg did not write it."),
    ] = False,
) -> None:
    """Check labelled scans and write them as an nnU-Net v2 raw dataset; lists every bad case."""
    from stuseg.cli import fail, say
    from stuseg.finetune import dataset

    table = dataset.labels_from_option(labels)
    names = [n.strip() for n in channel_names.split(",")]
    try:
        with _case_bar() as progress:
            result = dataset.prepare_dataset(
                source, output, table, channel_names=names, overwrite=overwrite, progress=progress
            )
    except dataset.DatasetError as exc:
        for line in exc.problems:
            say(f"stuseg: error: {line}")
        raise fail(exc.summary) from None
    named = ", ".join(f"{v} {n}" for n, v in result.labels.items() if v)
    channels = ", ".join(result.channel_names)
    count = len(result.cases)
    say(
        f"prepared {count} case{'s' if count != 1 else ''} (labels {named}; "
        f"channel{'s' if len(result.channel_names) != 1 else ''} {channels}) in {result.folder}"
    )
    typer.echo(str(result.folder))
