"""The Python API against the command line on the same scan: `stuseg.segment` vs `stuseg predict`.

    python3 benchmarks/bench_api.py [--rounds 2] [--size small] [--ct PATH] [--precision P]

Each round runs, one after the other in fresh processes, `stuseg predict CT OUT --weights W
--device cpu` and a Python process that imports stuseg and calls `stuseg.segment(CT,
weights=W, device="cpu")` (what a notebook or a pipeline does), then the same two in the
opposite order. It records each run's wall time (process start to exit), its seconds in the
network and its peak RSS, one JSON line each in benchmarks/results.jsonl, and at the end one
line per round with the library's wall and network time over the command's (the target:
within 5%, a ratio of at most 1.05). Both get the environment this script was started with
(leave OMP_WAIT_POLICY and GOMP_SPINCOUNT unset to measure what each sets itself). Default CT:
the real 122 x 101 x 30 abdomen scan of the tests (3 mm); weights: random, real architecture.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

from common import RESULTS, record, scratch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CT = REPO / "tests" / "data" / "totalseg_results" / "abdomen_ct_sm.nii.gz"

LIBRARY = """
import json, resource, sys
import stuseg
seg = stuseg.segment(sys.argv[1], weights=sys.argv[2], device="cpu", precision=sys.argv[3])
print(json.dumps({"network_s": seg.timings["network"],
                  "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
"""


def run_cli(ct: Path, weights: Path, out: Path, env: dict[str, str], precision: str) -> dict[str, float]:
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "stuseg", "predict", str(ct), str(out), "--weights", str(weights)]
    cmd += ["--precision", precision]
    done = subprocess.run([*cmd, "--device", "cpu", "--overwrite"], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(done.stderr)
    summary = done.stderr.strip().splitlines()[-1]
    network = float(re.search(r"network ([\d.]+)s", summary)[1])
    rss = float(re.search(r"peak RAM ([\d.]+) GB", summary)[1])
    return {"wall_s": round(wall, 2), "network_s": network, "peak_rss_gb": rss}


def run_library(ct: Path, weights: Path, env: dict[str, str], precision: str) -> dict[str, float]:
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", LIBRARY, str(ct), str(weights), precision],
        env=env,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(done.stderr)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return {"wall_s": round(wall, 2), **{k: round(v, 2) for k, v in result.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--size", default="small")
    parser.add_argument("--ct", type=Path, default=DEFAULT_CT)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--precision", default="auto", choices=["auto", "float32", "bfloat16"])
    args = parser.parse_args()
    ratios = []
    with scratch(args.size) as (work, weights, env):
        run_library(args.ct, weights, env, args.precision)  # warm-up: numba's cache, the file cache
        for r in range(args.rounds):
            order = ("cli", "library") if r % 2 == 0 else ("library", "cli")
            both = {}
            for entry in order:
                if entry == "cli":
                    result = run_cli(args.ct, weights, work / "out", env, args.precision)
                else:
                    result = run_library(args.ct, weights, env, args.precision)
                both[entry] = result
                record(
                    {
                        "benchmark": "api",
                        "entry": entry,
                        "round": r,
                        "size": args.size,
                        "ct": args.ct.name,
                        "precision": args.precision,
                        **result,
                    },
                    args.results,
                )
            ratios.append({k: both["library"][k] / both["cli"][k] for k in ("wall_s", "network_s")})
    for r, ratio in enumerate(ratios):
        verdict = "within 5%" if ratio["wall_s"] <= 1.05 else "NOT within 5%"
        print(
            f"round {r}: library / command: wall {ratio['wall_s']:.3f}, network "
            f"{ratio['network_s']:.3f} ({verdict})"
        )


if __name__ == "__main__":
    main()
