"""Segment many scans with one model load: find the cases, run them with the stages overlapped, log each.

A batch turns SOURCEs (image files, folders searched recursively, list files) into ``Case``s with
stable, unique, file-name-safe ids, and writes each case's result atomically into
``OUTPUT/<case id>/`` (masks) or ``OUTPUT/<case id>.nii.gz`` (``multilabel``). Every finished case
appends one JSON line to ``OUTPUT/stuseg-batch.jsonl`` (the run log), which is also what a later
run reads to skip cases already done with the same weights and options.

On one machine, ``run`` overlaps three stages in three threads joined by queues of one item:
reading + preprocessing the next case, the network on the current one, and going back to the input
grid + writing the previous one. The heavy work of each stage (torch, numpy, ISA-L) releases the
GIL, so threads overlap without copies between processes.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import queue
import re
import socket
import threading
import time
import unicodedata
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from stuseg import crash, locks, memory, paths
from stuseg.errors import InputError, OutputError, StusegError
from stuseg.results import PRODUCTS, Layout, Request, Sources, dicom_source, mode_name, read_ct, write_result

__all__ = [
    "COHORT_NAMES",
    "LIST_SUFFIXES",
    "LOG_NAME",
    "WHAT_IS_FOUND",
    "Case",
    "CaseJob",
    "CaseResult",
    "Discovery",
    "Ignored",
    "Interrupted",
    "ModelOptions",
    "RunLog",
    "Settings",
    "case_layout",
    "cases_done",
    "check_batch_output",
    "discover",
    "done_before",
    "failure",
    "group_channels",
    "holds",
    "latest_ok",
    "model_table",
    "one_line",
    "output_paths",
    "process",
    "product_tags",
    "read_list",
    "read_log",
    "run",
    "run_local",
    "safe_id",
    "settings_of",
    "signals_interrupt",
    "skip_done",
    "split_threads",
    "unique_ids",
    "uuid4_hex",
    "write_case",
]

LOG_NAME = "stuseg-batch.jsonl"
# The cohort tables ``stuseg statistics RESULTS/`` writes (``stuseg.cohort``).
COHORT_NAMES = ("stuseg-cohort.csv", "stuseg-cohort.cases.csv")
# What stuseg writes in a batch folder beside the cases' results: no case id equals one of these.
_FOLDER_FILES = {LOG_NAME.casefold(), *(n.casefold() for n in COHORT_NAMES)}
Status = Literal["ok", "failed", "skipped"]

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


# ---------------------------------------------------------------------------------------------
# Cases


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
        return str(_resolved(self.input))

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


def _resolved(path: Path) -> Path:
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
    if name.split(".")[0].lower() in _RESERVED or name.casefold() in _FOLDER_FILES:
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
    root_name = base_prefix if base_prefix is not None else _resolved(root).name
    from stuseg.io import looks_like_dicom

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
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(
            f"cannot read the list file {path}: {getattr(exc, 'strerror', None) or exc}"
        ) from None
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
        key = (str(_resolved(f.input)), f.series if f.series is not None else "")
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
    from stuseg.paths import channel_of

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
            key = f"{_resolved(f.input)}\0{f.series or ''}"
            ids[n] = f"{f.base[: _MAX_ID - 9]}-{hashlib.sha256(key.encode()).hexdigest()[:8]}"
    return ids


# ---------------------------------------------------------------------------------------------
# The run log


def read_log(path: Path) -> list[dict[str, Any]]:
    """The records of a run log, oldest first; lines that are not whole JSON objects are skipped.

    A process killed while appending can leave a torn last line; it is ignored here, and the next
    writer starts on a fresh line (see ``RunLog``), so one interruption never hides the records of
    the others. A missing log reads as empty.
    """
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise OutputError(f"cannot read the run log {path}: {exc.strerror or exc}") from None
    records = []
    for line in raw.split(b"\n"):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


class RunLog:
    """Append-only JSON-lines log: each record is one ``os.write`` of a whole line, then fsync.

    If the file does not end in a newline (a writer was killed mid-line), a newline is written
    first, so the torn line stays alone and ``read_log`` skips it. Safe to call from several
    threads.

    Raises:
        OutputError: the log cannot be opened or written (disk full, permission).
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        try:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            size = os.fstat(self._fd).st_size
            if size:
                with open(self.path, "rb") as fh:
                    fh.seek(size - 1)
                    torn = fh.read(1) != b"\n"
                if torn:
                    os.write(self._fd, b"\n")
        except OSError as exc:
            raise OutputError(f"cannot write the run log {self.path}: {exc.strerror or exc}") from None

    def write(self, record: Mapping[str, Any]) -> None:
        """Append ``record`` as one line and flush it to the disk."""
        data = (json.dumps(record, ensure_ascii=False, separators=(",", ":"), default=str) + "\n").encode()
        with self._lock:
            try:
                written = os.write(self._fd, data)
                if written != len(data):  # a short write to a regular file means the disk is full
                    raise OSError(28, "No space left on device")
                os.fsync(self._fd)
            except OSError as exc:
                raise OutputError(f"cannot write the run log {self.path}: {exc.strerror or exc}") from None

    def close(self) -> None:
        """Close the file; further writes fail."""
        with self._lock, contextlib.suppress(OSError):
            os.close(self._fd)

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------
# What a result depends on, and what is already done


@dataclass(frozen=True)
class ModelOptions:
    """The options that choose a model and how it predicts: ``stuseg.Segmenter``'s arguments as one
    value, for what loads a model somewhere else (``run_local`` here, each actor of a Ray batch).

    The fields mean what the ``Segmenter`` arguments of the same names mean.
    """

    size: str | None = None
    weights: Path | None = None
    device: str = "auto"
    fast: bool = False
    tta: bool = False
    step_size: float = 0.5
    roi_subset: tuple[str, ...] | None = None
    model: str | None = None  # a fine-tuned model: folder or registered name
    folds: tuple[str, ...] | None = None
    checkpoint: str = "final"

    def load(self, threads: int | None = None) -> Any:
        """A ``stuseg.Segmenter`` with these options (loads the network now).

        Raises:
            WeightsError, InputError, LabelError: as ``Segmenter`` does.
        """
        from stuseg.pipeline import Segmenter

        subset = list(self.roi_subset) if self.roi_subset else None
        return Segmenter(
            self.size,
            weights=self.weights,
            device=self.device,
            fast=self.fast,
            tta=self.tta,
            step_size=self.step_size,
            roi_subset=subset,
            model=self.model,
            folds=list(self.folds) if self.folds else None,
            checkpoint=self.checkpoint,
            threads=threads,
        )


@dataclass(frozen=True)
class Settings:
    """The options that decide a batch's results, as recorded in the log and compared on resume.

    ``labels`` are the selected label values (``roi_subset`` resolved), so two spellings of the
    same selection compare equal. The device is recorded but not compared: a result made on the
    CPU counts as done for a later run on a GPU.

    ``names`` are the names of ``labels`` (same order) for a model with its own label table, and
    ``classes`` that model's number of structures; both stay empty (0) for the published table,
    so the published models' records are as before. A model's names are compared too: they
    name its output files.
    """

    size: str
    weights_sha256: str
    fast: bool = False
    tta: bool = False
    step_size: float = 0.5
    labels: tuple[int, ...] = ()
    multilabel: bool = False
    weights: str | None = None
    device: str = ""
    names: tuple[str, ...] = ()
    classes: int = 0
    # What each case's result holds (NIfTI, statistics, preview, DICOM-SEG): not part of the
    # fingerprint (the segmentation does not depend on it), checked apart on resume.
    request: Request = field(default_factory=Request)

    def wanted(self, case: Case) -> list[str]:
        """The outputs this run wants of ``case``, as results record them (``product_tags``): a
        DICOM-SEG only for a DICOM series (a file case gets the rest, the SEG left out with a
        logged reason)."""
        products = [p for p in self.request.products if not PRODUCTS[p].dicom or case.series is not None]
        return product_tags(products, self.request)

    def fingerprint(self) -> dict[str, Any]:
        """The part of the settings that must match for an earlier result to be reused."""
        return {
            "size": self.size,
            "weights_sha256": self.weights_sha256,
            "fast": self.fast,
            "tta": self.tta,
            "step_size": self.step_size,
            "labels": list(self.labels),
            "multilabel": self.multilabel,
        } | ({"names": list(self.names)} if self.names else {})

    def options(self) -> dict[str, Any]:
        """Everything, for the log (``roi_subset``: the names kept, None for all of the model's)."""
        from stuseg.labels import LABELS

        if self.names:
            kept, classes = list(self.names), self.classes or len(self.names)
        else:
            kept, classes = [LABELS[i] for i in self.labels], len(LABELS) - 1
        subset = kept if 0 < len(self.labels) < classes else None
        return {
            "size": self.size,
            "weights": self.weights,
            "fast": self.fast,
            "tta": self.tta,
            "step_size": self.step_size,
            "roi_subset": subset,
            "multilabel": self.multilabel,
            "device": self.device,
            "outputs": list(self.request.products),
        } | ({"dicom_seg_type": self.request.seg_type} if self.request.dicom_seg else {})


def product_tags(products: Sequence[str], request: Request) -> list[str]:
    """How a result records the outputs it holds: the product names, the DICOM-SEG with its
    encoding (``dicom-seg:binary``), so a resume asking for another encoding redoes it."""
    return [f"{p}:{request.seg_type}" if p == "dicom-seg" else p for p in products]


def holds(recorded: Any, wanted: Sequence[str]) -> bool:
    """Whether a result that records ``recorded`` (its ``products``; none recorded: the masks
    only, as results made before outputs were recorded) holds every output ``wanted``."""
    have = set(recorded) if isinstance(recorded, list) else {"nifti"}
    return set(wanted) <= have


def model_table(segmenter: Any) -> tuple[tuple[str, ...], int]:
    """``(names of the selected labels, number of structures)`` of a loaded ``stuseg.Segmenter``
    with its own label table, as its Segmentations name them; ``((), 0)`` for the published table.

    The model's table is the Segmenter's ``names`` (value -> name) where it has one, else its
    plan's default (``class_<value>`` beyond the published class count).
    """
    from stuseg.labels import STRUCTURES
    from stuseg.pipeline import _class_name

    plan = segmenter.plan
    table = {v: _class_name(v, plan, getattr(segmenter, "names", None)) for v in range(1, plan.num_classes)}
    if table == dict(enumerate(STRUCTURES, start=1)):
        return (), 0
    return tuple(table[int(v)] for v in segmenter.keep), len(table)


def settings_of(
    segmenter: Any,
    *,
    multilabel: bool = False,
    weights: Path | None = None,
    request: Request | None = None,
) -> Settings:
    """The ``Settings`` of a loaded ``stuseg.Segmenter`` (its ``weights_sha256`` identifies the
    weights, whatever loaded them)."""
    names, classes = model_table(segmenter)
    return Settings(
        size=segmenter.size,
        weights_sha256=segmenter.weights_sha256,
        request=request or Request(),
        fast=bool(segmenter.fast),
        tta=bool(segmenter.tta),
        step_size=float(segmenter.step_size),
        labels=tuple(int(v) for v in segmenter.keep),
        multilabel=multilabel,
        weights=str(weights) if weights is not None else None,
        device=str(segmenter.device),
        names=names,
        classes=classes,
    )


def case_layout(output: Path, case_id: str, settings: Settings) -> Layout:
    """Where a case's result goes: ``OUTPUT/<id>/`` or ``OUTPUT/<id>.nii.gz`` with its files beside."""
    target = Path(output) / (f"{case_id}.nii.gz" if settings.multilabel else case_id)
    return Layout(target, settings.multilabel, settings.request.products)


def output_paths(output: Path, case_id: str, settings: Settings) -> list[Path]:
    """The paths of a case's result: its folder, or the multilabel file and every file beside it."""
    return case_layout(output, case_id, settings).all_files()


def cases_done(output: Path, cases: Sequence[Case], since: int = 0) -> int:
    """How many of ``cases`` the run log in ``output`` records as done (``ok`` or ``skipped``)
    after byte ``since`` (the log's size when the run began).

    For the line printed after an interruption: the log, not the results the caller received,
    also counts a case whose writing was completed while the batch was being stopped.
    """
    try:
        with open(Path(output) / LOG_NAME, "rb") as fh:
            fh.seek(since)
            tail = fh.read()
    except OSError:
        return 0
    ids = {c.id for c in cases}
    done = set()
    for line in tail.split(b"\n"):
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if isinstance(record, dict) and record.get("case") in ids and record.get("status") != "failed":
                done.add(record["case"])
    return len(done)


def latest_ok(history: Sequence[Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
    """Per case id, its latest ``ok`` record in a run log's ``history``."""
    latest: dict[str, Mapping[str, Any]] = {}
    for record in history:
        if record.get("status") == "ok" and isinstance(record.get("case"), str):
            latest[record["case"]] = record
    return latest


def done_before(
    case: Case, output: Path, settings: Settings, latest: Mapping[str, Mapping[str, Any]]
) -> bool:
    """Whether ``case``'s complete result is in ``output``, made with the same weights and options.

    A folder of masks says so itself: its marker (``.stuseg-run.json``, written before the folder
    was moved into place) records the case's input, the settings' fingerprint and the outputs it
    holds, and lists its files. A multilabel file is judged by the case's latest ``ok`` record in
    the run log (``latest``, from ``latest_ok``): same input and fingerprint, every listed file
    present. A result without an output this run asks for (``Settings.wanted``: statistics, a
    preview, a DICOM-SEG or its encoding) is not done: the case is segmented and written again.
    """
    output = Path(output)
    wanted = settings.wanted(case)
    if settings.multilabel:
        record = latest.get(case.id)
        return bool(
            record is not None
            and record.get("input") == case.source
            and record.get("series") == case.series
            and record.get("fingerprint") == settings.fingerprint()
            and holds(record.get("products"), wanted)
            and isinstance(record.get("outputs"), list)
            and record["outputs"]
            and all((output / rel).is_file() for rel in record["outputs"])
        )
    from stuseg.outputs import MARKER

    try:
        marker = json.loads((output / case.id / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    batch = marker.get("batch") if isinstance(marker, dict) else None
    files = marker.get("files") if isinstance(marker, dict) else None
    return bool(
        isinstance(batch, dict)
        and isinstance(files, list)
        and files
        and batch.get("fingerprint") == settings.fingerprint()
        and batch.get("input") == case.source
        and batch.get("series") == case.series
        and holds(batch.get("products"), wanted)
        and all((output / case.id / f).is_file() for f in files)
    )


# ---------------------------------------------------------------------------------------------
# One case


@dataclass
class CaseResult:
    """How one case went: ``ok`` (written), ``failed`` (``error`` says why) or ``skipped``.

    ``record`` is the case's line in the run log. ``outputs`` are the paths written (for
    ``skipped``, the earlier result's).
    """

    case: Case | None
    status: Status
    outputs: list[Path] = field(default_factory=list)
    error: str | None = None
    record: dict[str, Any] = field(default_factory=dict)

    @property
    def warnings(self) -> list[str]:
        """The warnings the case raised (unusual input), as logged."""
        return list(self.record.get("warnings") or [])


def one_line(exc: BaseException) -> str:
    """A one-line reason for a failed case: a ``StusegError``'s message, else the exception named
    (a bug as ``internal error: ...``, its traceback in the record's ``traceback``)."""
    if crash.is_internal(exc):
        return f"internal error: {crash.summary(exc)} (its traceback is in the run log)"
    if isinstance(exc, StusegError):
        text = str(exc)
    elif isinstance(exc, MemoryError):
        text = "ran out of memory (RAM) for this case; run it alone, or with --fast"
    elif isinstance(exc, OSError):
        text = f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else "")
    else:
        text = f"{type(exc).__name__}: {exc}"
    return " ".join(text.split()) or type(exc).__name__


def failure(exc: BaseException) -> tuple[str, str]:
    """A failed case's one-line reason (``one_line``) and its traceback, kept in the run log."""
    return one_line(exc), crash.traceback_text(exc)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class _Recorder:
    """Builds the run-log records of one batch run."""

    def __init__(self, settings: Settings, output: Path, run_id: str) -> None:
        from stuseg import __version__

        self.settings = settings
        self.output = Path(output)
        self.run_id = run_id
        self.version = __version__
        self.host = socket.gethostname()

    def record(
        self,
        case: Case | None,
        status: Status,
        *,
        outputs: Sequence[Path] = (),
        products: Sequence[str] = (),
        error: str | None = None,
        traceback: str | None = None,
        reason: str | None = None,
        input_path: Path | None = None,
        geometry: Mapping[str, Any] | None = None,
        seconds: Mapping[str, float] | None = None,
        wall: float | None = None,
        peak_rss: int | None = None,
        peak_gpu: int | None = None,
        device: str | None = None,
        warnings_: Sequence[str] = (),
        worker: str | None = None,
    ) -> dict[str, Any]:
        s = self.settings
        rec: dict[str, Any] = {
            "case": case.id if case is not None else None,
            "input": case.source if case is not None else str(_resolved(input_path or Path("."))),
            "series": case.series if case is not None else None,
            "status": status,
            "error": error,
        }
        if traceback is not None:  # a bug: what its report needs, kept with the case
            rec["traceback"] = traceback
        if reason is not None:
            rec["reason"] = reason
        rec["outputs"] = [p.relative_to(self.output).as_posix() for p in outputs]
        if products:
            rec["products"] = list(products)
        rec.update(geometry or {"shape": None, "spacing": None})
        rec["seconds"] = {k: round(float(v), 3) for k, v in (seconds or {}).items()}
        rec["wall_seconds"] = round(wall, 3) if wall is not None else None
        rec["peak_rss_bytes"] = peak_rss
        rec["peak_gpu_bytes"] = peak_gpu
        rec["size"] = s.size
        rec["weights_sha256"] = s.weights_sha256
        rec["stuseg_version"] = self.version
        rec["options"] = s.options() | ({"device": device} if device else {})
        rec["fingerprint"] = s.fingerprint()
        rec["warnings"] = list(warnings_)
        rec["run"] = self.run_id
        rec["host"] = worker or self.host
        rec["time"] = _now()
        return rec


def _geometry(header: Any) -> dict[str, Any]:
    """Input shape and spacing (mm) from a NIfTI header, for the log."""
    shape = [int(n) for n in header.get_data_shape()[:3]]
    spacing = [round(float(z), 6) for z in header.get_zooms()[:3]]
    return {"shape": shape, "spacing": spacing}


def write_case(
    seg: Any,
    case: Case,
    output: Path,
    settings: Settings,
    *,
    sources: Sources | None = None,
    overwrite: bool = False,
    run_id: str = "",
) -> tuple[list[Path], list[str]]:
    """Write one case's result into ``output`` through ``stuseg.results.write_result``, so that it
    is what ``stuseg predict`` writes for the same scan, and appears whole or not at all.

    A mask folder's marker records the case's input, the settings' fingerprint and the outputs
    it holds (what ``done_before`` reads).

    Returns:
        The paths written (the case folder, or the multilabel file and the files beside it), and
        the outputs the result holds (``product_tags``).

    Raises:
        OutputError: the case's output is unsafe (e.g. a folder of the user's own files, without
            ``overwrite``) or cannot be written (disk full); nothing of it was written then.
    """
    layout = case_layout(output, case.id, settings)
    layout.check([case.input, *case.channels], overwrite=overwrite)
    products = settings.wanted(case)
    run = {
        "command": "batch",
        "options": settings.options(),
        "inputs": [case.source],
        "batch": {
            "case": case.id,
            "input": case.source,
            "series": case.series,
            "fingerprint": settings.fingerprint(),
            "products": products,
            "run": run_id,
        },
    }
    written = write_result(layout, seg, settings.request, sources, run=run)
    return written.paths, products


# ---------------------------------------------------------------------------------------------
# Many cases on one machine, stages overlapped


def split_threads(total: int, device_type: str) -> tuple[int, int, int]:
    """CPU threads for the (read + preprocess, network, back to the grid + write) stages.

    On the CPU the network is most of the work (over 85% of a case's CPU time for the small
    model, benchmarks/RESULTS.md), so it keeps every CPU, and the two other stages, which run
    beside it in short bursts, get a quarter each (at least one): they borrow a little of the
    network's time instead of doubling the number of runnable threads. On a GPU the CPU stages
    are what the device waits for, so they get half of the CPUs each.

    Args:
        total: the CPUs the process may use (``stuseg.threads.available_cpus()``).
        device_type: ``"cpu"``, ``"cuda"`` or ``"mps"``.

    Returns:
        (read threads, network threads, write threads).
    """
    total = max(1, int(total))
    side = max(1, total // 4) if device_type == "cpu" else max(1, total // 2)
    return side, total, side


class _Warnings:
    """Collects the warnings raised while one case is worked on, per thread, for its log record."""

    def __init__(self) -> None:
        self._local = threading.local()
        self._previous: Callable[..., Any] | None = None

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("always")
            self._previous = warnings.showwarning
            warnings.showwarning = self._show
            yield

    def _show(
        self, message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None
    ) -> None:
        target = getattr(self._local, "target", None)
        if target is not None:
            target.append(" ".join(str(message).split()))
        elif self._previous is not None:  # not from a case: shown as usual
            self._previous(message, category, filename, lineno, file, line)

    @contextlib.contextmanager
    def to(self, target: list[str]) -> Iterator[None]:
        self._local.target = target
        try:
            yield
        finally:
            self._local.target = None


def _dicom_headers(case: Case, request: Request) -> tuple[Any, str | None]:
    """The headers a SEG or RTSTRUCT of the series ``case`` references, or (None, why not):
    headers that cannot be referenced (e.g. blanked UIDs) leave those outputs out, not the case."""
    try:
        return dicom_source(case.input, case.series, output=request.dicom_products[0]), None
    except InputError as exc:
        return None, str(exc)


@dataclass
class CaseJob:
    """One case on its way: read and preprocessed (``read``), through the network (``infer``),
    back on its grid, written and recorded (``finish``). The local runner runs the three stages
    in three threads across cases; a Ray worker runs them in turn (``process``). A failure in any
    stage is kept (its one-line reason and traceback) and the later stages pass it on, so the
    case ends as one ``failed`` record."""

    case: Case
    started: float = field(default_factory=time.perf_counter)
    prepared: Any = None
    inferred: Any = None
    sources: Sources | None = None
    error: str | None = None
    traceback: str | None = None
    geometry: dict[str, Any] | None = None
    warnings: list[str] = field(default_factory=list)
    voxels: int | None = None

    def fail(self, exc: BaseException) -> None:
        self.error, self.traceback = failure(exc)

    def read(self, segmenter: Any, settings: Settings, threads: int | None = None) -> None:
        """Read and preprocess the case; with statistics or a preview, keep its CT volume; for a
        DICOM-SEG or RTSTRUCT of a DICOM series, read the headers they will reference."""
        request, case = settings.request, self.case
        try:
            images: Any = case.images
            volume = None
            if request.needs_ct:
                volume, _ = read_ct(case.input, case.series)
                images = [volume, *case.channels] if case.channels else volume
            self.sources = Sources(ct=volume, mode=mode_name(settings.fast, settings.tta))
            if request.needs_dicom and case.series:
                self.sources.dicom, self.sources.dicom_problem = _dicom_headers(case, request)
            self.prepared = segmenter.prepare(images, series=case.series, threads=threads)
            self.geometry = _geometry(self.prepared.header)
            self.voxels = self.prepared.geometry.voxels
        except Exception as exc:
            self.fail(exc)

    def infer(self, segmenter: Any, progress: Callable[[Case, int, int], None] | None = None) -> None:
        """The network on the prepared case (dropped afterwards)."""
        if self.error is None:
            try:
                tiles = (lambda d, t, c=self.case: progress(c, d, t)) if progress else None
                self.inferred = segmenter.infer(self.prepared, progress=tiles)
            except Exception as exc:
                self.fail(exc)
                _free_device(segmenter)
        self.prepared = None

    def finish(
        self,
        segmenter: Any,
        output: Path,
        recorder: _Recorder,
        *,
        overwrite: bool,
        threads: int | None = None,
        worker: str | None = None,
    ) -> CaseResult:
        """Back to the input grid, ``write_case`` (``threads`` writers), and the case's log record."""
        paths: list[Path] = []
        products: list[str] = []
        seg = None
        if self.error is None:
            try:
                if self.sources is not None:
                    self.sources.threads = threads
                seg = segmenter.finish(self.inferred)
                self.inferred = None
                paths, products = write_case(
                    seg,
                    self.case,
                    output,
                    recorder.settings,
                    sources=self.sources,
                    overwrite=overwrite,
                    run_id=recorder.run_id,
                )
            except Exception as exc:
                self.fail(exc)
                paths, products = [], []
            finally:
                self.inferred = self.sources = None
                memory.release_free_memory(self.voxels)
        status: Status = "ok" if self.error is None else "failed"
        rec = recorder.record(
            self.case,
            status,
            outputs=paths,
            products=products,
            error=self.error,
            traceback=self.traceback,
            geometry=self.geometry,
            seconds=seg.timings if seg is not None else None,
            wall=time.perf_counter() - self.started,
            peak_rss=seg.peak_rss_bytes if seg is not None else memory.peak_rss_bytes(),
            peak_gpu=seg.peak_gpu_bytes if seg is not None else None,
            device=seg.device if seg is not None else str(segmenter.device),
            warnings_=self.warnings,
            worker=worker,
        )
        return CaseResult(self.case, status, paths, self.error, rec)


def process(
    case: Case,
    segmenter: Any,
    output: Path,
    recorder: _Recorder,
    *,
    overwrite: bool = False,
    threads: int | None = None,
    network: contextlib.AbstractContextManager[Any] | None = None,
    worker: str | None = None,
) -> CaseResult:
    """One case from start to end in the calling thread (read, network, write, record): what a
    Ray worker does with each case it is given. ``network`` is held around the network stage
    (a lock, when several cases share one model). Warnings are kept in the record."""
    job = CaseJob(case)
    sink = _Warnings()
    read_threads, _, write_threads = split_threads(threads or _available_cpus(), segmenter.device.type)
    with sink.installed(), sink.to(job.warnings):
        job.read(segmenter, recorder.settings, threads=read_threads)
        with network or contextlib.nullcontext():
            job.infer(segmenter)
        return job.finish(
            segmenter, output, recorder, overwrite=overwrite, threads=write_threads, worker=worker
        )


_END = object()  # closes a queue


class _Fatal(StusegError):
    """A stage thread died of a bug: the batch stops (finished cases stay done)."""


def run(
    cases: Iterable[Case],
    segmenter: Any,
    output: str | os.PathLike[str],
    *,
    multilabel: bool = False,
    overwrite: bool = False,
    weights: Path | None = None,
    request: Request | None = None,
    ignored: Sequence[Ignored] = (),
    progress: Callable[[Case, int, int], None] | None = None,
    threads: int | None = None,
) -> Iterator[CaseResult]:
    """Segment ``cases`` with a loaded ``stuseg.Segmenter``, stages overlapped; yield each result.

    Three threads: the next case is read and preprocessed, the current one goes through the
    network (in the calling thread), and the previous one is brought back to its input grid and
    written, all at once. Queues of one item between them bound the memory to about one case per
    stage. Cases done before with the same weights and options (see ``done_before``) are yielded
    as ``skipped`` first, unless ``overwrite``. Every result is appended to
    ``OUTPUT/stuseg-batch.jsonl`` (see ``RunLog``) before it is yielded, with the objects in
    ``ignored`` first. A case that fails (unreadable input, GPU out of memory, disk full) is
    logged as ``failed`` with a one-line reason and its traceback, leaves no output, and the
    batch goes on.

    The weights are identified by ``segmenter.weights_sha256``, the same whatever loaded them, so
    a batch begun here resumes from the command line, and the reverse.

    Stopping the iteration (``break``, Ctrl-C in the calling thread) stops the batch: the case in
    the network is dropped, a case being written is finished (its output is whole), the others
    are not started. Use ``contextlib.closing`` to have that happen at once.

    Warnings raised for a case are recorded in its log record rather than shown; while the batch
    runs, Python's warning filters are set to show every warning (restored afterwards).

    Args:
        cases: from ``discover``; ids must be unique.
        segmenter: a ``stuseg.Segmenter``.
        output: the batch folder (created if missing; its parent must exist).
        multilabel: write ``<id>.nii.gz`` multilabel files instead of mask folders.
        overwrite: redo cases already done, and replace case outputs stuseg did not write.
        weights: the weights file, recorded in the log's options.
        request: what each case's result holds (``stuseg.results.Request``: masks, statistics,
            preview, DICOM-SEG), written as ``stuseg predict`` writes it; default the masks.
        ignored: objects ``discover`` passed over, logged as ``skipped`` with their reason.
        progress: ``progress(case, tiles_done, tiles_total)`` from the network stage.
        threads: CPUs to share between the stages (default ``segmenter.threads``); see
            ``split_threads``.

    Yields:
        One ``CaseResult`` per case as it finishes (skipped ones first), then stops.

    Raises:
        OutputError: the run log cannot be written (the batch stops; finished cases stay).
        stuseg.locks.BusyError: another run is writing into ``output`` (one run per folder;
            refused before any work, see ``stuseg.locks``).
        InputError: two cases share an id, or the request writes nothing.
    """
    settings = settings_of(segmenter, multilabel=multilabel, weights=weights, request=request)
    with locks.hold(output):  # a second run into this folder is refused here, before any work
        cases, output = _begin(cases, output, settings)
        recorder = _Recorder(settings, output, uuid4_hex())
        total = threads or int(getattr(segmenter, "threads", 0) or 0) or _available_cpus()
        with RunLog(output / LOG_NAME) as log:
            todo = yield from skip_done(cases, output, recorder, log, overwrite=overwrite, ignored=ignored)
            if todo:
                yield from _overlapped(todo, segmenter, output, recorder, log, overwrite, progress, total)


def _begin(
    cases: Iterable[Case], output: str | os.PathLike[str], settings: Settings
) -> tuple[list[Case], Path]:
    """The cases as a list (ids checked unique) and the batch folder (created)."""
    from stuseg.results import check_request

    check_request(settings.request)
    cases = list(cases)
    ids = [c.id.casefold() for c in cases]
    if len(set(ids)) != len(ids):
        raise InputError("two cases have the same id; make them unique (discover() does)")
    output = Path(output)
    try:
        output.mkdir(exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create the batch folder {output}: {exc.strerror or exc}") from None
    return cases, output


def skip_done(
    cases: Sequence[Case],
    output: Path,
    recorder: _Recorder,
    log: RunLog,
    *,
    overwrite: bool,
    ignored: Sequence[Ignored] = (),
) -> Generator[CaseResult, None, list[Case]]:
    """Log the ``ignored`` objects, then log and yield each case done before as ``skipped``;
    return the cases still to do (every case with ``overwrite``). Local and Ray runs alike."""
    settings = recorder.settings
    latest = latest_ok(read_log(output / LOG_NAME))
    for item in ignored:
        log.write(recorder.record(None, "skipped", reason=item.reason, input_path=item.path))
    todo: list[Case] = []
    for case in cases:
        if overwrite or not done_before(case, output, settings, latest):
            todo.append(case)
            continue
        paths = output_paths(output, case.id, settings)
        reason = "done before with the same weights and options"
        rec = recorder.record(case, "skipped", outputs=paths, reason=reason)
        log.write(rec)
        yield CaseResult(case, "skipped", paths, None, rec)
    return todo


def _overlapped(
    todo: Sequence[Case],
    segmenter: Any,
    output: Path,
    recorder: _Recorder,
    log: RunLog,
    overwrite: bool,
    progress: Callable[[Case, int, int], None] | None,
    total: int,
) -> Iterator[CaseResult]:
    """The three stages of ``CaseJob`` in three threads joined by queues of one item."""
    read_threads, _, write_threads = split_threads(total, segmenter.device.type)
    sink = _Warnings()
    stop = threading.Event()
    fatal: list[BaseException] = []
    prepared_q: queue.Queue[Any] = queue.Queue(maxsize=1)
    inferred_q: queue.Queue[Any] = queue.Queue(maxsize=1)
    results: queue.Queue[CaseResult] = queue.Queue()
    put, get = _queue_ops(stop)

    def read_stage() -> None:
        for case in todo:
            if stop.is_set():
                return
            job = CaseJob(case)
            with sink.to(job.warnings):
                job.read(segmenter, recorder.settings, threads=read_threads)
            if not put(prepared_q, job):
                return
        put(prepared_q, _END)

    def write_stage() -> None:
        while (job := get(inferred_q)) is not _END:
            with sink.to(job.warnings):
                result = job.finish(segmenter, output, recorder, overwrite=overwrite, threads=write_threads)
            log.write(result.record)
            results.put(result)

    def drain() -> Iterator[CaseResult]:
        while True:
            try:
                yield results.get_nowait()
            except queue.Empty:
                break
        if fatal:
            raise _fatal_error(fatal[0])

    reader = threading.Thread(target=_guarded(read_stage, fatal, stop), name="stuseg-batch-read", daemon=True)
    writer = threading.Thread(
        target=_guarded(write_stage, fatal, stop), name="stuseg-batch-write", daemon=True
    )
    with sink.installed():
        try:
            reader.start()
            writer.start()
            while (job := get(prepared_q)) is not _END:
                yield from drain()
                with sink.to(job.warnings):
                    job.infer(segmenter, progress)
                if not put(inferred_q, job):
                    break
                yield from drain()
            put(inferred_q, _END)
            while writer.is_alive():
                writer.join(timeout=0.1)
                yield from drain()
            yield from drain()
        finally:
            # Ctrl-C, a closed iterator or a fatal error: no new work; a case being written is
            # finished (its output appears whole) before returning, the others are dropped.
            stop.set()
            writer.join()
            reader.join(timeout=0.1)  # reading has no side effects; it ends after its case


def _queue_ops(
    stop: threading.Event,
) -> tuple[Callable[[queue.Queue[Any], Any], bool], Callable[[queue.Queue[Any]], Any]]:
    """``put`` and ``get`` that give up once ``stop`` is set (``put`` -> False, ``get`` -> _END)."""

    def put(q: queue.Queue[Any], item: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def get(q: queue.Queue[Any]) -> Any:
        while not stop.is_set():
            try:
                return q.get(timeout=0.1)
            except queue.Empty:
                continue
        return _END

    return put, get


def _guarded(
    body: Callable[[], None], fatal: list[BaseException], stop: threading.Event
) -> Callable[[], None]:
    """``body`` for a stage thread: whatever escapes it (a bug, the log failing) stops everything."""

    def target() -> None:
        try:
            body()
        except BaseException as exc:
            fatal.append(exc)
            stop.set()

    return target


def _fatal_error(exc: BaseException) -> BaseException:
    if isinstance(exc, StusegError):
        return exc
    if crash.is_internal(exc):
        path = crash.report(exc)
        where = f"; please report it with the file {path}" if path else ""
        return _Fatal(
            f"the batch stopped on an internal error ({crash.summary(exc)}); finished cases are kept{where}"
        )
    return _Fatal(f"the batch stopped on an unexpected error ({one_line(exc)}); finished cases are kept")


def _free_device(segmenter: Any) -> None:
    """After a failure on a GPU (out of memory), hand its cached blocks back for the next case."""
    if getattr(segmenter.device, "type", "cpu") == "cuda":
        import torch

        torch.cuda.empty_cache()


def _available_cpus() -> int:
    from stuseg.threads import available_cpus

    return available_cpus()


def uuid4_hex() -> str:
    """A fresh random id for a batch run."""
    import uuid

    return uuid.uuid4().hex


def check_batch_output(output: Path, inputs: Sequence[Path], *, overwrite: bool = False) -> None:
    """Refuse a batch folder that cannot be written safely, before any work.

    Refused: what ``stuseg.outputs.check_output`` refuses for a folder (an output equal to,
    inside or containing an input, the current or home folder, a file, a missing or read-only
    parent); and, unless ``overwrite``, an existing folder that holds files but no run log of an
    earlier batch (a folder of the user's own files). Each case's own output is checked again
    when it is written.

    Args:
        output: the batch folder.
        inputs: every input of the batch (the cases' inputs, the weights file).
        overwrite: allow writing into a folder of other files.

    Raises:
        OutputError: one line saying what to do instead.
    """
    from stuseg.outputs import check_output

    check_output(output, inputs=inputs, kind="folder", overwrite=True)
    output = Path(output)
    if overwrite or not output.is_dir() or (output / LOG_NAME).exists():
        return
    others = sorted(e.name for e in output.iterdir() if not e.name.startswith(".stuseg-"))
    if others:
        raise OutputError(
            f"the folder {output} holds files ({others[0]}{' ...' if len(others) > 1 else ''}) but is not "
            f"the folder of an earlier batch (no {LOG_NAME}); give a new or empty folder, or add --overwrite"
        )


def run_local(
    cases: Sequence[Case],
    output: Path,
    options: ModelOptions | None = None,
    *,
    multilabel: bool = False,
    overwrite: bool = False,
    request: Request | None = None,
    ignored: Sequence[Ignored] = (),
    progress: Callable[[Case, int, int], None] | None = None,
) -> Iterator[CaseResult]:
    """Load the model once (now), then return ``run``'s iterator over the cases' results.

    Args:
        cases: from ``discover``.
        output: the batch folder.
        options: the model and its options (default: ``ModelOptions()``).
        multilabel, overwrite, request, ignored, progress: as for ``run``.

    Raises:
        WeightsError, InputError, LabelError: the model or an option cannot be used; raised here,
            before any case is started.
    """
    options = options or ModelOptions()
    segmenter = options.load()
    return run(
        cases,
        segmenter,
        output,
        multilabel=multilabel,
        overwrite=overwrite,
        weights=options.weights,
        request=request,
        ignored=ignored,
        progress=progress,
    )


# ---------------------------------------------------------------------------------------------
# Interruptions


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM during a batch; ``signum`` says which."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def signals_interrupt() -> Iterator[None]:
    """Turn the first SIGINT or SIGTERM into ``Interrupted`` in the main thread; exit at the second.

    The first signal unwinds the batch cleanly (the case in flight is dropped and its staged
    output deleted); a second one, while that happens, ends the process at once with status
    128 + signal number (staged leftovers are then removed by the next run). For programs that
    exist to run a batch (the command line): it replaces the handlers while the block runs.
    """
    import signal

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    seen: list[int] = []

    def handler(signum: int, frame: Any) -> None:
        if seen:
            os._exit(128 + signum)
        seen.append(signum)
        raise Interrupted(signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
