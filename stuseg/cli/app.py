"""The ``stuseg`` command line: parse arguments, call the library, render the result.

No logic of its own. Heavy imports (torch) happen inside the commands so ``--help`` is fast.
Diagnostics go to stderr, data to stdout. Every command is wrapped by :func:`user_errors`: a
``StusegError`` becomes one line ``stuseg: error: ...`` on stderr and exit status 1; a bug
becomes one line ``stuseg: error: internal error: ...`` naming a report file with its traceback
(``stuseg.crash``), status 1; Ctrl-C and SIGTERM end it with one line and status 130 / 143. In
every case the library has removed unfinished outputs first. Progress bars are drawn only on a
terminal, so logs and pipes get exactly those lines.
"""

from __future__ import annotations

import contextlib
import functools
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

from stuseg import __version__
from stuseg.cli.helptext import App
from stuseg.errors import StusegError
from stuseg.finetune.cli import app as finetune_app
from stuseg.structures.labels import Group, Numbering

__all__ = ["app", "main"]


class OutputType(str, Enum):
    """What ``stuseg predict`` writes; ``--output-type`` is repeatable."""

    NIFTI = "nifti"  # masks (or the --ml file) as NIfTI
    DICOM_SEG = "dicom-seg"  # one DICOM Segmentation instance referencing the DICOM series INPUT
    RTSTRUCT = "rtstruct"  # one RT Structure Set (contours) referencing the DICOM series INPUT


class DicomSegType(str, Enum):
    """How a DICOM-SEG stores its segments (``--dicom-seg-type``; ``stuseg.results.dicomseg.SEG_TYPES``)."""

    BINARY = "binary"  # one 1-bit frame per structure per slice (the default)
    LABELMAP = "labelmap"  # one 8-bit frame per slice, pixel value = segment number


app = App(
    name="stuseg",
    help="Segment the 104 TotalSegmentator structures in CT scans with STU-Net.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
out = Console()
err = Console(stderr=True, highlight=False, soft_wrap=True, emoji=False)

F = TypeVar("F", bound=Callable[..., Any])


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


def user_errors(fn: F) -> F:
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
            from stuseg.images.io import StusegWarning

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


def _given(raw: str, what: str) -> Path:
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


@app.command("labels")
@user_errors
def labels_cmd(
    group: Annotated[
        Group | None, typer.Option("--group", "-g", help="Only the structures of this group.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """List the 104 structures: label value (= model channel), name, group, TotalSegmentator v1 index."""
    from stuseg.structures import labels

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


OVERWRITE_HELP = "Replace an existing OUTPUT even if stuseg did not write it (a folder as a whole)."
NamesOption = Annotated[
    Path | None,
    typer.Option(
        "--names",
        metavar="FILE.json",
        help='Label table of a multilabel file from another tool: {"1": "spleen", ...}.',
    ),
]


@app.command("export-labels")
@user_errors
def export_labels_cmd(
    segmentation: Annotated[
        Path, typer.Argument(help="Multilabel file from 'predict --ml', or folder of masks from 'predict'.")
    ],
    output: Annotated[
        str, typer.Argument(metavar="OUTPUT", help="Folder for the masks, or the file to write with --ml.")
    ],
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
    names_file: NamesOption = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help=OVERWRITE_HELP)] = False,
) -> None:
    """Export some structures of a segmentation: masks, one multilabel file, or their union."""
    from stuseg.results import labelmaps
    from stuseg.structures import labels

    patterns = [*(names or []), *(g.value for g in groups or [])]
    if not patterns:
        raise fail("name the structures to export with --labels or --group (see 'stuseg labels')")
    # Another tool's values are named by --names; a model's own structures by the table its --ml
    # file carries; either way they are selected from that table.
    if names_file is not None:
        table = labelmaps.read_table_file(names_file)
    else:
        table = labelmaps.own_table(segmentation)
    result = labelmaps.export_labels(
        segmentation,
        output,
        labels.select(patterns)
        if table is None
        else labels.select_from(table, patterns, groups=names_file is not None),
        ml=ml,
        numbering=numbering,
        combine=combine,
        overwrite=overwrite,
        table=None if names_file is not None else table,
        names_file=names_file,
    )

    def some(names: list[str]) -> str:  # keep the note one readable line
        if len(names) <= 6:
            return ", ".join(names)
        return f"{len(names)} structures ({', '.join(names[:3])}, ...)"

    if result.missing:
        say(f"note: {segmentation} has no mask for {some(result.missing)}")
    if result.empty:
        say(f"note: no voxels for {some(result.empty)}")
    for path in result.written:
        typer.echo(str(path))
    say(f"wrote {_count(len(result.written), 'file')}")


ManifestOption = Annotated[
    Path | None,
    typer.Option("--manifest", metavar="FILE", help="Use another weights manifest (JSON) than the built-in."),
]


@contextmanager
def _progress_bar() -> Iterator[Callable[[str, int, int | None], None] | None]:
    """A rich progress bar on stderr, fed by the library's ``progress(phase, done, total)`` callback.

    None when stderr is not a terminal: a bar there is noise, and rich ends it with an empty line.
    """
    if not err.is_terminal:
        yield None
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description:>8}"), BarColumn(), DownloadColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err, transient=True, disable=not err.is_terminal) as bar:
        tasks: dict[str, Any] = {}

        def report(phase: str, done: int, total: int | None) -> None:
            if phase not in tasks:
                tasks[phase] = bar.add_task(phase, total=total)
            bar.update(tasks[phase], completed=done, total=total)

        yield report


def _quiet_hub() -> None:
    """huggingface_hub logs retries as warnings; our own error line says what happened."""
    from huggingface_hub.utils import logging as hf_logging

    hf_logging.set_verbosity_error()


@app.command("download")
@user_errors
def download_cmd(
    sizes: Annotated[
        list[str] | None,
        typer.Option(
            "--size", "-s", metavar="SIZE", help="small, base, large or huge (or S/B/L/H); repeatable."
        ),
    ] = None,
    all_sizes: Annotated[bool, typer.Option("--all", help="Every size in the manifest.")] = False,
    manifest: ManifestOption = None,
    force: Annotated[
        bool, typer.Option("--force", help="Download and convert again even if cached.")
    ] = False,
) -> None:
    """Download published weights from the Hugging Face hub, check size and sha256, convert them once."""
    from stuseg.weights import cache as weights
    from stuseg.weights.manifest import load_manifest

    if not sizes and not all_sizes:
        raise fail("choose what to download with --size SIZE (small, base, large, huge) or --all")
    _quiet_hub()
    chosen = list(load_manifest(manifest).entries) if all_sizes else sizes or []
    for size in chosen:
        with _progress_bar() as report:
            result = weights.download_weights(size, manifest=manifest, force=force, progress=report)
        state = "downloaded, verified and converted" if result.fetched else "already in the cache"
        err.print(f"{result.size}: {state} (verified by {result.verified_by})", markup=False)
        typer.echo(str(result.path))


@app.command("import-weights")
@user_errors
def import_weights_cmd(
    file: Annotated[
        Path,
        typer.Argument(
            help="A checkpoint from the authors' mirrors (e.g. base_ep4k.model) or a .safetensors."
        ),
    ],
    size: Annotated[
        str | None,
        typer.Option("--size", "-s", help="Expected size; inferred from the tensor shapes if omitted."),
    ] = None,
    manifest: ManifestOption = None,
) -> None:
    """Verify a checkpoint you got elsewhere (Google Drive, Baidu) and convert it into the cache."""
    from stuseg.weights import cache as weights

    with _progress_bar() as report:
        result = weights.import_weights(file, size, manifest=manifest, progress=report)
    if result.note:
        err.print(f"note: {result.note}", markup=False)
    err.print(f"{result.size}: imported (verified by {result.verified_by})", markup=False)
    typer.echo(str(result.path))


@app.command("weights")
@user_errors
def weights_cmd(
    manifest: ManifestOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """Show each model size: parameters, download size, whether verified weights are cached, and where."""
    from stuseg.weights import cache as weights

    rows = weights.weights_status(manifest)
    if as_json:
        import json

        typer.echo(
            json.dumps(
                [
                    {
                        "size": r.size,
                        "parameters": r.parameters,
                        "file": r.filename,
                        "file_bytes": r.file_bytes,
                        "approx_file_bytes": r.approx_file_bytes,
                        "pin": r.pin,
                        "present": r.present,
                        "verified_by": r.verified_by,
                        "damaged": r.damaged,
                        "path": str(r.path),
                    }
                    for r in rows
                ],
                indent=1,
            )
        )
        return
    from rich.table import Table

    table = Table(box=None, header_style="bold")
    for title in ("size", "parameters", "download", "status", "path"):
        table.add_column(
            title,
            justify="right" if title in ("parameters", "download") else "left",
            overflow="fold" if title == "path" else "ellipsis",
        )
    for r in rows:
        download = f"{r.file_bytes / 1e6:,.0f} MB" if r.file_bytes else f"~{r.approx_file_bytes / 1e9:.2f} GB"
        if r.damaged:
            status = "damaged (see below)"
        else:
            status = f"cached, verified by {r.verified_by}" if r.present else "not downloaded"
        table.add_row(r.size, f"{r.parameters / 1e6:,.1f}M", download, status, str(r.path))
    out.print(table)
    for r in rows:
        if r.damaged:
            err.print(
                f"note: the cached weights for {r.size} are damaged ({r.damaged}); repair with "
                f"`stuseg download --size {r.size} --force` or import them again",
                markup=False,
            )


# Options that predict and batch share, with the same meaning.
QaFailOption = Annotated[
    bool,
    typer.Option(
        "--qa-fail",
        help="Treat a result that raises a quality flag for review (wrong_side, fragmented, "
        "low_confidence) as a failure: the result is kept; predict exits with status 3, batch logs the "
        "case as failed.",
    ),
]
# predict --qa-fail's exit status when a quality flag is raised (1 is an error, 2 a usage error).
QA_FAIL_EXIT = 3

SizeOption = Annotated[
    str | None,
    typer.Option(
        "--size",
        "-s",
        help="small, base, large or huge (S/B/L/H). [default: base, or the size of --weights]",
    ),
]
FastOption = Annotated[
    bool,
    typer.Option(
        "--fast",
        help="Argmax at 1.5 mm, then resample the labels: same network time, a slightly "
        "cheaper export (see the README).",
    ),
]
TtaOption = Annotated[bool, typer.Option("--tta", help="Average over the 8 mirrorings (8x slower).")]
StepSizeOption = Annotated[
    float,
    typer.Option(
        "--step-size", metavar="FRACTION", min=0.05, max=1.0, help="Tile step as a fraction of the patch."
    ),
]
DeviceOption = Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps.")]
WeightsFileOption = Annotated[
    Path | None,
    typer.Option("--weights", metavar="FILE", help="Local checkpoint (.model or .safetensors)."),
]
RoiSubsetOption = Annotated[
    list[str] | None,
    typer.Option("--roi-subset", metavar="NAME", help="Keep only these structures, groups or patterns."),
]
ModelOption = Annotated[
    str | None,
    typer.Option(
        "--model",
        "-m",
        metavar="DIR|NAME",
        help="A fine-tuned STU-Net: an nnU-Net v2 or v1 model folder, or a name from `stuseg models`.",
    ),
]
FoldsOption = Annotated[
    str | None,
    typer.Option("--folds", metavar="0,1,...", help="Folds of --model to average. [default: every fold]"),
]


class CheckpointChoice(str, Enum):
    """Which checkpoint of each fold of a model folder."""

    FINAL = "final"
    BEST = "best"


CheckpointOption = Annotated[
    CheckpointChoice, typer.Option("--checkpoint", help="Which checkpoint of each fold of --model.")
]


class PrecisionChoice(str, Enum):
    """The type of the network's convolutions (``stuseg.model.precision``)."""

    AUTO = "auto"
    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"


PrecisionOption = Annotated[
    PrecisionChoice,
    typer.Option(
        "--precision",
        help="The network's number type: auto (float16 on CUDA, float32 on the CPU), float32, bfloat16 "
        "(faster on CPUs with AMX/AVX512_BF16 or Arm BF16) or float16 (CUDA).",
    ),
]


def _folds(raw: str | None) -> list[str] | None:
    """``--folds 0,1`` as a list; None for every fold."""
    if raw is None:
        return None
    folds = [f.strip() for f in raw.split(",") if f.strip()]
    if not folds:
        raise fail("--folds is empty; give fold names such as 0,1,2 or all")
    return folds


def _channels(image: Path, extra: list[Path] | None, count: int) -> list[Path]:
    """The input files of a case, one per model channel: INPUT, then each --channel, or INPUT's
    siblings named as nnU-Net names channels (case_0000.nii.gz, case_0001.nii.gz, ...)."""
    from stuseg.images.paths import channel_name, channel_of

    files = [image, *(extra or [])]
    if len(files) == 1 and count > 1:
        named = channel_of(image)
        if named is None or named[1] != 0:
            raise fail(
                f"this model takes {count} input channels: give the others with --channel FILE, or name "
                "the files as nnU-Net does (case_0000.nii.gz, case_0001.nii.gz, ...) and give the first"
            )
        files = [channel_name(image, c) for c in range(count)]
        missing = [f for f in files if not f.exists()]
        if missing:
            raise fail(f"channel file {missing[0]} does not exist (this model takes {count} input channels)")
    if len(files) != count:
        raise fail(f"this model takes {count} input channel(s); {len(files)} were given")
    return files


# --- fine-tuned models: import-model, models ---------------------------------------------------


@app.command("import-model")
@user_errors
def import_model_cmd(
    folder: Annotated[
        Path, typer.Argument(help="An nnU-Net v1 or v2 model folder of an STU-Net (it holds fold_*).")
    ],
    name: Annotated[str, typer.Option("--name", help="The name to register it under.")],
    folds: Annotated[
        str | None, typer.Option("--folds", metavar="0,1", help="Folds to import. [default: every fold]")
    ] = None,
    checkpoint: CheckpointOption = CheckpointChoice.FINAL,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a model of the same name.")] = False,
) -> None:
    """Check a fine-tuned STU-Net's folder and register it: plan, labels and verified weights per fold."""
    from stuseg.weights import modelstore

    chosen = [f for f in folds.split(",") if f.strip()] if folds is not None else None
    model = modelstore.import_model(
        folder, name, folds=chosen, checkpoint=checkpoint.value, overwrite=overwrite
    )
    err.print(
        f"{name}: imported STU-Net {model.size} ({model.framework}, {len(model.labels)} labels, "
        f"fold{'s' if len(model.folds) > 1 else ''} {', '.join(f.name for f in model.folds)})",
        markup=False,
    )
    typer.echo(str(model.source))


@app.command("models")
@user_errors
def models_cmd(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """List the fine-tuned models registered with import-model."""
    from stuseg.weights import modelstore

    rows = modelstore.registered_models()
    if as_json:
        import dataclasses
        import json

        typer.echo(json.dumps([dataclasses.asdict(r) for r in rows], indent=1, default=str))
        return
    if not rows:
        err.print("no models registered; register one with `stuseg import-model DIR --name NAME`")
        return
    from rich.table import Table

    table = Table(box=None, header_style="bold")
    for title in ("name", "framework", "size", "classes", "channels", "folds", "source sha256"):
        table.add_column(title, justify="right" if title == "classes" else "left")
    for r in rows:
        if r.problem:
            table.add_row(r.name, "damaged (see below)", "", "", "", "", "")
            continue
        shas = ", ".join(s[:12] for s in r.source_sha256)
        table.add_row(
            r.name, r.framework, r.size, str(r.classes), ", ".join(r.channels), ", ".join(r.folds), shas
        )
    out.print(table)
    for r in rows:
        if r.problem:
            err.print(f"note: {r.name}: {r.problem}", markup=False)


@app.command("predict")
@user_errors
def predict_cmd(
    input_path: Annotated[
        str,
        typer.Argument(metavar="INPUT", help="CT image (.nii, .nii.gz, .nrrd, .mha, .mhd) or DICOM folder."),
    ],
    output: Annotated[
        str, typer.Argument(metavar="OUTPUT", help="Folder for one mask per structure (a file with --ml).")
    ],
    size: SizeOption = None,
    fast: FastOption = False,
    tta: TtaOption = False,
    step_size: StepSizeOption = 0.5,
    device: DeviceOption = "auto",
    weights_file: WeightsFileOption = None,
    roi_subset: RoiSubsetOption = None,
    model: ModelOption = None,
    folds: FoldsOption = None,
    checkpoint: CheckpointOption = CheckpointChoice.FINAL,
    precision: PrecisionOption = PrecisionChoice.AUTO,
    channels: Annotated[
        list[Path] | None,
        typer.Option(
            "--channel", metavar="FILE", help="The next input channel of a multi-channel --model; repeatable."
        ),
    ] = None,
    multilabel: Annotated[
        bool, typer.Option("--ml", help="Write one multilabel file (values = model index) with names.")
    ] = False,
    series: Annotated[
        str | None,
        typer.Option("--series", metavar="UID", help="DICOM series to use when a folder holds several."),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only errors.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help=OVERWRITE_HELP)] = False,
    with_statistics: Annotated[
        bool,
        typer.Option(
            "--statistics", help="Also write statistics.json/.csv: volume, HU, centroid per structure."
        ),
    ] = False,
    with_preview: Annotated[
        bool, typer.Option("--preview", help="Also write preview.png: slices, front view and legend.")
    ] = False,
    output_types: Annotated[
        list[OutputType] | None,
        typer.Option(
            "--output-type",
            metavar="TYPE",
            help="nifti (default), dicom-seg (seg.dcm in OUTPUT, or OUT.dcm beside --ml OUT.nii.gz) and/or "
            "rtstruct (rtstruct.dcm, or OUT_rtstruct.dcm); the DICOM types need a DICOM series INPUT; "
            "repeatable.",
        ),
    ] = None,
    remove_small_blobs: Annotated[
        float | None,
        typer.Option(
            "--remove-small-blobs",
            metavar="MM3",
            help="Drop every piece of a structure smaller than MM3 cubic millimetres (recorded in the "
            "run marker and the statistics).",
        ),
    ] = None,
    codes_file: Annotated[
        Path | None,
        typer.Option(
            "--codes",
            metavar="FILE",
            help="SNOMED CT codes for a model's structures in a DICOM-SEG (CSV or JSON; see the README).",
        ),
    ] = None,
    dicom_seg_type: Annotated[
        DicomSegType | None,
        typer.Option(
            "--dicom-seg-type",
            metavar="TYPE",
            help="For a DICOM-SEG: binary (default; one frame per structure and slice) or labelmap (one "
            "frame per slice, far smaller for many structures; needs a reader of Label Map Segmentation).",
        ),
    ] = None,
    qa_fail: QaFailOption = False,
) -> None:
    """Segment the 104 structures of a CT scan, or a fine-tuned model's structures (--model)."""
    import warnings

    from stuseg.results import write as results

    image = _given(input_path, "INPUT")
    size = _canonical_size(size)
    if remove_small_blobs is not None and not remove_small_blobs > 0:
        raise fail(f"--remove-small-blobs must be a positive volume in mm3, got {remove_small_blobs:g}")
    if model is None and channels:
        raise fail("--channel, --folds and --checkpoint apply to a --model")
    trained = _model_folder(model, folds, checkpoint, "--channel, --folds and --checkpoint")
    images = _channels(image, channels, trained.plan.in_channels if trained is not None else 1)
    # Every output check comes before any work, so a bad OUTPUT costs no prediction.
    inputs = [*images, *_model_inputs(weights_file, trained)]
    request = _request(output_types, with_statistics, with_preview, dicom_seg_type, codes_file)
    layout = results.Layout(output, multilabel, request.products)
    # One run at a time into OUTPUT: a second one is refused here (stuseg.results.locks), and the checks
    # below see what the first one left.
    with layout.locked():
        # A non-DICOM or unusable INPUT (e.g. blanked UIDs) is refused here, before any work.
        dicom = None
        if request.needs_dicom:
            dicom = results.dicom_source(image, series, output=request.dicom_products[0])
        layout.check(inputs, overwrite=overwrite)
        from stuseg.inference import pipeline

        pipeline.keep_freed_memory(device)  # this process only runs stuseg: tune malloc for it
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            # --statistics / --preview need the CT's intensities: read it here and keep it.
            volume, read_s = results.read_ct(image, series) if request.needs_ct else (None, 0.0)
            first = volume if volume is not None else input_path
            with _tile_bar(quiet) as progress:
                seg = pipeline.segment(
                    [first, *images[1:]] if len(images) > 1 else first,
                    model=trained,
                    size=size,
                    fast=fast,
                    tta=tta,
                    step_size=step_size,
                    device=device,
                    weights=weights_file,
                    roi_subset=roi_subset,
                    series=series,
                    progress=progress,
                    precision=precision.value,
                )
            from stuseg.results import outputs

            outputs.record_option("precision", seg.precision)  # what auto chose, for the run marker
            if volume is not None:
                seg.timings["read"] = seg.timings.get("read", 0.0) + read_s
            if remove_small_blobs is not None:
                removed = seg.remove_small_blobs(remove_small_blobs)
                if not quiet:
                    say(_blobs_line(removed, remove_small_blobs))
            sources = results.Sources(ct=volume, dicom=dicom, mode=results.mode_name(fast, tta))
            written = results.write_result(layout, seg, request, sources)
    if not quiet:
        for w in caught:
            say(f"stuseg: warning: {w.message}")
        if written.statistics is not None and (line := quality_line(written.statistics)):
            say(line)
        say(_summary(seg, _what_was_written(layout, written, len(seg.names))))
    if qa_fail:
        from stuseg.analysis import quality, statistics

        stats = written.statistics or statistics.of_segmentation(seg, None)
        reason = quality.review_reason(quality.summarize(stats))
        if reason:
            what = _what_was_written(layout, written, len(seg.names))
            raise fail(f"{reason}; the result is kept ({what})", QA_FAIL_EXIT)


def _canonical_size(size: str | None) -> str | None:
    """``--size`` as the model table names it (``S`` -> ``small``).

    Raises:
        StusegError: an unknown size, naming the valid ones.
    """
    if size is None:
        return None
    from stuseg.weights.manifest import canonical_size

    return canonical_size(size)


def _model_folder(model: str | None, folds: list[str] | None, checkpoint: CheckpointChoice, only: str) -> Any:
    """The ``--model`` folder (``stuseg.weights.modelstore.resolve_model``: read, not loaded, so its
    channels are known and a bad folder is refused before any work), or None without one.

    Raises:
        StusegError: the folder is unusable, or ``--folds``/``--checkpoint`` (named in ``only``)
            were given without a model.
    """
    if model is not None:
        from stuseg.weights.modelstore import resolve_model

        return resolve_model(_given(model, "--model"), folds=_folds(folds), checkpoint=checkpoint.value)
    if folds is not None or checkpoint is not CheckpointChoice.FINAL:
        raise StusegError(f"{only} apply to a --model")
    return None


def _model_inputs(weights_file: Path | None, trained: Any) -> list[Path]:
    """What a run reads besides its scans: the ``--weights`` file, the ``--model`` folder."""
    return [*([weights_file] if weights_file is not None else []), *([trained.source] if trained else [])]


def _request(
    output_types: list[OutputType] | None,
    statistics: bool,
    preview: bool,
    seg_type: DicomSegType | None,
    codes_file: Path | None,
) -> Any:
    """The outputs asked for by predict's and batch's options (``stuseg.results.write.Request``)."""
    from stuseg.results import write as results

    types = set(output_types or [OutputType.NIFTI])
    dicom_seg = OutputType.DICOM_SEG in types
    if not dicom_seg and codes_file is not None:
        raise StusegError("--codes applies to --output-type dicom-seg")
    if not dicom_seg and seg_type is not None:
        raise StusegError("--dicom-seg-type applies to --output-type dicom-seg")
    codes = None
    dicom_types = [t.value for t in (OutputType.DICOM_SEG, OutputType.RTSTRUCT) if t in types]
    if dicom_types:
        from stuseg.results import dicomseg

        dicomseg.require_highdicom(dicom_types[0])  # the extra, before any work
        codes = dicomseg.read_codes(codes_file) if codes_file is not None else None
    return results.Request(
        nifti=OutputType.NIFTI in types,
        statistics=statistics,
        preview=preview,
        dicom_seg=dicom_seg,
        rtstruct=OutputType.RTSTRUCT in types,
        seg_type=(seg_type or DicomSegType.BINARY).value,
        codes=codes,
    )


def _what_was_written(layout: Any, written: Any, structures: int) -> str:
    """``104 masks in out and out/preview.png`` or ``seg.nii.gz and seg.statistics.json``."""
    from stuseg.results.write import Layout

    files = Layout(layout.target, layout.multilabel, written.products).files()
    shown = []
    if "nifti" in files:
        shown.append(
            f"{structures} masks in {layout.target}" if not layout.multilabel else str(layout.target)
        )
    for name, paths in files.items():
        if name != "nifti":
            shown.append(str(paths[0]))  # statistics: the JSON stands for its CSV twin
    return " and ".join(shown) or "nothing"


def _blobs_line(removed: dict[str, int], min_mm3: float) -> str:
    """One line: what ``--remove-small-blobs`` removed."""
    if not removed:
        return f"stuseg: no piece of any structure was smaller than {min_mm3:g} mm3; nothing removed"
    shown = ", ".join(f"{name} {n}" for name, n in list(removed.items())[:6])
    more = f", and {len(removed) - 6} more" if len(removed) > 6 else ""
    total = sum(removed.values())
    return (
        f"stuseg: removed {total} voxels in pieces smaller than {min_mm3:g} mm3 from "
        f"{len(removed)} structure(s) ({shown}{more})"
    )


@contextmanager
def _tile_bar(quiet: bool) -> Iterator[Callable[[int, int], None] | None]:
    """A rich progress bar over sliding-window tiles, with ETA, on stderr (on a terminal only)."""
    if quiet or not err.is_terminal:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("tiles"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err, transient=True) as bar:
        task = bar.add_task("tiles", total=None)

        def report(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield report


def _summary(seg: Any, what: str) -> str:
    """One line: what was written, time per stage and peak memory."""
    order = ("read", "load", "preprocess", "network", "softmax", "export", "write", "statistics", "preview",
             "dicom-seg", "rtstruct")  # fmt: skip
    times = ", ".join(f"{k} {seg.timings[k]:.1f}s" for k in order if k in seg.timings)
    memory = f"peak RAM {seg.peak_rss_bytes / 2**30:.2f} GB" if seg.peak_rss_bytes else "peak RAM unknown"
    if seg.peak_gpu_bytes is not None:
        memory += f", peak GPU {seg.peak_gpu_bytes / 2**30:.2f} GB"
    kind = f", {seg.precision}" if seg.precision != "float32" else ""
    return f"wrote {what} ({seg.size} on {seg.device}{kind}); {times}; {memory}"


@app.command("batch")
@user_errors
def batch_cmd(
    sources: Annotated[
        list[Path],
        typer.Argument(
            metavar="SOURCE",
            help="CT files, folders (searched recursively; every DICOM CT series is a case) "
            "or list files (.txt: a path a line; .csv: 'path' and optional 'case' columns).",
        ),
    ],
    output: Annotated[
        Path,
        typer.Option(
            "--output",
            "-o",
            metavar="DIR",
            help="Batch folder: DIR/<case>/ masks and DIR/stuseg-batch.jsonl.",
        ),
    ],
    size: SizeOption = None,
    fast: FastOption = False,
    tta: TtaOption = False,
    step_size: StepSizeOption = 0.5,
    device: DeviceOption = "auto",
    weights_file: WeightsFileOption = None,
    roi_subset: RoiSubsetOption = None,
    model: ModelOption = None,
    folds: FoldsOption = None,
    checkpoint: CheckpointOption = CheckpointChoice.FINAL,
    precision: PrecisionOption = PrecisionChoice.AUTO,
    multilabel: Annotated[
        bool, typer.Option("--ml", help="Write DIR/<case>.nii.gz multilabel files (values = model index).")
    ] = False,
    overwrite: Annotated[
        bool,
        typer.Option("--overwrite", help="Redo cases already done, and write into a folder of other files."),
    ] = False,
    ray_address: Annotated[
        str | None,
        typer.Option(
            "--ray",
            metavar="ADDRESS",
            help="Run on a Ray cluster: auto, ray://host:port or host:port (needs stuseg[ray]).",
        ),
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(
            "--workers", min=1, metavar="N", help="Ray workers. [default: one per GPU, else one per node]"
        ),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only errors.")] = False,
    with_statistics: Annotated[
        bool,
        typer.Option("--statistics", help="Also write each case's statistics.json/.csv, as predict does."),
    ] = False,
    with_preview: Annotated[
        bool, typer.Option("--preview", help="Also write each case's preview.png, as predict does.")
    ] = False,
    output_types: Annotated[
        list[OutputType] | None,
        typer.Option(
            "--output-type",
            metavar="TYPE",
            help="nifti (default), dicom-seg and/or rtstruct per case, as predict writes them; repeatable. "
            "A case that is no DICOM series gets no SEG or RTSTRUCT (the reason is in the log).",
        ),
    ] = None,
    dicom_seg_type: Annotated[
        DicomSegType | None,
        typer.Option(
            "--dicom-seg-type", metavar="TYPE", help="For a DICOM-SEG: binary (default) or labelmap."
        ),
    ] = None,
    codes_file: Annotated[
        Path | None,
        typer.Option(
            "--codes", metavar="FILE", help="SNOMED CT codes for a model's structures in a DICOM-SEG."
        ),
    ] = None,
    qa_fail: QaFailOption = False,
) -> None:
    """Segment many CT scans with one model load: stages overlapped, resumable, one log line per case."""
    from stuseg import batch
    from stuseg.results import locks

    if workers is not None and ray_address is None:
        raise fail("--workers applies only with --ray ADDRESS", code=2)
    held = contextlib.ExitStack()  # the batch folder's lock, from its check to the last case
    tiles: list[_BatchBars] = []  # the bars, once shown; the network stage reports its tiles there
    try:
        size = _canonical_size(size)
        request = _request(output_types, with_statistics, with_preview, dicom_seg_type, codes_file)
        trained = _batch_model(model, folds, checkpoint, roi_subset)
        found = _batch_cases(sources, trained)
        inputs = [*sources, *(p for c in found.cases for p in (c.input, *c.channels))]
        inputs += _model_inputs(weights_file, trained)
        # A second batch into OUTPUT is refused here, before any work (stuseg.results.locks).
        held.enter_context(locks.hold(output))
        batch.check_batch_output(output, inputs, overwrite=overwrite)
        options = batch.ModelOptions(
            size=size,
            weights=weights_file,
            device=device,
            fast=fast,
            tta=tta,
            step_size=step_size,
            roi_subset=tuple(roi_subset) if roi_subset else None,
            model=model,
            folds=tuple(f.name for f in trained.folds) if trained is not None else None,
            checkpoint=checkpoint.value,
            precision=precision.value,
        )
        common = dict(multilabel=multilabel, overwrite=overwrite, request=request, ignored=found.ignored)
        results = _start_batch(found.cases, output, options, ray_address, workers, tiles, common, qa_fail)
    except StusegError as exc:
        held.close()
        raise fail(str(exc), code=2) from None
    with held:
        counts, seconds, qa_failed = _follow_batch(results, found.cases, output, quiet, tiles)
    log = output / batch.LOG_NAME
    if not quiet:
        # The rate only where scans were segmented: a resume that skipped everything has none.
        rate = (
            f" ({counts['ok'] / (seconds / 60):.2f} scans per minute)" if counts["ok"] and seconds > 0 else ""
        )
        say(
            f"batch: {counts['ok']} ok, {counts['failed']} failed"
            + (f" ({qa_failed} on quality flags)" if qa_failed else "")
            + f", {counts['skipped']} skipped in {_duration(seconds)}{rate}; "
            + (f"{len(found.ignored)} non-image DICOM objects passed over; " if found.ignored else "")
            + f"log: {log}"
        )
    if counts["failed"]:
        raise fail(f"{counts['failed']} of {len(found.cases)} cases failed, see {log}")


def _batch_model(
    model: str | None, folds: list[str] | None, checkpoint: CheckpointChoice, roi_subset: list[str] | None
) -> Any:
    """The ``--model`` folder a batch runs (``_model_folder``), or None; without one, the
    ``--roi-subset`` names are checked against the published table before any work."""
    trained = _model_folder(model, folds, checkpoint, "--folds and --checkpoint")
    if trained is None and roi_subset:
        from stuseg.structures import labels

        labels.select(roi_subset)
    return trained


def _batch_cases(sources: list[Path], trained: Any) -> Any:
    """The cases found in SOURCEs (``stuseg.batch.discover``), grouped by channel for a model
    with several; none found raises ``StusegError``."""
    from stuseg import batch

    found = batch.discover(sources)
    if trained is not None and trained.plan.in_channels > 1:  # one case per <case>_0000, _0001, ...
        found = batch.group_channels(found, trained.plan.in_channels)
    if not found.cases:
        shown = ", ".join(map(str, sources))
        raise StusegError(f"found no CT scans to segment in {shown}; {batch.WHAT_IS_FOUND}")
    return found


def _start_batch(
    cases: list[Any],
    output: Path,
    options: Any,
    ray_address: str | None,
    workers: int | None,
    tiles: list[_BatchBars],
    common: dict[str, Any],
    qa_fail: bool = False,
) -> Iterator[Any]:
    """The iterator over the cases' results: on a Ray cluster (``stuseg.runs.cluster.run``) or here
    (``stuseg.batch.run_local``, the model loaded now); ``common``: the keyword arguments of both;
    ``qa_fail``: flagged cases fail, on the cluster as here."""
    from stuseg import batch

    if ray_address is not None:
        from stuseg.runs import cluster as batch_ray

        return batch_ray.run(
            cases, output, options, address=ray_address, workers=workers, qa_fail=qa_fail, **common
        )
    from stuseg.inference.pipeline import keep_freed_memory

    def progress(case: batch.Case, done: int, total: int) -> None:
        if tiles:
            tiles[0].tile(case, done, total)

    # This process only runs stuseg, image after image: tune malloc for that.
    keep_freed_memory(options.device, many_images=True)
    return batch.run_local(cases, output, options, progress=progress, qa_fail=qa_fail, **common)


def _follow_batch(
    results: Iterator[Any], cases: list[Any], output: Path, quiet: bool, tiles: list[_BatchBars]
) -> tuple[dict[str, int], float, int]:
    """Show each case's result as it comes (errors, warnings, the bars); the counts by status,
    the seconds taken and how many of the failed were written but failed on their quality flags
    (``--qa-fail``). Ctrl-C or SIGTERM ends the command with how many cases are done."""
    from stuseg import batch

    log = output / batch.LOG_NAME
    log_size = log.stat().st_size if log.is_file() else 0  # what the log held before this run
    counts = {"ok": 0, "failed": 0, "skipped": 0}
    qa_failed = 0
    start = time.perf_counter()
    try:
        with (
            batch.signals_interrupt(),
            contextlib.closing(results),
            _batch_bars(quiet, len(cases)) as bars,
        ):
            tiles.append(bars)
            for result in results:
                counts[result.status] += 1
                qa_failed += result.status == "failed" and bool(result.outputs)
                name = result.case.id if result.case else "?"
                if result.status == "failed":
                    bars.print(f"stuseg: error: {name}: {result.error}")
                elif not quiet:
                    for warning in result.warnings:
                        bars.print(f"stuseg: warning: {name}: {warning}")
                bars.case_done(counts)
    except KeyboardInterrupt as exc:
        import signal

        signum = getattr(exc, "signum", signal.SIGINT)
        how = "terminated by SIGTERM" if signum == signal.SIGTERM else "interrupted by Ctrl-C"
        done = batch.cases_done(output, cases, since=log_size)
        raise fail(
            f"{how}; {done} of {len(cases)} cases are done; run the same command again to go on",
            code=128 + signum,
        ) from None
    return counts, time.perf_counter() - start, qa_failed


def _count(n: int, noun: str) -> str:
    """``1 file``, ``3 files``."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _duration(seconds: float) -> str:
    """``42.0s``, ``3m 12s`` or ``2h 05m``."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m"


class _BatchBars:
    """The batch's progress on stderr: a bar over cases (ok / failed / skipped, ETA) and the tiles
    of the case in the network. Lines printed through it appear above the bars."""

    def __init__(self, progress: Any, total: int) -> None:
        self.progress = progress
        self.cases = progress.add_task("0 ok, 0 failed, 0 skipped", total=total) if progress else None
        self.tiles = None

    def print(self, line: str) -> None:
        if self.progress is None:
            say(line)
        else:
            self.progress.console.print(" ".join(line.splitlines()), markup=False, soft_wrap=True)

    def case_done(self, counts: dict[str, int]) -> None:
        if self.progress is None:
            return
        text = f"{counts['ok']} ok, {counts['failed']} failed, {counts['skipped']} skipped"
        self.progress.update(self.cases, completed=sum(counts.values()), description=text)

    def tile(self, case: Any, done: int, total: int) -> None:
        if self.progress is None:
            return
        if self.tiles is None:
            self.tiles = self.progress.add_task(case.id, total=total)
        self.progress.update(self.tiles, completed=done, total=total, description=f"  {case.id}")


@contextmanager
def _batch_bars(quiet: bool, total: int) -> Iterator[_BatchBars]:
    """Rich bars on stderr (only on a terminal, and not with --quiet)."""
    if quiet or not err.is_terminal:
        yield _BatchBars(None, total)
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err, transient=True) as progress:
        yield _BatchBars(progress, total)


# Statistics and preview


# At most this many findings are named in the quality line; statistics.json lists every flag.
QUALITY_LINE_ITEMS = 6


def quality_line(stats: Any) -> str | None:
    """One line naming the structures flagged ``wrong_side``, ``fragmented`` or ``low_confidence``,
    or None if none is.

    ``empty`` and ``touches_border`` are not named: most scans show part of a body, so a correct
    result raises them for many structures (statistics.json lists them).
    """
    from stuseg.analysis.quality import LOW_PROBABILITY
    from stuseg.structures.labels import left_right_pairs

    records = stats.by_name()
    items = [
        f"{left} on the wrong side of {right}"
        for left, right in left_right_pairs(records)
        if records[left]["wrong_side"] and records[right]["wrong_side"]
    ]
    for name in stats.flagged()["fragmented"]:
        rec = records[name]
        outside, stray = rec["outside_largest_share"], rec["stray_share"]
        share = f"{outside:.0%} outside the largest" + ("" if stray == outside else f", {stray:.0%} stray")
        items.append(f"{name} in {rec['fragments']} pieces ({share})")
    for name in stats.flagged()["low_confidence"]:
        rec = records[name]
        items.append(
            f"{name} unsure ({rec['low_probability_share']:.0%} of voxels below "
            f"p {LOW_PROBABILITY:g}, mean p {rec['mean_probability']:.2f})"
        )
    if not items:
        return None
    more = len(items) - QUALITY_LINE_ITEMS
    shown = items[:QUALITY_LINE_ITEMS] + ([f"and {more} more (see statistics.json)"] if more > 0 else [])
    return "stuseg: quality: " + "; ".join(shown)


SegmentationArg = Annotated[
    Path,
    typer.Argument(
        metavar="SEGMENTATION",
        help="Folder of <structure>.nii.gz masks (stuseg's or TotalSegmentator's) or a multilabel file.",
    ),
]
CtArg = Annotated[
    Path,
    typer.Argument(metavar="CT", help="The CT it was made from: NIfTI, NRRD, MHA/MHD or a DICOM folder."),
]
SeriesOption = Annotated[
    str | None,
    typer.Option("--series", metavar="UID", help="DICOM series to use when a folder holds several."),
]


def _check_file_output(
    path: Path, suffix: str, inputs: list[Path], overwrite: bool, document: str | None = None
) -> None:
    """Refuse an output file path before any work: wrong suffix, or unsafe (``outputs.check_output``,
    which also refuses a stuseg document of another kind than ``document``)."""
    from stuseg.results import outputs

    if not path.name.lower().endswith(suffix):
        raise fail(f"{path} must end in {suffix}")
    outputs.check_output(path, inputs=inputs, kind="file", overwrite=overwrite, document=document)


@app.command("statistics")
@user_errors
def statistics_cmd(
    segmentation: Annotated[
        Path,
        typer.Argument(
            metavar="SEGMENTATION",
            help="Folder of <structure>.nii.gz masks (stuseg's or TotalSegmentator's), a multilabel file, or "
            "a batch folder (stuseg batch --output) for the cohort tables.",
        ),
    ],
    ct: Annotated[
        Path | None,
        typer.Argument(
            metavar="[CT]",
            help="The CT it was made from: NIfTI, NRRD, MHA/MHD or a DICOM folder (not for a batch folder).",
        ),
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            metavar="FILE",
            help="Write FILE.json and FILE.csv (default: CSV to stdout); for a batch folder, the cohort "
            "tables FILE.csv and FILE.cases.csv (default: stuseg-cohort.csv and stuseg-cohort.cases.csv "
            "in it).",
        ),
    ] = None,
    names: NamesOption = None,
    series: SeriesOption = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help=OVERWRITE_HELP)] = False,
) -> None:
    """Volume, intensity (HU) statistics, centroid and bounding box of each structure of a segmentation."""
    from stuseg.analysis import statistics as stats_mod
    from stuseg.results import outputs

    if ct is None:
        _cohort(segmentation, output, overwrite, names, series)
        return
    inputs = [segmentation, ct, *([names] if names is not None else [])]
    if output is not None:
        _check_file_output(output, ".json", inputs, overwrite, stats_mod.DOCUMENT)
        json_path, csv_path = stats_mod.output_paths(output)
        # The CSV carries no signature of its own: it is stuseg's when its JSON twin is.
        ours = json_path.is_file() and outputs.written_by_stuseg(json_path)
        _check_file_output(csv_path, ".csv", inputs, overwrite or ours)
    scan = stats_mod.load_scan(segmentation, ct, names=names, series=series)
    if scan.reordered:
        note = "is stored in another axis order than the CT; matched voxel for voxel"
        err.print(f"note: {segmentation} {note}", markup=False)
    result = stats_mod.compute(scan.labels, scan.affine, scan.ct, scan.names)
    line = quality_line(result)
    if output is None:
        typer.echo(stats_mod.csv_text([(None, result)]), nl=False)
        if line:
            say(line)
        return
    with outputs.staged_files([json_path, csv_path]) as (tmp_json, tmp_csv):
        stats_mod.write_statistics(result, tmp_json, tmp_csv)
    if line:
        say(line)
    present = sum(1 for r in result.structures if r["voxels"])
    counted = f"{present} of {len(result.structures)} structures present"
    err.print(f"wrote {json_path} and {csv_path} ({counted})", markup=False)


def _cohort(
    folder: Path, output: Path | None, overwrite: bool, names: Path | None, series: str | None
) -> None:
    """``stuseg statistics RESULTS/``: the cohort tables of a batch folder (``stuseg.analysis.cohort``)."""
    from stuseg.analysis import cohort
    from stuseg.results import outputs

    if not cohort.is_batch_folder(folder):
        raise fail(f"give the CT that {folder} was made from (only a batch folder needs none)")
    if names is not None or series is not None:
        raise fail("--names and --series apply to one segmentation, not to a batch folder")
    table, cases = (output, cohort.cases_path(output)) if output is not None else cohort.default_paths(folder)
    for path in (table, cases):
        if not path.name.lower().endswith(".csv"):
            raise fail(f"{path} must end in .csv")
        ours = path.is_file() and cohort.written_by_cohort(path)
        outputs.check_output(path, inputs=[], kind="file", overwrite=overwrite or ours)
    result = cohort.cohort_of(folder)
    with outputs.staged_files([table, cases]) as (tmp_table, tmp_cases):
        tmp_table.write_text(result.structures, encoding="utf-8")
        tmp_cases.write_text(result.cases, encoding="utf-8")
    counted = f"{result.ok} case(s) ok, {result.failed} failed"
    err.print(f"wrote {table} and {cases} ({counted})", markup=False)


@app.command("preview")
@user_errors
def preview_cmd(
    segmentation: SegmentationArg,
    ct: CtArg,
    output: Annotated[Path, typer.Argument(metavar="OUTPUT.png", help="The picture to write.")],
    names: NamesOption = None,
    series: SeriesOption = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help=OVERWRITE_HELP)] = False,
) -> None:
    """Draw a preview picture: three slices with the structures, a front view and a legend."""
    from stuseg.analysis import statistics as stats_mod
    from stuseg.analysis.preview import write_preview
    from stuseg.results import outputs

    _check_file_output(output, ".png", [segmentation, ct, *([names] if names is not None else [])], overwrite)
    scan = stats_mod.load_scan(segmentation, ct, names=names, series=series)
    if scan.reordered:
        note = "is stored in another axis order than the CT; matched voxel for voxel"
        err.print(f"note: {segmentation} {note}", markup=False)
    with outputs.staged_files([output]) as (tmp,):
        write_preview(scan.labels, scan.affine, scan.ct, scan.names, tmp)
    err.print(f"wrote {output}", markup=False)


app.add_typer(finetune_app, name="finetune")


def main() -> None:
    from stuseg.inference.threads import limit_spin_waiting

    limit_spin_waiting()  # before torch loads: idle OpenMP threads soon sleep instead of spinning
    try:
        app()
    except Exception as exc:  # outside any command (the commands handle their own): still one line
        say(f"stuseg: error: {internal_error_line(exc)}")
        sys.exit(1)
