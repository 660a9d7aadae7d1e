"""`stuseg batch --ray`: a batch on a local Ray cluster that the tests start, compared with the local path."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import ray  # the test extra installs stuseg[ray]: a missing ray fails here, it is not skipped
from conftest import make_ct_array
from fabricate import small_checkpoint
from test_batch import _masks, _no_leftovers, write_ct

from stuseg import batch
from stuseg.errors import OutputError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    """A one-node Ray cluster with 2 CPUs on this machine; yields its GCS address, stops it after."""
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the workers this cluster starts import this checkout of stuseg
    try:
        context = ray.init(
            num_cpus=2,
            include_dashboard=False,
            object_store_memory=80 * 2**20,
            log_to_driver=False,
            logging_level="error",
        )
        yield context.address_info["gcs_address"]
    finally:
        ray.shutdown()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def small_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return small_checkpoint(lambda: tmp_path_factory.mktemp("fabricated"))


@pytest.mark.slow
def test_ray_batch_matches_the_local_batch(tmp_path: Path, cluster: str, small_model: Path) -> None:
    src = tmp_path / "in"
    write_ct(src / "a.nii.gz", shape=(40, 36, 32), seed=3)
    (src / "b.nii.gz").write_bytes(b"not a scan")
    write_ct(src / "c.nii.gz", shape=(30, 40, 34), seed=4)
    # 5 mm slices of a small field of view: normal mode's export streams along the thick axis.
    thick = np.diag([1.25, 1.25, 5.0, 1.0])
    nib.save(nib.Nifti1Image(make_ct_array((60, 50, 30), seed=5), thick), src / "d.nii.gz")
    args = ["--weights", str(small_model), "--step-size", "1.0", "--device", "cpu", "-q"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    ray_out, local_out = tmp_path / "ray", tmp_path / "local"
    cmd = [sys.executable, "-m", "stuseg", "batch", str(src), "-o", str(ray_out), "--ray", cluster, *args]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines[0].startswith(f"stuseg: error: b: cannot read {src / 'b.nii.gz'}: it is damaged"), lines
    assert lines[-1] == f"stuseg: error: 1 of 4 cases failed, see {ray_out / batch.LOG_NAME}"
    assert "Traceback" not in done.stderr
    assert sorted(p.name for p in ray_out.iterdir()) == ["a", "c", "d", batch.LOG_NAME]  # no token left
    _no_leftovers(ray_out)

    local = subprocess.run(
        [sys.executable, "-m", "stuseg", "batch", str(src), "-o", str(local_out), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert local.returncode == 1, local.stderr
    for case in ("a", "c", "d"):
        left, right = _masks(ray_out / case), _masks(local_out / case)
        assert sorted(left) == sorted(right) and len(left) == 104
        for name in left:
            assert left[name][0] == right[name][0]
            np.testing.assert_array_equal(left[name][1], right[name][1], err_msg=f"{case}/{name}")

    ray_log, local_log = batch.read_log(ray_out / batch.LOG_NAME), batch.read_log(local_out / batch.LOG_NAME)
    # In the order the results arrived, which may differ from the local path's.
    assert sorted((r["case"], r["status"]) for r in ray_log) == [(r["case"], r["status"]) for r in local_log]
    assert {r["fingerprint"]["weights_sha256"] for r in ray_log} == {local_log[0]["weights_sha256"]}
    assert all(":" in r["host"] for r in ray_log)  # host:pid of the worker that ran the case

    # Resumed on the cluster: the done cases are skipped, the broken one fails again.
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert again.returncode == 1, again.stderr
    last = [r for r in batch.read_log(ray_out / batch.LOG_NAME) if r["run"] == ray_log[-1]["run"]]
    assert last == ray_log  # the first run's lines are untouched
    statuses = sorted((r["case"], r["status"]) for r in batch.read_log(ray_out / batch.LOG_NAME)[4:])
    assert statuses == [("a", "skipped"), ("b", "failed"), ("c", "skipped"), ("d", "skipped")]


def test_a_worker_that_does_not_see_the_folder_says_so(tmp_path: Path) -> None:
    from stuseg.runs.cluster import check_shared_folder

    (tmp_path / ".stuseg-batch-token-x").write_text("x")
    check_shared_folder(tmp_path, (".stuseg-batch-token-x", "x"), "node1")  # seen: no error
    elsewhere = tmp_path / "not-shared"
    elsewhere.mkdir()
    with pytest.raises(OutputError) as info:
        check_shared_folder(elsewhere, (".stuseg-batch-token-x", "x"), "node7")
    assert str(info.value) == (
        f"the Ray worker on node7 does not see the batch folder {elsewhere} as the driver wrote it; "
        "--output must be on storage shared by every node of the cluster (the same path on each)"
    )


def test_why_a_case_did_not_come_back_from_ray() -> None:
    """A dead actor is the worker's fault; a task that raised is a bug (with the worker's
    traceback); neither is called the other."""
    from stuseg.runs.cluster import TASK_RETRIES, case_failure

    worker_trace = 'Traceback (most recent call last):\n  File "worker.py", line 9\nTypeError: boom'
    raised = ray.exceptions.RayTaskError("CaseWorker.process", worker_trace, TypeError("boom"))
    error, trace, died = case_failure(ray, raised)
    assert error == "internal error in its Ray worker: TypeError: boom" and not died
    assert "worker.py" in trace
    error, trace, died = case_failure(ray, ray.exceptions.ActorDiedError())
    assert error.startswith(f"its Ray worker died and it was retried {TASK_RETRIES} times: ") and died
    assert trace is None
    error, trace, died = case_failure(ray, ray.exceptions.GetTimeoutError("no answer"))
    assert error == "Ray could not run it: a Ray worker failed: no answer" and not died


def _process_titled(prefix: str) -> int | None:
    """The pid of a process whose title (Ray sets ``ray::Class.method`` while a task runs) starts so."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            title = (entry / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
        if title.startswith(prefix):
            return int(entry.name)
    return None


@pytest.mark.slow
def test_a_worker_killed_mid_case_costs_a_retry_not_a_broken_output(
    tmp_path: Path, cluster: str, small_model: Path
) -> None:
    import signal
    import threading
    import time

    from stuseg.runs import cluster as batch_ray

    src = tmp_path / "in"
    for i in range(2):
        write_ct(src / f"ct{i}.nii.gz", shape=(36, 34, 30 + i), seed=i)
    cases = batch.discover([src]).cases
    out = tmp_path / "out"
    killed: list[int] = []

    def kill_the_first_busy_worker() -> None:
        end = time.monotonic() + 120
        while time.monotonic() < end and not killed:
            pid = _process_titled("ray::CaseWorker.process")
            if pid is not None:
                time.sleep(0.5)  # well inside the case
                os.kill(pid, signal.SIGKILL)  # a worker of the cluster this test started
                killed.append(pid)
            time.sleep(0.05)

    killer = threading.Thread(target=kill_the_first_busy_worker)
    killer.start()
    options = batch.ModelOptions(weights=small_model, device="cpu", step_size=1.0, fast=True)
    results = batch_ray.run(cases, out, options, address=cluster)
    statuses = {r.case.id: r.status for r in results}
    killer.join()
    assert killed, "no worker was seen running a case"
    assert statuses == {"ct0": "ok", "ct1": "ok"}
    _no_leftovers(out)
    records = batch.read_log(out / batch.LOG_NAME)
    assert sorted(r["case"] for r in records) == ["ct0", "ct1"]  # one line per case, none lost
    assert all(not r["host"].endswith(f":{killed[0]}") for r in records)  # finished by a new worker
    for case in ("ct0", "ct1"):
        assert len(_masks(out / case)) == 104


@pytest.mark.slow
def test_workers_that_cannot_start_are_a_usage_error_and_leave_nothing(tmp_path: Path, cluster: str) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    ct = write_ct(tmp_path / "a.nii.gz")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "stuseg", "batch", str(ct), "-o", str(out), "--ray", cluster]
    cmd += ["--device", "cuda", "--size", "small"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        "stuseg: error: --device cuda was asked for but no CUDA GPU is available; use --device cpu"
    ]
    assert not out.exists()


def test_an_address_nothing_listens_on_fails_fast_in_one_line(tmp_path: Path) -> None:
    import socket

    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ct = write_ct(tmp_path / "a.nii.gz")
    out = tmp_path / "out"
    for address, message in (
        (f"127.0.0.1:{port}", f"cannot connect to the Ray cluster at 127.0.0.1:{port}: Connection refused; "),
        ("nonsense", "--ray nonsense: give auto, ray://HOST:PORT or HOST:PORT"),
    ):
        cmd = [sys.executable, "-m", "stuseg", "batch", str(ct), "-o", str(out), "--ray", address]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
        assert done.returncode == 2, done.stderr
        lines = done.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"stuseg: error: {message}"), done.stderr
        assert not out.exists()


@pytest.mark.slow
def test_ray_batch_qa_fail_fails_flagged_cases_and_logs_their_quality(
    tmp_path: Path, cluster: str, small_model: Path
) -> None:
    """--qa-fail on the cluster as on this machine: random weights leave every structure found
    unsure (near-uniform softmax), so each case is flagged low_confidence, logged failed with
    its result kept, and counted in the summary."""
    src = tmp_path / "in"
    write_ct(src / "a.nii.gz", shape=(40, 36, 32), seed=3)
    out = tmp_path / "out"
    args = ["--weights", str(small_model), "--step-size", "1.0", "--device", "cpu", "--qa-fail"]
    cmd = [sys.executable, "-m", "stuseg", "batch", str(src), "-o", str(out), "--ray", cluster, *args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("stuseg: error: a: ")]
    assert len(errors) == 1 and "quality flags raised (" in errors[0] and "low_confidence" in errors[0]
    summary = next(line for line in done.stderr.splitlines() if line.startswith("batch: "))
    assert summary.startswith("batch: 0 ok, 1 failed (1 on quality flags), 0 skipped in "), summary
    (rec,) = [r for r in batch.read_log(out / batch.LOG_NAME) if r["case"] == "a"]
    assert rec["status"] == "failed" and rec["outputs"] == ["a"]  # the result is kept for review
    found = sorted(m.name.removesuffix(".nii.gz") for m in (out / "a").glob("*.nii.gz")
                   if np.asanyarray(nib.load(m).dataobj).any())  # fmt: skip
    assert found and rec["quality"]["low_confidence"] == found
