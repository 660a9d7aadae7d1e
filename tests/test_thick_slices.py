"""Thick slices and a small field of view with the published plan (128^3 tiles, 105 classes).

Where the low-resolution (separate-z) axis is also the one the sliding window streams along (the
longest at 1.5 mm, as in a 5 mm scan of a small field of view), the default export once failed
with a broadcast error. These are the inputs that failed, a real thick-slice CT made from a
scan in ``tests/data``, and the command line on it. Oracle: ``reference_pipeline``, the
whole-volume restatement of the original path, on the same weights.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import reference_pipeline
from conftest import DATA, make_ct_array
from fabricate import oracle_for, small_checkpoint, tiny_network
from test_predict_cli import assert_same_grid

from stuseg.inference.pipeline import segment
from stuseg.results.outputs import MARKER
from stuseg.structures import labels

THICK_CT = DATA / "chest_ct_5mm_small_fov.nii.gz"

# (x, y, z) voxels and mm of the inputs that failed in normal mode (z first in the last one).
FAILED_INPUTS = [
    ((150, 120, 38), (1.25, 1.25, 5.0)),
    ((120, 120, 30), (1.0, 1.0, 5.0)),
    ((150, 120, 20), (1.25, 1.25, 7.5)),
    ((96, 96, 24), (1.5, 1.5, 6.0)),
    ((200, 160, 40), (1.0, 1.0, 5.0)),
    ((150, 120, 38), (5.0, 1.25, 1.25)),
]


def _save(data: np.ndarray, affine: np.ndarray, path: Path) -> nib.Nifti1Image:
    img = nib.Nifti1Image(data, affine)
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)
    nib.save(img, path)
    return img


@pytest.mark.slow  # the whole-volume reference keeps 105 classes of every voxel: about a minute
def test_real_thick_slice_ct_is_the_reference_and_the_input_thresholded() -> None:
    """Normal mode on the real 5 mm, small-field-of-view chest CT (stored LPS): the reference's
    labels, on the input grid, and where intensities are not blurred, the input's own HU bands."""
    img = nib.load(THICK_CT)
    hu = np.asarray(img.dataobj, np.float32)
    canon = nib.as_closest_canonical(img)
    zooms = tuple(float(z) for z in np.linalg.norm(canon.affine[:3, :3], axis=0))
    x, _, axis, _ = reference_pipeline.crop_and_resample(np.asarray(canon.dataobj, np.float32), zooms)
    assert axis == 0 and np.argmax(x.shape) == 0  # separate-z along the longest axis: the failing path
    net = oracle_for(hu, img.affine, offset=1000)
    seg = segment(THICK_CT, model=net, device="cpu")
    assert_same_grid(seg.image, img.header)
    expect, _ = reference_pipeline.segment_image(img, net, fast=False, tta=False)
    assert (seg.labels == expect).mean() >= 0.999
    bands = np.clip(np.floor((hu + 1000) / 100), 0, 104)
    assert (seg.labels == bands).mean() > 0.9  # the input itself: no flip, no shift


@pytest.mark.slow  # 12 runs of a real STU-Net and the whole-volume reference: minutes on 2 cores
@pytest.mark.parametrize("tta", [False, True], ids=["normal", "tta"])
@pytest.mark.parametrize(("shape", "zooms"), FAILED_INPUTS, ids=[f"{s}@{z}" for s, z in FAILED_INPUTS])
def test_inputs_that_failed_match_the_reference(tmp_path: Path, shape, zooms, tta: bool) -> None:
    """Normal mode at the default step; TTA (8 passes a tile) at step 1, fewer tiles, same export."""
    data = make_ct_array(shape).astype(np.float32)
    img = _save(data, np.diag([*zooms, 1.0]), tmp_path / "ct.nii.gz")
    net = tiny_network(seed=2)  # a seed whose mirrored average still gives several classes
    step = 1.0 if tta else 0.5
    seg = segment(tmp_path / "ct.nii.gz", model=net, tta=tta, step_size=step, device="cpu")
    assert_same_grid(seg.image, img.header)
    expect = reference_pipeline.segment(data, zooms, net, fast=False, tta=tta, step=step)
    assert len(np.unique(expect)) > 3  # a labelling with structure, not one class
    agreement = float((seg.labels == expect).mean())
    assert agreement >= (0.995 if tta else 0.999), f"{agreement:.5f}"


@pytest.mark.slow  # the small STU-Net on two tiles through a subprocess
def test_command_line_normal_mode_on_the_real_thick_slice_ct(tmp_path: Path, tmp_path_factory) -> None:
    weights = small_checkpoint(lambda: tmp_path_factory.mktemp("fabricated"))
    out = tmp_path / "masks"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "stuseg", "predict", str(THICK_CT), str(out), "--weights", str(weights)]
    done = subprocess.run([*cmd, "--device", "cpu"], capture_output=True, text=True, env=env, check=False)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        MARKER,
        *sorted(f"{n}.nii.gz" for n in labels.STRUCTURES),
    ]
    img = nib.load(THICK_CT)
    total = np.zeros(img.shape, np.uint16)
    for name in labels.STRUCTURES:
        mask = nib.load(out / f"{name}.nii.gz")
        assert_same_grid(mask, img.header)
        total += np.asarray(mask.dataobj)
    assert total.max() == 1


@pytest.mark.slow  # two tiles of a real STU-Net architecture, twice
def test_a_batch_writes_the_same_masks_as_one_segment_call(tmp_path: Path) -> None:
    """The batch's staged path (prepare, infer, finish in three threads) on the thick-slice CT."""
    from stuseg import batch
    from stuseg.inference.pipeline import Segmenter
    from stuseg.results import labelmaps

    segmenter = Segmenter(model=tiny_network(seed=2), device="cpu")
    out = tmp_path / "results"
    (result,) = batch.run(batch.discover([THICK_CT]).cases, segmenter, out)
    assert result.status == "ok", result.error
    alone = tmp_path / "alone"
    alone.mkdir()
    seg = segmenter(THICK_CT)
    assert len(np.unique(seg.labels)) > 3
    labelmaps.write_masks(alone, seg.labels, seg.image.header, seg.names)
    img = nib.load(THICK_CT)
    for name in labels.STRUCTURES:
        got = nib.load(out / result.case.id / f"{name}.nii.gz")
        assert_same_grid(got, img.header)
        np.testing.assert_array_equal(
            np.asarray(got.dataobj), np.asarray(nib.load(alone / f"{name}.nii.gz").dataobj)
        )
