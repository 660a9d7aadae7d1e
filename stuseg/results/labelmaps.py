"""Segmentations on disk: read them, write multilabel files that carry their names, export subsets.

A segmentation is either one multilabel NIfTI file (``predict --ml``) or a folder of
``<structure>.nii.gz`` 0/1 masks (``predict``). In memory it is always a uint8 label map
numbered by model index (see ``stuseg.structures.labels``) plus the NIfTI header whose geometry every
output copies verbatim.

A multilabel file written here names its values three ways, so no one has to guess the
numbering: a JSON NIfTI header extension, the same JSON as a sidecar file, and viewer label
files (an ITK-SNAP label description and a 3D Slicer color table).

This is the one module that reads and writes label maps, for every command: ``write_masks``
(one mask per structure, into a staged folder), ``write_multilabel`` (a multilabel file and its
sidecars, into staged files), ``load_segmentation`` (through ``stuseg.images.io.load_nifti``, the one
NIfTI reader). Writers write where they are told; ``stuseg.results.outputs`` makes the result appear
whole or not at all.
"""

from __future__ import annotations

import io
import json
import os
import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from stuseg.errors import InputError, LabelError, OutputError
from stuseg.images.geometry import same_grid
from stuseg.images.io import check_pixel_kind, label_image, label_values, load_nifti, spatial_shape
from stuseg.images.paths import NIFTI_SUFFIXES, nifti_stem
from stuseg.results import outputs
from stuseg.structures import labels as lbl
from stuseg.structures.colors import label_colors

__all__ = [
    "FORMAT",
    "ExportResult",
    "check_mask_folder_output",
    "check_multilabel_output",
    "companion_paths",
    "export_labels",
    "itksnap_text",
    "label_colors",
    "load_named_labels",
    "load_named_masks",
    "load_own_labels",
    "load_segmentation",
    "multilabel_paths",
    "names_json",
    "nifti_gz_bytes",
    "own_table",
    "read_names",
    "read_table_file",
    "save_masks",
    "save_multilabel",
    "segmentation_inputs",
    "slicer_ctbl",
    "value_counts",
    "write_masks",
    "write_multilabel",
    "write_nifti",
    "writer_threads",
]

FORMAT = "stuseg-labels/1"  # marks the JSON label table in header extensions and sidecars
DOCUMENT = FORMAT.split("/")[0]  # its kind, as outputs.check_output compares kinds
# NIfTI extension code 6 is "comment": free text that header dump tools show as is.
_COMMENT_CODE = 6
# Masks of one segmentation must lie on one grid; affines may differ by float round-off only.
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
# gzip level 1: label masks are mostly zeros, so higher levels gain little size for much time.
_GZIP_LEVEL = 1
# Mask writers run at most this many threads: each holds one full-volume mask while it encodes.
_MAX_WRITER_THREADS = 8


@dataclass
class ExportResult:
    """What ``export_labels`` did, for the CLI to render."""

    written: list[Path] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # requested, but no mask in the input folder
    empty: list[str] = field(default_factory=list)  # exported, but without a single voxel


# ---------------------------------------------------------------------------------------------
# Paths


def companion_paths(path: Path) -> dict[str, Path]:
    """The files written next to multilabel file ``path``: JSON sidecar and viewer label files."""
    path = Path(path)
    stem = nifti_stem(path)
    if stem is None:
        raise OutputError(f"'{path}' is not a NIfTI file name; end it in .nii.gz")
    return {
        "json": path.with_name(f"{stem}.json"),
        "itksnap": path.with_name(f"{stem}.itksnap.txt"),
        "slicer": path.with_name(f"{stem}.ctbl"),
    }


def value_counts(arr: np.ndarray, minlength: int = 0) -> np.ndarray:
    """Voxels per label value of a non-negative integer array, like ``np.bincount(arr.ravel())``.

    Counted in chunks: bincount casts its input to int64, 8x the memory of a uint8 volume.

    Args:
        arr: non-negative integers, any shape.
        minlength: the least length of the result.

    Returns:
        int64 counts, index = value.
    """
    flat = arr.reshape(-1, order="A")  # memory order: a view for C and Fortran arrays alike
    counts = np.zeros(max(minlength, int(flat.max()) + 1 if flat.size else 0), np.int64)
    step = 1 << 22  # 4 Mi voxels = 32 MiB of int64 per chunk
    for start in range(0, flat.size, step):
        part = np.bincount(flat[start : start + step], minlength=len(counts))
        counts[: len(part)] += part
    return counts


def write_nifti(img: nib.Nifti1Image, path: Path) -> None:
    """Write ``img`` to ``path`` as it is named: ``.nii.gz`` with ISA-L's gzip, else plain ``.nii``.

    ISA-L compresses mostly-zero masks about 10x faster than zlib at level 1, into smaller files
    that any gzip reader reads. The file is written in place: call this inside
    ``outputs.staged_folder`` or ``outputs.staged_files``.

    Args:
        img: the image.
        path: where to write it.

    Raises:
        OSError: the file cannot be written (disk full, permission).
    """
    path = Path(path)
    with open(path, "wb") as raw:
        if path.name.lower().endswith(".gz"):
            with _gzip_writer(raw) as fh:
                img.to_file_map(img.make_file_map({"image": fh}))
        else:
            img.to_file_map(img.make_file_map({"image": raw}))


def _gzip_writer(raw: Any) -> Any:
    """An ISA-L gzip stream into the open binary file ``raw`` whose header names no file and no
    time: the file is often written under a temporary (staging) name that ``gunzip -N`` would
    otherwise restore, and equal images give equal bytes whenever they are written."""
    from isal import igzip

    return igzip.IGzipFile(filename="", mode="wb", compresslevel=_GZIP_LEVEL, fileobj=raw, mtime=0)


def nifti_gz_bytes(img: nib.Nifti1Image) -> bytes:
    """The bytes of ``img`` as a ``.nii.gz`` file, made in memory (to write one encoding many times)."""
    buf = io.BytesIO()
    with _gzip_writer(buf) as fh:
        img.to_file_map(img.make_file_map({"image": fh}))
    return buf.getvalue()


def writer_threads() -> int:
    """Threads for writing masks: the CPUs this process may use (``threads.available_cpus``:
    affinity, cgroup quota, ``STUSEG_THREADS``), at most 8."""
    from stuseg.inference.threads import available_cpus

    return max(1, min(_MAX_WRITER_THREADS, available_cpus()))


def write_masks(
    folder: Path,
    labels: np.ndarray,
    like: nib.Nifti1Header,
    names: Mapping[int, str],
    *,
    threads: int | None = None,
) -> list[Path]:
    """One uint8 0/1 ``<name>.nii.gz`` per entry of ``names``, on the grid of ``like``, in parallel.

    The file names are ``stuseg.structures.labels.model_names(names)``: the names themselves for names that
    are safe and unique as file names (the published ones, and a Segmentation's), else their safe
    forms, so a name such as "kidney/left" never reaches outside ``folder``.

    Write into a staged folder (``outputs.staged_folder``): on a failure the files written so far
    are left for the staging to discard. Voxels are counted in chunks; the masks of structures
    absent from ``labels`` are all the same file, encoded once and its bytes written for each.

    Args:
        folder: an existing folder (normally the staged one).
        labels: the label map (any integer type; values as the keys of ``names``).
        like: the header whose geometry every mask copies.
        names: label value -> structure name, one mask each.
        threads: writer threads; default :func:`writer_threads`.

    Returns:
        The paths written, in the order of the sorted values.

    Raises:
        OSError: a file cannot be written (disk full, permission); writing stops at the first.
    """
    folder = Path(folder)
    present = value_counts(labels, 256) > 0
    empty = b""
    if not all(present[v] for v in names):
        empty = nifti_gz_bytes(label_image(np.zeros(labels.shape, np.uint8, order="F"), like))

    files = lbl.model_names(names)  # safe, unique file names; a Segmentation's names are already

    def write_one(value: int) -> Path:
        path = folder / f"{files[value]}.nii.gz"
        if present[value]:
            write_nifti(label_image((labels == value).view(np.uint8), like), path)
        else:
            path.write_bytes(empty)
        return path

    # ISA-L releases the GIL while it compresses, so threads encode masks in parallel.
    pool = ThreadPoolExecutor(threads or writer_threads())
    try:
        return list(pool.map(write_one, sorted(names)))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # after a failure, start no further mask


def save_masks(
    output: Path,
    labels: np.ndarray,
    like: nib.Nifti1Header,
    names: Mapping[int, str],
    *,
    threads: int | None = None,
) -> list[Path]:
    """:func:`write_masks` into folder ``output``, which appears complete or not at all.

    A previous ``output`` is replaced as a whole (see ``outputs.staged_folder``); check it first
    with :func:`check_mask_folder_output`, which refuses a folder of files stuseg did not write.

    Args:
        output: the folder to create or replace.
        labels, like, names, threads: as for :func:`write_masks`.

    Returns:
        The final paths of the masks.

    Raises:
        OutputError: the folder cannot be written; nothing was written then.
    """
    with outputs.staged_folder(output) as stage:
        written = write_masks(stage, labels, like, names, threads=threads)
    return [Path(output) / p.name for p in written]


# ---------------------------------------------------------------------------------------------
# Writing multilabel files with names


def names_json(names: Mapping[int, str], numbering: str | None = None) -> str:
    """The JSON label table stored in the header extension and the sidecar."""
    doc: dict[str, object] = {"format": FORMAT}
    if numbering is not None:
        doc["numbering"] = str(getattr(numbering, "value", numbering))
    doc["labels"] = {str(v): names[v] for v in sorted(names)}
    return json.dumps(doc, indent=1) + "\n"


def itksnap_text(names: Mapping[int, str]) -> str:
    """An ITK-SNAP label description file (Segmentation > Import Label Descriptions)."""
    colors = label_colors(names)
    lines = [
        "# ITK-SnAP Label Description File, written by stuseg",
        "# IDX   -R-  -G-  -B-  -A--  VIS MSH  LABEL",
        '    0     0    0    0     0  0  0    "Clear Label"',
    ]
    for v in sorted(names):
        r, g, b = colors[v]
        # A = opacity 0..1, VIS = visible in slices, MSH = visible in the 3D mesh
        lines.append(f'{v:5d} {r:5d} {g:4d} {b:4d}     1  1  1    "{names[v]}"')
    return "\n".join(lines) + "\n"


def slicer_ctbl(names: Mapping[int, str]) -> str:
    """A 3D Slicer color table (.ctbl): ``value name R G B A`` per line, A in 0..255."""
    colors = label_colors(names)
    lines = ["# Color table file written by stuseg", f"# {len(names) + 1} values", "0 background 0 0 0 0"]
    for v in sorted(names):
        r, g, b = colors[v]
        name = re.sub(r"\s+", "_", names[v])  # the format splits on whitespace
        lines.append(f"{v} {name} {r} {g} {b} 255")
    return "\n".join(lines) + "\n"


def multilabel_paths(path: Path) -> list[Path]:
    """The four files of multilabel file ``path``: itself, its JSON sidecar and viewer label files.

    Args:
        path: the ``.nii.gz`` (or ``.nii``) file.

    Returns:
        ``[path, seg.json, seg.itksnap.txt, seg.ctbl]`` for ``seg.nii.gz``.

    Raises:
        OutputError: ``path`` is not named as a NIfTI file.
    """
    return [Path(path), *companion_paths(path).values()]


def write_multilabel(
    targets: Sequence[Path],
    data: np.ndarray,
    like: nib.Nifti1Header,
    names: Mapping[int, str],
    *,
    numbering: str | None = None,
) -> None:
    """Write a uint8 multilabel NIfTI on the grid of ``like`` that carries ``names`` (value -> name).

    The names go into a JSON header extension, a JSON sidecar, an ITK-SNAP label description and
    a 3D Slicer color table. Write into staged files (``outputs.staged_files`` of
    :func:`multilabel_paths`), or use :func:`save_multilabel`, which does that.

    Args:
        targets: where to write the NIfTI, the JSON, the ITK-SNAP and the Slicer file.
        data: integer label values in 0..255.
        like: the header whose geometry the file copies.
        names: label value -> name for every non-zero value in ``data`` (more are allowed).
        numbering: recorded in the JSON for readers (e.g. ``model``, ``compact``).

    Raises:
        ValueError: a value without a name, a value outside 1..255 or an unusable name.
        OSError: a file cannot be written.
    """
    # uint8 holds 0..255: enough for 104 structures in any numbering, and what viewers expect.
    data = label_values(np.asarray(data), np.uint8, ValueError, " to be written as uint8")
    names = {int(v): str(n) for v, n in names.items()}
    for v, n in names.items():
        if not 1 <= v <= 255 or not n.strip() or any(c in n for c in '"\n\r'):
            raise ValueError(f"invalid label entry {v}: {n!r}")
    present = np.flatnonzero(value_counts(data, 256))
    unnamed = [int(v) for v in present if v and v not in names]
    if unnamed:
        raise ValueError(f"label values {unnamed} in the data have no name")
    table = names_json(names, numbering)
    img = label_image(data, like)
    img.header.extensions.append(nib.nifti1.Nifti1Extension(_COMMENT_CODE, table.encode("utf-8")))
    nifti, sidecar, itksnap, slicer = (Path(t) for t in targets)
    write_nifti(img, nifti)
    sidecar.write_text(table, encoding="utf-8")
    itksnap.write_text(itksnap_text(names), encoding="utf-8")
    slicer.write_text(slicer_ctbl(names), encoding="utf-8")


def save_multilabel(
    data: np.ndarray,
    like: nib.Nifti1Header,
    path: Path,
    names: Mapping[int, str],
    *,
    numbering: str | None = None,
) -> list[Path]:
    """:func:`write_multilabel` to ``path`` and its companions, which appear together or not at all.

    Next to ``path`` (``seg.nii.gz``) come ``seg.json``, ``seg.itksnap.txt`` and ``seg.ctbl``.
    Existing files are replaced: check them first with :func:`check_multilabel_output`.

    Args:
        data, like, names, numbering: as for :func:`write_multilabel`.
        path: the multilabel file.

    Returns:
        The four paths written.

    Raises:
        OutputError: ``path`` is not named as NIfTI, or a file cannot be written.
        ValueError: as for :func:`write_multilabel`.
    """
    paths = multilabel_paths(path)
    with outputs.staged_files(paths) as temps:
        write_multilabel(temps, data, like, names, numbering=numbering)
    return paths


# ---------------------------------------------------------------------------------------------
# Reading


def _load_label_nifti(path: Path) -> tuple[nib.Nifti1Image, np.ndarray, nib.Nifti1Header]:
    """A label map or mask file: the image, its voxels as a 3D array, and its (3D) header."""
    img = load_nifti(path)
    check_pixel_kind(path, img.header.get_data_dtype(), what="label map")
    shape3 = spatial_shape(path, img.shape, what="label map")
    arr = np.asanyarray(img.dataobj)
    header = img.header
    if arr.ndim > 3:  # (x, y, z, 1[, 1])
        arr = arr.reshape(shape3, order="A")
        header = header.copy()
        header.set_data_shape(shape3)
    return img, arr, header


def _integer_data(arr: np.ndarray, path: Path) -> np.ndarray:
    """The voxel values as a non-negative integer array; LabelError if they are not."""
    if arr.dtype == np.bool_:
        return arr.view(np.uint8)
    if not np.issubdtype(arr.dtype, np.integer):
        finite = np.isfinite(arr)
        whole = finite & (arr == np.rint(arr))
        if not whole.all():
            bad = arr[~whole].flat[0]
            raise LabelError(
                f"{path} holds the non-integer value {bad}; give a label map of whole numbers "
                "such as 'stuseg predict --ml' writes"
            )
        arr = arr.astype(np.int64)
    if arr.size and arr.min() < 0:
        raise LabelError(f"{path} holds the negative label value {arr.min()}; label values start at 0")
    return arr


def _parse_table(text: str | bytes) -> dict[int, str] | None:
    """The value -> name table of a stuseg JSON document; None if the text is not one."""
    try:
        doc = json.loads(text)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("labels"), dict):
        return None
    try:
        return {int(v): str(n) for v, n in doc["labels"].items()}
    except ValueError:
        return None


def read_names(img: nib.Nifti1Image, path: Path) -> dict[int, str] | None:
    """The label table a multilabel file carries: header extension first, else its JSON sidecar."""
    for ext in img.header.extensions:
        if ext.get_code() == _COMMENT_CODE:
            table = _parse_table(ext.get_content())
            if table is not None:
                return table
    stem = nifti_stem(Path(path))
    sidecar = Path(path).with_name(f"{stem}.json") if stem else None
    if sidecar is not None and sidecar.is_file():
        return _parse_table(sidecar.read_bytes())
    return None


def _load_multilabel(path: Path) -> tuple[np.ndarray, nib.Nifti1Header, dict[int, str]]:
    img, arr, header = _load_label_nifti(path)
    arr = _integer_data(arr, path)
    top = int(arr.max()) if arr.size else 0
    table = read_names(img, path)
    if table is None:
        # No names carried: the values are model indices, as STU-Net writes them.
        if top > len(lbl.STRUCTURES):
            raise LabelError(
                f"{path} holds label value {top} but the model has only {len(lbl.STRUCTURES)} "
                "structures; name its values with --names FILE.json (another tool's label table)"
            )
        names = dict(enumerate(lbl.STRUCTURES, start=1))
        return arr.astype(np.uint8, copy=False), header, names

    # Names carried: translate each value to its structure's model index, whatever the numbering.
    if any(not 1 <= v <= 255 for v in table):
        raise LabelError(f"{path} carries a label table with values outside 1..255; repair or drop it")
    lut = np.zeros(max(top, *table, 0) + 1, np.uint8)
    names = {}
    for value, name in table.items():
        try:
            index = lbl.index_of(name)
        except LabelError:
            raise LabelError(
                f"{path} names label {value} '{name}', which is not one of the "
                f"{len(lbl.STRUCTURES)} structures; export it with the tool that made it"
            ) from None
        lut[value] = index
        names[index] = lbl.STRUCTURES[index - 1]
    present = np.flatnonzero(value_counts(arr, len(lut)))
    unnamed = [int(v) for v in present if v and v not in table]
    if unnamed:
        raise LabelError(
            f"{path} holds label value {unnamed[0]}, which its label table does not name; "
            "give a segmentation written by 'stuseg predict --ml'"
        )
    return lut[arr], header, names


def _mask_files(folder: Path) -> dict[int, Path]:
    """Model index -> mask file for every ``<structure>.nii.gz`` (or ``.nii``) in ``folder``."""
    found = {}
    for index, name in enumerate(lbl.STRUCTURES, start=1):
        for suffix in NIFTI_SUFFIXES:
            candidate = folder / f"{name}{suffix}"
            if candidate.is_file():
                found[index] = candidate
                break
    return found


def _load_folder(
    folder: Path, only: Sequence[int] | None
) -> tuple[np.ndarray, nib.Nifti1Header, dict[int, str]]:
    files = _mask_files(folder)
    if not files:
        raise InputError(
            f"folder {folder} holds no <structure>.nii.gz masks; give a folder written by 'stuseg predict'"
        )
    if only is not None:
        files = {i: p for i, p in files.items() if i in set(only)}
        if not files:
            raise InputError(
                f"folder {folder} holds no mask of the requested structures; "
                "run 'ls' on it to see which structures it has"
            )
    first = next(iter(files.values()))
    ref, _, ref_header = _load_label_nifti(first)
    shape = tuple(int(n) for n in ref_header.get_data_shape())
    # Fortran order, like the arrays nibabel reads from NIfTI.
    labels = np.zeros(shape, np.uint8, order="F")
    flat = labels.ravel(order="F")  # a view: boolean indexing walks C order, slow on F arrays
    for index, path in files.items():
        img, arr, _ = _load_label_nifti(path)
        if not same_grid(arr.shape, img.affine, shape, ref.affine):
            what = "shape" if arr.shape != shape else "affine"
            raise InputError(
                f"masks {first.name} and {path.name} in {folder} differ in {what}; "
                "give a folder whose masks come from one segmentation"
            )
        mask = np.asfortranarray(_integer_data(arr, path) != 0)  # any non-zero value marks it
        where = np.flatnonzero(mask.ravel(order="F"))  # views, both in memory order
        clash = flat[where]
        if clash.any():
            other = lbl.STRUCTURES[int(clash[clash != 0][0]) - 1]
            raise LabelError(
                f"masks {other} and {lbl.STRUCTURES[index - 1]} in {folder} overlap; "
                "one label map cannot hold both, so export them from separate folders"
            )
        flat[where] = index
    return labels, ref_header, {i: lbl.STRUCTURES[i - 1] for i in files}


def load_segmentation(
    path: Path, only: Iterable[int] | None = None
) -> tuple[np.ndarray, nib.Nifti1Header, dict[int, str]]:
    """Read a multilabel file or a folder of masks as a uint8 label map numbered by model index.

    Args:
        path: a multilabel ``.nii.gz`` (values named by its label table, else model indices) or a
            folder of ``<structure>.nii.gz`` masks.
        only: for a folder, read only the masks of these model indices.

    Returns:
        ``(labels, header, names)``: the label map, the header whose geometry outputs copy, and
        model index -> structure name for every structure the segmentation knows about.

    Raises:
        InputError: missing, unreadable, empty or inconsistent input.
        LabelError: values that are not whole, negative, unnamed or unknown; overlapping masks.
    """
    path = Path(path)
    if path.is_dir():
        return _load_folder(path, None if only is None else sorted(set(only)))
    if not path.exists():
        raise InputError(
            f"{path} does not exist; give a multilabel .nii.gz or a folder of masks from 'stuseg predict'"
        )
    return _load_multilabel(path)


# ---------------------------------------------------------------------------------------------
# Export


def segmentation_inputs(path: Path) -> list[Path]:
    """What reading segmentation ``path`` reads: the file and its JSON sidecar, or the folder."""
    path = Path(path)
    stem = nifti_stem(path)
    sidecar = path.with_name(f"{stem}.json") if stem and not path.is_dir() else None
    return [path, sidecar] if sidecar is not None and sidecar.exists() else [path]


def check_multilabel_output(
    output: Path, *, inputs: Sequence[Path], overwrite: bool = False, extra: Sequence[Path] = ()
) -> None:
    """Refuse, before any work, a multilabel OUTPUT that is badly named or unsafe to write.

    The file and its three companions are each checked with ``outputs.check_output``, and so are
    ``extra`` files written beside it (statistics, preview, DICOM-SEG). Those formats carry no
    stuseg signature of their own: they count as stuseg's when the multilabel file they belong to
    is stuseg's (its label table says so), since a run writes them together.

    Args:
        output: the ``.nii.gz`` file to write.
        inputs: everything the command reads.
        overwrite: allow replacing files stuseg did not write.
        extra: further files of the same result, beside ``output``.

    Raises:
        OutputError: the one-line reason.
    """
    hint = " such as seg.nii.gz, or leave out --ml for a folder of masks"
    outputs.check_output(output, inputs=inputs, kind="file", overwrite=overwrite, hint=hint)
    if nifti_stem(Path(output)) is None:
        raise OutputError(f"{output} is not a NIfTI file name; end it in .nii.gz")
    outputs.check_output(output, inputs=inputs, kind="file", overwrite=overwrite, document=DOCUMENT)
    for key, companion in companion_paths(Path(output)).items():
        document = DOCUMENT if key == "json" else None
        outputs.check_output(companion, inputs=inputs, kind="file", overwrite=overwrite, document=document)
    ours = Path(output).is_file() and outputs.written_by_stuseg(Path(output))
    for path in extra:
        outputs.check_output(path, inputs=inputs, kind="file", overwrite=overwrite or ours)


def check_mask_folder_output(output: Path, *, inputs: Sequence[Path], overwrite: bool = False) -> None:
    """Refuse, before any work, a mask-folder OUTPUT that is badly named or unsafe to write.

    Args:
        output: the folder to write.
        inputs: everything the command reads.
        overwrite: allow replacing a folder of files stuseg did not write.

    Raises:
        OutputError: the one-line reason.
    """
    hint = ", or add --ml for one multilabel file"
    outputs.check_output(output, inputs=inputs, kind="folder", overwrite=overwrite, hint=hint)
    if not os.path.lexists(output) and nifti_stem(Path(output)) is not None:
        raise OutputError(
            f"{output} looks like a file name but masks are written into a folder; "
            "give a folder name, or add --ml for one multilabel file"
        )


def export_labels(
    segmentation: Path,
    output: Path,
    indices: Sequence[int],
    *,
    ml: bool = False,
    numbering: str | None = None,
    combine: str | None = None,
    overwrite: bool = False,
    table: Mapping[int, str] | None = None,
    names_file: Path | None = None,
) -> ExportResult:
    """Export the structures ``indices`` (model indices) of a segmentation.

    A multilabel file of a model with its own label table (see :func:`own_table`) is exported with
    that ``table``: ``indices`` are then its own label values, ``model`` numbering keeps them and
    ``compact`` renumbers 1..k; ``totalsegmentator-v1`` does not apply.

    Default: one ``<name>.nii.gz`` 0/1 mask per structure in folder ``output``. ``ml``: one
    multilabel file ``output`` numbered by ``numbering`` (default model). ``combine``: their
    union as one mask ``<combine>.nii.gz`` in folder ``output``. Output geometry is the input's.
    Everything is checked before the first file is written; outputs appear all together, and a
    folder ``output`` holds exactly this export (a previous stuseg folder there is replaced).

    Args:
        segmentation: a multilabel file or a folder of masks (see :func:`load_segmentation`).
        output: the folder (masks, ``combine``) or file (``ml``) to write.
        indices: model indices of the structures to export.
        ml: write one multilabel file.
        numbering: label values in the ``ml`` file (``model``, ``compact``, ``totalsegmentator-v1``).
        combine: write the union of the structures as this one mask.
        overwrite: allow replacing files or a folder that stuseg did not write.
        table: the file's own label table (value -> name), for a model's own structures.
        names_file: a JSON label table (see :func:`read_table_file`) that names the values of
            multilabel file ``segmentation``, e.g. another tool's (TotalSegmentator's 117 classes);
            exported as with ``table``.

    Returns:
        What was written, which structures the input lacks, and which exported ones are empty.

    Raises:
        OutputError: conflicting options, or an output that is unsafe or cannot be written.
        InputError, LabelError: as for :func:`load_segmentation`.
    """
    segmentation, output = Path(segmentation), Path(output)
    if ml and combine is not None:
        raise OutputError("--ml and --combine exclude each other; choose one")
    if numbering is not None and not ml:
        raise OutputError("--numbering applies to --ml output only; add --ml or drop --numbering")
    if combine is not None:
        if not _SAFE_NAME.fullmatch(combine) or nifti_stem(Path(combine)) is not None:
            raise OutputError(f"'{combine}' is not a plain name for --combine; use letters, digits and _")
        if combine.lower() in (s.lower() for s in (*lbl.STRUCTURES, *(table or {}).values())):
            raise OutputError(
                f"--combine name '{combine}' is a structure's name; choose another so the union "
                "cannot be mistaken for that structure"
            )
    if names_file is not None:
        if table is not None:
            raise OutputError("give the label table either as a table or as a file, not both")
        if segmentation.is_dir():
            raise InputError(f"--names applies to a multilabel file; {segmentation} is a folder of masks")
        table = read_table_file(names_file)
    if table is not None:
        options = (ml, numbering, combine, overwrite)
        return _export_own(segmentation, output, indices, table, *options, names_file=names_file)
    wanted = sorted(lbl.renumbering(indices))  # validates the indices
    if not wanted:
        raise LabelError("no structures selected; name them with --labels or --group")
    lbl.renumbering(wanted, numbering or lbl.Numbering.MODEL)  # an unknown numbering fails here
    inputs = segmentation_inputs(segmentation)
    if ml:
        check_multilabel_output(output, inputs=inputs, overwrite=overwrite)
    else:
        check_mask_folder_output(output, inputs=inputs, overwrite=overwrite)

    labels, header, known = load_segmentation(segmentation, only=wanted)
    chosen = [i for i in wanted if i in known]
    missing = [lbl.STRUCTURES[i - 1] for i in wanted if i not in known]
    if not chosen:
        raise InputError(f"{segmentation} holds none of the requested structures; choose others")
    # Compact numbering counts only the structures actually exported.
    values = lbl.renumbering(chosen, numbering or lbl.Numbering.MODEL)
    counts = value_counts(labels, len(lbl.LABELS))
    result = ExportResult(missing=missing, empty=[lbl.STRUCTURES[i - 1] for i in chosen if counts[i] == 0])

    if ml:
        lut = np.zeros(256, np.uint8)
        for i in chosen:
            lut[i] = values[i]
        names = {values[i]: lbl.STRUCTURES[i - 1] for i in chosen}
        numbering = numbering or lbl.Numbering.MODEL
        result.written = save_multilabel(lut[labels], header, output, names, numbering=numbering)
        return result
    with outputs.staged_folder(output) as stage:
        if combine is not None:
            union = np.isin(labels, chosen).view(np.uint8)
            written = write_masks(stage, union, header, {1: combine})
        else:
            written = write_masks(stage, labels, header, {i: lbl.STRUCTURES[i - 1] for i in chosen})
    result.written = [output / p.name for p in written]
    return result


def own_table(path: Path) -> dict[int, str] | None:
    """The label table of a segmentation of a model with its own structures (a fine-tuned one),
    or of another tool's folder of masks.

    Args:
        path: a segmentation (a multilabel file or a folder of masks).

    Returns:
        Label value -> name when a name is not one of the published structures: a multilabel
        file's as it carries it (header extension or JSON sidecar); a folder's masks numbered
        1, 2, ... in file-name order (a folder carries no label values). None for a file without
        a table, or a file or folder of published names only (which :func:`load_segmentation`
        reads).

    Raises:
        InputError: the file cannot be read.
    """
    path = Path(path)
    if path.is_dir():
        names = list(_named_mask_files(path))
        if not names or {n.lower() for n in names} <= {n.lower() for n in lbl.STRUCTURES}:
            return None
        return dict(enumerate(names, start=1))
    if not path.is_file():
        return None
    table = read_names(load_nifti(path), path)
    if table is None or {n.lower() for n in table.values()} <= {n.lower() for n in lbl.STRUCTURES}:
        return None
    return table


def _export_own(
    segmentation: Path,
    output: Path,
    values: Sequence[int],
    table: Mapping[int, str],
    ml: bool,
    numbering: str | None,
    combine: str | None,
    overwrite: bool,
    *,
    names_file: Path | None = None,
) -> ExportResult:
    """``export_labels`` of a multilabel file named by its own ``table`` (or by ``names_file``'s),
    or of a folder of masks named by their files (``own_table``); options checked there."""
    folder = Path(segmentation).is_dir()
    source = str(names_file) if names_file is not None else "its masks" if folder else "its label table"
    table = {int(v): str(n) for v, n in table.items()}
    wanted = sorted(set(values))
    if not wanted:
        raise LabelError("no structures selected; name them with --labels")
    unknown = [v for v in wanted if v not in table]
    if unknown:
        raise LabelError(f"label value {unknown[0]} is not in {source}")
    # A folder's masks carry no label values: its --ml file numbers the selection 1..k.
    chosen = numbering or (lbl.Numbering.COMPACT if folder else lbl.Numbering.MODEL)
    scheme = str(getattr(chosen, "value", chosen))
    if folder and scheme != lbl.Numbering.COMPACT.value:
        raise LabelError(
            f"{segmentation} is a folder of masks, which carries no label values; its --ml file "
            "numbers the structures 1..k in name order (--numbering compact)"
        )
    if scheme not in (lbl.Numbering.MODEL.value, lbl.Numbering.COMPACT.value):
        raise LabelError(
            f"--numbering {scheme} applies to the published structures only; {segmentation} is "
            f"named by {source}, so choose model or compact"
        )
    inputs = [*segmentation_inputs(segmentation), *([names_file] if names_file is not None else [])]
    if ml:
        check_multilabel_output(output, inputs=inputs, overwrite=overwrite)
    else:
        check_mask_folder_output(output, inputs=inputs, overwrite=overwrite)
    if folder:
        labels, header = _folder_label_map(Path(segmentation), table, wanted)
    else:
        _, raw, header = _load_label_nifti(segmentation)
        labels = _integer_data(raw, segmentation)
    counts = value_counts(labels, 256)
    unnamed = [int(v) for v in np.flatnonzero(counts) if v and v not in table]
    if len(counts) > 256 or unnamed:
        value = unnamed[0] if unnamed else len(counts) - 1
        raise LabelError(f"{segmentation} holds label value {value}, which {source} does not name")
    labels = labels.astype(np.uint8, copy=False)
    result = ExportResult(empty=[table[v] for v in wanted if counts[v] == 0])
    if ml:
        new = (
            {v: v for v in wanted}
            if scheme == lbl.Numbering.MODEL.value
            else {v: k for k, v in enumerate(wanted, start=1)}
        )
        lut = np.zeros(256, np.uint8)
        lut[wanted] = [new[v] for v in wanted]
        names = {new[v]: table[v] for v in wanted}
        result.written = save_multilabel(lut[labels], header, output, names, numbering=scheme)
        return result
    with outputs.staged_folder(output) as stage:
        if combine is not None:
            written = write_masks(stage, np.isin(labels, wanted).view(np.uint8), header, {1: combine})
        else:
            written = write_masks(stage, labels, header, {v: table[v] for v in wanted})
    result.written = [Path(output) / p.name for p in written]
    return result


def _folder_label_map(
    folder: Path, table: Mapping[int, str], wanted: Sequence[int]
) -> tuple[np.ndarray, nib.Nifti1Header]:
    """The masks ``wanted`` of a folder named by its files, as one uint8 label map numbered by
    ``table`` (``own_table``'s numbering); the other masks are not read.

    Raises:
        InputError: the folder changed since ``table`` was read, or its masks differ in grid.
        LabelError: two of the wanted masks overlap (one label map cannot hold both).
    """
    layers, header, names = load_named_masks(folder, only={table[v] for v in wanted})
    if names != {v: table[v] for v in wanted}:
        raise InputError(f"the masks in {folder} changed while it was read; run the command again")
    if len(table) > 255:
        raise LabelError(f"{folder} holds {len(table)} masks; export at most 255 structures at once")
    labels = np.zeros(layers[0].shape, np.uint8, order="F")
    flat = labels.reshape(-1, order="F")
    keep = np.zeros(len(table) + 1, bool)
    keep[list(wanted)] = True
    for layer in layers:
        values = layer.reshape(-1, order="F")
        where = np.flatnonzero(keep[values])
        clash = flat[where]
        if clash.any():
            first = int(clash[clash != 0][0])
            other = int(values[where][clash != 0][0])
            raise LabelError(
                f"masks {table[first]} and {table[other]} in {folder} overlap; one label map cannot "
                "hold both, so export them one at a time"
            )
        flat[where] = values[where]
    return labels, header


# ---------------------------------------------------------------------------------------------
# Segmentations named by another tool (e.g. TotalSegmentator's 117 "total" classes): the names
# come from the mask file names or from a label table, not from stuseg's 104 structures.


def _named_mask_files(folder: Path) -> dict[str, Path]:
    """Structure name -> file for every visible ``<name>.nii.gz`` / ``<name>.nii`` in ``folder``."""
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        stem = nifti_stem(path)
        if stem is None or path.name.startswith(".") or not path.is_file():
            continue
        if stem in found:
            raise InputError(f"{folder} holds both {found[stem].name} and {path.name}; keep one of them")
        found[stem] = path
    return found


def load_named_masks(
    folder: Path, only: Collection[str] | None = None
) -> tuple[list[np.ndarray], nib.Nifti1Header, dict[int, str]]:
    """Read a folder of 0/1 masks named ``<structure>.nii.gz``, whatever the structure names.

    Each mask gets a label value (1, 2, ... in file name order). Masks may overlap (tools that
    write one mask per class can produce that): the result is a list of label maps ("layers"),
    each mask in the first layer where it overlaps no other, so every voxel of every mask is
    kept; without overlaps there is exactly one layer.

    Args:
        folder: the folder; every visible ``*.nii.gz`` / ``*.nii`` in it is read as a mask.
        only: read only the masks of these names (the others are not opened); values stay
            those of the whole folder's file name order.

    Returns:
        ``(layers, header, names)``: uint8 (uint16 beyond 255 masks) label maps in Fortran
        order, the first mask's NIfTI header, and label value -> name (the file name stem) of
        the masks read.

    Raises:
        InputError: no masks, a file that cannot be read, or masks on different grids.
        LabelError: a file that is not a mask (more than one non-zero value, or non-integers).
    """
    folder = Path(folder)
    files = _named_mask_files(folder)
    if not files:
        raise InputError(f"folder {folder} holds no <structure>.nii.gz masks; give a folder of masks")
    dtype = np.uint8 if len(files) <= 255 else np.uint16
    layers: list[np.ndarray] = []
    names: dict[int, str] = {}
    ref: nib.Nifti1Image | None = None
    ref_header: nib.Nifti1Header | None = None
    first = ""
    for value, (name, path) in enumerate(files.items(), start=1):
        if only is not None and name not in only:
            continue
        img, raw, header = _load_label_nifti(path)  # one reader for every NIfTI stuseg reads
        if ref is None:
            ref, ref_header, first = img, header, path.name
        elif not same_grid(raw.shape, img.affine, ref_header.get_data_shape()[:3], ref.affine):
            what = "shape" if raw.shape != ref_header.get_data_shape()[:3] else "affine"
            raise InputError(
                f"masks {first} and {path.name} in {folder} differ in {what}; "
                "give a folder whose masks come from one segmentation"
            )
        arr = np.asfortranarray(_integer_data(raw, path))  # nibabel's order already: no copy
        flat_arr = arr.reshape(-1, order="F")
        where = np.flatnonzero(flat_arr)
        if where.size:
            inside = flat_arr[where]
            if inside.min() != inside.max():
                raise LabelError(
                    f"{path} holds several non-zero values ({inside.min()}..{inside.max()}), so it is a "
                    "label map, not a mask; give it as a multilabel file with its names instead"
                )
        for layer in layers:
            flat = layer.reshape(-1, order="F")
            if not flat[where].any():
                break
        else:
            layer = np.zeros(raw.shape, dtype, order="F")
            layers.append(layer)
            flat = layer.reshape(-1, order="F")
        flat[where] = value
        names[value] = name
    if ref_header is None:  # ``only`` named none of the folder's masks
        raise InputError(f"folder {folder} holds no mask named {', '.join(sorted(only or ()))}")
    if not layers:  # every mask empty
        layers.append(np.zeros(ref_header.get_data_shape()[:3], dtype, order="F"))
    return layers, ref_header, names


def _plain_table(text: str | bytes) -> dict[int, str] | None:
    """A label table: stuseg's document, or a plain JSON object ``{"1": "spleen", ...}``."""
    table = _parse_table(text)
    if table is not None:
        return table
    try:
        doc = json.loads(text)
        if isinstance(doc, dict) and doc and all(isinstance(n, str) for n in doc.values()):
            return {int(v): n for v, n in doc.items()}
    except (ValueError, UnicodeDecodeError):
        pass
    return None


def load_named_labels(path: Path, names_file: Path) -> tuple[np.ndarray, nib.Nifti1Header, dict[int, str]]:
    """Read a multilabel file whose values are named by a JSON label table of any naming.

    Args:
        path: the multilabel NIfTI file.
        names_file: JSON, either stuseg's label table (the sidecar of ``predict --ml``) or a plain
            object ``{"1": "spleen", "2": "kidney_right", ...}`` (value -> name).

    Returns:
        ``(labels, header, names)``: the label values as stored (uint8, or uint16 above 255).

    Raises:
        InputError: a file cannot be read.
        LabelError: the table is not a label table, or a value in the data has no name.
    """
    path, names_file = Path(path), Path(names_file)
    if not path.is_file():
        raise InputError(f"{path} does not exist; give a multilabel .nii.gz file")
    return _labels_named_by(path, read_table_file(names_file), str(names_file))


def read_table_file(names_file: Path) -> dict[int, str]:
    """The label table (value -> name) in JSON file ``names_file``: stuseg's label table (the
    sidecar of ``predict --ml``) or a plain object ``{"1": "spleen", ...}``.

    Raises:
        InputError: the file cannot be read.
        LabelError: it is not a label table.
    """
    names_file = Path(names_file)
    try:
        table = _plain_table(names_file.read_bytes())
    except OSError as exc:
        raise InputError(f"cannot read {names_file}: {exc.strerror or exc}") from None
    if table is None:
        raise LabelError(f'{names_file} is not a label table; give JSON such as {{"1": "spleen", ...}}')
    return table


def _labels_named_by(
    path: Path, table: Mapping[int, str], source: str
) -> tuple[np.ndarray, nib.Nifti1Header, dict[int, str]]:
    """The label map ``path`` with its values as stored, named by ``table`` (from ``source``)."""
    _, raw, header = _load_label_nifti(path)
    arr = _integer_data(raw, path)
    top = int(arr.max()) if arr.size else 0
    present = np.flatnonzero(value_counts(arr, top + 1))
    unnamed = [int(v) for v in present if v and v not in table]
    if unnamed:
        raise LabelError(f"{path} holds label value {unnamed[0]}, which {source} does not name")
    dtype = np.uint8 if top <= 255 else np.uint16
    return np.asfortranarray(arr, dtype=dtype), header, {v: table[v] for v in sorted(table) if v > 0}


def load_own_labels(path: Path) -> tuple[np.ndarray, nib.Nifti1Header, dict[int, str]] | None:
    """A multilabel file of a model's own structures (see :func:`own_table`), values as stored.

    Returns:
        ``(labels, header, names)`` as :func:`load_named_labels` gives them, or None when ``path``
        is not such a file (a folder, no carried table, published names).

    Raises:
        InputError: the file cannot be read.
        LabelError: a value in the data that its table does not name.
    """
    table = own_table(path)
    if table is None:
        return None
    return _labels_named_by(Path(path), table, "its label table")
