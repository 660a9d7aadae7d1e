"""Quality flags in the batch's run log, and --qa-fail for `stuseg batch` and `stuseg predict`,
through the command line as a user runs it.

The model is the real small architecture with random weights: its softmax is close to uniform
over the 105 classes everywhere (about 0.01 per class), so by construction every structure it
labels has a winning probability far below 0.5 and must be flagged ``low_confidence`` - the
oracle is the list of non-empty masks on disk.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from test_batch import run_cli, small_model, write_ct  # noqa: F401 - small_model is a fixture

from stuseg import batch

COMMON = ["--step-size", "1.0", "--device", "cpu"]


def present(folder: Path) -> list[str]:
    """Names of the non-empty masks in a mask folder, read from disk."""
    names = []
    for mask in sorted(folder.glob("*.nii.gz")):
        if np.asanyarray(nib.load(mask).dataobj).any():
            names.append(mask.name.removesuffix(".nii.gz"))
    return names


@pytest.mark.slow
def test_batch_logs_quality_and_qa_fail_fails_flagged_cases_only(tmp_path: Path, small_model: Path) -> None:  # noqa: F811
    src = tmp_path / "in"
    write_ct(src / "a.nii.gz", shape=(40, 36, 32), seed=1)
    write_ct(src / "c.nii.gz", shape=(34, 40, 30), seed=2)
    weights = ["--weights", str(small_model), *COMMON]

    out = tmp_path / "out"
    done = run_cli("batch", src, "-o", out, *weights, "--qa-fail")
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if not line.startswith("stuseg: warning: ")]
    errors = sorted(
        line for line in lines if line.startswith("stuseg: error: a:") or line.startswith("stuseg: error: c:")
    )
    assert [e.split(": ")[2] for e in errors] == ["a", "c"]
    assert all(": quality flags raised (" in e and "low_confidence: " in e for e in errors), errors
    summary = next(line for line in lines if line.startswith("batch: "))
    assert summary.startswith("batch: 0 ok, 2 failed (2 on quality flags), 0 skipped in "), summary
    records = {r["case"]: r for r in batch.read_log(out / batch.LOG_NAME)}
    for case in ("a", "c"):
        rec = records[case]
        assert rec["status"] == "failed" and rec["error"].startswith("quality flags raised (")
        assert rec["outputs"] == [case]  # the result is kept for review
        names = present(out / case)
        assert names and rec["quality"]["low_confidence"] == names
        assert rec["quality"]["empty"] == 104 - len(names)
        least = rec["quality"]["least_confident"]
        assert least["structure"] in names and 0 < least["mean_probability"] < 0.05
        assert rec["seconds"]["quality"] >= 0

    # Without --qa-fail the same flags are logged and the cases are ok.
    plain = tmp_path / "plain"
    done = run_cli("batch", src, "-o", plain, *weights)
    assert done.returncode == 0, done.stderr
    logged = {r["case"]: r for r in batch.read_log(plain / batch.LOG_NAME)}
    assert [logged[c]["status"] for c in ("a", "c")] == ["ok", "ok"]
    assert logged["a"]["quality"] == records["a"]["quality"]

    # --qa-fail fails flagged cases only: with a structure absent from both results, nothing is
    # flagged and both are ok.
    assert "aorta" not in present(out / "a") + present(out / "c")
    subset = tmp_path / "subset"
    done = run_cli("batch", src, "-o", subset, *weights, "--qa-fail", "--roi-subset", "aorta")
    assert done.returncode == 0, done.stderr
    logged = {r["case"]: r for r in batch.read_log(subset / batch.LOG_NAME)}
    for case in ("a", "c"):
        assert logged[case]["status"] == "ok" and logged[case]["error"] is None
        assert logged[case]["quality"]["low_confidence"] == [] and logged[case]["quality"]["empty"] == 1
        assert logged[case]["quality"]["least_confident"] is None


@pytest.mark.slow
def test_predict_qa_fail_exits_3_and_keeps_the_result(tmp_path: Path, small_model: Path) -> None:  # noqa: F811
    ct = write_ct(tmp_path / "ct.nii.gz", seed=1)
    out = tmp_path / "seg"
    done = run_cli("predict", ct, out, "--weights", small_model, *COMMON, "--statistics", "--qa-fail")
    assert done.returncode == 3, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("stuseg: error: quality flags raised (") and "the result is kept" in last
    names = present(out)
    stats = json.loads((out / "statistics.json").read_text())
    assert stats["quality"]["low_confidence"] == names
    assert any(line.startswith("stuseg: quality: ") for line in done.stderr.splitlines())
    for name in names:
        rec = stats["structures"][name]
        assert rec["low_confidence"] is True and rec["low_probability_share"] == 1.0
        assert 0 < rec["mean_probability"] < 0.05
    assert stats["image"]["confidence"]["low_probability"] == 0.5
    csv_header = (out / "statistics.csv").read_text().splitlines()[0]
    assert csv_header.endswith(",mean_probability,low_probability_share,low_confidence")
    # Without --qa-fail the same result exits 0; -q keeps the terminal silent.
    again = run_cli("predict", ct, tmp_path / "seg2", "--weights", small_model, *COMMON, "-q")
    assert again.returncode == 0 and again.stderr == "", again.stderr
