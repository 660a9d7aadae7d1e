"""Fixed-point storage for the sliding window's sums of class probabilities (uint16, half of float32).

The sliding window's row of sums (patch-deep along the stream axis, the whole plane across, K
classes per voxel) is most of the memory of a CPU run: 2.4 GB of float32 for a 244 x 202 x 224
volume and 105 classes. Probabilities are bounded, so their sums fit 16-bit integers - if the
scale is right everywhere. A single scale is not: near the volume's edges the Gaussian tile
weight falls to 3e-4 (a face) and 4e-11 (a corner), so uniformly quantised weighted sums would
round to nothing there. Instead each voxel's sums are stored in units of its own final mean:

    weight of tile t at voxel v = FIXED_ONE * g_t(v) / N(v),   N(v) = sum over tiles of g_t(v)

where g is the Gaussian and N the summed weight the float32 path divides by at the end. N is the
product of one sum per axis (the Gaussian is separable, the tiles a grid), so it is known before
any tile runs. The stored sum of a class is then FIXED_ONE times its mean probability, whatever
the weights: step 1 / FIXED_ONE = 1.53e-5 everywhere.

Each addition rounds the exact product ``probability * weight`` (float32 operands, multiplied in
float64) to the nearest integer: an error of at most 0.5 units, plus the float32 rounding of the
weight itself (relative 2^-22, so under 0.01 units for a term of at most FIXED_ONE). **Bound:** a
voxel that receives ``n`` additions (tiles covering it, times the members of an ensemble) has
every class's mean probability within ``0.51 * n / FIXED_ONE + 1e-6`` of the exact float64 mean
(7.3e-5 for 8 tiles; at step 0.5 at most 27 tiles cover a voxel, where each axis holds three
tiles that all overlap some positions: 2.1e-4); an argmax can differ from the exact one only
where the top two exact means are within twice that. The 1e-6 covers the float32 weights'
rounding, which makes them sum to FIXED_ONE within a relative 1e-6 (the mean is read as the
sum over FIXED_ONE). ``FIXED_ONE`` leaves 255 units of headroom below 65535 for the additions' rounding up
and for probabilities a few ulps above 1; the kernel clamps instead of wrapping in any case.

Only for probabilities (nnU-Net v1's softmax); logits (v2) are unbounded and stay float32.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

FIXED_ONE = 65280  # a mean probability of 1; 255 units of headroom below 65535
MAX_ADDITIONS = 64  # beyond this many additions per voxel the bound (5e-4) is not worth the memory


__all__ = [
    "FIXED_ONE",
    "MAX_ADDITIONS",
    "TileWeights",
    "add_rounded",
    "axis_fractions",
    "axis_gaussian",
    "max_overlap",
]


def axis_gaussian(p: int, sigma_scale: float = 1 / 8) -> np.ndarray:
    """One axis's factor of ``predict.gaussian_importance`` (float64, 1 at index ``p // 2``)."""
    d = np.arange(p) - p // 2
    sigma = p * sigma_scale
    return np.exp(-(d**2) / (2 * sigma**2))


def axis_fractions(size: int, patch: int, starts: Sequence[int], gaussian: bool) -> np.ndarray:
    """(len(starts), patch) float64: each tile's weight along one axis over the axis's summed weight."""
    g = axis_gaussian(patch) if gaussian else np.ones(patch)
    total = np.zeros(size)
    for s in starts:
        total[s : s + patch] += g
    return np.stack([g / total[s : s + patch] for s in starts])


def max_overlap(sizes: Sequence[int], patch: Sequence[int], starts: Sequence[Sequence[int]]) -> int:
    """The most tiles covering any one voxel: per axis the most intervals over a position, multiplied."""
    most = 1
    for size, p, axis_starts in zip(sizes, patch, starts):
        cover = np.zeros(size, np.int64)
        for s in axis_starts:
            cover[s : s + p] += 1
        most *= int(cover.max())
    return most


class TileWeights:
    """The per-tile weights ``FIXED_ONE * g_t / N`` of a grid of tiles (module docstring)."""

    def __init__(
        self, sizes: Sequence[int], patch: Sequence[int], starts: Sequence[Sequence[int]], gaussian: bool
    ) -> None:
        self.starts = [list(s) for s in starts]
        self.fractions = [
            torch.from_numpy(axis_fractions(n, p, s, gaussian).astype(np.float32))
            for n, p, s in zip(sizes, patch, starts)
        ]
        self.fractions[0] = self.fractions[0] * FIXED_ONE
        self.additions = max_overlap(sizes, patch, starts)

    def __call__(self, pos: Sequence[int]) -> torch.Tensor:
        """The (*patch) float32 weights of the tile starting at ``pos``."""
        z, y, x = (f[self.starts[d].index(p)] for d, (f, p) in enumerate(zip(self.fractions, pos)))
        return (z[:, None, None] * y[None, :, None]) * x[None, None, :]


def add_rounded(target: torch.Tensor, values: torch.Tensor, scale: torch.Tensor) -> None:
    """``target += round(values * scale)`` for a uint16 CPU ``target`` (*spatial, K), in place.

    ``values`` (*spatial, K) and ``scale`` broadcastable to (*spatial, 1); rounding to nearest,
    clamped to [0, 65535] (``kernels.add_rounded``). ``target`` may be a strided view whose
    last dim is contiguous, such as a tile's region of the sliding window's row.
    """
    if target.dtype != torch.uint16 or target.device.type != "cpu" or target.stride(-1) != 1:
        raise ValueError("fixed-point sums are uint16 CPU tensors with the classes contiguous")
    from stuseg.inference.kernels import add_rounded as kernel  # numba: imported when first needed

    if target.dim() != 4:
        raise ValueError("fixed-point sums are added per (z, y, x, K) region")
    shape = tuple(target.shape)
    values = values.to(torch.float32).expand(shape).contiguous()
    scale = scale.to(torch.float32).expand(*shape[:-1], 1).contiguous()
    # The region as one flat run of the buffer from its first element, with its strides.
    span = 1 + sum((n - 1) * s for n, s in zip(shape, target.stride()))
    flat = target.as_strided((span,), (1,)).numpy()
    s0, s1, s2 = target.stride()[:3]
    kernel(flat, s0, s1, s2, values.numpy(), scale.view(shape[:-1]).numpy())
