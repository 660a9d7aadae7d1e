"""Sliding-window prediction as pure functions of a tensor and a callable.

``sliding_window`` takes any ``fn`` mapping a batch of patches (B, C_in, *patch) to per-class
scores with the classes last, (B, *patch, K) - the network followed by softmax, a mirror-TTA
wrapper around it, or ``lambda t: (t + 1)[..., None]`` in a test - and returns the
Gaussian-weighted average of the overlapping patches, as nnU-Net v1 does (tile positions,
Gaussian, padding; see ``shared/reference/nnunet_v1_inference.md`` section 4).

Classes last: a voxel's K scores are contiguous, which makes the softmax, the weighted sums
and the argmax run at memory speed on the CPU (the 1x1 head and softmax of a 105 x 128^3 tile:
1.82 s channels-first, 0.45 s channels-last; benchmarks/RESULTS.md).

The average is streamed: tiles are visited row by row along the largest axis, and every slab
that no later tile can touch is normalized and handed out at once. Only one row of tiles
(patch-deep along that axis) of the K-channel accumulator is ever held, instead of the whole
volume.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from itertools import product

import numpy as np
import torch

PatchFn = Callable[[torch.Tensor], torch.Tensor]

_LOG2E = 1.4426950408889634  # log2(e): exp(x) = exp2(x * log2(e))

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


def _softmax_last_(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim in float32; in place on the CPU (same kernel as torch.softmax)."""
    logits = logits.float()
    if logits.device.type == "cpu" and logits.is_contiguous():
        return torch.ops.aten._softmax.out(logits, -1, False, out=logits)
    return torch.softmax(logits, dim=-1)


def class_probabilities(
    net: torch.nn.Module, chunk: int = 32768, on_time: Callable[[str, float], None] | None = None
) -> PatchFn:
    """(B, C_in, *patch) -> softmax class probabilities (B, *patch, K), float32.

    For an STU-Net the last 1x1 convolution is applied as a matrix product on channels-last
    features, on the CPU in cache-sized chunks of voxels, each followed by its softmax in place
    (0.45 s per 128^3 tile instead of 1.3 s for the 1x1 conv plus 0.49 s for a channels-first
    softmax). Any other module is called as it is and its (B, K, *patch) logits moved last.

    On the CPU the returned function also has ``accumulate(x, targets, weight)``, which adds
    ``probabilities * weight`` into ``targets`` (one (*patch, K) view per batch item) chunk by
    chunk, so a tile's K x patch probabilities (880 MB) never exist at once. ``on_time(kind,
    seconds)`` is told the time spent in the softmax and in accumulating, if given.

    The CPU path computes the softmax with ``exp2`` on logits in base-2 units and adds
    ``exp * (weight / sum)`` with one fused multiply-add: each probability and each sum is
    within a few float32 ulps of ``softmax``, multiply, add (the reference's order), and the
    whole costs 0.06 s less per tile on the benchmark machine.
    """
    features = getattr(net, "features", None)
    head = net.seg_outputs[-1] if features is not None else None  # type: ignore[index]

    def report(kind: str, seconds: float) -> None:
        if on_time is not None:
            on_time(kind, seconds)

    def head_chunks(f: torch.Tensor) -> Iterator[tuple[int, int, int, torch.Tensor, torch.Tensor]]:
        """(item, row start, row stop, unnormalized softmax (rows, *patch[1:], K), its sum (..., 1)).

        For CPU float32 features. The logits are formed in base-2 units (log2(e) folded into the
        head) so that the softmax can use ``exp2``, twice as fast as ``exp`` here; the division
        by the sum is left to the caller, who folds it into the tile weight.
        """
        assert head is not None
        k, c = head.weight.shape[:2]
        weight = head.weight.view(k, c).t() * _LOG2E
        bias = head.bias * _LOG2E
        plane = f.shape[3] * f.shape[4]
        rows = max(1, chunk // plane)
        buf = torch.empty((rows * plane, k), dtype=torch.float32)
        flat = f.movedim(1, -1)  # (B, *patch, C), a view
        in_softmax = 0.0
        for item in range(f.shape[0]):
            for lo in range(0, f.shape[2], rows):
                hi = min(lo + rows, f.shape[2])
                part = buf[: (hi - lo) * plane]
                torch.addmm(bias, flat[item, lo:hi].reshape(-1, c), weight, out=part)
                start = time.perf_counter()
                part.sub_(part.amax(-1, keepdim=True)).exp2_()
                total = part.sum(-1, keepdim=True)
                in_softmax += time.perf_counter() - start
                yield item, lo, hi, part.view(hi - lo, *f.shape[3:], k), total.view(hi - lo, *f.shape[3:], 1)
        report("softmax", in_softmax)

    def cpu_path(f: torch.Tensor) -> bool:
        return f.device.type == "cpu" and f.dtype == torch.float32

    def whole(f: torch.Tensor) -> torch.Tensor:
        """All of a batch's probabilities at once (GPU, reduced precision)."""
        assert head is not None
        k, c = head.weight.shape[:2]
        flat = f.movedim(1, -1).reshape(-1, c)
        logits = torch.addmm(head.bias.to(flat.dtype), flat, head.weight.view(k, c).t().to(flat.dtype))
        return _softmax_last_(logits.view(*f.shape[:1], *f.shape[2:], k))

    def fn(x: torch.Tensor) -> torch.Tensor:
        if features is None or head is None:
            return _softmax_last_(net(x).movedim(1, -1).contiguous())
        f = features(x)
        if not cpu_path(f):
            return whole(f)
        out = torch.empty((*f.shape[:1], *f.shape[2:], head.weight.shape[0]), dtype=torch.float32)
        for item, lo, hi, exps, total in head_chunks(f):
            torch.div(exps, total, out=out[item, lo:hi])
        return out

    def accumulate(x: torch.Tensor, targets: Sequence[torch.Tensor], weight: torch.Tensor) -> None:
        assert features is not None
        f = features(x)
        if not cpu_path(f):
            for target, tile in zip(targets, whole(f)):
                target.add_(tile.mul_(weight))
            return
        adding = 0.0
        for item, lo, hi, exps, total in head_chunks(f):
            start = time.perf_counter()
            # probabilities * tile weight = exps * (weight / total), added in one fused pass.
            targets[item][lo:hi].addcmul_(exps, weight[lo:hi] / total)
            adding += time.perf_counter() - start
        report("accumulate", adding)

    if features is not None and head is not None:
        fn.accumulate = accumulate  # type: ignore[attr-defined]
    return fn


def mirrored(fn: PatchFn, flips: Sequence[tuple[int, ...]] = MIRROR_FLIPS) -> PatchFn:
    """Test-time augmentation: average ``fn`` over mirrored inputs, each result flipped back.

    ``flips`` name dims of the (B, C, z, y, x) input; results are classes-last (B, z, y, x, K).

    Accumulated in float32 with weight 1/len(flips) per pass, in nnU-Net's order, so that
    the sum rounds as the reference's does.
    """
    weight = 1.0 / len(flips)

    def tta(x: torch.Tensor) -> torch.Tensor:
        total: torch.Tensor | None = None
        for dims in flips:
            y = fn(torch.flip(x, dims) if dims else x)
            # Input dims (B, C, z, y, x) -> output dims (B, z, y, x, K): one less.
            y = torch.flip(y, [d - 1 for d in dims]) if dims else y
            total = weight * y if total is None else total.add_(weight * y)
        assert total is not None
        return total

    return tta


@dataclass(frozen=True)
class Slab:
    """Final sums for ``[start, stop)`` along ``axis`` (unpadded coordinates).

    ``sums`` (*spatial, K) are the weighted class scores and ``norm`` (*spatial) the summed
    tile weights; their quotient is the sliding-window mean. Both are views into the sliding
    window's buffers, valid until the next slab is requested.
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
    slab_bytes: int = 128 * 2**20,
) -> Iterator[Slab]:
    """Gaussian-weighted sliding-window average of ``fn`` over ``x`` (C_in, *spatial).

    ``fn`` maps (B, C_in, *patch) to (B, *patch, K).

    Yields ``Slab``s in order along ``axis`` (default: the largest padded axis) covering the
    whole unpadded volume. The input is padded with 0 up to the patch where it is smaller.
    Accumulators are float32 on ``x.device``; each yielded slab covers at most about
    ``slab_bytes`` of scores, as views into them that the next step overwrites: use a slab
    before asking for the next. ``on_tile(done, total)`` reports progress.
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

    # Row buffers in the volume's own axis order, one patch deep along the stream axis:
    # class scores (*window, K) and the summed tile weights (*window).
    window = [patch[d] if d == a else padded[d] for d in range(3)]
    acc = torch.zeros((*window, num_classes), dtype=torch.float32, device=device)
    norm = torch.zeros(window, dtype=torch.float32, device=device)
    weight_k = weight.unsqueeze(-1)
    other = [d for d in range(3) if d != a]
    plane = math.prod(spatial[d] for d in other)
    rows_per_slab = max(1, slab_bytes // (4 * num_classes * max(plane, 1)))

    # A function that can add its weighted scores in place saves materialising each tile.
    accumulate = getattr(fn, "accumulate", None)
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
            if accumulate is not None:
                accumulate(batch, [acc[region] for region in regions], weight_k)
            else:
                for region, tile in zip(regions, fn(batch)):
                    # Product rounded to float32, then summed: the reference's two roundings.
                    acc[region].add_(tile.mul_(weight_k))
            del batch
            for region in regions:
                norm[region].add_(weight)
            done += len(chunk)
            if on_tile is not None:
                on_tile(done, tiles_total)
        # Everything before the next row's start is final.
        final_until = row_starts[r + 1] if r + 1 < len(row_starts) else padded[a]
        yield from _finish(acc, norm, row, final_until - row, pads, spatial, a, rows_per_slab)
        if r + 1 < len(row_starts):
            _shift(acc, a, final_until - row)
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


def predict_scores(
    x: torch.Tensor,
    fn: PatchFn,
    num_classes: int,
    patch: Sequence[int] = (128, 128, 128),
    step_size: float = 0.5,
    batch_size: int = 1,
) -> torch.Tensor:
    """The whole (*spatial, K) averaged score volume at once (for tests and small volumes)."""
    slabs = [(s.axis, s.scores()) for s in sliding_window(x, fn, num_classes, patch, step_size, batch_size)]
    return torch.cat([scores for _, scores in slabs], dim=slabs[0][0])
