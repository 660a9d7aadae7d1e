"""DICOM Segmentation (DICOM-SEG) output for results on a DICOM series, written with highdicom.

One Segmentation instance per run: one segment per structure present, labelled with the
structure's name and coded with SNOMED CT (``stuseg/data/snomed_ct.csv``), frames on the source
slices, referencing the source series and copying its patient and study attributes.

Two encodings (``seg_type``) of the same segments. BINARY (Segmentation Storage): one 1-bit frame
per structure per slice where it is present. LABELMAP (Label Map Segmentation Storage, a newer
SOP class that older readers and validators do not know): one 8-bit frame per slice holding any
structure, pixel value = segment number; smaller when slices hold more than 8 structures on
average (8 bits per pixel against 1 per structure), e.g. the 104 structures of a CT. In both,
the present structures are numbered 1..N in the order of their label values (N <= 255), and
segment n has the same description (label, codes, algorithm) in both; in a LABELMAP highdicom
adds segment 0, "Background" (DCM 125040), for the pixels of no structure. A reader maps segment
numbers back to structures through the SEG's SegmentSequence (SegmentLabel, codes).

A fine-tuned model's structures have names of their own. Codes for them come from a file the user
supplies (``read_codes``; its codes take precedence over the package's). A structure without
codes anywhere is coded generically, category and type both SCT 85756007 "Tissue" (the one
concept that is both in DICOM's CID 7150 "Segmentation Property Categories" and in CID 7151
"Segmentation Property Types", and claims nothing about what was segmented), with its name in
SegmentLabel and SegmentDescription; one StusegWarning names all structures coded so.

The label map stuseg produces is indexed (i, j, k) on the RAS grid built by SimpleITK from the
series. Each source image's rows and columns are found in that grid through its own
ImagePositionPatient, ImageOrientationPatient and PixelSpacing, so the frames do not depend on the
order of the files or on how the reader sorted the slices.

highdicom and pydicom are the optional extra ``stuseg[dicom]``; they are imported only here, on use.
"""

from __future__ import annotations

import csv
import io as _io
import json
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np

from stuseg.errors import InputError, OutputError, StusegError, read_user_text
from stuseg.images.geometry import LPS_TO_RAS
from stuseg.structures.colors import label_colors

__all__ = [
    "CODE_COLUMNS",
    "GENERIC_CODES",
    "INSTALL_HINT",
    "SEG_TYPES",
    "DicomSource",
    "SegType",
    "SnomedCodes",
    "coding_of",
    "label_frames",
    "read_codes",
    "read_dicom_source",
    "require_highdicom",
    "snomed_table",
    "write_dicom_seg",
]

INSTALL_HINT = 'pip install "stuseg[dicom]"'

# A source pixel centre may sit this far (in voxels, on each axis) from a voxel centre of the label
# map. read_image already refuses slices more than 0.1 slice off the regular grid; anything below
# 0.5 still names one voxel unambiguously.
_GRID_TOLERANCE = 0.25

# The attributes a SEG must reference or copy from every source image, and that a badly anonymised
# series may have emptied. (FrameOfReferenceUID is required by the SEG's Frame of Reference module.)
_REQUIRED_UIDS = (
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "SOPClassUID",
    "FrameOfReferenceUID",
)
_REQUIRED_GEOMETRY = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns")

#: The encodings of ``write_dicom_seg`` (``--dicom-seg-type``): BINARY is the default.
SegType = Literal["binary", "labelmap"]
SEG_TYPES: tuple[SegType, ...] = ("binary", "labelmap")

# How the errors of read_dicom_source name the file an --output-type writes.
_WHAT = {"dicom-seg": "a DICOM-SEG", "rtstruct": "an RTSTRUCT"}
_SHORT = {"dicom-seg": "SEG", "rtstruct": "RTSTRUCT"}


class SnomedCodes(NamedTuple):
    """SNOMED CT codes (scheme SCT) of one structure: (code value, code meaning) pairs."""

    category: tuple[str, str]
    type: tuple[str, str]
    modifier: tuple[str, str] | None  # laterality (Left / Right), None for unpaired structures


#: The codes of a structure that no table codes: SCT 85756007 "Tissue" as category (CID 7150)
#: and as type (CID 7151), no modifier.
GENERIC_CODES = SnomedCodes(("85756007", "Tissue"), ("85756007", "Tissue"), None)

# The columns of a codes table (the package's CSV, a user's CSV, the keys of a user's JSON objects).
CODE_COLUMNS = (
    "structure",
    "category_code",
    "category_meaning",
    "type_code",
    "type_meaning",
    "modifier_code",
    "modifier_meaning",
)
# DICOM: a CodeMeaning is LO (at most 64 characters); a SNOMED CT concept id is 6 to 18 digits.
_MEANING_CHARS = 64
_SCT_ID = re.compile(r"[0-9]{6,18}")


def _codes_of(row: Mapping[str, Any]) -> SnomedCodes:
    """The codes of one table row (keys of ``CODE_COLUMNS``); ValueError names the first problem."""
    values = {k: str(row.get(k) or "").strip() for k in CODE_COLUMNS}
    if not values["structure"]:
        raise ValueError("the structure name is empty")
    pairs = []
    for part in ("category", "type", "modifier"):
        code, meaning = values[f"{part}_code"], values[f"{part}_meaning"]
        if part == "modifier" and not code and not meaning:
            pairs.append(None)
            continue
        if not _SCT_ID.fullmatch(code):
            raise ValueError(f"{part}_code '{code}' is not a SNOMED CT concept id (6 to 18 digits)")
        if not meaning or len(meaning) > _MEANING_CHARS or "\\" in meaning:
            raise ValueError(f"{part}_meaning must be 1 to {_MEANING_CHARS} characters without a backslash")
        pairs.append((code, meaning))
    return SnomedCodes(pairs[0], pairs[1], pairs[2])


def snomed_table() -> dict[str, SnomedCodes]:
    """The SNOMED CT codes of every structure, from the package's ``data/snomed_ct.csv``.

    Returns:
        Structure name -> its category, type and (optional) type modifier codes.
    """
    text = resources.files("stuseg").joinpath("data/snomed_ct.csv").read_text(encoding="utf-8")
    rows = csv.DictReader(line for line in _io.StringIO(text) if not line.startswith("#"))
    return {r["structure"]: _codes_of(r) for r in rows}


def read_codes(path: Path) -> dict[str, SnomedCodes]:
    """The SNOMED CT codes a user gives for a model's structures, from a CSV or a JSON file.

    CSV (``.csv``): a header line with the columns ``structure, category_code, category_meaning,
    type_code, type_meaning`` and optionally ``modifier_code, modifier_meaning``, then one row per
    structure; lines starting with ``#`` are comments. JSON (any other suffix): a list of objects
    with the same keys. ``structure`` is the structure's name as the model names it (compared as
    ``write_dicom_seg`` says); codes are SNOMED CT concept ids (scheme SCT), e.g.
    ``GTVp,49755003,Morphologically Abnormal Structure,108369006,Neoplasm,,`` ; the meanings go
    into the SEG as written (at most 64 characters). The modifier (e.g. laterality: 7771000
    Left, 24028007 Right) is given with both columns or left empty.

    Args:
        path: the file.

    Returns:
        Structure name -> its codes.

    Raises:
        InputError: the file cannot be read or parsed, lacks a column, or a row is invalid (one
            line naming the file, the row and the problem) or repeats a structure.
    """
    path = Path(path)
    text = read_user_text(path, "codes file")
    rows: list[tuple[str, Mapping[str, Any]]] = []
    if path.suffix.lower() == ".csv":
        lines = [(n, line) for n, line in enumerate(text.splitlines(), start=1) if not line.startswith("#")]
        reader = csv.DictReader(line for _, line in lines)
        missing = [c for c in CODE_COLUMNS[:5] if c not in (reader.fieldnames or [])]
        if missing:
            raise InputError(
                f"the codes file {path} lacks the column {missing[0]}; its header line must name "
                f"{', '.join(CODE_COLUMNS)}"
            )
        for row in reader:
            rows.append((f"line {lines[reader.line_num - 1][0]}", row))
    else:
        try:
            doc = json.loads(text)
        except ValueError as exc:
            raise InputError(f"the codes file {path} is not JSON: {exc}") from None
        if not isinstance(doc, list) or not all(isinstance(d, dict) for d in doc):
            raise InputError(f"the codes file {path} must hold a JSON list of objects, one per structure")
        rows = [(f"entry {n}", d) for n, d in enumerate(doc, start=1)]
    table: dict[str, SnomedCodes] = {}
    for where, row in rows:
        try:
            codes = _codes_of(row)
        except ValueError as exc:
            raise InputError(f"{path}, {where}: {exc}; fix or remove it") from None
        name = str(row.get("structure")).strip()
        if name in table:
            raise InputError(f"{path}, {where}: structure '{name}' is coded twice; keep one row")
        table[name] = codes
    return table


def coding_of(
    names: Sequence[str], codes: Mapping[str, SnomedCodes] | None = None
) -> list[SnomedCodes | None]:
    """The codes of each structure name, None where neither table has them.

    ``codes`` (a user's) are looked up first, the package table second. A name matches a row of
    ``codes`` when equal, or else when their ``stuseg.structures.labels.file_name`` forms are equal
    case-insensitively (a model's outputs use those forms: "Liver Tumour" codes ``Liver_Tumour``).
    """
    from stuseg.structures.labels import file_name

    package = snomed_table()
    users = dict(codes or {})
    by_file = {file_name(k).casefold(): v for k, v in users.items()}
    found = []
    for name in names:
        hit = users.get(name) or by_file.get(file_name(name).casefold()) or package.get(name)
        found.append(hit)
    return found


def require_highdicom(output: str = "dicom-seg") -> Any:
    """Import highdicom (and pydicom with it), or explain in one line how to install them."""
    try:
        import highdicom
        import pydicom  # noqa: F401
    except ImportError:
        raise StusegError(
            f"--output-type {output} needs the optional DICOM support; install it with: {INSTALL_HINT}"
        ) from None
    return highdicom


@dataclass(frozen=True)
class DicomSource:
    """The source series of a DICOM-SEG: its files (GDCM's slice order) and their headers."""

    folder: Path
    files: tuple[Path, ...]
    datasets: tuple[Any, ...]  # pydicom Datasets without pixel data, one per file


def read_dicom_source(
    input_path: Path, series: str | None = None, *, output: str = "dicom-seg"
) -> DicomSource:
    """Read and check the headers of the series a DICOM-SEG (or RTSTRUCT) will reference, before any
    other work.

    Args:
        input_path: the INPUT of ``stuseg predict``; must be a folder holding a DICOM series.
        series: the SeriesInstanceUID that picks a series in a folder holding several.
        output: the ``--output-type`` that needs the series (``dicom-seg`` or ``rtstruct``), named
            in the errors.

    Returns:
        The series' files and headers, to pass to :func:`write_dicom_seg`.

    Raises:
        StusegError: highdicom/pydicom (the ``stuseg[dicom]`` extra) are not installed.
        InputError: INPUT is not a DICOM series folder; the files cannot be read; they lack UIDs or
            geometry that a SEG must reference (a badly anonymised series); or they disagree on
            the study, series or frame of reference.
    """
    require_highdicom(output)
    import pydicom

    path = Path(input_path)
    if not path.is_dir():
        raise InputError(
            f"--output-type {output} needs a folder holding a DICOM series as INPUT, but {path} is "
            "not one; use --output-type nifti for this input"
        )
    from stuseg.images.io import dicom_series_files

    files = tuple(dicom_series_files(path, series))
    datasets = []
    for f in files:
        try:
            datasets.append(pydicom.dcmread(f, stop_before_pixels=True))
        except (OSError, pydicom.errors.InvalidDicomError) as exc:
            raise InputError(f"cannot read the DICOM header of {f}: {exc}") from None
    missing = [
        name
        for name in (*_REQUIRED_UIDS, *_REQUIRED_GEOMETRY)
        if any(not str(ds.get(name, "") or "").strip() for ds in datasets)
    ]
    if missing:
        raise InputError(
            f"cannot write {_WHAT.get(output, output)} for {path}: its files have no (or an empty) "
            f"{', '.join(missing)}, which the {_SHORT.get(output, output)} must reference (a badly "
            f"anonymised series?); fill them in with a DICOM tool, or leave out --output-type {output}"
        )
    for name in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
        if len({str(ds.get(name)) for ds in datasets}) > 1:
            raise InputError(f"the DICOM files in {path} do not share one {name}; pass one series only")
    if len({str(ds.SOPInstanceUID) for ds in datasets}) < len(datasets):
        raise InputError(f"the DICOM files in {path} repeat SOPInstanceUIDs; remove the duplicate files")
    return DicomSource(folder=path, files=files, datasets=tuple(datasets))


def _frame_indices(
    ds: Any, inverse_affine: np.ndarray, shape: tuple[int, int, int]
) -> tuple[np.ndarray, ...]:
    """Label-map indices (i, j, k) of every pixel of source image ``ds``, each of shape (Rows, Columns).

    DICOM: pixel (row m, column n) lies at IPP + n * PixelSpacing[1] * IOP[:3] + m * PixelSpacing[0] *
    IOP[3:] in LPS millimetres. The label map's affine maps (i, j, k) to RAS millimetres.
    """
    position = np.asarray([float(v) for v in ds.ImagePositionPatient], dtype=np.float64)
    cosines = np.asarray([float(v) for v in ds.ImageOrientationPatient], dtype=np.float64)
    row_spacing, col_spacing = (float(v) for v in ds.PixelSpacing)
    rows, cols = int(ds.Rows), int(ds.Columns)
    to_index = inverse_affine[:3, :3] @ LPS_TO_RAS
    origin = to_index @ position + inverse_affine[:3, 3]
    along_col = to_index @ (cosines[:3] * col_spacing)  # index step per column (n + 1)
    along_row = to_index @ (cosines[3:] * row_spacing)  # index step per row (m + 1)
    m = np.arange(rows, dtype=np.float64)[:, None]
    n = np.arange(cols, dtype=np.float64)[None, :]
    indices = []
    for axis in range(3):
        exact = origin[axis] + m * along_row[axis] + n * along_col[axis]
        nearest = np.rint(exact)
        if np.max(np.abs(exact - nearest)) > _GRID_TOLERANCE:
            raise OutputError(
                f"the DICOM image {ds.SOPInstanceUID} does not lie on the grid of the label map; "
                "a DICOM-SEG or RTSTRUCT can only be written for the series that was segmented"
            )
        if nearest.min() < 0 or nearest.max() > shape[axis] - 1:
            raise OutputError(
                f"the DICOM image {ds.SOPInstanceUID} reaches outside the label map; "
                "a DICOM-SEG or RTSTRUCT can only be written for the series that was segmented"
            )
        indices.append(np.broadcast_to(nearest.astype(np.intp), (rows, cols)))
    return tuple(indices)


def label_frames(labels: np.ndarray, affine: np.ndarray, datasets: Sequence[Any]) -> np.ndarray:
    """The label map resampled (exactly, by index) onto the pixels of each source image.

    Args:
        labels: label map indexed (i, j, k), shape (X, Y, Z).
        affine: its voxel-to-RAS affine (4 x 4).
        datasets: the source images' headers (ImagePositionPatient, ImageOrientationPatient,
            PixelSpacing, Rows, Columns).

    Returns:
        Array (len(datasets), Rows, Columns): frame ``f`` holds the labels of ``datasets[f]``'s pixels.

    Raises:
        OutputError: a source image does not lie on the label map's grid, or the images do not
            cover every labelled voxel exactly once.
    """
    labels = np.asarray(labels)
    inverse = np.linalg.inv(np.asarray(affine, dtype=np.float64))
    shape = (int(labels.shape[0]), int(labels.shape[1]), int(labels.shape[2]))
    rows, cols = int(datasets[0].Rows), int(datasets[0].Columns)
    frames = np.zeros((len(datasets), rows, cols), dtype=labels.dtype)
    covered = np.zeros(shape, dtype=bool)
    for f, ds in enumerate(datasets):
        if (int(ds.Rows), int(ds.Columns)) != (rows, cols):
            raise OutputError(
                "the images of the DICOM series differ in size; a DICOM-SEG or RTSTRUCT needs one frame size"
            )
        idx = _frame_indices(ds, inverse, shape)
        frames[f] = labels[idx]
        covered[idx] = True
    if not covered.all():
        raise OutputError(
            "the DICOM images do not cover the whole label map; "
            "a DICOM-SEG or RTSTRUCT can only be written for the series that was segmented"
        )
    return frames


def _segment_descriptions(
    hd: Any, names: Sequence[str], algorithm: str, version: str, codes: Mapping[str, SnomedCodes] | None
) -> list[Any]:
    from highdicom.sr import CodedConcept
    from pydicom.sr.codedict import codes as dcm_codes

    from stuseg.errors import StusegWarning

    coding = coding_of(names, codes)
    generic = [n for n, c in zip(names, coding) if c is None]
    if generic:
        warnings.warn(
            f"no SNOMED CT codes for {', '.join(generic)}, so the DICOM-SEG codes "
            f"{'it' if len(generic) == 1 else 'them'} as Tissue (SCT 85756007); "
            "give their codes with a codes file (predict --codes FILE)",
            StusegWarning,
            stacklevel=3,
        )
    identification = hd.AlgorithmIdentificationSequence(
        name=algorithm, family=dcm_codes.DCM.ArtificialIntelligence, version=version, source="stuseg"
    )
    # The colours of the preview and the viewer tables, as RecommendedDisplayCIELabValue (0062,000D).
    colors = label_colors(dict(enumerate(names, start=1)))
    descriptions = []
    for number, (name, sct) in enumerate(zip(names, coding), start=1):
        desc = hd.seg.SegmentDescription(
            segment_number=number,
            # SegmentLabel is LO: at most 64 characters; the whole name is in SegmentDescription.
            segment_label=name[:_MEANING_CHARS],
            segmented_property_category=CodedConcept(*_concept(sct or GENERIC_CODES, "category")),
            segmented_property_type=CodedConcept(*_concept(sct or GENERIC_CODES, "type")),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=identification,
            display_color=hd.color.CIELabColor.from_rgb(*colors[number]),
        )
        if sct is None or len(name) > _MEANING_CHARS:
            desc.SegmentDescription = name  # ST: up to 1024 characters
        if sct is not None and sct.modifier is not None:
            # highdicom has no argument for the laterality; DICOM nests it in the type code item
            # (Segmented Property Type Modifier Code Sequence, 0062,0011).
            desc.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
                CodedConcept(sct.modifier[0], "SCT", sct.modifier[1])
            ]
        descriptions.append(desc)
    return descriptions


def _concept(sct: SnomedCodes, part: str) -> tuple[str, str, str]:
    """(value, scheme, meaning) of a category or type code, for highdicom's CodedConcept."""
    value, meaning = getattr(sct, part)
    return value, "SCT", meaning


def write_dicom_seg(
    labels: Any,
    names: Mapping[int, str],
    source: DicomSource,
    path: Path,
    *,
    algorithm: str = "STU-Net",
    codes: Mapping[str, SnomedCodes] | None = None,
    seg_type: SegType = "binary",
) -> Path | None:
    """Write one DICOM Segmentation instance (one segment per structure present).

    Args:
        labels: the label map as a nibabel image (uint8, values = label values of ``names``) on the
            grid read from ``source``'s series, e.g. ``Segmentation.image``.
        names: label value -> structure name; values absent from the label map get no segment.
        source: the series the labels were computed on, from :func:`read_dicom_source`.
        path: the file to write (a plain write: callers write into a staged folder or file).
        algorithm: the algorithm name recorded in the SEG (e.g. ``"STU-Net base"``).
        codes: structure name -> SNOMED CT codes (e.g. from :func:`read_codes`), used before the
            package's table; a structure in neither is coded generically (``GENERIC_CODES``),
            with one StusegWarning naming every such structure.
        seg_type: ``"binary"`` (one 1-bit frame per structure per slice) or ``"labelmap"`` (one
            8-bit frame per slice, pixel value = segment number); the segments are numbered and
            described alike in both (see the module's docstring).

    Returns:
        ``path``, or None (with a warning) when no structure is present: a SEG needs a segment.

    Raises:
        ValueError: ``seg_type`` is not one of ``SEG_TYPES``.
        StusegError: highdicom is not installed (``stuseg[dicom]``).
        OutputError: the labels do not lie on the source images, or the file cannot be written.
    """
    if seg_type not in SEG_TYPES:
        raise ValueError(f"seg_type must be one of {', '.join(SEG_TYPES)}, not {seg_type!r}")
    hd = require_highdicom()
    from stuseg import __version__
    from stuseg.errors import StusegWarning

    data = np.asanyarray(labels.dataobj)
    # Segmentation.image keeps its geometry in the header only (its .affine is None).
    affine = labels.affine if labels.affine is not None else labels.header.get_best_affine()
    frames = label_frames(data, affine, source.datasets)
    present = np.bincount(frames.ravel(), minlength=256) > 0
    values = [v for v in sorted(names) if 0 < v < present.size and present[v]]
    if not values:
        warnings.warn(
            f"no structure was found, so {path} was not written (a DICOM-SEG needs at least one segment)",
            StusegWarning,
            stacklevel=2,
        )
        return None
    # Segment numbers are 1..n in label order; everything else (absent, unselected) is background.
    # A LABELMAP stores this map as it is (pixel value = segment number), a BINARY one frame per
    # segment number.
    lut = np.zeros(256, np.uint8)
    lut[values] = np.arange(1, len(values) + 1, dtype=np.uint8)
    segment_map = lut[frames]
    descriptions = _segment_descriptions(hd, [names[v] for v in values], algorithm, __version__, codes)
    first = source.datasets[0]
    # A derived series is numbered apart from its source (1000 + the source's SeriesNumber).
    series_number = 1000 + int(first.get("SeriesNumber") or 0)
    try:
        seg = hd.seg.Segmentation(
            source_images=list(source.datasets),
            pixel_array=segment_map,
            segmentation_type=hd.seg.SegmentationTypeValues[seg_type.upper()],
            segment_descriptions=descriptions,
            series_instance_uid=hd.UID(),
            series_number=series_number,
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer="stuseg",
            manufacturer_model_name=algorithm,
            software_versions=__version__,
            # Type 1 in the Enhanced General Equipment module; stuseg, software, has no serial number.
            device_serial_number="1",
            content_label="STUSEG",
            content_description=f"{algorithm} segmentation by stuseg {__version__}",
            series_description=f"stuseg {algorithm}",
        )
    except (KeyError, ValueError) as exc:
        raise OutputError(f"highdicom cannot build a DICOM-SEG from {source.folder}: {exc}") from None
    if not all(names[v].isascii() for v in values):
        # The source's character set (often ISO_IR 100, Latin-1) may not hold every character of a
        # model's names; UTF-8 holds them all, and pydicom re-encodes the copied values with it.
        seg.SpecificCharacterSet = "ISO_IR 192"
    try:
        seg.save_as(Path(path))
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None
    return Path(path)
