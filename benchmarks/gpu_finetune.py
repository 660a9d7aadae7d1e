"""Fine-tuning speed and memory on a GPU: seconds per epoch and peak GPU memory, small and base.

    python3 benchmarks/gpu_finetune.py [--sizes small base] [--epochs 3] [--iterations 50]
                                       [--device cuda] [--out DIR]

For a machine with an NVIDIA GPU (never needed by the tests). For each size: a synthetic
labelled dataset of CT-like volumes (8 cases of 160 x 160 x 128 voxels at 1 x 1 x 1.5 mm, two
shapes to segment) goes through ``stuseg finetune prepare``, then ``stuseg finetune train`` (nnU-Net
v2 plans it: a realistic patch for that spacing) with generated pretrained weights of that size,
fold ``all``, ``--epochs`` epochs of ``--iterations`` iterations. Reported per size: nnU-Net's
own epoch times (the first epoch apart: it pays for start-up), the patch and batch size nnU-Net
planned, and the peak GPU memory of the training process, sampled every 0.2 s with
``nvidia-smi --query-compute-apps`` (the training runs in a child process; the sampling sees
its whole footprint, the CUDA context included). ``--device cpu`` runs the same thing on the CPU
(a smoke check of the script; no GPU memory then). One JSON line per size goes to stdout and
DIR/gpu_finetune.jsonl; record the numbers in RESULTS.md only from a real run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from stuseg.model.network import SIZES, build_network


def write_cases(folder: Path, n: int, shape: tuple[int, int, int], seed: int = 0) -> None:
    """``n`` CT-like volumes with a bright sphere (label 1) and a dark box (label 2) each."""
    rng = np.random.default_rng(seed)
    images, labels = folder / "images", folder / "labels"
    images.mkdir(parents=True)
    labels.mkdir()
    affine = np.diag([1.0, 1.0, 1.5, 1.0])
    grid = np.indices(shape)
    for i in range(n):
        ct = rng.normal(40, 20, shape).astype(np.float32)
        ct[:, :, :8] = -1000  # air
        seg = np.zeros(shape, np.uint8)
        size = np.array(shape)
        centre = rng.integers(size // 4, 3 * size // 4)
        radius = rng.integers(min(shape) // 8, min(shape) // 5 + 1)
        sphere = ((grid - centre[:, None, None, None]) ** 2).sum(0) < radius**2
        ct[sphere] += 150
        seg[sphere] = 1
        side = min(shape) // 4
        lo = rng.integers(8, size - side)
        box = tuple(slice(a, a + side) for a in lo)
        ct[box] -= 120
        seg[box] = np.where(seg[box] == 0, 2, seg[box])
        nib.save(nib.Nifti1Image(ct, affine), images / f"case{i:02d}.nii.gz")
        nib.save(nib.Nifti1Image(seg, affine), labels / f"case{i:02d}.nii.gz")


def pretrained_file(size: str, path: Path) -> Path:
    """Generated weights of ``size`` (the published 105-class layout) as a safetensors file."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    net = build_network(SIZES[size])
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return path


class GpuPeak:
    """The largest GPU memory (MiB) any process of ``pids()`` held, sampled with nvidia-smi."""

    def __init__(self) -> None:
        self.peak_mib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.available = shutil.which("nvidia-smi") is not None

    def _run(self) -> None:
        query = ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"]
        while not self._stop.is_set():
            out = subprocess.run(query, capture_output=True, text=True, check=False).stdout
            for line in out.splitlines():
                parts = [p.strip() for p in line.split(",")]
                if len(parts) == 2 and parts[1].isdigit() and int(parts[0]) != os.getpid():
                    self.peak_mib = max(self.peak_mib, int(parts[1]))
            self._stop.wait(0.2)

    def __enter__(self) -> GpuPeak:
        if self.available:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self.available:
            self._thread.join()


def run_size(size: str, args: argparse.Namespace, work: Path) -> dict:
    data = work / size / "pairs"
    write_cases(data, args.cases, tuple(args.shape))
    dataset = work / size / "Dataset501_Bench"
    stuseg = [sys.executable, "-m", "stuseg"]
    subprocess.run(
        [*stuseg, "finetune", "prepare", data, "-o", dataset, "--labels", "sphere,box"], check=True
    )
    weights = pretrained_file(size, work / size / f"{size}.safetensors")
    run = work / size / "run"
    cmd = [
        *stuseg, "finetune", "train", dataset, "-o", run, "--size", size, "--fold", "all",
        "--epochs", str(args.epochs), "--iterations-per-epoch", str(args.iterations),
        "--weights", weights, "--device", args.device, "--no-final-validation",
    ]  # fmt: skip
    start = time.perf_counter()
    with GpuPeak() as gpu:
        subprocess.run([str(c) for c in cmd], check=True)
    wall = time.perf_counter() - start
    model = (run / "model").resolve()
    plans = json.loads((model / "plans.json").read_text())["configurations"]["3d_fullres"]
    epoch_times = []
    for log in sorted((model / "fold_all").glob("training_log_*.txt")):
        for line in log.read_text().splitlines():
            if "Epoch time:" in line:
                epoch_times.append(float(line.split("Epoch time:")[1].split()[0]))
    steady = epoch_times[1:] or epoch_times
    return {
        "what": "finetune",
        "size": size,
        "device": args.device,
        "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" and torch.cuda.is_available() else None,
        "patch_size": plans["patch_size"],
        "batch_size": plans["batch_size"],
        "iterations_per_epoch": args.iterations,
        "epoch_seconds": epoch_times,
        "seconds_per_epoch_after_first": float(np.mean(steady)) if steady else None,
        "peak_gpu_mib": gpu.peak_mib if gpu.available else None,
        "wall_seconds": wall,
        "torch": torch.__version__,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", nargs="+", default=["small", "base"])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=50)
    parser.add_argument("--cases", type=int, default=8)
    parser.add_argument("--shape", type=int, nargs=3, default=[160, 160, 128])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", type=Path, default=Path("."))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="stuseg-gpu-finetune-") as tmp:
        for size in args.sizes:
            record = run_size(size, args, Path(tmp))
            line = json.dumps(record)
            print(line, flush=True)
            with (args.out / "gpu_finetune.jsonl").open("a") as f:
                f.write(line + "\n")


if __name__ == "__main__":
    main()
