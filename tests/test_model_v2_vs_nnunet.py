"""A fine-tuned nnU-Net v2 model folder run by stuseg agrees with nnU-Net v2's own predictor.

The oracle is nnU-Net 2.8.1 itself (``tests/nnunet_oracle.py``: its reader, preprocessing,
sliding window and export, driven through ``manual_initialization``) on the same folder, folds
and real CT. Each case differs from the published plan in spacing, patch, class count and
normalisation, and adds one thing the published path never meets: an input stored in LPS with
thick slices, a transposed plan whose export picks another low-resolution axis than its
preprocessing, restricted mirroring, a masked z-score, two channels, the older plans format with
nibabel's reorienting reader. Voxels where nnU-Net's own label depends on its float16 tile sums
(the oracle's doubt map) are left out; at least 99.9% of the rest must be equal.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import torch
from model_folders import write_v2_folder
from nnunet_oracle import nnunet_v2_predict
from scipy import ndimage

from stuseg import segment
from stuseg.model.network import Arch, build_network

DATA = Path(__file__).parent / "data"
DIMS = (4, 8, 16, 32, 64, 64)


@dataclass(frozen=True)
class Case:
    """One model folder and input: plan facts in nnU-Net's (z, y, x) order."""

    image: str  # a file in tests/data, or "abdomen_thick_x" / "two_channels" (made below)
    spacing: tuple[float, float, float]
    patch: tuple[int, int, int]
    strides: tuple[tuple[int, int, int], ...]
    labels: tuple[str, ...]
    channels: tuple[str, ...] = ("CT",)
    normalization: tuple[str, ...] | None = None
    use_mask: tuple[bool, ...] | None = None
    transpose: tuple[int, int, int] = (0, 1, 2)
    mirror_axes: tuple[int, ...] = (0, 1, 2)
    folds: tuple[str, ...] = ("0",)
    reader: str = "SimpleITKIO"
    old_plans_format: bool = False
    options: Mapping[str, Any] = field(default_factory=dict)


S = (1, 1, 1)
CASES = {
    # LPS storage, 5 mm slices (separate z), CT normalisation, four classes, two folds averaged.
    "lps-thick-ct-two-folds": Case(
        "chest_ct_5mm_small_fov.nii.gz",
        spacing=(3.0, 2.0, 2.0),
        patch=(32, 48, 48),
        strides=(S, (1, 2, 2), (2, 2, 2), (2, 2, 2), (1, 2, 2), S),
        labels=("lung", "heart", "bone"),
        folds=("0", "1"),
    ),
    # A plan with a transpose and an anisotropic target: preprocessing resamples the input's thick
    # axis on its own, the export the network's; mirroring allowed on two axes; masked z-score.
    "transposed-plan-masked-zscore": Case(
        "abdomen_thick_x",
        spacing=(3.6, 1.0, 1.0),
        patch=(16, 48, 64),
        strides=(S, (1, 2, 2), (2, 2, 2), (2, 2, 2), (1, 2, 2), S),
        labels=("organ", "vessel"),
        channels=("MR",),
        use_mask=(True,),
        transpose=(2, 0, 1),
        mirror_axes=(1, 2),
    ),
    # Two channels (a CT and a second image on its grid), CT + z-score normalisation.
    "two-channels": Case(
        "two_channels",
        spacing=(3.0, 3.0, 3.0),
        patch=(32, 32, 32),
        strides=(S, (2, 2, 2), (2, 2, 2), (2, 2, 2), S, S),
        labels=("liver", "spleen", "kidney", "lesion"),
        channels=("CT", "PET"),
    ),
    # The 2.2 fork's plans format, nibabel's reorienting reader, a 1.5 mm LPS chest at 2.5 mm.
    "old-plans-reorienting-reader": Case(
        "chest_ct_1p5mm_lps.nii.gz",
        spacing=(2.5, 2.5, 2.5),
        patch=(48, 48, 48),
        strides=(S, (2, 2, 2), (2, 2, 2), (2, 2, 2), (2, 2, 2), S),
        labels=("a", "b"),
        reader="NibabelIOWithReorient",
        old_plans_format=True,
    ),
}


def _state_dict(arch: Arch, seed: int) -> dict[str, torch.Tensor]:
    """PyTorch's default initialisation with the heads' biases at zero: the class then follows the
    features, which vary over the image, so every class wins somewhere (random biases let one
    class win almost everywhere)."""
    torch.manual_seed(seed)
    net = build_network(arch)
    with torch.no_grad():
        for head in net.seg_outputs:
            head.bias.zero_()
    return net.state_dict()


def _images(case: Case, tmp: Path) -> list[Path]:
    """The case's input channels as NIfTI files nnU-Net names them (case_0000, case_0001, ...)."""
    if case.image == "abdomen_thick_x":
        # A 60^3 block of the 3 mm abdomen, declared with 3.6 mm voxels along NIfTI i (x).
        img = nib.load(DATA / "abdomen_ct_3mm.nii.gz")
        data = np.asarray(img.dataobj)[30:90, 20:80, 26:86].astype(np.float32)
        arrays, affine = [data], np.diag([3.6, 1.0, 1.0, 1.0])
    elif case.image == "two_channels":
        img = nib.load(DATA / "abdomen_ct_3mm.nii.gz")
        ct = np.asarray(img.dataobj).astype(np.float32)
        # A smooth positive second image, as a PET would be, zero where the CT is air.
        pet = ndimage.gaussian_filter(np.clip(ct + 200, 0, None), 3) * (ct > -800)
        arrays, affine = [ct, pet.astype(np.float32)], img.affine
    else:
        img = nib.load(DATA / case.image)
        arrays, affine = [np.asarray(img.dataobj).astype(np.float32)], img.affine
    paths = []
    for c, array in enumerate(arrays):
        path = tmp / f"case_{c:04d}.nii.gz"
        nib.save(nib.Nifti1Image(array, affine), path)
        paths.append(path)
    return paths


def _folder(case: Case, tmp: Path) -> Path:
    arch = Arch(DIMS, (1,) * 6, case.strides[1:], len(case.channels), len(case.labels) + 1)
    states = {fold: _state_dict(arch, seed=i) for i, fold in enumerate(case.folds)}
    return write_v2_folder(
        tmp / "models",
        states[case.folds[0]],
        fold_states=states,
        spacing=case.spacing,
        patch_size=case.patch,
        strides=case.strides,
        labels=case.labels,
        channel_names=case.channels,
        folds=case.folds,
        normalization=case.normalization,
        use_mask=case.use_mask,
        transpose=case.transpose,
        mirror_axes=case.mirror_axes,
        reader=case.reader,
        old_plans_format=case.old_plans_format,
    )


def _oracle_grid(labels_ijk: np.ndarray, affine: np.ndarray, reader: str) -> np.ndarray:
    """stuseg's label map (NIfTI i, j, k) in the array order nnU-Net's reader gives the image."""
    if reader == "NibabelIOWithReorient":
        ornt = nib.orientations.io_orientation(affine)
        labels_ijk = nib.orientations.apply_orientation(labels_ijk, ornt)
    return labels_ijk.transpose(2, 1, 0)


def _agreement(ours: np.ndarray, theirs: np.ndarray, doubt: np.ndarray) -> tuple[float, float]:
    """(share of equal voxels outside the doubt map, share of voxels in doubt)."""
    sure = ~doubt
    return float((ours[sure] == theirs[sure]).mean()), float(doubt.mean())


def _run(case: Case, tmp: Path, *, tta: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, Path, list[Path]]:
    folder = _folder(case, tmp)
    images = _images(case, tmp)
    theirs, doubt = nnunet_v2_predict(folder, images, folds=case.folds, mirror=tta)
    seg = segment(images if len(images) > 1 else images[0], model=folder, device="cpu", tta=tta)
    ours = _oracle_grid(seg.labels, nib.load(images[0]).affine, case.reader)
    return ours, theirs, doubt, folder, images


@pytest.mark.parametrize("name", list(CASES))
def test_stuseg_equals_nnunet_v2_on_a_model_folder(name: str, tmp_path: Path) -> None:
    case = CASES[name]
    ours, theirs, doubt, _, _ = _run(case, tmp_path, tta=False)
    assert ours.shape == theirs.shape
    equal, in_doubt = _agreement(ours, theirs, doubt)
    # A decisive comparison: several classes present in the reference, little left out.
    present = np.unique(theirs[~doubt])
    assert len(present) >= 3, f"{name}: the reference has only labels {present}; weights not decisive"
    assert in_doubt < 0.01, f"{name}: {in_doubt:.2%} of voxels in doubt"
    assert equal >= 0.999, f"{name}: {equal:.4%} of voxels equal outside the doubt map"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["lps-thick-ct-two-folds", "transposed-plan-masked-zscore"])
def test_stuseg_equals_nnunet_v2_with_mirroring(name: str, tmp_path: Path) -> None:
    ours, theirs, doubt, _, _ = _run(CASES[name], tmp_path, tta=True)
    equal, in_doubt = _agreement(ours, theirs, doubt)
    assert in_doubt < 0.01
    assert equal >= 0.999, f"{name} with mirroring: {equal:.4%} of voxels equal"


def _names(labels: Sequence[str]) -> dict[int, str]:
    return {i + 1: n for i, n in enumerate(labels)}


def test_the_model_folder_names_its_structures(tmp_path: Path) -> None:
    case = CASES["two-channels"]
    folder = _folder(case, tmp_path)
    images = _images(case, tmp_path)
    seg = segment(images, model=folder, device="cpu", fast=True)
    assert seg.names == _names(case.labels)
    assert seg.image.shape == nib.load(images[0]).shape
    np.testing.assert_allclose(seg.image.affine, nib.load(images[0]).affine, atol=1e-5)
