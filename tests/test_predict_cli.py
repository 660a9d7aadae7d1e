"""`stuseg predict` end to end: real subprocesses on real scans, the Typer runner, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from fabricate import shaped_state_dict, small_checkpoint, write_checkpoint
from typer.testing import CliRunner

from stuseg.cli import app
from stuseg.images.io import read_image
from stuseg.results.outputs import MARKER
from stuseg.structures import labels

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def small_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real small architecture with random weights, in the original nnU-Net v1 format."""
    return small_checkpoint(lambda: tmp_path_factory.mktemp("fabricated"))


def run_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "stuseg", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, check=False)


def assert_same_grid(out: nib.Nifti1Image, ref_header: nib.Nifti1Header) -> None:
    assert out.shape == tuple(ref_header.get_data_shape()[:3])
    np.testing.assert_array_equal(out.header.get_qform(), ref_header.get_qform())
    np.testing.assert_array_equal(out.header.get_sform(), ref_header.get_sform())
    assert int(out.header["qform_code"]) == int(ref_header["qform_code"])
    assert int(out.header["sform_code"]) == int(ref_header["sform_code"])


@pytest.mark.slow  # a real scan (many tiles) or 8 mirrored passes: minutes on 2 cores
def test_real_lps_chest_gives_104_masks_on_the_input_grid(tmp_path: Path, small_model: Path) -> None:
    ct = DATA / "chest_ct_1p5mm_lps.nii.gz"
    out = tmp_path / "masks"
    done = run_cli(
        "predict", ct, out, "--weights", small_model, "--fast", "--step-size", "1.0", "--device", "cpu"
    )
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    files = sorted(p.name for p in out.iterdir())
    assert files == [MARKER, *sorted(f"{n}.nii.gz" for n in labels.STRUCTURES)]
    ref = nib.load(ct)
    total = np.zeros(ref.shape, np.uint16)
    for name in labels.STRUCTURES:
        mask = nib.load(out / f"{name}.nii.gz")
        assert mask.get_data_dtype() == np.uint8
        assert_same_grid(mask, ref.header)
        data = np.asarray(mask.dataobj)
        assert set(np.unique(data)) <= {0, 1}
        total += data
    assert total.max() == 1  # one label per voxel
    summary = done.stderr.strip().splitlines()[-1]
    assert summary.startswith(f"wrote 104 masks in {out} (small on cpu)")
    assert "network" in summary and "peak RAM" in summary


@pytest.mark.slow  # a real scan (many tiles) or 8 mirrored passes: minutes on 2 cores
def test_real_dicom_series_to_one_multilabel_file(tmp_path: Path, small_model: Path) -> None:
    series = DATA / "abdomen_ct_dicom"
    out = tmp_path / "seg.nii.gz"
    done = run_cli("predict", series, out, "--weights", small_model, "--ml", "--step-size", "1.0", "-q")
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""  # --quiet
    seg = nib.load(out)
    assert seg.get_data_dtype() == np.uint8
    volume = read_image(series)
    assert_same_grid(seg, volume.header)
    np.testing.assert_allclose(seg.affine, volume.affine, atol=1e-4)
    values = set(np.unique(np.asarray(seg.dataobj)).tolist())
    assert values <= set(range(105)) and len(values) > 1
    table = json.loads((tmp_path / "seg.json").read_text())
    text = json.dumps(table)
    assert "liver" in text and "vertebrae_L1" in text


@pytest.mark.slow  # a real scan (many tiles) or 8 mirrored passes: minutes on 2 cores
def test_tta_fast_and_roi_subset_through_a_subprocess(tmp_path: Path, small_model: Path, make_nifti) -> None:
    ct = make_nifti(shape=(48, 40, 36))
    out = tmp_path / "organs"
    done = run_cli(
        "predict",
        ct,
        out,
        "-s",
        "S",
        "--weights",
        small_model,
        "--tta",
        "--fast",
        "--roi-subset",
        "liver,SPLEEN",
    )
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "liver.nii.gz", "spleen.nii.gz"]
    for name in ("liver.nii.gz", "spleen.nii.gz"):
        assert_same_grid(nib.load(out / name), nib.load(ct).header)


@pytest.mark.slow
def test_typer_runner_normal_mode_matches_the_python_api(
    tmp_path: Path, small_model: Path, make_nifti
) -> None:
    from stuseg import segment

    ct = make_nifti(shape=(40, 36, 30), affine=np.diag([-1.2, -1.2, 2.0, 1.0]))
    out = tmp_path / "seg.nii.gz"
    result = CliRunner().invoke(app, ["predict", str(ct), str(out), "--weights", str(small_model), "--ml"])
    assert result.exit_code == 0, result.output
    api = segment(ct, weights=small_model, device="cpu")
    assert api.size == "small"
    np.testing.assert_array_equal(np.asarray(nib.load(out).dataobj), api.labels)


# --- bad input: one line on stderr, exit 1, nothing written ---------------------------------


@pytest.fixture
def base_shaped_model(tmp_path: Path) -> Path:
    return write_checkpoint(tmp_path / "base_ep4k.model", shaped_state_dict("base"))


def _fails(args: list[str], message: str, output: Path | None = None) -> None:
    result = CliRunner().invoke(app, ["predict", *args])
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("stuseg: error: ")
    assert message in lines[0], lines[0]
    assert "Traceback" not in result.output
    if output is not None:
        assert not output.exists()


def test_missing_input(tmp_path: Path) -> None:
    _fails([str(tmp_path / "nope.nii.gz"), str(tmp_path / "out")], "does not exist", tmp_path / "out")


def test_not_an_image(tmp_path: Path) -> None:
    bad = tmp_path / "notes.nii.gz"
    bad.write_text("hello")
    _fails([str(bad), str(tmp_path / "out")], "not a NIfTI image", tmp_path / "out")


def test_2d_image(tmp_path: Path) -> None:
    path = tmp_path / "slice.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((10, 12), np.int16), np.eye(4)), path)
    _fails([str(path), str(tmp_path / "out")], "is a 2D image", tmp_path / "out")


def test_4d_image(tmp_path: Path) -> None:
    path = tmp_path / "dyn.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 5, 6, 3), np.int16), np.eye(4)), path)
    _fails([str(path), str(tmp_path / "out")], "holds 3 volumes", tmp_path / "out")


def test_output_is_an_existing_file(tmp_path: Path, make_nifti) -> None:
    ct = make_nifti()
    target = tmp_path / "taken"
    target.write_text("x")
    _fails([str(ct), str(target)], f"the output {target} is a file, but a folder is written here")
    assert target.read_text() == "x"


def test_multilabel_output_must_be_a_nifti_file(tmp_path: Path, make_nifti) -> None:
    _fails([str(make_nifti()), str(tmp_path / "masks"), "--ml"], "not a NIfTI file name; end it in .nii.gz")
    (tmp_path / "seg.nii.gz").mkdir()
    _fails(
        [str(make_nifti()), str(tmp_path / "seg.nii.gz"), "--ml"], "is a folder, but a file is written here"
    )


def test_unknown_structure_suggests_the_closest(tmp_path: Path, make_nifti) -> None:
    _fails(
        [str(make_nifti()), str(tmp_path / "out"), "--roi-subset", "livr"],
        "did you mean 'liver'",
        tmp_path / "out",
    )


def test_unknown_size_lists_valid_ones(tmp_path: Path, make_nifti) -> None:
    _fails([str(make_nifti()), str(tmp_path / "out"), "--size", "xl"], "valid sizes: small (S), base (B)")


def test_weights_of_another_size(tmp_path: Path, make_nifti, base_shaped_model: Path) -> None:
    args = [str(make_nifti()), str(tmp_path / "out"), "--size", "small", "--weights", str(base_shaped_model)]
    _fails(args, "is a checkpoint of STU-Net base, not small", tmp_path / "out")


def test_weights_of_another_architecture(tmp_path: Path, make_nifti) -> None:
    from stuseg.model.network import Arch

    odd = write_checkpoint(tmp_path / "other.model", shaped_state_dict(Arch(dims=(8,) * 6, depths=(1,) * 6)))
    _fails([str(make_nifti()), str(tmp_path / "out"), "--weights", str(odd)], "STU-Net", tmp_path / "out")


def test_cuda_asked_for_on_a_machine_without_it(tmp_path: Path, make_nifti) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    _fails([str(make_nifti()), str(tmp_path / "out"), "--device", "cuda"], "no CUDA GPU is available")


def test_non_ct_warning_is_printed(tmp_path: Path, small_model: Path, make_nifti) -> None:
    ct = make_nifti(data=np.full((20, 20, 20), 100, np.int16), shape=(20, 20, 20))
    result = CliRunner().invoke(
        app, ["predict", str(ct), str(tmp_path / "o.nii.gz"), "--ml", "--fast", "--weights", str(small_model)]
    )
    assert result.exit_code == 0, result.output
    assert (
        f"stuseg: warning: {ct} has no values below -900 (its lowest is 100), so it holds no air and may not "
        "be a CT in Hounsfield units; results will likely be meaningless\n"
    ) in result.stderr


def test_a_failed_write_leaves_no_output_folder(tmp_path: Path, make_nifti, monkeypatch) -> None:
    """Disk full after 4 masks: no output folder, no staging folder, exit 1 with one line."""
    from stuseg.inference import pipeline
    from stuseg.results import labelmaps

    calls = {"n": 0}
    real_write = labelmaps.write_nifti

    def flaky_write(img, path):
        calls["n"] += 1
        if calls["n"] == 5:
            path.write_bytes(b"\x1f\x8b partial")  # a half-written mask
            raise OSError(28, "No space left on device")
        real_write(img, path)

    ct = make_nifti()
    seg = pipeline.segment(ct, model=_varied_model(), device="cpu", step_size=1.0)
    assert len(np.unique(seg.labels)) > 5  # several masks are encoded, not only the shared empty one
    monkeypatch.setattr(labelmaps, "write_nifti", flaky_write)
    monkeypatch.setattr(pipeline, "segment", lambda *args, **kwargs: seg)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["predict", str(ct), str(out)])
    assert result.exit_code == 1, result.output
    assert (
        result.stderr == f"stuseg: error: cannot write {out}: No space left on device; nothing was written\n"
    )
    assert calls["n"] >= 5
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["ct.nii.gz"])


def test_masks_of_absent_structures_share_one_encoding(make_nifti, tmp_path: Path) -> None:
    from stuseg.inference import pipeline
    from stuseg.results import labelmaps

    src = make_nifti()
    seg = pipeline.segment(src, model=_uniform_model(), device="cpu")
    folder = tmp_path / "out"
    folder.mkdir()
    paths = labelmaps.write_masks(folder, seg.labels, seg.image.header, seg.names)
    assert len(paths) == 104
    liver = folder / "liver.nii.gz"
    absent = [p for p in paths if p != liver]
    assert len({p.read_bytes() for p in absent}) == 1  # one encoding, written 103 times
    ref = nib.load(src)
    for path, value in ((liver, 1), (absent[0], 0)):
        img = nib.load(path)
        assert img.get_data_dtype() == np.uint8
        np.testing.assert_array_equal(img.affine, ref.affine)
        assert int(img.header["sform_code"]) == int(ref.header["sform_code"])
        assert np.all(np.asanyarray(img.dataobj) == value)


def _varied_model():
    """Logits that vary with the intensity, so several structures are present."""
    import torch

    class Varied(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            scale = torch.arange(105, dtype=x.dtype).view(1, 105, 1, 1, 1) / 50.0
            return -((x - scale + 1.0) ** 2)

    return Varied()


def _uniform_model():
    import torch

    class Liver(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            logits = torch.zeros((x.shape[0], 105, *x.shape[2:]))
            logits[:, 40] = 1.0  # liver everywhere
            return logits

    return Liver()
