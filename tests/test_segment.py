"""segment(): geometry round trips with a known labelling, and equivalence with the original path."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import reference_pipeline
from fabricate import oracle_for, tiny_network

from stuseg.images.io import read_image
from stuseg.inference.pipeline import segment


def label_phantom(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    """Asymmetric blobs with labels 1..6 in a -1000 background: any flip or shift shows."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")).astype(float)
    lab = np.zeros(shape, np.uint8)
    for value in range(1, 7):
        centre = rng.uniform(0.2, 0.8, 3) * np.array(shape)
        radii = rng.uniform(0.12, 0.25, 3) * np.array(shape)
        inside = (((grid - centre[:, None, None, None]) / radii[:, None, None, None]) ** 2).sum(0) < 1
        lab[inside] = value
    lab[: shape[0] // 3, : shape[1] // 4, :] = 7  # a corner block breaks every symmetry
    return lab


def phantom_image(shape, affine) -> tuple[np.ndarray, nib.Nifti1Image]:
    lab = label_phantom(shape)
    ct = np.where(lab > 0, 100.0 * lab + 30, -1000.0).astype(np.float32)
    img = nib.Nifti1Image(ct, affine)
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=2)
    return lab, img


def _affine(axes: tuple[int, int, int], signs: tuple[int, int, int], zooms=(1.5, 1.5, 1.5), angle=0.0):
    aff = np.zeros((4, 4))
    aff[3, 3] = 1
    for i, (a, s) in enumerate(zip(axes, signs)):
        aff[a, i] = s * zooms[i]
    c, s = np.cos(angle), np.sin(angle)
    rot = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    aff[:3, :3] = rot @ aff[:3, :3]
    aff[:3, 3] = [-30.5, 12.25, 100.0]
    return aff


ISO_CASES = {
    "RAS": _affine((0, 1, 2), (1, 1, 1)),
    "LPS": _affine((0, 1, 2), (-1, -1, 1)),
    "PIL": _affine((1, 0, 2), (-1, 1, -1)),
    "SAR": _affine((2, 1, 0), (1, 1, -1)),
    "oblique": _affine((0, 1, 2), (-1, 1, 1), angle=np.deg2rad(12)),
}


def _save(img: nib.Nifti1Image, tmp_path: Path, name: str = "ct.nii.gz") -> Path:
    path = tmp_path / name
    nib.save(img, path)
    return path


@pytest.mark.parametrize("orientation", list(ISO_CASES))
@pytest.mark.parametrize("fast", [False, True])
def test_known_labelling_comes_back_exactly_on_the_input_grid(tmp_path, orientation, fast) -> None:
    """1.5 mm voxels: no resampling, so every voxel must come back where it was, in any orientation."""
    affine = ISO_CASES[orientation]
    lab, img = phantom_image((41, 37, 29), affine)
    path = _save(img, tmp_path)
    oracle = oracle_for(np.asarray(img.dataobj, np.float32), affine)
    seg = segment(path, model=oracle, fast=fast, device="cpu")
    np.testing.assert_array_equal(seg.labels, lab)
    out = seg.image
    assert out.shape == img.shape and out.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(out.header.get_qform(), img.header.get_qform())
    np.testing.assert_array_equal(out.header.get_sform(), img.header.get_sform())
    assert (int(out.header["qform_code"]), int(out.header["sform_code"])) == (1, 2)
    np.testing.assert_array_equal(out.affine, img.header.get_best_affine())  # the image carries it too


def test_several_tiles_and_odd_sizes(tmp_path) -> None:
    """Larger than the patch along one axis (two tiles, Gaussian weighting) and odd elsewhere."""
    affine = ISO_CASES["LPS"]
    lab, img = phantom_image((150, 23, 31), affine)
    path = _save(img, tmp_path)
    oracle = oracle_for(np.asarray(img.dataobj, np.float32), affine)
    np.testing.assert_array_equal(segment(path, model=oracle, device="cpu").labels, lab)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("zooms", "shape"), [((0.75, 0.75, 3.0), (60, 56, 13)), ((2.0, 0.9, 1.2), (30, 61, 47))]
)
@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize("orientation", ["RAS", "PIL", "oblique LPI"])
def test_anisotropic_inputs_match_the_reference_in_any_orientation(
    tmp_path, zooms, shape, fast, orientation
) -> None:
    """Resampling on: the result equals the reference path run on the canonical image, mapped back."""
    axes, signs, angle = {
        "RAS": ((0, 1, 2), (1, 1, 1), 0.0),
        "PIL": ((1, 0, 2), (-1, 1, -1), 0.0),
        "oblique LPI": ((0, 1, 2), (-1, -1, -1), np.deg2rad(20)),
    }[orientation]
    affine = _affine(axes, signs, zooms, angle)
    lab, img = phantom_image(shape, affine)
    oracle = oracle_for(np.asarray(img.dataobj, np.float32), affine)
    got = segment(_save(img, tmp_path), model=oracle, fast=fast, device="cpu").labels
    expect, _ = reference_pipeline.segment_image(img, oracle, fast, tta=False)
    assert got.shape == lab.shape
    assert (got == expect).mean() >= 0.999
    assert (got == lab).mean() > 0.9  # and it is the phantom, blurred at the boundaries


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "zooms", "shape", "fast", "tta"),
    [
        ("separate-z normal", (0.8, 0.7, 2.6), (140, 70, 17), False, False),
        ("separate-z fast", (0.8, 0.7, 2.6), (140, 70, 17), True, False),
        ("near-isotropic normal", (1.2, 1.0, 1.1), (37, 51, 30), False, False),
        ("near-isotropic fast tta", (1.2, 1.0, 1.1), (37, 51, 30), True, True),
    ],
)
def test_agrees_with_a_plain_restatement_of_the_original(tmp_path, name, zooms, shape, fast, tta) -> None:
    """Same weights, RAS input: stuseg's streaming pipeline vs the whole-volume reference path."""
    rng = np.random.default_rng(7)
    data = rng.normal(0, 200, shape).astype(np.float32)
    data[:3] = 0  # a zero border to crop
    affine = np.diag([*zooms, 1.0])
    img = nib.Nifti1Image(data, affine)
    path = _save(img, tmp_path)
    net = tiny_network()
    expect = reference_pipeline.segment(data, zooms, net, fast=fast, tta=tta)
    got = segment(path, model=net, fast=fast, tta=tta, device="cpu").labels
    assert len(np.unique(expect)) > 3  # a meaningful labelling, not one class
    agreement = (got == expect).mean()
    assert agreement >= 0.999, f"{name}: {agreement:.5f}"


def test_roi_subset_keeps_only_selected_structures(tmp_path) -> None:
    lab, img = phantom_image((30, 28, 26), ISO_CASES["RAS"])
    path = _save(img, tmp_path)
    oracle = oracle_for(np.asarray(img.dataobj, np.float32), ISO_CASES["RAS"])
    # Labels 1..7 are adrenal_gland_left .. femur_left... in model order; keep 2 of them.
    seg = segment(path, model=oracle, roi_subset=["adrenal_gland_right", "CLAVICULA_*"], device="cpu")
    assert seg.names == {2: "adrenal_gland_right", 7: "clavicula_left", 8: "clavicula_right"}
    np.testing.assert_array_equal(seg.labels, np.where(np.isin(lab, [2, 7]), lab, 0))


def test_volume_input_and_nan_warning(tmp_path) -> None:
    lab, img = phantom_image((30, 28, 26), ISO_CASES["RAS"])
    data = np.asarray(img.dataobj, np.float32).copy()
    oracle = oracle_for(data, ISO_CASES["RAS"])
    data[0, 0, 0] = np.nan
    path = _save(nib.Nifti1Image(data, ISO_CASES["RAS"]), tmp_path)
    volume = read_image(path)
    with pytest.warns(UserWarning, match="NaN"):
        seg = segment(volume, model=oracle, device="cpu")
    assert (seg.labels == lab).mean() > 0.999


def test_non_ct_intensities_warn(tmp_path, make_nifti: Callable[..., Path]) -> None:
    path = make_nifti(data=np.random.default_rng(0).uniform(0, 255, (20, 20, 20)).astype(np.float32))
    with pytest.warns(UserWarning, match="not be a CT"):
        segment(path, model=tiny_network(), device="cpu", fast=True)
