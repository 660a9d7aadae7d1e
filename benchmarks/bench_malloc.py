"""What glibc's malloc settings cost and save on the network's tiles: seconds per tile, peak RSS.

    python3 benchmarks/bench_malloc.py [--size small] [--tiles 8] [--rounds 2]
        [--setting NAME ...]

Each setting runs in a fresh process (glibc cannot take a setting back), set up as the command
line sets itself up (OpenMP spin limit, every CPU the process may use), and passes ``--tiles``
random 1 x 1 x 128^3 tiles through STU-Net's features (what stuseg's sliding window runs; the
head is applied in small chunks and adds little memory). The first tile is a warm-up (oneDNN
picks its kernels, the heap grows); the others are timed. Peak RSS is sampled every 10 ms from
``/proc/self/statm`` and checked against ``ru_maxrss``; "start" is the RSS before the first tile
(the interpreter, torch and the weights). Rounds alternate the settings.

The settings (``SETTINGS``):

- ``glibc``: glibc's defaults: blocks of 128 KiB and more (a threshold that grows up to 32 MiB
  as freed mmapped blocks come back) each get a fresh ``mmap``, faulted in page by page.
- ``stuseg``: what ``stuseg predict`` sets (``stuseg.inference.memory.tune_process``): every block
  from the heap, which is never trimmed by malloc itself, so freed pages are reused at once.
- ``mmap-above-<N>MB``: the heap and no trimming below N MiB, a fresh ``mmap`` above it (the
  largest activations), a middle way between the two.
- ``+thp``: torch's own ``THP_MEM_ALLOC_ENABLE=1``: its CPU blocks of 2 MiB and more are aligned to
  2 MiB and advised as transparent huge pages, so a fresh ``mmap`` faults 2 MiB at a time (where
  the kernel's ``transparent_hugepage`` setting is ``madvise`` or ``always``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from common import RESULTS, record

SETTINGS = (
    "glibc",
    "stuseg",
    "mmap-above-64MB",
    "mmap-above-128MB",
    "glibc+thp",
    "mmap-above-128MB+thp",
    "stuseg+thp",
)
# From glibc's malloc.h.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def one(setting: str, size: str, tiles: int) -> dict[str, object]:
    """Run ``tiles`` tiles under ``setting`` in this process (a fresh one: see the docstring)."""
    import ctypes
    import threading
    import time

    from stuseg.inference.threads import limit_spin_waiting

    limit_spin_waiting()
    import torch

    from stuseg.inference import memory
    from stuseg.model.network import build_network

    base = setting.removesuffix("+thp")
    if base == "stuseg":
        memory.tune_process()
    elif base.startswith("mmap-above-"):
        libc = ctypes.CDLL("libc.so.6")
        megabytes = int(base.removeprefix("mmap-above-").removesuffix("MB"))
        libc.mallopt(_M_MMAP_THRESHOLD, megabytes * 2**20)  # also turns its dynamic growth off
        libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
    elif base != "glibc":
        raise SystemExit(f"unknown setting {setting}; one of {', '.join(SETTINGS)}")
    torch.manual_seed(0)
    net = build_network(size).eval()
    x = torch.randn(1, 1, 128, 128, 128)
    page = os.sysconf("SC_PAGE_SIZE")

    def rss() -> int:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * page

    peak, running = [0], [True]

    def sample() -> None:
        while running[0]:
            peak[0] = max(peak[0], rss())
            time.sleep(0.01)

    start_rss = rss()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    seconds = []
    with torch.inference_mode():
        for _ in range(tiles):
            start = time.perf_counter()
            net.features(x)
            seconds.append(round(time.perf_counter() - start, 3))
    running[0] = False
    sampler.join()
    timed = sorted(seconds[1:])
    return {
        "benchmark": "malloc",
        "setting": setting,
        "size": size,
        "first_tile_s": seconds[0],
        "tile_s": seconds[1:],
        "median_tile_s": timed[len(timed) // 2],
        "start_rss_gb": round(start_rss / 1e9, 3),
        "peak_rss_gb": round(max(peak[0], memory.peak_rss_bytes() or 0) / 1e9, 3),
        "torch_threads": torch.get_num_threads(),
        "transparent_hugepage": _thp_mode(),
    }


def _thp_mode() -> str | None:
    """The kernel's transparent huge page mode (``always``, ``madvise`` or ``never``), if it says."""
    path = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    text = path.read_text() if path.exists() else ""
    chosen = [word.strip("[]") for word in text.split() if word.startswith("[")]
    return chosen[0] if chosen else None


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", default="small")
    parser.add_argument("--tiles", type=int, default=8, help="tiles per run, the first a warm-up")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--setting", action="append", choices=SETTINGS, help="default: all")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # the child process's setting
    args = parser.parse_args()
    if args.tiles < 2:
        parser.error("--tiles must be at least 2 (the first is a warm-up)")
    if args.one:
        print(json.dumps(one(args.one, args.size, args.tiles)))
        return
    for round_ in range(args.rounds):
        for setting in args.setting or SETTINGS:
            env = dict(os.environ)
            env.pop("THP_MEM_ALLOC_ENABLE", None)
            if setting.endswith("+thp"):
                env["THP_MEM_ALLOC_ENABLE"] = "1"
            child = [
                sys.executable,
                __file__,
                "--one",
                setting,
                "--size",
                args.size,
                "--tiles",
                str(args.tiles),
            ]
            done = subprocess.run(child, env=env, capture_output=True, text=True, check=True)
            result = json.loads(done.stdout.strip().splitlines()[-1])
            record({**result, "round": round_}, args.results)


if __name__ == "__main__":
    main()
