"""``stuseg finetune``: the fine-tuning commands, a Typer sub-app that ``stuseg.cli.commands`` registers.

Parse, call the library, render, as in ``stuseg.cli``. This module is imported whenever the
command line is, so it imports nothing but Typer and ``stuseg.cli.base`` at the top: the commands
import the rest.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from stuseg.cli.base import err, fail, say, user_errors
from stuseg.cli.helptext import App

__all__ = ["app"]

app = App("finetune", "Fine-tune a pretrained STU-Net on your labelled CT scans (nnU-Net v2 trains it).")


@contextmanager
def _case_bar() -> Iterator[Callable[[int, int], None] | None]:
    """A progress bar over cases on stderr, only on a terminal."""

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


class Device(str, Enum):
    cuda = "cuda"
    cpu = "cpu"
    mps = "mps"


class Normalization(str, Enum):
    zscore = "zscore"
    ct = "ct"


def _fold(raw: str) -> str:
    from stuseg.finetune.run import FOLDS, check_choice

    return check_choice(raw.strip().lower(), FOLDS, "fold")


def _epoch_line(report: Any) -> str:
    parts = [f"epoch {report.epoch}/{report.epochs}"]
    if report.train_loss is not None:
        parts.append(f"train loss {report.train_loss:.4f}")
    if report.val_loss is not None:
        parts.append(f"val loss {report.val_loss:.4f}")
    if report.pseudo_dice:
        parts.append("pseudo Dice " + " ".join(f"{d:.3f}" for d in report.pseudo_dice))
    if report.seconds is not None:
        parts.append(f"{report.seconds:.1f} s")
    return ", ".join(parts)


@app.command("train")
@user_errors
def finetune_train_cmd(
    run: Annotated[
        Path, typer.Option("--output", "-o", help="The run folder (new, or the one to --resume).")
    ],
    dataset: Annotated[
        Path | None,
        typer.Argument(
            help="An nnU-Net v2 raw dataset: dataset.json, imagesTr/, labelsTr/ (optional with --resume)."
        ),
    ] = None,
    size: Annotated[
        str | None, typer.Option("--size", "-s", help="The pretrained STU-Net: small, base, large or huge.")
    ] = None,
    fold: Annotated[
        str | None, typer.Option(help="0..4 (nnU-Net's 5-fold split) or all (every case). [default: 0]")
    ] = None,
    epochs: Annotated[
        int | None, typer.Option(help="Epochs [default: 1000]; with --resume, a new total.")
    ] = None,
    iterations_per_epoch: Annotated[
        int | None,
        typer.Option(
            help="Training iterations per epoch [default: 250]; validation ones shrink in proportion."
        ),
    ] = None,
    lr: Annotated[
        float | None,
        typer.Option(
            help="Initial learning rate [default: 1e-3; 1e-2 with --from-scratch]; 0 trains nothing."
        ),
    ] = None,
    device: Annotated[Device, typer.Option(help="Where to train.")] = Device.cuda,
    gpus: Annotated[int, typer.Option(help="GPUs (1; see nnU-Net's own command for several).")] = 1,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the run in -o from its last checkpoint.")
    ] = False,
    from_scratch: Annotated[bool, typer.Option("--from-scratch", help="Random initial weights.")] = False,
    weights: Annotated[
        Path | None, typer.Option(help="Pretrained weights file instead of the downloaded ones of --size.")
    ] = None,
    normalization: Annotated[
        Normalization | None,
        typer.Option(
            help="zscore (per image, as in STU-Net's pretraining) or ct (nnU-Net's CT scheme). "
            "[default: zscore]"
        ),
    ] = None,
    save_every: Annotated[
        int | None,
        typer.Option(
            help="Write checkpoint_latest.pth every N epochs, for --resume [default: 50, nnU-Net's]."
        ),
    ] = None,
    no_final_validation: Annotated[
        bool, typer.Option("--no-final-validation", help="Skip nnU-Net's validation after training.")
    ] = False,
) -> None:
    """Fine-tune STU-Net on DATASET; the trained model folder is RUN/model (for `stuseg predict --model`)."""
    from stuseg.finetune import run as ft

    if resume:
        settings = None
        given = {
            "size": ft.check_size(size) if size else None,
            "fold": _fold(fold) if fold is not None else None,
            "iterations_per_epoch": iterations_per_epoch,
            "lr": lr,
            "normalization": normalization.value if normalization else None,
            "from_scratch": from_scratch or None,
            "save_every": save_every,
            "weights": str(weights.resolve()) if weights else None,
        }
        if device is not Device.cuda:
            given["device"] = device.value
        changes = {k: v for k, v in given.items() if v is not None}
    else:
        if dataset is None:
            raise fail("give the DATASET folder (or --resume to continue a run)", code=2)
        if size is None:
            raise fail(
                "give --size small, base, large or huge (the pretrained STU-Net to start from)", code=2
            )
        changes = {}
        settings = ft.resolve_settings(
            size=size,
            fold=_fold(fold) if fold is not None else "0",
            epochs=epochs,
            iterations_per_epoch=iterations_per_epoch,
            lr=lr,
            device=device.value,
            normalization=normalization.value if normalization else "zscore",
            from_scratch=from_scratch,
            weights=weights,
            final_validation=not no_final_validation,
            save_every=save_every,
        )
    try:
        result = ft.train(
            dataset,
            run,
            settings,
            resume=resume,
            epochs=epochs,
            changes=changes,
            gpus=gpus,
            progress=say,
            on_epoch=lambda report: say(_epoch_line(report)),
        )
    except KeyboardInterrupt:
        raise fail(f"interrupted by Ctrl-C; {ft.resume_hint(run)}", code=130) from None
    say(f"trained {result.epochs_done} epochs; model folder: {run / 'model'} ({result.model_folder})")


@app.command("trainer-path")
@user_errors
def finetune_trainer_path_cmd() -> None:
    """Print the folder for nnU-Net's nnUNet_extTrainer: its own commands then find stuseg's trainers."""
    from stuseg.finetune.run import trainer_path

    typer.echo(str(trainer_path()))
