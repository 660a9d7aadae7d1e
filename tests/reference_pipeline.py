"""A plain, full-volume re-statement of the original inference path, for equivalence tests.

Written from a description of nnU-Net v1's inference steps alone, for inputs stored in RAS (where
stuseg's reorientation is the identity): numpy/scipy preprocessing, channels-first float32
aggregation of every tile, and the two exports computed on whole volumes. The plan's numbers are
those of ``tests/data/reference/totalseg_plans.json``. Slow and memory hungry on purpose; nothing
is shared with stuseg's implementation.
"""

from __future__ import annotations

import numpy as np
import scipy.ndimage as ndi
import torch


def _resize(x: np.ndarray, shape: tuple[int, ...], order: int, clip: bool) -> np.ndarray:
    out = ndi.zoom(
        x.astype(np.float64), np.array(shape) / np.array(x.shape), order=order, mode="nearest", grid_mode=True
    )
    return np.clip(out, x.min(), x.max()) if clip else out


def _nearest_along(stack: np.ndarray, n_out: int) -> np.ndarray:
    """scipy map_coordinates(order=0, mode='nearest') along axis 0 at (in/out)(i+0.5)-0.5."""
    coord = (stack.shape[0] / n_out) * (np.arange(n_out) + 0.5) - 0.5
    return stack[np.clip(np.floor(coord + 0.5), 0, stack.shape[0] - 1).astype(int)]


def _lowres_axis(spacing: np.ndarray) -> int | None:
    for sp in (spacing, np.array([1.5, 1.5, 1.5])):
        if sp.max() / sp.min() > 3:
            axes = np.where(sp == sp.max())[0]
            return int(axes[0]) if len(axes) == 1 else None
    return None


def _resample(x: np.ndarray, shape: tuple[int, ...], axis: int | None, order: int, clip: bool) -> np.ndarray:
    if tuple(x.shape) == tuple(shape):
        return x
    if axis is None:
        return _resize(x, shape, order, clip).astype(np.float32)
    plane = tuple(n for a, n in enumerate(shape) if a != axis)
    stack = np.stack([_resize(s, plane, order, clip).astype(np.float32) for s in np.moveaxis(x, axis, 0)])
    if stack.shape[0] != shape[axis]:
        stack = _nearest_along(stack, shape[axis])
    return np.moveaxis(stack, 0, axis)


def crop_and_resample(data_xyz: np.ndarray, zooms_xyz: tuple[float, ...]):
    """Everything before the z-score: the (z, y, x) crop at 1.5 mm, its box, the separate axis, the shape."""
    zyx = data_xyz.transpose(2, 1, 0).astype(np.float32)
    spacing = np.array(zooms_xyz[::-1], float)
    nz = np.nonzero(zyx != 0)
    box = [(int(i.min()), int(i.max()) + 1) for i in nz]
    x = zyx[tuple(slice(a, b) for a, b in box)].copy()
    x[np.isnan(x)] = 0
    shape = tuple(int(v) for v in np.round(spacing / 1.5 * np.array(x.shape)).astype(int))
    axis = _lowres_axis(spacing)
    return _resample(x, shape, axis, 3, clip=True), box, axis, zyx.shape


def preprocess(data_xyz: np.ndarray, zooms_xyz: tuple[float, ...]):
    x, box, axis, full = crop_and_resample(data_xyz, zooms_xyz)
    x = (x - x.mean()) / (x.std() + 1e-8)
    return x.astype(np.float32), box, axis, full


def tile_starts_formula(size: int, patch: int, step: float) -> list[int]:
    """The reference's tile positions along one axis, written out independently."""
    n = int(np.ceil((size - patch) / (patch * step))) + 1
    if n == 1:
        return [0]
    actual = (size - patch) / (n - 1)
    return [int(np.round(actual * i)) for i in range(n)]


def predict_softmax(x: np.ndarray, net: torch.nn.Module, tta: bool, step: float = 0.5) -> np.ndarray:
    patch = 128
    pads = [((max(patch - s, 0)) // 2, max(patch - s, 0) - max(patch - s, 0) // 2) for s in x.shape]
    xp = np.pad(x, pads)
    starts = [tile_starts_formula(s, patch, step) for s in xp.shape]
    n_tiles = len(starts[0]) * len(starts[1]) * len(starts[2])
    if n_tiles > 1:
        # A centred unit impulse through a Gaussian filter (sigma = patch / 8), over its maximum.
        impulse = np.zeros((patch,) * 3)
        impulse[(patch // 2,) * 3] = 1
        g = ndi.gaussian_filter(impulse, patch / 8, 0, mode="constant", cval=0)
        g = (g / g.max()).astype(np.float32)
    else:
        g = np.ones((patch,) * 3, np.float32)
    flips = [(), (4,), (3,), (4, 3), (2,), (4, 2), (3, 2), (4, 3, 2)] if tta else [()]
    acc = np.zeros((105, *xp.shape), np.float32)
    nb = np.zeros((105, *xp.shape), np.float32)
    with torch.no_grad():
        for i in starts[0]:
            for j in starts[1]:
                for k in starts[2]:
                    sl = (slice(i, i + patch), slice(j, j + patch), slice(k, k + patch))
                    t = torch.from_numpy(xp[sl].copy())[None, None]
                    res = torch.zeros((1, 105, patch, patch, patch))
                    for f in flips:
                        pred = torch.softmax(net(torch.flip(t, f) if f else t), 1)
                        res += (1 / len(flips)) * (torch.flip(pred, f) if f else pred)
                    pred = res[0].numpy() * g
                    acc[(slice(None), *sl)] += pred
                    nb[(slice(None), *sl)] += g
    crop = tuple(slice(a, a + s) for (a, _), s in zip(pads, x.shape))
    return acc[(slice(None), *crop)] / nb[(slice(None), *crop)]


def export_normal(p: np.ndarray, shape: tuple[int, ...], axis: int | None) -> np.ndarray:
    return np.stack([_resample(c, shape, axis, 1, clip=True) for c in p]).argmax(0)


def export_fast(seg: np.ndarray, shape: tuple[int, ...], axis: int | None) -> np.ndarray:
    if tuple(seg.shape) == tuple(shape):
        return seg
    values = np.unique(seg).astype(np.int64)
    scores = np.stack([_resample((seg == c).astype(np.float64), shape, axis, 1, clip=False) for c in values])
    nearest = _resample(seg.astype(np.float64), shape, axis, 0, clip=False).astype(np.int64)
    tied = scores == scores.max(0)
    vals = values[:, None, None, None]
    nn_tied = (tied & (vals == nearest)).any(0)
    return np.where(nn_tied, nearest, np.where(tied, vals, 10**6).min(0))


def segment(data_xyz: np.ndarray, zooms_xyz, net: torch.nn.Module, fast: bool, tta: bool) -> np.ndarray:
    """Label map (x, y, z) for a RAS-stored image, as the original pipeline computes it."""
    x, box, axis, full = preprocess(data_xyz, zooms_xyz)
    p = predict_softmax(x, net, tta)
    cropped = tuple(b - a for a, b in box)
    labels = export_fast(p.argmax(0), cropped, axis) if fast else export_normal(p, cropped, axis)
    out = np.zeros(full, np.uint8)
    out[tuple(slice(a, b) for a, b in box)] = labels
    return out.transpose(2, 1, 0)
