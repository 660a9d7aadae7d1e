"""How a trained model wants its images prepared and its outputs read: the plan, in one place.

``PLAN`` is the plan of the published STU-Net models: nnU-Net v1 trained the four sizes with one
plan (Task101_TotalSegmentator, ``nnUNetPlansv2.1``, 3d_fullres stage). A fine-tuned model
folder brings its own plan (``stuseg.weights.modelfolder`` reads it); everything that reorients,
normalises, resamples, tiles, mirrors or counts classes reads it from here. Pure data:
importing this module imports nothing heavy.

The two frameworks differ in a few steps, each a field here:

- nnU-Net v1 resamples and then normalises; v2 normalises the cropped image and then resamples
  (``framework``);
- v1 averages softmax probabilities over tiles, mirrorings and folds and interpolates them back
  to the input spacing; v2 does the same with the raw logits and takes the softmax last
  (argmax is the same either way at one voxel, not after interpolation);
- v1 picks the axis to resample on its own from the input spacing first; v2's export (logits
  back to the input spacing) looks at the network spacing first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["PLAN", "SCHEMES", "Framework", "Normalization", "Plan"]

Framework = Literal["v1", "v2"]

# The normalisation schemes stuseg implements, by nnU-Net's names for them:
#   zscore:      (x - mean) / std of the image itself (v1 "nonCT", v2 ZScoreNormalization);
#   ct:          clip to the dataset's foreground [lower, upper], then (x - mean) / std with the
#                dataset's foreground statistics (v1 "CT", v2 CTNormalization);
#   none:        unchanged (v1 "noNorm", v2 NoNormalization);
#   rescale_0_1: (x - min) / (max - min) of the image (v2 RescaleTo01Normalization);
#   rgb_0_1:     x / 255 (v2 RGBTo01Normalization).
SCHEMES = ("zscore", "ct", "none", "rescale_0_1", "rgb_0_1")


@dataclass(frozen=True)
class Normalization:
    """How one input channel is normalised."""

    scheme: str = "zscore"  # one of SCHEMES
    # zscore only: statistics over the nonzero region (holes filled) alone, and 0 outside it.
    use_mask: bool = False
    # ct only: the dataset's foreground statistics (nnU-Net's percentile_00_5, percentile_99_5,
    # mean and std / sd).
    lower: float | None = None
    upper: float | None = None
    mean: float | None = None
    std: float | None = None

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ValueError(
                f"unknown normalisation scheme {self.scheme!r}; stuseg knows {', '.join(SCHEMES)}"
            )
        if self.scheme == "ct" and None in (self.lower, self.upper, self.mean, self.std):
            raise ValueError("the ct scheme needs lower, upper, mean and std")


@dataclass(frozen=True)
class Plan:
    """How images are prepared for the network and how its outputs are read.

    All (z, y, x) fields are in the order of the network's array: the image as SimpleITK
    would give it (reversed NIfTI axes), after ``transpose``.
    """

    target_spacing: tuple[float, float, float]  # mm per network voxel
    patch_size: tuple[int, int, int]  # voxels of one sliding-window tile
    num_classes: int  # network output channels, background (0) included
    # One entry per input channel.
    channels: tuple[Normalization, ...] = (Normalization(),)
    framework: Framework = "v1"
    # Closest canonical RAS before anything else (the published models; nnU-Net v2's
    # NibabelIOWithReorient). False: the voxel array as stored (SimpleITKIO, NibabelIO).
    reorient: bool = True
    # nnU-Net's transpose_forward: network axis a is axis transpose[a] of the (z, y, x) image.
    transpose: tuple[int, int, int] = (0, 1, 2)
    # Axes of the network array that test-time mirroring may flip (v2 checkpoints name them).
    mirror_axes: tuple[int, ...] = (0, 1, 2)

    def __post_init__(self) -> None:
        if sorted(self.transpose) != [0, 1, 2]:
            raise ValueError(f"transpose must be a permutation of (0, 1, 2), got {self.transpose}")
        if not self.channels:
            raise ValueError("a plan needs at least one input channel")
        if self.framework not in ("v1", "v2"):
            raise ValueError(f"framework must be 'v1' or 'v2', got {self.framework!r}")

    @property
    def in_channels(self) -> int:
        return len(self.channels)


PLAN = Plan(
    target_spacing=(1.5, 1.5, 1.5),
    patch_size=(128, 128, 128),
    num_classes=105,
    # Per image: (x - mean) / (std + 1e-8) over all voxels, no clipping (the plan's "nonCT"
    # scheme, as the TotalSegmentator task was planned).
    channels=(Normalization("zscore"),),
)
