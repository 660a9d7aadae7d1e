"""What the benchmark scripts share: synthetic inputs, and one way to record a result.

Each script prints its result as one JSON line and appends it to ``benchmarks/results.jsonl``
(``--results``) with the date, the machine and the command that produced it, via ``record``.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results.jsonl"


def make_ct(path: Path, shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> None:
    """A CT-like int16 NIfTI: air, an elliptic body, an organ and a spine, with noise; LPS-stored."""
    import nibabel as nib
    import numpy as np

    rng = np.random.default_rng(0)
    x, y, z = np.ogrid[: shape[0], : shape[1], : shape[2]]
    cx, cy = shape[0] / 2, shape[1] / 2
    body = ((x - cx) / (0.42 * shape[0])) ** 2 + ((y - cy) / (0.32 * shape[1])) ** 2 < 1
    vol = np.full(shape, -1000, np.int16)
    vol[np.broadcast_to(body, shape)] = 40
    organ = ((x - cx * 0.8) / 60.0) ** 2 + ((y - cy) / 50.0) ** 2 + ((z - shape[2] / 2) / 80.0) ** 2 < 1
    vol[organ] = 60
    spine = ((x - cx) / 18.0) ** 2 + ((y - 0.72 * shape[1]) / 18.0) ** 2 < 1
    vol[np.broadcast_to(spine, shape)] = 700
    vol += rng.normal(0, 15, shape).astype(np.int16)
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])  # LPS-stored, as scanners write
    img = nib.Nifti1Image(vol, affine)
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)
    nib.save(img, path)


def make_weights(path: Path, size: str) -> None:
    """Random weights with the real architecture of ``size``, as a safetensors file."""
    import torch
    from safetensors.torch import save_file

    from stuseg.model.network import build_network

    gen = torch.Generator().manual_seed(0)
    sd = build_network(size, device="meta").state_dict()
    save_file({k: torch.randn(v.shape, generator=gen) * 0.05 for k, v in sd.items()}, str(path))


@contextmanager
def scratch(size: str) -> Iterator[tuple[Path, Path, dict[str, str]]]:
    """A temporary folder with random weights of ``size`` in it, and an environment whose stuseg
    cache is inside it: ``(folder, weights, env)``. Everything goes when the block ends."""
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        weights = work / f"{size}.safetensors"
        make_weights(weights, size)
        yield work, weights, {**os.environ, "STUSEG_HOME": str(work / "home")}


def machine() -> str:
    """Architecture, CPU count and CPU model, e.g. ``x86_64, 2 CPUs, Intel(R) Xeon(R) Processor``."""
    model = ""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{platform.machine()}, {os.cpu_count()} CPUs, {model}".strip(", ")


def record(result: dict[str, Any], results: Path = RESULTS) -> None:
    """Print ``result`` as one JSON line, with the date, machine, load and command added, and
    append that line to ``results``."""
    line = json.dumps(
        {
            **result,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine(),
            "load_avg_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
            "command": " ".join(["python3", f"benchmarks/{Path(sys.argv[0]).name}", *sys.argv[1:]]),
        }
    )
    print(line, flush=True)
    with results.open("a") as fh:
        fh.write(line + "\n")
