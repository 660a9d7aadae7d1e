"""A user's labelled scans as an nnU-Net v2 raw dataset: ``stuseg finetune prepare``.

Sources (SRC), one of:

- a folder in nnU-Net's own layout: ``imagesTr/<case>_0000.nii.gz`` (``_0001``, ... for more
  channels) and ``labelsTr/<case>.nii.gz``;
- a folder with ``images/`` and ``labels/``: each image (a file, or a folder holding one DICOM
  series) pairs with the label file of the same name in ``labels/`` (``images/a.mha`` with
  ``labels/a.nii.gz``); one channel;
- a folder of files side by side: ``<case>.nii.gz`` with ``<case>_seg.nii.gz`` or
  ``<case>_label.nii.gz`` (or a DICOM folder ``<case>/`` beside its ``<case>_seg.nii.gz``); one
  channel;
- a CSV file with a header row: columns ``image`` and ``label``, for more channels ``image_1``,
  ``image_2``, ... (``image_0`` or ``image_0000`` may name the first; any spelling of the channel
  number works), and an optional ``case`` column with the case id (default: the first image's
  name without its suffix). Relative paths are relative to the CSV's folder; other columns are
  ignored.

Images may be NIfTI, NRRD, MetaImage or DICOM folders (read by ``stuseg.images.io.read_image``); label
maps NIfTI, NRRD or MetaImage (``stuseg.images.io.read_label_map``). A folder holding the marks of two
layouts is refused rather than guessed at; so are files that pair with nothing.

Label table: names in order (values 1, 2, ...), or a mapping in either direction
(``{"1": "liver", "2": "tumour"}`` or ``{"liver": 1, "tumour": 2}``; an nnU-Net ``dataset.json``
works too, through its ``labels``). Background is always 0. nnU-Net trains on consecutive values,
so the values must be 1 to N without gaps; at most 255 labels (a fine-tuned model's label maps
are uint8 in stuseg).

Every case is checked (readable files, every channel and the label map on one grid, whole-number
label values that the table names, some foreground) and every problem is collected: one
:class:`DatasetError` lists them all, one line each, and then nothing is written. The output
folder appears whole or not at all (``stuseg.results.outputs``):

    OUTPUT/imagesTr/<case>_0000.nii.gz   one file per channel, the input's grid bit for bit
    OUTPUT/labelsTr/<case>.nii.gz        uint8, on the same grid
    OUTPUT/dataset.json                  channel_names, labels, numTraining, file_ending, name

Images keep their values: int16 where every voxel is a whole number in its range (CT almost
always), else float32. Case ids are the names made safe with ``stuseg.structures.labels.file_name`` and must
be unique regardless of letter case.

nnU-Net's own tools look a raw dataset up as ``$nnUNet_raw/DatasetXXX_Name``; OUTPUT may be any
folder, and the fine-tuning driver links it into nnU-Net's layout under the id it chooses
(``name`` in dataset.json is OUTPUT's folder name). Nothing here imports nnU-Net or torch.
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stuseg.errors import InputError, LabelError
from stuseg.images.geometry import same_grid
from stuseg.images.io import Volume, image_on_grid, label_image, read_image, read_label_map
from stuseg.images.paths import IMAGE_SUFFIXES, channel_of, image_suffix, stem
from stuseg.results.labelmaps import write_nifti
from stuseg.results.outputs import check_output, staged_folder
from stuseg.structures.labels import file_name

__all__ = [
    "FILE_ENDING",
    "LAYOUTS",
    "DatasetError",
    "PreparedCase",
    "PreparedDataset",
    "SourceCase",
    "case_id",
    "find_cases",
    "label_table",
    "labels_from_option",
    "prepare_dataset",
    "read_label_table",
]

FILE_ENDING = ".nii.gz"
# Suffixes of a label file beside its image in the side-by-side layout (matched in any letter case).
LABEL_MARKS = ("_seg", "_label")
LAYOUTS = (
    "give a folder with imagesTr/ and labelsTr/ (nnU-Net's layout), a folder with images/ and labels/ "
    "(same names), a folder of <case>.nii.gz beside <case>_seg.nii.gz or <case>_label.nii.gz, "
    "or a CSV with image,label columns"
)
_MAX_LABELS = 255  # stuseg writes a fine-tuned model's label maps as uint8
_STRAYS_SHOWN = 8


class DatasetError(InputError):
    """Cases that cannot be used: ``problems`` holds one line per problem, each naming its file."""

    def __init__(self, summary: str, problems: Sequence[str]) -> None:
        self.summary = summary
        self.problems = tuple(problems)
        super().__init__("\n".join([f"{summary}:", *self.problems]))


@dataclass(frozen=True)
class SourceCase:
    """One case as found in the source: its id, its image per channel, and its label map."""

    id: str
    images: tuple[Path, ...]
    label: Path


@dataclass(frozen=True)
class PreparedCase:
    """A written case: the files in the dataset and the files they were made from."""

    id: str
    images: tuple[Path, ...]
    label: Path
    source_images: tuple[Path, ...]
    source_label: Path


@dataclass(frozen=True)
class PreparedDataset:
    """The dataset written by :func:`prepare_dataset`.

    Attributes:
        folder: the dataset folder (OUTPUT).
        dataset_json: its ``dataset.json``.
        cases: every case, sorted by id, with final paths.
        labels: the label table as in dataset.json: name -> value, ``background`` 0 first.
        channel_names: the name of each input channel, in order.
    """

    folder: Path
    dataset_json: Path
    cases: tuple[PreparedCase, ...]
    labels: dict[str, int]
    channel_names: tuple[str, ...]


# ---------------------------------------------------------------------------------------------
# The label table


def label_table(labels: Sequence[str] | Mapping[str, int] | Mapping[str | int, str]) -> dict[int, str]:
    """The checked label table, value -> name, without background.

    Args:
        labels: names in order (values 1, 2, ...), ``{name: value}`` or ``{value: name}`` (values
            as ints or digit strings, as JSON keys are). An entry for 0 is accepted only if it is
            named ``background``.

    Returns:
        Value -> name for values 1 to N, sorted.

    Raises:
        LabelError: a mixed or malformed table, empty, duplicate or reserved names, a gap in the
            values, or more than 255 labels.
    """
    if isinstance(labels, str):
        raise LabelError("give the label names as a list, or a table of names and values")
    if isinstance(labels, Mapping):
        pairs = _table_pairs(labels)
    else:
        pairs = [(value, name) for value, name in enumerate(labels, start=1)]
    table: dict[int, str] = {}
    seen: dict[str, str] = {}
    for value, raw in pairs:
        if not isinstance(raw, str) or not raw.strip():
            raise LabelError(f"label {value} has an empty name; give every label a name")
        name = raw.strip()
        if name.casefold() == "background":
            if value != 0:
                raise LabelError(f"'background' is value 0; name label {value} otherwise")
            continue
        if value == 0:
            raise LabelError(f"value 0 is background; '{name}' needs a value from 1")
        if value < 0:
            raise LabelError(f"label '{name}' has the negative value {value}; values start at 1")
        if name.casefold() == "ignore":
            raise LabelError(
                "'ignore' is a reserved name in nnU-Net (voxels left unannotated); choose another name"
            )
        if name.casefold() in seen:
            raise LabelError(
                f"two labels are named '{seen[name.casefold()]}' and '{name}'; names must differ"
            )
        if value in table:
            raise LabelError(f"value {value} is given to both '{table[value]}' and '{name}'")
        seen[name.casefold()] = name
        table[value] = name
    if not table:
        raise LabelError("the label table names no structure; give at least one label (value 1)")
    if len(table) > _MAX_LABELS:
        raise LabelError(f"the table has {len(table)} labels; a fine-tuned model holds at most {_MAX_LABELS}")
    missing = [v for v in range(1, len(table) + 1) if v not in table]
    if missing:
        raise LabelError(
            f"label values must be 1 to {len(table)} without gaps (nnU-Net trains on consecutive "
            f"values), but {missing[0]} is missing; renumber the table and the label maps"
        )
    return dict(sorted(table.items()))


def _table_pairs(labels: Mapping) -> list[tuple[int, object]]:
    """(value, name) pairs of a mapping given in either direction."""
    keys, values = list(labels), list(labels.values())
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values) and all(
        isinstance(k, str) for k in keys
    ):
        return [(v, k) for k, v in labels.items()]
    if all(isinstance(v, str) for v in values):
        pairs = []
        for k, v in labels.items():
            if isinstance(k, int) and not isinstance(k, bool):
                pairs.append((k, v))
            elif isinstance(k, str) and re.fullmatch(r"\s*-?\d+\s*", k):
                pairs.append((int(k), v))
            else:
                raise LabelError(
                    f'the label table\'s key {k!r} is not a value; write {{"1": "liver"}} or {{"liver": 1}}'
                )
        return pairs
    raise LabelError(
        'the label table mixes forms; write {"1": "liver", "2": "tumour"} or {"liver": 1, "tumour": 2}'
    )


def read_label_table(path: Path) -> dict[int, str]:
    """The label table of a JSON file: ``{"1": "liver"}``, ``{"liver": 1}``, or a dataset.json.

    Raises:
        LabelError: the file cannot be read, is not such a JSON object, or the table is invalid
            (see :func:`label_table`).
    """
    path = Path(path)

    def no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
        keys = [k for k, _ in pairs]
        twice = next((k for k in keys if keys.count(k) > 1), None)
        if twice is not None:
            raise LabelError(f"{path} gives the key {twice!r} twice; each label appears once")
        return dict(pairs)

    try:
        doc = json.loads(path.read_text(encoding="utf-8-sig"), object_pairs_hook=no_duplicates)
    except OSError as exc:
        raise LabelError(f"cannot read the label table {path}: {exc.strerror or exc}") from None
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise LabelError(f"{path} is not valid JSON ({exc}); fix the label table") from None
    if isinstance(doc, dict) and isinstance(doc.get("labels"), dict):
        doc = doc["labels"]  # an nnU-Net dataset.json
    if not isinstance(doc, dict):
        raise LabelError(f'{path} must hold a JSON object such as {{"1": "liver", "2": "tumour"}}')
    try:
        return label_table(doc)
    except LabelError as exc:
        raise LabelError(f"{path}: {exc}") from None


def labels_from_option(text: str) -> dict[int, str]:
    """The table of ``--labels``: a ``.json`` file, or names separated by commas (values 1, 2, ...)."""
    if text.strip().lower().endswith(".json"):
        return read_label_table(Path(text.strip()))
    names = [n.strip() for n in text.split(",")]
    if not any(names):
        raise LabelError("--labels is empty; give names such as liver,tumour or a labels.json file")
    return label_table(names)


# ---------------------------------------------------------------------------------------------
# Finding the cases


def case_id(raw: str) -> str:
    """A case id made safe as a file name (the rule of ``stuseg.structures.labels.file_name``)."""
    return file_name(raw)


def find_cases(source: Path, channels: int = 1) -> tuple[list[SourceCase], list[str]]:
    """The cases of a source folder or CSV (see the module's docstring), nothing read yet.

    Args:
        source: the folder or CSV file.
        channels: input channels per case.

    Returns:
        The cases, sorted by id, and one line per problem found in pairing them up (a file
        without its partner, duplicate ids, a wrong number of channels).

    Raises:
        InputError: the source does not exist, or is no layout this module knows, or several.
    """
    source = Path(source)
    if not source.exists():
        raise InputError(f"{source} does not exist; {LAYOUTS}")
    if source.is_file():
        if source.suffix.lower() != ".csv":
            raise InputError(f"{source} is a file but not a .csv; {LAYOUTS}")
        cases, problems = _csv_cases(source, channels)
    else:
        cases, problems = _folder_cases(source, channels)
    return _unique_ids(cases, problems)


def _entries(folder: Path, *, folders: bool = False) -> list[Path]:
    """Image files (and with ``folders``, subfolders) of ``folder``, hidden ones left out."""
    found = []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            if folders:
                found.append(entry)
        elif image_suffix(entry) in IMAGE_SUFFIXES:
            found.append(entry)
    return found


def _folder_cases(source: Path, channels: int) -> tuple[list[SourceCase], list[str]]:
    nnunet = [source / n for n in ("imagesTr", "labelsTr") if (source / n).is_dir()]
    pairs = [source / n for n in ("images", "labels") if (source / n).is_dir()]
    side = [f for f in _entries(source) if _label_case(f) is not None]
    layouts = [
        text
        for text, marks in (
            ("imagesTr/ and labelsTr/", nnunet),
            ("images/ and labels/", pairs),
            ("label files such as " + (side[0].name if side else ""), side),
        )
        if marks
    ]
    if len(layouts) > 1:
        raise InputError(
            f"{source} mixes two layouts ({layouts[0]}, {layouts[1]}); keep one, or list the pairs in a CSV"
        )
    if not layouts:
        raise InputError(f"{source} holds no image/label pairs in a layout stuseg knows; {LAYOUTS}")
    if nnunet:
        return _nnunet_cases(source, channels)
    if pairs:
        return _pair_folder_cases(source, channels)
    return _side_by_side_cases(source, channels)


def _need_both(source: Path, images: str, labels: str) -> tuple[Path, Path]:
    for name in (images, labels):
        if not (source / name).is_dir():
            other = labels if name == images else images
            raise InputError(f"{source} has {other}/ but no {name}/; put each case's files in both")
    return source / images, source / labels


def _one_channel(source: Path, channels: int) -> None:
    if channels != 1:
        raise InputError(
            f"{channels} channels are named, but the layout of {source} has one image per case; "
            "give multi-channel cases as imagesTr/<case>_0000.nii.gz, _0001, ... or in a CSV"
        )


def _by_name(entries: list[Path], name_of: Callable[[Path], str | None]) -> dict[str, list[Path]]:
    found: dict[str, list[Path]] = {}
    for entry in entries:
        name = name_of(entry)
        if name is not None:
            found.setdefault(name, []).append(entry)
    return found


def _pair_up(
    images: dict[str, list[list[Path]]],
    labels: dict[str, list[Path]],
    label_folder: Path,
    *,
    marks: Sequence[str] = ("",),
) -> tuple[list[SourceCase], list[str]]:
    """Cases from images (per name: one list of files per channel) and labels found by name
    (``marks``: what a label file's name adds to its case's, for the message)."""
    cases, problems = [], []
    for name in sorted(set(images) | set(labels)):
        channel_files = images.get(name)
        label_files = labels.get(name, [])
        if channel_files is None:
            problems.extend(f"{f}: has no image of the same name" for f in label_files)
            continue
        twice = next((files for files in [*channel_files, label_files] if len(files) > 1), None)
        if twice is not None:
            problems.append(f"{twice[0]} and {twice[1].name}: two files of one case; keep one")
            continue
        if not label_files:
            wanted = " or ".join(f"{name}{mark}.*" for mark in marks)
            problems.append(f"{channel_files[0][0]}: has no label file {wanted} in {label_folder}")
            continue
        cases.append(SourceCase(name, tuple(files[0] for files in channel_files), label_files[0]))
    return cases, problems


def _nnunet_cases(source: Path, channels: int) -> tuple[list[SourceCase], list[str]]:
    image_dir, label_dir = _need_both(source, "imagesTr", "labelsTr")
    problems = []
    per_case: dict[str, dict[int, list[Path]]] = {}
    for entry in _entries(image_dir):
        found = channel_of(entry)
        if found is None:
            problems.append(f"{entry}: not named <case>_0000{image_suffix(entry)} as nnU-Net names images")
            continue
        per_case.setdefault(found[0], {}).setdefault(found[1], []).append(entry)
    images: dict[str, list[list[Path]]] = {}
    for name, by_channel in per_case.items():
        if sorted(by_channel) != list(range(channels)):
            have = ", ".join(f"{c:04d}" for c in sorted(by_channel))
            problems.append(
                f"{image_dir / name}_*: has channel files {have}, but {channels} channel"
                f"{'s are' if channels > 1 else ' is'} named (0000 to {channels - 1:04d}); "
                "name each channel with --channel-names"
            )
            continue
        images[name] = [by_channel[c] for c in range(channels)]
    labels = _by_name(_entries(label_dir), stem)
    labels = {k: v for k, v in labels.items() if k in images or k not in per_case}
    cases, more = _pair_up(images, labels, label_dir)
    return cases, problems + more


def _pair_folder_cases(source: Path, channels: int) -> tuple[list[SourceCase], list[str]]:
    _one_channel(source, channels)
    image_dir, label_dir = _need_both(source, "images", "labels")
    images = {
        k: [v]
        for k, v in _by_name(
            _entries(image_dir, folders=True), lambda p: p.name if p.is_dir() else stem(p)
        ).items()
    }
    return _pair_up(images, _by_name(_entries(label_dir), stem), label_dir)


def _label_case(path: Path) -> str | None:
    """``a`` for ``a_seg.nii.gz`` or ``a_label.nrrd`` (any letter case of the mark), else None."""
    name = stem(path)
    for mark in LABEL_MARKS:
        if name.lower().endswith(mark) and len(name) > len(mark):
            return name[: -len(mark)]
    return None


def _side_by_side_cases(source: Path, channels: int) -> tuple[list[SourceCase], list[str]]:
    _one_channel(source, channels)
    entries = _entries(source, folders=True)
    labels = _by_name([e for e in entries if e.is_file()], _label_case)
    images = _by_name(
        entries,
        lambda p: (
            (p.name if p.name in labels else None) if p.is_dir() else (None if _label_case(p) else stem(p))
        ),
    )
    return _pair_up({k: [v] for k, v in images.items()}, labels, source, marks=LABEL_MARKS)


_IMAGE_COLUMN = re.compile(r"image(?:_(?P<channel>\d+))?")


def _csv_cases(table: Path, channels: int) -> tuple[list[SourceCase], list[str]]:
    try:
        with open(table, newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.reader(fh))
    except OSError as exc:
        raise InputError(f"cannot read {table}: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"{table} is not a readable CSV file ({exc}); save it as UTF-8 CSV") from None
    if not rows:
        raise InputError(f"{table} is empty; give a header row with image,label and one row per case")
    header = [h.strip().lower() for h in rows[0]]
    columns: dict[int, int] = {}  # channel -> column index
    for index, title in enumerate(header):
        match = _IMAGE_COLUMN.fullmatch(title)
        if match is None:
            continue
        channel = int(match["channel"] or 0)
        if channel in columns:
            raise InputError(f"{table} has two columns for channel {channel} ({title} and another); keep one")
        columns[channel] = index
    if "label" not in header or not columns:
        raise InputError(
            f"{table} needs the columns image and label (more channels: image_1, image_2, ...); "
            f"its header row is {','.join(rows[0])}"
        )
    if sorted(columns) != list(range(len(columns))):
        raise InputError(
            f"{table}'s image columns skip a channel number; number them image, image_1, image_2, ..."
        )
    if len(columns) != channels:
        raise InputError(
            f"{table} has {len(columns)} image columns but {channels} channel"
            f"{'s are' if channels > 1 else ' is'} named; give one name per channel with --channel-names"
        )
    label_column = header.index("label")
    case_column = header.index("case") if "case" in header else None
    cases, problems = [], []
    for number, row in enumerate(rows[1:], start=2):
        cells = [c.strip() for c in row] + [""] * (len(header) - len(row))
        if not any(cells):
            continue
        wanted = [("label", label_column), *((header[i], i) for _, i in sorted(columns.items()))]
        empty = [title for title, i in wanted if not cells[i]]
        if empty:
            problems.append(f"{table}: row {number}: no {' or '.join(empty)}")
            continue
        images = tuple(_relative(table, cells[columns[c]]) for c in range(channels))
        label = _relative(table, cells[label_column])
        raw = cells[case_column] if case_column is not None and cells[case_column] else None
        cases.append(
            SourceCase(raw or (images[0].name if images[0].is_dir() else stem(images[0])), images, label)
        )
    return cases, problems


def _relative(table: Path, cell: str) -> Path:
    path = Path(os.path.expanduser(cell))
    return path if path.is_absolute() else table.parent / path


def _unique_ids(cases: list[SourceCase], problems: list[str]) -> tuple[list[SourceCase], list[str]]:
    """Cases renamed to safe ids; ids that coincide (regardless of letter case) become problems."""
    by_id: dict[str, list[SourceCase]] = {}
    for case in cases:
        safe = case_id(case.id)
        by_id.setdefault(safe.casefold(), []).append(SourceCase(safe, case.images, case.label))
    unique = []
    for same in by_id.values():
        if len(same) == 1:
            unique.append(same[0])
            continue
        files = " and ".join(str(c.label) for c in same)
        problems.append(
            f"{files}: cases with the same id '{same[0].id}'; rename one (or set a CSV's case column)"
        )
    return sorted(unique, key=lambda c: c.id), problems


# ---------------------------------------------------------------------------------------------
# Checking and writing


def _grid_difference(reference: Volume, other: Volume, whose: str) -> str:
    """How ``other``'s grid differs from ``reference``'s (named ``whose``), for a message."""
    if tuple(reference.data.shape) != tuple(other.data.shape):
        return f"shape {tuple(other.data.shape)} vs {whose} {tuple(reference.data.shape)}"
    gap = float(np.max(np.abs(reference.affine - other.affine)))
    return f"its voxel-to-world matrix differs from {whose} by up to {gap:.3g} mm"


def _label_problem(data: np.ndarray, table: Mapping[int, str]) -> str | None:
    """What is wrong with a label map's values, or None."""
    top = len(table)
    if data.dtype == np.bool_:
        data = data.view(np.uint8)
    if data.dtype.kind == "f":
        whole = np.isfinite(data) & (data == np.rint(data))
        if not whole.all():
            example = data[~whole].flat[0]
            return (
                f"holds non-integer label values (such as {example:g}); a label map holds whole "
                "numbers 0, 1, 2, ..."
            )
    elif data.dtype.kind not in "iu":
        return f"holds values of type {data.dtype}; a label map holds whole numbers 0, 1, 2, ..."
    if data.size == 0:
        return "holds no voxels"
    low, high = data.min(), data.max()
    if low < 0 or high > top:
        strays = np.unique(data[(data < 0) | (data > top)])
        shown = ", ".join(f"{int(v)}" for v in strays[:_STRAYS_SHOWN])
        more = f" ({len(strays)} values in all)" if len(strays) > _STRAYS_SHOWN else ""
        named = ", ".join(f"{v} {n}" for v, n in table.items())
        values = "value" if len(strays) == 1 else "values"
        return (
            f"holds label {values} {shown}{more} that the label table does not name (0 background, {named})"
        )
    if high == 0:
        return "holds no labelled voxel (only background 0); label something or leave the case out"
    return None


def _check_case(case: SourceCase, table: Mapping[int, str]) -> tuple[str | None, list[Volume], Volume | None]:
    """(problem line, channel volumes, label volume); the volumes only when there is no problem."""
    volumes: list[Volume] = []
    try:
        for path in case.images:
            volumes.append(read_image(path))
        label = read_label_map(case.label)
    except InputError as exc:
        return str(exc), [], None
    first = volumes[0]
    for path, volume in zip(case.images, volumes):
        nan = int(np.count_nonzero(np.isnan(volume.data)))
        if nan:
            return (
                f"{path}: holds {nan} NaN voxels; nnU-Net refuses them, so replace them with numbers",
                [],
                None,
            )
    for path, volume in zip(case.images[1:], volumes[1:]):
        if not same_grid(first.data.shape, first.affine, volume.data.shape, volume.affine):
            gap = _grid_difference(first, volume, "the first channel's")
            return f"{path}: not on the grid of the case's first channel {case.images[0]} ({gap})", [], None
    if not same_grid(first.data.shape, first.affine, label.data.shape, label.affine):
        gap = _grid_difference(first, label, "the image's")
        return f"{case.label}: not on the grid of its image {case.images[0]} ({gap})", [], None
    problem = _label_problem(label.data, table)
    if problem is not None:
        return f"{case.label}: {problem}", [], None
    return None, volumes, label


def _stored(data: np.ndarray) -> np.ndarray:
    """An image's voxels in the type to write: int16 when it holds every value exactly (CT is
    stored as whole Hounsfield units in int16 almost always: half the bytes of float32), else the
    float32 that was read."""
    if data.size and np.all(data == np.rint(data)) and data.min() >= -32768 and data.max() <= 32767:
        return data.astype(np.int16)
    return data.astype(np.float32, copy=False)


def _write_case(stage: Path, case: SourceCase, volumes: list[Volume], label: Volume) -> None:
    # Every file of the case gets the first channel's header: one grid, bit for bit (the checks
    # above allowed differences up to geometry.AFFINE_ATOL_MM).
    like = volumes[0].header
    for channel, volume in enumerate(volumes):
        write_nifti(
            image_on_grid(_stored(volume.data), like),
            stage / "imagesTr" / f"{case.id}_{channel:04d}{FILE_ENDING}",
        )
    # The values were checked to be 0 to N <= 255: uint8 holds them exactly.
    write_nifti(
        label_image(np.asarray(label.data).astype(np.uint8), like),
        stage / "labelsTr" / f"{case.id}{FILE_ENDING}",
    )


def prepare_dataset(
    source: Path,
    output: Path,
    labels: Sequence[str] | Mapping[str, int] | Mapping[str | int, str],
    *,
    channel_names: Sequence[str] = ("CT",),
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> PreparedDataset:
    """Check every case of ``source`` and write them as the nnU-Net v2 raw dataset ``output``.

    Args:
        source: a folder in one of the layouts, or a CSV (see the module's docstring).
        output: the dataset folder to write; refused if it holds files stuseg did not write,
            unless ``overwrite``, and always if it is, holds or lies inside an input.
        labels: the label table (see :func:`label_table`).
        channel_names: one name per input channel, as dataset.json's ``channel_names``. nnU-Net
            normalises a channel named ``CT`` with its CT scheme; the fine-tuning trainer sets the
            normalisation itself, so the names are the user's.
        overwrite: replace an ``output`` that holds other files.
        progress: called with (cases checked, cases) after each case.

    Returns:
        What was written.

    Raises:
        LabelError: the label table is invalid.
        InputError: the source is no known layout, or the channel names are empty.
        OutputError: ``output`` cannot be written safely.
        DatasetError: problems with cases, one line each; nothing was written.
    """
    table = label_table(labels)
    names = tuple(str(n).strip() for n in channel_names)
    if not names or not all(names):
        raise InputError("give every input channel a name, such as CT (several: CT,PET)")
    source, output = Path(source), Path(output)
    cases, problems = find_cases(source, len(names))
    if not cases and not problems:
        raise InputError(f"found no cases in {source}; {LAYOUTS}")
    inputs = [source, *(p for c in cases for p in (*c.images, c.label))]
    check_output(output, inputs=inputs, kind="folder", overwrite=overwrite)
    with staged_folder(output) as stage:
        (stage / "imagesTr").mkdir()
        (stage / "labelsTr").mkdir()
        for done, case in enumerate(cases, start=1):
            problem, volumes, label = _check_case(case, table)
            if problem is not None:
                problems.append(problem)
            elif not problems and label is not None:  # after a bad case nothing is kept: only check
                _write_case(stage, case, volumes, label)
            del volumes, label
            if progress is not None:
                progress(done, len(cases))
        if problems:
            many = len(problems) > 1
            raise DatasetError(
                f"{len(problems)} problem{'s' if many else ''} with the cases in {source}; nothing was "
                f"written, so fix {'them' if many else 'it'} and run again",
                problems,
            )
        dataset = {
            "name": output.name,
            "channel_names": {str(i): n for i, n in enumerate(names)},
            "labels": {"background": 0, **{n: v for v, n in table.items()}},
            "numTraining": len(cases),
            "file_ending": FILE_ENDING,
        }
        (stage / "dataset.json").write_text(
            json.dumps(dataset, indent=1, ensure_ascii=False) + "\n", encoding="utf-8"
        )
    prepared = tuple(
        PreparedCase(
            id=c.id,
            images=tuple(output / "imagesTr" / f"{c.id}_{i:04d}{FILE_ENDING}" for i in range(len(names))),
            label=output / "labelsTr" / f"{c.id}{FILE_ENDING}",
            source_images=c.images,
            source_label=c.label,
        )
        for c in cases
    )
    return PreparedDataset(
        folder=output,
        dataset_json=output / "dataset.json",
        cases=prepared,
        labels=dict(dataset["labels"]),
        channel_names=names,
    )
