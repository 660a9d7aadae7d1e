"""One sliding-window tile through the network: FLOPs, seconds and the share of the CPU's peak.

    python3 benchmarks/bench_tile.py [--size small] [--repeats 3]

FLOPs are the network's own count (``torch.utils.flop_counter``: 2 per multiply-add of every
convolution, the only ops it counts) for one 1 x 1 x 128^3 tile. Each variant (float32 as
stuseg runs it, channels-last layouts, and bfloat16 ones where the CPU has a bfloat16
instruction set: see ``_variants``) runs one warm-up pass, then ``--repeats`` timed passes,
alternating, in this one process with the command's malloc tuning
(``stuseg.memory.tune_process``). The CPU's theoretical float32 peak
is printed beside it from what the machine says: cores x the clock ``/proc/cpuinfo`` reports x
FLOPs per cycle of its widest vector unit (AVX-512: 2 FMA units x 16 lanes x 2 = 64; AVX2: 32),
an estimate where the clock under load differs from the reported one. ``--profile`` prints, for
each variant, the operators that took the most time in one more pass (torch.profiler).
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
    parser.add_argument("--profile", action="store_true", help="print the top operators per variant")
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
    variants = _variants(torch, net, x, bool(facts["bf16_flags"]))
    seconds: dict[str, list[float]] = {name: [] for name in variants}

    def one(name: str) -> float:
        model, tensor, autocast = variants[name]
        with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            start = time.perf_counter()
            model(tensor)
            return time.perf_counter() - start

    for name in variants:
        one(name)  # warm-up: oneDNN picks and caches its kernels
    for _ in range(args.repeats):
        for name in variants:
            seconds[name].append(one(name))
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        for name in variants:
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                one(name)
            print(f"--- {name}: operators by own CPU time (one pass)")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=6))
    for name in variants:
        best = min(seconds[name])
        record(
            {
                "benchmark": "tile",
                "size": args.size,
                "precision": name,
                "gflop_per_tile": round(flops / 1e9, 1),
                "seconds": [round(s, 3) for s in seconds[name]],
                "gflops_best": round(flops / 1e9 / best, 1),
                "torch_threads": torch.get_num_threads(),
                "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                **facts,
            },
            args.results,
        )


def _variants(torch, net, x, bf16: bool) -> dict[str, tuple]:
    """name -> (network, input, autocast to bfloat16): the same weights in each layout and type.

    ``float32``: as stuseg runs today. ``*-channels-last``: network and input in
    ``torch.channels_last_3d`` (oneDNN's own layout, no reorder around each convolution).
    ``bfloat16-autocast``: ``torch.autocast`` (the norms stay float32). ``bfloat16-weights``:
    the network converted to bfloat16 (activations stay bfloat16 between layers).
    """
    import copy

    last = torch.channels_last_3d
    net_cl = copy.deepcopy(net).to(memory_format=last)
    x_cl = x.contiguous(memory_format=last)
    found = {"float32": (net, x, False), "float32-channels-last": (net_cl, x_cl, False)}
    if bf16:
        net_b = copy.deepcopy(net).to(torch.bfloat16).to(memory_format=last)
        found |= {
            "bfloat16-autocast": (net, x, True),
            "bfloat16-autocast-channels-last": (net_cl, x_cl, True),
            "bfloat16-weights-channels-last": (net_b, x_cl.to(torch.bfloat16), False),
        }
    return found


if __name__ == "__main__":
    main()
