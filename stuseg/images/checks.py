"""Checks of an input image before the network runs: one function per check.

Each check either raises :class:`InputError` (the result would be garbage, or the image would be
silently distorted) or warns with :class:`StusegWarning` (usable, but the result needs a second
look). Every message is one line. Library code: nothing here prints.

The thresholds, and why:

- Hounsfield units. A body CT holds air at about -1000 HU (outside the body, lungs, trachea,
  bowel gas; noise spreads it by tens of HU), so an image whose lowest value is above
  ``AIR_HU`` = -900 holds no air. Values that are all >= 0 with a maximum above ``RAW_MAX`` =
  2000 look like stored pixel values without RescaleSlope/RescaleIntercept (e.g. 0..4095 for
  -1024..3071 HU). That is an error for a channel normalised with fixed HU bounds (nnU-Net's
  ``ct`` scheme, or none): the values mean nothing to it. For a channel normalised by the
  image's own statistics (the published models' z-score) a linear rescale changes little, so
  it is a warning there.
- Modality. A DICOM series whose Modality is set and is neither CT nor OT ("other", which
  workstations write on reformatted CTs too) is refused for a CT channel.
- Slice positions (DICOM). SimpleITK puts slice k at first + k * step along the slice normal:
  a slice more than ``SLICE_POSITION_TOLERANCE`` (0.1) of a step off that grid (a missing or
  duplicate slice, uneven spacing) is an error naming the gap. So is gantry tilt, slices stacked
  more than ``MAX_TILT_DEGREES`` (0.1 degree) off their normal, where it also moves a slice
  sideways by more than 0.1 of a pixel (the floor keeps positions rounded to 0.01 mm on a short
  stack from reading as tilt): an affine cannot hold the shear, and stuseg does not resample it.
- Thick slices. A spacing of at least ``THICK_FACTOR`` (3) times the model's along an axis
  (4.5 mm for the published models at 1.5 mm): two of every three slices the network sees are
  interpolated, and structures thinner than about two slices may be missed.
- Field of view. Across the body (the two voxel axes other than the one closest to head-foot),
  an extent below one tile of the model (128 voxels x 1.5 mm = 192 mm for the published
  models): the body's outline is cut, which the models rarely saw, and structures cut by the
  edge are incomplete. Head-foot is not checked: a scan range is chosen per exam, and every
  scan cuts the structures at its ends whatever its length.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from stuseg.errors import InputError, StusegWarning
from stuseg.model.plan import Normalization, Plan

__all__ = [
    "AIR_HU",
    "CT_MODALITIES",
    "MAX_TILT_DEGREES",
    "RAW_MAX",
    "SLICE_POSITION_TOLERANCE",
    "THICK_FACTOR",
    "check_field_of_view",
    "check_gantry_tilt",
    "check_hounsfield",
    "check_modality",
    "check_slice_spacing",
    "check_slice_thickness",
]

AIR_HU = -900.0
RAW_MAX = 2000.0
# Normalisation schemes that do not depend on the image's offset and scale.
_SELF_NORMALISED = ("zscore", "rescale_0_1")
CT_MODALITIES = ("CT", "OT")
SLICE_POSITION_TOLERANCE = 0.1
MAX_TILT_DEGREES = 0.1
THICK_FACTOR = 3.0


def check_hounsfield(
    data: np.ndarray, normalization: Normalization = Normalization(), *, what: str = "the image"
) -> None:
    """Refuse or warn about a CT channel whose values do not look like Hounsfield units.

    Args:
        data: the channel's voxels (NaN allowed).
        normalization: how the model normalises this channel; decides error or warning for raw
            stored values.
        what: the image, for the message.

    Raises:
        InputError: raw stored values for a channel with fixed HU bounds.
    """
    if not data.size:
        return
    # fmin/fmax skip NaNs (NaN only if all are) without nanmin's warning: no warnings filter to
    # change, which would not be thread-safe.
    lowest = float(np.fmin.reduce(data, axis=None))
    highest = float(np.fmax.reduce(data, axis=None))
    if not np.isfinite(lowest):
        return
    if lowest >= 0 and highest > RAW_MAX:
        raw = (
            f"{what} holds values from {lowest:g} to {highest:g}, none below 0: they look like raw "
            "stored values without RescaleSlope/RescaleIntercept, not Hounsfield units; convert them "
            "to HU (for most CT: value - 1024)"
        )
        if normalization.scheme not in _SELF_NORMALISED:
            raise InputError(f"{raw} and run again")
        warnings.warn(
            f"{raw}; this model normalises each image by its own statistics, so the masks may still "
            "be usable, but HU values read from them will not be",
            StusegWarning,
            stacklevel=4,
        )
        return
    if lowest > AIR_HU:
        warnings.warn(
            f"{what} has no values below {AIR_HU:g} (its lowest is {lowest:g}), so it holds no air "
            "and may not be a CT in Hounsfield units; results will likely be meaningless",
            StusegWarning,
            stacklevel=4,
        )


def check_modality(modality: str | None, *, what: str = "the image") -> None:
    """Refuse a DICOM series of another modality than CT for a CT channel.

    Args:
        modality: the series' Modality (0008,0060); None where unknown (not DICOM, or not set).
        what: the image, for the message.

    Raises:
        InputError: Modality is set and is not CT or OT.
    """
    if modality is None or not modality.strip() or modality.strip().upper() in CT_MODALITIES:
        return
    raise InputError(
        f"{what} is a DICOM series of modality {modality.strip()}, not CT; the model expects CT here, "
        "so pass the CT series of the study"
    )


def check_gantry_tilt(folder: Path, positions: np.ndarray, normal: np.ndarray, pixel_spacing: float) -> None:
    """Refuse DICOM slices stacked obliquely to their own plane (gantry tilt).

    Args:
        folder: the series, for the message.
        positions: ImagePositionPatient of each slice (mm), in stacking order.
        normal: the unit slice normal.
        pixel_spacing: the smaller in-plane pixel spacing (mm).

    Raises:
        InputError: the tilt angle and the sideways shift it causes.
    """
    offsets = positions - positions[0]
    along = offsets @ normal
    sideways = np.linalg.norm(offsets - along[:, None] * normal[None, :], axis=1)
    length = float(np.abs(along).max())
    if length == 0:
        return
    shift = float(sideways.max())
    tilt = float(np.degrees(np.arctan2(float(sideways[-1]), abs(float(along[-1])))))
    if tilt > MAX_TILT_DEGREES and shift > SLICE_POSITION_TOLERANCE * pixel_spacing:
        raise InputError(
            f"the DICOM slices in {folder} are stacked at {tilt:.2f} degrees to their normal (gantry "
            f"tilt: the last slice lies {float(sideways[-1]):.2f} mm sideways of the first); stuseg does "
            "not shear images, so resample the series to a regular grid first"
        )


def check_slice_spacing(
    folder: Path, positions: np.ndarray, normal: np.ndarray, files: Sequence[str]
) -> None:
    """Refuse a DICOM series whose slices are not evenly spaced, naming the first bad gap.

    Args:
        folder: the series, for the message.
        positions: ImagePositionPatient of each slice (mm), in stacking order.
        normal: the unit slice normal.
        files: the slice files in the same order, for the message.

    Raises:
        InputError: a missing or duplicate slice, or uneven spacing.
    """
    along = positions @ normal
    n = len(along)
    step = abs(float(along[-1] - along[0])) / (n - 1)
    expected = along[0] + np.sign(along[-1] - along[0]) * step * np.arange(n)
    if step > 0 and np.max(np.abs(along - expected)) <= SLICE_POSITION_TOLERANCE * step:
        return
    # The message reads the slices in position order (GDCM falls back to another order when two
    # slices share a position), numbered the way most of the series' slices go.
    order = np.argsort(along * np.sign(np.median(np.diff(along)) or 1.0), kind="stable")
    along, files = along[order], [files[i] for i in order]
    gaps = np.diff(along)
    usual = float(np.median(gaps))
    k = int(np.argmax(np.abs(gaps - usual)))
    gap = float(gaps[k])
    where = f"between slices {k + 1} and {k + 2} of {n} ({Path(files[k]).name}, {Path(files[k + 1]).name})"
    if not np.any(gaps):
        what = f"all {n} slices at one position (one slice saved {n} times, or a series of repeats)"
    elif usual > 0 and gap < SLICE_POSITION_TOLERANCE * usual:
        what = f"two slices at the same position {where} (duplicates, or two acquisitions in one series)"
    elif usual > 0 and gap > usual and abs(gap / usual - round(gap / usual)) <= SLICE_POSITION_TOLERANCE:
        missing = round(gap / usual) - 1
        lost = "a slice is" if missing == 1 else f"{missing} slices are"
        what = f"a {gap:.4g} mm gap {where} where the others are {usual:.4g} mm apart ({lost} missing)"
    else:
        what = f"uneven slice spacing, {gaps.min():.4g} to {gaps.max():.4g} mm (the largest jump {where})"
    raise InputError(
        f"the DICOM series in {folder} has {what}; export the complete series or resample it to a "
        "regular grid first"
    )


def _plan_axes(affine: np.ndarray, plan: Plan) -> list[int]:
    """The network axis (index into the plan's (z, y, x) fields) of each input voxel axis.

    As ``stuseg.inference.preprocess.to_model_order`` arranges it: with ``reorient`` the input axis goes
    to its closest RAS axis r, which is (z, y, x) axis 2 - r; without, input axis i is 2 - i;
    the plan's ``transpose`` then picks the network order.
    """
    ras = [int(r) for r in nib.orientations.io_orientation(affine)[:, 0]] if plan.reorient else [0, 1, 2]
    return [plan.transpose.index(2 - r) for r in ras]


def check_slice_thickness(affine: np.ndarray, plan: Plan) -> None:
    """Warn about voxels ``THICK_FACTOR`` or more times the model's spacing along an axis."""
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    for axis, a in enumerate(_plan_axes(affine, plan)):
        target = float(plan.target_spacing[a])
        # 0.01 mm: spacings stored with rounding (4.4999 for 4.5) count as what they are.
        if spacing[axis] >= THICK_FACTOR * target - 0.01:
            warnings.warn(
                f"the image has {spacing[axis]:.3g} mm slices (voxel axis {axis + 1}) and the model works "
                f"at {target:g} mm: structures thinner than about two slices "
                f"({2 * spacing[axis]:.3g} mm) may be missed or cut short",
                StusegWarning,
                stacklevel=4,
            )
            return


def check_field_of_view(shape: Sequence[int], affine: np.ndarray, plan: Plan) -> None:
    """Warn where the field of view across the body is smaller than one tile of the model."""
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    extent = np.asarray(shape[:3], float) * spacing
    # The voxel axis closest to head-foot (the S of RAS) is the scan range, not the field of view.
    head_foot = int(np.argmax(np.abs(affine[2, :3]) / spacing))
    plan_axes = _plan_axes(affine, plan)
    across = [i for i in range(3) if i != head_foot]
    tiles = [plan.patch_size[plan_axes[i]] * plan.target_spacing[plan_axes[i]] for i in across]
    if any(extent[i] < tile for i, tile in zip(across, tiles)):
        fov = " x ".join(f"{extent[i]:.0f}" for i in across)
        tile = " x ".join(f"{t:.0f}" for t in tiles)
        warnings.warn(
            f"the field of view across the body is {fov} mm, smaller than the model's {tile} mm tile: "
            "structures cut by its edge will be incomplete and those near it may be mislabelled",
            StusegWarning,
            stacklevel=4,
        )
