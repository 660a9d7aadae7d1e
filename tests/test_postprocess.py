"""Exports back to the cropped input grid, against straightforward full-volume references."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage as ndi
import torch

from stuseg.inference.postprocess import (
    ProbabilityExport,
    linear_map,
    nearest_map,
    resample_labels,
    slab_labels,
)
from stuseg.inference.predict import Slab

CASES = [
    ((7, 9, 11), (13, 20, 17), None),  # upsampling, non-integer ratios
    ((8, 10, 12), (16, 20, 24), None),  # exact factor 2: many exact ties
    ((10, 9, 6), (5, 17, 13), None),  # mixed down/upsampling
    ((5, 12, 13), (14, 20, 30), 0),  # separate z
    ((12, 5, 13), (20, 14, 30), 1),  # separate y
    ((9, 9, 9), (9, 9, 9), None),  # unchanged
    ((1, 6, 7), (3, 9, 7), None),  # a single slice
]


def _zoom(x: np.ndarray, shape: tuple[int, ...], order: int) -> np.ndarray:
    return ndi.zoom(x, np.array(shape) / np.array(x.shape), order=order, mode="nearest", grid_mode=True)


def _separate(x: np.ndarray, shape: tuple[int, ...], axis: int, order: int, cast=None) -> np.ndarray:
    """Per-slice 2D zoom of ``order``, then nearest neighbour along ``axis``."""
    moved = np.moveaxis(x, axis, 0)
    plane = tuple(n for a, n in enumerate(shape) if a != axis)
    stack = np.stack([_zoom(s, plane, order) for s in moved])
    if cast is not None:
        stack = stack.astype(cast)
    coord = (np.arange(shape[axis]) + 0.5) * (stack.shape[0] / shape[axis]) - 0.5
    idx = np.clip(np.floor(coord + 0.5), 0, stack.shape[0] - 1).astype(int)
    return np.moveaxis(stack[idx], 0, axis)


def reference_normal(p: np.ndarray, shape: tuple[int, ...], sep: int | None) -> np.ndarray:
    """Reference 5 'normal': each channel order-1 resized in float64, cast to float32, argmax."""
    if sep is None:
        res = np.stack([_zoom(c.astype(np.float64), shape, 1) for c in p])
    else:
        res = np.stack([_separate(c.astype(np.float64), shape, sep, 1, cast=np.float32) for c in p])
    return res.astype(np.float32).argmax(0)


def reference_fast(lab: np.ndarray, shape: tuple[int, ...], sep: int | None) -> np.ndarray:
    """Reference 9: per-label order-1 indicators, argmax, ties to the nearest label, else smallest."""

    def resize(m: np.ndarray, order: int) -> np.ndarray:
        return _zoom(m, shape, order) if sep is None else _separate(m, shape, sep, order)

    values = np.unique(lab).astype(np.int64)
    scores = np.stack([resize((lab == c).astype(np.float64), 1) for c in values])
    nearest = resize(lab, 0)
    tied = scores == scores.max(0)
    vals = values[:, None, None, None]
    nn_tied = (tied & (vals == nearest)).any(0)
    smallest = np.where(tied, vals, 10**6).min(0)
    return np.where(nn_tied, nearest, smallest)


@pytest.mark.parametrize(("in_shape", "out_shape", "sep"), CASES)
@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("smooth", [False, True])
def test_probability_export_streams_to_the_reference_labels(in_shape, out_shape, sep, axis, smooth):
    """Noisy probabilities (mostly every class interpolated) and smooth ones (corners agree or a
    candidate wins by the bound), in uneven slabs, as sums and tile weights."""
    rng = np.random.default_rng(sum(in_shape) + axis)
    p = rng.random((6, *in_shape)).astype(np.float32)
    if smooth:  # structures a few voxels wide, as a trained network predicts
        p = ndi.gaussian_filter(p, (0, 2, 2, 2)) ** 8
    p /= p.sum(0)
    norm = rng.uniform(0.1, 3.0, in_shape).astype(np.float32)
    sums = p * norm
    export = ProbabilityExport(in_shape, out_shape, sep, axis, 6)
    cuts = sorted({0, in_shape[axis], *rng.integers(1, max(in_shape[axis], 2), 2).tolist()})
    for a, b in zip(cuts, cuts[1:]):
        index = [slice(None)] * 4
        index[axis + 1] = slice(a, b)
        export.add(
            Slab(
                axis,
                a,
                b,
                torch.from_numpy(sums[tuple(index)]).movedim(0, -1),
                torch.from_numpy(norm[tuple(index)[1:]]),
            )
        )
    got = export.result()
    assert got.dtype == np.uint8 and got.shape == out_shape
    np.testing.assert_array_equal(got, reference_normal(sums / norm, out_shape, sep))


def test_slab_labels_are_the_argmax_of_the_mean_with_ties_to_the_lowest_class() -> None:
    rng = np.random.default_rng(3)
    sums = torch.from_numpy(rng.random((5, 6, 7, 9)).astype(np.float32))
    norm = torch.from_numpy(rng.uniform(0.5, 2.0, (5, 6, 7)).astype(np.float32))
    sums[0, 0, 0, 2] = sums[0, 0, 0, 6] = 2.0  # an exact tie: class 2 wins
    # A near tie that the division makes exact: the reference (divide, then argmax) picks class 1.
    norm[1, 1, 1] = 0.75
    sums[1, 1, 1, :] = 0.0
    sums[1, 1, 1, 1] = 1.9000000953674316  # a float32
    sums[1, 1, 1, 4] = 1.9000002145767212  # the next float32: larger, same quotient
    assert sums[1, 1, 1, 4] > sums[1, 1, 1, 1] and sums[1, 1, 1, 1] / 0.75 == sums[1, 1, 1, 4] / 0.75
    out = np.zeros((5, 6, 7), np.uint8)
    slab_labels(Slab(0, 0, 5, sums, norm), out)
    expected = (sums / norm.unsqueeze(-1)).argmax(-1).numpy()
    np.testing.assert_array_equal(out, expected)
    assert out[0, 0, 0] == 2 and out[1, 1, 1] == 1
    # Strided views, as the sliding window hands them out.
    out_t = np.zeros((7, 6, 5), np.uint8).transpose(2, 1, 0)
    slab_labels(Slab(0, 0, 5, sums.transpose(0, 2).transpose(0, 2), norm), out_t)
    np.testing.assert_array_equal(out_t, expected)


def test_probability_export_rejects_gaps() -> None:
    export = ProbabilityExport((4, 4, 4), (8, 8, 8), None, 0, 2)
    export.add(Slab(0, 0, 2, torch.rand(2, 4, 4, 2), torch.ones(2, 4, 4)))
    with pytest.raises(ValueError, match="expected 2"):
        export.add(Slab(0, 3, 4, torch.rand(1, 4, 4, 2), torch.ones(1, 4, 4)))
    with pytest.raises(ValueError, match="not all slabs"):
        export.result()


@pytest.mark.parametrize(("in_shape", "out_shape", "sep"), CASES)
@pytest.mark.parametrize("n_labels", [2, 5, 105])
def test_fast_export_matches_the_reference_rule(in_shape, out_shape, sep, n_labels) -> None:
    rng = np.random.default_rng(n_labels + sum(out_shape))
    lab = rng.integers(0, n_labels, in_shape).astype(np.uint8)
    got = resample_labels(lab, out_shape, sep)
    np.testing.assert_array_equal(got, reference_fast(lab, out_shape, sep))


def test_fast_export_on_smooth_structures_and_round_trip() -> None:
    """Blob-shaped labels; 3 mm -> 1.5 mm -> 3 mm comes back exactly (half-way ties resolved)."""
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, 20)] * 3, indexing="ij"))
    lab = np.zeros((20, 20, 20), np.uint8)
    lab[(grid**2).sum(0) < 0.6] = 3
    lab[((grid - 0.3) ** 2).sum(0) < 0.2] = 7
    lab[grid[0] > 0.7] = 1
    up = resample_labels(lab, (40, 40, 40), None)
    np.testing.assert_array_equal(up, reference_fast(lab, (40, 40, 40), None))
    down = resample_labels(up, (20, 20, 20), None)
    np.testing.assert_array_equal(down, reference_fast(up, (20, 20, 20), None))
    np.testing.assert_array_equal(down, lab)


@pytest.mark.parametrize(("n_in", "n_out"), [(5, 13), (13, 5), (7, 7), (1, 4), (6, 12), (12, 6), (9, 14)])
def test_axis_maps_interpolate_as_scipy(n_in: int, n_out: int) -> None:
    """Applied to a line of values, the maps give scipy's order-1 and order-0 zoom on the
    pixel-area grid with edge values repeated."""
    x = np.random.default_rng(n_in * 31 + n_out).normal(size=n_in)
    m = linear_map(n_in, n_out)
    linear = m.w_lo * x[m.lo] + m.w_hi * x[m.hi]
    np.testing.assert_allclose(linear, _zoom(x, (n_out,), 1), rtol=0, atol=1e-12)
    n = nearest_map(n_in, n_out)
    np.testing.assert_array_equal(n.w_lo * x[n.lo] + n.w_hi * x[n.hi], _zoom(x, (n_out,), 0))


def test_linear_map_of_a_ramp_is_the_ramp_at_the_sample_centres() -> None:
    """Closed form: a ramp x[i] = i, sampled at (o + 0.5) * n_in / n_out - 0.5, clamped to [0, n_in - 1]."""
    n_in, n_out = 6, 15
    m = linear_map(n_in, n_out)
    got = m.w_lo * m.lo + m.w_hi * m.hi
    centres = (np.arange(n_out) + 0.5) * n_in / n_out - 0.5
    np.testing.assert_allclose(got, np.clip(centres, 0, n_in - 1), rtol=0, atol=1e-12)


@pytest.mark.slow
def test_kernels_work_where_no_cache_folder_is_writable() -> None:
    """numba refuses cache=True when it finds no writable cache folder; stuseg compiles each run."""
    import subprocess
    import sys

    code = (
        "import numba.core.caching as caching\n"
        "caching.CacheImpl._locator_classes = []  # as on a read-only install without a home folder\n"
        "import numpy as np\n"
        "from stuseg.inference.postprocess import resample_labels\n"
        "lab = np.zeros((4, 5, 6), np.uint8); lab[2:, :, 3:] = 7\n"
        "print(resample_labels(lab, (8, 10, 12), None)[7, 9, 11])\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "7"
