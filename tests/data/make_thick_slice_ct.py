"""Make ``chest_ct_5mm_small_fov.nii.gz`` from ``chest_ct_1p5mm_lps.nii.gz`` (both in this folder).

A thick-slice, small-field-of-view CT as scanners store much of the clinical archive: the real
1.5 mm chest scan averaged into 5 mm slabs along its slice axis, as a scanner reconstructs thick
slices (each slab the mean of the thin slices it covers, weighted by how much of each it covers),
and cropped in-plane to a 165 x 144 mm field of view around the heart. Stored as int16 HU in the
source's LPS orientation, with the slab spacing and the slab centres in the affine.

Run from the repository root: ``python3 tests/data/make_thick_slice_ct.py``.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

HERE = Path(__file__).resolve().parent
SLAB_MM = 5.0
# In-plane crop (voxels along the source's i and j axes, 1.5 mm each).
CROP_I = slice(62, 172)
CROP_J = slice(20, 116)


def slab_weights(n_thin: int, thin_mm: float, slab_mm: float) -> np.ndarray:
    """(n_slabs, n_thin): the share of each thin slice inside each slab, rows normalised to 1."""
    n_slabs = int(n_thin * thin_mm // slab_mm)
    thin_lo = np.arange(n_thin) * thin_mm
    slab_lo = np.arange(n_slabs) * slab_mm
    overlap = np.clip(
        np.minimum(slab_lo[:, None] + slab_mm, thin_lo[None] + thin_mm)
        - np.maximum(slab_lo[:, None], thin_lo[None]),
        0,
        None,
    )
    return overlap / overlap.sum(1, keepdims=True)


def main() -> None:
    src = nib.load(HERE / "chest_ct_1p5mm_lps.nii.gz")
    data = np.asarray(src.dataobj, np.float64)[CROP_I, CROP_J]
    thin_mm = float(src.header.get_zooms()[2])
    weights = slab_weights(data.shape[2], thin_mm, SLAB_MM)
    thick = np.rint(np.einsum("ijk,sk->ijs", data, weights)).astype(np.int16)
    affine = src.affine.copy()
    # Voxel (CROP_I.start, CROP_J.start, 0) of the source is the new first voxel in-plane; the first
    # slab's centre lies (slab - thin) / 2 beyond the first thin slice's centre along k.
    affine[:3, 3] = src.affine[:3, :3] @ [CROP_I.start, CROP_J.start, 0] + src.affine[:3, 3]
    affine[:3, 3] += affine[:3, 2] / thin_mm * (SLAB_MM - thin_mm) / 2
    affine[:3, 2] *= SLAB_MM / thin_mm
    out = nib.Nifti1Image(thick, affine)
    out.header.set_qform(affine, code=1)
    out.header.set_sform(affine, code=1)
    out.header.set_xyzt_units("mm")
    nib.save(out, HERE / "chest_ct_5mm_small_fov.nii.gz")


if __name__ == "__main__":
    main()
