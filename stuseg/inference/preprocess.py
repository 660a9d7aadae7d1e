"""From the input grid to what the network sees, and the geometry to undo it.

The steps follow nnU-Net v1's test-time preprocessing for these models ("the reference" in
this package: nnU-Net v1's inference path as the STU-Net models were published with it),
with one deliberate change first:

1. reorient to the closest canonical RAS orientation, then present the array as SimpleITK
   would for that RAS file: (z, y, x) order (the training images were stored in RAS);
2. crop to the bounding box of the nonzero voxels;
3. NaN -> 0;
4. resample to the target spacing with cubic splines, or, for strongly anisotropic voxels,
   in-plane cubic plus nearest-neighbour along the low-resolution axis ("separate z");
5. z-score with the volume's own mean and standard deviation (no clipping).

``Geometry`` records each step so that ``restore`` can put a label map at the cropped
resolution back on the input grid exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import nibabel as nib
import numpy as np
from scipy import ndimage

from stuseg.errors import InputError
from stuseg.inference.threads import available_cpus
from stuseg.model.plan import PLAN, Normalization, Plan

__all__ = [
    "SEPARATE_Z_THRESHOLD",
    "Geometry",
    "axis_slice",
    "nearest_indices",
    "nonzero_bbox",
    "nonzero_mask",
    "normalize",
    "preprocess",
    "resample_image",
    "resampled_shape",
    "restore",
    "separate_axis",
    "to_model_order",
    "zscore",
]

# nnU-Net's RESAMPLING_SEPARATE_Z_ANISO_THRESHOLD: above this max/min spacing ratio the
# low-resolution axis is resampled on its own (nearest neighbour) instead of with the others.
SEPARATE_Z_THRESHOLD = 3.0


@dataclass(frozen=True)
class Geometry:
    """How the network array relates to the input voxel grid. All model-side shapes are (z, y, x)."""

    input_shape: tuple[int, int, int]  # input (i, j, k)
    ornt: np.ndarray  # nibabel orientation transform: input axes -> RAS
    model_shape: tuple[int, int, int]  # full (z, y, x) array after reorientation
    spacing: tuple[float, float, float]  # (z, y, x) mm, before resampling
    crop: tuple[tuple[int, int], tuple[int, int], tuple[int, int]]  # [lo, hi) per (z, y, x) axis
    resampled_shape: tuple[int, int, int]  # (z, y, x) at the target spacing
    separate_axis: int | None  # low-resolution axis (z, y, x order) resampled on its own
    export_axis: int | None = None  # the same, for the way back (see ``preprocess``)
    transpose: tuple[int, int, int] = (0, 1, 2)  # the plan's transpose_forward

    @property
    def cropped_shape(self) -> tuple[int, int, int]:
        return tuple(hi - lo for lo, hi in self.crop)  # type: ignore[return-value]

    @property
    def voxels(self) -> int:
        """The number of input voxels."""
        return math.prod(self.input_shape)


def separate_axis(
    spacing: tuple[float, ...] | np.ndarray, target: tuple[float, ...] | np.ndarray
) -> int | None:
    """The axis to resample separately (nearest neighbour), or None.

    Decided on the original spacing first, then on the target spacing; if two or three axes
    share the largest spacing there is no single low-resolution axis and none is separate.
    """
    for sp in (np.asarray(spacing, float), np.asarray(target, float)):
        if sp.max() / sp.min() > SEPARATE_Z_THRESHOLD:
            lowres = np.flatnonzero(sp == sp.max())
            return int(lowres[0]) if len(lowres) == 1 else None
    return None


def resampled_shape(
    shape: tuple[int, ...], spacing: tuple[float, ...], target: tuple[float, ...]
) -> tuple[int, ...]:
    """round(spacing / target * shape) per axis, numpy rounding (halves to even), as nnU-Net, but
    never below 1.

    An axis thinner than half the target spacing (a single 0.5 mm slice at 1.5 mm) rounds to 0
    voxels, where the original pipeline fails inside its resampler; one voxel keeps the image.
    """
    ratio = np.asarray(spacing, float) / np.asarray(target, float)
    return tuple(max(1, int(n)) for n in np.round(ratio * np.asarray(shape)).astype(int))


# scipy's zoom pads 'nearest'-mode input by this many edge voxels before its spline prefilter.
_SPLINE_PAD = 12
# Output samples per banded matrix product along the last axis.
_BAND = 16
# Size of the float64 coefficient buffer each worker prefilters at a time.
_BLOCK_BYTES = 8 * 2**20


def _cubic(x: np.ndarray, new_shape: tuple[int, ...], workers: int | None = None) -> np.ndarray:
    """skimage ``resize(order=3, mode='edge', anti_aliasing=False)`` for float input, as float32.

    That is ``scipy.ndimage.zoom(order=3, mode='nearest', grid_mode=True)`` in float64 (edge
    padding, cubic B-spline prefilter, evaluation on the pixel-area grid), then clipping to the
    input's range. A zoom's tensor-product spline factors into one 1D pass per axis: pad,
    prefilter and evaluate along the last axis, then along the next, each pass on the array the
    previous one shrank. That is 3 x 4 taps per output sample instead of zoom's 4^3, in float64
    throughout; the result equals zoom's to within one float32 ulp (the sums are only
    associated differently). Writing float32 and then clipping with the (float32) bounds
    equals clipping in float64 and casting, since rounding is monotonic.
    """
    workers = workers or min(available_cpus(), 8)  # the cap of 8 is the earlier default's
    lo, hi = x.min(), x.max()
    y = x
    with ThreadPoolExecutor(workers) as pool:
        for axis in reversed(range(x.ndim)):
            y = _cubic_axis(y, axis, new_shape[axis], pool, workers)
    out = y.astype(np.float32)
    np.clip(out, lo, hi, out=out)
    return out


def _bspline_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """Per output sample along one axis: its first of 4 taps in the padded axis, and (4, n_out) weights.

    The sample sits at ``(o + 0.5) * n_in / n_out - 0.5`` (pixel-area grid), shifted by the
    padding; the weights are the cubic B-spline's at the fractional part ``t``.
    """
    coord = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5 + _SPLINE_PAD
    floor = np.floor(coord)
    t = coord - floor
    weights = np.stack(
        [
            (1 - t) ** 3 / 6,
            (3 * t**3 - 6 * t**2 + 4) / 6,
            (-3 * t**3 + 3 * t**2 + 3 * t + 1) / 6,
            t**3 / 6,
        ]
    )
    return floor.astype(np.int64) - 1, weights


def _cubic_axis(x: np.ndarray, axis: int, n_out: int, pool: ThreadPoolExecutor, workers: int) -> np.ndarray:
    """One 1D pass of ``_cubic``: edge-pad ``axis``, prefilter along it, evaluate at ``n_out`` samples.

    Lines along ``axis`` are independent, so the array is cut across another axis into blocks of
    a few MB; each worker pads, prefilters and evaluates a block in its own buffer. Only the
    output is ever whole, and a block's coefficients stay in cache.
    """
    n_in = x.shape[axis]
    other = 1 if axis == 0 else 0  # blocks split the array along this axis
    out_shape = list(x.shape)
    out_shape[axis] = n_out
    out = np.empty(out_shape, np.float64)
    first, weights = _bspline_taps(n_in, n_out)
    last = axis == x.ndim - 1
    bands = _bands(first, weights) if last else []
    line_bytes = 8 * (n_in + 2 * _SPLINE_PAD) * x.size // (x.shape[axis] * x.shape[other])
    blocks = max(4 * workers, line_bytes * x.shape[other] // _BLOCK_BYTES)

    def run(part: slice) -> None:
        src, dst = axis_slice(x, other, part), axis_slice(out, other, part)
        shape = list(src.shape)
        shape[axis] += 2 * _SPLINE_PAD
        coeffs = np.empty(shape, np.float64)
        inner = slice(_SPLINE_PAD, _SPLINE_PAD + n_in)
        axis_slice(coeffs, axis, inner)[...] = src
        axis_slice(coeffs, axis, slice(0, _SPLINE_PAD))[...] = axis_slice(src, axis, slice(0, 1))
        axis_slice(coeffs, axis, slice(inner.stop, None))[...] = axis_slice(src, axis, slice(n_in - 1, n_in))
        ndimage.spline_filter1d(coeffs, 3, axis=axis, output=coeffs, mode="nearest")
        if last:
            # Along the contiguous axis: a banded matrix product per run of output samples (BLAS).
            rows = coeffs.reshape(-1, shape[-1])
            flat = dst.reshape(-1, n_out)
            for o, stop, lo, hi, band in bands:
                np.matmul(rows[:, lo:hi], band, out=flat[:, o:stop])
            return
        for o in range(n_out):
            sample = axis_slice(dst, axis, slice(o, o + 1))
            taps = [axis_slice(coeffs, axis, slice(first[o] + k, first[o] + k + 1)) for k in range(4)]
            np.multiply(taps[0], weights[0, o], out=sample)
            for k in range(1, 4):
                sample += taps[k] * weights[k, o]

    list(pool.map(run, _parts(x.shape[other], blocks)))
    return out


def _bands(first: np.ndarray, weights: np.ndarray) -> list[tuple[int, int, int, int, np.ndarray]]:
    """The 4-tap evaluation as banded matrices: (first output, stop, first input, stop, matrix) per run."""
    n_out = len(first)
    bands = []
    for o in range(0, n_out, _BAND):
        stop = min(o + _BAND, n_out)
        lo, hi = int(first[o]), int(first[stop - 1]) + 4
        band = np.zeros((hi - lo, stop - o))
        for k in range(4):
            band[first[o:stop] + k - lo, np.arange(stop - o)] = weights[k, o:stop]
        bands.append((o, stop, lo, hi, band))
    return bands


def _parts(n: int, count: int) -> list[slice]:
    bounds = np.linspace(0, n, min(count, n) + 1).astype(int)
    return [slice(int(lo), int(hi)) for lo, hi in zip(bounds[:-1], bounds[1:])]


def axis_slice(a: np.ndarray, axis: int, part: slice) -> np.ndarray:
    """The view ``a[..., part, ...]`` with ``part`` applied along ``axis``."""
    return a[(slice(None),) * axis + (part,)]


def nearest_indices(n_in: int, n_out: int) -> np.ndarray:
    """Source index for each output index along one axis: nearest neighbour on the pixel grid.

    Coordinate ``(o + 0.5) * n_in / n_out - 0.5`` rounded half up, clamped to the array
    (scipy's order-0 rule with ``mode='nearest'``).
    """
    coord = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
    return np.clip(np.floor(coord + 0.5), 0, n_in - 1).astype(np.int64)


def resample_image(
    x: np.ndarray, new_shape: tuple[int, int, int], axis: int | None, workers: int | None = None
) -> np.ndarray:
    """Resample a float32 volume to ``new_shape``: cubic, or cubic in-plane + nearest along ``axis``.

    ``workers`` threads share the work (default ``stuseg.inference.threads.available_cpus()``).
    """
    if tuple(x.shape) == tuple(new_shape):
        return x
    if axis is None:
        return _cubic(x, new_shape, workers)
    plane = tuple(n for a, n in enumerate(new_shape) if a != axis)
    slices = np.moveaxis(x, axis, 0)
    # Each slice is resized (and clipped) on its own, as the reference does.
    stack = np.stack([_cubic(s, plane, workers) for s in slices])
    if stack.shape[0] != new_shape[axis]:
        stack = stack[nearest_indices(stack.shape[0], new_shape[axis])]
    return np.ascontiguousarray(np.moveaxis(stack, 0, axis))


def to_model_order(
    volume_data: np.ndarray,
    affine: np.ndarray,
    *,
    reorient: bool = True,
    transpose: tuple[int, int, int] = (0, 1, 2),
) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """The input as the network's array: a (z, y, x) view, the orientation transform and the spacing.

    With ``reorient``, the closest canonical RAS orientation first (the published models);
    without, the voxel array as stored (nnU-Net v2's SimpleITKIO and NibabelIO). Either way the
    array is presented as SimpleITK gives it, (z, y, x): the reverse of nibabel's (x, y, z). Then
    nnU-Net's ``transpose_forward``: network axis ``a`` is axis ``transpose[a]`` of that array.
    """
    ornt = nib.orientations.io_orientation(affine) if reorient else _IDENTITY
    ras = nib.orientations.apply_orientation(volume_data, ornt) if reorient else volume_data
    # Input axis i becomes axis ornt[i, 0]; carry its voxel size along.
    zooms = np.linalg.norm(affine[:3, :3], axis=0)
    ras_zooms = np.empty(3)
    ras_zooms[ornt[:, 0].astype(int)] = zooms
    zyx, zyx_zooms = ras.transpose(2, 1, 0), ras_zooms[::-1]
    return zyx.transpose(transpose), ornt, tuple(float(zyx_zooms[a]) for a in transpose)


_IDENTITY = np.array([[0, 1], [1, 1], [2, 1]], dtype=float)  # nibabel's "no reorientation"


def nonzero_bbox(channels: np.ndarray | Sequence[np.ndarray]) -> tuple[tuple[int, int], ...]:
    """[lo, hi) per axis of the voxels != 0 in any channel (NaN counts as nonzero, as in the reference).

    The reference fills holes in the mask before taking its bounding box; filling holes never
    changes a bounding box, so the fill is skipped.
    """
    nonzero = _nonzero([channels] if isinstance(channels, np.ndarray) else list(channels))
    box = []
    for axis in range(nonzero.ndim):
        other = tuple(a for a in range(nonzero.ndim) if a != axis)
        hit = np.flatnonzero(np.any(nonzero, axis=other))
        if hit.size == 0:
            raise InputError("the image is empty: every voxel is 0")
        box.append((int(hit[0]), int(hit[-1]) + 1))
    return tuple(box)


def _nonzero(channels: Sequence[np.ndarray]) -> np.ndarray:
    """Voxels != 0 in any channel (NaN is nonzero)."""
    nonzero = channels[0] != 0
    for x in channels[1:]:
        nonzero |= x != 0
    return nonzero


def nonzero_mask(channels: Sequence[np.ndarray]) -> np.ndarray:
    """Voxels != 0 in any channel, holes filled: the region nnU-Net normalises with a mask."""
    return ndimage.binary_fill_holes(_nonzero(channels))


def zscore(x: np.ndarray) -> np.ndarray:
    """In place ``(x - mean) / (std + 1e-8)`` with numpy float32 statistics, no clipping (nnU-Net v1)."""
    mean = x.mean()
    std = x.std()
    x -= mean
    x /= std + np.float32(1e-8)
    return x


def normalize(
    x: np.ndarray, norm: Normalization, framework: str, mask: np.ndarray | None = None
) -> np.ndarray:
    """Normalise one float32 channel in place, as ``framework``'s nnU-Net does for ``norm.scheme``.

    The statistics are numpy's float32 ones, as the reference computes them; the divisor guard
    differs between the frameworks (v1 adds 1e-8 to the standard deviation, v2 takes at least
    1e-8). ``mask`` (zscore with ``use_mask``, v2 only): statistics over the mask, and only the
    voxels inside it change (outside the nonzero region they are 0 already).
    """
    scheme = norm.scheme
    if scheme == "none":
        return x
    if scheme == "zscore" and framework == "v1":
        return zscore(x)
    if scheme == "zscore" and mask is not None:
        inside = x[mask]
        x[mask] = (inside - inside.mean()) / max(inside.std(), 1e-8)
        return x
    if scheme == "zscore":
        mean, std = x.mean(), x.std()
        x -= mean
        x /= max(std, 1e-8)
        return x
    if scheme == "ct":
        assert (
            norm.lower is not None
            and norm.upper is not None
            and norm.mean is not None
            and norm.std is not None
        )
        np.clip(x, norm.lower, norm.upper, out=x)
        x -= norm.mean
        x /= norm.std if framework == "v1" else max(norm.std, 1e-8)
        return x
    if scheme == "rescale_0_1":
        x -= x.min()
        x /= max(x.max(), 1e-8)
        return x
    if scheme == "rgb_0_1":
        x /= 255.0
        return x
    raise ValueError(f"unknown normalisation scheme {scheme!r}")


def _float32(x: np.ndarray, copy: bool) -> tuple[np.ndarray, bool]:
    """``x`` as float32 with NaN -> 0 (a copy where that changes anything, or where asked), and
    whether it held NaN."""
    had_nan = bool(np.isnan(x.min()))  # a NaN anywhere makes the minimum NaN
    if copy or had_nan or x.dtype != np.float32:
        x = np.array(x, dtype=np.float32)
        x[np.isnan(x)] = 0
    return x, had_nan


def preprocess(
    data: np.ndarray | Sequence[np.ndarray],
    affine: np.ndarray,
    plan: Plan | tuple[float, float, float],
    workers: int | None = None,
) -> tuple[np.ndarray, Geometry, bool]:
    """Input voxels (i, j, k), one array per channel -> normalized float32 (C, z, y, x) for the network.

    Args:
        data: the input voxels (i, j, k), any real dtype, or a sequence of such arrays (one per
            channel of a multi-channel model, on one grid); never modified.
        affine: the input's voxel-to-world matrix.
        plan: the model's plan (``stuseg.model.plan``), or a (z, y, x) target spacing alone for the
            published plan with that spacing.
        workers: threads for the cubic resampling (default ``stuseg.inference.threads.available_cpus()``).

    Returns:
        The array, the geometry to undo it, and whether NaNs were replaced by 0.

    Raises:
        InputError: every voxel is 0, or not one array per channel of the plan.
    """
    if not isinstance(plan, Plan):
        plan = replace(PLAN, target_spacing=tuple(float(s) for s in plan))  # type: ignore[arg-type]
    arrays = [data] if isinstance(data, np.ndarray) else list(data)
    if len(arrays) != plan.in_channels:
        raise InputError(f"this model takes {plan.in_channels} input channel(s); got {len(arrays)}")
    if plan.framework == "v1" and any(n.use_mask for n in plan.channels):
        raise InputError("nnU-Net v1 normalisation with a nonzero mask is not supported")
    views = [to_model_order(a, affine, reorient=plan.reorient, transpose=plan.transpose) for a in arrays]
    _, ornt, spacing = views[0]
    zyx = [v[0] for v in views]
    box = nonzero_bbox(zyx)
    crop = tuple(slice(lo, hi) for lo, hi in box)
    target = plan.target_spacing
    axis = separate_axis(spacing, target)
    new_shape = resampled_shape(zyx[0][crop].shape, spacing, target)
    mask = nonzero_mask([z[crop] for z in zyx]) if any(n.use_mask for n in plan.channels) else None
    out, had_nan = [], False
    for channel, norm in zip(zyx, plan.channels):
        # A view of the input until the resampler reads it (v1), or a float32 copy to normalise (v2).
        x, nan = _float32(channel[crop], copy=plan.framework == "v2")
        had_nan |= nan
        if plan.framework == "v2":  # normalise the cropped image, then resample
            x = resample_image(
                normalize(x, norm, "v2", mask if norm.use_mask else None), new_shape, axis, workers
            )
        else:  # resample, then normalise
            x = resample_image(x, new_shape, axis, workers)
            if any(np.may_share_memory(x, a) for a in arrays):  # not resampled: never the caller's array
                x = np.array(x, dtype=np.float32, order="C")
            x = normalize(x, norm, "v1")
        out.append(x)
    x = out[0][None] if len(out) == 1 else np.stack(out)
    del out
    geometry = Geometry(
        input_shape=tuple(int(n) for n in arrays[0].shape[:3]),  # type: ignore[arg-type]
        ornt=ornt,
        model_shape=tuple(int(n) for n in zyx[0].shape),  # type: ignore[arg-type]
        spacing=spacing,  # type: ignore[arg-type]
        crop=box,  # type: ignore[arg-type]
        resampled_shape=tuple(int(n) for n in x.shape[1:]),  # type: ignore[arg-type]
        separate_axis=axis,
        # The export back to the input spacing decides on its own input first: the network's
        # spacing for v2 (its resampling function is called from there), the input's for v1.
        export_axis=axis if plan.framework == "v1" else separate_axis(target, spacing),
        transpose=plan.transpose,
    )
    return x, geometry, had_nan


def restore(labels_cropped: np.ndarray, geometry: Geometry) -> np.ndarray:
    """A (z, y, x) label map on the cropped grid -> the input's (i, j, k) grid (0 outside the crop)."""
    if tuple(labels_cropped.shape) != geometry.cropped_shape:
        raise ValueError(f"label map {labels_cropped.shape} does not match the crop {geometry.cropped_shape}")
    full = np.zeros(geometry.model_shape, dtype=labels_cropped.dtype)
    full[tuple(slice(lo, hi) for lo, hi in geometry.crop)] = labels_cropped
    ras = full.transpose(np.argsort(geometry.transpose)).transpose(2, 1, 0)
    back = nib.orientations.apply_orientation(ras, _inverse(geometry.ornt))
    # Fortran order is NIfTI's on-disk order: masks are then written without a transposed copy.
    return np.asfortranarray(back)


def _inverse(ornt: np.ndarray) -> np.ndarray:
    """The orientation transform that undoes ``ornt`` (RAS axes -> input axes)."""
    inv = np.empty_like(ornt)
    for in_axis, (out_axis, flip) in enumerate(ornt):
        inv[int(out_axis)] = (in_axis, flip)
    return inv
