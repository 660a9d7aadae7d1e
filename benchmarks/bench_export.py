"""Time of the two exports alone, on smooth and on noisy network-resolution predictions.

    python3 benchmarks/bench_export.py [--results FILE]

The exports' cost depends on how many output voxels lie where the network-resolution labels
change: a trained network predicts smooth structures, random weights (as in bench_predict.py)
predict noise. This feeds both kinds of prediction, at the size of the 512 x 512 x 300 CT at
0.8 x 0.8 x 1.0 mm (network grid 200 x 273 x 273 -> 300 x 512 x 512), to the fast export and
to the streaming normal export, and prints one JSON line each (time of the export only; the
probabilities are made slab by slab outside the timed part; the compiled kernels are
loaded, or compiled, before timing).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import scipy.ndimage as ndi
import torch
from common import RESULTS, record

from stuseg.inference.pipeline import keep_freed_memory
from stuseg.inference.postprocess import ProbabilityExport, resample_labels
from stuseg.inference.predict import Slab

NET = (200, 273, 273)
OUT = (300, 512, 512)
K = 105


def label_field(kind: str) -> np.ndarray:
    rng = np.random.default_rng(0)
    if kind == "noisy":
        return rng.integers(0, K, NET).astype(np.uint8)
    # Structures of about 15-25 voxels (2-4 cm at 1.5 mm), background in between.
    coarse = rng.integers(0, K, (12, 16, 16)).astype(np.uint8)
    coarse[rng.random(coarse.shape) < 0.5] = 0
    return ndi.zoom(coarse, np.array(NET) / np.array(coarse.shape), order=0, mode="nearest", grid_mode=True)


def slabs(labels: np.ndarray, rows: int = 8):
    """Softmax-like probabilities peaked at the label (p ~ 0.6), axis 0, in slabs."""
    for lo in range(0, labels.shape[0], rows):
        lab = torch.from_numpy(labels[lo : lo + rows]).long()
        logits = torch.randn((*lab.shape, K), generator=torch.Generator().manual_seed(lo)) * 0.3
        logits.scatter_(-1, lab.unsqueeze(-1), 5.0)
        yield Slab(0, lo, lo + lab.shape[0], torch.softmax(logits, -1), torch.ones(lab.shape))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    keep_freed_memory()  # as segment() does on the CPU
    # Compile (or load) the kernels first, on a tiny input with the same array layouts.
    resample_labels(np.zeros((4, 4, 4), np.uint8), (6, 6, 6), None)
    warm = ProbabilityExport((4, 4, 4), (6, 6, 6), None, 0, K)
    for slab in slabs(np.zeros((4, 4, 4), np.uint8), rows=2):
        warm.add(slab)
    for kind in ("smooth", "noisy"):
        labels = label_field(kind)
        start = time.perf_counter()
        resample_labels(labels, OUT, None)
        fast = time.perf_counter() - start
        export = ProbabilityExport(NET, OUT, None, 0, K)
        normal = 0.0
        for slab in slabs(labels):
            start = time.perf_counter()
            export.add(slab)
            normal += time.perf_counter() - start
        export.result()
        result = {
            "benchmark": "export only",
            "prediction": kind,
            "net_shape": NET,
            "out_shape": OUT,
            "fast_export_s": round(fast, 2),
            "normal_export_s": round(normal, 2),
            "torch_threads": torch.get_num_threads(),
        }
        record(result, args.results)


if __name__ == "__main__":
    main()
