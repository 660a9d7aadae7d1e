"""Numbers per structure: voxel count, volume, intensity statistics, centroid, bounding box.

``compute`` measures every structure of a label map on the CT it was made from, in one pass
over the voxels: a compiled loop sorts the labelled voxels' intensities into one contiguous
run per label (a counting sort) and gathers each label's coordinate sums and bounding box on
the way; the intensity statistics are then taken per run with numpy (the same functions, on
the same values, as a per-mask computation would use). Masks that overlap (possible in a
folder of masks made by another tool) come as several label maps ("layers") whose labels are
disjoint; each layer is one pass.

Coordinates: voxel indices (i, j, k) are 0-based indices into the arrays as stored in the
file; world coordinates are the NIfTI/nibabel RAS+ frame in millimetres (x grows towards the
patient's Right, y Anterior, z Superior; negate x and y for DICOM's LPS).

A structure holding NaN voxels gets empty intensity fields (no statistic of them is defined).

Quality flags (``empty``, ``touches_border``, ``fragmented``, ``wrong_side``; see ``COLUMNS``)
come from the label map alone (``stuseg.analysis.quality``: pieces counted inside each structure's
bounding box, left/right pairs compared along the patient's left-right axis); ``low_confidence``
and its figures from the network's probabilities, tallied by the export
(``stuseg.analysis.quality.Confidence``), when the segmentation was made in this process.
``Statistics.flagged`` lists the flagged structures per flag, written as ``quality`` in
``statistics.json``.

``write_statistics`` writes ``statistics.json`` (image-level fields and one record per
structure) and ``statistics.csv`` (tidy: one row per structure, columns in ``COLUMNS``);
``write_csv`` writes the same rows for many cases into one cohort table with a ``case`` column.
"""

from __future__ import annotations

import csv
import io as _io
import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from numba import njit

from stuseg import __version__
from stuseg.analysis import quality
from stuseg.errors import InputError, LabelError
from stuseg.images.geometry import same_grid
from stuseg.images.io import label_values
from stuseg.structures import labels as label_table

__all__ = [
    "COLUMNS",
    "FLAGS",
    "FORMAT",
    "PERCENTILES",
    "Statistics",
    "affine_of",
    "align_to",
    "compute",
    "csv_text",
    "label_counts",
    "of_segmentation",
    "output_paths",
    "warm_up",
    "write_csv",
    "write_statistics",
]

FORMAT = "stuseg-statistics/1"
DOCUMENT = FORMAT.split("/")[0]  # its kind, as outputs.check_output compares kinds

# Percentiles reported besides the median, with numpy's default ("linear") method.
PERCENTILES = (5, 95)

# Column name -> meaning and unit. The CSV has these columns in this order (a cohort table adds
# ``case`` first); the JSON records have the same keys.
COLUMNS: dict[str, str] = {
    "structure": "structure name",
    "label": "label value in the segmentation",
    "voxels": "number of voxels",
    "volume_ml": "volume in millilitres (voxels x voxel volume in mm^3 / 1000)",
    "mean_hu": "mean intensity inside the structure, in the input's units (HU for CT)",
    "std_hu": "standard deviation of the intensity (population, ddof=0)",
    "median_hu": "median intensity (as np.median: mean of the two middle values for an even count)",
    "min_hu": "lowest intensity",
    "max_hu": "highest intensity",
    "p05_hu": "5th percentile of the intensity (numpy's default linear interpolation, in float64)",
    "p95_hu": "95th percentile of the intensity (numpy's default linear interpolation, in float64)",
    "centroid_x_ras_mm": "centroid, world x in mm, RAS+ (towards the patient's right; LPS x = -x)",
    "centroid_y_ras_mm": "centroid, world y in mm, RAS+ (towards anterior; LPS y = -y)",
    "centroid_z_ras_mm": "centroid, world z in mm, RAS+ (towards superior; same in LPS)",
    "centroid_i": "centroid, voxel index along the first array axis (0-based, as stored)",
    "centroid_j": "centroid, voxel index along the second array axis",
    "centroid_k": "centroid, voxel index along the third array axis",
    "bbox_i_min": "bounding box, first voxel index along i (inclusive)",
    "bbox_i_max": "bounding box, last voxel index along i (inclusive)",
    "bbox_j_min": "bounding box, first voxel index along j (inclusive)",
    "bbox_j_max": "bounding box, last voxel index along j (inclusive)",
    "bbox_k_min": "bounding box, first voxel index along k (inclusive)",
    "bbox_k_max": "bounding box, last voxel index along k (inclusive)",
    "touches_border": "true if the structure reaches a face of the image: cut by the field of view, "
    "so its volume is a lower bound",
    "empty": "true if the structure has no voxel (absent, or not in the field of view)",
    "fragments": "number of pieces: connected components of its voxels, 26-connectivity (face, edge or "
    "corner neighbours)",
    "outside_largest_share": "share of its voxels outside its largest piece (0 for one piece)",
    "stray_share": "share of its voxels in stray pieces: outside the largest, except pieces that reach a "
    "face of the image when the largest does too (one body cut apart by the field of view's edge)",
    "fragmented": f"true if stray_share > {quality.FRAGMENT_SHARE:g}, for a structure that is one piece in a "
    "body (stuseg.structures.labels.ONE_PIECE: the published table but "
    f"{', '.join(label_table.MAY_BE_IN_PIECES)}); empty for other structures and for names outside the "
    "published table. More than a twentieth in stray pieces is a lost section or a neighbour's voxels, not a "
    "few islands at the rim",
    "side_offset_mm": "for a member of a left/right pair (names with the word left and right, both present): "
    "how far the left member's centroid lies towards the patient's left of the right member's, in mm "
    "along the patient's left-right axis (RAS -x, LPS +x; same value on both records; negative: the wrong "
    "way round)",
    "wrong_side": f"true if side_offset_mm < -{quality.SIDE_MARGIN_MM:g}: the pair lies the wrong way round "
    f"(swapped labels, or a flipped image); within {quality.SIDE_MARGIN_MM:g} mm of each other, centroids "
    "say nothing about sides. Empty without a present partner",
    "mean_probability": "mean, over the structure's voxels, of the network's probability for the "
    "structure's class (its winning probability), as the export resampled it: nnU-Net v1 models' softmax "
    "averaged over tiles, interpolated; v2 models' averaged logits interpolated, then the softmax; with "
    "--fast, over the network-resolution voxels before the label map is resampled. Counted before any "
    "--remove-small-blobs; empty where no probabilities were seen (the statistics command)",
    "low_probability_share": "share of those voxels whose winning probability is below "
    f"{quality.LOW_PROBABILITY:g}: there the network gives the other classes together more weight than "
    "this one",
    "low_confidence": f"true if low_probability_share > {quality.LOW_CONFIDENCE_SHARE:g}: a calibrated "
    "network then expects over a tenth of the structure's voxels to be wrong; at a rim between two classes "
    f"the winner keeps at least {quality.LOW_PROBABILITY:g}, so rims alone do not raise it",
}
_INTENSITY = ("mean_hu", "std_hu", "median_hu", "min_hu", "max_hu", "p05_hu", "p95_hu")
# Fields left empty (CSV) or null (JSON) for a structure without voxels.
_EMPTY_WHEN_ABSENT = tuple(
    c for c in COLUMNS if c not in ("structure", "label", "voxels", "volume_ml", "empty")
)
# The flags, in the order ``Statistics.flagged`` lists them.
FLAGS = ("empty", "touches_border", "fragmented", "wrong_side", "low_confidence")

_NUMBER_LIST = re.compile(r"\[\s*((?:-?[0-9][0-9.eE+-]*,?\s*)+)\]")


@dataclass
class Statistics:
    """The statistics of one segmented scan.

    ``image``: image-level fields (shape, spacing, orientation, stuseg version, model size, mode).
    ``structures``: one record per structure (keys of ``COLUMNS``), in label order; absent
    structures have ``voxels == 0`` and None for every intensity and position field.
    """

    image: dict[str, object]
    structures: list[dict[str, object]] = field(default_factory=list)

    def by_name(self) -> dict[str, dict[str, object]]:
        """The records keyed by structure name."""
        return {str(r["structure"]): r for r in self.structures}

    def flagged(self) -> dict[str, list[str]]:
        """The structures each flag (``FLAGS``) is raised for, in label order."""
        return {flag: [str(r["structure"]) for r in self.structures if r.get(flag) is True] for flag in FLAGS}

    def to_json(self) -> str:
        """The JSON document written as ``statistics.json``."""
        doc = {
            "format": FORMAT,
            "image": self.image,
            "quality": self.flagged(),
            "units": {k: v for k, v in COLUMNS.items() if k not in ("structure", "label")},
            "structures": self.by_name(),
        }
        text = json.dumps(doc, indent=1)
        # Lists of numbers on one line each (shape, spacing, affine rows), not one number a line.
        return _NUMBER_LIST.sub(_inline, text) + "\n"


def _inline(match: re.Match) -> str:
    return "[" + ", ".join(v.strip() for v in match.group(1).split(",") if v.strip()) + "]"


# ---------------------------------------------------------------------------------------------
# The one pass over the voxels


def jit(fn: Callable) -> Callable:
    """numba's ``njit`` (serial), cached on disk where a cache folder is writable (as in
    stuseg.inference.kernels); compiled on first call."""
    try:
        return njit(cache=True, nogil=True)(fn)
    except RuntimeError:  # "cannot cache function ...: no locator available"
        return njit(cache=False, nogil=True)(fn)


@jit
def _gather(labels, ct, next_pos, values, coord_sum, lo, hi):  # pragma: no cover - compiled
    """Counting sort of the labelled voxels' intensities by label, plus per-label index sums and
    bounding boxes. Loops the first index fastest: the arrays are in Fortran order."""
    n0, n1, n2 = labels.shape
    for k in range(n2):
        for j in range(n1):
            for i in range(n0):
                lab = labels[i, j, k]
                if lab == 0:
                    continue
                p = next_pos[lab]
                values[p] = ct[i, j, k]
                next_pos[lab] = p + 1
                coord_sum[lab, 0] += i
                coord_sum[lab, 1] += j
                coord_sum[lab, 2] += k
                lo[lab, 0] = min(lo[lab, 0], i)
                lo[lab, 1] = min(lo[lab, 1], j)
                lo[lab, 2] = min(lo[lab, 2], k)
                hi[lab, 0] = max(hi[lab, 0], i)
                hi[lab, 1] = max(hi[lab, 1], j)
                hi[lab, 2] = max(hi[lab, 2], k)


@jit
def _count(labels, counts, along0, along1, along2):  # pragma: no cover - compiled
    """Voxels per label value, and labelled voxels per index along each axis (any layout; the
    loops follow Fortran order)."""
    n0, n1, n2 = labels.shape
    for k in range(n2):
        for j in range(n1):
            for i in range(n0):
                lab = labels[i, j, k]
                counts[lab] += 1
                if lab != 0:
                    along0[i] += 1
                    along1[j] += 1
                    along2[k] += 1


def label_counts(labels: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """Voxels per label value (like ``np.bincount``) and, per axis, labelled voxels per index.

    One compiled pass, without the int64 copy that ``np.bincount`` makes of its input.

    Args:
        labels: a 3D uint8 or uint16 label map (any memory layout; Fortran order is fastest).

    Returns:
        ``(counts, [along0, along1, along2])``: int64 arrays; ``counts`` has one entry per value
        up to the largest present (at least 2).
    """
    labels = label_values(labels, np.uint16, LabelError)
    top = int(labels.max(initial=0))
    counts = np.zeros(max(top + 1, 2), np.int64)
    along = [np.zeros(n, np.int64) for n in labels.shape]
    _count(labels, counts, *along)
    return counts, along


def warm_up() -> None:
    """Compile (or load from numba's cache) the loop for uint8 labels and float32 intensities."""
    compute(np.ones((2, 2, 2), np.uint8), np.eye(4), np.zeros((2, 2, 2), np.float32), {1: "x"})


def _percentiles_of_sorted(values: np.ndarray, percents: Sequence[float]) -> list[float]:
    """Percentiles of an ascending float64 array by numpy's default ("linear") method, formed as
    ``np.percentile`` forms them: virtual index (n - 1) * q, then its two-sided interpolation
    (from the lower neighbour below a fraction of 0.5, from the upper one from 0.5 on)."""
    n = len(values)
    out = []
    for percent in percents:
        virtual = (n - 1) * (percent / 100)
        below = int(np.floor(virtual))
        above = min(below + 1, n - 1)
        t = virtual - below
        a, b = values[below], values[above]
        diff = b - a
        out.append(float(b - diff * (1 - t)) if t >= 0.5 else float(a + diff * t))
    return out


def _measure_layer(labels: np.ndarray, ct: np.ndarray) -> dict[int, dict[str, object]]:
    """Raw per-label measurements of one label map: {value: fields} for every value present."""
    labels = label_values(labels, np.uint16, LabelError)
    if labels.flags.c_contiguous and not labels.flags.f_contiguous and ct.flags.c_contiguous:
        # Both in C order: loop the transposed (Fortran-ordered) views and swap the axes back.
        swap = True
        labels, ct = labels.T, ct.T
    else:
        swap = False
        labels = np.asfortranarray(labels)
        ct = np.asfortranarray(ct)
    # Values are gathered in the CT's own dtype (exact), then taken to float64 per structure.
    vdtype = ct.dtype.newbyteorder("=")
    if not np.issubdtype(vdtype, np.number) or np.issubdtype(vdtype, np.complexfloating):
        raise InputError(f"CT intensities must be real numbers, not {ct.dtype}")
    if ct.dtype != vdtype:
        ct = np.asfortranarray(ct, dtype=vdtype)

    counts, _ = label_counts(labels)
    n_labels = len(counts)
    starts = np.zeros(n_labels + 1, np.int64)
    np.cumsum(counts, out=starts[1:])
    starts -= counts[0]  # background voxels are not gathered
    starts[0] = 0
    next_pos = starts[:-1].copy()
    values = np.empty(int(counts[1:].sum()), vdtype)
    coord_sum = np.zeros((n_labels, 3), np.int64)  # exact: at most 2**31 voxels x 2**16 indices
    big = np.iinfo(np.int64).max
    lo = np.full((n_labels, 3), big, np.int64)
    hi = np.full((n_labels, 3), -1, np.int64)
    _gather(labels, ct, next_pos, values, coord_sum, lo, hi)

    shape = np.array(labels.shape)
    order = [2, 1, 0] if swap else [0, 1, 2]  # axis of the caller's array -> axis looped here
    found: dict[int, dict[str, object]] = {}
    for value in np.flatnonzero(counts[1:]) + 1:
        n = int(counts[value])
        run = values[starts[value] : starts[value] + n]
        fields: dict[str, object] = {"voxels": n}
        # Intensities of exactly the voxels of this structure, in float64 (numpy would interpolate
        # float32 percentiles in float32 or float64 depending on how q is passed; float64 is exact
        # for every input type). Percentiles: np.percentile's default (see above).
        fields["min_hu"] = float(run.min())
        fields["max_hu"] = float(run.max())
        run64 = run.astype(np.float64)
        fields["mean_hu"] = float(np.mean(run64))
        fields["std_hu"] = float(np.std(run64))
        run64.sort()  # numpy's SIMD sort: several times faster than np.percentile's partitions
        p05, p95 = _percentiles_of_sorted(run64, PERCENTILES)
        # The median as np.median forms it: the middle value, or the mean of the two middle ones.
        half = n // 2
        median = run64[half] if n % 2 else (run64[half - 1] + run64[half]) / 2
        fields["median_hu"], fields["p05_hu"], fields["p95_hu"] = float(median), p05, p95
        if np.isnan(run64[-1]):  # NaN voxels (sorted last): no intensity statistic is defined
            fields.update(
                dict.fromkeys(("min_hu", "max_hu", "mean_hu", "std_hu", "median_hu", "p05_hu", "p95_hu"))
            )
        fields["_centroid_ijk"] = [float(coord_sum[value, a]) / n for a in order]
        fields["_lo"] = [int(lo[value, a]) for a in order]
        fields["_hi"] = [int(hi[value, a]) for a in order]
        fields["touches_border"] = bool(
            (lo[value] == 0).any() or (hi[value] == shape - 1).any()  # either order: same faces
        )
        found[int(value)] = fields
    return found


# ---------------------------------------------------------------------------------------------
# Grids


def affine_of(header_or_affine: nib.Nifti1Header | np.ndarray) -> np.ndarray:
    """The voxel-to-RAS affine of a NIfTI header (its best affine: sform, else qform) or a 4x4 array."""
    if isinstance(header_or_affine, nib.Nifti1Header):
        return np.asarray(header_or_affine.get_best_affine(), np.float64)
    affine = np.asarray(header_or_affine, np.float64)
    if affine.shape != (4, 4):
        raise ValueError(f"an affine is a 4x4 matrix, not {affine.shape}")
    return affine


def align_to(
    labels: np.ndarray, affine: np.ndarray, shape: Sequence[int], target_affine: np.ndarray, what: str = "SEG"
) -> tuple[np.ndarray, bool]:
    """``labels`` (on ``affine``) stored like an image of ``shape`` on ``target_affine``.

    The same grid passes as is. The same voxels stored in another axis order or direction (an
    exact permutation and flip of the axes, as some tools store their results) are transposed
    and flipped to the target's storage, without resampling. Returns ``(labels, reordered)``.

    Raises:
        InputError: the two do not describe the same voxels (a one-line message).
    """
    shape = tuple(int(s) for s in shape)
    if same_grid(labels.shape, affine, shape, target_affine):
        return labels, False
    # Target index -> source index. For the same voxels this is a signed permutation whose
    # translation moves each flipped axis by its length - 1.
    to_source = np.linalg.solve(affine, target_affine)
    rot, shift = to_source[:3, :3], to_source[:3, 3]
    perm = np.abs(rot).argmax(axis=0)  # target axis t reads source axis perm[t]
    signs = np.sign(rot[perm, range(3)])
    expected = np.zeros((3, 3))
    expected[perm, range(3)] = signs
    ok = sorted(perm.tolist()) == [0, 1, 2] and np.allclose(rot, expected, atol=1e-4)
    if ok:
        src_shape = tuple(labels.shape[p] for p in perm)
        ends = np.where(signs < 0, np.array(src_shape) - 1, 0)
        ok = src_shape == shape and np.allclose(shift[perm], ends, atol=1e-3)
    if not ok:
        if tuple(labels.shape) != shape and sorted(labels.shape) != sorted(shape):
            reason = f"shape {tuple(labels.shape)} vs {shape}"
        else:
            reason = "different voxel-to-world affines"
        raise InputError(
            f"{what} and CT are not on the same grid ({reason}); give the CT the segmentation was made from"
        )
    out = np.transpose(labels, perm)
    flips = tuple(t for t in range(3) if signs[t] < 0)
    if flips:
        out = np.flip(out, axis=flips)
    return np.asfortranarray(out), True


# ---------------------------------------------------------------------------------------------
# Public API


def compute(
    labels: np.ndarray | Sequence[np.ndarray],
    header_or_affine: nib.Nifti1Header | np.ndarray,
    ct: np.ndarray | None,
    names: Mapping[int, str],
    *,
    size: str | None = None,
    mode: str | None = None,
    cleanup: Mapping[str, object] | None = None,
    precision: str | None = None,
    confidence: quality.Confidence | None = None,
) -> Statistics:
    """Statistics of every named structure of a segmentation, on the CT's own voxels.

    Args:
        labels: an integer label map on the CT's grid, or several (layers) whose label values
            are disjoint, for masks that overlap.
        header_or_affine: the segmentation's NIfTI header or its 4x4 voxel-to-RAS affine.
        ct: the intensities, same shape as ``labels`` (e.g. ``stuseg.images.io.read_image(ct).data``);
            None: no intensity fields (left empty), the rest as usual (e.g. the quality flags
            of a batch, which keeps no copy of the CT).
        names: label value -> structure name. Every named structure gets a record, present or
            not; a value present in ``labels`` without a name is an error.
        size: the model size that made the segmentation, recorded in the image fields.
        mode: ``"fast"`` or ``"normal"``, recorded in the image fields.
        cleanup: what was done to the label map after the network (``Segmentation.cleanup``),
            recorded in the image fields as ``cleanup`` (None: nothing).
        precision: the type the network ran in (``Segmentation.precision``), recorded in the
            image fields.
        confidence: the network's winning probabilities tallied per label value while the
            label map was made (``Segmentation.confidence``); None: the confidence fields stay
            empty.

    Returns:
        The image fields and one record per named structure, in label order.

    Raises:
        InputError: ``labels`` and ``ct`` differ in shape.
        LabelError: a label value present has no name, or the values are not integers.
    """
    affine = affine_of(header_or_affine)
    layers = [labels] if isinstance(labels, np.ndarray) else list(labels)
    without_ct = ct is None
    ct = np.asanyarray(layers[0] if ct is None else ct)
    for layer in layers:
        if layer.shape != ct.shape or layer.ndim != 3:
            raise InputError(
                f"segmentation shape {layer.shape} and CT shape {ct.shape} differ; "
                "give the CT the segmentation was made from"
            )
    found: dict[int, dict[str, object]] = {}
    for layer in layers:
        # Without a CT the label map stands in for the intensities (no copy), which are dropped.
        for value, fields in _measure_layer(layer, layer if without_ct else ct).items():
            if without_ct:
                fields.update(dict.fromkeys(_INTENSITY))
            if value in found:
                raise LabelError(f"label value {value} occurs in two layers; layers must use disjoint values")
            fields["_pieces"] = quality.pieces(layer, value, fields["_lo"], fields["_hi"])  # type: ignore[arg-type]
            found[value] = fields
    unnamed = sorted(set(found) - set(names))
    if unnamed:
        raise LabelError(
            f"label value {unnamed[0]} in the segmentation has no name; give its label table (--names)"
        )
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    # |det| is the voxel volume for any affine; the product of the spacings only without shear.
    voxel_mm3 = float(abs(np.linalg.det(affine[:3, :3])))
    records = []
    for value in sorted(names):
        rec: dict[str, object] = {"structure": str(names[value]), "label": int(value)}
        fields = found.get(value)
        if fields is None:
            rec.update({"voxels": 0, "volume_ml": 0.0, "empty": True})
            rec.update({c: None for c in _EMPTY_WHEN_ABSENT})
        else:
            n = int(fields["voxels"])  # type: ignore[arg-type]
            ijk = np.asarray(fields["_centroid_ijk"])
            xyz = nib.affines.apply_affine(affine, ijk)
            rec["voxels"] = n
            rec["volume_ml"] = n * voxel_mm3 / 1000.0  # mm^3 -> ml
            for c in _INTENSITY:
                rec[c] = fields[c]
            rec.update(
                {f"centroid_{a}_ras_mm": float(v) for a, v in zip("xyz", xyz)}
                | {f"centroid_{a}": float(v) for a, v in zip("ijk", ijk)}
            )
            for a, low, high in zip("ijk", fields["_lo"], fields["_hi"]):  # type: ignore[call-overload]
                rec[f"bbox_{a}_min"], rec[f"bbox_{a}_max"] = low, high
            rec["touches_border"] = fields["touches_border"]
            rec["empty"] = False
            parts: quality.Pieces = fields["_pieces"]  # type: ignore[assignment]
            rec["fragments"] = parts.count
            rec["outside_largest_share"] = parts.outside_largest / n
            rec["stray_share"] = parts.stray / n
            one_piece = label_table.one_piece(str(names[value]))
            rec["fragmented"] = parts.stray / n > quality.FRAGMENT_SHARE if one_piece else None
            rec["side_offset_mm"] = rec["wrong_side"] = None  # set below for the pairs present
            _set_confidence(rec, confidence.of(value) if confidence is not None else None)
        records.append({c: rec[c] for c in COLUMNS})
    _compare_sides(records)
    image = {
        "shape": [int(s) for s in ct.shape],
        "spacing_mm": [float(s) for s in spacing],
        "voxel_volume_mm3": voxel_mm3,
        "orientation": "".join(nib.aff2axcodes(affine)),
        "affine_ras": [[float(v) for v in row] for row in affine],
        "stuseg_version": __version__,
        "model_size": size,
        "mode": mode,
        "precision": precision,
        "cleanup": dict(cleanup) if cleanup else None,
        "confidence": confidence.describe() if confidence is not None else None,
    }
    return Statistics(image=image, structures=records)


def _set_confidence(rec: dict[str, object], figures: tuple[float, float] | None) -> None:
    """The confidence fields of a present structure from its (mean, low share), or empty."""
    if figures is None:  # no probabilities seen, or none for this label (e.g. a clean-up's leftovers)
        rec["mean_probability"] = rec["low_probability_share"] = rec["low_confidence"] = None
        return
    mean, low_share = figures
    rec["mean_probability"], rec["low_probability_share"] = mean, low_share
    rec["low_confidence"] = quality.low_confidence(low_share)


def _compare_sides(records: list[dict[str, object]]) -> None:
    """Set ``side_offset_mm`` and ``wrong_side`` on both records of each left/right pair present."""
    by_name = {str(r["structure"]): r for r in records}
    for left, right in label_table.left_right_pairs(by_name):
        a, b = by_name[left], by_name[right]
        if a["empty"] or b["empty"]:
            continue
        offset = quality.side_offset_mm(
            [a[f"centroid_{c}_ras_mm"] for c in "xyz"],  # type: ignore[misc]
            [b[f"centroid_{c}_ras_mm"] for c in "xyz"],  # type: ignore[misc]
        )
        for rec in (a, b):
            rec["side_offset_mm"], rec["wrong_side"] = offset, quality.wrong_side(offset)


def of_segmentation(
    seg: object, ct: str | Path | np.ndarray | object | None, *, mode: str | None = None
) -> Statistics:
    """``compute`` for a ``stuseg.inference.pipeline.Segmentation`` (``seg.statistics(ct)`` delegates here).

    Args:
        seg: a Segmentation (``image``: its uint8 label map as a NIfTI image, ``names``, ``size``).
        ct: the CT it was made from: a path (anything ``stuseg.images.io.read_image`` reads), a
            ``stuseg.images.io.Volume``, or an array of intensities on the segmentation's grid; None: no
            intensity fields.
        mode: ``"fast"`` or ``"normal"``, recorded in the image fields.
        cleanup: what was done to the label map after the network (``Segmentation.cleanup``),
            recorded in the image fields as ``cleanup`` (None: nothing).

    Returns:
        The statistics of every structure of ``seg``.

    Raises:
        InputError: the CT cannot be read, or it is not on the segmentation's grid.
    """
    from stuseg.images.io import Volume, read_image

    image = seg.image  # type: ignore[attr-defined]
    labels = np.asanyarray(image.dataobj)
    affine = affine_of(image.header)
    if isinstance(ct, (str, Path)):
        ct = read_image(Path(ct))
    if isinstance(ct, Volume):
        if not same_grid(labels.shape, affine, ct.data.shape, ct.affine):
            raise InputError(
                "the CT is not on the segmentation's grid; give the CT the segmentation was made from"
            )
        ct = ct.data
    cleanup = getattr(seg, "cleanup", None)
    precision = getattr(seg, "precision", None)
    return compute(
        labels,
        affine,
        None if ct is None else np.asanyarray(ct),
        seg.names,  # type: ignore[attr-defined]
        size=seg.size or None,  # type: ignore[attr-defined]
        mode=mode,
        cleanup=cleanup,
        precision=precision,
        confidence=getattr(seg, "confidence", None),
    )


def _cell(value: object) -> object:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)  # shortest text that reads back as the same float
    return value


def csv_text(items: Iterable[tuple[str | None, Statistics]]) -> str:
    """A tidy CSV table: one row per (case, structure), columns ``COLUMNS`` (plus ``case`` first
    when any case name is given, for a cohort table)."""
    items = list(items)
    with_case = any(case is not None for case, _ in items)
    columns = (["case"] if with_case else []) + list(COLUMNS)
    buf = _io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for case, stats in items:
        for rec in stats.structures:
            row = [_cell(rec[c]) for c in COLUMNS]
            writer.writerow(([case or ""] if with_case else []) + row)
    return buf.getvalue()


def write_csv(items: Iterable[tuple[str | None, Statistics]], csv_path: Path) -> None:
    """Write ``csv_text(items)`` to ``csv_path`` (a cohort table when cases are named).

    Raises:
        OSError: the file cannot be written (the caller stages and reports it).
    """
    Path(csv_path).write_text(csv_text(items), encoding="utf-8")


def write_statistics(stats: Statistics, json_path: Path, csv_path: Path) -> None:
    """Write ``statistics.json`` and ``statistics.csv`` of one scan to the given paths.

    Plain writes: callers write into a staged folder or temporary files and move them into place.

    Raises:
        OSError: a file cannot be written.
    """
    Path(json_path).write_text(stats.to_json(), encoding="utf-8")
    write_csv([(None, stats)], csv_path)


def output_paths(json_path: Path) -> tuple[Path, Path]:
    """``(FILE.json, FILE.csv)`` for ``--output FILE.json``."""
    json_path = Path(json_path)
    return json_path, json_path.with_suffix(".csv")
