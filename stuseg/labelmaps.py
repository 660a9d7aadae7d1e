"""Segmentations on disk: read them, write multilabel files that carry their names, export subsets.

A segmentation is either one multilabel NIfTI file (``predict --ml``) or a folder of
``<structure>.nii.gz`` 0/1 masks (``predict``). In memory it is always a uint8 label map
numbered by model index (see ``stuseg.labels``) plus the NIfTI header whose geometry every
output copies verbatim.

A multilabel file written here names its values three ways, so no one has to guess the
numbering: a JSON NIfTI header extension, the same JSON as a sidecar file, and viewer label
files (an ITK-SNAP label description and a 3D Slicer color table).
"""

from __future__ import annotations

import colorsys
import contextlib
import json
import re
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from stuseg import labels as lbl
from stuseg.errors import InputError, LabelError, OutputError
from stuseg.io import atomic_path, label_image

FORMAT = "stuseg-labels/1"  # marks the JSON label table in header extensions and sidecars
# NIfTI extension code 6 is "comment": free text that header dump tools show as is.
_COMMENT_CODE = 6
# Masks of one segmentation must lie on one grid; affines may differ by float round-off only.
_AFFINE_ATOL_MM = 1e-4
_NIFTI_SUFFIXES = (".nii.gz", ".nii")
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


@dataclass
class ExportResult:
    """What ``export_labels`` did, for the CLI to render."""

    written: list[Path] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # requested, but no mask in the input folder
    empty: list[str] = field(default_factory=list)  # exported, but without a single voxel


# ---------------------------------------------------------------------------------------------
# Paths


def _nifti_stem(path: Path) -> str | None:
    """``seg`` for ``seg.nii.gz`` or ``seg.nii``; None if ``path`` is not named as NIfTI."""
    for suffix in _NIFTI_SUFFIXES:
        if path.name.lower().endswith(suffix) and len(path.name) > len(suffix):
            return path.name[: -len(suffix)]
    return None


def companion_paths(path: Path) -> dict[str, Path]:
    """The files written next to multilabel file ``path``: JSON sidecar and viewer label files."""
    path = Path(path)
    stem = _nifti_stem(path)
    if stem is None:
        raise OutputError(f"'{path}' is not a NIfTI file name; end it in .nii.gz")
    return {
        "json": path.with_name(f"{stem}.json"),
        "itksnap": path.with_name(f"{stem}.itksnap.txt"),
        "slicer": path.with_name(f"{stem}.ctbl"),
    }


def _write_all(jobs: Iterable[tuple[Path, Callable[[Path], None]]]) -> list[Path]:
    """Run each ``write(tmp)`` into a temporary sibling; rename them all only if every one succeeds.

    ``jobs`` may be a generator, so only one output is in memory at a time.
    """
    written: list[Path] = []
    current: Path | None = None
    try:
        with contextlib.ExitStack() as stack:
            for path, write in jobs:
                current = path
                write(stack.enter_context(atomic_path(path)))
                written.append(path)
    except OSError as exc:
        raise OutputError(f"cannot write {current}: {exc.strerror or exc}") from None
    return written


def value_counts(arr: np.ndarray, minlength: int = 0) -> np.ndarray:
    """Voxels per label value of a non-negative integer array, like ``np.bincount(arr.ravel())``.

    Counted in chunks: bincount casts its input to int64, 8x the memory of a uint8 volume.
    """
    flat = arr.reshape(-1)
    counts = np.zeros(max(minlength, int(flat.max()) + 1 if flat.size else 0), np.int64)
    step = 1 << 22  # 4 Mi voxels = 32 MiB of int64 per chunk
    for start in range(0, flat.size, step):
        part = np.bincount(flat[start : start + step], minlength=len(counts))
        counts[: len(part)] += part
    return counts


def _nifti_writer(img: nib.Nifti1Image) -> Callable[[Path], None]:
    return lambda tmp: nib.save(img, tmp)


def _text_writer(text: str) -> Callable[[Path], None]:
    return lambda tmp: tmp.write_text(text, encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# Writing multilabel files with names


def label_colors(names: Mapping[int, str]) -> dict[int, tuple[int, int, int]]:
    """A distinct, stable RGB colour per label value.

    The hue steps by the golden ratio (0.618...), which keeps neighbours far apart on the colour
    wheel. A structure is keyed by its model index, so it keeps its colour in every numbering.
    """
    known = {n.lower(): i for i, n in enumerate(lbl.LABELS)}
    colors = {}
    for value, name in names.items():
        key = known.get(name.lower(), value)
        hue = (key * 0.618033988749895) % 1.0
        value_ = 0.95 if key % 2 else 0.75  # alternate brightness too: 104 hues alone are close
        r, g, b = colorsys.hsv_to_rgb(hue, 0.7, value_)
        colors[value] = (round(r * 255), round(g * 255), round(b * 255))
    return colors


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


def _as_uint8_labels(data: np.ndarray) -> np.ndarray:
    if data.dtype == np.uint8:
        return data
    if not np.issubdtype(data.dtype, np.integer):
        raise ValueError(f"label maps must hold integers, not {data.dtype}")
    # uint8 holds 0..255: enough for 104 structures in any numbering, and what viewers expect.
    if data.size and (data.min() < 0 or data.max() > 255):
        raise ValueError("label values must lie in 0..255 to be written as uint8")
    return data.astype(np.uint8)


def save_multilabel(
    data: np.ndarray,
    like: nib.Nifti1Header,
    path: Path,
    names: Mapping[int, str],
    *,
    numbering: str | None = None,
) -> None:
    """Write a uint8 multilabel NIfTI on the grid of ``like`` that carries ``names`` (value -> name).

    Next to ``path`` (``seg.nii.gz``) come ``seg.json``, ``seg.itksnap.txt`` and ``seg.ctbl``.
    All four files appear together or not at all. ``numbering`` is recorded for readers.
    """
    path = Path(path)
    paths = companion_paths(path)
    data = _as_uint8_labels(np.asarray(data))
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
    _write_all(
        [
            (path, _nifti_writer(img)),
            (paths["json"], _text_writer(table)),
            (paths["itksnap"], _text_writer(itksnap_text(names))),
            (paths["slicer"], _text_writer(slicer_ctbl(names))),
        ]
    )


# ---------------------------------------------------------------------------------------------
# Reading


def _load_nifti(path: Path) -> nib.Nifti1Image:
    try:
        img = nib.load(path)
    except (OSError, EOFError, zlib.error, nib.filebasedimages.ImageFileError) as exc:
        raise InputError(f"cannot read {path} as NIfTI ({exc}); give a .nii.gz segmentation") from None
    if not isinstance(img, nib.Nifti1Image):
        raise InputError(f"{path} is not a NIfTI image; give a .nii.gz segmentation")
    shape = img.shape
    if len(shape) == 4 and shape[3] == 1:
        img = img.slicer[..., 0]
    elif len(shape) != 3:
        raise InputError(f"{path} has shape {shape}; a segmentation must be a 3D volume")
    return img


def _integer_data(img: nib.Nifti1Image, path: Path) -> np.ndarray:
    """The voxel values as a non-negative integer array; LabelError if they are not."""
    arr = np.asanyarray(img.dataobj)
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
    stem = _nifti_stem(Path(path))
    sidecar = Path(path).with_name(f"{stem}.json") if stem else None
    if sidecar is not None and sidecar.is_file():
        return _parse_table(sidecar.read_bytes())
    return None


def _load_multilabel(path: Path) -> tuple[np.ndarray, nib.Nifti1Header, dict[int, str]]:
    img = _load_nifti(path)
    arr = _integer_data(img, path)
    top = int(arr.max()) if arr.size else 0
    table = read_names(img, path)
    if table is None:
        # No names carried: the values are model indices, as STU-Net writes them.
        if top > len(lbl.STRUCTURES):
            raise LabelError(
                f"{path} holds label value {top} but the model has only {len(lbl.STRUCTURES)} "
                "structures; give a segmentation written by 'stuseg predict --ml'"
            )
        names = dict(enumerate(lbl.STRUCTURES, start=1))
        return arr.astype(np.uint8, copy=False), img.header, names

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
    return lut[arr], img.header, names


def _mask_files(folder: Path) -> dict[int, Path]:
    """Model index -> mask file for every ``<structure>.nii.gz`` (or ``.nii``) in ``folder``."""
    found = {}
    for index, name in enumerate(lbl.STRUCTURES, start=1):
        for suffix in _NIFTI_SUFFIXES:
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
    first_index, first = next(iter(files.items()))
    ref = _load_nifti(first)
    # Fortran order, like the arrays nibabel reads from NIfTI.
    labels = np.zeros(ref.shape, np.uint8, order="F")
    flat = labels.ravel(order="F")  # a view: boolean indexing walks C order, slow on F arrays
    for index, path in files.items():
        img = ref if index == first_index else _load_nifti(path)
        if img.shape != ref.shape or not np.allclose(img.affine, ref.affine, atol=_AFFINE_ATOL_MM):
            what = "shape" if img.shape != ref.shape else "affine"
            raise InputError(
                f"masks {first.name} and {path.name} in {folder} differ in {what}; "
                "give a folder whose masks come from one segmentation"
            )
        mask = np.asfortranarray(_integer_data(img, path) != 0)  # any non-zero value marks it
        where = np.flatnonzero(mask.ravel(order="F"))  # views, both in memory order
        clash = flat[where]
        if clash.any():
            other = lbl.STRUCTURES[int(clash[clash != 0][0]) - 1]
            raise LabelError(
                f"masks {other} and {lbl.STRUCTURES[index - 1]} in {folder} overlap; "
                "one label map cannot hold both, so export them from separate folders"
            )
        flat[where] = index
    return labels, ref.header, {i: lbl.STRUCTURES[i - 1] for i in files}


def load_segmentation(
    path: Path, only: Iterable[int] | None = None
) -> tuple[np.ndarray, nib.Nifti1Header, dict[int, str]]:
    """Read a multilabel file or a folder of masks as a uint8 label map numbered by model index.

    Returns ``(labels, header, names)`` where ``names`` maps the model indices the segmentation
    knows about to structure names. For a folder, ``only`` limits reading to those structures.
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


def _check_output(output: Path, *, one_file: bool) -> None:
    if one_file:
        if output.is_dir():
            raise OutputError(
                f"{output} is a folder but --ml writes one file; give a file name such as seg.nii.gz"
            )
        if _nifti_stem(output) is None:
            raise OutputError(f"{output} is not a NIfTI file name; end it in .nii.gz")
    else:
        if output.exists() and not output.is_dir():
            raise OutputError(
                f"{output} is a file but masks are written into a folder; "
                "give a folder name, or add --ml for one multilabel file"
            )
        if not output.exists() and _nifti_stem(output) is not None:
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
) -> ExportResult:
    """Export the structures ``indices`` (model indices) of a segmentation.

    Default: one ``<name>.nii.gz`` 0/1 mask per structure in folder ``output``. ``ml``: one
    multilabel file ``output`` numbered by ``numbering`` (default model). ``combine``: their
    union as one mask ``<combine>.nii.gz`` in folder ``output``. Output geometry is the input's.
    Everything is checked before the first file is written, and outputs appear all together.
    """
    segmentation, output = Path(segmentation), Path(output)
    if ml and combine is not None:
        raise OutputError("--ml and --combine exclude each other; choose one")
    if numbering is not None and not ml:
        raise OutputError("--numbering applies to --ml output only; add --ml or drop --numbering")
    if combine is not None:
        if not _SAFE_NAME.fullmatch(combine) or _nifti_stem(Path(combine)) is not None:
            raise OutputError(f"'{combine}' is not a plain name for --combine; use letters, digits and _")
        if combine.lower() in (s.lower() for s in lbl.STRUCTURES):
            raise OutputError(
                f"--combine name '{combine}' is a structure's name; choose another so the union "
                "cannot be mistaken for that structure"
            )
    wanted = sorted(lbl.renumbering(indices))  # validates the indices
    if not wanted:
        raise LabelError("no structures selected; name them with --labels or --group")
    lbl.renumbering(wanted, numbering or lbl.Numbering.MODEL)  # an unknown numbering fails here
    _check_output(output, one_file=ml)

    labels, header, known = load_segmentation(segmentation, only=wanted)
    chosen = [i for i in wanted if i in known]
    missing = [lbl.STRUCTURES[i - 1] for i in wanted if i not in known]
    if not chosen:
        raise InputError(f"{segmentation} holds none of the requested structures; choose others")
    # Compact numbering counts only the structures actually exported.
    values = lbl.renumbering(chosen, numbering or lbl.Numbering.MODEL)
    counts = value_counts(labels, len(lbl.LABELS))
    result = ExportResult(missing=missing, empty=[lbl.STRUCTURES[i - 1] for i in chosen if counts[i] == 0])

    folder = output.parent if ml else output
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create folder {folder}: {exc.strerror or exc}") from None
    try:
        result.written = _write_outputs(labels, header, output, chosen, values, ml, numbering, combine)
    except BaseException:
        if created:  # leave no empty folder behind either
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    return result


def _write_outputs(
    labels: np.ndarray,
    header: nib.Nifti1Header,
    output: Path,
    chosen: list[int],
    values: dict[int, int],
    ml: bool,
    numbering: str | None,
    combine: str | None,
) -> list[Path]:
    """Write the export; ``values`` maps each chosen model index to its value in an --ml file."""
    if ml:
        lut = np.zeros(len(lbl.LABELS), np.uint8)
        for i in chosen:
            lut[i] = values[i]
        names = {values[i]: lbl.STRUCTURES[i - 1] for i in chosen}
        save_multilabel(lut[labels], header, output, names, numbering=numbering or lbl.Numbering.MODEL)
        return [output, *companion_paths(output).values()]
    if combine is not None:
        union = np.isin(labels, chosen).astype(np.uint8)
        return _write_all([(output / f"{combine}.nii.gz", _nifti_writer(label_image(union, header)))])

    def masks() -> Iterator[tuple[Path, Callable[[Path], None]]]:
        for i in chosen:
            mask = (labels == i).astype(np.uint8)
            yield output / f"{lbl.STRUCTURES[i - 1]}.nii.gz", _nifti_writer(label_image(mask, header))

    return _write_all(masks())


# ---------------------------------------------------------------------------------------------
# Segmentations named by another tool (e.g. TotalSegmentator's 117 "total" classes): the names
# come from the mask file names or from a label table, not from stuseg's 104 structures.


def _named_mask_files(folder: Path) -> dict[str, Path]:
    """Structure name -> file for every visible ``<name>.nii.gz`` / ``<name>.nii`` in ``folder``."""
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        stem = _nifti_stem(path)
        if stem is None or path.name.startswith(".") or not path.is_file():
            continue
        if stem in found:
            raise InputError(f"{folder} holds both {found[stem].name} and {path.name}; keep one of them")
        found[stem] = path
    return found


def load_named_masks(folder: Path) -> tuple[list[np.ndarray], nib.Nifti1Header, dict[int, str]]:
    """Read a folder of 0/1 masks named ``<structure>.nii.gz``, whatever the structure names.

    Each mask gets a label value (1, 2, ... in file name order). Masks may overlap (tools that
    write one mask per class can produce that): the result is a list of label maps ("layers"),
    each mask in the first layer where it overlaps no other, so every voxel of every mask is
    kept; without overlaps there is exactly one layer.

    Args:
        folder: the folder; every visible ``*.nii.gz`` / ``*.nii`` in it is read as a mask.

    Returns:
        ``(layers, header, names)``: uint8 (uint16 beyond 255 masks) label maps in Fortran
        order, the first mask's NIfTI header, and label value -> name (the file name stem).

    Raises:
        InputError: no masks, a file that cannot be read, or masks on different grids.
        LabelError: a file that is not a mask (more than one non-zero value, or non-integers).
    """
    from stuseg.io import _NIBABEL_READ_ERRORS
    from stuseg.io import _load_nifti as read_nifti  # the ISA-L reader of CT inputs

    folder = Path(folder)
    files = _named_mask_files(folder)
    if not files:
        raise InputError(f"folder {folder} holds no <structure>.nii.gz masks; give a folder of masks")
    dtype = np.uint8 if len(files) <= 255 else np.uint16
    layers: list[np.ndarray] = []
    names: dict[int, str] = {}
    ref: nib.Nifti1Image | None = None
    first = ""
    for value, (name, path) in enumerate(files.items(), start=1):
        try:
            img = read_nifti(path)
        except _NIBABEL_READ_ERRORS:
            raise InputError(f"cannot read {path}: it is damaged or not a NIfTI image") from None
        if not isinstance(img, nib.Nifti1Image):
            raise InputError(f"cannot read {path}: it is not a NIfTI image")
        if len(img.shape) == 4 and img.shape[3] == 1:
            img = img.slicer[..., 0]
        if ref is None:
            ref, first = img, path.name
            if len(img.shape) != 3:
                raise InputError(f"{path} has shape {img.shape}; a mask must be a 3D volume")
        elif img.shape != ref.shape or not np.allclose(img.affine, ref.affine, atol=_AFFINE_ATOL_MM):
            what = "shape" if img.shape != ref.shape else "affine"
            raise InputError(
                f"masks {first} and {path.name} in {folder} differ in {what}; "
                "give a folder whose masks come from one segmentation"
            )
        arr = np.asfortranarray(_integer_data(img, path))  # nibabel's order already: no copy
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
            layer = np.zeros(ref.shape, dtype, order="F")
            layers.append(layer)
            flat = layer.reshape(-1, order="F")
        flat[where] = value
        names[value] = name
    if not layers:  # every mask empty
        layers.append(np.zeros(ref.shape, dtype, order="F"))  # type: ignore[union-attr]
    return layers, ref.header, names  # type: ignore[union-attr]


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
    try:
        table = _plain_table(names_file.read_bytes())
    except OSError as exc:
        raise InputError(f"cannot read {names_file}: {exc.strerror or exc}") from None
    if table is None:
        raise LabelError(f'{names_file} is not a label table; give JSON such as {{"1": "spleen", ...}}')
    img = _load_nifti(path)
    arr = _integer_data(img, path)
    top = int(arr.max()) if arr.size else 0
    present = np.flatnonzero(value_counts(arr, top + 1))
    unnamed = [int(v) for v in present if v and v not in table]
    if unnamed:
        raise LabelError(f"{path} holds label value {unnamed[0]}, which {names_file} does not name")
    dtype = np.uint8 if top <= 255 else np.uint16
    return np.asfortranarray(arr, dtype=dtype), img.header, {v: table[v] for v in sorted(table) if v > 0}
