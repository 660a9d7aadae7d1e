"""Two runs into one output: the second is refused in one line before any work (stuseg.results.locks).

Every run here is a real process: a holder (a Python process holding an output's lock, as a
running predict or batch does), and ``stuseg predict`` / ``stuseg batch`` as the user types them.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_batch import run_cli, write_ct

from stuseg import batch
from stuseg.results import locks

HOLD = (
    "import sys\nfrom stuseg.results import locks\n"
    "with locks.hold(sys.argv[1]):\n    print('held', flush=True)\n    sys.stdin.read()\n"
)


def _holder(output: Path) -> subprocess.Popen[str]:
    """A process holding ``output``'s lock until its stdin is closed."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(output)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline() == "held\n"
    return proc


def _release(proc: subprocess.Popen[str]) -> None:
    assert proc.stdin is not None
    proc.stdin.close()
    assert proc.wait(timeout=60) == 0


def _tree(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


@pytest.mark.parametrize("command", ["predict", "batch"])
def test_a_second_run_into_a_held_output_is_refused_in_one_line(tmp_path: Path, command: str) -> None:
    ct = write_ct(tmp_path / "in" / "ct.nii.gz")
    weights = tmp_path / "in" / "weights.pth"
    weights.write_bytes(b"never read: the run stops before loading a model")
    out = tmp_path / "out"
    before = _tree(tmp_path)
    holder = _holder(out)
    try:
        args = [ct, out] if command == "predict" else [tmp_path / "in", "-o", out]
        done = run_cli(command, *args, "--weights", weights, "--device", "cpu")
        # The lock file names its owner, as the message does.
        assert (tmp_path / ".stuseg-lock-out").is_file()
    finally:
        _release(holder)
    assert done.returncode == (1 if command == "predict" else 2), done.stderr
    (line,) = done.stderr.splitlines()
    owner = f"pid {holder.pid} on {socket.gethostname()}, since "
    assert line.startswith(f"stuseg: error: another stuseg run ({owner}")
    assert line.endswith(f"is writing {out}; wait for it to finish (or stop it), then run this again")
    assert _tree(tmp_path) == before  # nothing written, and the holder took its lock file away


def test_a_lock_left_by_a_killed_run_is_taken_over(tmp_path: Path) -> None:
    out = tmp_path / "out"
    holder = _holder(out)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait(timeout=60)
    assert (tmp_path / ".stuseg-lock-out").is_file()  # left behind, but no longer locked
    _release(_holder(out))
    assert list(tmp_path.iterdir()) == []


def test_the_same_process_may_take_its_lock_again(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with locks.hold(out), locks.hold(out):
        assert locks.lock_path(out).is_file()
    assert not locks.lock_path(out).exists()


def test_a_python_batch_into_a_held_folder_raises_before_any_work(tmp_path: Path) -> None:
    write_ct(tmp_path / "in" / "a.nii.gz")
    cases = batch.discover([tmp_path / "in"]).cases

    holder = _holder(tmp_path / "out")
    try:
        with pytest.raises(locks.BusyError, match=f"pid {holder.pid} "):
            next(iter(batch.run(cases, _segmenter(), tmp_path / "out")))
    finally:
        _release(holder)
    assert not (tmp_path / "out").exists()


def _segmenter():
    from test_batch import Threshold

    from stuseg.inference.pipeline import Segmenter

    return Segmenter(model=Threshold.build(), device="cpu", step_size=1.0, fast=True)


@pytest.mark.slow  # two batches with the small architecture: about 30 s on 2 cores
def test_two_real_batches_into_one_folder_do_the_work_once(tmp_path: Path) -> None:
    from fabricate import small_checkpoint

    for i in range(3):
        write_ct(tmp_path / "in" / f"case{i}.nii.gz", shape=(40, 36, 32), seed=i)
    model = small_checkpoint(lambda: tmp_path / "fabricated")
    out = tmp_path / "out"
    args = ["batch", tmp_path / "in", "-o", out, "--weights", model, "--device", "cpu", "--step-size", "1.0"]
    cmd = [sys.executable, "-m", "stuseg", *map(str, args)]
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not locks.lock_path(out).exists():
            assert first.poll() is None and time.monotonic() < deadline, "the first batch never took its lock"
            time.sleep(0.05)
        second = run_cli(*args)
        still_running = first.poll() is None
    finally:
        _, first_err = first.communicate(timeout=600)
    assert first.returncode == 0, first_err
    assert still_running, "the first batch ended before the second began: the test proves nothing"
    assert second.returncode == 2
    assert len(second.stderr.splitlines()) == 1 and f"pid {first.pid} " in second.stderr
    records = batch.read_log(out / batch.LOG_NAME)
    assert sorted((r["case"], r["status"]) for r in records) == [(f"case{i}", "ok") for i in range(3)]
    assert not locks.lock_path(out).exists()


def test_a_predict_into_a_case_of_a_held_batch_folder_is_refused_in_one_line(tmp_path: Path) -> None:
    """``stuseg predict CT results/case1`` while another run holds ``results/``: refused before any
    work, naming the folder and its owner; nothing is written."""
    ct = write_ct(tmp_path / "in" / "ct.nii.gz")
    weights = tmp_path / "in" / "weights.pth"
    weights.write_bytes(b"never read: the run stops before loading a model")
    results = tmp_path / "results"
    results.mkdir()
    before = _tree(tmp_path)
    holder = _holder(results)
    try:
        done = run_cli("predict", ct, results / "case1", "--weights", weights, "--device", "cpu")
    finally:
        _release(holder)
    assert done.returncode == 1, done.stderr
    (line,) = done.stderr.splitlines()
    assert line.startswith(f"stuseg: error: another stuseg run (pid {holder.pid} on {socket.gethostname()}")
    inside = f"is writing {results}, which holds {results / 'case1'}; "
    assert line.endswith(inside + "wait for it to finish (or stop it), then run this again")
    assert _tree(tmp_path) == before


def test_a_case_being_written_by_a_predict_fails_in_the_batch_not_both(tmp_path: Path) -> None:
    """The reverse: a run holding ``results/case1`` (a predict writing it) while this process writes
    the batch's case there: that case's write is refused, and the lock of results/ does not stop
    this process's own writes inside it (the batch holds it itself)."""
    results = tmp_path / "results"
    results.mkdir()
    holder = _holder(results / "case1")
    try:
        with locks.hold(results):
            with locks.hold(results / "case2"):
                pass  # inside a folder this process holds: allowed
            with (
                pytest.raises(locks.BusyError, match=r"is writing .*case1; wait"),
                locks.hold(results / "case1"),
            ):
                pass
    finally:
        _release(holder)
    # And once nobody holds results/ any more, a run inside it goes ahead.
    with locks.hold(results / "case1"):
        pass


def test_a_batch_worker_writes_its_case_inside_the_folder_its_driver_holds(tmp_path: Path) -> None:
    """A Ray worker is another process than the driver holding the batch folder: the case's own
    lock, taken without the test of the folders above, is granted; a predict's is not."""
    results = tmp_path / "results"
    results.mkdir()
    driver = _holder(results)
    try:
        with locks.hold(results / "case1", enclosing=False):
            assert (results / ".stuseg-lock-case1").is_file()
        with pytest.raises(locks.BusyError, match=r"which holds"), locks.hold(results / "case1"):
            pass
    finally:
        _release(driver)
