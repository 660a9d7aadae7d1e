"""Every geometry a scanner or a crop produces, against a whole-volume restatement of the original.

A deterministic grid: shapes from a single slice and fewer voxels than one tile to more than one
row of tiles on every axis; spacings from 0.5 to 10 mm with each axis in turn the thick one
(spacing ratios below and above the separate-z threshold of 3, and two axes sharing the largest
spacing, where there is no separate axis); RAS, LPS, permuted and oblique affines; normal and
fast exports, each with and without mirror TTA; tile steps 0.5 and 1; one to three tiles per
forward pass; a zero border to crop on some.

To run in seconds, the pipeline runs with a small plan (tiles of 16 x 24 x 32 voxels, 6 classes)
and a two-layer random convolution network: the geometry code (reorientation, crop, resampling,
tiling, the streaming export, the way back) is the same for every plan, and a tile that differs
along each axis also catches two axes mixed up. ``test_segment.py`` and the thick-slice tests
check the published plan (128^3 tiles, 105 classes) with a real STU-Net.

Oracle: ``reference_pipeline`` (whole volumes, scipy, channels first, nothing shared with
stuseg) on nibabel's closest-canonical image, mapped back to the input's axes by nibabel; the
label map must be on the exact input grid and agree on at least 99.9% of the voxels. A failing
case is named by its geometry (the test id) and prints it.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import reference_pipeline
import torch
from test_predict_cli import assert_same_grid

from stuseg.errors import InputError, LabelError
from stuseg.inference.pipeline import Segmenter, segment
from stuseg.inference.preprocess import SEPARATE_Z_THRESHOLD
from stuseg.model.plan import Plan

PLAN = Plan(target_spacing=(1.5, 1.5, 1.5), patch_size=(16, 24, 32), num_classes=6)
# The tile's extent along each input axis of a RAS image: (i, j, k) = (x, y, z) of the (z, y, x) patch.
TILE_IJK = PLAN.patch_size[::-1]


class SweepNet(torch.nn.Module):
    """Two random 3x3x3 convolutions: logits that change from voxel to voxel and with every flip."""

    def __init__(self, classes: int = PLAN.num_classes, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv1 = torch.nn.Conv3d(1, 8, 3, padding=1)
        self.conv2 = torch.nn.Conv3d(8, classes, 3, padding=1)
        with torch.no_grad():
            for p in self.parameters():
                p.normal_(0, 0.8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(torch.tanh(self.conv1(x)))


@dataclass(frozen=True)
class Case:
    shape: tuple[int, int, int]  # input voxels (i, j, k)
    zooms: tuple[float, float, float]  # mm along i, j, k
    orientation: str
    mode: str  # normal, fast, tta (normal with TTA) or fast-tta
    step: float
    zero_border: bool
    batch: int = 1  # tiles per forward pass

    @property
    def name(self) -> str:
        dims = "x".join(map(str, self.shape))
        mm = "x".join(f"{z:g}" for z in self.zooms)
        crop = "-crop" if self.zero_border else ""
        batch = f"-batch{self.batch}" if self.batch > 1 else ""
        return f"{dims}@{mm}mm-{self.orientation}-{self.mode}-step{self.step:g}{batch}{crop}"

    @property
    def fast(self) -> bool:
        return self.mode.startswith("fast")

    @property
    def tta(self) -> bool:
        return self.mode.endswith("tta")


# Voxel sizes (i, j, k): isotropic fine and coarse (linear export that shrinks an axis 2x and 3.3x),
# each axis in turn thick below and above the threshold, very thick (10 mm), two thick axes
# sharing the maximum (no separate axis), and thin slices just above the threshold.
SPACINGS: list[tuple[float, float, float]] = [
    (0.8, 0.8, 0.8),
    (3.0, 3.0, 3.0),
    (5.0, 5.0, 5.0),
    (1.0, 1.0, 2.5),
    (1.0, 1.0, 3.5),
    (1.25, 1.25, 5.0),
    (0.5, 0.5, 10.0),
    (5.0, 1.25, 1.25),
    (0.8, 7.5, 0.8),
    (10.0, 0.9, 1.1),
    (5.0, 5.0, 1.0),
    (10.0, 10.0, 0.5),
    (0.6, 1.1, 2.2),
    (0.5, 0.5, 1.6),
]
# Extent along an axis at the target spacing, in tiles: a single input slice, less than one tile,
# two tiles, more than two (several rows at step 0.5).
EXTENTS = ("slice", 0.6, 1.4, 2.6)
ORIENTATIONS = ("RAS", "LPS", "PIL", "oblique")
MODES = ("normal", "fast", "tta", "fast-tta")


def _input_shape(zooms: tuple[float, ...], pick: tuple[object, ...]) -> tuple[int, int, int]:
    shape = []
    for zoom, tile, extent in zip(zooms, TILE_IJK, pick):
        if extent == "slice":
            shape.append(1)
        else:
            shape.append(max(2, round(float(extent) * tile * PLAN.target_spacing[0] / zoom)))
    return tuple(shape)  # type: ignore[return-value]


def _cases() -> list[Case]:
    """Each spacing four times, with the extents, orientations, modes and steps cycled through so that
    every extent meets every axis and every mode meets every orientation and spacing kind."""
    extent_picks = [p for p in itertools.product(EXTENTS, repeat=3) if p.count("slice") <= 1]
    rng = np.random.default_rng(19)
    order = rng.permutation(len(extent_picks))
    cases = []
    for n, (zooms, _) in enumerate(itertools.product(SPACINGS, range(4))):
        pick = extent_picks[order[n % len(order)]]
        cases.append(
            Case(
                shape=_input_shape(zooms, pick),
                zooms=zooms,
                orientation=ORIENTATIONS[n % len(ORIENTATIONS)],
                mode=MODES[(n + n // len(ORIENTATIONS)) % len(MODES)],
                step=(0.5, 1.0)[(n // 3) % 2],
                zero_border=n % 5 == 2,
                batch=1 + n % 3,
            )
        )
    # Every extent on every axis at least once, in a case that also has a thick axis.
    for axis, extent in itertools.product(range(3), EXTENTS):
        pick = [0.6, 1.4, 0.6]
        pick[axis] = extent
        zooms = [1.2, 1.2, 1.2]
        zooms[(axis + 1) % 3] = 5.0
        cases.append(
            Case(
                shape=_input_shape(tuple(zooms), tuple(pick)),
                zooms=tuple(zooms),  # type: ignore[arg-type]
                orientation=ORIENTATIONS[(axis + EXTENTS.index(extent)) % len(ORIENTATIONS)],
                mode="normal",
                step=0.5,
                zero_border=False,
            )
        )
    return cases


CASES = _cases()


def affine_for(case: Case) -> np.ndarray:
    """Voxel-to-world matrix: the orientation's axes and signs, the voxel sizes, an offset origin."""
    axes, signs = {
        "RAS": ((0, 1, 2), (1, 1, 1)),
        "LPS": ((0, 1, 2), (-1, -1, 1)),
        "PIL": ((1, 0, 2), (-1, 1, -1)),
        "oblique": ((0, 1, 2), (-1, 1, 1)),
    }[case.orientation]
    aff = np.eye(4)
    aff[:3, :3] = 0
    for i, (a, s) in enumerate(zip(axes, signs)):
        aff[a, i] = s * case.zooms[i]
    if case.orientation == "oblique":  # 14 degrees about one axis, 9 about another
        for angle, (p, q) in ((14, (0, 1)), (9, (1, 2))):
            c, s = np.cos(np.deg2rad(angle)), np.sin(np.deg2rad(angle))
            rot = np.eye(3)
            rot[[p, p, q, q], [p, q, p, q]] = [c, -s, s, c]
            aff[:3, :3] = rot @ aff[:3, :3]
    aff[:3, 3] = [-40.25, 17.5, 96.0]
    return aff


def ct_like(shape: tuple[int, int, int], zero_border: bool, seed: int = 0) -> np.ndarray:
    """Air at -1000 around an off-centre body with bright blobs and noise; optionally zero margins
    of unequal widths on some sides (a reconstruction's padding), which the pipeline crops."""
    rng = np.random.default_rng(seed)
    grid = np.stack(
        np.meshgrid(*[np.linspace(-1, 1, n) if n > 1 else np.zeros(1) for n in shape], indexing="ij")
    )
    vol = np.full(shape, -1000.0, np.float32)
    body = ((grid[0] - 0.1) ** 2 + (grid[1] + 0.15) ** 2) < 0.75
    vol[body] = 40.0
    for _ in range(5):
        centre = rng.uniform(-0.6, 0.6, 3)
        radius = rng.uniform(0.15, 0.4)
        vol[(((grid - centre[:, None, None, None]) ** 2).sum(0) < radius**2) & body] = rng.uniform(100, 900)
    vol += rng.normal(0, 25, shape).astype(np.float32)
    if zero_border:
        for axis, n in enumerate(shape):
            if n >= 6:
                index = [slice(None)] * 3
                index[axis] = slice(0, 1 + axis)
                vol[tuple(index)] = 0
                index[axis] = slice(n - 2, n)
                vol[tuple(index)] = 0
    return vol


def test_the_grid_covers_what_it_promises() -> None:
    """Thick axes on each of i, j, k above and below the threshold; every extent on every axis."""
    thick_above = {
        int(np.argmax(c.zooms)) for c in CASES if max(c.zooms) / min(c.zooms) > SEPARATE_Z_THRESHOLD
    }
    thick_below = {
        int(np.argmax(c.zooms)) for c in CASES if 1 < max(c.zooms) / min(c.zooms) <= SEPARATE_Z_THRESHOLD
    }
    assert thick_above == {0, 1, 2} and thick_below
    assert min(min(c.zooms) for c in CASES) == 0.5 and max(max(c.zooms) for c in CASES) == 10.0
    for axis in range(3):
        assert any(c.shape[axis] == 1 for c in CASES)
        assert any(c.shape[axis] * c.zooms[axis] / 1.5 > 2 * TILE_IJK[axis] for c in CASES)
    assert {c.mode for c in CASES} == set(MODES) and {c.step for c in CASES} == {0.5, 1.0}
    assert {c.orientation for c in CASES} == set(ORIENTATIONS)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_geometry_matches_the_whole_volume_reference(tmp_path: Path, case: Case) -> None:
    affine = affine_for(case)
    img = nib.Nifti1Image(ct_like(case.shape, case.zero_border), affine)
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)
    path = tmp_path / "ct.nii.gz"
    nib.save(img, path)
    net = SweepNet()
    seg = segment(
        path,
        model=net,
        plan=PLAN,
        fast=case.fast,
        tta=case.tta,
        step_size=case.step,
        batch_size=case.batch,
        device="cpu",
    )
    got = seg.labels
    # The exact input grid: shape, both matrices and their codes.
    assert got.shape == case.shape, case.name
    assert_same_grid(seg.image, img.header)
    np.testing.assert_array_equal(seg.image.affine, img.header.get_best_affine())
    expect, doubt = reference_pipeline.segment_image(
        img,
        net,
        fast=case.fast,
        tta=case.tta,
        step=case.step,
        target=PLAN.target_spacing,
        patch=PLAN.patch_size,
        classes=PLAN.num_classes,
    )
    decided = ~doubt
    assert decided.mean() > 0.95, f"{case.name}: rounding decides {doubt.mean():.3f} of the voxels"
    agreement = float((got == expect)[decided].mean())
    assert agreement >= 0.999, (
        f"{case.name}: {agreement:.5f} of the voxels that rounding does not decide agree with the reference"
    )


def test_a_plan_of_other_classes_names_them_and_selects_from_its_own_names(tmp_path: Path) -> None:
    path = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(ct_like((20, 24, 12), False), np.diag([1.5, 1.5, 1.5, 1.0])), path)
    seg = segment(path, model=SweepNet(), plan=PLAN, device="cpu")
    assert seg.names == {i: f"class_{i}" for i in range(1, PLAN.num_classes)}
    with pytest.raises(LabelError) as exc:
        Segmenter(model=SweepNet(), plan=PLAN, roi_subset=["liver"])
    assert str(exc.value) == (
        "unknown structure 'liver'; the model's structures are 'class_1', 'class_2', 'class_3', "
        "'class_4', 'class_5'"
    )
    assert Segmenter(model=SweepNet(), plan=PLAN, roi_subset=["class_2,CLASS_4"], device="cpu").keep == [2, 4]
    with pytest.raises(InputError, match="a plan needs 2 to 256 classes"):
        Segmenter(model=SweepNet(), plan=Plan((1.5,) * 3, (16, 16, 16), 300))


def test_a_batch_prepares_each_case_for_the_segmenter_s_plan(tmp_path: Path) -> None:
    """The batch's reading stage resamples to the model's plan, not to the published one."""
    from stuseg import batch

    case = CASES[5]  # 5 mm slices: a target spacing taken from the wrong plan would show at once
    affine = affine_for(case)
    path = tmp_path / "thick.nii.gz"
    nib.save(nib.Nifti1Image(ct_like(case.shape, False), affine), path)
    plan = Plan((2.0, 1.2, 1.2), PLAN.patch_size, PLAN.num_classes)
    segmenter = Segmenter(model=SweepNet(), plan=plan, device="cpu")
    (result,) = batch.run(batch.discover([path]).cases, segmenter, tmp_path / "out", multilabel=True)
    assert result.status == "ok", result.error
    written = np.asarray(nib.load(tmp_path / "out" / "thick.nii.gz").dataobj)
    np.testing.assert_array_equal(written, segment(path, model=SweepNet(), plan=plan, device="cpu").labels)
    assert not np.array_equal(written, segment(path, model=SweepNet(), plan=PLAN, device="cpu").labels)
