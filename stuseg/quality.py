"""Quality flags of a label map, per structure: pieces (connected components) and laterality.

Computed from the label map alone (never from the network's probabilities), on the voxels and
bounding boxes that ``stuseg.statistics`` has measured; the thresholds are defined here, once,
and documented in ``stuseg.statistics.COLUMNS``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from scipy import ndimage

from stuseg.geometry import PATIENT_LEFT_RAS

__all__ = [
    "CONNECTIVITY",
    "FRAGMENT_SHARE",
    "SIDE_MARGIN_MM",
    "Pieces",
    "pieces",
    "remove_small_blobs",
    "side_offset_mm",
    "wrong_side",
]

# Voxels are one piece when they share a face, an edge or a corner (26-connectivity): a thin or
# oblique structure (a rib, a vessel) sampled on a grid often touches its next voxel only at an
# edge or a corner, and is still one piece.
CONNECTIVITY = np.ones((3, 3, 3), bool)

# A structure that is one piece in a body is flagged ``fragmented`` when more than this share of
# its voxels lies in stray pieces. 5 %: a network's label map often holds a few islands of a
# handful of voxels at the rim of an organ, which say nothing; a piece holding a twentieth of the
# structure is a lost section or a neighbour's voxels under this label. On TotalSegmentator's
# results in tests/data the stray shares of one-piece structures are 0.2 % or less (islands of 2
# to 9 voxels), 1.9 % for a vertebra cut by the last slice of a 20-slice series (33 % outside its
# largest piece: the rest reaches the image's faces), and 49 % for a pancreas in two halves 28 mm
# apart, neither reaching a face: a section missing inside the field of view, rightly flagged.
FRAGMENT_SHARE = 0.05

# A left/right pair is flagged ``wrong_side`` when the left member's centroid lies more than this
# towards the patient's right of the right member's. Paired structures lie 3 cm (iliac vessels
# near their origin, heart chambers) to 40 cm (humeri) apart, so a swap puts them that far the
# wrong way round; a centroid closer than 1 cm to its partner's (both barely inside the field of
# view, e.g. the common iliac veins near their confluence) says nothing about sides.
SIDE_MARGIN_MM = 10.0


class Pieces(NamedTuple):
    """The connected components of one structure."""

    count: int  # pieces (26-connected components)
    outside_largest: int  # voxels in pieces other than the largest
    stray: int  # of those, voxels in pieces that the field of view's edges do not explain


def pieces(labels: np.ndarray, value: int, lo: Sequence[int], hi: Sequence[int]) -> Pieces:
    """The pieces of the structure ``value`` of a label map, counted inside its bounding box.

    A structure that is one piece in a body but cut by the field of view may lie in several
    pieces inside the image (a rib or a vertebra cut by the last slice, the aortic arch cut by the
    first): each such piece then reaches a face of the image, and so does the largest. So when the
    largest piece reaches a face, the other pieces that reach a face are not stray; when it does
    not, the largest piece is the whole structure, and every other piece is stray.

    Args:
        labels: the label map (any integer type and memory layout).
        value: the structure's label value (present in ``labels``).
        lo, hi: its bounding box, first and last voxel index along each axis (inclusive).

    Returns:
        The number of pieces, the voxels outside the largest, and the stray voxels among them.
    """
    box = tuple(slice(int(a), int(b) + 1) for a, b in zip(lo, hi))
    mask = labels[box] == value
    ids, count = ndimage.label(mask, structure=CONNECTIVITY)
    if count <= 1:
        return Pieces(count, 0, 0)
    sizes = np.bincount(ids.ravel(), minlength=count + 1)
    sizes[0] = 0  # background
    largest = int(sizes.argmax())  # the first of equally large pieces
    outside = int(sizes.sum() - sizes[largest])
    at_face = np.zeros(count + 1, bool)
    for axis in range(3):  # the box's faces that are the image's faces
        if lo[axis] == 0:
            at_face[np.take(ids, 0, axis=axis)] = True
        if hi[axis] == labels.shape[axis] - 1:
            at_face[np.take(ids, -1, axis=axis)] = True
    at_face[0] = False
    if not at_face[largest]:
        return Pieces(count, outside, outside)
    at_face[largest] = False
    return Pieces(count, outside, outside - int(sizes[at_face].sum()))


def side_offset_mm(left_centroid_ras: Sequence[float], right_centroid_ras: Sequence[float]) -> float:
    """How far (mm) the left member's centroid lies towards the patient's left of the right
    member's, from world centroids in RAS mm; negative: the pair is the wrong way round."""
    diff = np.asarray(left_centroid_ras, np.float64) - np.asarray(right_centroid_ras, np.float64)
    return float(PATIENT_LEFT_RAS @ diff)


def wrong_side(offset_mm: float) -> bool:
    """True if a pair whose ``side_offset_mm`` is ``offset_mm`` is the wrong way round by more
    than ``SIDE_MARGIN_MM``."""
    return offset_mm < -SIDE_MARGIN_MM


def remove_small_blobs(labels: np.ndarray, affine: np.ndarray, min_mm3: float) -> dict[int, int]:
    """Set to background, in place, every piece of every structure smaller than ``min_mm3``.

    The opt-in clean-up of ``--remove-small-blobs``: pieces are 26-connected components of one
    label value (as ``pieces`` counts them); a piece's volume is its voxel count times the voxel
    volume of ``affine``. A structure made only of small pieces disappears.

    Args:
        labels: the label map, written in place (a writable integer array).
        affine: its voxel-to-world matrix (the voxel volume is ``|det|`` of its 3x3 part).
        min_mm3: pieces below this volume go; must be positive.

    Returns:
        label value -> voxels removed, for every structure that lost any.

    Raises:
        ValueError: ``min_mm3`` is not positive.
    """
    if not min_mm3 > 0:
        raise ValueError(f"the smallest blob to keep must be a positive volume, got {min_mm3} mm3")
    voxel_mm3 = abs(float(np.linalg.det(np.asarray(affine, float)[:3, :3])))
    removed: dict[int, int] = {}
    for index, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None:
            continue
        region = labels[box]
        ids, count = ndimage.label(region == index, structure=CONNECTIVITY)
        sizes = np.bincount(ids.ravel(), minlength=count + 1)
        small = np.flatnonzero(sizes * voxel_mm3 < min_mm3)
        small = small[small > 0]  # 0 is everything else in the box
        if small.size:
            region[np.isin(ids, small)] = 0
            removed[index] = int(sizes[small].sum())
    return removed
