"""A segmentation on disk read back with the CT it was made from, on one grid.

For ``stuseg statistics`` and ``stuseg preview`` on results already written (by stuseg, or by
another tool: a mask folder, a multilabel file with or without its label table) and for the
cohort tables of a batch folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stuseg.analysis.statistics import affine_of, align_to
from stuseg.errors import InputError, LabelError

__all__ = ["LabelledScan", "load_scan"]


@dataclass
class LabelledScan:
    """A segmentation and its CT on one grid (the CT's storage order).

    ``labels``: label maps (one, or several layers when masks overlap) with disjoint values;
    ``names``: value -> structure name; ``reordered``: the segmentation was stored in another
    axis order or direction than the CT and was matched voxel for voxel (see ``align_to``).
    """

    labels: list[np.ndarray]
    affine: np.ndarray
    ct: np.ndarray
    names: dict[int, str]
    reordered: bool = False


def _model_numbering(
    layers: list[np.ndarray], names: dict[int, str]
) -> tuple[list[np.ndarray], dict[int, str]]:
    """Masks named after stuseg's structures get their model index as label value (as
    ``labelmaps.load_segmentation`` numbers them); other names keep their file-order values."""
    from stuseg.structures import labels as lbl

    known = {n.lower(): i for i, n in enumerate(lbl.STRUCTURES, start=1)}
    if not all(n.lower() in known for n in names.values()):
        return layers, names
    lut = np.zeros(max(names) + 1, np.uint8)
    for value, name in names.items():
        lut[value] = known[name.lower()]
    return [np.asfortranarray(lut[layer]) for layer in layers], {
        known[n.lower()]: lbl.STRUCTURES[known[n.lower()] - 1] for n in names.values()
    }


def load_scan(
    segmentation: Path, ct: Path, *, names: Path | None = None, series: str | None = None
) -> LabelledScan:
    """Read a segmentation and the CT it was made from, and put them on one grid.

    Args:
        segmentation: a folder of ``<name>.nii.gz`` masks (any names, e.g. TotalSegmentator's
            output folder), or a multilabel file (names from its stuseg label table, a model's
            own names included, or, without one, stuseg's model indices; or from ``names``).
        ct: the CT (NIfTI, NRRD, MHA/MHD or a DICOM folder).
        names: a JSON label table for a multilabel file (``{"1": "spleen", ...}``).
        series: the SeriesInstanceUID when the DICOM folder holds several series.

    Returns:
        The labels on the CT's grid, the CT's affine and intensities, and the names.

    Raises:
        InputError: a file cannot be read, or SEG and CT are not on the same grid.
        LabelError: a label map without names for its values.
    """
    from stuseg.images.io import read_image
    from stuseg.results import labelmaps

    segmentation = Path(segmentation)
    if not segmentation.exists():
        raise InputError(f"{segmentation} does not exist; give a mask folder or a multilabel .nii.gz")
    if segmentation.is_dir():
        if names is not None:
            raise InputError("--names applies to a multilabel file; a mask folder is named by its file names")
        layers, header, table = labelmaps.load_named_masks(segmentation)
        layers, table = _model_numbering(layers, table)
    elif names is not None:
        data, header, table = labelmaps.load_named_labels(segmentation, names)
        layers = [data]
    elif (own := labelmaps.load_own_labels(segmentation)) is not None:  # a model's own structures
        data, header, table = own
        layers = [data]
    else:
        try:
            data, header, table = labelmaps.load_segmentation(segmentation)
        except LabelError as exc:  # e.g. another tool's numbering: say how to name the values
            raise LabelError(f"{exc}, or name its values with --names FILE.json") from None
        layers = [np.asfortranarray(data)]
    volume = read_image(Path(ct), series=series)
    seg_affine = affine_of(header)
    reordered = False
    aligned = []
    for layer in layers:
        layer, reordered = align_to(layer, seg_affine, volume.data.shape, volume.affine)
        aligned.append(layer)
    return LabelledScan(aligned, volume.affine, volume.data, dict(table), reordered)
