"""A bug never shows the user a traceback: one line, a report file, nothing half-written.

The bug is provoked on purpose: a real ``stuseg`` process whose mask writer raises a
``RuntimeError`` after four masks (a bootstrap replaces the writer, then runs the command line),
and a batch whose export raises for one case.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from fabricate import tiny_network

from stuseg import batch, crash
from stuseg.errors import InputError
from stuseg.inference.pipeline import Segmenter

TESTS = Path(__file__).resolve().parent

# Runs `stuseg predict` in this process after arranging a bug: the tiny network instead of
# downloaded weights, and a mask writer that raises after four masks (each written for real).
BOOTSTRAP = """
import sys
sys.path.insert(0, {tests!r})
from fabricate import tiny_network
from stuseg.results import labelmaps
from stuseg.inference import pipeline

real_segment, real_write = pipeline.segment, labelmaps.write_nifti
pipeline.segment = lambda *a, **k: real_segment(*a, **{{**k, "model": tiny_network(), "size": None}})
calls = []

def buggy_write(img, path):
    calls.append(path)
    if len(calls) == 5:
        raise RuntimeError("provoked bug: a writer that breaks\\nover two lines")
    real_write(img, path)

labelmaps.write_nifti = buggy_write
sys.argv = ["stuseg", *sys.argv[1:]]
from stuseg.cli import main
main()
"""


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_bug_in_a_command_is_one_line_with_a_report(tmp_path: Path, make_nifti) -> None:
    ct = make_nifti(shape=(30, 28, 26))
    before = _digest(ct)
    home = tmp_path / "home"
    out = tmp_path / "masks"
    env = {**os.environ, "STUSEG_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    code = BOOTSTRAP.format(tests=str(TESTS))
    done = subprocess.run(
        [sys.executable, "-c", code, "predict", str(ct), str(out), "--device", "cpu", "--step-size", "1"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=300,
    )
    assert done.returncode == 1
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    match = re.fullmatch(
        r"stuseg: error: internal error: RuntimeError: provoked bug: a writer that breaks over two lines; "
        r"please report it with the file (\S+)",
        lines[0],
    )
    assert match, lines[0]
    report = Path(match.group(1))
    assert report.parent == home / "logs" and report.name.startswith("stuseg-internal-error-")
    text = report.read_text()
    assert "Traceback (most recent call last)" in text and "buggy_write" in text
    assert "RuntimeError: provoked bug" in text
    assert f"predict {ct} {out}" in text  # the command, to reproduce it
    assert "torch " in text and "stuseg " in text
    # Nothing half-written: no output folder, no staging folder beside it; the input untouched.
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([ct.name, "home"])
    assert _digest(ct) == before


def test_the_report_goes_to_the_temporary_folder_when_the_home_cannot_take_it(
    tmp_path: Path, monkeypatch
) -> None:
    home = tmp_path / "home"
    home.write_text("a file where the folder should be")
    monkeypatch.setenv("STUSEG_HOME", str(home))
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    try:
        raise KeyError("missing")
    except KeyError as exc:
        path = crash.report(exc, ["stuseg", "predict", "a", "b"])
    assert path is not None and path.parent == tmp_path / "tmp"
    assert "KeyError: 'missing'" in path.read_text()


def test_what_counts_as_a_bug() -> None:
    assert crash.is_internal(ValueError("x")) and crash.is_internal(TypeError("x"))
    assert not crash.is_internal(InputError("bad input"))
    assert not crash.is_internal(OSError(28, "No space left on device"))
    assert not crash.is_internal(MemoryError())
    assert not crash.is_internal(KeyboardInterrupt())
    assert crash.summary(ValueError("a\nb  c")) == "ValueError: a b c"
    assert crash.summary(ValueError("x" * 1000)).endswith("...")


def test_a_bug_in_one_case_of_a_batch_is_logged_with_its_traceback_and_the_batch_goes_on(
    tmp_path: Path, make_nifti, monkeypatch
) -> None:
    good = make_nifti(shape=(30, 28, 26), name="good.nii.gz")
    bad = make_nifti(shape=(31, 28, 26), name="bad.nii.gz", seed=1)
    segmenter = Segmenter(model=tiny_network(), device="cpu", step_size=1.0)
    real_finish = segmenter.finish

    def finish(inferred):
        if inferred.geometry.input_shape[0] == 31:
            raise IndexError("provoked bug in the export")
        return real_finish(inferred)

    monkeypatch.setattr(segmenter, "finish", finish)
    out = tmp_path / "results"
    cases = batch.discover([good, bad]).cases
    results = {r.case.id: r for r in batch.run(cases, segmenter, out)}
    assert results["good"].status == "ok" and (out / "good").is_dir()
    assert results["bad"].status == "failed" and not (out / "bad").exists()
    assert results["bad"].error == (
        "internal error: IndexError: provoked bug in the export (its traceback is in the run log)"
    )
    records = {r["case"]: r for r in map(json.loads, (out / batch.LOG_NAME).read_text().splitlines())}
    trace = records["bad"]["traceback"]
    assert trace.startswith("Traceback (most recent call last)") and "in finish" in trace
    assert "traceback" not in records["good"]


@pytest.mark.parametrize("exc", [InputError("not a CT"), OSError(28, "No space left on device")])
def test_user_and_system_errors_are_not_reported_as_bugs(exc: Exception) -> None:
    assert crash.bug_traceback(exc) is None
    assert not batch.one_line(exc).startswith("internal error")
