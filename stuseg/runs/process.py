"""One case of a batch: read -> segment -> ``stuseg.results.write.write_result`` -> run record.

``CaseJob`` holds the three stages of one case (the local runner overlaps them across cases);
``process`` runs all three at once (a Ray worker); ``write_case`` writes a case's result as
``stuseg predict`` writes it.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stuseg.errors import InputError
from stuseg.inference import memory
from stuseg.inference.threads import available_cpus
from stuseg.results.write import Request, Sources, dicom_source, mode_name, read_ct, write_result
from stuseg.runs.cases import Case
from stuseg.runs.resume import case_layout
from stuseg.runs.runlog import CaseResult, Recorder, Status, failure
from stuseg.runs.settings import Settings

__all__ = [
    "CaseJob",
    "CaseWarnings",
    "process",
    "split_threads",
    "write_case",
]


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
    """Write one case's result into ``output`` through ``stuseg.results.write.write_result``, so that it
    is what ``stuseg predict`` writes for the same scan, and appears whole or not at all.

    A mask folder's marker records the case's input, the settings' fingerprint and the outputs
    it holds (what ``done_before`` reads).

    Returns:
        The paths written (the case folder, or the multilabel file and the files beside it), and
        the outputs the result holds (``product_tags``).

    Raises:
        OutputError: the case's output is unsafe (e.g. a folder of the user's own files, without
            ``overwrite``) or cannot be written (disk full); nothing of it was written then.
        stuseg.results.locks.BusyError: another run (a ``predict`` into the case's own output)
            is writing it.
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
    # A predict into OUTPUT/<case> meanwhile is refused, and the reverse. The batch folder itself
    # is held by this run (by this process, or on Ray by the driver): not tested here.
    with layout.locked(enclosing=False):
        written = write_result(layout, seg, settings.request, sources, run=run)
    return written.paths, products


def split_threads(total: int, device_type: str) -> tuple[int, int, int]:
    """CPU threads for the (read + preprocess, network, back to the grid + write) stages.

    On the CPU the network is most of the work (over 85% of a case's CPU time for the small
    model, benchmarks/RESULTS.md), so it keeps every CPU, and the two other stages, which run
    beside it in short bursts, get a quarter each (at least one): they borrow a little of the
    network's time instead of doubling the number of runnable threads. On a GPU the CPU stages
    are what the device waits for, so they get half of the CPUs each.

    Args:
        total: the CPUs the process may use (``stuseg.inference.threads.available_cpus()``).
        device_type: ``"cpu"``, ``"cuda"`` or ``"mps"``.

    Returns:
        (read threads, network threads, write threads).
    """
    total = max(1, int(total))
    side = max(1, total // 4) if device_type == "cpu" else max(1, total // 2)
    return side, total, side


class CaseWarnings:
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
        recorder: Recorder,
        *,
        overwrite: bool,
        threads: int | None = None,
        worker: str | None = None,
        qa_fail: bool = False,
    ) -> CaseResult:
        """Back to the input grid, ``write_case`` (``threads`` writers), and the case's log record
        with its quality flags in brief; with ``qa_fail`` a written case that raises a flag for
        review is failed (its result kept)."""
        paths: list[Path] = []
        products: list[str] = []
        seg = summary = None
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
                summary, self.error = _quality_of(seg, qa_fail)
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
            quality=summary,
        )
        return CaseResult(self.case, status, paths, self.error, rec)


def _quality_of(seg: Any, qa_fail: bool) -> tuple[dict[str, Any], str | None]:
    """A written case's quality flags in brief, and with ``qa_fail`` the reason to fail it (or None)."""
    from stuseg.analysis import quality, statistics

    start = time.perf_counter()
    summary = quality.summarize(statistics.of_segmentation(seg, None))
    seg.timings["quality"] = time.perf_counter() - start
    return summary, quality.review_reason(summary) if qa_fail else None


def process(
    case: Case,
    segmenter: Any,
    output: Path,
    recorder: Recorder,
    *,
    overwrite: bool = False,
    threads: int | None = None,
    network: contextlib.AbstractContextManager[Any] | None = None,
    worker: str | None = None,
    qa_fail: bool = False,
) -> CaseResult:
    """One case from start to end in the calling thread (read, network, write, record): what a
    Ray worker does with each case it is given. ``network`` is held around the network stage
    (a lock, when several cases share one model). Warnings are kept in the record."""
    job = CaseJob(case)
    sink = CaseWarnings()
    read_threads, _, write_threads = split_threads(threads or available_cpus(), segmenter.device.type)
    with sink.installed(), sink.to(job.warnings):
        job.read(segmenter, recorder.settings, threads=read_threads)
        with network or contextlib.nullcontext():
            job.infer(segmenter)
        return job.finish(
            segmenter,
            output,
            recorder,
            overwrite=overwrite,
            threads=write_threads,
            worker=worker,
            qa_fail=qa_fail,
        )


def _free_device(segmenter: Any) -> None:
    """After a failure on a GPU (out of memory), hand its cached blocks back for the next case."""
    if getattr(segmenter.device, "type", "cpu") == "cuda":
        import torch

        torch.cuda.empty_cache()
