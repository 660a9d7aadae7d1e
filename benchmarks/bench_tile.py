"""One sliding-window tile through the network: FLOPs, seconds and the share of the CPU's peak.

    python3 benchmarks/bench_tile.py [--size small] [--repeats 3]

FLOPs are the network's own count (``torch.utils.flop_counter``: 2 per multiply-add of every
convolution, the only ops it counts) for one 1 x 1 x 128^3 tile. Each precision (float32, and
bfloat16 under ``torch.autocast("cpu")`` where the CPU has a bfloat16 instruction set) runs
one warm-up pass, then ``--repeats`` timed passes, alternating, in this one process with the
command's malloc tuning (``stuseg.memory.tune_process``). The CPU's theoretical float32 peak
is printed beside it from what the machine says: cores x the clock ``/proc/cpuinfo`` reports x
FLOPs per cycle of its widest vector unit (AVX-512: 2 FMA units x 16 lanes x 2 = 64; AVX2: 32),
an estimate where the clock under load differs from the reported one. ``--profile`` prints, for
each precision, the operators that took the most time in one more pass (torch.profiler).
"""

from __future__ import annotations

import argparse
import os
import re
import time
from pathlib import Path

from common import RESULTS, record


def cpu_facts() -> dict[str, object]:
    """Cores this process may use, the reported clock and vector flags, from /proc/cpuinfo."""
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    mhz = re.search(r"cpu MHz\s*:\s*([\d.]+)", text)
    flags = set((re.search(r"flags\s*:\s*(.*)", text) or [None, ""])[1].split())
    width = 64 if "avx512f" in flags else 32 if "avx2" in flags else None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    ghz = float(mhz[1]) / 1000 if mhz else None
    peak = cores * ghz * width if ghz and width else None
    return {
        "cores": cores,
        "reported_ghz": ghz,
        "fp32_flops_per_cycle": width,
        "fp32_peak_gflops_at_reported_clock": round(peak, 1) if peak else None,
        "bf16_flags": sorted(f for f in flags if "bf16" in f or f.startswith("amx")),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", default="small")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--profile", action="store_true", help="print the top operators per precision")
    args = parser.parse_args()

    from stuseg.threads import limit_spin_waiting

    limit_spin_waiting()  # before torch loads, as the command does
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from stuseg import memory
    from stuseg.network import build_network

    memory.tune_process()
    torch.manual_seed(0)
    net = build_network(args.size).eval()
    x = torch.randn(1, 1, 128, 128, 128)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        net(x)
    flops = counter.get_total_flops()
    facts = cpu_facts()
    precisions = ["float32"]
    if facts["bf16_flags"]:
        precisions.append("bfloat16")
    seconds: dict[str, list[float]] = {p: [] for p in precisions}

    def one(precision: str) -> float:
        autocast = torch.autocast("cpu", torch.bfloat16, enabled=precision == "bfloat16")
        with torch.inference_mode(), autocast:
            start = time.perf_counter()
            net(x)
            return time.perf_counter() - start

    for p in precisions:
        one(p)  # warm-up: oneDNN picks and caches its kernels
    for _ in range(args.repeats):
        for p in precisions:
            seconds[p].append(one(p))
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        for p in precisions:
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                one(p)
            print(f"--- {p}: operators by own CPU time (one pass)")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=6))
    for p in precisions:
        best = min(seconds[p])
        record(
            {
                "benchmark": "tile",
                "size": args.size,
                "precision": p,
                "gflop_per_tile": round(flops / 1e9, 1),
                "seconds": [round(s, 3) for s in seconds[p]],
                "gflops_best": round(flops / 1e9 / best, 1),
                "torch_threads": torch.get_num_threads(),
                "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                **facts,
            },
            args.results,
        )


if __name__ == "__main__":
    main()
