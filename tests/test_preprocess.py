"""Preprocessing against the reference formulas on small arrays."""

from __future__ import annotations

import itertools
from dataclasses import replace

import nibabel as nib
import numpy as np
import pytest
import scipy.ndimage as ndi
import scipy.stats

from stuseg.errors import InputError
from stuseg.inference.preprocess import (
    nearest_indices,
    nonzero_bbox,
    preprocess,
    resample_image,
    resampled_shape,
    restore,
    separate_axis,
    to_model_order,
    zscore,
)
from stuseg.model.plan import PLAN

TARGET = (1.5, 1.5, 1.5)


def skimage_like_cubic(x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """skimage resize(order=3, mode='edge', anti_aliasing=False): zoom on the area grid + clip."""
    x64 = x.astype(np.float64)
    out = ndi.zoom(x64, np.array(shape) / np.array(x.shape), order=3, mode="nearest", grid_mode=True)
    return np.clip(out, x64.min(), x64.max()).astype(np.float32)


def reference_separate(x: np.ndarray, shape: tuple[int, ...], axis: int) -> np.ndarray:
    """Per-slice 2D cubic resize, then order-0 map_coordinates along ``axis`` (reference 3.5)."""
    moved = np.moveaxis(x, axis, 0)
    plane = tuple(n for a, n in enumerate(shape) if a != axis)
    stack = np.stack([skimage_like_cubic(s, plane) for s in moved])
    if stack.shape[0] != shape[axis]:
        rows = stack.shape[0]
        grid = np.mgrid[: shape[axis], : plane[0], : plane[1]].astype(float)
        grid[0] = (rows / shape[axis]) * (grid[0] + 0.5) - 0.5
        stack = ndi.map_coordinates(stack, grid, order=0, mode="nearest")
    return np.moveaxis(stack, 0, axis).astype(np.float32)


def test_separate_axis_rule() -> None:
    assert separate_axis((5.0, 0.7, 0.7), TARGET) == 0
    assert separate_axis((0.8, 3.0, 0.8), TARGET) == 1
    assert separate_axis((3.0, 1.0, 1.0), TARGET) is None  # ratio exactly 3 is not above it
    assert separate_axis((3.1, 1.0, 1.0), TARGET) == 0
    assert separate_axis((5.0, 5.0, 0.7), TARGET) is None  # two axes share the largest spacing
    assert separate_axis((1.0, 1.0, 1.0), TARGET) is None


def test_new_shape_rounds_half_to_even() -> None:
    assert resampled_shape((10, 20, 30), (3.0, 0.75, 1.5), TARGET) == (20, 10, 30)
    assert resampled_shape((5, 7, 9), (1.5 * 0.5, 1.5 * 1.5, 1.0), TARGET) == (
        2,
        10,
        6,
    )  # 2.5 -> 2, 10.5 -> 10


@pytest.mark.parametrize(
    ("shape", "new"), [((9, 11, 13), (14, 7, 20)), ((6, 6, 6), (12, 12, 12)), ((10, 9, 8), (10, 12, 8))]
)
def test_cubic_resampling_matches_zoom_plus_clip_bitwise(
    shape: tuple[int, ...], new: tuple[int, ...]
) -> None:
    x = np.random.default_rng(0).normal(0, 300, shape).astype(np.float32)
    got = resample_image(x, new, None)
    assert got.dtype == np.float32 and got.shape == new
    np.testing.assert_array_equal(got, skimage_like_cubic(x, new))


@pytest.mark.parametrize(
    ("shape", "new", "axis"),
    [
        ((5, 12, 13), (14, 20, 30), 0),
        ((12, 5, 13), (20, 3, 30), 1),
        ((8, 9, 4), (8, 9, 4 * 3), 2),
        ((5, 6, 7), (5, 9, 9), 0),
    ],
)
def test_separate_z_matches_reference_bitwise(
    shape: tuple[int, ...], new: tuple[int, ...], axis: int
) -> None:
    x = np.random.default_rng(1).normal(0, 300, shape).astype(np.float32)
    np.testing.assert_array_equal(resample_image(x, new, axis), reference_separate(x, new, axis))


def test_nearest_indices_match_scipy_order0() -> None:
    for n_in, n_out in [(3, 6), (6, 3), (7, 13), (13, 7), (5, 5), (1, 4)]:
        src = np.arange(n_in, dtype=float)
        ref = ndi.zoom(src, n_out / n_in, order=0, mode="nearest", grid_mode=True)
        np.testing.assert_array_equal(nearest_indices(n_in, n_out), ref.astype(int))


def test_unchanged_shape_is_not_resampled() -> None:
    x = np.random.default_rng(2).normal(size=(4, 5, 6)).astype(np.float32)
    assert resample_image(x, (4, 5, 6), None) is x


def test_bbox_counts_nan_as_nonzero_and_needs_no_hole_filling() -> None:
    x = np.zeros((6, 7, 8), np.float32)
    x[1:4, 2:6, 3:5] = 1
    x[2, 3, 4] = 0  # a hole: filling it would not change the box
    x[5, 0, 7] = np.nan
    assert nonzero_bbox(x) == ((1, 6), (0, 6), (3, 8))
    with pytest.raises(InputError, match="every voxel is 0"):
        nonzero_bbox(np.zeros((3, 3, 3)))


def test_zscore_matches_scipy_in_float64_without_clipping() -> None:
    x = np.random.default_rng(3).normal(40, 300, (20, 21, 22)).astype(np.float32)
    got = zscore(x.copy())
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, scipy.stats.zscore(x.astype(np.float64), axis=None), rtol=0, atol=2e-6)
    assert got.max() > 3  # nothing clipped


def test_zscore_closed_forms() -> None:
    """Two values, half the voxels each: mean halfway, std half the gap, so -1 and +1; a constant
    image has std 0 and becomes 0 (the 1e-8 guard keeps it finite)."""
    x = np.full((6, 5, 4), 40.0 - 300.0, np.float32)
    x[:3] = 40.0 + 300.0
    got = zscore(x)
    np.testing.assert_allclose(got[:3], 1.0, rtol=1e-6)
    np.testing.assert_allclose(got[3:], -1.0, rtol=1e-6)
    np.testing.assert_array_equal(zscore(np.full((3, 3, 3), -1000.0, np.float32)), 0.0)


def test_preprocess_reference_case_from_the_document() -> None:
    """20x120x300 (z, y, x) voxels, ITK spacing 0.7x0.8x2.6 mm, zero border -> the documented shapes."""
    zyx = np.zeros((20, 120, 300), np.float32)
    zyx[2:20, :, :294] = np.random.default_rng(4).normal(0, 100, (18, 120, 294))
    zyx[zyx == 0] = 1  # only the border is exactly zero
    zyx[:2] = 0
    zyx[:, :, 294:] = 0
    # A RAS file whose SimpleITK array is zyx: nibabel data is its transpose.
    affine = np.diag([0.7, 0.8, 2.6, 1.0])
    x, geo, had_nan = preprocess(zyx.transpose(2, 1, 0), affine, TARGET)
    assert geo.crop == ((2, 20), (0, 120), (0, 294))
    assert geo.separate_axis == 0
    assert x.shape == (1, 31, 64, 137) and x.shape[1:] == geo.resampled_shape
    assert not had_nan
    assert abs(float(x.mean())) < 1e-3 and abs(float(x.std()) - 1) < 1e-3


def test_preprocess_replaces_nan_after_cropping() -> None:
    data = np.full((10, 10, 10), -1000, np.float32)
    data[0, 0, 0] = np.nan
    data[5, 5, 5] = 100
    x, geo, had_nan = preprocess(data, np.diag([1.5, 1.5, 1.5, 1]), TARGET)
    assert had_nan and np.isfinite(x).all()
    assert geo.crop == ((0, 10), (0, 10), (0, 10))


def _affine(perm: tuple[int, ...], flips: tuple[int, ...], zooms: tuple[float, ...]) -> np.ndarray:
    aff = np.eye(4)
    aff[:3, :3] = 0
    for i, (p, f) in enumerate(zip(perm, flips)):
        aff[p, i] = f * zooms[i]
    aff[:3, 3] = [10, -20, 30]
    return aff


@pytest.mark.parametrize("perm", list(itertools.permutations(range(3))))
@pytest.mark.parametrize("flips", [(1, 1, 1), (-1, -1, 1), (1, -1, -1)])
def test_model_order_is_simpleitk_order_of_the_canonical_image(perm, flips) -> None:
    rng = np.random.default_rng(5)
    data = rng.normal(size=(3, 4, 5))
    affine = _affine(perm, flips, (0.5, 1.0, 2.0))
    zyx, _, spacing = to_model_order(data, affine)
    canon = nib.as_closest_canonical(nib.Nifti1Image(data, affine))
    np.testing.assert_array_equal(zyx, np.asarray(canon.dataobj).transpose(2, 1, 0))
    np.testing.assert_allclose(spacing, np.linalg.norm(canon.affine[:3, :3], axis=0)[::-1])


@pytest.mark.parametrize("perm", [(0, 1, 2), (2, 0, 1), (1, 2, 0)])
@pytest.mark.parametrize("flips", [(1, 1, 1), (-1, -1, 1), (-1, 1, -1)])
@pytest.mark.parametrize(
    "plan", [PLAN, replace(PLAN, reorient=False, transpose=(2, 0, 1)), replace(PLAN, transpose=(1, 2, 0))]
)
def test_restore_inverts_crop_reorientation_and_transpose(perm, flips, plan) -> None:
    data = np.zeros((9, 10, 11), np.float32)
    data[2:7, 1:9, 3:10] = np.random.default_rng(6).integers(1, 50, (5, 8, 7))
    affine = _affine(perm, flips, (1.5, 1.5, 1.5))
    zyx, _, _ = to_model_order(data, affine, reorient=plan.reorient, transpose=plan.transpose)
    _, geo, _ = preprocess(data, affine, plan)
    box = tuple(slice(lo, hi) for lo, hi in geo.crop)
    labels = zyx[box].astype(np.uint8)
    np.testing.assert_array_equal(restore(labels, geo), data.astype(np.uint8))
