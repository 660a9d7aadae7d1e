"""Network-resolution results back to the cropped input resolution, streaming.

Two exports, as nnU-Net v1's ``normal`` and ``fast`` modes (reference sections 5 and 9):

- ``ProbabilityExport`` (normal): class probabilities are linearly interpolated to the input
  spacing, then argmax. Slabs arrive from the sliding window and are resampled and reduced to
  labels as soon as the rows they need are complete, so the K-channel volume at input
  resolution never exists; only a few output rows of it do.
- ``resample_labels`` (fast): the network-resolution label map is brought back by linear
  interpolation of each label's indicator, each voxel taking the label with the highest
  interpolated value. Only the (at most 8) labels at the corners of a voxel's interpolation
  cell can win, so each output voxel scores just those instead of a full pass per label.

Both resample each axis on the pixel-area grid (source coordinate ``(o + 0.5) * n_in / n_out
- 0.5``, clamped at the edges), linearly, or with nearest neighbour along the separate
low-resolution axis of strongly anisotropic images.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import product

import numpy as np
import torch

from stuseg.predict import Slab
from stuseg.preprocess import nearest_indices


@dataclass(frozen=True)
class AxisMap:
    """1D resampling: ``out[o] = w_lo[o] * in[lo[o]] + w_hi[o] * in[hi[o]]``."""

    lo: np.ndarray
    hi: np.ndarray
    w_lo: np.ndarray  # float64
    w_hi: np.ndarray

    @property
    def is_nearest(self) -> bool:
        return not self.w_hi.any()

    def rows(self, sel: slice) -> AxisMap:
        return AxisMap(self.lo[sel], self.hi[sel], self.w_lo[sel], self.w_hi[sel])


def linear_map(n_in: int, n_out: int) -> AxisMap:
    """Linear interpolation on the pixel-area grid, edge values repeated beyond the ends.

    Weights are formed as scipy.ndimage forms its order-1 spline weights - ``w_lo = 1 - t``,
    ``w_hi = 1 - w_lo`` for the fractional part ``t`` of the unclamped coordinate, indices
    clamped afterwards - so that exact ties in the fast export are ties in the reference too.
    """
    coord = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
    start = np.floor(coord)
    w_lo = 1.0 - (coord - start)
    w_hi = 1.0 - w_lo
    lo = np.clip(start, 0, n_in - 1).astype(np.int64)
    hi = np.clip(start + 1, 0, n_in - 1).astype(np.int64)
    return AxisMap(lo, hi, w_lo, w_hi)


def nearest_map(n_in: int, n_out: int) -> AxisMap:
    idx = nearest_indices(n_in, n_out)
    return AxisMap(idx, idx, np.ones(n_out), np.zeros(n_out))


def axis_maps(
    in_shape: tuple[int, ...], out_shape: tuple[int, ...], separate_axis: int | None
) -> list[AxisMap]:
    """Linear along every axis except ``separate_axis`` (nearest neighbour there)."""
    return [
        nearest_map(n, m) if a == separate_axis else linear_map(n, m)
        for a, (n, m) in enumerate(zip(in_shape, out_shape))
    ]


def _resample_axis(x: torch.Tensor, dim: int, amap: AxisMap) -> torch.Tensor:
    """Apply ``amap`` along ``dim`` of ``x``, in float32."""
    dev = x.device
    out = x.index_select(dim, torch.from_numpy(amap.lo).to(dev))
    if amap.is_nearest:
        return out
    shape = [1] * x.ndim
    shape[dim] = len(amap.lo)
    w_lo = torch.from_numpy(amap.w_lo.astype(np.float32)).to(dev).reshape(shape)
    w_hi = torch.from_numpy(amap.w_hi.astype(np.float32)).to(dev).reshape(shape)
    out.mul_(w_lo)
    out.add_(x.index_select(dim, torch.from_numpy(amap.hi).to(dev)).mul_(w_hi))
    return out


class ProbabilityExport:
    """Consume score slabs in order along one axis; produce the argmax label map at ``out_shape``.

    Where the (up to 8) network voxels around an output voxel share one argmax label, the
    interpolated probabilities have that argmax too: interpolation weights are non-negative, so
    a class that is at least as likely at every corner stays at least as likely in between
    (exactly so in floating point, as rounding is monotonic). Only the other voxels - along
    structure boundaries - are interpolated over all K classes. Where boundary voxels are most
    of a block (noisy predictions), the block is interpolated axis by axis over all classes
    instead, which is cheaper then. ``block_voxels`` bounds the output voxels handled at once,
    ``chunk`` the K-channel rows gathered at once, ``dense_bytes`` a block's K-channel buffer
    on the axis-by-axis path, and ``dense_fraction`` is the share of boundary voxels above
    which that path is taken.
    """

    def __init__(
        self,
        in_shape: tuple[int, int, int],
        out_shape: tuple[int, int, int],
        separate_axis: int | None,
        axis: int,
        num_classes: int,
        block_voxels: int = 2**22,
        chunk: int = 2**18,
        dense_bytes: int = 256 * 2**20,
        dense_fraction: float = 0.3,
    ):
        self.maps = axis_maps(in_shape, out_shape, separate_axis)
        self.axis = axis
        self.out_shape = out_shape
        self.num_classes = num_classes
        self.labels = np.zeros(out_shape, np.uint8)
        plane = int(np.prod([n for d, n in enumerate(out_shape) if d != axis]))
        self.rows_per_block = max(1, block_voxels // max(plane, 1))
        self.rows_per_dense_block = max(1, dense_bytes // (4 * num_classes * max(plane, 1)))
        self.chunk = chunk
        self.dense_fraction = dense_fraction
        self._held: torch.Tensor | None = None  # source scores, rows [held_lo, held_hi) along axis
        self._held_labels: torch.Tensor | None = None  # their argmax
        self._held_second: torch.Tensor | None = None  # their second-largest probability
        self._held_lo = 0
        self._next = 0  # next output row along axis

    def add(self, slab: Slab) -> None:
        if slab.axis != self.axis:
            raise ValueError("slabs must all stream along the same axis")
        d = self.axis  # scores are (*spatial, K)
        held_hi = self._held_lo + (0 if self._held is None else self._held.shape[d])
        if slab.start != held_hi and self._held is not None:
            raise ValueError(f"slab starts at {slab.start}, expected {held_hi}")
        # torch.argmax returns the first maximum: ties go to the lowest class, as numpy does.
        labels = slab.scores.argmax(-1).to(torch.uint8)
        # The second-largest probability bounds every class but the argmax (see _emit).
        others = slab.scores.clone().scatter_(-1, labels.long().unsqueeze(-1), -1.0)
        second = others.amax(-1)  # faster than topk(2); -1 if there is one class only
        del others
        if self._held is None or self._held_labels is None or self._held_second is None:
            self._held, self._held_lo = slab.scores.contiguous(), slab.start
            self._held_labels, self._held_second = labels, second.contiguous()
        else:
            self._held = torch.cat((self._held, slab.scores), dim=d)
            self._held_labels = torch.cat((self._held_labels, labels), dim=d)
            self._held_second = torch.cat((self._held_second, second), dim=d)
        held_hi = slab.stop
        amap = self.maps[self.axis]
        n_out = self.out_shape[self.axis]
        # Output rows whose source rows have all arrived.
        ready = self._next
        while ready < n_out and amap.hi[ready] < held_hi:
            ready += 1
        for start in range(self._next, ready, self.rows_per_block):
            self._emit(slice(start, min(start + self.rows_per_block, ready)))
        self._next = ready
        # Drop source rows no later output needs.
        if ready < n_out:
            keep_from = int(amap.lo[ready])
            if keep_from > self._held_lo:
                n = held_hi - keep_from
                self._held = self._held.narrow(d, keep_from - self._held_lo, n).clone()
                self._held_labels = self._held_labels.narrow(d, keep_from - self._held_lo, n).clone()
                self._held_second = self._held_second.narrow(d, keep_from - self._held_lo, n).clone()
                self._held_lo = keep_from
        else:
            self._held = self._held_labels = self._held_second = None

    def _emit(self, rows: slice) -> None:
        assert self._held is not None and self._held_labels is not None
        dev = self._held.device
        part = self.maps[self.axis].rows(rows)
        maps = [
            AxisMap(part.lo - self._held_lo, part.hi - self._held_lo, part.w_lo, part.w_hi)
            if a == self.axis
            else m
            for a, m in enumerate(self.maps)
        ]
        # Interpolation corners per axis: (source indices, weights); one where nearest suffices.
        per_axis = [[(m.lo, m.w_lo)] if m.is_nearest else [(m.lo, m.w_lo), (m.hi, m.w_hi)] for m in maps]
        per_axis_t = [[(torch.from_numpy(i).to(dev), w) for i, w in choices] for choices in per_axis]
        corners = [self._held_labels]
        for a in range(3):
            corners = [c.index_select(a, idx) for c in corners for idx, _ in per_axis_t[a]]
        out = corners[0].clone()
        mixed = torch.zeros_like(out, dtype=torch.bool)
        for c in corners[1:]:
            mixed |= c != corners[0]
        where = mixed.nonzero()
        if where.shape[0] > self.dense_fraction * out.numel():
            self._emit_dense(rows)
            return
        held = self._held.view(-1, self.num_classes)
        strides = (self._held.shape[1] * self._held.shape[2], self._held.shape[2], 1)
        tables = [
            [
                (torch.from_numpy(i).to(dev), torch.from_numpy(w.astype(np.float32)).to(dev))
                for i, w in choices
            ]
            for choices in per_axis
        ]
        flat_labels = self._held_labels.view(-1)
        flat_second = self._held_second.view(-1)
        flat_scores = self._held.view(-1)
        k = self.num_classes
        for lo in range(0, where.shape[0], self.chunk):
            at = where[lo : lo + self.chunk]
            corner_rows = []
            corner_weights = []
            for choice in product(*tables):
                corner_rows.append(sum(idx[at[:, a]] * strides[a] for a, (idx, _) in enumerate(choice)))
                corner_weights.append(
                    choice[0][1][at[:, 0]] * choice[1][1][at[:, 1]] * choice[2][1][at[:, 2]]
                )
            # Candidates: the corners' argmax classes. Their interpolated values, summed in
            # corner order exactly as the all-class path below sums every class.
            cand = torch.stack([flat_labels[r].long() for r in corner_rows])  # (corners, n)
            values = torch.zeros(cand.shape, dtype=torch.float32, device=dev)
            bound = torch.zeros(cand.shape[1], dtype=torch.float32, device=dev)
            for rows_j, w_j in zip(corner_rows, corner_weights):
                values.addcmul_(flat_scores.take(rows_j * k + cand), w_j)
                bound.addcmul_(flat_second[rows_j], w_j)
            best = values.max(0).values
            best_class = torch.where(values == best, cand, torch.full_like(cand, k)).min(0).values
            # Any other class is at most the second-largest probability at every corner, so
            # its interpolated value is at most ``bound`` (same weights, same order, monotonic
            # rounding): where ``best > bound`` a candidate wins, else score all classes.
            sure = best > bound
            out[tuple(at[sure].T)] = best_class[sure].to(torch.uint8)
            unsure = (~sure).nonzero().squeeze(1)
            if unsure.numel():
                full = torch.zeros((unsure.numel(), k), dtype=torch.float32, device=dev)
                for rows_j, w_j in zip(corner_rows, corner_weights):
                    full.addcmul_(held.index_select(0, rows_j[unsure]), w_j[unsure].unsqueeze(1))
                out[tuple(at[unsure].T)] = full.argmax(-1).to(torch.uint8)
        index = [slice(None)] * 3
        index[self.axis] = rows
        self.labels[tuple(index)] = out.cpu().numpy()

    def _emit_dense(self, rows: slice) -> None:
        """All K classes interpolated axis by axis for output rows ``rows``, then argmax."""
        assert self._held is not None
        for start in range(rows.start, rows.stop, self.rows_per_dense_block):
            sub = slice(start, min(start + self.rows_per_dense_block, rows.stop))
            part = self.maps[self.axis].rows(sub)
            here = AxisMap(part.lo - self._held_lo, part.hi - self._held_lo, part.w_lo, part.w_hi)
            block = _resample_axis(self._held, self.axis, here)
            for a in range(3):
                if a != self.axis:
                    block = _resample_axis(block, a, self.maps[a])
            index = [slice(None)] * 3
            index[self.axis] = sub
            self.labels[tuple(index)] = block.argmax(-1).to(torch.uint8).cpu().numpy()

    def result(self) -> np.ndarray:
        if self._next != self.out_shape[self.axis]:
            raise ValueError("not all slabs were added")
        return self.labels


def resample_labels(
    labels: torch.Tensor,
    out_shape: tuple[int, int, int],
    separate_axis: int | None,
    block_voxels: int = 2**22,
) -> np.ndarray:
    """Fast-mode export of a (z, y, x) label map to ``out_shape`` (batchgenerators >= 0.25.4 rule).

    Each label's indicator is interpolated (linear; nearest along ``separate_axis``) and every
    voxel takes the label with the highest value. Exact ties go to the nearest-neighbour label
    when it is one of the tied labels, else to the smallest tied label.
    """
    maps = axis_maps(tuple(labels.shape), out_shape, separate_axis)
    near = [nearest_map(n, m) for n, m in zip(labels.shape, out_shape)]
    dev = labels.device
    src = labels.to(torch.uint8)
    out = np.empty(out_shape, np.uint8)
    step = max(1, block_voxels // max(out_shape[1] * out_shape[2], 1))
    for z0 in range(0, out_shape[0], step):
        rows = slice(z0, min(z0 + step, out_shape[0]))
        # Interpolation corners per axis: (source indices, weights); one where nearest suffices.
        per_axis = []
        for a, amap in enumerate(maps):
            part = amap.rows(rows) if a == 0 else amap
            pairs = (
                [(part.lo, part.w_lo)] if part.is_nearest else [(part.lo, part.w_lo), (part.hi, part.w_hi)]
            )
            per_axis.append([(torch.from_numpy(i).to(dev), torch.from_numpy(w).to(dev)) for i, w in pairs])
        # Corner label volumes, gathered one axis at a time; z-major corner order.
        corners = [src]
        for a in range(3):
            corners = [c.index_select(a, idx) for c in corners for idx, _ in per_axis[a]]
        weights = list(product(*([w for _, w in choices] for choices in per_axis)))
        nn = src
        for a in range(3):
            part = near[a].rows(rows) if a == 0 else near[a]
            nn = nn.index_select(a, torch.from_numpy(part.lo).to(dev))
        out[rows] = _vote(corners, weights, nn).cpu().numpy()
    return out


def _vote(
    corners: list[torch.Tensor], weights: list[tuple[torch.Tensor, ...]], nearest: torch.Tensor
) -> torch.Tensor:
    """Per voxel: the label with the largest summed corner weight (ties: nearest, else smallest).

    ``weights[k]`` holds corner k's per-axis weight vectors (z, y, x); a corner's weight is
    their product, formed in that order in float64 like scipy's ``(1 * w_z) * w_y * w_x``, and
    a label's score sums its corners' weights in corner order.
    """
    result = corners[0].clone()
    if len(corners) == 1:
        return result
    first = corners[0]
    mixed = torch.zeros_like(first, dtype=torch.bool)
    for lab in corners[1:]:
        mixed |= lab != first
    flat = mixed.view(-1).nonzero().squeeze(1)
    if flat.numel() == 0:
        return result
    # Only voxels whose corners disagree need scoring.
    _, ny, nx = first.shape
    where = (flat // (ny * nx), (flat // nx) % ny, flat % nx)
    lab = torch.stack([c.view(-1).index_select(0, flat) for c in corners]).to(torch.int16)
    # Each axis' distinct weight vectors gathered once, then multiplied per corner.
    gathered: list[dict[int, torch.Tensor]] = [{}, {}, {}]
    for corner in weights:
        for axis, w in enumerate(corner):
            if id(w) not in gathered[axis]:
                gathered[axis][id(w)] = w[where[axis]]
    wt = torch.stack(
        [gathered[0][id(wz)] * gathered[1][id(wy)] * gathered[2][id(wx)] for wz, wy, wx in weights]
    )
    nn = nearest.view(-1).index_select(0, flat).to(torch.int16)
    # Most disagreeing voxels see exactly two labels (a boundary between two structures):
    # score both at once; the rest (junctions of 3+ labels) compare every corner pair.
    a = lab[0]
    b = torch.where(lab != a, lab, torch.full_like(lab, -1)).max(0).values
    is_a = lab == a
    two = (is_a | (lab == b)).all(0)
    winner = torch.empty_like(a)
    if bool(two.any()):
        la, lb, near, w2, in_a = a[two], b[two], nn[two], wt[:, two], is_a[:, two]
        sa = torch.zeros_like(w2[0])
        sb = torch.zeros_like(w2[0])
        for j in range(w2.shape[0]):  # in corner order: the reference's rounding
            sa += w2[j] * in_a[j]
            sb += w2[j] * ~in_a[j]
        tie_pick = torch.where((near == la) | (near == lb), near, torch.minimum(la, lb))
        winner[two] = torch.where(sa > sb, la, torch.where(sb > sa, lb, tie_pick))
    many = ~two
    if bool(many.any()):
        labm, wtm, near = lab[:, many], wt[:, many], nn[many]
        score = torch.zeros_like(wtm)
        for j in range(labm.shape[0]):
            # every corner sharing corner j's label gains corner j's weight
            score += torch.where(labm == labm[j], wtm[j], 0.0)
        tied = score == score.max(0).values
        nn_tied = (tied & (labm == near)).any(0)
        smallest = torch.where(tied, labm, torch.full_like(labm, 32767)).min(0).values
        winner[many] = torch.where(nn_tied, near, smallest)
    result.view(-1).index_copy_(0, flat, winner.to(torch.uint8))
    return result
