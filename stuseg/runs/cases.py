"""The cases of a batch: SOURCEs (image files, folders searched recursively, DICOM series, list
files) turned into ``Case``s with stable, unique, file-name-safe ids, and what was passed over.
"""

from __future__ import annotations

import csv
import hashlib
import os
import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from stuseg.errors import InputError, read_user_text
from stuseg.images import paths
from stuseg.runs.folder import FOLDER_FILES

__all__ = [
    "LIST_SUFFIXES",
    "WHAT_IS_FOUND",
    "Case",
    "Discovery",
    "Ignored",
    "discover",
    "group_channels",
    "read_list",
    "resolved",
    "safe_id",
    "unique_ids",
]

LIST_SUFFIXES = (".txt", ".csv")

WHAT_IS_FOUND = (
    "a batch segments NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr) and MetaImage (.mha, .mhd) files "
    "and the CT series of DICOM folders"
)

# A case id longer than this is cut and given a hash of the whole (file systems allow 255 bytes;
# the multilabel outputs add up to 12 characters, e.g. ".itksnap.txt").
_MAX_ID = 100

# Names Windows refuses as files whatever the extension.
_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(10)), *(f"lpt{i}" for i in range(10))}

# DICOM SOP classes of CT images (PS3.4 Annex B): CT Image Storage, Enhanced CT Image Storage,
# Legacy Converted Enhanced CT Image Storage. An empty SOP class (badly anonymised data) is accepted.
_CT_SOP_CLASSES = {"1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.2.1", "1.2.840.10008.5.1.4.1.1.2.2"}

# Names for the non-image objects most often found beside CT series (PS3.4 Annex B).
_SOP_NAMES = {
    "1.2.840.10008.5.1.4.1.1.481.3": "an RT structure set",
    "1.2.840.10008.5.1.4.1.1.66.4": "a segmentation (SEG)",
    "1.2.840.10008.5.1.4.1.1.88.11": "a structured report",
    "1.2.840.10008.5.1.4.1.1.88.22": "a structured report",
    "1.2.840.10008.5.1.4.1.1.88.33": "a structured report",
    "1.2.840.10008.5.1.4.1.1.7": "a secondary capture",
    "1.2.840.10008.5.1.4.1.1.7.1": "a secondary capture",
    "1.2.840.10008.5.1.4.1.1.7.2": "a secondary capture",
    "1.2.840.10008.5.1.4.1.1.7.3": "a secondary capture",
    "1.2.840.10008.5.1.4.1.1.7.4": "a secondary capture",
    "1.2.840.10008.5.1.4.1.1.11.1": "a presentation state",
    "1.2.840.10008.5.1.4.1.1.104.1": "an encapsulated PDF",
}


@dataclass(frozen=True)
class Case:
    """One scan to segment: an image file, or one DICOM series (``series`` = its SeriesInstanceUID)."""

    id: str
    input: Path
    series: str | None = None
    # A multi-channel model's further channels (files), in order after ``input`` (channel 0).
    channels: tuple[Path, ...] = ()

    @property
    def images(self) -> Path | list[Path]:
        """What the segmenter reads: ``input``, or every channel's file for a multi-channel case."""
        return [self.input, *self.channels] if self.channels else self.input

    @property
    def source(self) -> str:
        """The input as an absolute path with symlinks resolved: how the run log names it."""
        return str(resolved(self.input))

    def describe(self) -> str:
        """The input for people: the path, and the series UID for DICOM."""
        return (
            f"{self.input} (series {self.series or '(empty UID)'})"
            if self.series is not None
            else str(self.input)
        )


@dataclass(frozen=True)
class Ignored:
    """Something found while searching folders that is not a scan to segment, and why."""

    path: Path
    reason: str


@dataclass
class Discovery:
    """The cases found in the sources, in a stable order, and the objects passed over."""

    cases: list[Case] = field(default_factory=list)
    ignored: list[Ignored] = field(default_factory=list)


def resolved(path: Path) -> Path:
    """``path`` made absolute with symbolic links resolved (as far as they can be)."""
    try:
        return Path(path).resolve()
    except OSError:  # pragma: no cover - resolve() fails only on broken symlink loops
        return Path(os.path.abspath(path))


def safe_id(text: str) -> str:
    """``text`` as a portable file name: ASCII letters, digits, ``.``, ``_`` and ``-`` only.

    Accents are dropped (``Müller`` -> ``Muller``), every other run of characters (and ``..``)
    becomes ``_``, dots, dashes and underscores are stripped from both ends (no hidden files, no
    option look-alikes), names Windows reserves and the names of the batch folder's own files
    (``stuseg-batch.jsonl``, the cohort tables: a scan ``stuseg-batch.jsonl.nii.gz``) get a
    trailing ``_``, and names longer than 100 characters are cut and given 8 hex digits of the
    whole name's sha256 so they stay unique. Returns ``case`` for an empty result.
    """
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    name = re.sub(r"[^A-Za-z0-9._-]+|\.{2,}", "_", ascii_text)
    name = re.sub(r"_{2,}", "_", name).strip("._-")
    if not name:
        name = "case"
    if len(name) > _MAX_ID:
        name = f"{name[: _MAX_ID - 9]}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"
    if name.split(".")[0].lower() in _RESERVED or name.casefold() in FOLDER_FILES:
        name = name + "_"
    return name


def _is_image_file(path: Path) -> bool:
    return path.name.lower().endswith(paths.IMAGE_SUFFIXES)


@dataclass(frozen=True)
class _Found:
    """A case before ids are made unique: where it came from and the id it asks for."""

    input: Path
    series: str | None
    base: str  # the derived id, already safe
    explicit: bool = False  # given in a list file's `case` column: never changed


def _series_tags(file: str) -> dict[str, str]:
    """The DICOM attributes that classify a series, read from one of its files with SimpleITK."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(file)
    tags = {
        "modality": "0008|0060",
        "sop_class": "0008|0016",
        "image_type": "0008|0008",
        "number": "0020|0011",
    }
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return {}
    return {k: reader.GetMetaData(t).strip() if reader.HasMetaDataKey(t) else "" for k, t in tags.items()}


def _not_a_ct_series(tags: Mapping[str, str]) -> str | None:
    """Why a series is no CT volume to segment (a localizer, SEG, secondary capture, MR ...), or None."""
    sop = tags.get("sop_class", "").strip("\0 ")
    modality = tags.get("modality", "").upper()
    image_type = [part.strip().upper() for part in tags.get("image_type", "").split("\\")]
    if sop in _SOP_NAMES:
        return f"{_SOP_NAMES[sop]}, not an image series"
    if "LOCALIZER" in image_type:
        return "a localizer (ImageType LOCALIZER), not a CT volume"
    if sop and sop not in _CT_SOP_CLASSES:
        return f"not a CT image series (SOP class {sop}, modality {modality or 'unknown'})"
    if modality and modality != "CT":
        return f"not a CT image series (modality {modality})"
    return None


def _describe_non_image(path: Path) -> str:
    """Why a DICOM file in no image series was passed over, naming its kind when pydicom can tell."""
    try:
        import pydicom
    except ImportError:
        return "a DICOM object without image data"
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID", "Modality"])
    except Exception:  # any damage: the file is passed over all the same
        return "not a readable DICOM image"
    sop = str(ds.get("SOPClassUID", "")).strip()
    kind = _SOP_NAMES.get(sop) or f"a DICOM object of modality {ds.get('Modality', None) or 'unknown'}"
    return f"{kind} without image data"


def _scan_dicom_dir(folder: Path, files: Sequence[Path], prefix: str) -> tuple[list[_Found], list[Ignored]]:
    """The CT series among DICOM ``files`` of one folder (one case each) and what was passed over."""
    import SimpleITK as sitk

    found: list[_Found] = []
    ignored: list[Ignored] = []
    in_series: set[str] = set()
    previous = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # GDCM prints to stderr otherwise
    try:
        uids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
        for uid in uids:
            names = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid)
            in_series.update(os.path.normpath(n) for n in names)
            tags = _series_tags(names[0]) if names else {}
            why = _not_a_ct_series(tags)
            if why is not None:
                ignored.append(Ignored(Path(names[0]) if len(names) == 1 else folder, f"series {uid}: {why}"))
                continue
            number = re.sub(r"\s+", "", tags.get("number", ""))
            # SeriesNumber names the series as people know it; without one, a hash of the UID.
            tag = f"s{number}" if number else "u" + hashlib.sha256(uid.encode()).hexdigest()[:8]
            found.append(_Found(folder, uid, safe_id(f"{prefix}_{tag}" if prefix else tag)))
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(previous)
    found.sort(key=lambda f: (f.base, f.series or ""))  # GDCM's order of series is not documented
    for f in files:
        if os.path.normpath(str(f)) not in in_series:
            ignored.append(Ignored(f, _describe_non_image(f)))
    return found, ignored


def _search_folder(root: Path, base_prefix: str | None = None) -> tuple[list[_Found], list[Ignored]]:
    """Walk ``root`` in sorted order: image files and DICOM series, one case each.

    Ids: for files, the path below ``root`` without the image extension, folders joined with
    ``_`` (``s0001/ct.nii.gz`` -> ``s0001_ct``); for DICOM, the folder below ``root`` (or
    ``root``'s own name) and ``s<SeriesNumber>``. Hidden files and folders are passed over, and
    symbolic links to folders are not followed (no loops).
    """
    found: list[_Found] = []
    ignored: list[Ignored] = []
    root_name = base_prefix if base_prefix is not None else resolved(root).name
    from stuseg.images.io import looks_like_dicom

    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        here = Path(dirpath)
        rel = here.relative_to(root)
        parts = [p for p in rel.parts if p not in ("", ".")]
        dicom: list[Path] = []
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            path = here / name
            if _is_image_file(path):
                found.append(_Found(path, None, safe_id("_".join([*parts, paths.stem(name)]))))
            elif looks_like_dicom(path):
                dicom.append(path)
        if dicom:
            prefix = "_".join(parts) if parts else root_name
            cases, passed = _scan_dicom_dir(here, dicom, prefix)
            found += cases
            ignored += passed
    return found, ignored


def _from_entry(path: Path, explicit: str | None) -> tuple[list[_Found], list[Ignored]]:
    """The cases of one SOURCE or list entry: a file is one case, a folder is searched."""
    if path.is_dir():
        found, ignored = _search_folder(path)
        if explicit is not None:
            if len(found) == 1:
                found = [_Found(found[0].input, found[0].series, safe_id(explicit), True)]
            else:  # several scans under one named entry: <case>_<derived id>
                found = [_Found(f.input, f.series, safe_id(f"{explicit}_{f.base}"), True) for f in found]
        return found, ignored
    # A file, or a path that does not exist (a list entry: that case fails with read_image's reason).
    base = safe_id(explicit) if explicit is not None else safe_id(paths.stem(path.name))
    return [_Found(path, None, base, explicit is not None)], []


def read_list(path: Path) -> list[tuple[Path, str | None]]:
    """The entries of a list file: ``.txt`` (one path a line) or ``.csv`` (``path``, optional ``case``).

    In a ``.txt``, blank lines and lines starting with ``#`` are skipped. In a ``.csv`` the first
    row names the columns (case-insensitively). Relative paths are relative to the list file's
    folder. Returns (path, explicit case id or None) pairs.

    Raises:
        InputError: the file cannot be read, or a ``.csv`` has no ``path`` column or a row
            without a path.
    """
    path = Path(path)
    text = read_user_text(path, "list file")
    folder = path.parent

    def where(entry: str) -> Path:
        p = Path(entry).expanduser()
        return p if p.is_absolute() else folder / p

    entries: list[tuple[Path, str | None]] = []
    if path.suffix.lower() == ".txt":
        for line in text.splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                entries.append((where(line), None))
        return entries
    rows = list(csv.reader(text.splitlines()))
    if not rows:
        return entries
    header = [h.strip().lower() for h in rows[0]]
    if "path" not in header:
        raise InputError(f"{path} has no 'path' column; its first row must name the columns, e.g. path,case")
    ip, ic = header.index("path"), header.index("case") if "case" in header else None
    for n, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        entry = row[ip].strip() if ip < len(row) else ""
        if not entry:
            raise InputError(f"{path}, line {n}: the path is empty")
        case = row[ic].strip() if ic is not None and ic < len(row) and row[ic].strip() else None
        entries.append((where(entry), case))
    return entries


def discover(sources: Iterable[str | Path]) -> Discovery:
    """Find the cases of a batch in image files, folders (searched recursively) and list files.

    Every NIfTI/NRRD/MetaImage file is one case, and so is every CT series of a DICOM folder;
    DICOM objects that are not CT volumes (RT structure sets, SEG, localizers, secondary captures,
    other modalities) are returned as ``ignored``. The same scan named twice is one case. Case
    ids are made unique by ``unique_ids``.

    Args:
        sources: paths of image files, folders, ``.txt`` or ``.csv`` list files (see ``read_list``).

    Returns:
        The cases in the order of the sources (folders in sorted order), and what was passed over.

    Raises:
        InputError: a SOURCE does not exist, a list file is unusable, or two list entries give
            the same case id.
    """
    found: list[_Found] = []
    ignored: list[Ignored] = []
    for source in sources:
        path = Path(source)
        if not path.exists():
            raise InputError(f"{path} does not exist; check the path")
        if path.is_file() and path.suffix.lower() in LIST_SUFFIXES:
            for entry, explicit in read_list(path):
                cases, passed = _from_entry(entry, explicit)
                found += cases
                ignored += passed
        else:
            cases, passed = _from_entry(path, None)
            found += cases
            ignored += passed
    seen: set[tuple[str, str]] = set()
    unique: list[_Found] = []
    for f in found:
        key = (str(resolved(f.input)), f.series if f.series is not None else "")
        if key not in seen:
            seen.add(key)
            unique.append(f)
    ids = unique_ids(unique)
    return Discovery([Case(i, f.input, f.series) for i, f in zip(ids, unique)], ignored)


def group_channels(found: Discovery, count: int) -> Discovery:
    """The cases of a model with ``count`` input channels: files named as nnU-Net names channels
    (``<case>_0000.nii.gz``, ``<case>_0001.nii.gz``, ... in one folder) become one case each,
    with channel 0 as its input and id ``<case>``. A file not named so, a case missing a channel
    and a channel beyond ``count`` are passed over, each with its reason.

    Args:
        found: what ``discover`` found (one case per file).
        count: the model's input channels (2 or more).

    Returns:
        The grouped cases, in the order of their channel-0 files, and what was passed over.
    """
    from stuseg.images.paths import channel_of

    groups: dict[tuple[Path, str], dict[int, Case]] = {}
    ignored = list(found.ignored)
    for case in found.cases:
        named = channel_of(case.input) if case.series is None else None
        if named is None:
            ignored.append(
                Ignored(case.input, f"not named <case>_<4-digit channel> for a {count}-channel model")
            )
            continue
        groups.setdefault((case.input.parent, named[0]), {})[named[1]] = case
    cases = []
    for (_, name), channels in groups.items():
        missing = [c for c in range(count) if c not in channels]
        extra = sorted(c for c in channels if c >= count)
        if missing or extra:
            why = (
                f"channel {missing[0]:04d} of {count} is missing"
                if missing
                else f"channel {extra[0]:04d} is beyond the model's {count}"
            )
            ignored += [Ignored(c.input, f"case {name}: {why}") for c in channels.values()]
            continue
        first = channels[0]
        cases.append(Case(name, first.input, None, tuple(channels[c].input for c in range(1, count))))
    return Discovery(cases, ignored)


def unique_ids(found: Sequence[_Found]) -> list[str]:
    """Resolve id collisions deterministically; ids that differ only in letter case collide too.

    Explicit ids (a list file's ``case`` column) are kept; two equal explicit ids are an error.
    Every other member of a colliding group gets ``-`` and 8 hex digits of the sha256 of its
    resolved path (and series UID), so its id depends only on its own input, not on the order
    or number of the others.
    """
    groups: dict[str, list[int]] = {}
    for n, f in enumerate(found):
        groups.setdefault(f.base.casefold(), []).append(n)
    ids = [f.base for f in found]
    for members in groups.values():
        if len(members) < 2:
            continue
        explicit = [n for n in members if found[n].explicit]
        if len(explicit) > 1:
            a, b = (found[n] for n in explicit[:2])
            raise InputError(
                f"the case id {a.base!r} is given twice in the list (for {a.input} and {b.input}); "
                "make the 'case' column unique"
            )
        for n in members:
            if found[n].explicit:
                continue
            f = found[n]
            key = f"{resolved(f.input)}\0{f.series or ''}"
            ids[n] = f"{f.base[: _MAX_ID - 9]}-{hashlib.sha256(key.encode()).hexdigest()[:8]}"
    return ids
