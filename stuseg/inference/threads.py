"""How many CPU threads stuseg may use, and keeping its thread pools from getting in each other's way.

``available_cpus()`` is the one answer every pool in stuseg asks (torch's intra-op threads,
numba's kernels, the cubic resampling workers, the mask writers): the CPUs this process may
run on (its affinity mask), capped by a cgroup CPU quota (containers, systemd slices, batch
schedulers), overridable with the environment variable ``STUSEG_THREADS``. ``os.cpu_count()``
counts the machine's CPUs and knows neither, so on a shared or limited machine it asks for
more threads than there are CPUs to run them.

``limit_spin_waiting()`` is for processes that exist to run stuseg (the command line, a
batch worker): see its docstring for why an idle OpenMP thread must not spin for long.
``import stuseg`` applies it too, but only where that cannot surprise the host: see
``spin_briefly_on_import``.

``limit_threads(n)`` applies a count to torch and numba for the duration of a block and
restores the previous counts afterwards, so a library call does not change its host process's
settings for good. Importing this module imports neither torch nor numba.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from stuseg.errors import InputError

__all__ = [
    "CGROUP_ROOT",
    "ENV_VAR",
    "OPENMP_OPT_OUT",
    "PROC_SELF_CGROUP",
    "SPIN_COUNT",
    "available_cpus",
    "cgroup_cpu_quota",
    "limit_spin_waiting",
    "limit_threads",
    "spin_briefly_on_import",
    "thread_count",
]

ENV_VAR = "STUSEG_THREADS"

# Where the kernel describes the process's control groups. Module attributes so that tests can
# point them at fabricated files.
PROC_SELF_CGROUP = Path("/proc/self/cgroup")
CGROUP_ROOT = Path("/sys/fs/cgroup")


def available_cpus() -> int:
    """The number of CPU threads stuseg should use in this process (at least 1).

    ``STUSEG_THREADS`` (a whole number >= 1) wins when set. Otherwise: the CPUs in the process's
    affinity mask (``os.sched_getaffinity``; ``os.cpu_count()`` where that does not exist),
    capped by the cgroup CPU quota (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us / cpu.cfs_period_us``)
    rounded up, since a quota of 1.5 CPUs still leaves half a CPU to a second thread.

    Raises:
        InputError: ``STUSEG_THREADS`` is set but not a whole number >= 1.
    """
    override = os.environ.get(ENV_VAR, "").strip()
    if override:
        return _parse_count(override, f"the environment variable {ENV_VAR}")
    cpus = _affinity_cpus()
    quota = cgroup_cpu_quota()
    if quota is not None:
        cpus = min(cpus, max(1, math.ceil(quota)))
    return cpus


def thread_count(threads: int | None = None) -> int:
    """``threads`` if given (checked), else ``available_cpus()``.

    Raises:
        InputError: ``threads`` is not a whole number >= 1.
    """
    if threads is None:
        return available_cpus()
    return _parse_count(threads, "threads")


def _parse_count(value: object, what: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        count = value
    else:
        try:
            count = int(str(value).strip())  # "4" and 4, not 2.5, "2.0" or True
        except ValueError:
            count = 0
    if count < 1:
        raise InputError(f"{what} must be a whole number of threads >= 1, got {value!r}")
    return count


def _affinity_cpus() -> int:
    getaffinity = getattr(os, "sched_getaffinity", None)
    if getaffinity is not None:
        try:
            return max(1, len(getaffinity(0)))
        except OSError:
            pass
    return max(1, os.cpu_count() or 1)


def cgroup_cpu_quota() -> float | None:
    """The CPU quota of this process's control group in CPUs (e.g. 1.5), or None when unlimited.

    Reads the cgroup v2 ``cpu.max`` or the v1 ``cpu.cfs_quota_us``/``cpu.cfs_period_us`` of the
    process's own group (from ``/proc/self/cgroup``) and of every group above it, and returns the
    smallest quota found: a parent's limit binds its children. Nothing readable: None.
    """
    quotas = [q for folder in _cgroup_folders() if (q := _quota_in(folder)) is not None]
    return min(quotas) if quotas else None


def _cgroup_folders() -> list[Path]:
    """The folders that may hold this process's CPU controller files, own group first, up to the root."""
    relative: list[str] = []
    try:
        lines = PROC_SELF_CGROUP.read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        names = controllers.split(",")
        if controllers == "":  # cgroup v2: "0::/path"
            relative.append(path)
        elif "cpu" in names:  # cgroup v1 cpu controller, mounted at cpu/ or cpu,cpuacct/
            relative.extend(f"/{mount}{path}" for mount in ("cpu", "cpu,cpuacct", "cpuacct,cpu"))
    folders: list[Path] = []
    for rel in [*relative, "/", "/cpu", "/cpu,cpuacct"]:
        folder = CGROUP_ROOT / rel.lstrip("/")
        while True:
            if folder not in folders:
                folders.append(folder)
            if folder == CGROUP_ROOT or CGROUP_ROOT not in folder.parents:
                break
            folder = folder.parent
    return folders


def _quota_in(folder: Path) -> float | None:
    """The quota in CPUs that ``folder``'s files state, or None (no files, no limit, unreadable)."""
    try:
        quota, period = (folder / "cpu.max").read_text().split()[:2]  # v2: "max 100000" or "150000 100000"
    except (OSError, ValueError):
        try:
            quota = (folder / "cpu.cfs_quota_us").read_text().strip()  # v1: -1 when unlimited
            period = (folder / "cpu.cfs_period_us").read_text().strip()
        except OSError:
            return None
    try:
        q, p = int(quota), int(period)
    except ValueError:  # "max"
        return None
    return q / p if q > 0 and p > 0 else None


@contextlib.contextmanager
def limit_threads(threads: int) -> Iterator[None]:
    """Run the block with ``threads`` intra-op threads in torch and numba, then restore both.

    torch's count is process-wide and numba's is per calling thread; both are set back to what
    they were when the block ends, so a library call leaves its host's settings as it found them.
    numba is only touched when it is already imported (stuseg's kernels import it).
    """
    import torch

    before_torch = torch.get_num_threads()
    numba = sys.modules.get("numba")
    before_numba = numba.get_num_threads() if numba is not None else None
    if threads != before_torch:
        torch.set_num_threads(threads)
    if numba is not None:
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    try:
        yield
    finally:
        if torch.get_num_threads() != before_torch:
            torch.set_num_threads(before_torch)
        if numba is not None and before_numba is not None:
            numba.set_num_threads(before_numba)


SPIN_COUNT = 10000  # GOMP_SPINCOUNT that stuseg's processes choose: see ``limit_spin_waiting``


def limit_spin_waiting(environ: dict[str, str] | None = None) -> None:
    """Let idle OpenMP threads spin only briefly before they sleep (call before torch/numba load).

    A stuseg process runs two OpenMP runtimes: torch's own libgomp (network, softmax) and the
    system's libgomp under numba's kernels (exports). GNU OpenMP's default keeps an idle thread
    spinning on its CPU after every parallel region (``GOMP_SPINCOUNT`` 300000 pause loops,
    milliseconds), in case the next region starts soon. Alone on a machine that saves a wake-up
    per region. But a tile runs thousands of small parallel regions, each ending in a barrier,
    and when another process (or the other stages of a batch) needs the CPU, the spinning
    thread keeps it until the scheduler preempts it: the CPU time is burnt and every barrier
    waits for a time slice. That is how two processes on two cores each took several times as
    long as alone instead of about twice.

    Measured (benchmarks/RESULTS.md): sleeping at once (``OMP_WAIT_POLICY=PASSIVE``) shares the
    machine best but makes a lone run slower, since every region then pays a futex wake-up;
    long spins (100000 loops, or without limit with ``OMP_WAIT_POLICY=ACTIVE``) share badly. A
    short spin (``GOMP_SPINCOUNT`` = ``SPIN_COUNT``, well under a millisecond) keeps a lone
    run's speed and still shares the cores within the target.

    Both runtimes read the variable once, when they are loaded, so this must run before torch
    is imported (and before numba's first parallel kernel). It sets nothing the user has
    chosen: neither when ``OMP_WAIT_POLICY`` nor when ``GOMP_SPINCOUNT`` is set. Meant for
    processes that exist to run stuseg (the command line calls it first, as do Ray workers); a
    library call never changes its host's environment.

    Args:
        environ: the mapping to fill in (default ``os.environ``).
    """
    env = os.environ if environ is None else environ
    if "OMP_WAIT_POLICY" not in env and "GOMP_SPINCOUNT" not in env:
        env["GOMP_SPINCOUNT"] = str(SPIN_COUNT)


OPENMP_OPT_OUT = "STUSEG_TUNE_OPENMP"  # set to 0 and ``import stuseg`` leaves OpenMP's settings alone


def spin_briefly_on_import(
    environ: dict[str, str] | None = None, modules: dict[str, object] | None = None
) -> bool:
    """What ``import stuseg`` does for OpenMP: ``limit_spin_waiting``, where it can still work and
    the host has not chosen.

    It sets ``GOMP_SPINCOUNT=10000`` in the process's environment when all of these hold:
    torch is not imported yet (its libgomp reads the variable once, when it loads: later it
    would change nothing but child processes), neither ``OMP_WAIT_POLICY`` nor
    ``GOMP_SPINCOUNT`` is set (the user's choice wins), and ``STUSEG_TUNE_OPENMP`` is not ``0``.
    Why: the same as for the command line (``limit_spin_waiting``), and so that the library
    shares the CPUs as the command does (a batch's stages in their threads, two notebooks on one
    machine). What it changes for the host: every OpenMP runtime of GNU's loaded afterwards in
    this process (torch's, numba's, any other library's) and every child process started
    afterwards lets an idle thread spin 10000 loops (well under a millisecond) instead of
    300000 before it sleeps; a lone run measured the same either way (benchmarks/RESULTS.md).

    Args:
        environ: the environment to read and fill in (default ``os.environ``).
        modules: the imported modules (default ``sys.modules``).

    Returns:
        Whether the variable was set.
    """
    env = os.environ if environ is None else environ
    loaded = sys.modules if modules is None else modules
    if env.get(OPENMP_OPT_OUT, "").strip() == "0" or "torch" in loaded:
        return False
    if "OMP_WAIT_POLICY" in env or "GOMP_SPINCOUNT" in env:
        return False
    limit_spin_waiting(env)
    return True
