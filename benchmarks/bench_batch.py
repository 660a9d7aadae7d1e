"""`stuseg batch` against one `stuseg predict` process per scan: wall time and peak memory.

    python3 benchmarks/bench_batch.py --cohort small [--cohort big] [--size small] [--fast]

For each cohort, the same synthetic CTs are segmented twice, on the CPU with the same options:

* separately: one ``python -m stuseg predict CT OUT`` process per scan, one after the other
  (what a shell loop over a cohort does), and
* together: one ``python -m stuseg batch COHORT -o OUT`` process,

in the order: the first half of the separate runs, the batch, the second half (so that a host
whose speed drifts during the benchmark weighs on both sides alike).

It prints (and appends to benchmarks/results.jsonl) one JSON line per cohort: the summed wall
time of the separate processes, the batch's wall time and their ratio, the largest peak RSS of
the separate processes (= the largest single-case peak) and the batch process's peak RSS and
their ratio, the CPU seconds (user + system) of each side, and the seconds of each stage summed
over the cases on each side (the batch's from its run log, the separate runs' from the summary
line ``predict`` prints): the network stage (network, softmax, export) runs in one thread, so its
sum bounds the batch's time, as does its CPU time over the number of CPUs; a stage that takes
longer in the batch than in the separate runs shows what running the stages side by side costs.
Peak RSS is each child's ``ru_maxrss`` from ``wait4`` (the batch is one process: its stages are
threads). Before timing, one untimed ``predict`` of a small CT fills the numba kernel
cache so that neither side pays the kernels' first-use compilation.

Cohorts: ``small`` is 8 CTs of 96 to 160 voxels a side at 1.5 to 2 mm; ``big`` is 4 CTs of
512 x 512 x 300 at 0.8 x 0.8 x 1.0 mm (the size of bench_predict.py's CT). The CTs are synthetic
and the weights random with the real architecture: time and memory do not depend on the values.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import NamedTuple

from common import RESULTS, make_ct, record, scratch

# (shape, spacing) per scan: sizes spread over 96..160 voxels a side so that cases need from one
# to several 128^3 tiles, as the scans of a real cohort do.
SMALL = [
    ((96, 96, 96), (2.0, 2.0, 2.0)),
    ((128, 112, 104), (1.5, 1.5, 1.5)),
    ((160, 128, 96), (1.5, 1.5, 2.0)),
    ((112, 144, 120), (1.6, 1.6, 1.6)),
    ((96, 128, 160), (1.8, 1.8, 1.5)),
    ((144, 96, 112), (1.5, 1.5, 1.8)),
    ((120, 120, 120), (1.7, 1.7, 1.7)),
    ((160, 160, 128), (1.5, 1.5, 1.5)),
]
BIG = [((512, 512, 300), (0.8, 0.8, 1.0))] * 4


class Run(NamedTuple):
    wall: float  # s
    rss: int  # peak RSS, bytes (ru_maxrss of the child tree)
    cpu: float  # s, user + system, all its threads
    stderr: str


def _run(cmd: list[str], env: dict[str, str]) -> Run:
    """Run ``cmd`` and measure it."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    stderr = proc.stderr.read() if proc.stderr else b""
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{stderr.decode()}")
    return Run(wall, usage.ru_maxrss * 1024, usage.ru_utime + usage.ru_stime, stderr.decode(errors="replace"))


def _summed(per_case: Iterable[Mapping[str, float]]) -> dict[str, float]:
    """Each stage's seconds summed over the cases, rounded."""
    total: dict[str, float] = {}
    for seconds in per_case:
        for stage, value in seconds.items():
            total[stage] = total.get(stage, 0.0) + value
    return {k: round(v, 2) for k, v in total.items()}


def _stage_seconds(stderr: str) -> dict[str, float]:
    """The stage times of ``stuseg predict``'s summary line ("wrote ...; read 0.6s, ...; peak RAM")."""
    line = next(x for x in reversed(stderr.splitlines()) if x.startswith("wrote "))
    return {k: float(v) for k, v in re.findall(r"([a-z-]+) ([0-9.]+)s\b", line.split(";")[1])}


def bench(cohort: str, args: argparse.Namespace, work: Path, weights: Path, env: dict[str, str]) -> dict:
    scans = SMALL if cohort == "small" else BIG
    folder = work / cohort
    folder.mkdir()
    for n, (shape, spacing) in enumerate(scans):
        make_ct(folder / f"ct{n}.nii.gz", shape, spacing)
    options = ["--weights", str(weights), "--device", args.device, "--step-size", str(args.step_size)]
    options += ["--fast"] if args.fast else []
    stuseg = [sys.executable, "-m", "stuseg"]

    warm = work / f"warm-{cohort}.nii.gz"  # small: it only has to run every kernel once
    make_ct(warm, (96, 96, 96), (2.0, 2.0, 2.0))
    _run([*stuseg, "predict", str(warm), str(work / f"warm-{cohort}"), *options, "-q"], env)
    separate: list[Run] = []

    def predict_separately(cases: range) -> None:
        for n in cases:
            out = work / f"separate-{cohort}" / f"ct{n}"
            out.parent.mkdir(exist_ok=True)
            ct = folder / f"ct{n}.nii.gz"
            # Not quiet (-q): its summary line gives the stage times, to compare with the batch's.
            run = _run([*stuseg, "predict", str(ct), str(out), *options], env)
            separate.append(run)
            print(f"  predict ct{n}: {run.wall:.1f} s, {run.rss / 2**30:.2f} GB", flush=True)

    # The batch runs between the two halves of the separate runs: where the host's speed drifts
    # (a shared VM's neighbours come and go), a steady drift then weighs on both sides alike.
    half = len(scans) // 2
    predict_separately(range(half))
    batch = _run([*stuseg, "batch", str(folder), "-o", str(work / f"batch-{cohort}"), *options, "-q"], env)
    print(f"  batch: {batch.wall:.1f} s, {batch.rss / 2**30:.2f} GB", flush=True)
    predict_separately(range(half, len(scans)))
    log = (work / f"batch-{cohort}" / "stuseg-batch.jsonl").read_text().splitlines()
    separate_wall = sum(r.wall for r in separate)
    single_peak = max(r.rss for r in separate)
    return {
        "benchmark": "batch",
        "cohort": cohort,
        "cases": len(scans),
        "inputs": [{"shape": list(s), "spacing_mm": list(sp)} for s, sp in scans],
        "size": args.size,
        "device": args.device,
        "fast": args.fast,
        "step_size": args.step_size,
        "separate_wall_s": round(separate_wall, 2),
        "separate_per_case_s": [round(r.wall, 2) for r in separate],
        "separate_cpu_s": round(sum(r.cpu for r in separate), 2),
        "separate_stage_seconds_summed": _summed(_stage_seconds(r.stderr) for r in separate),
        "batch_wall_s": round(batch.wall, 2),
        "batch_over_separate": round(batch.wall / separate_wall, 3),
        "batch_cpu_s": round(batch.cpu, 2),
        "batch_stage_seconds_summed": _summed(json.loads(line).get("seconds") or {} for line in log),
        "single_case_peak_rss_gb": round(single_peak / 2**30, 3),
        "batch_peak_rss_gb": round(batch.rss / 2**30, 3),
        "batch_over_single_peak_rss": round(batch.rss / single_peak, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--cohort", action="append", choices=["small", "big"], help="repeatable; default small"
    )
    parser.add_argument("--size", default="small")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--fast", action="store_true")
    parser.add_argument("--step-size", type=float, default=0.5)
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    with scratch(args.size) as (work, weights, env):
        for cohort in args.cohort or ["small"]:
            record(bench(cohort, args, work, weights, env), args.results)


if __name__ == "__main__":
    main()
