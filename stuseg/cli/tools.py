"""``labels``, ``export-labels``, ``statistics``, ``preview``: the label table, and segmentations
already on disk."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from stuseg.cli.base import err, fail, out, say, user_errors
from stuseg.cli.options import OVERWRITE_HELP, NamesOption
from stuseg.cli.render import plural, quality_line
from stuseg.structures.labels import Group, Numbering

__all__ = [
    "CtArg",
    "SegmentationArg",
    "SeriesOption",
    "export_labels_cmd",
    "labels_cmd",
    "preview_cmd",
    "statistics_cmd",
]


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
    # file carries, or in a folder by its masks' names; either way they are selected from that
    # table (by groups too where it is not a model's own --ml table: by the names it shares).
    if names_file is not None:
        table = labelmaps.read_table_file(names_file)
    else:
        table = labelmaps.own_table(segmentation)
    result = labelmaps.export_labels(
        segmentation,
        output,
        labels.select(patterns)
        if table is None
        else labels.select_from(table, patterns, groups=names_file is not None or segmentation.is_dir()),
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
    say(f"wrote {plural(len(result.written), 'file')}")


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
    from stuseg.results import outputs, scans

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
    scan = scans.load_scan(segmentation, ct, names=names, series=series)
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
    """``stuseg statistics RESULTS/``: the cohort tables of a batch folder (``stuseg.runs.cohort``)."""
    from stuseg.results import outputs
    from stuseg.runs import cohort

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
    from stuseg.analysis.preview import write_preview
    from stuseg.results import outputs, scans

    _check_file_output(output, ".png", [segmentation, ct, *([names] if names is not None else [])], overwrite)
    scan = scans.load_scan(segmentation, ct, names=names, series=series)
    if scan.reordered:
        note = "is stored in another axis order than the CT; matched voxel for voxel"
        err.print(f"note: {segmentation} {note}", markup=False)
    with outputs.staged_files([output]) as (tmp,):
        write_preview(scan.labels, scan.affine, scan.ct, scan.names, tmp)
    err.print(f"wrote {output}", markup=False)
