"""``Segmentation.image.affine`` is the input's own affine, whatever the input's orientation.

The oracle is the input itself: the matrix nibabel reads from the NIfTI file, or (for DICOM) the
matrix built here from each file's ImagePositionPatient, ImageOrientationPatient and PixelSpacing.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pydicom
import pytest
from conftest import DATA
from fabricate import tiny_network

from stuseg.images.io import read_image
from stuseg.inference.pipeline import segment


def _rotation(degrees: float) -> np.ndarray:
    """A rotation about the second world axis: an oblique acquisition."""
    t = np.deg2rad(degrees)
    return np.array([[np.cos(t), 0, np.sin(t)], [0, 1, 0], [-np.sin(t), 0, np.cos(t)]])


RAS = np.diag([1.5, 1.5, 2.0, 1.0])
RAS[:3, 3] = [-30.0, 12.5, 80.0]
LPS_OBLIQUE = np.eye(4)
LPS_OBLIQUE[:3, :3] = np.diag([-1.5, -1.5, 2.0]) @ _rotation(17.0)
LPS_OBLIQUE[:3, 3] = [120.0, 95.0, -40.0]


@pytest.mark.slow  # about 10 s on two cores: the network runs on a whole tile
@pytest.mark.parametrize("affine", [RAS, LPS_OBLIQUE], ids=["ras", "lps-oblique"])
def test_the_segmentation_carries_the_input_affine(make_nifti, affine: np.ndarray) -> None:
    path = make_nifti(shape=(36, 30, 20), affine=affine)
    seg = segment(path, model=tiny_network(), device="cpu", fast=True)
    np.testing.assert_array_equal(seg.image.affine, nib.load(path).affine)
    np.testing.assert_allclose(seg.image.affine, affine, atol=1e-6)  # the file stores float32


def test_a_dicom_series_gives_the_affine_of_its_slice_positions() -> None:
    """A DICOM series' Volume (what ``segment`` carries through to its result) has the matrix of
    its slices' positions; segmenting the 512 x 512 series itself takes minutes on two cores."""
    folder = DATA / "abdomen_ct_dicom_uids"
    volume = read_image(folder)
    files = [pydicom.dcmread(f, stop_before_pixels=True) for f in sorted(folder.iterdir())]
    first = files[0]
    row_dir, col_dir = (
        np.array(first.ImageOrientationPatient[:3]),
        np.array(first.ImageOrientationPatient[3:]),
    )
    row_spacing, col_spacing = (float(s) for s in first.PixelSpacing)
    to_ras = np.diag([-1.0, -1.0, 1.0])  # DICOM's patient axes are LPS
    aff = volume.affine
    # Stepping along the first index moves one column (along the row direction), the second one row.
    np.testing.assert_allclose(aff[:3, 0], to_ras @ (row_dir * col_spacing), atol=1e-4)
    np.testing.assert_allclose(aff[:3, 1], to_ras @ (col_dir * row_spacing), atol=1e-4)
    # The voxel centres (0, 0, k) are the slices' positions, all of them.
    centres = sorted(tuple(np.round(aff @ [0, 0, k, 1], 3)[:3]) for k in range(len(files)))
    positions = sorted(tuple(np.round(to_ras @ np.array(f.ImagePositionPatient, float), 3)) for f in files)
    np.testing.assert_allclose(centres, positions, atol=1e-3)
