"""CUDA checks and GPU timings, in one run on a machine with an NVIDIA GPU.

    python3 benchmarks/gpu_check.py [--out DIR] [--sizes small base large huge]

1. Numerics: float16 autocast on the GPU against float32 on the CPU for one 128^3 tile
   (probabilities and argmax), and for the whole pipeline (fast and normal export) on a
   small synthetic CT, same random weights.
2. Timings: `segment()` + writing the masks on a synthetic 512 x 512 x 300 CT at
   0.8 x 0.8 x 1.0 mm for each size (fast mode; base also normal and TTA), with the stage
   times and peak GPU memory.

Weights are random (the real architecture): speed and memory do not depend on them, and
random weights make near-ties far more common than trained ones, so the agreement measured
here is a pessimistic bound. One JSON line per measurement goes to stdout and DIR/gpu.jsonl.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_predict import make_ct

from stuseg.inference import pipeline
from stuseg.inference.head import ClassProbabilities
from stuseg.model.network import build_network
from stuseg.results import labelmaps


def random_net(size: str, device: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    net = build_network(size, device=device)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.05)
    return net.eval()


def emit(out: Path, record: dict) -> None:
    line = json.dumps(record)
    print(line, flush=True)
    with (out / "gpu.jsonl").open("a") as fh:
        fh.write(line + "\n")


def tile_agreement(out: Path) -> None:
    cpu = random_net("small", "cpu")
    gpu = random_net("small", "cuda")
    gpu.load_state_dict(cpu.state_dict())
    x = torch.randn(1, 1, 128, 128, 128)
    with torch.inference_mode():
        p_cpu = ClassProbabilities(cpu)(x)
        with torch.autocast("cuda", dtype=torch.float16):
            p_gpu = ClassProbabilities(gpu)(x.cuda())
    p_gpu = p_gpu.float().cpu()
    emit(
        out,
        {
            "check": "tile fp16 (GPU) vs fp32 (CPU)",
            "max_abs_prob_diff": float((p_gpu - p_cpu).abs().max()),
            "argmax_agreement": float((p_gpu.argmax(-1) == p_cpu.argmax(-1)).float().mean()),
        },
    )


def pipeline_agreement(out: Path, work: Path) -> None:
    ct = work / "small_ct.nii.gz"
    make_ct(ct, (200, 200, 120), (1.2, 1.2, 2.0))
    cpu_net = random_net("small", "cpu")
    for fast in (True, False):
        ref = pipeline.segment(ct, model=cpu_net, fast=fast, device="cpu").labels
        gpu_net = random_net("small", "cuda")
        gpu_net.load_state_dict(cpu_net.state_dict())
        got = pipeline.segment(ct, model=gpu_net, fast=fast, device="cuda").labels
        emit(
            out,
            {
                "check": f"pipeline GPU fp16 vs CPU fp32, {'fast' if fast else 'normal'}",
                "voxel_agreement": float((got == ref).mean()),
                "labels_present": len(np.unique(ref)),
            },
        )


def timings(out: Path, work: Path, sizes: list[str]) -> None:
    ct = work / "ct.nii.gz"
    make_ct(ct, (512, 512, 300), (0.8, 0.8, 1.0))
    runs = [(s, True, False) for s in sizes]
    if "base" in sizes:
        runs += [("base", False, False), ("base", True, True)]
    for size, fast, tta in runs:
        net = random_net(size, "cuda")
        torch.cuda.synchronize()
        start = time.perf_counter()
        try:
            seg = pipeline.segment(ct, model=net, size=size, fast=fast, tta=tta, device="cuda")
        except Exception as exc:  # report and go on to the next size
            emit(out, {"size": size, "fast": fast, "tta": tta, "error": str(exc)[:300]})
            del net
            torch.cuda.empty_cache()
            continue
        t0 = time.perf_counter()
        labelmaps.save_masks(work / f"out-{size}-{fast}-{tta}", seg.labels, seg.image.header, seg.names)
        seg.timings["write"] = time.perf_counter() - t0
        wall = time.perf_counter() - start
        emit(
            out,
            {
                "size": size,
                "mode": "fast" if fast else "normal",
                "tta": tta,
                "wall_s": round(wall, 2),
                "stages_s": {k: round(v, 2) for k, v in seg.timings.items()},
                "peak_gpu_gb": round((seg.peak_gpu_bytes or 0) / 2**30, 2),
                "peak_rss_gb": round((seg.peak_rss_bytes or 0) / 2**30, 2),
                "gpu": torch.cuda.get_device_name(),
                "torch": torch.__version__,
            },
        )
        del net, seg
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--sizes", nargs="+", default=["small", "base", "large", "huge"])
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device")
    with tempfile.TemporaryDirectory() as tmp:
        tile_agreement(args.out)
        pipeline_agreement(args.out, Path(tmp))
        timings(args.out, Path(tmp), args.sizes)


if __name__ == "__main__":
    main()
