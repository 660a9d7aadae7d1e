"""Fabricate checkpoints in the original nnU-Net v1 container format (see reference section 1).

``torch.save`` of a dict with ``epoch``, ``state_dict``, ``optimizer_state_dict`` (SGD momentum
buffers, hence about twice the parameter bytes), ``lr_scheduler_state_dict`` (None), ``plot_stuff``
(4-tuple of lists of numpy scalars), ``best_stuff`` (3-tuple with numpy scalars) and
``amp_grad_scaler``. Numpy scalars can be pickled in the numpy-2 or the numpy-1 spelling.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import nibabel as nib
import numpy as np
import reference_pipeline
import torch

from stuseg.model.network import Arch, build_network


def tiny_network(seed: int = 0) -> torch.nn.Module:
    """A random STU-Net with few channels, in eval mode: the real architecture, fast on the CPU.

    Weights drawn from N(0, 0.3) so that its predictions vary from voxel to voxel (more classes
    win somewhere than with small weights), which exercises every export path.
    """
    torch.manual_seed(seed)
    net = build_network(Arch(dims=(4, 4, 8, 8, 8, 8), depths=(1,) * 6))
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.3)
    return net.eval()


class IntensityOracle(torch.nn.Module):
    """Stand-in network: class = the 100 HU band of the voxel, ``floor((HU + offset) / 100)``.

    It undoes the pipeline's z-score with statistics computed by the whole-volume restatement
    of the original (tests/reference_pipeline.py), so a correct pipeline returns the input's own
    bands wherever resampling kept intensities: a phantom's labels encoded as HU = 100 * label +
    30 (offset 0), or on a real CT a threshold segmentation that any flip or shift would move
    (offset 1000, so that air and soft tissue are bands of their own).
    """

    def __init__(self, mean: float, std: float, offset: float = 0.0):
        super().__init__()
        self.mean, self.std, self.offset = mean, std, offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hu = x * (self.std + 1e-8) + self.mean
        cls = torch.clamp(torch.floor((hu + self.offset) / 100), 0, 104).long()[:, 0]
        return torch.nn.functional.one_hot(cls, 105).movedim(-1, 1).float() * 20


def oracle_for(data: np.ndarray, affine: np.ndarray, offset: float = 0.0) -> IntensityOracle:
    """The ``IntensityOracle`` for an image (voxels and affine), statistics from the reference."""
    canon = nib.as_closest_canonical(nib.Nifti1Image(data, affine))
    zooms = tuple(float(z) for z in np.linalg.norm(canon.affine[:3, :3], axis=0))
    x, *_ = reference_pipeline.crop_and_resample(np.asarray(canon.dataobj, np.float32), zooms)
    return IntensityOracle(float(x.mean()), float(x.std()), offset)


def random_state_dict(size_or_arch: str | Arch, seed: int = 0) -> dict[str, torch.Tensor]:
    """Deterministic fp32 values with exactly the network's keys and shapes."""
    gen = torch.Generator().manual_seed(seed)
    shapes = build_network(size_or_arch, device="meta").state_dict()
    return {k: torch.randn(v.shape, generator=gen) * 0.05 for k, v in shapes.items()}


def shaped_state_dict(size_or_arch: str | Arch) -> dict[str, torch.Tensor]:
    """Right keys and shapes at almost no cost: zero-stride views of one element each.

    ``torch.save`` stores only the one-element storages, so even a "huge" file is tiny. Good for
    tests that only look at keys and shapes (size inference, wrong-size errors).
    """
    shapes = build_network(size_or_arch, device="meta").state_dict()
    return {k: torch.zeros(1).expand(v.shape) for k, v in shapes.items()}


@contextmanager
def _numpy1_spelling() -> Iterator[None]:
    """Pickle numpy scalars as ``numpy.core.multiarray.scalar``, as numpy 1 wrote them."""
    scalar = np._core.multiarray.scalar if hasattr(np, "_core") else np.core.multiarray.scalar
    old = scalar.__module__
    scalar.__module__ = "numpy.core.multiarray"
    try:
        yield
    finally:
        scalar.__module__ = old


def checkpoint_dict(state_dict: dict[str, torch.Tensor], *, module_prefix: bool = False) -> dict:
    params = list(state_dict.values())
    # Zero-stride views (see shaped_state_dict) get zero-stride momentum too, to stay tiny.
    momentum = [p * 0.5 if p.is_contiguous() else torch.zeros(1).expand(p.shape) for p in params]
    return {
        "epoch": 4000,
        "state_dict": {("module." if module_prefix else "") + k: v for k, v in state_dict.items()},
        "optimizer_state_dict": {
            "state": {i: {"momentum_buffer": m} for i, m in enumerate(momentum)},
            "param_groups": [
                {
                    "lr": 1.0e-5,
                    "momentum": 0.99,
                    "dampening": 0,
                    "weight_decay": 3e-5,
                    "nesterov": True,
                    "maximize": False,
                    "foreach": None,
                    "differentiable": False,
                    "params": list(range(len(params))),
                }
            ],
        },
        "lr_scheduler_state_dict": None,
        "plot_stuff": (
            [np.float64(0.5 - i / 100) for i in range(5)],
            [np.float32(0.6 - i / 100) for i in range(5)],
            [np.float64(0.7 - i / 100) for i in range(5)],
            [np.float64(i / 10) for i in range(5)],
        ),
        "best_stuff": (np.int64(3987), np.float64(-0.85), np.float32(0.87)),
        "amp_grad_scaler": {
            "scale": 65536.0,
            "growth_factor": 2.0,
            "backoff_factor": 0.5,
            "growth_interval": 2000,
            "_growth_tracker": 17,
        },
    }


def write_checkpoint(
    path: Path,
    state_dict: dict[str, torch.Tensor],
    *,
    numpy_spelling: Literal["numpy1", "numpy2"] = "numpy2",
    module_prefix: bool = False,
) -> Path:
    """Write ``state_dict`` as an nnU-Net v1 ``.model`` file; return ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    obj = checkpoint_dict(state_dict, module_prefix=module_prefix)
    if numpy_spelling == "numpy1":
        with _numpy1_spelling():
            torch.save(obj, path)
    else:
        torch.save(obj, path)
    return path


_SMALL: dict[str, Path] = {}


def small_checkpoint(folder_factory: Callable[[], Path]) -> Path:
    """The fabricated small checkpoint (seed 0), written once per test session (~117 MB)."""
    if "path" not in _SMALL:
        path = folder_factory() / "small_ep4k.model"
        _SMALL["path"] = write_checkpoint(path, random_state_dict("small", 0))
    return _SMALL["path"]
