"""Sliding-window prediction as pure functions of a tensor and a callable.

``sliding_window`` takes any ``fn`` mapping a batch of patches (B, C_in, *patch) to per-class
scores (B, K, *patch) - the network followed by softmax, a mirror-TTA wrapper around it, or
``lambda t: t + 1`` in a test - and returns the Gaussian-weighted average of the overlapping
patches, as nnU-Net v1 does (tile positions, Gaussian, padding; see
``shared/reference/nnunet_v1_inference.md`` section 4).

The average is streamed: tiles are visited row by row along the largest axis, and every slab
that no later tile can touch is normalized and handed out at once. Only one row of tiles
(patch-deep along that axis) of the K-channel accumulator is ever held, instead of the whole
volume.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from itertools import product

import numpy as np
import torch

PatchFn = Callable[[torch.Tensor], torch.Tensor]

# nnU-Net v1 flips these tensor dims for mirror TTA, in this order (dims 2, 3, 4 = z, y, x).
MIRROR_FLIPS: tuple[tuple[int, ...], ...] = ((), (4,), (3,), (4, 3), (2,), (4, 2), (3, 2), (4, 3, 2))


def tile_starts(size: int, patch: int, step_size: float) -> list[int]:
    """Start positions of the tiles along one axis (``size >= patch``), as nnU-Net v1.

    n = ceil((size - patch) / (patch * step_size)) + 1 tiles, evenly spread so that the
    first starts at 0 and the last ends at ``size``; positions rounded half to even.
    """
    if size < patch:
        raise ValueError(f"axis of {size} voxels is smaller than the patch ({patch}); pad first")
    n = math.ceil((size - patch) / (patch * step_size)) + 1
    if n == 1:
        return [0]
    step = (size - patch) / (n - 1)
    return [int(np.round(step * i)) for i in range(n)]


def gaussian_importance(patch: Sequence[int], sigma_scale: float = 1 / 8) -> np.ndarray:
    """Per-voxel tile weight: a Gaussian centred at index ``p // 2`` with sigma ``p * sigma_scale``.

    nnU-Net filters a unit impulse with ``scipy.ndimage.gaussian_filter`` and divides by the
    maximum; that equals this separable product of exponentials (the filter's normalization
    cancels in the division, and its 4-sigma truncation never reaches the patch border).
    Computed in float64, cast to float32.
    """
    weights = np.ones((), np.float64)
    for p in patch:
        sigma = p * sigma_scale
        d = np.arange(p) - p // 2
        weights = np.multiply.outer(weights, np.exp(-(d**2) / (2 * sigma**2)))
    weights /= weights.max()
    out = weights.astype(np.float32)
    out[out == 0] = out[out > 0].min()  # never a zero weight (cannot happen at 1/8 sigma)
    return out


def softmax_of(net: Callable[[torch.Tensor], torch.Tensor]) -> PatchFn:
    """Wrap a logits model: softmax over classes, in float32 whatever the network's precision."""

    def fn(x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(net(x).float(), dim=1)

    return fn


def mirrored(fn: PatchFn, flips: Sequence[tuple[int, ...]] = MIRROR_FLIPS) -> PatchFn:
    """Test-time augmentation: average ``fn`` over mirrored inputs, each result flipped back.

    Accumulated in float32 with weight 1/len(flips) per pass, in nnU-Net's order, so that
    the sum rounds as the reference's does.
    """
    weight = 1.0 / len(flips)

    def tta(x: torch.Tensor) -> torch.Tensor:
        total: torch.Tensor | None = None
        for dims in flips:
            y = fn(torch.flip(x, dims) if dims else x)
            y = torch.flip(y, dims) if dims else y
            total = weight * y if total is None else total.add_(weight * y)
        assert total is not None
        return total

    return tta


@dataclass(frozen=True)
class Slab:
    """Final class scores for ``[start, stop)`` along ``axis`` (unpadded coordinates)."""

    axis: int
    start: int
    stop: int
    scores: torch.Tensor  # (K, *spatial) with ``stop - start`` along spatial ``axis``


def pad_amounts(shape: Sequence[int], patch: Sequence[int]) -> list[tuple[int, int]]:
    """(before, after) padding per axis to reach the patch: half before, the rest after."""
    pads = []
    for s, p in zip(shape, patch):
        diff = max(p - s, 0)
        pads.append((diff // 2, diff - diff // 2))
    return pads


def stream_axis(shape: Sequence[int]) -> int:
    """The axis to stream along: the largest, so the held row of tiles is smallest."""
    return int(np.argmax(shape))


def sliding_window(
    x: torch.Tensor,
    fn: PatchFn,
    num_classes: int,
    patch: Sequence[int] = (128, 128, 128),
    step_size: float = 0.5,
    batch_size: int = 1,
    axis: int | None = None,
    on_tile: Callable[[int, int], None] | None = None,
) -> Iterator[Slab]:
    """Gaussian-weighted sliding-window average of ``fn`` over ``x`` (C_in, *spatial).

    Yields ``Slab``s in order along ``axis`` (default: the largest padded axis) covering the
    whole unpadded volume. The input is padded with 0 up to the patch where it is smaller.
    Accumulators are float32 on ``x.device``. ``on_tile(done, total)`` reports progress.
    """
    patch = tuple(int(p) for p in patch)
    spatial = tuple(int(s) for s in x.shape[1:])
    pads = pad_amounts(spatial, patch)
    if any(before or after for before, after in pads):
        flat = [v for before_after in reversed(pads) for v in before_after]
        x = torch.nn.functional.pad(x, flat, mode="constant", value=0.0)
    padded = tuple(int(s) for s in x.shape[1:])
    a = stream_axis(padded) if axis is None else axis
    starts = [tile_starts(s, p, step_size) for s, p in zip(padded, patch)]
    tiles_total = math.prod(len(s) for s in starts)
    device = x.device
    # The Gaussian only when tiles overlap: a single tile keeps uniform weights, as in nnU-Net.
    if tiles_total > 1:
        weight = torch.from_numpy(gaussian_importance(patch)).to(device)
    else:
        weight = torch.ones(patch, dtype=torch.float32, device=device)

    # Row buffers, stream axis first: scores (P_a, K, *rest) and weights (P_a, *rest).
    depth = patch[a]
    rest = [padded[d] for d in range(3) if d != a]
    acc = torch.zeros((depth, num_classes, *rest), dtype=torch.float32, device=device)
    norm = torch.zeros((depth, *rest), dtype=torch.float32, device=device)
    other = [d for d in range(3) if d != a]
    weight_a = weight.movedim(a, 0)

    done = 0
    emitted = 0  # padded coordinate up to which slabs were handed out
    row_starts = starts[a]
    for r, row in enumerate(row_starts):
        # Positions of this row's tiles; the other axes in nnU-Net's nesting order.
        positions = [
            tuple(row if d == a else pos[other.index(d)] for d in range(3))
            for pos in product(*(starts[d] for d in other))
        ]
        for b in range(0, len(positions), batch_size):
            chunk = positions[b : b + batch_size]
            batch = torch.stack(
                [x[(slice(None), *(slice(p, p + s) for p, s in zip(pos, patch)))] for pos in chunk]
            )
            scores = fn(batch)
            for pos, tile in zip(chunk, scores):
                # tile (K, *patch) -> (P_a, K, *rest) to match the row buffers.
                tile_a = tile.movedim(a + 1, 0)
                region = tuple(slice(pos[d], pos[d] + patch[d]) for d in other)
                # Product rounded to float32, then summed: the reference's two roundings.
                acc[(slice(None), slice(None), *region)].add_(tile_a.mul_(weight_a.unsqueeze(1)))
                norm[(slice(None), *region)].add_(weight_a)
            done += len(chunk)
            if on_tile is not None:
                on_tile(done, tiles_total)
        # Everything before the next row's start is final.
        final_until = row_starts[r + 1] if r + 1 < len(row_starts) else padded[a]
        n_final = final_until - row
        slab = _finish(acc[:n_final], norm[:n_final], row, pads, spatial, a)
        if slab is not None:
            emitted = slab.stop
            yield slab
        if r + 1 < len(row_starts):
            _shift(acc, n_final)
            _shift(norm, n_final)
    assert emitted == spatial[a] or spatial[a] == 0


def _finish(
    acc: torch.Tensor,
    norm: torch.Tensor,
    row_start: int,
    pads: list[tuple[int, int]],
    spatial: tuple[int, ...],
    a: int,
) -> Slab | None:
    """Divide a finished part of the row buffers, drop the padding, return it as a Slab."""
    lo_pad = [before for before, _ in pads]
    # Padded coordinates [row_start, row_start + n) -> unpadded, clipped to the volume.
    lo = max(row_start, lo_pad[a])
    hi = min(row_start + acc.shape[0], lo_pad[a] + spatial[a])
    if hi <= lo:
        return None
    keep = [d for d in range(3) if d != a]
    crop = tuple(slice(lo_pad[d], lo_pad[d] + spatial[d]) for d in keep)
    part = acc[(slice(lo - row_start, hi - row_start), slice(None), *crop)]
    weights = norm[(slice(lo - row_start, hi - row_start), *crop)]
    scores = (part / weights.unsqueeze(1)).movedim(0, a + 1)
    return Slab(axis=a, start=lo - lo_pad[a], stop=hi - lo_pad[a], scores=scores)


def _shift(buf: torch.Tensor, n: int) -> None:
    """Move ``buf[n:]`` to the front and zero the tail, in chunks that never overlap."""
    depth = buf.shape[0]
    for lo in range(0, depth - n, n):
        hi = min(lo + n, depth - n)
        buf[lo:hi] = buf[lo + n : hi + n]
    buf[depth - n :] = 0


def predict_scores(
    x: torch.Tensor,
    fn: PatchFn,
    num_classes: int,
    patch: Sequence[int] = (128, 128, 128),
    step_size: float = 0.5,
    batch_size: int = 1,
) -> torch.Tensor:
    """The whole (K, *spatial) averaged score volume at once (for tests and small volumes)."""
    slabs = list(sliding_window(x, fn, num_classes, patch, step_size, batch_size))
    return torch.cat([s.scores for s in slabs], dim=slabs[0].axis + 1)
