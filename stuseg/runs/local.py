"""Many cases on one machine, one model load, the stages overlapped.

``run`` overlaps three stages in three threads joined by queues of one item: reading +
preprocessing the next case, the network on the current one, and going back to the input grid +
writing the previous one. The heavy work of each stage (torch, numpy, ISA-L) releases the GIL, so
threads overlap without copies between processes.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from stuseg import crash
from stuseg.errors import InputError, OutputError, StusegError
from stuseg.inference.threads import available_cpus
from stuseg.results import locks
from stuseg.results.write import Request
from stuseg.runs.cases import Case, Ignored
from stuseg.runs.folder import LOG_NAME
from stuseg.runs.process import CaseJob, CaseWarnings, split_threads
from stuseg.runs.resume import skip_done
from stuseg.runs.runlog import CaseResult, Recorder, RunLog, one_line
from stuseg.runs.settings import ModelOptions, Settings, settings_of

__all__ = [
    "check_batch_output",
    "run",
    "run_local",
    "uuid4_hex",
]

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
    qa_fail: bool = False,
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
        request: what each case's result holds (``stuseg.results.write.Request``: masks, statistics,
            preview, DICOM-SEG), written as ``stuseg predict`` writes it; default the masks.
        ignored: objects ``discover`` passed over, logged as ``skipped`` with their reason.
        progress: ``progress(case, tiles_done, tiles_total)`` from the network stage.
        threads: CPUs to share between the stages (default ``segmenter.threads``); see
            ``split_threads``.
        qa_fail: a case whose result raises a quality flag for review
            (``stuseg.analysis.quality.REVIEW_FLAGS``) is logged as ``failed``, its result kept.

    Yields:
        One ``CaseResult`` per case as it finishes (skipped ones first), then stops.

    Raises:
        OutputError: the run log cannot be written (the batch stops; finished cases stay).
        stuseg.results.locks.BusyError: another run is writing into ``output`` (one run per folder;
            refused before any work, see ``stuseg.results.locks``).
        InputError: two cases share an id, or the request writes nothing.
    """
    settings = settings_of(segmenter, multilabel=multilabel, weights=weights, request=request)
    with locks.hold(output):  # a second run into this folder is refused here, before any work
        cases, output = _begin(cases, output, settings)
        recorder = Recorder(settings, output, uuid4_hex())
        total = threads or int(getattr(segmenter, "threads", 0) or 0) or available_cpus()
        with RunLog(output / LOG_NAME) as log:
            todo = yield from skip_done(cases, output, recorder, log, overwrite=overwrite, ignored=ignored)
            if todo:
                yield from _overlapped(
                    todo, segmenter, output, recorder, log, overwrite, progress, total, qa_fail
                )


def _begin(
    cases: Iterable[Case], output: str | os.PathLike[str], settings: Settings
) -> tuple[list[Case], Path]:
    """The cases as a list (ids checked unique) and the batch folder (created)."""
    from stuseg.results.write import check_request

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


def _overlapped(
    todo: Sequence[Case],
    segmenter: Any,
    output: Path,
    recorder: Recorder,
    log: RunLog,
    overwrite: bool,
    progress: Callable[[Case, int, int], None] | None,
    total: int,
    qa_fail: bool = False,
) -> Iterator[CaseResult]:
    """The three stages of ``CaseJob`` in three threads joined by queues of one item."""
    read_threads, _, write_threads = split_threads(total, segmenter.device.type)
    sink = CaseWarnings()
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
                result = job.finish(
                    segmenter, output, recorder, overwrite=overwrite, threads=write_threads, qa_fail=qa_fail
                )
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


def uuid4_hex() -> str:
    """A fresh random id for a batch run."""
    import uuid

    return uuid.uuid4().hex


def check_batch_output(output: Path, inputs: Sequence[Path], *, overwrite: bool = False) -> None:
    """Refuse a batch folder that cannot be written safely, before any work.

    Refused: what ``stuseg.results.outputs.check_output`` refuses for a folder (an output equal to,
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
    from stuseg.results.outputs import check_output

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
    qa_fail: bool = False,
) -> Iterator[CaseResult]:
    """Load the model once (now), then return ``run``'s iterator over the cases' results.

    Args:
        cases: from ``discover``.
        output: the batch folder.
        options: the model and its options (default: ``ModelOptions()``).
        multilabel, overwrite, request, ignored, progress, qa_fail: as for ``run``.

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
        qa_fail=qa_fail,
    )
