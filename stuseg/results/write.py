"""A result on disk: where every output of one scan goes, the checks before any work, one writer.

``predict``, the local batch and the Ray workers all write through here, so a scan's result is
the same files whoever made it:

- ``Request``: what to write (NIfTI masks or the ``--ml`` file, statistics, preview, DICOM-SEG,
  RTSTRUCT).
- ``Layout``: where each of those goes for one scan: inside a mask folder (``statistics.json``,
  ``statistics.csv``, ``preview.png``, ``seg.dcm``, ``rtstruct.dcm``, the run marker
  ``.stuseg-run.json``), or beside a multilabel file ``OUT.nii.gz`` (``OUT.json``,
  ``OUT.itksnap.txt``, ``OUT.ctbl``, ``OUT.statistics.json``, ``OUT.statistics.csv``,
  ``OUT.preview.png``, ``OUT.dcm``, ``OUT_rtstruct.dcm``; the suffix
  is matched in any letter case). ``Layout.check`` refuses, before any work, what cannot be
  written safely (``stuseg.results.outputs.check_output``: the output against the inputs, files stuseg
  did not write, an existing stuseg document of another kind, ``overwrite``).
- ``write_result``: every requested output of one scan, staged and moved into place together
  (``stuseg.results.outputs.staged_folder`` / ``staged_files``): all of them appear, or none.

Each output type is one entry of ``PRODUCTS`` (its file names, its writer, the document kind it
holds): a new one is added there.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stuseg.errors import InputError, OutputError, StusegWarning
from stuseg.images import paths
from stuseg.results import outputs

__all__ = [
    "PRODUCTS",
    "Layout",
    "Product",
    "Request",
    "Sources",
    "Written",
    "check_request",
    "dicom_source",
    "mode_name",
    "read_ct",
    "write_result",
]

SEG_TYPES = ("binary", "labelmap")


@dataclass(frozen=True)
class Request:
    """What to write for a scan (``predict``'s and ``batch``'s output options).

    ``nifti``: the masks (or, with ``multilabel``, the ``--ml`` file and its label files);
    ``statistics``: ``statistics.json`` and ``.csv``; ``preview``: ``preview.png``;
    ``dicom_seg``: a DICOM Segmentation (needs a DICOM series as input), encoded as ``seg_type``
    with ``codes`` (structure name -> SNOMED CT codes) before the package's table;
    ``rtstruct``: an RT Structure Set (contours; needs a DICOM series as input).
    """

    nifti: bool = True
    statistics: bool = False
    preview: bool = False
    dicom_seg: bool = False
    rtstruct: bool = False
    seg_type: str = "binary"
    codes: Mapping[str, Any] | None = field(default=None, compare=False)

    @property
    def products(self) -> tuple[str, ...]:
        """The names of the requested outputs, in ``PRODUCTS`` order."""
        wanted = {
            "nifti": self.nifti,
            "statistics": self.statistics,
            "preview": self.preview,
            "dicom-seg": self.dicom_seg,
            "rtstruct": self.rtstruct,
        }
        return tuple(name for name in PRODUCTS if wanted.get(name))

    @property
    def needs_dicom(self) -> bool:
        """Whether an output is a DICOM object referencing the input series (DICOM-SEG, RTSTRUCT)."""
        return any(PRODUCTS[p].dicom for p in self.products)

    @property
    def dicom_products(self) -> tuple[str, ...]:
        """The requested outputs that reference the input series (``dicom-seg``, ``rtstruct``)."""
        return tuple(p for p in self.products if PRODUCTS[p].dicom)

    @property
    def needs_ct(self) -> bool:
        """Whether an output needs the CT's intensities (statistics, preview)."""
        return self.statistics or self.preview


def check_request(request: Request) -> None:
    """Refuse a request that writes nothing or names an unknown SEG encoding.

    Raises:
        InputError: the one-line reason.
    """
    if not request.products:
        raise InputError("nothing to write: ask for --output-type nifti, dicom-seg and/or rtstruct")
    if request.seg_type not in SEG_TYPES:
        raise InputError(f"--dicom-seg-type must be one of {', '.join(SEG_TYPES)}, not {request.seg_type!r}")


def mode_name(fast: bool, tta: bool) -> str:
    """How a result was predicted, as statistics and cohort tables record it: ``normal``,
    ``fast``, ``normal+tta`` or ``fast+tta``."""
    return ("fast" if fast else "normal") + ("+tta" if tta else "")


@dataclass
class Sources:
    """What the writers need besides the segmentation: the CT's intensities (a ``Volume`` on the
    segmentation's grid, for statistics and preview), the DICOM series a SEG references (from
    ``stuseg.results.dicomseg.read_dicom_source``), and how the result was predicted (``mode_name``).
    ``dicom_problem``: why a DICOM series' headers cannot be referenced (``read_dicom_source``'s
    error; its SEG and RTSTRUCT are then left out with that reason)."""

    ct: Any = None
    dicom: Any = None
    dicom_problem: str | None = None
    mode: str = "normal"
    threads: int | None = None


@dataclass
class Written:
    """What ``write_result`` wrote: the final paths (a mask folder counts as one), the
    ``Statistics`` when asked for, and the outputs left out with the reason (also warned)."""

    paths: list[Path] = field(default_factory=list)
    statistics: Any = None
    left_out: dict[str, str] = field(default_factory=dict)
    products: tuple[str, ...] = ()


def read_ct(image: str | Path, series: str | None = None) -> tuple[Any, float]:
    """The CT as a ``stuseg.images.io.Volume`` (its intensities for statistics and preview; pass it to
    the segmenter so it is read once) and the seconds reading took."""
    from stuseg.images.io import read_image

    start = time.perf_counter()
    volume = read_image(Path(image), series=series)
    return volume, time.perf_counter() - start


def dicom_source(image: str | Path, series: str | None = None, *, output: str = "dicom-seg") -> Any:
    """The DICOM series a SEG or RTSTRUCT of ``image`` references
    (``stuseg.results.dicomseg.read_dicom_source``; ``output``, the ``--output-type`` named in its errors).

    Raises:
        InputError: ``image`` is no DICOM series folder, or its headers cannot be referenced.
        StusegError: the ``stuseg[dicom]`` extra is not installed.
    """
    from stuseg.results.dicomseg import read_dicom_source

    return read_dicom_source(Path(image), series, output=output)


# ---------------------------------------------------------------------------------------------
# The output types: where each goes, what writes it


def _nifti_paths(target: Path, multilabel: bool) -> list[Path]:
    from stuseg.results.labelmaps import multilabel_paths

    return multilabel_paths(target) if multilabel else []  # masks: the folder's own files


def _beside(name: str, suffix: str) -> Callable[[Path, bool], list[Path]]:
    """``<folder>/<name><suffix>`` in a mask folder, ``<stem>.<name><suffix>`` beside ``--ml``."""

    def where(target: Path, multilabel: bool) -> list[Path]:
        if multilabel:
            return [target.with_name(f"{paths.stem(target)}.{name}{suffix}")]
        return [target / f"{name}{suffix}"]

    return where


def _statistics_paths(target: Path, multilabel: bool) -> list[Path]:
    return [
        *_beside("statistics", ".json")(target, multilabel),
        *_beside("statistics", ".csv")(target, multilabel),
    ]


def _seg_paths(target: Path, multilabel: bool) -> list[Path]:
    return [target.with_name(paths.stem(target) + ".dcm")] if multilabel else [target / "seg.dcm"]


def _write_nifti(seg: Any, files: list[Path], folder: Path | None, src: Sources, request: Request) -> None:
    from stuseg.results import labelmaps

    if folder is not None:
        labelmaps.write_masks(folder, seg.labels, seg.image.header, seg.names, threads=src.threads)
    else:
        labelmaps.write_multilabel(files, seg.labels, seg.image.header, seg.names, numbering="model")


def _write_statistics(
    seg: Any, files: list[Path], folder: Path | None, src: Sources, request: Request
) -> Any:
    from stuseg.analysis import statistics

    affine = seg.image.header.get_best_affine()
    stats = statistics.compute(
        seg.labels,
        affine,
        src.ct.data,
        seg.names,
        size=seg.size,
        mode=src.mode,
        cleanup=seg.cleanup,
        precision=seg.precision,
        confidence=seg.confidence,
    )
    statistics.write_statistics(stats, files[0], files[1])
    return stats


def _write_preview(seg: Any, files: list[Path], folder: Path | None, src: Sources, request: Request) -> None:
    from stuseg.analysis.preview import write_preview

    write_preview(seg.labels, seg.image.header.get_best_affine(), src.ct.data, seg.names, files[0])


def _write_seg(seg: Any, files: list[Path], folder: Path | None, src: Sources, request: Request) -> None:
    from stuseg.results.dicomseg import write_dicom_seg

    write_dicom_seg(
        seg.image,
        seg.names,
        src.dicom,
        files[0],
        algorithm=f"STU-Net {seg.size}",
        codes=request.codes,
        seg_type=request.seg_type,
    )


def _rtstruct_paths(target: Path, multilabel: bool) -> list[Path]:
    from stuseg.results.rtstruct import rtstruct_path_for

    return [rtstruct_path_for(target, multilabel)]


def _write_rtstruct(seg: Any, files: list[Path], folder: Path | None, src: Sources, request: Request) -> None:
    from stuseg.results import rtstruct

    rtstruct.write_rtstruct(seg.image, seg.names, src.dicom, files[0], algorithm=f"STU-Net {seg.size}")


@dataclass(frozen=True)
class Product:
    """One output type: where its files go (``place(target, multilabel)``), what writes them
    (``write(seg, files, mask folder or None, sources, request)``, into staged paths), the
    stuseg document kind of its first file (compared before replacing one), its timing name,
    and, for a DICOM object (``dicom``: what people call it), that it needs a DICOM series as
    input and at least one structure (else it is left out, with the reason)."""

    place: Callable[[Path, bool], list[Path]]
    write: Callable[..., Any]
    document: str | None = None
    stage: str = ""
    dicom: str | None = None


PRODUCTS: dict[str, Product] = {
    "nifti": Product(_nifti_paths, _write_nifti, "stuseg-labels", "write"),
    "statistics": Product(_statistics_paths, _write_statistics, "stuseg-statistics", "statistics"),
    "preview": Product(_beside("preview", ".png"), _write_preview, None, "preview"),
    "dicom-seg": Product(_seg_paths, _write_seg, None, "dicom-seg", dicom="DICOM-SEG"),
    "rtstruct": Product(_rtstruct_paths, _write_rtstruct, None, "rtstruct", dicom="RTSTRUCT"),
}


# ---------------------------------------------------------------------------------------------
# Where one result goes


@dataclass(frozen=True)
class Layout:
    """Where the outputs of one scan go: a mask folder, or (``multilabel``) a ``.nii.gz`` file
    with everything else beside it. ``products`` are the outputs written (``Request.products``)."""

    target: str | Path  # as the user gave it (an empty name is refused by ``check``)
    multilabel: bool
    products: tuple[str, ...] = ("nifti",)

    def files(self) -> dict[str, list[Path]]:
        """Each product's final files (for the masks of a folder: none listed, the folder holds them)."""
        return {name: PRODUCTS[name].place(Path(self.target), self.multilabel) for name in self.products}

    def all_files(self) -> list[Path]:
        """Every file of the result beside a multilabel file; ``[folder]`` for a mask folder."""
        if not self.multilabel:
            return [Path(self.target)]
        return [p for files in self.files().values() for p in files]

    def locked(self, *, enclosing: bool = True) -> AbstractContextManager[None]:
        """Hold the lock of this result (``stuseg.results.locks.hold``) while the block runs: take it
        before ``check`` and keep it until ``write_result`` is done. ``enclosing``: also refuse it
        while another run holds a folder it lies in (``False`` for a batch's own cases).

        Raises:
            stuseg.results.locks.BusyError: another run is writing this result.
        """
        from stuseg.results import locks

        return locks.hold(self.target, enclosing=enclosing)

    def check(self, inputs: Sequence[str | Path], *, overwrite: bool = False) -> None:
        """Refuse, before any work, a result that cannot be written safely.

        A mask folder: as ``stuseg.results.labelmaps.check_mask_folder_output`` (a folder of the user's
        files is refused). A multilabel file: the file and its label files as
        ``check_multilabel_output``, and every other output beside it as
        ``stuseg.results.outputs.check_output``; those (a PNG, a CSV, a DICOM file) carry no signature of
        their own and count as stuseg's when the multilabel file is. An existing stuseg document
        of another kind (a label table where statistics go, or the reverse) is refused unless
        ``overwrite``.

        Raises:
            OutputError: the one-line reason.
        """
        from stuseg.results import labelmaps

        if not self.multilabel:
            labelmaps.check_mask_folder_output(self.target, inputs=inputs, overwrite=overwrite)  # type: ignore[arg-type]
            return
        labelmaps.check_multilabel_output(self.target, inputs=inputs, overwrite=overwrite)  # type: ignore[arg-type]
        target = Path(self.target)
        ours = target.is_file() and outputs.written_by_stuseg(target)
        for name, files in self.files().items():
            if name == "nifti":
                continue
            for n, path in enumerate(files):
                document = PRODUCTS[name].document if n == 0 else None
                outputs.check_output(
                    path, inputs=inputs, kind="file", overwrite=overwrite or ours, document=document
                )


# ---------------------------------------------------------------------------------------------
# The one writer


def _left_out(layout: Layout, seg: Any, src: Sources) -> dict[str, str]:
    """Outputs that cannot be made for this scan, with the reason (warned)."""
    reasons = {}
    for name in layout.products:
        what = PRODUCTS[name].dicom
        if what is None:
            continue
        if src.dicom is None:
            why = src.dicom_problem or "the input is not a DICOM series"
            reasons[name] = f"no {what} was written: {why}"
        elif not seg.labels.any():
            reasons[name] = (
                f"no structure was found, so no {what} was written (it needs at least one segment)"
            )
    if any(p in layout.products for p in ("statistics", "preview")) and src.ct is None:
        raise InputError("statistics and preview need the CT's intensities: pass Sources(ct=volume)")
    return reasons


def write_result(
    layout: Layout,
    seg: Any,
    request: Request,
    sources: Sources | None = None,
    *,
    run: Mapping[str, Any] | None = None,
) -> Written:
    """Write every requested output of one scan; all of them appear, or none.

    Check first with ``Layout.check``. A mask folder is written into a staged folder moved into
    place when complete (a previous one is replaced as a whole), with the run marker recording
    ``run`` (default: the command being recorded, ``stuseg.results.outputs.recording``); a multilabel
    file and every file beside it are staged and renamed together. A DICOM-SEG or RTSTRUCT that cannot be
    made for this scan (the input is no DICOM series, or no structure was found) is left out
    with a ``StusegWarning`` saying why; the rest is written. Seconds per output go into
    ``seg.timings`` (``write`` for the masks).

    Args:
        layout: where the outputs go.
        seg: a ``stuseg.Segmentation``.
        request: what to write (its codes and SEG encoding).
        sources: the CT volume, the DICOM series and the mode (see ``Sources``).
        run: what the marker of a mask folder records.

    Returns:
        What was written (``Written``).

    Raises:
        OutputError: a file cannot be written (disk full, permission); nothing was written then.
        InputError: statistics or preview asked for without the CT.
    """
    src = sources or Sources()
    left_out = _left_out(layout, seg, src)
    for reason in left_out.values():
        warnings.warn(reason, StusegWarning, stacklevel=2)
    made = tuple(p for p in layout.products if p not in left_out)
    written = Written(left_out=left_out, products=made)
    if not made:
        raise OutputError(f"nothing could be written for {layout.target}: {'; '.join(left_out.values())}")
    target = Path(layout.target)
    if layout.multilabel:
        final = Layout(target, True, made)
        files = final.all_files()
        with outputs.staged_files(files) as temps:
            staged = dict(zip(files, temps))
            per = {name: [staged[p] for p in ps] for name, ps in final.files().items()}
            written.statistics = _write_each(seg, per, None, src, request)
        written.paths = files
        return written
    with outputs.staged_folder(target, run=run) as stage:
        per = Layout(stage, False, made).files()
        written.statistics = _write_each(seg, per, stage, src, request)
    written.paths = [target]
    return written


def _write_each(
    seg: Any, per: Mapping[str, list[Path]], folder: Path | None, src: Sources, request: Request
) -> Any:
    """Each product into its staged files, timed; returns the statistics if written."""
    stats = None
    for name, files in per.items():
        product = PRODUCTS[name]
        start = time.perf_counter()
        value = product.write(seg, files, folder, src, request)
        seg.timings[product.stage] = seg.timings.get(product.stage, 0.0) + time.perf_counter() - start
        if name == "statistics":
            stats = value
    return stats
