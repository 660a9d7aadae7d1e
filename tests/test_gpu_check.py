"""benchmarks/gpu_check.py, the one script a session with a GPU runs (device time is scarce: it
must work the first time), run here on the CPU on a small CT, as that machine has it: without
SimpleITK, which its image lacks and whose wheel is too large to carry."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_gpu_check_runs_every_part_on_the_cpu(tmp_path: Path) -> None:
    blocker = tmp_path / "blocked"
    blocker.mkdir()
    (blocker / "SimpleITK.py").write_text("raise ImportError('no SimpleITK on the device machine')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocker), str(ROOT)])}
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--out", str(out), "--device", "cpu"]
    cmd += ["--shape", "96", "96", "64", "--sizes", "small", "--cohort", "2"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in (out / "gpu.jsonl").read_text().splitlines()]
    assert records == [json.loads(line) for line in done.stdout.splitlines()]
    by_part = {}
    for rec in records:
        by_part.setdefault(rec["part"], []).append(rec)
    assert records[0]["part"] == "start" and records[-1]["part"] == "end"
    for mode in ("fast", "normal"):
        (run, timing) = by_part[f"predict-{mode}"]
        assert "error" not in run, run.get("error")
        assert run["size"] == "small" and run["mode"] == mode and run["precision"] == "float32"
        assert run["stages_s"]["network"] > 0 and run["stages_s"]["write"] >= 0
        assert run["peak_rss_gb"] > 0 and "part_seconds" in timing
    batch, _ = by_part["batch"]
    assert "error" not in batch, batch.get("error")
    assert (batch["cases"], batch["ok"]) == (2, 2)
    assert batch["scans_per_minute"] > 0 and batch["stages_summed_s"]["network"] > 0
    assert 0 < batch["network_share_of_stages"] <= 1
    assert by_part["numerics"][0] == {"part": "numerics", "skipped": "needs a CUDA device, not cpu"}
