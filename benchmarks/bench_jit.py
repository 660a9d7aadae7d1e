"""First-use cost of the compiled export loops (stuseg.inference.kernels): a cold and a warm numba cache.

    python3 benchmarks/bench_jit.py

Runs a small segmentation (64^3 voxels, small model, random weights) in fast and in normal mode
in two fresh processes sharing an empty NUMBA_CACHE_DIR: the first compiles the kernels and
caches them, the second loads them. The difference in the export stage is the compile time a
user pays once per machine (and again after upgrading stuseg).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time


def child() -> None:
    import nibabel as nib
    import numpy as np

    from stuseg.images.io import Volume
    from stuseg.inference import pipeline
    from stuseg.model.network import build_network

    affine = np.diag([1.5, 1.5, 1.5, 1.0])
    data = np.random.default_rng(0).normal(-200, 300, (64, 64, 64)).astype(np.float32)
    volume = Volume(data=data, affine=affine, header=nib.Nifti1Image(data, affine).header)
    net = build_network("small")
    result = {}
    for fast in (True, False):
        start = time.perf_counter()
        seg = pipeline.segment(volume, fast=fast, model=net, device="cpu")
        result["fast" if fast else "normal"] = {
            "export_s": round(seg.timings["export"], 2),
            "wall_s": round(time.perf_counter() - start, 2),
        }
    print(json.dumps(result))


def main() -> None:
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "NUMBA_CACHE_DIR": cache}
        for run in ("cold cache", "warm cache"):
            done = subprocess.run(
                [sys.executable, __file__, "--child"], env=env, check=True, capture_output=True, text=True
            )
            print(run, done.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    child() if "--child" in sys.argv else main()
