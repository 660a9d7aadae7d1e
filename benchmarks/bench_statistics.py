"""Time of ``stuseg.analysis.statistics.compute`` on a 512 x 512 x 300 CT with a smooth 104-label map.

    python3 benchmarks/bench_statistics.py [--shape 512 512 300] [--repeat 3] [--results FILE]

The CT is synthetic (float32 "HU", as ``stuseg.images.io.read_image`` returns it, Fortran order as
nibabel reads it); the label map holds the 104 structures as blocks of about 32 x 32 x 19
voxels with background in between (about half of the voxels labelled), so every structure has
tens of thousands to millions of voxels. The compiled loop is loaded (or compiled) before timing;
the first call's time is reported separately. Prints one JSON line and appends it to
``--results``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import scipy.ndimage as ndi
from common import RESULTS, record

from stuseg.analysis import statistics
from stuseg.structures.labels import STRUCTURES


def make_inputs(shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    coarse = rng.integers(1, len(STRUCTURES) + 1, (16, 16, 16)).astype(np.uint8)
    coarse[rng.random(coarse.shape) < 0.5] = 0
    labels = ndi.zoom(
        coarse, np.array(shape) / np.array(coarse.shape), order=0, mode="nearest", grid_mode=True
    )
    labels = np.asfortranarray(labels)
    ct = np.asfortranarray(rng.normal(40, 300, shape).astype(np.float32).round())
    return labels, ct


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", type=int, nargs=3, default=(512, 512, 300))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    shape = tuple(args.shape)
    labels, ct = make_inputs(shape)
    affine = np.diag([0.8, 0.8, 1.0, 1.0])
    names = dict(enumerate(STRUCTURES, start=1))

    start = time.perf_counter()
    statistics.warm_up()  # load the compiled loop from numba's cache, or compile it
    load_s = time.perf_counter() - start
    times = []
    for _ in range(args.repeat):
        start = time.perf_counter()
        stats = statistics.compute(labels, affine, ct, names, size="base", mode="fast")
        times.append(time.perf_counter() - start)
    present = sum(1 for r in stats.structures if r["voxels"])
    line = {
        "bench": "statistics",
        "shape": list(shape),
        "labelled_fraction": round(float((labels > 0).mean()), 3),
        "structures_present": present,
        "kernel_load_s": round(load_s, 3),
        "compute_s": [round(t, 3) for t in times],
        "best_s": round(min(times), 3),
    }
    record(line, args.results)


if __name__ == "__main__":
    main()
