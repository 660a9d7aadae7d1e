"""Quality flags per structure: pieces (connected components), laterality, and confidence.

Pieces and sides come from the label map alone, on the voxels and bounding boxes that
``stuseg.analysis.statistics`` has measured. Confidence comes from the network's own probabilities,
tallied per class while the export streams (``Confidence``; the kernels in ``stuseg.inference.kernels``
count, this module holds the sums and the thresholds). The thresholds are defined here, once,
and documented in ``stuseg.analysis.statistics.COLUMNS``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from scipy import ndimage

from stuseg.images.geometry import PATIENT_LEFT_RAS

__all__ = [
    "CONNECTIVITY",
    "FRAGMENT_SHARE",
    "LOW_CONFIDENCE_SHARE",
    "LOW_PROBABILITY",
    "REVIEW_FLAGS",
    "SIDE_MARGIN_MM",
    "Confidence",
    "Pieces",
    "low_confidence",
    "pieces",
    "remove_small_blobs",
    "review_reason",
    "side_offset_mm",
    "summarize",
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

# A voxel's winning probability is low below 0.5: the network then gives the other classes
# together more weight than the class the voxel got, so (for a calibrated network) the voxel
# is more likely wrong than right. Where only two classes compete (a structure's rim against its
# neighbour), the winner has at least 0.5: a low voxel is one where three or more classes share
# the belief, or where no class stands out.
LOW_PROBABILITY = 0.5

# A structure is flagged ``low_confidence`` when more than this share of its voxels has a low
# winning probability. 20 %: each such voxel is more likely wrong than right, so a calibrated
# network expects over a tenth of the structure's voxels to be wrong, a Dice loss of about 0.05
# or more from them alone - as large as the spread between good results for most organs. Rims
# do not reach it: at a boundary between two classes the winner keeps at least 0.5.
LOW_CONFIDENCE_SHARE = 0.2


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


@dataclass
class Confidence:
    """Per-class tallies of the winning probability of a label map's voxels, from the network.

    Filled while the export streams (``stuseg.inference.postprocess``): for each voxel whose label is
    class ``k > 0``, ``probability_sum[k]`` adds its winning probability, ``voxels[k]`` counts
    it and ``low[k]`` counts it again when that probability is below ``LOW_PROBABILITY``.

    ``grid``: ``"input"`` when the voxels are those of the label map on the input grid (normal
    mode), each with the probability of its class as the export resampled it: nnU-Net v1 models
    average the softmax over tiles and the probabilities are interpolated; v2 models
    (``logits``) average the logits, which are interpolated, and the probability is their
    softmax (v2's own order). ``"network"`` when they are the network-resolution voxels, labelled
    by their own argmax, before the label map is resampled (fast mode): the averaged softmax
    (v1), or the softmax of the averaged logits (v2).
    """

    grid: str
    logits: bool
    probability_sum: np.ndarray  # (K,) float64
    low: np.ndarray  # (K,) int64
    voxels: np.ndarray  # (K,) int64

    @classmethod
    def zeros(cls, num_classes: int, grid: str, logits: bool) -> Confidence:
        """Empty tallies for ``num_classes`` classes."""
        return cls(grid, logits, np.zeros(num_classes), *(np.zeros(num_classes, np.int64) for _ in range(2)))

    def add(self, probability_sum: np.ndarray, low: np.ndarray, voxels: np.ndarray) -> None:
        """Add tallies of the same classes, one row per slab row ((rows, K) arrays)."""
        self.probability_sum += probability_sum.sum(axis=0)
        self.low += low.sum(axis=0)
        self.voxels += voxels.sum(axis=0)

    def of(self, value: int) -> tuple[float, float] | None:
        """Class ``value``'s mean winning probability and the share of its voxels below
        ``LOW_PROBABILITY``; None when no voxel had that class."""
        if not 0 < value < len(self.voxels) or self.voxels[value] == 0:
            return None
        n = int(self.voxels[value])
        return float(self.probability_sum[value]) / n, int(self.low[value]) / n

    def describe(self) -> dict[str, object]:
        """What the figures are computed from, for the statistics' image fields."""
        return {
            "probabilities": "logits averaged over tiles (nnU-Net v2), softmax taken after resampling"
            if self.logits
            else "softmax averaged over tiles (nnU-Net v1)",
            "voxels": "the label map's voxels on the input grid (before any --remove-small-blobs), each "
            "with the probability of its class as the export resampled it (linear interpolation)"
            if self.grid == "input"
            else "the network-resolution voxels, labelled by their own argmax, before the label map is "
            "resampled to the input grid (--fast)",
            "low_probability": LOW_PROBABILITY,
            "low_confidence_share": LOW_CONFIDENCE_SHARE,
        }


def low_confidence(low_share: float) -> bool:
    """True if a structure whose share of low-probability voxels is ``low_share`` is flagged."""
    return low_share > LOW_CONFIDENCE_SHARE


# The flags that say a result needs a look: those the terminal's quality line names and
# ``--qa-fail`` fails a case on. ``empty`` and ``touches_border`` are not among them: most scans
# show part of a body, so a correct result raises them for many structures.
REVIEW_FLAGS = ("wrong_side", "fragmented", "low_confidence")


def summarize(stats: object) -> dict[str, object]:
    """A segmentation's quality flags in brief, for a batch's run log (one record per case) and
    ``--qa-fail``.

    Of its statistics (a ``stuseg.analysis.statistics.Statistics``; without a CT,
    ``statistics.of_segmentation(seg, None)`` computes them from the label map and the
    probabilities tallied while it was made): the structures raising each of ``REVIEW_FLAGS`` by
    name, how many structures are ``empty`` or ``touches_border``, and the least confident
    structure present (lowest mean winning probability; None where no probabilities were seen).

    Returns:
        ``{"wrong_side": [...], "fragmented": [...], "low_confidence": [...], "empty": n,
        "touches_border": n, "least_confident": {"structure": ..., "mean_probability": ...}}``.
    """
    flagged = stats.flagged()  # type: ignore[attr-defined]
    summary: dict[str, object] = {flag: flagged[flag] for flag in REVIEW_FLAGS}
    summary |= {flag: len(flagged[flag]) for flag in ("empty", "touches_border")}
    rated = {str(r["structure"]): float(r["mean_probability"]) for r in stats.structures  # type: ignore
             if r["mean_probability"] is not None}  # fmt: skip
    least = min(rated, key=rated.__getitem__, default=None)
    summary["least_confident"] = (
        None if least is None else {"structure": least, "mean_probability": round(rated[least], 4)}
    )
    return summary


def review_reason(summary: dict[str, object]) -> str | None:
    """One line naming the structures a ``summarize`` summary flags for review, or None if none."""
    parts = []
    for flag in REVIEW_FLAGS:
        names = list(summary.get(flag) or [])  # type: ignore[call-overload]
        if names:
            more = f" and {len(names) - 3} more" if len(names) > 3 else ""
            parts.append(f"{flag}: {', '.join(names[:3])}{more}")
    return f"quality flags raised ({'; '.join(parts)})" if parts else None
