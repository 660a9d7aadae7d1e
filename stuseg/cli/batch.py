"""``stuseg batch``: many scans with one model load, locally or on a Ray cluster."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

from stuseg.cli.base import fail, say, user_errors
from stuseg.cli.options import (
    CheckpointChoice,
    CheckpointOption,
    DeviceOption,
    DicomSegType,
    FastOption,
    FoldsOption,
    ModelOption,
    OutputType,
    PrecisionChoice,
    PrecisionOption,
    QaFailOption,
    RoiSubsetOption,
    SizeOption,
    StepSizeOption,
    TtaOption,
    WeightsFileOption,
    build_request,
    canonical_size,
    model_folder,
    model_inputs,
)
from stuseg.cli.render import BatchBars, batch_bars, readable_duration
from stuseg.errors import StusegError

__all__ = ["batch_cmd"]


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
    tiles: list[BatchBars] = []  # the bars, once shown; the network stage reports its tiles there
    try:
        size = canonical_size(size)
        request = build_request(output_types, with_statistics, with_preview, dicom_seg_type, codes_file)
        trained = _batch_model(model, folds, checkpoint, roi_subset)
        found = _batch_cases(sources, trained)
        inputs = [*sources, *(p for c in found.cases for p in (c.input, *c.channels))]
        inputs += model_inputs(weights_file, trained)
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
            + f", {counts['skipped']} skipped in {readable_duration(seconds)}{rate}; "
            + (f"{len(found.ignored)} non-image DICOM objects passed over; " if found.ignored else "")
            + f"log: {log}"
        )
    if counts["failed"]:
        raise fail(f"{counts['failed']} of {len(found.cases)} cases failed, see {log}")


def _batch_model(
    model: str | None, folds: list[str] | None, checkpoint: CheckpointChoice, roi_subset: list[str] | None
) -> Any:
    """The ``--model`` folder a batch runs (``model_folder``), or None; without one, the
    ``--roi-subset`` names are checked against the published table before any work."""
    trained = model_folder(model, folds, checkpoint, "--folds and --checkpoint")
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
    tiles: list[BatchBars],
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
    results: Iterator[Any], cases: list[Any], output: Path, quiet: bool, tiles: list[BatchBars]
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
            batch_bars(quiet, len(cases)) as bars,
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
