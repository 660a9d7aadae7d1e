"""Two `stuseg predict` runs sharing the machine: how much slower is each than a run alone?

    python3 benchmarks/bench_shared.py [--shape 256 256 160] [--wait-policy default|active|passive]
                                       [--spin-count N]

Makes one synthetic CT and random small-model weights (as bench_predict.py does), then times
`python3 -m stuseg predict CT OUT --fast` as real subprocesses: once alone, then two started
together. Each line printed (and appended to benchmarks/results.jsonl) has the lone wall time,
the two shared wall times and their ratios to the lone one. Fair sharing of the cores gives about
2x; the target is <= 2.3x.

By default the runs get the environment the stuseg command chooses for itself (see
``stuseg.inference.threads.limit_spin_waiting``). ``--wait-policy active|passive`` sets OMP_WAIT_POLICY
and ``--spin-count N`` sets GOMP_SPINCOUNT in the runs' environment instead, which the stuseg
command respects: other choices, for comparison.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import RESULTS, make_ct, record, scratch


def _predict(ct: Path, out: Path, weights: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "stuseg", "predict", str(ct), str(out), "--fast", "--quiet"]
    cmd += ["--weights", str(weights), "--device", "cpu"]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _wait(proc: subprocess.Popen[bytes], start: float) -> float:
    _, stderr = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"stuseg predict failed: {stderr.decode(errors='replace')}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", type=int, nargs=3, default=[256, 256, 160])
    parser.add_argument("--spacing", type=float, nargs=3, default=[1.0, 1.0, 1.5])
    parser.add_argument("--wait-policy", choices=["default", "active", "passive"], default="default")
    parser.add_argument("--spin-count", type=int, help="GOMP_SPINCOUNT for the runs")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()

    with scratch("small") as (work, weights, env):
        ct = work / "ct.nii.gz"
        make_ct(ct, tuple(args.shape), tuple(args.spacing))
        if args.wait_policy != "default":
            env["OMP_WAIT_POLICY"] = args.wait_policy.upper()
        if args.spin_count is not None:
            env["GOMP_SPINCOUNT"] = str(args.spin_count)
        _wait(_predict(ct, work / "warm", weights, env), time.perf_counter())  # compiles/caches kernels

        start = time.perf_counter()
        alone = _wait(_predict(ct, work / "alone", weights, env), start)
        start = time.perf_counter()
        pair = [_predict(ct, work / f"shared{i}", weights, env) for i in range(2)]
        # Each run's own end: wait for both at once (waiting in turn would time the later for both).
        with ThreadPoolExecutor(2) as pool:
            shared = list(pool.map(lambda p: _wait(p, start), pair))

    result = {
        "benchmark": "shared",
        "wait_policy": args.wait_policy,
        "spin_count": args.spin_count,
        "input": {"shape": args.shape, "spacing_mm": args.spacing},
        "alone_s": round(alone, 2),
        "shared_s": [round(s, 2) for s in shared],
        "ratio": [round(s / alone, 2) for s in shared],
    }
    record(result, args.results)


if __name__ == "__main__":
    main()
