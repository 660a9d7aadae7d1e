"""One sliding-window tile through the network: FLOPs, seconds and the share of the CPU's peak.

    python3 benchmarks/bench_tile.py [--size small] [--repeats 3] [--precision float32]
        [--compile] [--threads N] [--profile]

FLOPs are the network's own count (``torch.utils.flop_counter``: 2 per multiply-add of every
convolution, the only ops it counts) for one 1 x 1 x 128^3 tile. Each variant (float32 as
stuseg runs it, channels-last layouts, and bfloat16 ones where the CPU has a bfloat16
instruction set: see ``_variants``; ``--precision`` keeps one type's) runs one warm-up pass,
then ``--repeats`` timed passes, alternating, in this one process with the command's malloc
tuning (``stuseg.inference.memory.tune_process``). ``--compile`` adds each variant compiled by
``torch.compile`` (inductor, which fuses each norm with its activation; the first pass, which
compiles, is the warm-up). ``--threads N`` sets torch's intra-op threads (default: every CPU
the process may use).

The CPU's theoretical peak is printed beside each result (``cpu_facts``): cores x the clock
``/proc/cpuinfo`` reports x FLOPs per cycle per core of the unit that type runs on:

- float32: FMA units x lanes x 2. Intel with AVX-512: 2 units x 16 lanes x 2 = 64 (Xeons
  with one 512-bit unit have half); AMD Zen 4 (family 25 with AVX-512): two 256-bit units,
  32; Zen 5 (family 26): 64; AVX2 only: 2 x 8 x 2 = 32.
- bfloat16: AMX-BF16: 1024 per core (one TMUL: a 16 x 32 by 32 x 16 bfloat16 tile product,
  16 x 16 x 32 x 2 = 16384 FLOPs, every 16 cycles); AVX512_BF16 (``vdpbf16ps``: two bfloat16
  products per float32 lane): twice float32's; without either, float32's (emulated).

An estimate where the clock under load differs from the reported one (turbo, or a VM that
reports its host's base clock). ``--profile`` prints, for each variant, the operators that took
the most time in one more pass (torch.profiler).
"""

from __future__ import annotations

import argparse
import os
import re
import time
from pathlib import Path

from common import RESULTS, record


def cpu_facts() -> dict[str, object]:
    """Cores this process may use, the reported clock, vector flags and the peaks they give
    (see the module's docstring), from /proc/cpuinfo."""
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""

    def field(name: str) -> str:
        found = re.search(rf"^{name}\s*:\s*(.*)$", text, re.MULTILINE)
        return found[1].strip() if found else ""

    flags = set(field("flags").split())
    amd_family = int(field("cpu family") or 0) if field("vendor_id") == "AuthenticAMD" else None
    fp32 = (32 if amd_family == 25 else 64) if "avx512f" in flags else 32 if "avx2" in flags else None
    bf16 = 1024 if "amx_bf16" in flags else (2 * fp32 if fp32 and "avx512_bf16" in flags else fp32)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    ghz = float(field("cpu MHz")) / 1000 if field("cpu MHz") else None

    def peak(per_cycle: int | None) -> float | None:
        return round(cores * ghz * per_cycle, 1) if ghz and per_cycle and cores else None

    return {
        "cpu_model": field("model name"),
        "cores": cores,
        "reported_ghz": ghz,
        "fp32_flops_per_cycle": fp32,
        "bf16_flops_per_cycle": bf16,
        "fp32_peak_gflops_at_reported_clock": peak(fp32),
        "bf16_peak_gflops_at_reported_clock": peak(bf16),
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
    parser.add_argument("--precision", choices=["float32", "bfloat16"], help="only this type's variants")
    parser.add_argument("--compile", action="store_true", help="add torch.compile'd variants")
    parser.add_argument("--threads", type=int, help="torch's intra-op threads")
    args = parser.parse_args()

    from stuseg.inference.threads import limit_spin_waiting

    limit_spin_waiting()  # before torch loads, as the command does
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from stuseg.inference import memory
    from stuseg.model.network import build_network

    memory.tune_process()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    net = build_network(args.size).eval()
    x = torch.randn(1, 1, 128, 128, 128)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        net(x)
    flops = counter.get_total_flops()
    facts = cpu_facts()
    variants = _variants(torch, net, x, bool(facts["bf16_flags"]))
    if args.precision:
        variants = {k: v for k, v in variants.items() if k.startswith(args.precision)}
    if args.compile:
        variants |= {f"{k}-compiled": (torch.compile(n), t, a) for k, (n, t, a) in variants.items()}
    seconds: dict[str, list[float]] = {name: [] for name in variants}

    def one(name: str) -> float:
        model, tensor, autocast = variants[name]
        with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            start = time.perf_counter()
            model(tensor)
            return time.perf_counter() - start

    # The warm-up pass: oneDNN picks and caches its kernels; a compiled variant compiles.
    first = {name: one(name) for name in variants}
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
        peak = facts[
            "bf16_peak_gflops_at_reported_clock"
            if "bfloat16" in name
            else "fp32_peak_gflops_at_reported_clock"
        ]
        record(
            {
                "benchmark": "tile",
                "size": args.size,
                "precision": name,
                "gflop_per_tile": round(flops / 1e9, 1),
                "seconds": [round(s, 3) for s in seconds[name]],
                "first_pass_seconds": round(first[name], 2),
                "gflops_best": round(flops / 1e9 / best, 1),
                "share_of_peak": round(flops / 1e9 / best / peak, 3) if peak else None,
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

    These run the whole network, its last 1x1 layer (16 -> 105 channels at full resolution)
    included. stuseg runs only ``net.features`` in the network's type and that layer in float32
    (``stuseg.inference.head``): ``*-features`` time ``net.features`` alone, ``float32-features``
    as stuseg's float32 runs it, ``float32-features-channels-last`` the same in channels-last
    (where inductor's float32 was fastest: RESULTS.md, 2026-12-07 21:37),
    ``bfloat16-features-stuseg`` as ``--precision bfloat16`` runs it on the CPU
    (``stuseg.model.network.to_channels_last``: channels-last, norms by ``group_norm``, autocast).
    Their GFLOP/s use the whole network's count (the last layer is 3% of it).
    """
    import copy

    from stuseg.model.network import to_channels_last

    last = torch.channels_last_3d
    net_cl = copy.deepcopy(net).to(memory_format=last)
    x_cl = x.contiguous(memory_format=last)
    found = {
        "float32": (net, x, False),
        "float32-channels-last": (net_cl, x_cl, False),
        "float32-features": (net.features, x, False),
        "float32-features-channels-last": (net_cl.features, x_cl, False),
    }
    if bf16:
        net_b = copy.deepcopy(net).to(torch.bfloat16).to(memory_format=last)
        net_stuseg = to_channels_last(copy.deepcopy(net))
        found |= {
            "bfloat16-autocast": (net, x, True),
            "bfloat16-autocast-channels-last": (net_cl, x_cl, True),
            "bfloat16-weights-channels-last": (net_b, x_cl.to(torch.bfloat16), False),
            "bfloat16-features-default-layout": (net.features, x, True),
            "bfloat16-features-stuseg": (net_stuseg.features, x_cl, True),
        }
    return found


if __name__ == "__main__":
    main()
