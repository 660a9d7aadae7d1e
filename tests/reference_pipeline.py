"""A plain, full-volume re-statement of the original inference path, for equivalence tests.

Written from a description of nnU-Net v1's inference steps alone, for inputs stored in RAS (where
stuseg's reorientation is the identity): numpy/scipy preprocessing, channels-first float32
aggregation of every tile, and the two exports computed on whole volumes. The plan's numbers
default to those of ``tests/data/reference/totalseg_plans.json`` (1.5 mm, 128^3 tiles, 105
classes); a test may give others (the geometry sweep uses small tiles). Slow and memory hungry
on purpose; nothing is shared with stuseg's implementation.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import scipy.ndimage as ndi
import torch

TARGET = (1.5, 1.5, 1.5)
PATCH = (128, 128, 128)
CLASSES = 105


def _resize(x: np.ndarray, shape: tuple[int, ...], order: int, clip: bool) -> np.ndarray:
    out = ndi.zoom(
        x.astype(np.float64), np.array(shape) / np.array(x.shape), order=order, mode="nearest", grid_mode=True
    )
    return np.clip(out, x.min(), x.max()) if clip else out


def _nearest_along(stack: np.ndarray, n_out: int) -> np.ndarray:
    """scipy map_coordinates(order=0, mode='nearest') along axis 0 at (in/out)(i+0.5)-0.5."""
    coord = (stack.shape[0] / n_out) * (np.arange(n_out) + 0.5) - 0.5
    return stack[np.clip(np.floor(coord + 0.5), 0, stack.shape[0] - 1).astype(int)]


def _lowres_axis(spacing: np.ndarray, target=TARGET) -> int | None:
    for sp in (spacing, np.array(target, float)):
        if sp.max() / sp.min() > 3:
            axes = np.where(sp == sp.max())[0]
            return int(axes[0]) if len(axes) == 1 else None
    return None


def _resample(
    x: np.ndarray, shape: tuple[int, ...], axis: int | None, order: int, clip: bool, dtype=np.float32
) -> np.ndarray:
    """Images and probabilities come back as float32, as nnU-Net casts them; label indicators are
    compared in float64 (``dtype``), as batchgenerators' resize_segmentation compares them."""
    if tuple(x.shape) == tuple(shape):
        return x
    if axis is None:
        return _resize(x, shape, order, clip).astype(dtype)
    plane = tuple(n for a, n in enumerate(shape) if a != axis)
    stack = np.stack([_resize(s, plane, order, clip).astype(dtype) for s in np.moveaxis(x, axis, 0)])
    if stack.shape[0] != shape[axis]:
        stack = _nearest_along(stack, shape[axis])
    return np.moveaxis(stack, 0, axis)


def crop_and_resample(data_xyz: np.ndarray, zooms_xyz: tuple[float, ...], target=TARGET):
    """Before the z-score: the (z, y, x) crop at the target spacing, its box, the separate axis, the shape."""
    zyx = data_xyz.transpose(2, 1, 0).astype(np.float32)
    spacing = np.array(zooms_xyz[::-1], float)
    nz = np.nonzero(zyx != 0)
    box = [(int(i.min()), int(i.max()) + 1) for i in nz]
    x = zyx[tuple(slice(a, b) for a, b in box)].copy()
    x[np.isnan(x)] = 0
    shape = tuple(int(v) for v in np.round(spacing / np.array(target) * np.array(x.shape)).astype(int))
    # Where the rounding gives 0 voxels (an axis thinner than half the target), the original fails
    # in its resampler; stuseg keeps one voxel, and so does this reference.
    shape = tuple(max(1, v) for v in shape)
    axis = _lowres_axis(spacing, target)
    return _resample(x, shape, axis, 3, clip=True), box, axis, zyx.shape


def preprocess(data_xyz: np.ndarray, zooms_xyz: tuple[float, ...], target=TARGET):
    x, box, axis, full = crop_and_resample(data_xyz, zooms_xyz, target)
    x = (x - x.mean()) / (x.std() + 1e-8)
    return x.astype(np.float32), box, axis, full


def tile_starts_formula(size: int, patch: int, step: float) -> list[int]:
    """The reference's tile positions along one axis, written out independently."""
    n = int(np.ceil((size - patch) / (patch * step))) + 1
    if n == 1:
        return [0]
    actual = (size - patch) / (n - 1)
    return [int(np.round(actual * i)) for i in range(n)]


def predict_softmax(
    x: np.ndarray, net: torch.nn.Module, tta: bool, step: float = 0.5, patch=PATCH, classes: int = CLASSES
) -> np.ndarray:
    pads = [((max(p - s, 0)) // 2, max(p - s, 0) - max(p - s, 0) // 2) for s, p in zip(x.shape, patch)]
    xp = np.pad(x, pads)
    starts = [tile_starts_formula(s, p, step) for s, p in zip(xp.shape, patch)]
    n_tiles = len(starts[0]) * len(starts[1]) * len(starts[2])
    if n_tiles > 1:
        # A centred unit impulse through a Gaussian filter (sigma = patch / 8), over its maximum.
        impulse = np.zeros(patch)
        impulse[tuple(p // 2 for p in patch)] = 1
        g = ndi.gaussian_filter(impulse, [p / 8 for p in patch], 0, mode="constant", cval=0)
        g = (g / g.max()).astype(np.float32)
    else:
        g = np.ones(patch, np.float32)
    flips = [(), (4,), (3,), (4, 3), (2,), (4, 2), (3, 2), (4, 3, 2)] if tta else [()]
    acc = np.zeros((classes, *xp.shape), np.float32)
    nb = np.zeros((classes, *xp.shape), np.float32)
    with torch.no_grad():
        for i in starts[0]:
            for j in starts[1]:
                for k in starts[2]:
                    sl = (slice(i, i + patch[0]), slice(j, j + patch[1]), slice(k, k + patch[2]))
                    t = torch.from_numpy(xp[sl].copy())[None, None]
                    res = torch.zeros((1, classes, *patch))
                    for f in flips:
                        pred = torch.softmax(net(torch.flip(t, f) if f else t), 1)
                        res += (1 / len(flips)) * (torch.flip(pred, f) if f else pred)
                    pred = res[0].numpy() * g
                    acc[(slice(None), *sl)] += pred
                    nb[(slice(None), *sl)] += g
    crop = tuple(slice(a, a + s) for (a, _), s in zip(pads, x.shape))
    return acc[(slice(None), *crop)] / nb[(slice(None), *crop)]


def resample_probabilities(p: np.ndarray, shape: tuple[int, ...], axis: int | None) -> np.ndarray:
    """Normal mode's class probabilities on the cropped input grid (K, *shape), before the argmax."""
    return np.stack([_resample(c, shape, axis, 1, clip=True) for c in p])


def export_normal(p: np.ndarray, shape: tuple[int, ...], axis: int | None) -> np.ndarray:
    return resample_probabilities(p, shape, axis).argmax(0)


def _fast_scores(seg: np.ndarray, shape: tuple[int, ...], axis: int | None):
    """Each present label's linearly interpolated indicator, and the nearest-neighbour label map."""
    values = np.unique(seg).astype(np.int64)
    scores = np.stack(
        [
            _resample((seg == c).astype(np.float64), shape, axis, 1, clip=False, dtype=np.float64)
            for c in values
        ]
    )
    nearest = _resample(seg.astype(np.float64), shape, axis, 0, clip=False).astype(np.int64)
    return values, scores, nearest


def export_fast(seg: np.ndarray, shape: tuple[int, ...], axis: int | None) -> np.ndarray:
    if tuple(seg.shape) == tuple(shape):
        return seg
    values, scores, nearest = _fast_scores(seg, shape, axis)
    tied = scores == scores.max(0)
    vals = values[:, None, None, None]
    nn_tied = (tied & (vals == nearest)).any(0)
    return np.where(nn_tied, nearest, np.where(tied, vals, 10**6).min(0))


def _margin(scores: np.ndarray) -> np.ndarray:
    """Largest minus second-largest along axis 0 (infinite where there is one score)."""
    if len(scores) < 2:
        return np.full(scores.shape[1:], np.inf)
    top = np.partition(scores, -2, axis=0)
    return top[-1] - top[-2]


# Probabilities closer than this (float32 sums in another order differ by ~1e-7) and indicator
# scores closer than this without being equal (float64 sums of the same weights) are decided by
# rounding alone, not by the geometry.
PROBABILITY_DOUBT = 1e-5
SCORE_DOUBT = 1e-9


def segment_with_doubt(
    data_xyz: np.ndarray,
    zooms_xyz,
    net: torch.nn.Module,
    fast: bool,
    tta: bool,
    step: float = 0.5,
    target=TARGET,
    patch=PATCH,
    classes: int = CLASSES,
) -> tuple[np.ndarray, np.ndarray]:
    """Label map (x, y, z) for a RAS-stored image, as the original pipeline computes it, and the
    voxels whose label rounding alone decides (``doubt``, True there).

    Normal mode: the top two resampled probabilities within ``PROBABILITY_DOUBT``. Fast mode: the
    label changes when the network-resolution voxels whose top two probabilities are that close
    take their second choice, or the top two interpolated indicators differ by less than
    ``SCORE_DOUBT`` without being equal (exact ties follow the tie rule and are compared).
    """
    x, box, axis, full = preprocess(data_xyz, zooms_xyz, target)
    p = predict_softmax(x, net, tta, step, patch, classes)
    cropped = tuple(b - a for a, b in box)
    if fast:
        seg = p.argmax(0)
        labels = export_fast(seg, cropped, axis)
        second = np.argsort(p, axis=0)[-2]
        alternative = np.where(_margin(p) < PROBABILITY_DOUBT, second, seg)
        doubt = export_fast(alternative, cropped, axis) != labels
        if tuple(seg.shape) != cropped:
            gap = _margin(_fast_scores(seg, cropped, axis)[1])
            doubt |= (gap > 0) & (gap < SCORE_DOUBT)
    else:
        probabilities = resample_probabilities(p, cropped, axis)
        labels = probabilities.argmax(0)
        doubt = _margin(probabilities) < PROBABILITY_DOUBT
    out = np.zeros(full, np.uint8)
    undecided = np.zeros(full, bool)
    out[tuple(slice(a, b) for a, b in box)] = labels
    undecided[tuple(slice(a, b) for a, b in box)] = doubt
    return out.transpose(2, 1, 0), undecided.transpose(2, 1, 0)


def segment(
    data_xyz: np.ndarray, zooms_xyz, net: torch.nn.Module, fast: bool, tta: bool, **plan
) -> np.ndarray:
    """Label map (x, y, z) for a RAS-stored image, as the original pipeline computes it."""
    return segment_with_doubt(data_xyz, zooms_xyz, net, fast, tta, **plan)[0]


def segment_image(img: nib.Nifti1Image, net: torch.nn.Module, fast: bool, tta: bool, **plan):
    """``segment_with_doubt`` for an image stored in any orientation: run on nibabel's
    closest-canonical (RAS) image, both maps brought back to the input's axes by nibabel."""
    canon = nib.as_closest_canonical(img)
    zooms = tuple(float(z) for z in np.linalg.norm(canon.affine[:3, :3], axis=0))
    ras = segment_with_doubt(np.asarray(canon.dataobj, np.float32), zooms, net, fast, tta, **plan)
    back = nib.orientations.ornt_transform(
        nib.orientations.axcodes2ornt(("R", "A", "S")), nib.orientations.io_orientation(img.affine)
    )
    labels, doubt = (nib.orientations.apply_orientation(a, back) for a in ras)
    return labels, doubt
