"""``stuseg predict``: one scan (or DICOM series) to a result on disk."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from stuseg.cli.base import fail, given_path, say, user_errors
from stuseg.cli.options import (
    OVERWRITE_HELP,
    QA_FAIL_EXIT,
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
    channel_paths,
    model_folder,
    model_inputs,
)
from stuseg.cli.render import blobs_line, quality_line, summary_line, tile_bar, what_was_written

__all__ = ["predict_cmd"]


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

    image = given_path(input_path, "INPUT")
    size = canonical_size(size)
    if remove_small_blobs is not None and not remove_small_blobs > 0:
        raise fail(f"--remove-small-blobs must be a positive volume in mm3, got {remove_small_blobs:g}")
    if model is None and channels:
        raise fail("--channel, --folds and --checkpoint apply to a --model")
    trained = model_folder(model, folds, checkpoint, "--channel, --folds and --checkpoint")
    images = channel_paths(image, channels, trained.plan.in_channels if trained is not None else 1)
    # Every output check comes before any work, so a bad OUTPUT costs no prediction.
    inputs = [*images, *model_inputs(weights_file, trained)]
    request = build_request(output_types, with_statistics, with_preview, dicom_seg_type, codes_file)
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
            with tile_bar(quiet) as progress:
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
                    say(blobs_line(removed, remove_small_blobs))
            sources = results.Sources(ct=volume, dicom=dicom, mode=results.mode_name(fast, tta))
            written = results.write_result(layout, seg, request, sources)
    if not quiet:
        for w in caught:
            say(f"stuseg: warning: {w.message}")
        if written.statistics is not None and (line := quality_line(written.statistics)):
            say(line)
        say(summary_line(seg, what_was_written(layout, written, len(seg.names))))
    if qa_fail:
        from stuseg.analysis import quality, statistics

        stats = written.statistics or statistics.of_segmentation(seg, None)
        reason = quality.review_reason(quality.summarize(stats))
        if reason:
            what = what_was_written(layout, written, len(seg.names))
            raise fail(f"{reason}; the result is kept ({what})", QA_FAIL_EXIT)
