"""The preprocessing and inference plan of the published STU-Net models, in one place.

The four sizes were trained by nnU-Net v1 with one plan (Task101_TotalSegmentator,
``nnUNetPlansv2.1``, 3d_fullres stage): these are its facts. Everything that resamples, tiles or
counts classes reads them from here. Pure data: importing this module imports nothing heavy.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Plan:
    """How images are prepared for the network and how many classes it predicts."""

    target_spacing: tuple[float, float, float]  # mm, along the array axes after reorientation
    patch_size: tuple[int, int, int]  # voxels of one sliding-window tile
    num_classes: int  # network output channels, background (0) included
    # Per image: (x - mean) / (std + 1e-8) over all voxels, no clipping (the plan's "nonCT" scheme,
    # as the TotalSegmentator task was planned).
    normalization: str


PLAN = Plan(
    target_spacing=(1.5, 1.5, 1.5),
    patch_size=(128, 128, 128),
    num_classes=105,
    normalization="zscore",
)
