"""The ``stuseg`` command line: parse arguments, call the library, render the result.

No logic of its own. Heavy imports (torch) happen inside the commands so ``--help`` is fast.
Diagnostics go to stderr, data to stdout. A ``StusegError`` becomes one line on stderr and
exit status 1; nothing else is printed.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

from stuseg import __version__
from stuseg.errors import StusegError
from stuseg.labels import Group, Numbering


class OutputType(str, Enum):
    """What ``stuseg predict`` writes; ``--output-type`` is repeatable."""

    NIFTI = "nifti"  # masks (or the --ml file) as NIfTI
    DICOM_SEG = "dicom-seg"  # one DICOM Segmentation instance referencing the DICOM series INPUT


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


ManifestOption = Annotated[
    Path | None,
    typer.Option("--manifest", metavar="FILE", help="Use another weights manifest (JSON) than the built-in."),
]


@contextmanager
def _progress_bar() -> Iterator[Callable[[str, int, int | None], None]]:
    """A rich progress bar on stderr, fed by the library's ``progress(phase, done, total)`` callback."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description:>8}"), BarColumn(), DownloadColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err, transient=True) as bar:
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
    from stuseg import weights

    if not sizes and not all_sizes:
        raise fail("choose what to download with --size SIZE (small, base, large, huge) or --all")
    _quiet_hub()
    chosen = list(weights.load_manifest(manifest).entries) if all_sizes else sizes or []
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
    from stuseg import weights

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
    from stuseg import weights

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
        status = f"cached, verified by {r.verified_by}" if r.present else "not downloaded"
        table.add_row(r.size, f"{r.parameters / 1e6:,.1f}M", download, status, str(r.path))
    out.print(table)


@app.command("predict")
@user_errors
def predict_cmd(
    input_path: Annotated[
        Path,
        typer.Argument(metavar="INPUT", help="CT image (.nii, .nii.gz, .nrrd, .mha, .mhd) or DICOM folder."),
    ],
    output: Annotated[
        Path, typer.Argument(metavar="OUTPUT", help="Folder for one mask per structure (a file with --ml).")
    ],
    size: Annotated[
        str | None,
        typer.Option(
            "--size",
            "-s",
            help="small, base, large or huge (S/B/L/H). [default: base, or the size of --weights]",
        ),
    ] = None,
    fast: Annotated[
        bool, typer.Option("--fast", help="Argmax at 1.5 mm, then resample labels: far less memory.")
    ] = False,
    tta: Annotated[bool, typer.Option("--tta", help="Average over the 8 mirrorings (8x slower).")] = False,
    step_size: Annotated[
        float, typer.Option("--step-size", min=0.05, max=1.0, help="Tile step as a fraction of the patch.")
    ] = 0.5,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps.")] = "auto",
    weights_file: Annotated[
        Path | None,
        typer.Option("--weights", metavar="FILE", help="Local checkpoint (.model or .safetensors)."),
    ] = None,
    roi_subset: Annotated[
        list[str] | None,
        typer.Option("--roi-subset", metavar="NAME", help="Keep only these structures, groups or patterns."),
    ] = None,
    multilabel: Annotated[
        bool, typer.Option("--ml", help="Write one multilabel file (values = model index) with names.")
    ] = False,
    series: Annotated[
        str | None,
        typer.Option("--series", metavar="UID", help="DICOM series to use when a folder holds several."),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only errors.")] = False,
    output_types: Annotated[
        list[OutputType] | None,
        typer.Option(
            "--output-type",
            metavar="TYPE",
            help="nifti (default) and/or dicom-seg (seg.dcm in OUTPUT, or OUT.dcm beside --ml OUT.nii.gz; "
            "needs a DICOM series INPUT); repeatable.",
        ),
    ] = None,
) -> None:
    """Segment the 104 structures of a CT scan."""
    import time
    import warnings

    from stuseg import pipeline
    from stuseg.network import canonical_size

    if size is not None:
        try:
            size = canonical_size(size)
        except ValueError as exc:
            raise fail(str(exc)) from None
    pipeline.check_output(output, multilabel)
    # --- DICOM-SEG output (dicomseg helper): refuse a non-DICOM or unusable INPUT before any work.
    types = set(output_types or [OutputType.NIFTI])
    dicom_source = None
    if OutputType.DICOM_SEG in types:
        from stuseg import dicomseg

        dicom_source = dicomseg.read_dicom_source(input_path, series)
    # --- end DICOM-SEG
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with _tile_bar(quiet) as progress:
            seg = pipeline.segment(
                input_path,
                size=size,
                fast=fast,
                tta=tta,
                step_size=step_size,
                device=device,
                weights=weights_file,
                roi_subset=roi_subset,
                series=series,
                progress=progress,
            )
        start = time.perf_counter()
        written = []
        if OutputType.NIFTI in types:
            if multilabel:
                pipeline.write_multilabel(seg, output)
            else:
                pipeline.write_masks(seg, output)
            written.append(str(output) if multilabel else f"{len(seg.names)} masks in {output}")
        # --- DICOM-SEG output (dicomseg helper)
        if dicom_source is not None:
            seg_path = dicomseg.seg_path_for(output, multilabel)
            if dicomseg.write_dicom_seg(
                seg.image, seg.names, dicom_source, seg_path, algorithm=f"STU-Net {seg.size}"
            ):
                written.append(str(seg_path))
        # --- end DICOM-SEG
        seg.timings["write"] = time.perf_counter() - start
    if not quiet:
        for w in caught:
            err.print(f"stuseg: warning: {w.message}", markup=False)
        err.print(_summary(seg, " and ".join(written) or "nothing"), markup=False)


@contextmanager
def _tile_bar(quiet: bool) -> Iterator[Callable[[int, int], None] | None]:
    """A rich progress bar over sliding-window tiles, with ETA, on stderr."""
    if quiet:
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
    order = ("read", "load", "preprocess", "network", "softmax", "export", "write")
    times = ", ".join(f"{k} {seg.timings[k]:.1f}s" for k in order if k in seg.timings)
    memory = f"peak RAM {seg.peak_rss_bytes / 2**30:.2f} GB" if seg.peak_rss_bytes else "peak RAM unknown"
    if seg.peak_gpu_bytes is not None:
        memory += f", peak GPU {seg.peak_gpu_bytes / 2**30:.2f} GB"
    return f"wrote {what} ({seg.size} on {seg.device}); {times}; {memory}"


def main() -> None:
    app()
