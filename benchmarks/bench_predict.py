"""Time and memory of `stuseg predict` on a synthetic CT, one fresh process per run.

    python3 benchmarks/bench_predict.py --mode fast --mode normal [--size small] [--device cpu]
        [--precision float32 --precision bfloat16] [--rounds 1]

Every mode runs in every precision (repeatable; default auto), the precisions alternating
within a mode, and the whole again for each of ``--rounds``: back to back on one machine.

Each run happens in a child process (so its peak RSS is its own): it reads the CT, segments
it, writes the 104 masks, and prints one JSON line with the wall time, the time per stage and
the peak RSS. The parent appends the lines to benchmarks/results.jsonl.

The CT is synthetic (512 x 512 x 300 voxels at 0.8 x 0.8 x 1.0 mm by default, int16, CT-like
intensities) and the weights are random with the real architecture: timings and memory do
not depend on the weights' values.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from common import RESULTS, make_ct, record, scratch


def child(args: argparse.Namespace) -> None:
    """One measured run, in this (fresh) process."""
    from stuseg.inference.threads import limit_spin_waiting

    limit_spin_waiting()  # before torch loads, as the stuseg command does
    from stuseg.inference import pipeline
    from stuseg.results import labelmaps

    mode = args.mode[0]
    pipeline.keep_freed_memory(args.device)  # as the stuseg command does
    start = time.perf_counter()
    seg = pipeline.segment(
        args.input,
        size=args.size,
        fast=mode == "fast",
        tta=args.tta,
        device=args.device,
        weights=args.weights,
        precision=args.precision[0],
    )
    t0 = time.perf_counter()
    labelmaps.save_masks(args.output, seg.labels, seg.image.header, seg.names)
    seg.timings["write"] = time.perf_counter() - t0
    wall = time.perf_counter() - start
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    not_network = wall - seg.timings.get("network", 0.0)
    print(
        json.dumps(
            {
                "mode": mode,
                "tta": args.tta,
                "size": args.size,
                "device": seg.device,
                "precision": seg.precision,
                "wall_s": round(wall, 2),
                "stages_s": {k: round(v, 2) for k, v in seg.timings.items()},
                "outside_network_fraction": round(not_network / wall, 4),
                "peak_rss_gb": round(rss / 2**30, 3),
                "peak_gpu_gb": round(seg.peak_gpu_bytes / 2**30, 3) if seg.peak_gpu_bytes else None,
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mode", action="append", choices=["fast", "normal"], help="repeatable")
    parser.add_argument("--size", default="small")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tta", action="store_true")
    parser.add_argument("--shape", type=int, nargs=3, default=[512, 512, 300])
    parser.add_argument("--spacing", type=float, nargs=3, default=[0.8, 0.8, 1.0])
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument(
        "--precision", action="append", choices=["auto", "float32", "bfloat16", "float16"], help="repeatable"
    )
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--input", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--output", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--weights", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    with scratch(args.size) as (work, weights, env):
        ct = work / "ct.nii.gz"
        make_ct(ct, tuple(args.shape), tuple(args.spacing))
        runs = [
            (m, p)
            for _ in range(args.rounds)
            for m in args.mode or ["fast"]
            for p in args.precision or ["auto"]
        ]
        for mode, precision in runs:
            cmd = [
                sys.executable,
                __file__,
                "--child",
                "--mode",
                mode,
                "--size",
                args.size,
                "--device",
                args.device,
            ]
            cmd += ["--input", str(ct), "--output", str(work / f"out-{mode}"), "--weights", str(weights)]
            cmd += ["--tta"] if args.tta else []
            cmd += ["--precision", precision]
            done = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
            result = json.loads(done.stdout.strip().splitlines()[-1])
            result.update(
                input={"shape": args.shape, "spacing_mm": args.spacing},
                torch_threads=_torch_threads(),
                native_bfloat16=_native_bfloat16(),
            )
            record(result, args.results)


def _native_bfloat16() -> str | None:
    from stuseg.model.precision import native_bfloat16

    return native_bfloat16()


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":
    main()
