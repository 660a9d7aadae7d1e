"""``stuseg batch --ray ADDRESS``: the same batch on an existing Ray cluster.

A pool of actors, each loading the model once (one GPU each where the cluster has GPUs), works
through the cases; Ray places the actors, and restarts an actor that dies (a killed process, a
lost node) and runs its task again on it. The driver (the ``stuseg batch`` process) only hands
cases to actors as they become free, writes the run log as results arrive, and applies the same
resume and failure rules as the local path (``stuseg.batch``).

The actors write each case's output into the batch folder themselves (staged, then moved into
place), so that folder must be on storage every node of the cluster sees at the same path. Each
actor checks this when it starts, by reading a token file the driver wrote there.

Ray is an optional extra (``pip install "stuseg[ray]"``); this module imports it only when run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from stuseg import crash
from stuseg.errors import InputError, OutputError, StusegError
from stuseg.results import locks
from stuseg.results.write import Request
from stuseg.runs.cases import Case, Ignored
from stuseg.runs.folder import LOG_NAME
from stuseg.runs.local import uuid4_hex
from stuseg.runs.process import process
from stuseg.runs.resume import skip_done
from stuseg.runs.runlog import CaseResult, Recorder, RunLog, Status
from stuseg.runs.settings import ModelOptions, Settings

__all__ = [
    "ACTOR_RESTARTS",
    "EXTRA",
    "TASK_RETRIES",
    "TOKEN_PREFIX",
    "CaseWorker",
    "case_failure",
    "check_shared_folder",
    "require_ray",
    "run",
]

EXTRA = 'pip install "stuseg[ray]"'
TOKEN_PREFIX = ".stuseg-batch-token-"
# A case whose actor dies is run again on the restarted actor this many times before it is
# logged as failed (a case that kills its worker every time, e.g. by exhausting memory, must
# not hold the batch up for ever); an actor is restarted this many times over the batch.
TASK_RETRIES = 2
ACTOR_RESTARTS = 4
# Cases queued per actor: one in the network while the next is read and the previous written.
_PER_ACTOR = 2


def require_ray() -> Any:
    """Import Ray, or say in one line how to install it.

    Raises:
        InputError: Ray is not installed.
    """
    try:
        import ray
    except ImportError:
        raise InputError(f"--ray needs Ray, an optional extra of stuseg: {EXTRA}") from None
    return ray


class CaseWorker:
    """What each Ray actor is: a loaded ``Segmenter`` that processes whole cases.

    Up to two cases run in one actor at a time (``max_concurrency=2``): the network runs for one
    at a time (a lock), so reading the next case and writing the previous one overlap with it.

    Args:
        options: the model and its options.
        output: the batch folder, as the driver sees it.
        token: the name of the token file the driver wrote into ``output``, and its content.
        threads: CPU threads for this actor.

    Raises:
        OutputError: this node does not see the driver's batch folder (no shared storage) or
            cannot write there.
    """

    def __init__(self, options: ModelOptions, output: str, token: tuple[str, str], threads: int) -> None:
        from stuseg.inference.threads import limit_spin_waiting

        limit_spin_waiting()
        self.host = socket.gethostname()
        self.output = Path(output)
        check_shared_folder(self.output, token, self.host)
        from stuseg.inference.pipeline import keep_freed_memory

        keep_freed_memory(options.device, many_images=True)  # a worker only runs stuseg
        self.threads = threads
        self.segmenter = options.load(threads=threads)
        self.network = threading.Lock()

    def identity(self) -> dict[str, Any]:
        """Host, pid, model size, weights sha256, device and selected labels (with a model's own
        names, see ``stuseg.batch.model_table``) of this actor."""
        from stuseg.runs.settings import model_table

        names, classes = model_table(self.segmenter)
        return {
            "host": self.host,
            "pid": os.getpid(),
            "size": self.segmenter.size,
            "weights_sha256": self.segmenter.weights_sha256,
            "device": str(self.segmenter.device),
            "labels": [int(v) for v in self.segmenter.keep],
            "names": list(names),
            "classes": classes,
            "precision": self.segmenter.precision,
        }

    def process(
        self, case: Case, settings: Settings, overwrite: bool, run_id: str, qa_fail: bool = False
    ) -> tuple[Status, list[str], str | None, dict[str, Any]]:
        """Segment and write one case (``stuseg.batch.process``, as the local runner's stages do);
        failures are returned, not raised (Ray retries only deaths). ``qa_fail``: as for
        ``stuseg.batch.run``.

        Returns:
            (status, output paths, one-line error, log record).
        """
        recorder = Recorder(settings, self.output, run_id)
        result = process(
            case,
            self.segmenter,
            self.output,
            recorder,
            overwrite=overwrite,
            threads=self.threads,
            network=self.network,
            worker=f"{self.host}:{os.getpid()}",
            qa_fail=qa_fail,
        )
        return result.status, [str(p) for p in result.outputs], result.error, result.record


def check_shared_folder(output: Path, token: tuple[str, str], host: str) -> None:
    """Check that this node sees the driver's batch folder and can write into it.

    Raises:
        OutputError: the token file is missing or differs (the folder is not shared storage),
            or a test file cannot be written there.
    """
    name, content = token
    try:
        seen = (output / name).read_text(encoding="utf-8")
    except OSError:
        seen = None
    if seen != content:
        raise OutputError(
            f"the Ray worker on {host} does not see the batch folder {output} as the driver wrote it; "
            "--output must be on storage shared by every node of the cluster (the same path on each)"
        )
    probe = output / f"{TOKEN_PREFIX}probe-{host}-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise OutputError(
            f"the Ray worker on {host} cannot write into the batch folder {output}: {exc.strerror or exc}"
        ) from None


def _connect(ray: Any, address: str) -> bool:
    """Join the cluster at ``address`` (``auto``, ``ray://host:port`` or a GCS ``host:port``).

    Returns False when this process is already connected to a cluster (a Python caller that
    called ``ray.init`` itself): that connection is used, and left open afterwards.
    """
    import logging

    if ray.is_initialized():
        return False
    _check_reachable(address)
    try:
        ray.init(
            address=address,
            log_to_driver=False,
            logging_level=logging.ERROR,
            configure_logging=True,
        )
    except (ConnectionError, RuntimeError, ValueError) as exc:
        detail = " ".join(str(exc).split())[:200]
        raise InputError(
            f"cannot connect to the Ray cluster at {address}: {detail}; start one with 'ray start --head' "
            "or check the address"
        ) from None
    return True


def _check_reachable(address: str) -> None:
    """Fail fast on a ``host:port`` (or ``ray://host:port``) nothing listens on.

    Ray itself retries an unreachable cluster for minutes, printing its own log lines meanwhile.

    Raises:
        InputError: the address is malformed, or no server answers there within 5 seconds.
    """
    target = address.removeprefix("ray://")
    if address.strip().lower() == "auto" or not target:
        return
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        raise InputError(
            f"--ray {address}: give auto, ray://HOST:PORT or HOST:PORT (the head node's address)"
        )
    try:
        socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=5).close()
    except OSError as exc:
        raise InputError(
            f"cannot connect to the Ray cluster at {address}: {exc.strerror or exc}; "
            "start one with 'ray start --head' or check the address"
        ) from None


def _pool_shape(ray: Any, workers: int | None, device: str) -> tuple[int, dict[str, float], int]:
    """How many actors, the resources each asks for, and the CPU threads each uses."""
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    cpus = max(1, int(resources.get("CPU", 1)))
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    use_gpu = gpus > 0 and not device.strip().lower().startswith(("cpu", "mps"))
    if use_gpu:
        count = workers or gpus
        per_cpu = max(1, cpus // count)
        return count, {"num_gpus": 1, "num_cpus": per_cpu}, per_cpu
    count = workers or max(1, len(nodes))
    # An actor must fit on one node: no more CPUs than the smallest node has.
    smallest = min((int(n.get("Resources", {}).get("CPU", cpus)) for n in nodes), default=cpus)
    per_cpu = max(1, min(cpus // count, smallest))
    return count, {"num_cpus": per_cpu}, per_cpu


def run(
    cases: Sequence[Case],
    output: Path,
    options: ModelOptions | None = None,
    *,
    address: str,
    workers: int | None = None,
    multilabel: bool = False,
    overwrite: bool = False,
    request: Request | None = None,
    ignored: Sequence[Ignored] = (),
    progress: Callable[[Case, int, int], None] | None = None,
    qa_fail: bool = False,
) -> Iterator[CaseResult]:
    """Connect to the Ray cluster and start the actors (now), then return an iterator over results.

    The same contract as ``stuseg.batch.run``: results are logged by this process as they
    arrive, cases done before are skipped, a failing case is logged and the batch goes on.
    ``progress`` is not called (tiles are counted inside the actors).

    Raises:
        InputError: Ray is missing, the cluster cannot be reached.
        OutputError: the workers cannot see or write ``output`` (it is not shared storage).
        WeightsError: a worker cannot load the weights.
        StusegError: the workers loaded different weights.
    """
    ray = require_ray()
    output = Path(output).absolute()
    created = not output.exists()
    output.mkdir(exist_ok=True)
    run_id = uuid4_hex()
    token = (f"{TOKEN_PREFIX}{run_id}", run_id)
    token_path = output / token[0]
    token_path.write_text(token[1], encoding="utf-8")
    connected = False
    try:
        connected = _connect(ray, address)
        options = options or ModelOptions()
        device = options.device
        count, resources, threads = _pool_shape(ray, workers, device)
        options = dataclasses.replace(
            options,
            weights=Path(options.weights).absolute() if options.weights is not None else None,
            device=device if resources.get("num_gpus") else ("cpu" if device == "auto" else device),
        )
        actor_class = ray.remote(
            max_restarts=ACTOR_RESTARTS, max_task_retries=TASK_RETRIES, max_concurrency=_PER_ACTOR
        )(CaseWorker)
        actors = [
            actor_class.options(**resources).remote(options, str(output), token, threads)
            for _ in range(count)
        ]
        try:
            identities = ray.get([a.identity.remote() for a in actors])
        except Exception as exc:
            raise _worker_error(ray, exc) from None
    except BaseException:
        with contextlib.suppress(OSError):
            token_path.unlink()
            if created:
                output.rmdir()  # nothing was done: leave no trace
        if connected:
            ray.shutdown()
        raise
    return _results(
        ray,
        actors,
        identities,
        cases,
        output,
        token_path,
        options,
        multilabel,
        overwrite,
        request or Request(),
        ignored,
        run_id,
        connected,
        qa_fail,
    )


def case_failure(ray: Any, exc: BaseException) -> tuple[str, str | None, bool]:
    """Why a case's ``ray.get`` raised: (the one-line error, a bug's traceback, whether its actor died).

    The actor died (more often than Ray retries, or it could not start): the worker's fault, not
    the case's. The task raised (``RayTaskError``: the worker catches every error of a case, so
    this is a bug around it): an internal error, with the worker's traceback from Ray's text.
    Anything else: Ray itself could not run it.
    """
    if isinstance(exc, ray.exceptions.RayActorError):
        return (
            f"its Ray worker died and it was retried {TASK_RETRIES} times: {_worker_error(ray, exc)}",
            None,
            True,
        )
    if isinstance(exc, ray.exceptions.RayTaskError):
        cause = exc.cause if isinstance(getattr(exc, "cause", None), BaseException) else exc
        return f"internal error in its Ray worker: {crash.summary(cause)}", str(exc), False
    return f"Ray could not run it: {_worker_error(ray, exc)}", None, False


def _worker_error(ray: Any, exc: BaseException) -> StusegError:
    """The one-line reason why an actor could not start or died, from Ray's exception."""
    cause = exc
    for attr in ("cause", "as_instanceof_cause"):
        inner = getattr(cause, attr, None)
        if callable(inner):
            with contextlib.suppress(Exception):
                inner = inner()
        if isinstance(inner, BaseException):
            cause = inner
    if isinstance(cause, StusegError):
        return type(cause)(str(cause).splitlines()[0])
    text = str(exc)
    for line in text.splitlines():
        if "stuseg" in line.lower() and ("Error:" in line or "error:" in line):
            return StusegError(line.split("Error: ", 1)[-1].strip())
    return StusegError(f"a Ray worker failed: {' '.join(text.split())[:300]}")


def _results(
    ray: Any,
    actors: list[Any],
    identities: list[dict[str, Any]],
    cases: Sequence[Case],
    output: Path,
    token_path: Path,
    options: ModelOptions,
    multilabel: bool,
    overwrite: bool,
    request: Request,
    ignored: Sequence[Ignored],
    run_id: str,
    connected: bool,
    qa_fail: bool = False,
) -> Iterator[CaseResult]:
    try:
        shas = {i["weights_sha256"] for i in identities}
        if len(shas) != 1:
            listing = ", ".join(f"{i['host']}: {i['weights_sha256']}" for i in identities)
            raise StusegError(f"the Ray workers loaded different weights ({listing}); give --weights FILE")
        first = identities[0]
        settings = Settings(
            size=first["size"],
            weights_sha256=first["weights_sha256"],
            fast=options.fast,
            tta=options.tta,
            step_size=float(options.step_size),
            labels=tuple(first["labels"]),
            multilabel=multilabel,
            weights=str(options.weights) if options.weights else None,
            device=first["device"],
            names=tuple(first["names"]),
            classes=int(first["classes"]),
            precision=first["precision"],
            request=request,
        )
        recorder = Recorder(settings, output, run_id)
        with locks.hold(output), RunLog(output / LOG_NAME) as log:
            todo = yield from skip_done(cases, output, recorder, log, overwrite=overwrite, ignored=ignored)
            yield from _dispatch(
                ray, actors, todo, settings, overwrite, run_id, recorder, log, output, qa_fail
            )
    finally:
        _stop(ray, actors, identities, output, disconnect=connected)
        with contextlib.suppress(OSError):
            token_path.unlink()


def _dispatch(
    ray: Any,
    actors: list[Any],
    todo: Sequence[Case],
    settings: Settings,
    overwrite: bool,
    run_id: str,
    recorder: Any,
    log: RunLog,
    output: Path,
    qa_fail: bool = False,
) -> Iterator[CaseResult]:
    """Hand cases to actors as they become free; log and yield each result as it arrives."""
    pending = list(reversed(todo))
    load = {i: 0 for i in range(len(actors))}
    alive = set(load)
    inflight: dict[Any, tuple[Case, int, float]] = {}
    while pending or inflight:
        for i in sorted(alive):
            while pending and load[i] < _PER_ACTOR:
                case = pending.pop()
                ref = actors[i].process.remote(case, settings, overwrite, run_id, qa_fail)
                inflight[ref] = (case, i, time.perf_counter())
                load[i] += 1
        if not inflight:  # every actor is gone
            for case in reversed(pending):
                rec = recorder.record(case, "failed", error="no Ray worker is left to run it")
                log.write(rec)
                yield CaseResult(case, "failed", [], rec["error"], rec)
            return
        ready, _ = ray.wait(list(inflight), num_returns=1, timeout=1.0)
        for ref in ready:
            case, i, started = inflight.pop(ref)
            load[i] -= 1
            try:
                status, paths, error, rec = ray.get(ref)
            except Exception as exc:  # Ray's word that the case did not come back; what it means:
                error, trace, died = case_failure(ray, exc)
                if died:
                    alive.discard(i)
                status, paths = "failed", []
                rec = recorder.record(
                    case, "failed", error=error, traceback=trace, wall=time.perf_counter() - started
                )
            log.write(rec)
            yield CaseResult(case, status, [Path(p) for p in paths], error, rec)


def _stop(
    ray: Any, actors: list[Any], identities: list[dict[str, Any]], output: Path, disconnect: bool
) -> None:
    """End the actors; remove what killed ones left staged in ``output``; leave a cluster we joined."""
    for actor in actors:
        with contextlib.suppress(Exception):
            ray.kill(actor, no_restart=True)
    # A killed actor cannot clean up after itself: its staged output (named after its host and
    # pid, see stuseg.results.outputs) is removed here, so an interrupted case leaves nothing behind.
    import shutil

    time.sleep(0.5)  # ray.kill returns before the process is gone
    tags = {f"-{_host_tag(i['host'])}-{i['pid']}-" for i in identities}
    with contextlib.suppress(OSError):
        for entry in output.iterdir():
            if entry.name.startswith(".stuseg-staging-") and any(t in entry.name for t in tags):
                if entry.is_dir():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    with contextlib.suppress(OSError):
                        entry.unlink()
    if disconnect:
        with contextlib.suppress(Exception):
            ray.shutdown()


def _host_tag(host: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9.]", "_", host) or "host"
