"""One result on disk (stuseg.results.write), written alike by predict and batch; resume across entry
points; outputs added on resume; the cohort tables; gzip headers; stuseg documents of one kind.

The network is either the real small architecture with fabricated weights (CLI tests, as in
test_batch.py) or test_batch.py's intensity-threshold network (fast Python API tests).
"""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from test_batch import DICOM_UIDS, Threshold, run_cli, write_ct
from test_dicomseg import dciodvfy_errors

from stuseg import batch
from stuseg.analysis import statistics
from stuseg.cli import app  # noqa: F401  (the CLI module must import with the results module)
from stuseg.results import write as results
from stuseg.results.labelmaps import save_multilabel
from stuseg.results.outputs import MARKER


@pytest.fixture
def segmenter():
    from stuseg.inference.pipeline import Segmenter

    return Segmenter(model=Threshold.build(), device="cpu", step_size=1.0, fast=True)


def _tree(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


# --- where each output goes -------------------------------------------------------------------


@pytest.mark.parametrize("name", ["OUT.nii.gz", "OUT.NII.GZ", "OUT.Nii.Gz"])
def test_every_file_of_an_ml_result_is_named_after_its_stem(tmp_path: Path, segmenter, name: str) -> None:
    ct = write_ct(tmp_path / "ct.nii.gz")
    volume, _ = results.read_ct(ct)
    seg = segmenter(volume)
    layout = results.Layout(tmp_path / name, True, ("nifti", "statistics", "preview"))
    layout.check([ct])
    written = results.write_result(
        layout, seg, results.Request(statistics=True, preview=True), results.Sources(ct=volume)
    )
    expected = {name, "OUT.json", "OUT.itksnap.txt", "OUT.ctbl", "OUT.statistics.json", "OUT.statistics.csv",
                "OUT.preview.png"}  # fmt: skip
    assert {p.name for p in written.paths} == expected
    assert {p.name for p in tmp_path.iterdir()} == expected | {"ct.nii.gz"}


def test_gzip_headers_name_no_staging_file(tmp_path: Path, segmenter) -> None:
    ct = write_ct(tmp_path / "ct.nii.gz")
    seg = segmenter(ct)
    out = tmp_path / "masks"
    results.write_result(results.Layout(out, False), seg, results.Request())
    mask = out / "liver.nii.gz"
    head = mask.read_bytes()[:10]
    assert head[:3] == b"\x1f\x8b\x08" and head[3] & 0x08 == 0  # FLG: no FNAME field
    # gunzip -N restores the name stored in the header, if any: here the file's own.
    if shutil.which("gunzip") is None:
        pytest.skip("gunzip is not installed")
    work = tmp_path / "gunzip"
    work.mkdir()
    shutil.copy(mask, work / "copy.nii.gz")
    subprocess.run(["gunzip", "-N", str(work / "copy.nii.gz")], check=True)
    assert [p.name for p in work.iterdir()] == ["copy.nii"]
    assert (work / "copy.nii").read_bytes() == gzip.decompress(mask.read_bytes())


# --- a stuseg document of one kind is not replaced by another --------------------------------


def test_statistics_do_not_replace_a_label_table_nor_the_reverse(tmp_path: Path) -> None:
    ct = write_ct(tmp_path / "ct.nii.gz", shape=(20, 18, 16))
    labels = np.zeros((20, 18, 16), np.uint8)
    labels[4:10, 4:10, 4:10] = 5  # liver
    import nibabel as nib

    save_multilabel(labels, nib.load(ct).header, tmp_path / "seg.nii.gz", {5: "liver"}, numbering="model")
    before = _tree(tmp_path)
    done = run_cli("statistics", tmp_path / "seg.nii.gz", ct, "-o", tmp_path / "seg.json")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.startswith(f"stuseg: error: the file {tmp_path / 'seg.json'} is a label table"), (
        done.stderr
    )
    assert _tree(tmp_path) == before
    # The reverse: statistics in other.json, then a multilabel result other.nii.gz over them.
    assert run_cli("statistics", tmp_path / "seg.nii.gz", ct, "-o", tmp_path / "other.json").returncode == 0
    before = _tree(tmp_path)
    done = run_cli("export-labels", tmp_path / "seg.nii.gz", tmp_path / "other.nii.gz", "--ml", "-l", "liver")
    assert done.returncode == 1 and "is a statistics file" in done.stderr, done.stderr
    assert _tree(tmp_path) == before


def test_statistics_replaced_under_overwrite_take_their_csv_twin(tmp_path: Path) -> None:
    """A label table written over a statistics file (--overwrite) leaves no statistics CSV
    beside it; statistics written again keep theirs."""
    import nibabel as nib

    ct = write_ct(tmp_path / "ct.nii.gz", shape=(20, 18, 16))
    labels = np.zeros((20, 18, 16), np.uint8)
    labels[4:10, 4:10, 4:10] = 5  # liver
    save_multilabel(labels, nib.load(ct).header, tmp_path / "seg.nii.gz", {5: "liver"}, numbering="model")
    stats = ["statistics", tmp_path / "seg.nii.gz", ct, "-o", tmp_path / "other.json"]
    assert run_cli(*stats).returncode == 0
    assert run_cli(*stats, "--overwrite").returncode == 0  # statistics again: both files stay
    assert {"other.json", "other.csv"} <= set(_tree(tmp_path))
    ml = ["export-labels", tmp_path / "seg.nii.gz", tmp_path / "other.nii.gz", "--ml", "-l", "liver"]
    done = run_cli(*ml, "--overwrite")
    assert done.returncode == 0, done.stderr
    names = set(_tree(tmp_path))
    assert {"other.nii.gz", "other.json", "other.itksnap.txt", "other.ctbl"} <= names
    assert "other.csv" not in names
    assert json.loads((tmp_path / "other.json").read_text())["format"].startswith("stuseg-labels/")


# --- batch: outputs on resume, one weights identity, the cohort tables ------------------------


def test_a_resumed_batch_that_asks_for_statistics_adds_them_and_the_cohort_tables(
    tmp_path: Path, segmenter
) -> None:
    for i in range(2):
        write_ct(tmp_path / "in" / f"case{i}.nii.gz", shape=(30 + 2 * i, 28, 26), seed=i)
    cases = batch.discover([tmp_path / "in"]).cases
    out = tmp_path / "out"
    assert [r.status for r in batch.run(cases, segmenter, out)] == ["ok", "ok"]
    assert not (out / "case0" / "statistics.json").exists()
    wanted = results.Request(statistics=True)
    # Done without statistics: not done for a run that asks for them; segmented and written again.
    assert [r.status for r in batch.run(cases, segmenter, out, request=wanted)] == ["ok", "ok"]
    assert [r.status for r in batch.run(cases, segmenter, out, request=wanted)] == ["skipped", "skipped"]
    # ... and a run that asks for less finds them done.
    assert [r.status for r in batch.run(cases, segmenter, out)] == ["skipped", "skipped"]
    for case in cases:
        stats = json.loads((out / case.id / "statistics.json").read_text())
        alone = segmenter(results.read_ct(case.input)[0]).statistics(mode="fast")
        assert stats["structures"] == json.loads(alone.to_json())["structures"]

    done = run_cli("statistics", out)
    assert done.returncode == 0, done.stderr
    table = pd.read_csv(out / "stuseg-cohort.csv")
    per_case = pd.concat(
        [pd.read_csv(out / c.id / "statistics.csv").assign(case=c.id) for c in cases], ignore_index=True
    )
    assert list(table.columns) == ["case", "input", "size", "mode", "weights_sha256", *statistics.COLUMNS]
    pd.testing.assert_frame_equal(table[per_case.columns], per_case)
    assert set(table["input"]) == {str(c.input.resolve()) for c in cases}
    assert set(table["mode"]) == {"fast"} and set(table["size"]) == {"custom"}
    assert set(table["weights_sha256"]) == {segmenter.weights_sha256}
    log = {r["case"]: r for r in batch.read_log(out / batch.LOG_NAME) if r["status"] == "ok"}
    rows = pd.read_csv(out / "stuseg-cohort.cases.csv").set_index("case")
    for case in cases:
        rec = log[case.id]
        assert rows.loc[case.id, "status"] == "ok"
        assert [rows.loc[case.id, f"shape_{a}"] for a in "ijk"] == rec["shape"]
        assert rows.loc[case.id, "seconds_network"] == pytest.approx(rec["seconds"]["network"])
        assert rows.loc[case.id, "peak_rss_bytes"] == rec["peak_rss_bytes"]
        assert rows.loc[case.id, "device"] == "cpu"
        assert rows.loc[case.id, "precision"] == segmenter.precision == "float32"
    # Written again on request, the tables are recognised as stuseg's.
    assert run_cli("statistics", out).returncode == 0


def test_a_failed_case_keeps_its_traceback(tmp_path: Path, segmenter) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "broken.nii.gz").write_bytes(b"\x1f\x8b\x08\x00 not a whole gzip stream")
    cases = batch.discover([tmp_path / "in"]).cases
    (result,) = batch.run(cases, segmenter, tmp_path / "out")
    assert result.status == "failed" and "\n" not in result.error
    assert "Traceback (most recent call last)" in result.record["traceback"]


@pytest.fixture(scope="module")
def small_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fabricate import small_checkpoint

    return small_checkpoint(lambda: tmp_path_factory.mktemp("fabricated"))


COMMON = ("--step-size", "1.0", "--device", "cpu")


@pytest.mark.slow
def test_python_batch_resumes_from_the_cli_and_the_reverse(tmp_path: Path, small_model: Path) -> None:
    from stuseg.inference.pipeline import Segmenter

    write_ct(tmp_path / "in" / "a.nii.gz", shape=(40, 36, 32), seed=1)
    cases = batch.discover([tmp_path / "in"]).cases
    segmenter = Segmenter(weights=small_model, device="cpu", step_size=1.0)
    first = tmp_path / "api_first"
    assert [r.status for r in batch.run(cases, segmenter, first)] == ["ok"]
    done = run_cli("batch", tmp_path / "in", "-o", first, "--weights", small_model, *COMMON)
    assert done.returncode == 0, done.stderr
    assert [r["status"] for r in batch.read_log(first / batch.LOG_NAME)] == ["ok", "skipped"]
    second = tmp_path / "cli_first"
    done = run_cli("batch", tmp_path / "in", "-o", second, "--weights", small_model, *COMMON)
    assert done.returncode == 0, done.stderr
    assert [r.status for r in batch.run(cases, segmenter, second)] == ["skipped"]
    assert {r["weights_sha256"] for r in batch.read_log(second / batch.LOG_NAME)} == {
        segmenter.weights_sha256
    }


def _seg_content(path: Path) -> tuple[list[str], bytes]:
    ds = pydicom.dcmread(path)
    return [s.SegmentLabel for s in ds.SegmentSequence], ds.PixelData


@pytest.mark.slow
def test_batch_writes_every_output_exactly_as_predict(tmp_path: Path, small_model: Path) -> None:
    src = tmp_path / "in"
    write_ct(src / "a.nii.gz", shape=(40, 36, 32), seed=1)
    shutil.copytree(DICOM_UIDS, src / "series")
    out = tmp_path / "out"
    options = ["--statistics", "--preview", "--output-type", "nifti", "--output-type", "dicom-seg"]
    done = run_cli("batch", src, "-o", out, "--weights", small_model, *COMMON, *options)
    assert done.returncode == 0, done.stderr
    records = {r["case"]: r for r in batch.read_log(out / batch.LOG_NAME)}
    assert len(records) == 2 and "a" in records, records
    series_case = next(c for c in records if c != "a")
    # The NIfTI case: everything but the SEG, which is left out with the reason in its record.
    assert any("the input is not a DICOM series" in w for w in records["a"]["warnings"])
    assert records["a"]["products"] == ["nifti", "statistics", "preview"]
    assert records[series_case]["products"] == ["nifti", "statistics", "preview", "dicom-seg:binary"]
    for case, source in (("a", src / "a.nii.gz"), (series_case, src / "series")):
        alone = tmp_path / f"predict_{case}"
        types = options if case != "a" else options[:-2]
        done = run_cli("predict", source, alone, "--weights", small_model, *COMMON, *types, "-q")
        assert done.returncode == 0, done.stderr
        batch_files = sorted(p.name for p in (out / case).iterdir() if p.name != MARKER)
        assert batch_files == sorted(p.name for p in alone.iterdir() if p.name != MARKER)
        for name in batch_files:
            if name.endswith((".nii.gz", ".png")):
                assert (out / case / name).read_bytes() == (alone / name).read_bytes(), name
        a, b = (json.loads((f / "statistics.json").read_text()) for f in (out / case, alone))
        assert a == b
    assert "seg.dcm" in batch_files  # the series case's
    assert _seg_content(out / series_case / "seg.dcm") == _seg_content(
        tmp_path / f"predict_{series_case}" / "seg.dcm"
    )
    assert dciodvfy_errors(out / series_case / "seg.dcm") == []


def test_a_scan_named_like_the_batch_folders_own_files_gets_a_distinct_id(tmp_path: Path, segmenter) -> None:
    for i, name in enumerate(["stuseg-batch.jsonl", "STUSEG-COHORT.csv", "stuseg-cohort.cases.csv"]):
        write_ct(tmp_path / "in" / f"{name}.nii.gz", shape=(24, 22, 20), seed=i)
    cases = batch.discover([tmp_path / "in"]).cases
    ids = ["STUSEG-COHORT.csv_", "stuseg-batch.jsonl_", "stuseg-cohort.cases.csv_"]
    assert sorted(c.id for c in cases) == ids
    out = tmp_path / "out"
    assert [r.status for r in batch.run(cases, segmenter, out)] == ["ok"] * 3
    assert (out / batch.LOG_NAME).is_file() and (out / "stuseg-batch.jsonl_" / "liver.nii.gz").is_file()
    done = run_cli("statistics", out)
    assert done.returncode == 0, done.stderr
    table = pd.read_csv(out / "stuseg-cohort.csv")
    assert set(table["case"]) == {c.id for c in cases}


@pytest.mark.slow  # about 13 s on 2 cores (the network on a real series, twice)
def test_a_series_whose_headers_cannot_be_referenced_loses_only_its_dicom_outputs(
    tmp_path: Path, segmenter
) -> None:
    """A batch asking for masks, a DICOM-SEG and an RTSTRUCT over a series whose files lack their
    FrameOfReferenceUID (a badly anonymised series): the masks are written, the SEG and RTSTRUCT
    are left out with the reason in the case's record; asked for only those, the case fails."""
    series = tmp_path / "in" / "series"
    series.mkdir(parents=True)
    for f in sorted(DICOM_UIDS.iterdir()):
        ds = pydicom.dcmread(f)
        del ds.FrameOfReferenceUID
        ds.save_as(series / f.name)
    cases = batch.discover([tmp_path / "in"]).cases
    assert len(cases) == 1 and cases[0].series is not None
    out = tmp_path / "out"
    request = results.Request(nifti=True, dicom_seg=True, rtstruct=True)
    (result,) = batch.run(cases, segmenter, out, request=request, multilabel=True)
    assert result.status == "ok", result.error
    assert (out / f"{cases[0].id}.nii.gz").is_file() and not list(out.glob("*.dcm"))
    for what in ("DICOM-SEG", "RTSTRUCT"):
        (reason,) = [w for w in result.record["warnings"] if w.startswith(f"no {what} was written: ")]
        assert "FrameOfReferenceUID" in reason and "badly anonymised" in reason
    only_dicom = results.Request(nifti=False, dicom_seg=True)
    (result,) = batch.run(cases, segmenter, tmp_path / "out2", request=only_dicom, multilabel=True)
    assert result.status == "failed" and "FrameOfReferenceUID" in result.error
