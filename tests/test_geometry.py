"""One definition of 'the same grid', used by every command that pairs two images."""

from __future__ import annotations

import numpy as np

from stuseg.images.geometry import same_grid


def test_same_grid_is_an_absolute_tolerance_of_a_micrometre() -> None:
    affine = np.diag([0.8, 0.8, 5.0, 1.0])
    affine[:3, 3] = [-250.0, 180.0, 900.0]  # far from the origin: no tolerance relative to it
    for shift, same in ((0.0005, True), (0.002, False)):
        moved = affine.copy()
        moved[2, 3] += shift
        assert same_grid((10, 10, 4), affine, (10, 10, 4), moved) is same
    assert not same_grid((10, 10, 4), affine, (10, 4, 10), affine)
