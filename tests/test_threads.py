"""Thread counts from affinity, cgroup quotas and STUSEG_THREADS; portability of the pipeline."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from stuseg.errors import InputError
from stuseg.inference import threads

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def machine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A fake machine: 8 CPUs in the affinity mask, cgroup files under tmp_path, no override."""
    monkeypatch.delenv(threads.ENV_VAR, raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.setattr(threads, "CGROUP_ROOT", tmp_path / "cgroup")
    monkeypatch.setattr(threads, "PROC_SELF_CGROUP", tmp_path / "proc_self_cgroup")
    (tmp_path / "cgroup").mkdir()

    def write(membership: str, files: dict[str, str]) -> None:
        (tmp_path / "proc_self_cgroup").write_text(membership)
        for rel, text in files.items():
            path = tmp_path / "cgroup" / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)

    return write


def test_affinity_without_cgroup_files(machine) -> None:
    assert threads.cgroup_cpu_quota() is None
    assert threads.available_cpus() == 8


def test_without_sched_getaffinity_the_cpu_count(machine, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(os, "sched_getaffinity")
    monkeypatch.setattr(os, "cpu_count", lambda: 3)
    assert threads.available_cpus() == 3


@pytest.mark.parametrize(
    ("files", "quota", "expect"),
    [
        ({"job/cpu.max": "150000 100000\n"}, 1.5, 2),  # 1.5 CPUs: rounded up
        ({"job/cpu.max": "400000 100000\n"}, 4.0, 4),
        ({"job/cpu.max": "max 100000\n"}, None, 8),  # no limit
        ({"job/cpu.max": "1600000 100000\n"}, 16.0, 8),  # a quota above the affinity mask
        ({"job/cpu.max": "max 100000\n", "cpu.max": "100000 100000\n"}, 1.0, 1),  # the root's binds
        ({"job/cpu.max": "250000 50000\n", "cpu.max": "300000 100000\n"}, 3.0, 3),  # the smaller
    ],
)
def test_cgroup_v2_quota(machine, files, quota, expect) -> None:
    machine("0::/job\n", files)
    assert threads.cgroup_cpu_quota() == quota
    assert threads.available_cpus() == expect


@pytest.mark.parametrize("mount", ["cpu,cpuacct", "cpu"])
def test_cgroup_v1_quota(machine, mount: str) -> None:
    membership = f"12:memory:/docker/abc\n4:{mount}:/docker/abc\n1:name=systemd:/docker/abc\n"
    machine(
        membership,
        {
            f"{mount}/docker/abc/cpu.cfs_quota_us": "300000\n",
            f"{mount}/docker/abc/cpu.cfs_period_us": "100000\n",
        },
    )
    assert threads.cgroup_cpu_quota() == 3.0
    assert threads.available_cpus() == 3


def test_cgroup_v1_unlimited(machine) -> None:
    machine(
        "4:cpu,cpuacct:/\n",
        {"cpu,cpuacct/cpu.cfs_quota_us": "-1\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"},
    )
    assert threads.cgroup_cpu_quota() is None
    assert threads.available_cpus() == 8


def test_environment_variable_overrides(machine, monkeypatch: pytest.MonkeyPatch) -> None:
    machine("0::/\n", {"cpu.max": "100000 100000\n"})
    monkeypatch.setenv(threads.ENV_VAR, "5")
    assert threads.available_cpus() == 5
    assert threads.thread_count(2) == 2  # an explicit argument wins over everything
    for bad in ("0", "-2", "two", "2.5"):
        monkeypatch.setenv(threads.ENV_VAR, bad)
        with pytest.raises(InputError) as info:
            threads.available_cpus()
        assert str(info.value) == (
            f"the environment variable STUSEG_THREADS must be a whole number of threads >= 1, got {bad!r}"
        )
    with pytest.raises(InputError, match="threads must be a whole number"):
        threads.thread_count(0)


def test_limit_threads_restores_torch_and_numba() -> None:
    import numba
    import torch

    import stuseg.inference.kernels  # noqa: F401  numba is imported with the kernels

    torch_before, numba_before = torch.get_num_threads(), numba.get_num_threads()
    try:
        # Two threads before, one inside: a limit that did nothing could not pass on a machine
        # whose default is one thread.
        torch.set_num_threads(2)
        numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
        outside = (torch.get_num_threads(), numba.get_num_threads())
        with threads.limit_threads(1):
            assert torch.get_num_threads() == 1 and numba.get_num_threads() == 1
        assert (torch.get_num_threads(), numba.get_num_threads()) == outside
        assert outside[0] == 2
    finally:
        torch.set_num_threads(torch_before)
        numba.set_num_threads(numba_before)


def test_cubic_resampling_uses_available_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    import stuseg.inference.preprocess as pre

    sizes = []
    real = pre.ThreadPoolExecutor

    def recording(workers: int):
        sizes.append(workers)
        return real(workers)

    monkeypatch.setattr(pre, "ThreadPoolExecutor", recording)
    monkeypatch.setenv(threads.ENV_VAR, "3")
    x = np.random.default_rng(0).normal(size=(6, 7, 8)).astype(np.float32)
    one = pre.resample_image(x, (9, 9, 9), None)
    monkeypatch.setenv(threads.ENV_VAR, "1")
    other = pre.resample_image(x, (9, 9, 9), None)
    assert sizes == [3, 1]
    np.testing.assert_array_equal(one, other)  # the split into blocks changes no value


def test_short_spinning_fills_in_only_what_the_user_left_unset() -> None:
    env: dict[str, str] = {}
    threads.limit_spin_waiting(env)
    assert env == {"GOMP_SPINCOUNT": "10000"}
    for chosen in (
        {"OMP_WAIT_POLICY": "ACTIVE"},
        {"OMP_WAIT_POLICY": "PASSIVE"},
        {"GOMP_SPINCOUNT": "300000"},
    ):
        env = dict(chosen)
        threads.limit_spin_waiting(env)
        assert env == chosen


def test_the_command_line_process_limits_spinning() -> None:
    """``python -m stuseg`` sets the spin count before torch loads; a user's own choice is kept."""
    code = "import os, sys; from stuseg.cli import main; sys.argv = ['stuseg', '--version']\n"
    code += "try:\n    main()\nexcept SystemExit:\n    pass\n"
    code += "print(os.environ.get('GOMP_SPINCOUNT'), os.environ.get('OMP_WAIT_POLICY'))"
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    cases = (
        ({}, "10000 None"),
        ({"OMP_WAIT_POLICY": "PASSIVE"}, "None PASSIVE"),
        ({"GOMP_SPINCOUNT": "5"}, "5 None"),
    )
    for extra, expect in cases:
        env = {**base, **extra, "PYTHONPATH": str(REPO)}
        done = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip().splitlines()[-1] == expect


@pytest.mark.slow
def test_pipeline_works_where_the_resource_module_does_not_exist(tmp_path: Path) -> None:
    """As on Windows: importing and running the pipeline must not need ``resource``."""
    code = """
import sys
sys.modules["resource"] = None  # any 'import resource' now raises ImportError
import numpy as np, torch
from stuseg.images.io import Volume, nifti_header_for
from stuseg.model.network import Arch, build_network
from stuseg.inference.pipeline import peak_rss_bytes, segment
assert peak_rss_bytes() is None
torch.manual_seed(0)
net = build_network(Arch(dims=(4, 4, 8, 8, 8, 8), depths=(1,) * 6))
data = np.random.default_rng(0).normal(0, 300, (20, 22, 18)).astype(np.float32) - 500
affine = np.diag([1.5, 1.5, 1.5, 1.0])
seg = segment(Volume(data, affine, nifti_header_for(affine, data.shape)), model=net, device="cpu", fast=True)
print(seg.peak_rss_bytes, seg.labels.shape)
"""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[0] == "None (20, 22, 18)"


def test_import_sets_the_short_spin_only_before_torch_and_when_nobody_chose() -> None:
    clean: dict[str, str] = {}
    assert threads.spin_briefly_on_import(clean, {}) is True
    assert clean == {"GOMP_SPINCOUNT": "10000"}
    for env, modules in (
        ({}, {"torch": object()}),  # torch's libgomp has read its settings already
        ({"STUSEG_TUNE_OPENMP": "0"}, {}),
        ({"OMP_WAIT_POLICY": "ACTIVE"}, {}),
        ({"GOMP_SPINCOUNT": "300000"}, {}),
    ):
        before = dict(env)
        assert threads.spin_briefly_on_import(env, modules) is False
        assert env == before


def test_import_stuseg_in_a_fresh_process_sets_the_short_spin() -> None:
    """As a notebook does: ``import stuseg`` first sets it, after torch it does not."""
    report = "import os, sys; print(os.environ.get('GOMP_SPINCOUNT'), 'torch' in sys.modules)"
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    base = {**base, "PYTHONPATH": str(REPO)}
    cases = (
        ("import stuseg", {}, "10000 False"),
        ("import torch, stuseg", {}, "None True"),
        ("import stuseg", {"STUSEG_TUNE_OPENMP": "0"}, "None False"),
        ("import stuseg", {"OMP_WAIT_POLICY": "PASSIVE"}, "None False"),
    )
    for code, extra, expect in cases:
        done = subprocess.run(
            [sys.executable, "-c", f"{code}; {report}"],
            capture_output=True,
            text=True,
            env={**base, **extra},
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == expect, code
