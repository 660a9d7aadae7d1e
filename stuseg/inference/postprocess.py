"""Network-resolution results back to the cropped input resolution, streaming.

Two exports, as nnU-Net v1's ``normal`` and ``fast`` modes:

- ``ProbabilityExport`` (normal): class probabilities are linearly interpolated to the input
  spacing, then argmax. Slabs arrive from the sliding window and are reduced to labels at
  the input resolution as soon as the rows they need are complete: the K-channel volume at
  input resolution never exists, not even a row of it (each output voxel is interpolated and
  reduced on its own).
- ``resample_labels`` (fast): the network-resolution label map is brought back by linear
  interpolation of each label's indicator, each voxel taking the label with the highest
  interpolated value. Only the (at most 8) labels at the corners of a voxel's interpolation
  cell can win, so each output voxel scores just those instead of a full pass per label.

The per-voxel work runs in the compiled loops of ``stuseg.inference.kernels``; this module prepares
their index and weight tables and streams the slabs.

Both also tally, per class, the winning probability of the voxels they label
(``stuseg.analysis.quality.Confidence``): normal mode on the output voxels, the probability of each
voxel's class as the export resampled it; fast mode on the network-resolution voxels, before
their label map is resampled. ``logits``: the scores are averaged logits (nnU-Net v2), and the
probability is their softmax after resampling (or at the network voxel, in fast mode); otherwise
they are probabilities (v1).

Both resample each axis on the pixel-area grid (source coordinate ``(o + 0.5) * n_in / n_out
- 0.5``, clamped at the edges), linearly, or with nearest neighbour along the separate
low-resolution axis of strongly anisotropic images.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from stuseg.analysis.quality import LOW_PROBABILITY, Confidence
from stuseg.inference.kernels import argmax_of_mean, interpolate_argmax, mean_top2, vote_labels
from stuseg.inference.predict import Slab
from stuseg.inference.preprocess import axis_slice, nearest_indices

__all__ = [
    "AxisMap",
    "ProbabilityExport",
    "axis_maps",
    "corner_tables",
    "export_labels",
    "linear_map",
    "nearest_map",
    "resample_labels",
    "slab_labels",
    "tensor_tallies",
]


@dataclass(frozen=True)
class AxisMap:
    """1D resampling: ``out[o] = w_lo[o] * in[lo[o]] + w_hi[o] * in[hi[o]]``."""

    lo: np.ndarray
    hi: np.ndarray
    w_lo: np.ndarray  # float64
    w_hi: np.ndarray

    def tables(self) -> tuple[np.ndarray, np.ndarray]:
        """(2, n) low/high source indices and (2, n) float64 weights, as the kernels take them."""
        return np.stack([self.lo, self.hi]), np.stack([self.w_lo, self.w_hi])


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
    """Nearest neighbour: the high corner repeats the low one with weight 0."""
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


def corner_tables(maps: list[AxisMap]) -> list[np.ndarray]:
    """The kernels' arguments for three axes: indices and weights of the first, then the second, ..."""
    return [table for m in maps for table in m.tables()]


def _host(t: torch.Tensor) -> np.ndarray:
    """A tensor as a numpy array on the host (a view when it already is on the CPU)."""
    return t.detach().cpu().numpy()


def _tallies(rows: int, num_classes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Zeroed per-row confidence tallies for the kernels: probability sums, low and all voxels."""
    return np.zeros((rows, num_classes)), *(np.zeros((rows, num_classes), np.int64) for _ in range(2))


def slab_labels(
    slab: Slab, out: np.ndarray, confidence: Confidence | None = None, *, logits: bool = False
) -> None:
    """Write the argmax class of ``slab``'s mean scores into ``out`` (uint8, the slab's spatial shape).

    With ``confidence``, each voxel's winning probability is tallied there by its class: the
    winning mean score, or with ``logits`` the softmax of the mean logits at the winner.
    """
    k = slab.sums.shape[-1]
    if slab.sums.device.type == "cpu":
        tallies = _tallies(out.shape[0], k)
        argmax_of_mean(_host(slab.sums), _host(slab.norm), out, logits, *tallies)
        if confidence is not None:
            confidence.add(*tallies)
        return
    # On the accelerator: only the labels and K-long tallies travel to the host.
    scores = slab.scores()
    labels = scores.argmax(-1)
    out[...] = _host(labels.to(torch.uint8))
    if confidence is not None:
        confidence.add(*tensor_tallies(scores, labels, logits=logits))


def tensor_tallies(
    scores: torch.Tensor, labels: torch.Tensor, *, logits: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The confidence tallies of voxels with mean ``scores`` (..., K) and argmax ``labels`` (...),
    with torch operators on the tensors' own device (a GPU's slab); as (1, K) host arrays."""
    k = scores.shape[-1]
    top = scores.amax(-1)
    probability = 1.0 / torch.exp(scores - top.unsqueeze(-1)).sum(-1) if logits else top
    labels, probability = labels.reshape(-1), probability.reshape(-1).double()
    low = labels[probability < LOW_PROBABILITY]
    tallies = [torch.bincount(labels, weights=probability, minlength=k), torch.bincount(low, minlength=k)]
    tallies.append(torch.bincount(labels, minlength=k))
    sums, lows, voxels = (_host(t)[None].copy() for t in tallies)
    for t in (sums, lows, voxels):
        t[:, 0] = 0  # background is not tallied
    return sums, lows, voxels.astype(np.int64)


class ProbabilityExport:
    """Consume score slabs in order along one axis; produce the argmax label map at ``out_shape``.

    Each slab's mean scores are held, with their argmax, second-largest value and winning
    probability (or logit margin), until every output row interpolating from them is done
    (``kernels.interpolate_argmax``), so the K-channel volume at output resolution never exists,
    and at network resolution only a slab and the one or two rows before it.

    ``.confidence`` tallies the output voxels' winning probabilities by class (input grid);
    ``logits``: the scores are averaged logits (nnU-Net v2), else probabilities.
    """

    def __init__(
        self,
        in_shape: tuple[int, int, int],
        out_shape: tuple[int, int, int],
        separate_axis: int | None,
        axis: int,
        num_classes: int,
        *,
        logits: bool = False,
    ):
        self.maps = axis_maps(in_shape, out_shape, separate_axis)
        self.tables = corner_tables(self.maps)
        self.axis = axis
        self.out_shape = out_shape
        self.num_classes = num_classes
        self.labels = np.zeros(out_shape, np.uint8)
        self.logits = logits
        self.confidence = Confidence.zeros(num_classes, "input", logits)
        # Held source rows [held_lo, held_lo + rows) along ``axis``, at the front of reused buffers:
        # mean scores, their argmax, their second-largest value and ``top`` (kernels.mean_top2:
        # the argmax's probability, or its margin over the second-largest logit).
        self._buffers: tuple[np.ndarray, ...] | None = None
        self._rows = 0
        self._held_lo = 0
        self._expected: int | None = None  # where the next slab must start
        self._next = 0  # next output row along axis

    def _held(self) -> tuple[np.ndarray, ...]:
        assert self._buffers is not None
        return tuple(axis_slice(b, self.axis, slice(0, self._rows)) for b in self._buffers)

    def add(self, slab: Slab) -> None:
        if slab.axis != self.axis:
            raise ValueError("slabs must all stream along the same axis")
        d = self.axis
        if self._expected is not None and slab.start != self._expected:
            raise ValueError(f"slab starts at {slab.start}, expected {self._expected}")
        if self._expected is None:
            self._held_lo = slab.start
        self._expected = slab.stop
        sums, norm = _host(slab.sums), _host(slab.norm)
        rows = self._rows + slab.stop - slab.start
        if self._buffers is None or self._buffers[1].shape[d] < rows:
            spatial = list(norm.shape)
            spatial[d] = rows
            grown = (
                np.empty((*spatial, self.num_classes), np.float32),
                np.empty(spatial, np.uint8),
                np.empty(spatial, np.float32),
                np.empty(spatial, np.float32),
            )
            if self._buffers is not None:
                for new, old in zip(grown, self._held()):
                    axis_slice(new, d, slice(0, self._rows))[...] = old
            self._buffers = grown
        new_rows = (axis_slice(b, d, slice(self._rows, rows)) for b in self._buffers)
        mean_top2(sums, norm, self.logits, *new_rows)
        self._rows = rows
        held_hi = slab.stop
        amap = self.maps[d]
        n_out = self.out_shape[d]
        # Output rows whose source rows have all arrived.
        ready = self._next
        while ready < n_out and amap.hi[ready] < held_hi:
            ready += 1
        if ready > self._next:
            self._emit(self._next, ready)
        self._next = ready
        # Drop source rows no later output needs: move the rest (a row or two) to the front.
        # Where the export shrinks this axis by more than a row per output row (nearest
        # neighbour along a thick axis, or linear from a coarse input), the first row still
        # needed can lie beyond every held row: then all of them go, and the next slab starts
        # the buffer afresh (its first row is ``held_hi``, where ``_held_lo`` then points).
        if ready < n_out:
            drop = min(int(amap.lo[ready]) - self._held_lo, rows)
            if drop > 0:
                for b in self._buffers:
                    axis_slice(b, d, slice(0, rows - drop))[...] = axis_slice(b, d, slice(drop, rows)).copy()
                self._rows = rows - drop
                self._held_lo += drop
        else:
            self._buffers = None
            self._rows = 0

    def _emit(self, lo: int, hi: int) -> None:
        d = self.axis
        tables = list(self.tables)
        # This block's rows along the stream axis, indexed into the held rows.
        tables[2 * d] = tables[2 * d][:, lo:hi] - self._held_lo
        tables[2 * d + 1] = np.ascontiguousarray(tables[2 * d + 1][:, lo:hi])
        out = axis_slice(self.labels, d, slice(lo, hi))
        scores, labels, second, top = self._held()
        tallies = _tallies(out.shape[0], self.num_classes)
        interpolate_argmax(scores, labels, second, top, self.logits, *tables, out, *tallies)
        self.confidence.add(*tallies)

    def result(self) -> np.ndarray:
        if self._next != self.out_shape[self.axis]:
            raise ValueError("not all slabs were added")
        return self.labels


def resample_labels(
    labels: np.ndarray, out_shape: tuple[int, int, int], separate_axis: int | None
) -> np.ndarray:
    """Fast-mode export of a (z, y, x) uint8 label map to ``out_shape`` (batchgenerators >= 0.25.4 rule).

    Each label's indicator is interpolated (linear; nearest along ``separate_axis``) and every
    voxel takes the label with the highest value. Exact ties go to the nearest-neighbour label
    when it is one of the tied labels, else to the smallest tied label.
    """
    maps = axis_maps(tuple(labels.shape), out_shape, separate_axis)
    near = [nearest_indices(n, m) for n, m in zip(labels.shape, out_shape)]
    out = np.empty(out_shape, np.uint8)
    vote_labels(np.ascontiguousarray(labels, dtype=np.uint8), *corner_tables(maps), *near, out)
    return out


def export_labels(
    slabs: Iterable[Slab],
    in_shape: tuple[int, int, int],
    out_shape: tuple[int, int, int],
    separate_axis: int | None,
    num_classes: int,
    *,
    fast: bool,
    logits: bool = False,
) -> tuple[np.ndarray, Confidence]:
    """Consume the sliding window's slabs (in order); the uint8 label map at ``out_shape`` and its confidence.

    Args:
        slabs: the score slabs of a (z, y, x) volume of ``in_shape``, as ``sliding_window`` yields
            them (each used before the next is asked for).
        in_shape: the network-resolution shape the slabs cover.
        out_shape: the shape to export to (the cropped input grid).
        separate_axis: the axis resampled by nearest neighbour, or None.
        num_classes: K, the number of class scores per voxel.
        fast: argmax at ``in_shape`` then ``resample_labels``; else ``ProbabilityExport``.
        logits: the slabs' scores are averaged logits (nnU-Net v2), else probabilities (v1).

    Returns:
        The label map (values = class index), and the tallies of its voxels' winning
        probabilities by class (on the output voxels, or with ``fast`` on the
        network-resolution voxels).
    """
    if fast:
        net_labels = np.empty(in_shape, np.uint8)
        tallies = Confidence.zeros(num_classes, "network", logits)
        for slab in slabs:
            index = [slice(None)] * 3
            index[slab.axis] = slice(slab.start, slab.stop)
            slab_labels(slab, net_labels[tuple(index)], tallies, logits=logits)
            del slab
        return resample_labels(net_labels, out_shape, separate_axis), tallies
    normal = None
    for slab in slabs:
        if normal is None:
            normal = ProbabilityExport(
                in_shape, out_shape, separate_axis, slab.axis, num_classes, logits=logits
            )
        normal.add(slab)
        del slab
    if normal is None:
        raise ValueError("no slabs to export")
    return normal.result(), normal.confidence
