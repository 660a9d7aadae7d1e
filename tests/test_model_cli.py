"""Fine-tuned model folders through `stuseg predict --model` (real subprocesses) and the library.

What a user of a fine-tuned STU-Net does: a v2 folder with its own labels and two input
channels, named as nnU-Net names them or given with --channel; folds picked; bad calls refused
with one line. And the v1 guarantee: a v1 folder built from the published plan gives, bit for
bit, what the published path gives with the same weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from model_folders import published_arch, write_published_v1_folder, write_v1_folder, write_v2_folder
from scipy import ndimage
from test_predict_cli import run_cli

from stuseg import Segmenter, segment
from stuseg.model.network import Arch, build_network
from stuseg.model.plan import PLAN

S = (1, 1, 1)
STRIDES = (S, (2, 2, 2), (2, 2, 2), (2, 2, 2), S, S)
DIMS = (4, 8, 16, 32, 64, 64)
LABELS = ("Liver Tumour", "kidney/left", "GTVp")


def _state(arch: Arch, seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    net = build_network(arch)
    with torch.no_grad():
        for head in net.seg_outputs:
            head.bias.zero_()  # the class follows the features: every class wins somewhere
    return net.state_dict()


def _two_channel_folder(root: Path) -> Path:
    arch = Arch(DIMS, (1,) * 6, STRIDES[1:], in_channels=2, num_classes=len(LABELS) + 1)
    return write_v2_folder(
        root,
        _state(arch),
        fold_states={"1": _state(arch, seed=1)},
        spacing=(4.0, 4.0, 4.0),
        patch_size=(32, 32, 32),
        strides=STRIDES,
        labels=LABELS,
        channel_names=("CT", "PET"),
        folds=("0", "1"),
    )


def _case(folder: Path, name: str = "case", shape: tuple[int, int, int] = (40, 36, 30)) -> list[Path]:
    """A case's two channels named as nnU-Net names them: <name>_0000.nii.gz, <name>_0001.nii.gz."""
    rng = np.random.default_rng(3)
    ct = rng.normal(0, 300, shape).astype(np.float32) - 200
    ct[:2] = -1000  # air, as a CT has
    pet = np.abs(rng.normal(0, 5, shape)).astype(np.float32)
    affine = np.diag([-3.0, -3.0, 3.5, 1.0])  # LPS storage, 3.5 mm slices
    paths = []
    for c, data in enumerate((ct, pet)):
        path = folder / f"{name}_{c:04d}.nii.gz"
        nib.save(nib.Nifti1Image(data, affine), path)
        paths.append(path)
    return paths


def test_predict_model_folder_with_two_channels_as_nnunet_names_them(tmp_path: Path) -> None:
    folder = _two_channel_folder(tmp_path / "models")
    images = _case(tmp_path)
    out = tmp_path / "seg.nii.gz"
    done = run_cli("predict", images[0], out, "--model", folder, "--ml", "--device", "cpu")
    assert done.returncode == 0, done.stderr
    img = nib.load(out)
    assert img.shape == nib.load(images[0]).shape
    np.testing.assert_allclose(img.affine, nib.load(images[0]).affine, atol=1e-5)
    table = json.loads(out.with_name("seg.json").read_text())["labels"]
    assert table == {"1": "Liver_Tumour", "2": "kidney_left", "3": "GTVp"}
    # The same result from the library, both folds averaged.
    seg = segment(images, model=folder, device="cpu")
    np.testing.assert_array_equal(np.asanyarray(img.dataobj), seg.labels)
    assert len(np.unique(seg.labels)) >= 3


def test_predict_model_folder_masks_and_channel_option(tmp_path: Path) -> None:
    folder = _two_channel_folder(tmp_path / "models")
    images = _case(tmp_path)
    pet = images[1].rename(tmp_path / "pet.nii.gz")  # not named as nnU-Net names channels
    out = tmp_path / "masks"
    done = run_cli(
        "predict", images[0], out, "--model", folder, "--channel", pet, "--folds", "1", "--device", "cpu"
    )
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in out.glob("*.nii.gz")) == [
        "GTVp.nii.gz",
        "Liver_Tumour.nii.gz",
        "kidney_left.nii.gz",
    ]
    # Fold 1 alone is what the library gives with fold 1 alone, and not the two folds' mean.
    one = segment([images[0], pet], model=folder, folds=["1"], device="cpu").labels
    assert np.array_equal(np.asanyarray(nib.load(out / "GTVp.nii.gz").dataobj), (one == 3).astype(np.uint8))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--folds", "3"],
            "has no fold 3 with checkpoint_final.pth; there: fold_0 (checkpoint_final.pth); fold_1",
        ),
        (
            ["--channel", "{other}", "--channel", "{other}"],
            "this model takes 2 input channel(s); 3 were given",
        ),
        (
            ["--size", "small"],
            "a model folder brings its own network and weights: leave out --size and --weights",
        ),
        (["--model-less"], "--channel, --folds and --checkpoint apply to a --model"),
    ],
)
def test_predict_model_folder_refuses_bad_calls_with_one_line(
    tmp_path: Path, args: list[str], message: str
) -> None:
    folder = _two_channel_folder(tmp_path / "models")
    images = _case(tmp_path)
    if args == ["--model-less"]:
        cmd = ["predict", images[0], tmp_path / "out", "--folds", "0", "--device", "cpu"]
    else:
        rest = [a.format(other=images[1]) for a in args]
        cmd = ["predict", images[0], tmp_path / "out", "--model", folder, "--device", "cpu", *rest]
    done = run_cli(*cmd)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], done.stderr
    assert not (tmp_path / "out").exists()


def test_channels_on_different_grids_are_refused(tmp_path: Path) -> None:
    folder = _two_channel_folder(tmp_path / "models")
    images = _case(tmp_path)
    moved = nib.load(images[1])
    nib.save(nib.Nifti1Image(np.asanyarray(moved.dataobj), moved.affine @ np.diag([1, 1, 2, 1])), images[1])
    done = run_cli("predict", images[0], tmp_path / "out", "--model", folder, "--device", "cpu")
    assert done.returncode != 0
    assert "is not on the voxel grid of" in done.stderr and "must share one grid" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_v1_folder_of_the_published_plan_is_the_published_path_bit_for_bit(tmp_path: Path) -> None:
    arch = published_arch()
    state = _state(arch)
    folder = write_published_v1_folder(tmp_path / "models", state)
    img = nib.load(Path(__file__).parent / "data" / "abdomen_ct_3mm.nii.gz")
    # 48 x 40 x 44 voxels of the abdomen at 3 mm: two tiles of 128^3 along the longest axis at 1.5 mm.
    path = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[40:88, 30:70, 30:74], img.affine), path)
    net = build_network(arch)
    net.load_state_dict(state)
    published = Segmenter(model=net, plan=PLAN, device="cpu")(path)
    folder_seg = Segmenter(model=folder, device="cpu")
    assert folder_seg.plan == PLAN
    ours = folder_seg(path)
    assert ours.names == published.names  # the published structure names, from its dataset.json
    np.testing.assert_array_equal(ours.labels, published.labels)
    assert len(np.unique(ours.labels)) >= 3


def _one_channel_folder(root: Path) -> Path:
    arch = Arch(DIMS, (1,) * 6, STRIDES[1:], in_channels=1, num_classes=len(LABELS) + 1)
    return write_v2_folder(
        root, _state(arch), spacing=(4.0, 4.0, 4.0), patch_size=(32, 32, 32), strides=STRIDES, labels=LABELS
    )


def test_batch_and_a_registered_name_give_what_predict_gives(tmp_path: Path) -> None:
    folder = _one_channel_folder(tmp_path / "models")
    scans = tmp_path / "scans"
    scans.mkdir()
    for name in ("a", "b"):
        ct = _case(tmp_path, name)[0]
        ct.rename(scans / f"{name}.nii.gz")
    done = run_cli("batch", scans, "-o", tmp_path / "batch", "--model", folder, "--ml", "--device", "cpu")
    assert done.returncode == 0, done.stderr
    # Registered under a name, the same model gives the same labels through predict.
    done = run_cli("import-model", folder, "--name", "liver-v2")
    assert done.returncode == 0, done.stderr
    for name in ("a", "b"):
        out = tmp_path / f"{name}.nii.gz"
        done = run_cli(
            "predict", scans / f"{name}.nii.gz", out, "--model", "liver-v2", "--ml", "--device", "cpu"
        )
        assert done.returncode == 0, done.stderr
        batch_labels = np.asanyarray(nib.load(tmp_path / "batch" / f"{name}.nii.gz").dataobj)
        np.testing.assert_array_equal(batch_labels, np.asanyarray(nib.load(out).dataobj))
    # Resumed through the registered name: the same weights, so nothing is redone.
    done = run_cli("batch", scans, "-o", tmp_path / "batch", "--model", "liver-v2", "--ml", "--device", "cpu")
    assert done.returncode == 0, done.stderr
    assert "0 ok, 0 failed, 2 skipped" in done.stderr, done.stderr


def test_v1_folder_with_its_own_plan_runs_through_predict(tmp_path: Path) -> None:
    """A v1 folder as run_finetuning.py leaves it (3 mm / 4 mm spacing, 32^3 patch, 3 classes, CT
    normalisation, a transpose): predict reads it without running pickled code and writes its
    classes on the input grid."""
    pools = ((2, 2, 2), (2, 2, 2), (2, 2, 2), S, S)
    arch = Arch(DIMS, (1,) * 6, pools, in_channels=1, num_classes=4)
    folder = write_v1_folder(
        tmp_path / "models",
        _state(arch),
        spacing=(4.0, 3.0, 3.0),
        patch_size=(32, 32, 32),
        pool_op_kernel_sizes=pools,
        num_classes=3,
        transpose=(0, 2, 1),
        intensity_properties={
            0: {"mean": 40.0, "sd": 250.0, "percentile_00_5": -900.0, "percentile_99_5": 1200.0}
        },
    )
    ct = _case(tmp_path)[0]
    out = tmp_path / "seg.nii.gz"
    done = run_cli("predict", ct, out, "--model", folder, "--ml", "--device", "cpu")
    assert done.returncode == 0, done.stderr
    labels = np.asanyarray(nib.load(out).dataobj)
    assert labels.shape == nib.load(ct).shape
    assert set(np.unique(labels)) <= {0, 1, 2, 3} and len(np.unique(labels)) >= 3
    assert json.loads(out.with_name("seg.json").read_text())["labels"] == {
        "1": "class_1",
        "2": "class_2",
        "3": "class_3",
    }


def test_dicom_seg_of_a_model_carries_the_user_s_codes_and_generic_ones(tmp_path: Path) -> None:
    from pydicom import dcmread
    from test_dicomseg import dciodvfy_errors

    folder = _one_channel_folder(tmp_path / "models")
    series = Path(__file__).parent / "data" / "abdomen_ct_dicom_uids"
    codes = tmp_path / "codes.csv"
    codes.write_text(
        "structure,category_code,category_meaning,type_code,type_meaning\n"
        "GTVp,49755003,Morphologically Abnormal Structure,108369006,Neoplasm\n"
    )
    out = tmp_path / "out"
    done = run_cli(
        "predict",
        series,
        out,
        "--model",
        folder,
        "--output-type",
        "dicom-seg",
        "--codes",
        codes,
        "--device",
        "cpu",
    )
    assert done.returncode == 0, done.stderr
    # The one name neither the user's file nor stuseg's table codes: one warning naming it.
    assert (
        "stuseg: warning: no SNOMED CT codes for Liver_Tumour, so the DICOM-SEG codes it as Tissue"
        in done.stderr
    )
    seg = dcmread(out / "seg.dcm")
    coded = {s.SegmentLabel: s.SegmentedPropertyTypeCodeSequence[0].CodeValue for s in seg.SegmentSequence}
    # GTVp from the user's file, kidney_left from stuseg's table, Liver_Tumour generic (where present).
    expected = {"GTVp": "108369006", "Liver_Tumour": "85756007"}
    assert len(coded) >= 2
    for label, code in coded.items():
        assert code == expected.get(label, code)
    assert coded.get("kidney_left", "64033007") != "85756007"
    assert dciodvfy_errors(out / "seg.dcm") == []


def test_remove_small_blobs_is_applied_recorded_and_said(tmp_path: Path) -> None:
    folder = _one_channel_folder(tmp_path / "models")
    ct = _case(tmp_path)[0]
    plain, cleaned = tmp_path / "plain", tmp_path / "cleaned"
    done = run_cli("predict", ct, plain, "--model", folder, "--device", "cpu")
    assert done.returncode == 0, done.stderr
    done = run_cli(
        "predict",
        ct,
        cleaned,
        "--model",
        folder,
        "--device",
        "cpu",
        "--statistics",
        "--remove-small-blobs",
        "500",
    )
    assert done.returncode == 0, done.stderr
    stats = json.loads((cleaned / "statistics.json").read_text())
    cleanup = stats["image"]["cleanup"]
    assert cleanup["remove_small_blobs_mm3"] == 500.0
    removed = cleanup["voxels_removed"]
    assert removed, "a random network's label map has small pieces to remove"
    voxel_mm3 = abs(float(np.linalg.det(nib.load(ct).affine[:3, :3])))
    for name in ("Liver_Tumour", "kidney_left", "GTVp"):
        before = np.asanyarray(nib.load(plain / f"{name}.nii.gz").dataobj).astype(bool)
        after = np.asanyarray(nib.load(cleaned / f"{name}.nii.gz").dataobj).astype(bool)
        assert not (after & ~before).any()  # only removals
        assert int((before & ~after).sum()) == removed.get(name, 0)
        # What is left holds no piece below the threshold.
        ids, _ = ndimage.label(after, structure=np.ones((3, 3, 3), bool))
        sizes = np.bincount(ids.ravel())[1:]
        assert (sizes * voxel_mm3 >= 500).all()
    assert f"stuseg: removed {sum(removed.values())} voxels in pieces smaller than 500 mm3" in done.stderr
    marker = json.loads((cleaned / ".stuseg-run.json").read_text())
    assert "500" in json.dumps(marker)
    bad = run_cli("predict", ct, tmp_path / "bad", "--model", folder, "--remove-small-blobs", "0")
    assert bad.returncode != 0
    assert bad.stderr.strip() == "stuseg: error: --remove-small-blobs must be a positive volume in mm3, got 0"


def test_batch_groups_a_multi_channel_model_s_files_into_cases(tmp_path: Path) -> None:
    folder = _two_channel_folder(tmp_path / "models")
    scans = tmp_path / "scans"
    scans.mkdir()
    for name in ("a", "b"):
        _case(scans, name)
    (scans / "c_0000.nii.gz").write_bytes((scans / "a_0000.nii.gz").read_bytes())  # no c_0001
    done = run_cli("batch", scans, "-o", tmp_path / "batch", "--model", folder, "--ml", "--device", "cpu")
    assert done.returncode == 0, done.stderr
    assert "2 ok, 0 failed" in done.stderr, done.stderr
    for name in ("a", "b"):
        alone = segment(sorted(scans.glob(f"{name}_*.nii.gz")), model=folder, device="cpu").labels
        np.testing.assert_array_equal(
            np.asanyarray(nib.load(tmp_path / "batch" / f"{name}.nii.gz").dataobj), alone
        )
    assert not (tmp_path / "batch" / "c.nii.gz").exists()
    log = (tmp_path / "batch" / "stuseg-batch.jsonl").read_text()
    assert "case c: channel 0001 of 2 is missing" in log
