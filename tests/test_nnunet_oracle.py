"""The nnU-Net v2 oracle itself (tests/nnunet_oracle.py), on a tiny hand-built v2 model folder.

nnunetv2 is a test dependency (the ``finetune`` extra in ``test``): a missing nnunetv2 fails
here at import, on purpose, instead of skipping.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from model_folders import write_v2_folder
from nnunet_oracle import (
    folder_predictor,
    make_predictor,
    nnunet_v2_predict,
    predict_case,
    stunet_from_state_dict,
)
from torch import nn

from stuseg.model.network import Arch, STUNet

# The input: 40 x 48 x 56 voxels (NIfTI x, y, z) at 1.5 x 1.5 x 3 mm; nnU-Net sees it as (z, y, x).
SHAPE_XYZ = (40, 48, 56)
ZOOMS_XYZ = (1.5, 1.5, 3.0)
# Plans in nnU-Net's (z, y, x) order: a patch divisible by the strides' products (8, 16, 16).
PATCH = (32, 48, 48)
STRIDES = ((1, 1, 1), (1, 2, 2), (2, 2, 2), (2, 2, 2), (2, 2, 2), (1, 1, 1))
ARCH = Arch(dims=(4, 8, 16, 32, 64, 64), depths=(1,) * 6, strides=STRIDES[1:], in_channels=1, num_classes=3)
LABELS = ("background", "soft_tissue", "bright")
# The CT normalisation's statistics: z = (clip(HU, -1000, 1500) - 0) / 300.
INTENSITY = {
    "mean": 0.0,
    "std": 300.0,
    "percentile_00_5": -1000.0,
    "percentile_99_5": 1500.0,
    "min": -1024.0,
    "max": 3000.0,
    "median": 40.0,
}


def _state_dict(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    net = STUNet(ARCH)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.3)  # varied logits, so that every class wins somewhere
    return net.state_dict()


@pytest.fixture
def case(make_nifti: Callable[..., Path]) -> Path:
    return make_nifti(SHAPE_XYZ, affine=np.diag([*ZOOMS_XYZ, 1.0]), name="case_0000.nii.gz")


def _folder(root: Path, spacing_zyx: tuple[float, float, float]) -> Path:
    return write_v2_folder(
        root,
        _state_dict(0),
        labels=LABELS[1:],
        spacing=spacing_zyx,
        patch_size=PATCH,
        strides=STRIDES,
        plans_changes={"foreground_intensity_properties_per_channel": {"0": INTENSITY}},
    )


def test_the_network_is_the_checkpoint_s_stunet() -> None:
    net = stunet_from_state_dict(_state_dict(0), [list(s) for s in STRIDES])
    assert net.arch == ARCH
    # Fewer strides in the plans than stages: padded with [1, 1, 1]; more: cut.
    padded = stunet_from_state_dict(_state_dict(0), STRIDES[:4]).arch.strides
    assert padded == (*STRIDES[1:4], (1, 1, 1), (1, 1, 1))
    assert stunet_from_state_dict(_state_dict(0), [*STRIDES, (2, 2, 2)]).arch == ARCH


def test_labels_on_the_input_grid_and_mirroring_counts(case: Path, tmp_path: Path) -> None:
    """A grid nnU-Net resamples to and from (2 mm), one fold: labels on SimpleITK's (z, y, x)
    grid, all three classes, little doubt; mirroring (8 passes per tile) changes labels. Tiles
    without overlap (step 1) to keep it quick; the next test has the default step."""
    folder = _folder(tmp_path / "model", (2.0, 2.0, 2.0))
    modules = set(sys.modules)
    labels, doubt = nnunet_v2_predict(folder, [case], step_size=1.0)
    # The trainer lookup by name is never taken: it would import timm and torchvision.
    assert not {m.split(".")[0] for m in set(sys.modules) - modules} & {"timm", "torchvision"}

    assert labels.shape == SHAPE_XYZ[::-1] == doubt.shape
    assert doubt.dtype == bool
    assert set(np.unique(labels)) == {0, 1, 2}
    assert doubt.mean() < 0.01

    mirrored, mirrored_doubt = nnunet_v2_predict(folder, [case], mirror=True, step_size=1.0)
    differ = (mirrored != labels) & ~doubt & ~mirrored_doubt
    assert differ.mean() > 0.001


def test_the_steps_are_predict_single_npy_array(case: Path, tmp_path: Path) -> None:
    """predict_case takes predict_single_npy_array's steps one by one: the same labels."""
    folder = _folder(tmp_path / "model", (2.0, 2.0, 2.0))
    predictor = folder_predictor(folder)
    labels, _ = predict_case(predictor, [case])
    data, properties = predictor.plans_manager.image_reader_writer_class().read_images([str(case)])
    assert np.array_equal(predictor.predict_single_npy_array(data, properties), labels)


class PiecewiseLinear(nn.Module):
    """Logits (-z, 0, z - 1) of the normalised intensity z, voxel by voxel: class 0 below z = 0,
    1 up to z = 1, 2 above. Tiles, Gaussian weights and mirroring average identical values."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([-x, torch.zeros_like(x), x - 1], dim=1)


def test_labels_match_a_hand_computation(case: Path, tmp_path: Path) -> None:
    """On the input's own spacing nnU-Net neither crops (air is not zero) nor resamples, so its
    label is argmax(-z, 0, z - 1) of z = clip(HU, p0.5, p99.5) / 300, on the NIfTI array
    transposed; only float16 rounding, which the doubt map marks, may decide otherwise."""
    folder = _folder(tmp_path / "model", ZOOMS_XYZ[::-1])
    predictor = make_predictor(folder, PiecewiseLinear(), [{}], (0, 1, 2), mirror=True)
    labels, doubt = predict_case(predictor, [case])

    hu = np.asarray(nib.load(case).dataobj, np.float32).T
    z = (np.clip(hu, INTENSITY["percentile_00_5"], INTENSITY["percentile_99_5"]) - INTENSITY["mean"]) / 300
    by_hand = np.argmax(np.stack([-z, np.zeros_like(z), z - 1]), axis=0)
    assert set(np.unique(by_hand)) == {0, 1, 2}
    assert np.array_equal(labels[~doubt], by_hand[~doubt])
    assert 0 < doubt.mean() < 0.01
    # The doubt map is where the hand's logits are within 0.2 % too (z near 0 or near 1).
    near = np.minimum(np.abs(z), np.abs(z - 1))
    assert near[doubt].max() < 0.01
