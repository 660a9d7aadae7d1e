"""The GPU end to end (issue 24, item 5), in one prepared run on a machine with an NVIDIA GPU.

    python3 benchmarks/gpu_check.py --out DIR [--sizes small base large huge] [--cohort 20]
        [--parts predict-fast batch predict-normal numerics] [--device cuda] [--shape 512 512 300]

The parts, run in this order (``--parts`` picks some, e.g. to finish a run that was cut short);
each appends its JSON lines to DIR/gpu.jsonl as it goes, so a run stopped early keeps what it
measured:

1. ``predict-fast``: each size in ``--fast`` mode on a synthetic CT of ``--shape`` voxels at
   0.8 x 0.8 x 1.0 mm, as ``bench_predict.py`` runs it (a fresh process per run, the command
   line's process set-up, the pipeline and the 104 masks written): wall time, seconds per stage,
   peak GPU memory (torch's peak allocation) and the process's peak host RSS.
2. ``batch``: ``python -m stuseg batch`` over a cohort of ``--cohort`` copies of that CT (hard
   links: each a case of its own), STU-Net base, ``--fast``: scans per minute as the command
   reports them, its wall time and peak RSS (``wait4``), and each stage's seconds summed over
   the cases from its run log. The network stage's share of the summed stages says whether the
   GPU waits on the host (reading, resampling, export, writing).
3. ``predict-normal``: as 1, in normal mode.
4. ``numerics``: float16 autocast on the GPU (``auto`` there) against float32 on the CPU, same
   random weights: one 128^3 tile (probabilities and argmax) and the whole pipeline on a small
   CT, fast and normal. Skipped with a line when ``--device`` is not CUDA.

Weights are random with the real architecture (speed and memory do not depend on them; random
weights make near-ties far more common than trained ones, so the agreement is a pessimistic
bound), written once per size as safetensors (huge: 5.8 GB) into a temporary folder.

``--device cpu --shape 96 96 64 --sizes small --cohort 2`` runs the same script in a minute on
a CPU, to check it before GPU time is spent on it.

On this workplace's device machine (tool ``run``, 15 minutes a session in all) the image lacks
some of stuseg's dependencies; they travel as wheels. Here, once: ``bash benchmarks/gpu_wheels.sh``
(into ``.whl/``, which it adds to ``.git/info/exclude``); then one ``run`` with carry ``[".whl"]``:

    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
    && python3 benchmarks/gpu_check.py --out $OUT 2>&1 | tee $OUT/log

(one line in the call). Its length is not measured yet: from the last H100 timings (``--fast``
6-12 s a size on 512 x 512 x 300) it should fit one 10-minute command with room; put
``predict-normal`` and ``numerics`` in a second call if the first is cut short.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_batch import _run, _summed
from common import make_ct, make_weights

PARTS = ("predict-fast", "batch", "predict-normal", "numerics")
HERE = Path(__file__).resolve().parent


def emit(out: Path, record: dict) -> None:
    """Print ``record`` as one JSON line and append it to DIR/gpu.jsonl."""
    line = json.dumps(record)
    print(line, flush=True)
    with (out / "gpu.jsonl").open("a") as fh:
        fh.write(line + "\n")


def about_the_machine(device: str) -> dict:
    import torch

    facts = {"torch": torch.__version__, "device": device, "cpus": os.cpu_count()}
    if device.startswith("cuda"):
        facts |= {"gpu": torch.cuda.get_device_name(), "cuda": torch.version.cuda}
    return facts


def predict(out: Path, work: Path, ct: Path, sizes: list[str], mode: str, device: str, env: dict) -> None:
    """One fresh ``bench_predict.py`` child per size: the pipeline and the masks, measured."""
    for size in sizes:
        cmd = [sys.executable, str(HERE / "bench_predict.py"), "--child", "--mode", mode, "--size", size]
        cmd += ["--device", device, "--precision", "auto", "--input", str(ct)]
        cmd += ["--output", str(work / f"out-{size}-{mode}"), "--weights", str(weights_of(work, size))]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0:  # report and go on to the next size
            emit(out, {"part": f"predict-{mode}", "size": size, "error": done.stderr.strip()[-600:]})
            continue
        result = json.loads(done.stdout.strip().splitlines()[-1])
        emit(out, {"part": f"predict-{mode}", **result})


def batch(out: Path, work: Path, ct: Path, cohort: int, device: str, env: dict) -> None:
    """``stuseg batch`` over ``cohort`` hard links of ``ct``, base, ``--fast``."""
    folder = work / "cohort"
    folder.mkdir(exist_ok=True)
    for n in range(cohort):
        link = folder / f"ct{n:02d}.nii.gz"
        if not link.exists():
            os.link(ct, link)
    result = work / "batch-out"
    cmd = [sys.executable, "-m", "stuseg", "batch", str(folder), "-o", str(result), "--overwrite"]
    cmd += ["--weights", str(weights_of(work, "base")), "--size", "base", "--fast", "--device", device]
    try:
        run = _run(cmd, env)
    except SystemExit as failed:
        emit(out, {"part": "batch", "error": str(failed)[-600:]})
        return
    summary = next((x for x in reversed(run.stderr.splitlines()) if x.startswith("batch: ")), "")
    rate = re.search(r"\(([0-9.]+) scans per minute\)", summary)
    records = [json.loads(x) for x in (result / "stuseg-batch.jsonl").read_text().splitlines() if x.strip()]
    done = [r for r in records if r.get("status") == "ok"]
    stages = _summed(r.get("seconds") or {} for r in done)
    emit(
        out,
        {
            "part": "batch",
            "size": "base",
            "mode": "fast",
            "cases": cohort,
            "ok": len(done),
            "scans_per_minute": float(rate[1]) if rate else None,
            "summary": summary,
            "wall_s": round(run.wall, 2),
            "peak_rss_gb": round(run.rss / 2**30, 3),
            "cpu_s": round(run.cpu, 1),
            "stages_summed_s": stages,
            "network_share_of_stages": round(stages.get("network", 0.0) / max(sum(stages.values()), 1e-9), 3),
            "peak_gpu_gb_max": max((r.get("peak_gpu_bytes") or 0 for r in done), default=0) / 2**30,
        },
    )


def numerics(out: Path, work: Path, device: str) -> None:
    """float16 autocast on the GPU against float32 on the CPU, same random weights."""
    if not device.startswith("cuda"):
        emit(out, {"part": "numerics", "skipped": f"needs a CUDA device, not {device}"})
        return
    import numpy as np
    import torch

    from stuseg.inference import pipeline
    from stuseg.inference.head import ClassProbabilities

    cpu = random_net("small", "cpu")
    gpu = random_net("small", device)
    gpu.load_state_dict(cpu.state_dict())
    x = torch.randn(1, 1, 128, 128, 128)
    with torch.inference_mode():
        p_cpu = ClassProbabilities(cpu)(x)
        with torch.autocast("cuda", dtype=torch.float16):
            p_gpu = ClassProbabilities(gpu)(x.to(device)).float().cpu()
    emit(
        out,
        {
            "part": "numerics",
            "check": "tile float16 (GPU) vs float32 (CPU)",
            "max_abs_prob_diff": float((p_gpu - p_cpu).abs().max()),
            "argmax_agreement": float((p_gpu.argmax(-1) == p_cpu.argmax(-1)).float().mean()),
        },
    )
    small_ct = work / "small_ct.nii.gz"
    make_ct(small_ct, (200, 200, 120), (1.2, 1.2, 2.0))
    for fast in (True, False):
        ref = pipeline.segment(small_ct, model=cpu, fast=fast, device="cpu").labels
        got = pipeline.segment(small_ct, model=gpu, fast=fast, device=device).labels
        emit(
            out,
            {
                "part": "numerics",
                "check": f"pipeline GPU auto (float16) vs CPU float32, {'fast' if fast else 'normal'}",
                "voxel_agreement": float((got == ref).mean()),
                "labels_present": len(np.unique(ref)),
            },
        )


def random_net(size: str, device: str, seed: int = 0) -> torch.nn.Module:
    import torch

    from stuseg.model.network import build_network

    torch.manual_seed(seed)
    net = build_network(size, device=device)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.05)
    return net.eval()


def weights_of(work: Path, size: str) -> Path:
    """Random weights of ``size`` in ``work``, written on first use."""
    path = work / f"{size}.safetensors"
    if not path.exists():
        make_weights(path, size)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--sizes", nargs="+", default=["small", "base", "large", "huge"])
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--cohort", type=int, default=20, help="scans in the batch part")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--shape", type=int, nargs=3, default=[512, 512, 300])
    args = parser.parse_args()
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device (give --device cpu to check the script itself)")
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        env = {**os.environ, "STUSEG_HOME": str(work / "home")}
        emit(args.out, {"part": "start", **about_the_machine(args.device), "parts": args.parts})
        ct = work / "ct.nii.gz"
        if {"predict-fast", "batch", "predict-normal"} & set(args.parts):
            make_ct(ct, tuple(args.shape), (0.8, 0.8, 1.0))
        for part in args.parts:
            begun = time.perf_counter()
            if part.startswith("predict-"):
                predict(args.out, work, ct, args.sizes, part.removeprefix("predict-"), args.device, env)
            elif part == "batch":
                batch(args.out, work, ct, args.cohort, args.device, env)
            else:
                numerics(args.out, work, args.device)
            emit(args.out, {"part": part, "part_seconds": round(time.perf_counter() - begun, 1)})
    emit(args.out, {"part": "end", "seconds": round(time.perf_counter() - start, 1)})


if __name__ == "__main__":
    main()
