"""Facts about voxel grids that several modules need, defined once.

Pure numpy: importing this module imports nothing heavy.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["AFFINE_ATOL_MM", "LPS_TO_RAS", "PATIENT_LEFT_RAS", "same_grid"]

# DICOM and ITK give patient coordinates in LPS, NIfTI in RAS: the first two axes flip.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])

# The unit vector towards the patient's left in RAS world coordinates (x grows towards the
# patient's right in RAS, towards the left in LPS): how far a point lies to the patient's left is
# its dot product with this, whatever the order and direction in which the voxels are stored.
PATIENT_LEFT_RAS = np.array([-1.0, 0.0, 0.0])

# Two affines describe the same grid if they differ by at most this (mm), absolutely. Far below
# any voxel size, far above the float32 round-off of a stored sform (3e-5 mm at 1000 mm from the
# origin).
AFFINE_ATOL_MM = 1e-3


def same_grid(
    shape_a: Sequence[int], affine_a: np.ndarray, shape_b: Sequence[int], affine_b: np.ndarray
) -> bool:
    """True if two images have the same voxel grid: equal shapes and affines (to ``AFFINE_ATOL_MM``)."""
    return tuple(shape_a) == tuple(shape_b) and np.allclose(affine_a, affine_b, rtol=0, atol=AFFINE_ATOL_MM)
