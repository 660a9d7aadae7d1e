"""`stuseg batch`: finding cases, their ids, the run log, resuming, failures and interruptions.

Scans are tiny synthetic CTs (one 128^3 tile each at --step-size 1.0) and the small architecture
with fabricated weights; DICOM series and non-image objects are written with pydicom.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from conftest import make_ct_array
from fabricate import small_checkpoint
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from typer.testing import CliRunner

from stuseg import batch
from stuseg.cli import app
from stuseg.errors import InputError
from stuseg.images.io import read_image

REPO = Path(__file__).resolve().parents[1]
DICOM_UIDS = Path(__file__).parent / "data" / "abdomen_ct_dicom_uids"

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
SOP = {  # PS3.4 Annex B
    "rtstruct": "1.2.840.10008.5.1.4.1.1.481.3",
    "seg": "1.2.840.10008.5.1.4.1.1.66.4",
    "sc": "1.2.840.10008.5.1.4.1.1.7",
}


@pytest.fixture(scope="session")
def small_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real small architecture with random weights, in the original nnU-Net v1 format."""
    return small_checkpoint(lambda: tmp_path_factory.mktemp("fabricated"))


def write_ct(path: Path, shape=(40, 36, 32), spacing=1.5, seed=0) -> Path:
    """A synthetic CT NIfTI (RAS, qform = sform, code 1)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    aff = np.diag([spacing, spacing, spacing, 1.0])
    img = nib.Nifti1Image(make_ct_array(shape, seed), aff)
    img.header.set_qform(aff, code=1)
    img.header.set_sform(aff, code=1)
    nib.save(img, path)
    return path


def _dataset(sop_class: str, modality: str, series_uid: str, number: int | None, study: str) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series_uid
    if number is not None:
        ds.SeriesNumber = number
    ds.PatientID = "SYNTHETIC"
    return ds


def write_series(
    folder: Path,
    number: int | None,
    *,
    slices: int = 12,
    offset: int = 0,
    image_type: tuple[str, ...] = ("ORIGINAL", "PRIMARY", "AXIAL"),
    study: str = "1.2.826.0.1.3680043.8.498.1",
    rows: int = 24,
    cols: int = 20,
) -> str:
    """A synthetic CT series (uncompressed, 3 mm voxels); slice k holds the value offset + k."""
    folder.mkdir(parents=True, exist_ok=True)
    uid = generate_uid()
    for k in range(slices):
        ds = _dataset(CT_IMAGE_STORAGE, "CT", uid, number, study)
        ds.ImageType = list(image_type)
        ds.Rows, ds.Columns = rows, cols
        ds.PixelSpacing = [3.0, 3.0]
        ds.SliceThickness = 3.0
        ds.ImagePositionPatient = [0.0, 0.0, 3.0 * k]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.InstanceNumber = k + 1
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = 0, 1
        ds.PixelData = np.full((rows, cols), offset + k, np.int16).tobytes()
        ds.save_as(folder / f"s{number}_{uid[-6:]}_{k:03d}.dcm", enforce_file_format=True)
    return uid


def write_non_images(folder: Path) -> dict[str, Path]:
    """An RT structure set (no pixels), a SEG, a secondary capture and a CT localizer."""
    study = "1.2.826.0.1.3680043.8.498.1"
    paths = {}
    rt = _dataset(SOP["rtstruct"], "RTSTRUCT", generate_uid(), 90, study)
    paths["rtstruct"] = folder / "rtstruct.dcm"
    rt.save_as(paths["rtstruct"], enforce_file_format=True)
    seg = _dataset(SOP["seg"], "SEG", generate_uid(), 91, study)
    seg.Rows, seg.Columns, seg.NumberOfFrames = 24, 20, 2
    seg.SamplesPerPixel, seg.PhotometricInterpretation = 1, "MONOCHROME2"
    seg.BitsAllocated, seg.BitsStored, seg.HighBit, seg.PixelRepresentation = 1, 1, 0, 0
    seg.PixelData = bytes(24 * 20 * 2 // 8)
    paths["seg"] = folder / "seg.dcm"
    seg.save_as(paths["seg"], enforce_file_format=True)
    sc = _dataset(SOP["sc"], "OT", generate_uid(), 92, study)
    sc.Rows, sc.Columns, sc.SamplesPerPixel, sc.PhotometricInterpretation = 8, 8, 1, "MONOCHROME2"
    sc.BitsAllocated, sc.BitsStored, sc.HighBit, sc.PixelRepresentation = 8, 8, 7, 0
    sc.PixelData = bytes(64)
    paths["sc"] = folder / "capture.dcm"
    sc.save_as(paths["sc"], enforce_file_format=True)
    write_series(folder, 93, slices=1, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))
    paths["localizer"] = next(folder.glob("s93_*.dcm"))
    return paths


def run_cli(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    env = {**(env or os.environ), "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "stuseg", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, check=False)


# --- finding cases -----------------------------------------------------------------------------


def test_folders_are_searched_recursively_and_ids_follow_the_paths(tmp_path: Path) -> None:
    import SimpleITK as sitk

    src = tmp_path / "cohort"
    write_ct(src / "a.nii.gz")
    write_ct(src / "plain.nii")
    sub = src / "sub"
    sub.mkdir()
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((5, 6, 7), np.int16)), str(sub / "b.nrrd"))
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((5, 6, 7), np.int16)), str(sub / "c.mha"))
    write_ct(src / "sub" / "deeper" / "s0001" / "ct.nii.gz")
    (src / "notes.txt").write_text("not a list file: only SOURCE arguments are lists\n")
    (src / "table.json").write_text("{}")
    write_ct(src / ".hidden.nii.gz")
    write_ct(src / ".cache" / "x.nii.gz")

    found = batch.discover([src])
    assert [(c.id, c.input.relative_to(src).as_posix(), c.series) for c in found.cases] == [
        ("a", "a.nii.gz", None),
        ("plain", "plain.nii", None),
        ("sub_b", "sub/b.nrrd", None),
        ("sub_c", "sub/c.mha", None),
        ("sub_deeper_s0001_ct", "sub/deeper/s0001/ct.nii.gz", None),
    ]
    assert found.ignored == []
    again = batch.discover([str(src)])
    assert again.cases == found.cases  # stable across runs


def test_several_dicom_series_in_one_folder_are_one_case_each(tmp_path: Path) -> None:
    """Slices of the real DICOM series copied as two series (new UIDs, SeriesNumber 4 and 7), one folder."""
    folder = tmp_path / "cohort" / "patient1" / "ct"
    folder.mkdir(parents=True)
    original = tmp_path / "original"
    original.mkdir()
    slices = sorted(DICOM_UIDS.iterdir())[:4]  # four adjacent slices keep the test fast
    for src in slices:
        shutil.copy(src, original / src.name)
    uids = {}
    for number in (4, 7):
        uids[number] = generate_uid()
        for src in slices:
            ds = pydicom.dcmread(src)
            ds.SeriesInstanceUID = uids[number]
            ds.SeriesNumber = number
            ds.SOPInstanceUID = generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.save_as(folder / f"{number}_{src.name}")
    found = batch.discover([tmp_path / "cohort"])
    assert [(c.id, c.input, c.series) for c in found.cases] == [
        ("patient1_ct_s4", folder, uids[4]),
        ("patient1_ct_s7", folder, uids[7]),
    ]
    # A case reads as its series: the same volume as the original folder.
    volume = read_image(found.cases[1].input, series=found.cases[1].series)
    np.testing.assert_array_equal(volume.data, read_image(original).data)
    # A series folder given as SOURCE itself is named after the folder.
    assert [c.id for c in batch.discover([folder]).cases] == ["ct_s4", "ct_s7"]


def test_mixed_dicom_folder_passes_over_rtstruct_seg_localizer_and_captures(tmp_path: Path) -> None:
    folder = tmp_path / "study"
    first = write_series(folder, 2, offset=-1000)
    second = write_series(folder, 3, offset=200)
    non_images = write_non_images(folder)
    found = batch.discover([folder])
    assert [(c.id, c.series) for c in found.cases] == [("study_s2", first), ("study_s3", second)]
    volume = read_image(folder, series=second)
    assert volume.data.min() == 200 and volume.data.max() == 211  # slice k holds 200 + k
    reasons = {i.path.name: i.reason for i in found.ignored}
    assert set(reasons) == {p.name for p in non_images.values()}
    assert reasons["rtstruct.dcm"] == "an RT structure set without image data"
    assert "a segmentation (SEG), not an image series" in reasons["seg.dcm"]
    assert "a secondary capture, not an image series" in reasons["capture.dcm"]
    assert "a localizer (ImageType LOCALIZER)" in reasons[non_images["localizer"].name]


def test_list_files_txt_and_csv(tmp_path: Path) -> None:
    a = write_ct(tmp_path / "scans" / "a.nii.gz")
    b = write_ct(tmp_path / "scans" / "b.nii.gz")
    series = tmp_path / "dicom" / "p7"
    uid = write_series(series, 5)
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "cohort.txt").write_text(f"# scans of the cohort\n\n../scans/a.nii.gz\n  {b}  \n../dicom/p7\n")
    found = batch.discover([lists / "cohort.txt"])
    assert [(c.id, c.input.resolve(), c.series) for c in found.cases] == [
        ("a", a, None),
        ("b", b, None),
        ("p7_s5", series.resolve(), uid),
    ]
    (lists / "named.csv").write_text(
        "Case,Path,site\nsubject-01,../scans/a.nii.gz,x\n"
        f",{b},y\nsubject 3,../dicom/p7,z\nmissing,nope.nii.gz,\n"
    )
    found = batch.discover([lists / "named.csv"])
    assert [(c.id, c.input.name) for c in found.cases] == [
        ("subject-01", "a.nii.gz"),
        ("b", "b.nii.gz"),
        ("subject_3", "p7"),
        ("missing", "nope.nii.gz"),  # a listed path that does not exist fails as a case
    ]
    (lists / "bad.csv").write_text("file,case\na.nii.gz,x\n")
    with pytest.raises(InputError, match="has no 'path' column"):
        batch.discover([lists / "bad.csv"])
    (lists / "twice.csv").write_text(f"path,case\n{a},same\n{b},SAME\n")
    with pytest.raises(InputError, match="the case id 'same' is given twice"):
        batch.discover([lists / "twice.csv"])


def test_id_collisions_are_resolved_the_same_way_every_time(tmp_path: Path) -> None:
    one = write_ct(tmp_path / "site1" / "ct.nii.gz")
    two = write_ct(tmp_path / "site2" / "CT.nii.gz")  # differs only in case: collides too
    other = write_ct(tmp_path / "site2" / "other.nii.gz")
    found = batch.discover([one, two, other, one])  # the same file twice is one case
    ids = [c.id for c in found.cases]
    assert len(ids) == 3
    assert ids[2] == "other"
    assert re.fullmatch(r"ct-[0-9a-f]{8}", ids[0]) and re.fullmatch(r"CT-[0-9a-f]{8}", ids[1])
    assert ids[0].casefold() != ids[1].casefold()
    # Stable: the same ids whatever the order of the sources.
    again = batch.discover([other, two, one])
    assert {c.input: c.id for c in again.cases} == {c.input: c.id for c in found.cases}
    # The suffix depends only on the case's own input path.
    expected = hashlib.sha256(f"{one.resolve()}\0".encode()).hexdigest()[:8]
    assert ids[0] == f"ct-{expected}"


def test_ids_are_safe_file_names() -> None:
    assert batch.safe_id("Müller scan #3 (arterial)") == "Muller_scan_3_arterial"
    assert batch.safe_id("../../etc/passwd") == "etc_passwd"
    assert batch.safe_id(".hidden") == "hidden"
    assert batch.safe_id("-rf") == "rf"
    assert batch.safe_id("CON") == "CON_"
    assert batch.safe_id("nul.txt") == "nul.txt_"
    assert batch.safe_id("日本") == "case"
    long_a, long_b = "x" * 300 + "a", "x" * 300 + "b"
    assert len(batch.safe_id(long_a)) == 100
    assert batch.safe_id(long_a) != batch.safe_id(long_b)
    for text in ("a b", "ü/ö", "x" * 400, "", "...", "a:b*c?d"):
        assert re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9_])?", batch.safe_id(text)), text


# --- the run log -------------------------------------------------------------------------------


def test_run_log_survives_a_torn_last_line(tmp_path: Path) -> None:
    path = tmp_path / batch.LOG_NAME
    with batch.RunLog(path) as log:
        log.write({"case": "a", "status": "ok"})
        log.write({"case": "b", "status": "failed", "error": "cannot read b"})
    with path.open("ab") as fh:  # a writer killed in the middle of a line
        fh.write(b'{"case": "c", "stat')
    assert [r["case"] for r in batch.read_log(path)] == ["a", "b"]
    with batch.RunLog(path) as log:
        log.write({"case": "d", "status": "ok", "note": "ü"})
    assert [r["case"] for r in batch.read_log(path)] == ["a", "b", "d"]
    lines = path.read_bytes().split(b"\n")
    assert lines[2] == b'{"case": "c", "stat'  # the fragment stays alone on its line
    assert json.loads(lines[3]) == {"case": "d", "status": "ok", "note": "ü"}
    assert batch.read_log(tmp_path / "missing.jsonl") == []


# --- usage errors: exit 2, one line, nothing written ----------------------------------------------


def _usage_error(args: list[str], message: str, output: Path | None = None) -> None:
    result = CliRunner().invoke(app, ["batch", *args])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert lines == [lines[0]] and lines[0].startswith("stuseg: error: "), result.stderr
    assert message in lines[0], lines[0]
    assert "Traceback" not in result.output
    if output is not None:
        assert not output.exists()


def test_a_missing_source_is_a_usage_error(tmp_path: Path) -> None:
    out = tmp_path / "out"
    _usage_error([str(tmp_path / "nope"), "-o", str(out)], f"{tmp_path / 'nope'} does not exist", out)


def test_no_scans_found_is_a_usage_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    write_non_images(tmp_path / "empty")
    out = tmp_path / "out"
    _usage_error([str(tmp_path / "empty"), "-o", str(out)], "found no CT scans to segment in", out)


def test_a_folder_of_other_files_is_refused(tmp_path: Path) -> None:
    ct = write_ct(tmp_path / "a.nii.gz")
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    _usage_error(
        [str(ct), "-o", str(out)], "holds files (mine.txt) but is not the folder of an earlier batch"
    )
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt"]


def test_an_output_inside_a_source_is_refused(tmp_path: Path) -> None:
    write_ct(tmp_path / "scans" / "a.nii.gz")
    out = tmp_path / "scans" / "out"
    _usage_error([str(tmp_path / "scans"), "-o", str(out)], "lies inside the input folder", out)


def test_bad_options_are_usage_errors(tmp_path: Path) -> None:
    ct = write_ct(tmp_path / "a.nii.gz")
    out = tmp_path / "out"
    _usage_error([str(ct), "-o", str(out), "--size", "xl"], "valid sizes: small (S), base (B)", out)
    _usage_error([str(ct), "-o", str(out), "--roi-subset", "livr"], "did you mean 'liver'", out)
    _usage_error([str(ct), "-o", str(out), "--workers", "2"], "--workers applies only with --ray", out)
    _usage_error([str(ct), "-o", str(out), "--weights", str(tmp_path / "none.model")], "does not exist", out)


def test_ray_without_the_extra_names_it(tmp_path: Path) -> None:
    """A `ray` package that fails to import stands in for a machine without Ray."""
    blocker = tmp_path / "no_ray" / "ray"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('No module named ray')\n")
    ct = write_ct(tmp_path / "a.nii.gz")
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocker.parent), str(REPO)])}
    done = run_cli("batch", ct, "-o", out, "--ray", "auto", env=env)
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [
        'stuseg: error: --ray needs Ray, an optional extra of stuseg: pip install "stuseg[ray]"'
    ]
    assert not out.exists()


# --- the runner, in process, with a network that is cheap to run ------------------------------


class Threshold:
    """A stand-in network whose labels depend on the input: liver where the z-scored CT is > 0.5.

    Cheap enough to run many cases in a test, and different for every scan, so a batch that mixed
    up its cases could not match the one-case results.
    """

    @staticmethod
    def build():
        import torch

        class Net(torch.nn.Module):
            def forward(self, x: torch.Tensor) -> torch.Tensor:
                logits = torch.zeros((x.shape[0], 105, *x.shape[2:]))
                logits[:, 0] = 0.5
                logits[:, 40] = x[:, 0]  # 40 = liver
                logits[:, 3] = -x[:, 0] - 0.5  # 3 = aorta, where the image is dark
                return logits

        return Net()


@pytest.fixture
def segmenter():
    from stuseg.inference.pipeline import Segmenter

    return Segmenter(model=Threshold.build(), device="cpu", step_size=1.0, fast=True)


def _cohort(folder: Path, n: int, corrupt_at: int | None = None) -> list[Path]:
    paths = []
    for i in range(n):
        path = folder / f"case{i}.nii.gz"
        if i == corrupt_at:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"\x1f\x8b\x08\x00 this is not a whole gzip stream")
        else:
            write_ct(path, shape=(30 + 2 * i, 28, 26), seed=i)
        paths.append(path)
    return paths


def _no_leftovers(folder: Path) -> None:
    assert [p.name for p in folder.iterdir() if p.name.startswith(".stuseg-")] == []


def _masks(folder: Path) -> dict[str, tuple[bytes, np.ndarray]]:
    """Each mask's header bytes and decoded voxels."""
    out = {}
    for path in sorted(folder.glob("*.nii.gz")):
        img = nib.load(path)
        out[path.name] = (img.header.binaryblock, np.asarray(img.dataobj))
    return out


def _same_masks(a: Path, b: Path) -> None:
    left, right = _masks(a), _masks(b)
    assert sorted(left) == sorted(right) and len(left) > 0
    for name in left:
        assert left[name][0] == right[name][0], name
        np.testing.assert_array_equal(left[name][1], right[name][1], err_msg=name)


@pytest.mark.slow
def test_api_batch_equals_one_case_at_a_time_and_isolates_a_corrupt_case(tmp_path: Path, segmenter) -> None:
    from stuseg.results import labelmaps

    inputs = _cohort(tmp_path / "in", 3, corrupt_at=1)
    found = batch.discover([tmp_path / "in"])
    out = tmp_path / "out"
    results = list(batch.run(found.cases, segmenter, out))
    assert [(r.case.id, r.status) for r in results] == [("case0", "ok"), ("case1", "failed"), ("case2", "ok")]
    assert results[1].error.startswith(f"cannot read {inputs[1]}: it is damaged, truncated or not a NIfTI")
    assert not (out / "case1").exists()
    _no_leftovers(out)
    for i in (0, 2):
        alone = tmp_path / f"alone{i}"
        alone.mkdir()
        seg = segmenter(inputs[i])
        labelmaps.write_masks(alone, seg.labels, seg.image.header, seg.names)
        _same_masks(out / f"case{i}", alone)
    records = batch.read_log(out / batch.LOG_NAME)
    assert [(r["case"], r["status"]) for r in records] == [(r.case.id, r.status) for r in results]
    ok = records[0]
    assert ok["input"] == str(inputs[0].resolve()) and ok["series"] is None
    assert ok["outputs"] == ["case0"] and ok["error"] is None
    assert ok["shape"] == [30, 28, 26] and ok["spacing"] == [1.5, 1.5, 1.5]
    assert {"read", "preprocess", "network", "export", "write"} <= set(ok["seconds"])
    assert ok["peak_rss_bytes"] > 0 and ok["size"] == "custom" and len(ok["weights_sha256"]) == 64
    assert ok["options"]["fast"] is True and ok["options"]["step_size"] == 1.0
    assert ok["options"]["roi_subset"] is None
    assert ok["stuseg_version"] == __import__("stuseg").__version__
    assert records[1]["error"] == results[1].error and records[1]["outputs"] == []


@pytest.mark.slow
def test_resume_skips_done_cases_and_redoes_them_when_options_change(tmp_path: Path, segmenter) -> None:
    from stuseg.inference.pipeline import Segmenter

    _cohort(tmp_path / "in", 2)
    cases = batch.discover([tmp_path / "in"]).cases
    out = tmp_path / "out"
    assert [r.status for r in batch.run(cases, segmenter, out)] == ["ok", "ok"]
    stamp = {p: p.stat().st_mtime_ns for p in out.rglob("*.nii.gz")}
    again = list(batch.run(cases, segmenter, out))
    assert [r.status for r in again] == ["skipped", "skipped"]
    assert again[0].record["reason"] == "done before with the same weights and options"
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.nii.gz")} == stamp  # untouched

    # A case whose output was deleted is done again; the other stays skipped.
    shutil.rmtree(out / "case1")
    assert [(r.case.id, r.status) for r in batch.run(cases, segmenter, out)] == [
        ("case0", "skipped"),
        ("case1", "ok"),
    ]
    # Other options (here: a subset of structures) redo every case, replacing each folder whole.
    subset = Segmenter(model=Threshold.build(), device="cpu", step_size=1.0, fast=True, roi_subset=["liver"])
    assert [r.status for r in batch.run(cases, subset, out)] == ["ok", "ok"]
    assert sorted(p.name for p in (out / "case0").iterdir()) == [".stuseg-run.json", "liver.nii.gz"]
    assert [r.status for r in batch.run(cases, subset, out)] == ["skipped", "skipped"]
    records = batch.read_log(out / batch.LOG_NAME)
    assert [r["status"] for r in records] == ["ok"] * 2 + ["skipped"] * 3 + ["ok"] * 3 + ["skipped"] * 2
    assert records[-1]["options"]["roi_subset"] == ["liver"]


@pytest.mark.slow
def test_multilabel_batch_and_its_resume(tmp_path: Path, segmenter) -> None:
    from stuseg.results.labelmaps import save_multilabel

    inputs = _cohort(tmp_path / "in", 1)
    cases = batch.discover([tmp_path / "in"]).cases
    out = tmp_path / "out"
    assert [r.status for r in batch.run(cases, segmenter, out, multilabel=True)] == ["ok"]
    names = ["case0.ctbl", "case0.itksnap.txt", "case0.json", "case0.nii.gz", batch.LOG_NAME]
    assert sorted(p.name for p in out.iterdir()) == names
    seg = segmenter(inputs[0])
    save_multilabel(seg.labels, seg.image.header, tmp_path / "alone.nii.gz", seg.names, numbering="model")
    a, b = nib.load(out / "case0.nii.gz"), nib.load(tmp_path / "alone.nii.gz")
    assert a.header.binaryblock == b.header.binaryblock
    np.testing.assert_array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj))
    for suffix in (".json", ".itksnap.txt", ".ctbl"):
        assert (out / f"case0{suffix}").read_bytes() == (tmp_path / f"alone{suffix}").read_bytes()
    assert [r.status for r in batch.run(cases, segmenter, out, multilabel=True)] == ["skipped"]
    (out / "case0.json").unlink()  # incomplete: done again
    assert [r.status for r in batch.run(cases, segmenter, out, multilabel=True)] == ["ok"]
    assert sorted(p.name for p in out.iterdir()) == names


def test_a_case_that_cannot_be_written_fails_alone_and_leaves_nothing(
    tmp_path: Path, segmenter, monkeypatch: pytest.MonkeyPatch
) -> None:
    _cohort(tmp_path / "in", 2)
    cases = batch.discover([tmp_path / "in"]).cases
    from stuseg.results import labelmaps

    real = labelmaps.write_masks

    def disk_full_for_case0(folder: Path, labels: np.ndarray, *args, **kwargs) -> list[Path]:
        written = real(folder, labels, *args, **kwargs)  # the masks are written into the staged folder...
        if labels.shape[0] == 30:  # case0 is 30 voxels wide
            raise OSError(28, "No space left on device")  # ...and the disk fills up before the end
        return written

    monkeypatch.setattr(labelmaps, "write_masks", disk_full_for_case0)
    out = tmp_path / "out"
    results = list(batch.run(cases, segmenter, out))
    assert [(r.case.id, r.status) for r in results] == [("case0", "failed"), ("case1", "ok")]
    assert results[0].error == f"cannot write {out / 'case0'}: No space left on device; nothing was written"
    assert sorted(p.name for p in out.iterdir()) == ["case1", batch.LOG_NAME]


@pytest.mark.slow
def test_stopping_the_iteration_keeps_finished_cases_and_no_partial_output(tmp_path: Path, segmenter) -> None:
    _cohort(tmp_path / "in", 3)
    cases = batch.discover([tmp_path / "in"]).cases
    out = tmp_path / "out"
    results = batch.run(cases, segmenter, out)
    first = next(results)
    results.close()  # as Ctrl-C in the loop does
    assert first.status == "ok"
    done = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert "case0" in done
    assert len(done) < len(cases)  # closing stopped the batch: not every case was written
    _no_leftovers(out)
    for name in done:  # whatever was finished is whole
        assert len(list((out / name).glob("*.nii.gz"))) == 104
    logged = [r["case"] for r in batch.read_log(out / batch.LOG_NAME)]
    assert sorted(logged) == done
    # The rest is done by the next run.
    statuses = {r.case.id: r.status for r in batch.run(cases, segmenter, out)}
    assert all(statuses[n] == "skipped" for n in done) and set(statuses.values()) <= {"ok", "skipped"}
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == [c.id for c in cases]


def test_a_second_signal_exits_at_once(tmp_path: Path) -> None:
    """The first Ctrl-C unwinds (here: a slow clean-up); a second one ends the process at once."""
    script = (
        "import sys, time\n"
        "from stuseg.batch import Interrupted, signals_interrupt\n"
        "with signals_interrupt():\n"
        "    try:\n"
        "        print('ready', flush=True); time.sleep(30)\n"
        "    except Interrupted as exc:\n"
        "        print('cleaning', exc.signum, flush=True); time.sleep(30)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "ready\n"
    proc.send_signal(signal.SIGTERM)
    assert proc.stdout.readline() == f"cleaning {int(signal.SIGTERM)}\n"
    start = time.monotonic()
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=10) == 128 + signal.SIGINT
    assert time.monotonic() - start < 5


# --- the command, as a user runs it ------------------------------------------------------------


@pytest.mark.slow
def test_batch_command_matches_predict_and_goes_on_after_a_corrupt_case(
    tmp_path: Path, small_model: Path
) -> None:
    src = tmp_path / "in"
    write_ct(src / "a.nii.gz", shape=(40, 36, 32), seed=1)
    (src / "b_corrupt.nii.gz").write_bytes(b"\x1f\x8b\x08\x00 truncated")
    write_ct(src / "c.nii.gz", shape=(34, 40, 30), seed=2)
    series = src / "d_series"
    write_series(series, 6, offset=-1000, rows=30, cols=26)
    out = tmp_path / "out"
    common = ["--weights", str(small_model), "--step-size", "1.0", "--device", "cpu"]
    done = run_cli("batch", src, "-o", out, *common)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    # The synthetic cases are a few centimetres wide: each case read gets the field-of-view warning.
    warned = [line.split(": ", 3) for line in lines if line.startswith("stuseg: warning: ")]
    assert sorted(w[2] for w in warned) == ["a", "c", "d_series_s6"], done.stderr
    assert all(w[3].startswith("the field of view across the body is ") for w in warned), done.stderr
    lines = [line for line in lines if not line.startswith("stuseg: warning: ")]
    assert lines[0].startswith(
        f"stuseg: error: b_corrupt: cannot read {src / 'b_corrupt.nii.gz'}: it is damaged"
    )
    assert lines[-2].startswith("batch: 3 ok, 1 failed, 0 skipped in ") and "scans per minute" in lines[-2]
    assert lines[-1] == f"stuseg: error: 1 of 4 cases failed, see {out / batch.LOG_NAME}"
    assert sorted(p.name for p in out.iterdir()) == ["a", "c", "d_series_s6", batch.LOG_NAME]
    records = batch.read_log(out / batch.LOG_NAME)
    assert [(r["case"], r["status"]) for r in records] == [
        ("a", "ok"),
        ("b_corrupt", "failed"),
        ("c", "ok"),
        ("d_series_s6", "ok"),
    ]
    assert records[3]["shape"] == [26, 30, 12] and records[3]["size"] == "small"
    assert records[0]["weights_sha256"] == hashlib.sha256(small_model.read_bytes()).hexdigest()
    # Each case exactly as `stuseg predict` writes it.
    for case, source in (("a", src / "a.nii.gz"), ("d_series_s6", series)):
        alone = tmp_path / f"predict_{case}"
        result = CliRunner().invoke(app, ["predict", str(source), str(alone), *common, "-q"])
        assert result.exit_code == 0, result.output
        _same_masks(out / case, alone)
    # Run again: nothing is segmented, so the summary states no rate (it once said 0.00 a minute).
    again = run_cli("batch", src, "-o", out, *common).stderr.strip().splitlines()
    assert again[-2].startswith("batch: 0 ok, 1 failed, 3 skipped in ") and "per minute" not in again[-2]


def _wait_for_ok(path: Path, count: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    """Wait until the run log has ``count`` cases done (``ok`` records)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if sum(r["status"] == "ok" for r in batch.read_log(path)) >= count:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError(f"not {count} cases done after {timeout} s")


def _whole_cases_only(out: Path) -> list[str]:
    _no_leftovers(out)
    done = sorted(p.name for p in out.iterdir() if p.is_dir())
    for name in done:
        files = sorted(p.name for p in (out / name).iterdir())
        assert len(files) == 105 and ".stuseg-run.json" in files, name  # 104 masks and the marker
    return done


@pytest.mark.slow
def test_interrupted_by_sigint_then_sigterm_then_completed(tmp_path: Path, small_model: Path) -> None:
    src = tmp_path / "in"
    for i in range(4):
        write_ct(src / f"ct{i}.nii.gz", shape=(36 + i, 34, 30), seed=i)
    out = tmp_path / "out"
    log = out / batch.LOG_NAME
    cmd = [sys.executable, "-m", "stuseg", "batch", str(src), "-o", str(out), "--weights", str(small_model)]
    cmd += ["--step-size", "1.0", "--device", "cpu", "--fast", "-q"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    finished: list[str] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env)
        _wait_for_ok(log, len(finished) + 1, proc)  # one more case is done; the next is in flight
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 128 + sig, stderr
        lines = stderr.strip().splitlines()
        how = "terminated by SIGTERM" if sig == signal.SIGTERM else "interrupted by Ctrl-C"
        assert len(lines) == 1 and re.fullmatch(
            f"stuseg: error: {how}; \\d of 4 cases are done; run the same command again to go on",
            lines[0],
        ), stderr
        done = _whole_cases_only(out)
        assert lines[0].split("; ")[1] == f"{len(done)} of 4 cases are done"  # counted from the log
        ok = [r["case"] for r in batch.read_log(log) if r["status"] == "ok"]
        assert sorted(ok) == done and len(done) > len(finished)
        finished = done
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert _whole_cases_only(out) == ["ct0", "ct1", "ct2", "ct3"]
    last_run = [r for r in batch.read_log(log) if r["run"] == batch.read_log(log)[-1]["run"]]
    assert {r["case"]: r["status"] for r in last_run} == {
        c: ("skipped" if c in finished else "ok") for c in ("ct0", "ct1", "ct2", "ct3")
    }


def test_a_list_file_that_is_not_text_is_refused_in_one_line(tmp_path: Path) -> None:
    listing = tmp_path / "cases.txt"
    listing.write_bytes(b"ct1.nii.gz\n\xff\xfe not utf-8\n")
    result = CliRunner().invoke(app, ["batch", str(listing), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2  # the sources cannot be read: a usage error, as a missing one is
    assert re.fullmatch(r"stuseg: error: cannot read the list file \S+cases\.txt: .*utf-8.*\n", result.output)
    assert not (tmp_path / "out").exists()
