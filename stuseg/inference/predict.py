"""Sliding-window prediction, generic over what predicts a patch.

``sliding_window`` takes a ``PatchPredictor`` - an object mapping a batch of patches
(B, C_in, *patch) to per-class scores with the classes last, (B, *patch, K), that may also add
its weighted scores into the window's buffers in place - and yields the Gaussian-weighted
average of the overlapping patches, as nnU-Net v1 does (tile positions, Gaussian, padding).
What predicts is up to the caller: the STU-Net head (``stuseg.inference.head``), a mirror-TTA wrapper
around it, or a plain function in a test. Nothing here knows about networks.

Classes last: a voxel's K scores are contiguous, which makes the softmax, the weighted sums
and the argmax run at memory speed on the CPU.

The average is streamed: tiles are visited row by row along the largest axis, and every slab
that no later tile can touch is normalized and handed out at once. Only one row of tiles
(patch-deep along that axis) of the K-channel accumulator is ever held, instead of the whole
volume. For probabilities on the CPU that row can be held as uint16 fixed-point sums, half the
memory of float32, within a stated bound of the float32 means (``stuseg.inference.fixedsums``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from itertools import combinations, product
from typing import Any

import numpy as np
import torch

from stuseg.inference.fixedsums import FIXED_ONE, TileWeights, add_rounded, max_overlap

__all__ = [
    "MIRROR_FLIPS",
    "Autocast",
    "Ensemble",
    "FunctionPredictor",
    "Mirrored",
    "PatchPredictor",
    "Slab",
    "Timed",
    "add_weighted",
    "as_predictor",
    "gaussian_importance",
    "item_weights",
    "mirror_flips",
    "pad_amounts",
    "sliding_window",
    "stream_axis",
    "tile_overlap",
    "tile_starts",
]

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


class PatchPredictor:
    """What ``sliding_window`` calls for each batch of patches: the per-patch contract.

    ``predictor(x)`` maps patches (B, C_in, *patch) to per-class scores with the classes last,
    (B, *patch, K), float32. ``predictor.accumulate(x, targets, weight)`` adds
    ``predictor(x)[b] * weight`` into ``targets[b]`` (one (*patch, K) view of the sliding
    window's buffer per batch item); ``weight`` is (*patch, 1), the same for every item, or
    (B, *patch, 1), one per item (``item_weights`` gives either as a list). A float32 target is
    added to in float32; a uint16 target holds fixed-point sums (``stuseg.inference.fixedsums``) and each
    term is rounded to the nearest integer (``add_weighted`` does either). The default computes
    the scores and adds them, a subclass may override it to add in place without materialising
    a whole tile. ``breakdown``
    names the seconds a predictor spent in parts of its own work so far (e.g. ``softmax``),
    for the timing reports; the default is empty.

    Subclass it and implement ``__call__``; a plain function is wrapped by ``as_predictor``.
    """

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def accumulate(self, x: torch.Tensor, targets: Sequence[torch.Tensor], weight: torch.Tensor) -> None:
        for target, tile, w in zip(targets, self(x), item_weights(weight, len(targets))):
            add_weighted(target, tile, w)

    @property
    def accumulates_in_place(self) -> bool:
        """Whether ``accumulate`` is more than the default (scores, then add)."""
        return type(self).accumulate is not PatchPredictor.accumulate

    @property
    def breakdown(self) -> dict[str, float]:
        return {}


def item_weights(weight: torch.Tensor, n: int) -> list[torch.Tensor]:
    """Each of ``n`` batch items' (*patch, 1) weights: ``weight`` itself when it is one (*patch, 1)
    tensor for all, else its (B, *patch, 1) rows."""
    return list(weight) if weight.dim() == 5 else [weight] * n


def add_weighted(target: torch.Tensor, tile: torch.Tensor, weight: torch.Tensor) -> None:
    """``target += tile * weight``; ``tile`` may be overwritten.

    float32: the product rounded to float32, then summed (the reference's two roundings). uint16
    (fixed-point sums): each term rounded to the nearest integer (``fixedsums.add_rounded``).
    """
    if target.dtype == torch.uint16:
        add_rounded(target, tile, weight)
    else:
        target.add_(tile.mul_(weight))


class FunctionPredictor(PatchPredictor):
    """A plain function ``(B, C_in, *patch) -> (B, *patch, K)`` as a ``PatchPredictor``."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.fn = fn

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


def as_predictor(fn: PatchPredictor | Callable[[torch.Tensor], torch.Tensor]) -> PatchPredictor:
    """``fn`` itself if it is a ``PatchPredictor``, else ``fn`` wrapped in one."""
    return fn if isinstance(fn, PatchPredictor) else FunctionPredictor(fn)


class Mirrored(PatchPredictor):
    """Test-time augmentation: the mean of ``inner`` over mirrored inputs, each result flipped back.

    ``flips`` name dims of the (B, C, z, y, x) input; results are classes-last (B, z, y, x, K).
    Accumulated in float32 with weight 1/len(flips) per pass, in nnU-Net's order, so that
    the sum rounds as the reference's does.
    """

    def __init__(
        self,
        inner: PatchPredictor | Callable[[torch.Tensor], torch.Tensor],
        flips: Sequence[tuple[int, ...]] = MIRROR_FLIPS,
    ) -> None:
        self.inner = as_predictor(inner)
        self.flips = tuple(flips)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        weight = 1.0 / len(self.flips)
        total: torch.Tensor | None = None
        for dims in self.flips:
            y = self.inner(torch.flip(x, dims) if dims else x)
            # Input dims (B, C, z, y, x) -> output dims (B, z, y, x, K): one less.
            y = torch.flip(y, [d - 1 for d in dims]) if dims else y
            total = weight * y if total is None else total.add_(weight * y)
        assert total is not None
        return total

    @property
    def breakdown(self) -> dict[str, float]:
        return self.inner.breakdown


def mirror_flips(axes: Sequence[int], framework: str = "v1") -> tuple[tuple[int, ...], ...]:
    """The flips of a (B, C, z, y, x) batch that test-time mirroring averages over, identity first.

    ``axes`` are the spatial axes (0, 1, 2 = z, y, x) the model allows to mirror. nnU-Net v1
    visits the 8 mirrorings in ``MIRROR_FLIPS``' order (those its axes allow); v2 visits every
    combination of the allowed axes, one axis first, then pairs, then all three. The order only
    changes how the float32 sums round.
    """
    dims = sorted(a + 2 for a in axes)
    if framework == "v1":
        return tuple(f for f in MIRROR_FLIPS if set(f) <= set(dims))
    return ((), *(c for n in range(1, len(dims) + 1) for c in combinations(dims, n)))


class Ensemble(PatchPredictor):
    """The mean of several predictors' scores (nnU-Net's average over folds), each weighted 1/n.

    Averaging per tile equals averaging the folds' whole sliding windows (every step is linear
    in the scores), so the folds stream together.
    """

    def __init__(self, members: Sequence[PatchPredictor]) -> None:
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.members = tuple(members)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        total = self.members[0](x)
        for member in self.members[1:]:
            total.add_(member(x))
        return total.div_(len(self.members))

    def accumulate(self, x: torch.Tensor, targets: Sequence[torch.Tensor], weight: torch.Tensor) -> None:
        share = weight / len(self.members)  # for fixed-point sums, each member's terms round apart
        for member in self.members:
            member.accumulate(x, targets, share)

    @property
    def breakdown(self) -> dict[str, float]:
        total: dict[str, float] = {}
        for member in self.members:
            for name, seconds in member.breakdown.items():
                total[name] = total.get(name, 0.0) + seconds
        return total


class Autocast(PatchPredictor):
    """``inner`` run under ``torch.autocast`` (e.g. float16 convolutions on CUDA, as nnU-Net).

    The accumulation into the buffers stays outside autocast, in float32.
    """

    def __init__(self, inner: PatchPredictor, device_type: str, dtype: torch.dtype = torch.float16) -> None:
        self.inner, self.device_type, self.dtype = inner, device_type, dtype

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device_type, dtype=self.dtype):
            return self.inner(x)

    @property
    def breakdown(self) -> dict[str, float]:
        return self.inner.breakdown


class Timed(PatchPredictor):
    """``inner`` with the wall time of every call into it added to ``seconds``.

    ``sync`` (e.g. ``torch.cuda.synchronize``) runs before each clock stop, so that
    asynchronous devices are timed for their work, not for queueing it. When ``inner`` has no
    in-place ``accumulate``, only its scores are timed and the adding is not.
    """

    def __init__(self, inner: PatchPredictor, sync: Callable[[], None] | None = None) -> None:
        self.inner, self.sync, self.seconds = inner, sync, 0.0

    def _timed(self, call: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        result = call()
        if self.sync is not None:
            self.sync()
        self.seconds += time.perf_counter() - start
        return result

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self._timed(lambda: self.inner(x))

    def accumulate(self, x: torch.Tensor, targets: Sequence[torch.Tensor], weight: torch.Tensor) -> None:
        if not self.inner.accumulates_in_place:
            return super().accumulate(x, targets, weight)
        return self._timed(lambda: self.inner.accumulate(x, targets, weight))

    @property
    def breakdown(self) -> dict[str, float]:
        return self.inner.breakdown


@dataclass(frozen=True)
class Slab:
    """Final sums for ``[start, stop)`` along ``axis`` (unpadded coordinates).

    ``sums`` (*spatial, K) are the weighted class scores and ``norm`` (*spatial) the summed
    tile weights; their quotient is the sliding-window mean. ``sums`` is float32, or uint16
    fixed-point sums (``stuseg.inference.fixedsums``: then each voxel's weights are scaled to sum to
    ``FIXED_ONE``, ``norm`` is that constant as a broadcast view, and the quotient is still the
    mean). Both are
    views into the sliding window's buffers, valid until the next slab is requested.
    """

    axis: int
    start: int
    stop: int
    sums: torch.Tensor  # (*spatial, K) with ``stop - start`` along spatial ``axis``
    norm: torch.Tensor  # (*spatial)

    def scores(self) -> torch.Tensor:
        """The mean class scores ``sums / norm``, a new tensor."""
        return self.sums / self.norm.unsqueeze(-1)


def pad_amounts(shape: Sequence[int], patch: Sequence[int]) -> list[tuple[int, int]]:
    """(before, after) padding per axis to reach the patch: half before, the rest after."""
    pads = []
    for s, p in zip(shape, patch):
        diff = max(p - s, 0)
        pads.append((diff // 2, diff - diff // 2))
    return pads


def tile_overlap(shape: Sequence[int], patch: Sequence[int], step_size: float) -> int:
    """The most tiles of ``sliding_window`` over (*spatial) ``shape`` that cover any one voxel."""
    padded = [s + before + after for s, (before, after) in zip(shape, pad_amounts(shape, patch))]
    starts = [tile_starts(s, p, step_size) for s, p in zip(padded, patch)]
    return max_overlap(padded, patch, starts)


def stream_axis(shape: Sequence[int]) -> int:
    """The axis to stream along: the largest, so the held row of tiles is smallest."""
    return int(np.argmax(shape))


def sliding_window(
    x: torch.Tensor,
    fn: PatchPredictor | Callable[[torch.Tensor], torch.Tensor],
    num_classes: int,
    patch: Sequence[int] = (128, 128, 128),
    step_size: float = 0.5,
    batch_size: int = 1,
    axis: int | None = None,
    on_tile: Callable[[int, int], None] | None = None,
    slab_bytes: int = 128 * 2**20,
    sums_dtype: torch.dtype = torch.float32,
) -> Iterator[Slab]:
    """Gaussian-weighted sliding-window average of ``fn`` over ``x`` (C_in, *spatial).

    ``fn`` is a ``PatchPredictor`` (or a plain function, see ``as_predictor``): (B, C_in, *patch)
    -> (B, *patch, K). Each batch goes through its ``accumulate``.

    Yields ``Slab``s in order along ``axis`` (default: the largest padded axis) covering the
    whole unpadded volume. The input is padded with 0 up to the patch where it is smaller.
    Accumulators are float32 on ``x.device``; each yielded slab covers at most about
    ``slab_bytes`` of scores, as views into them that the next step overwrites: use a slab
    before asking for the next. ``on_tile(done, total)`` reports progress.

    ``sums_dtype=torch.uint16`` (CPU, scores that are probabilities in [0, 1]) holds the class
    sums as fixed-point integers, half the memory: each voxel's tile weights are scaled to sum
    to ``fixedsums.FIXED_ONE`` and every term is rounded to the nearest integer, so a mean
    differs from the exact one by at most ``0.51 * n / FIXED_ONE + 1e-6`` where a voxel receives
    ``n`` additions (``stuseg.inference.fixedsums``).
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
    if sums_dtype not in (torch.float32, torch.uint16):
        raise ValueError(f"sums are float32 or uint16 (fixed point), not {sums_dtype}")
    fixed = sums_dtype == torch.uint16
    if fixed and device.type != "cpu":
        raise ValueError("fixed-point (uint16) sums are for the CPU")
    # The Gaussian only when tiles overlap: a single tile keeps uniform weights, as in nnU-Net.
    if tiles_total > 1:
        weight = torch.from_numpy(gaussian_importance(patch)).to(device)
    else:
        weight = torch.ones(patch, dtype=torch.float32, device=device)
    tile_weights = TileWeights(padded, patch, starts, gaussian=tiles_total > 1) if fixed else None

    # Row buffers in the volume's own axis order, one patch deep along the stream axis:
    # class scores (*window, K) and the summed tile weights (*window). Fixed-point sums need no
    # buffer for the weights: those over a voxel sum to FIXED_ONE (a broadcast view of it).
    window = [patch[d] if d == a else padded[d] for d in range(3)]
    acc = torch.zeros((*window, num_classes), dtype=sums_dtype, device=device)
    if fixed:
        norm = torch.full((1, 1, 1), float(FIXED_ONE)).expand(window)
    else:
        norm = torch.zeros(window, dtype=torch.float32, device=device)
    weight_k = weight.unsqueeze(-1)
    other = [d for d in range(3) if d != a]
    plane = math.prod(spatial[d] for d in other)
    rows_per_slab = max(1, slab_bytes // (4 * num_classes * max(plane, 1)))

    predictor = as_predictor(fn)
    done = 0
    row_starts = starts[a]
    for r, row in enumerate(row_starts):
        # This row's tiles, the other two axes nested in nnU-Net's order.
        positions = [
            tuple(row if d == a else pos[other.index(d)] for d in range(3))
            for pos in product(*(starts[d] for d in other))
        ]
        for b in range(0, len(positions), batch_size):
            chunk = positions[b : b + batch_size]
            batch = torch.stack(
                [x[(slice(None), *(slice(p, p + s) for p, s in zip(pos, patch)))] for pos in chunk]
            )
            regions = [
                tuple(
                    slice(pos[d] - (row if d == a else 0), pos[d] - (row if d == a else 0) + patch[d])
                    for d in range(3)
                )
                for pos in chunk
            ]
            if tile_weights is None:
                batch_weight = weight_k
                for region in regions:
                    norm[region].add_(weight)
            else:  # each tile its own weights, g_t / N scaled to FIXED_ONE
                batch_weight = torch.stack([tile_weights(pos) for pos in chunk]).unsqueeze(-1)
            predictor.accumulate(batch, [acc[region] for region in regions], batch_weight)
            del batch, batch_weight
            done += len(chunk)
            if on_tile is not None:
                on_tile(done, tiles_total)
        # Everything before the next row's start is final.
        final_until = row_starts[r + 1] if r + 1 < len(row_starts) else padded[a]
        yield from _finish(acc, norm, row, final_until - row, pads, spatial, a, rows_per_slab)
        if r + 1 < len(row_starts):
            _shift(acc, a, final_until - row)
            if not fixed:
                _shift(norm, a, final_until - row)


def _finish(
    acc: torch.Tensor,
    norm: torch.Tensor,
    row_start: int,
    n_final: int,
    pads: list[tuple[int, int]],
    spatial: tuple[int, ...],
    a: int,
    rows_per_slab: int,
) -> Iterator[Slab]:
    """The finished rows ``[0, n_final)`` of the buffers, without the padding, as Slabs."""
    lo_pad = [before for before, _ in pads]
    # Padded coordinates [row_start, row_start + n_final) -> unpadded, clipped to the volume.
    lo = max(row_start, lo_pad[a])
    hi = min(row_start + n_final, lo_pad[a] + spatial[a])
    crop = [slice(lo_pad[d], lo_pad[d] + spatial[d]) for d in range(3)]
    for start in range(lo, hi, rows_per_slab):
        stop = min(start + rows_per_slab, hi)
        crop[a] = slice(start - row_start, stop - row_start)
        yield Slab(a, start - lo_pad[a], stop - lo_pad[a], acc[tuple(crop)], norm[tuple(crop)])


def _shift(buf: torch.Tensor, dim: int, n: int) -> None:
    """Move ``buf``'s part from ``n`` on along ``dim`` to the front and zero the rest.

    Copied in chunks of at most ``n`` so that source and destination never overlap.
    """
    depth = buf.shape[dim]
    for lo in range(0, depth - n, n):
        size = min(n, depth - n - lo)
        buf.narrow(dim, lo, size).copy_(buf.narrow(dim, lo + n, size))
    buf.narrow(dim, max(depth - n, 0), min(n, depth)).zero_()
