"""Statistics per structure: against a per-mask numpy computation, against TotalSegmentator's
formula on its own real result, and ``stuseg statistics`` / ``predict --statistics`` end to end."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from stuseg.analysis import statistics
from stuseg.cli import app
from stuseg.errors import InputError, LabelError
from stuseg.results import labelmaps, scans

DATA = Path(__file__).parent / "data"
TS = DATA / "totalseg_results"
TS_CT = TS / "abdomen_ct_sm.nii.gz"
TS_MASKS = TS / "abdomen_ct_sm_masks"
INTENSITY = ("mean_hu", "std_hu", "median_hu", "min_hu", "max_hu", "p05_hu", "p95_hu")


def oblique_lps_affine(spacing: tuple[float, float, float]) -> np.ndarray:
    """Rotated about two axes, x and y flipped (LPS-like), anisotropic."""
    a, b = np.deg2rad(25), np.deg2rad(-10)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    affine = np.eye(4)
    affine[:3, :3] = np.diag([-1, -1, 1]) @ rz @ rx @ np.diag(spacing)
    affine[:3, 3] = [101.5, -72.25, 33.0]
    return affine


def oracle(mask: np.ndarray, ct: np.ndarray, affine: np.ndarray) -> dict[str, object]:
    """A straightforward per-mask computation, written independently of stuseg.analysis.statistics."""
    n = int(mask.sum())
    out: dict[str, object] = {"voxels": n, "volume_ml": n * abs(np.linalg.det(affine[:3, :3])) / 1000}
    if n == 0:
        return out
    vals = ct[mask].astype(np.float64)  # statistics in float64, as documented
    out |= {
        "mean_hu": vals.mean(),
        "std_hu": vals.std(),
        "median_hu": np.median(vals),
        "min_hu": vals.min(),
        "max_hu": vals.max(),
        "p05_hu": np.percentile(vals, 5),
        "p95_hu": np.percentile(vals, 95),
    }
    idx = np.argwhere(mask)
    out["centroid_ijk"] = idx.mean(axis=0)
    # World centroid as the mean of every voxel's world position (not the affine of the mean).
    out["centroid_xyz"] = nib.affines.apply_affine(affine, idx).mean(axis=0)
    out["bbox"] = (idx.min(axis=0), idx.max(axis=0))
    faces = [mask[0], mask[-1], mask[:, 0], mask[:, -1], mask[:, :, 0], mask[:, :, -1]]
    out["touches_border"] = any(f.any() for f in faces)
    return out


def assert_record_matches(rec: dict[str, object], want: dict[str, object]) -> None:
    assert rec["voxels"] == want["voxels"]
    assert rec["volume_ml"] == pytest.approx(want["volume_ml"], rel=1e-12)
    if want["voxels"] == 0:
        assert all(rec[c] is None for c in (*INTENSITY, "centroid_i", "centroid_x_ras_mm", "bbox_i_min"))
        assert rec["touches_border"] is None
        return
    for c in ("median_hu", "min_hu", "max_hu", "p05_hu", "p95_hu"):
        assert rec[c] == float(want[c]), c  # the same values: the same order statistics
    assert rec["mean_hu"] == pytest.approx(want["mean_hu"], rel=1e-10, abs=1e-9)
    assert rec["std_hu"] == pytest.approx(want["std_hu"], rel=1e-10, abs=1e-9)
    ijk = [rec["centroid_i"], rec["centroid_j"], rec["centroid_k"]]
    np.testing.assert_allclose(ijk, want["centroid_ijk"], rtol=0, atol=1e-9)
    xyz = [rec["centroid_x_ras_mm"], rec["centroid_y_ras_mm"], rec["centroid_z_ras_mm"]]
    np.testing.assert_allclose(xyz, want["centroid_xyz"], rtol=0, atol=1e-6)
    lo, hi = want["bbox"]
    assert [rec["bbox_i_min"], rec["bbox_j_min"], rec["bbox_k_min"]] == lo.tolist()
    assert [rec["bbox_i_max"], rec["bbox_j_max"], rec["bbox_k_max"]] == hi.tolist()
    assert rec["touches_border"] == want["touches_border"]


def blobby_labels(shape: tuple[int, int, int], n_labels: int, seed: int) -> np.ndarray:
    """Random labels in coarse blocks (structures of many voxels), background in between."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, n_labels + 1, [max(1, s // 4) for s in shape])
    full = coarse.repeat(4, 0).repeat(4, 1).repeat(4, 2)
    out = np.zeros(shape, np.uint8)
    sl = tuple(slice(0, min(a, b)) for a, b in zip(shape, full.shape))
    out[sl] = full[sl]
    return out


@pytest.mark.parametrize(
    ("order", "ct_dtype", "affine"),
    [
        ("F", np.float32, np.diag([0.7, 0.7, 2.5, 1.0])),  # anisotropic, as nibabel reads
        ("C", np.int16, oblique_lps_affine((0.8, 1.25, 3.0))),  # oblique LPS, C order, integer HU
        ("F", np.float64, oblique_lps_affine((1.5, 1.5, 1.5))),
    ],
)
def test_every_field_equals_a_per_mask_numpy_computation(
    order: str, ct_dtype: type, affine: np.ndarray
) -> None:
    shape = (21, 18, 13)
    labels = blobby_labels(shape, 9, seed=1)
    labels[labels == 4] = 0  # named but absent
    labels[labels == 5] = 0
    labels[10, 9, 6] = 5  # a one-voxel structure inside, away from every face
    labels[0, 17, 12] = 11  # a one-voxel structure in a corner
    rng = np.random.default_rng(2)
    ct = rng.normal(30, 200, shape)
    ct = ct.round().astype(ct_dtype) if np.issubdtype(ct_dtype, np.integer) else ct.astype(ct_dtype)
    labels, ct = np.asarray(labels, order=order), np.asarray(ct, order=order)
    names = {v: f"structure_{v}" for v in range(1, 13)}  # 12 is named, never present
    stats = statistics.compute(labels, affine, ct, names)
    assert [r["label"] for r in stats.structures] == list(range(1, 13))
    assert list(stats.structures[0]) == list(statistics.COLUMNS)
    for rec in stats.structures:
        assert_record_matches(rec, oracle(labels == rec["label"], ct, affine))
    by_name = stats.by_name()
    assert by_name["structure_5"]["touches_border"] is False and by_name["structure_5"]["voxels"] == 1
    assert by_name["structure_11"]["touches_border"] is True
    assert by_name["structure_4"]["voxels"] == 0 and by_name["structure_12"]["voxels"] == 0


def test_percentiles_equal_numpy_bit_for_bit_for_every_run_length() -> None:
    rng = np.random.default_rng(5)
    for n in [*range(1, 60), 1000, 4097]:
        values = np.sort(rng.normal(0, 300, n))
        got = statistics._percentiles_of_sorted(values, (5, 50, 95))
        assert got == [np.percentile(values, 5), np.percentile(values, 50), np.percentile(values, 95)], n
        stats = statistics.compute(
            np.ones((n, 1, 1), np.uint8), np.eye(4), rng.permutation(values)[:, None, None], {1: "x"}
        )
        rec = stats.structures[0]
        assert (rec["p05_hu"], rec["median_hu"], rec["p95_hu"]) == (got[0], np.median(values), got[2]), n


def test_image_fields() -> None:
    affine = np.diag([-0.8, -0.8, 2.0, 1.0])
    stats = statistics.compute(
        np.ones((4, 5, 6), np.uint8),
        affine,
        np.zeros((4, 5, 6), np.float32),
        {1: "liver"},
        size="base",
        mode="fast",
    )
    from stuseg import __version__

    assert stats.image["shape"] == [4, 5, 6]
    assert stats.image["spacing_mm"] == [0.8, 0.8, 2.0]
    assert stats.image["orientation"] == "LPS"
    assert stats.image["stuseg_version"] == __version__
    assert (stats.image["model_size"], stats.image["mode"]) == ("base", "fast")
    assert stats.structures[0]["volume_ml"] == pytest.approx(4 * 5 * 6 * 0.8 * 0.8 * 2.0 / 1000, rel=1e-12)
    assert stats.structures[0]["touches_border"] is True


def test_a_value_without_a_name_is_an_error() -> None:
    labels = np.zeros((3, 3, 3), np.uint8)
    labels[1, 1, 1] = 7
    with pytest.raises(LabelError, match="label value 7 in the segmentation has no name"):
        statistics.compute(labels, np.eye(4), np.zeros((3, 3, 3)), {1: "liver"})


def test_overlapping_masks_are_each_measured_exactly(tmp_path: Path) -> None:
    shape = (12, 10, 8)
    affine = np.diag([1.0, 1.5, 2.0, 1.0])
    rng = np.random.default_rng(3)
    ct = rng.normal(0, 100, shape).astype(np.float32)
    masks = {
        "a": np.zeros(shape, np.uint8),
        "b": np.zeros(shape, np.uint8),
        "c": np.zeros(shape, np.uint8),
        "empty": np.zeros(shape, np.uint8),
    }
    masks["a"][2:8, 2:8, 1:6] = 1
    masks["b"][5:11, 4:9, 3:8] = 1  # overlaps a
    masks["c"][0:3, 0:3, 0:3] = 255  # any single non-zero value marks a mask
    for name, m in masks.items():
        nib.save(nib.Nifti1Image(m, affine), tmp_path / f"{name}.nii.gz")
    layers, header, names = labelmaps.load_named_masks(tmp_path)
    assert sorted(names.values()) == ["a", "b", "c", "empty"]
    assert len(layers) == 2  # b cannot share a layer with a
    stats = statistics.compute(layers, header, ct, names).by_name()
    for name, m in masks.items():
        assert_record_matches(stats[name], oracle(m != 0, ct, affine))


def test_a_label_map_in_a_mask_folder_is_refused(tmp_path: Path) -> None:
    data = np.zeros((4, 4, 4), np.uint8)
    data[0, 0, 0], data[1, 1, 1] = 1, 2
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "seg.nii.gz")
    with pytest.raises(LabelError, match=r"seg.nii.gz holds several non-zero values \(1..2\)"):
        labelmaps.load_named_masks(tmp_path)


def test_totalsegmentator_volumes_and_mean_hu_match_its_statistics_formula() -> None:
    """TotalSegmentator's --statistics (totalsegmentator/statistics.py, get_basic_statistics):
    volume = voxels x product of the header zooms, in mm^3; intensity = np.average of the CT
    (cast to int16) weighted by the mask, rounded to 5 decimals. Its default also reports 0 for
    masks within 3 voxels of a face; that exclusion is not applied here (we flag the border)."""
    ct_img = nib.load(TS_CT)
    ct16 = ct_img.get_fdata().astype(np.int16)
    zooms = ct_img.header.get_zooms()
    stats = scans.load_scan(TS_MASKS, TS_CT)
    result = statistics.compute(stats.labels, stats.affine, stats.ct, stats.names).by_name()
    files = sorted(TS_MASKS.glob("*.nii.gz"))
    assert len(files) == 117 and len(result) == 117
    present = 0
    for path in files:
        name = path.name[: -len(".nii.gz")]
        mask = np.asanyarray(nib.load(path).dataobj) > 0
        volume_mm3 = mask.sum() * zooms[0] * zooms[1] * zooms[2]
        rec = result[name]
        assert rec["volume_ml"] * 1000 == pytest.approx(volume_mm3, rel=1e-12), name
        if mask.any():
            present += 1
            intensity = np.average(ct16, weights=mask.astype(np.uint8)).round(5)
            assert round(rec["mean_hu"], 5) == pytest.approx(intensity, abs=1e-9), name
        else:
            assert rec["voxels"] == 0 and rec["mean_hu"] is None
    assert present == 40
    # Anatomy: the liver lies on the patient's right (RAS x > the spleen's).
    assert result["liver"]["centroid_x_ras_mm"] > result["spleen"]["centroid_x_ras_mm"] + 100


def test_totalsegmentator_multilabel_stored_flipped_is_matched_to_the_dicom_grid() -> None:
    """TotalSegmentator's multilabel result for the DICOM series is stored with the j axis
    reversed (LAS) relative to the series as read (LPS): the same voxels, matched exactly."""
    scan = scans.load_scan(
        TS / "abdomen_ct_dicom_multilabel.nii.gz",
        DATA / "abdomen_ct_dicom",
        names=TS / "totalsegmentator_v2_total_labels.json",
    )
    assert scan.reordered
    raw = np.asanyarray(nib.load(TS / "abdomen_ct_dicom_multilabel.nii.gz").dataobj)
    np.testing.assert_array_equal(scan.labels[0], raw[:, ::-1, :])
    result = statistics.compute(scan.labels, scan.affine, scan.ct, scan.names).by_name()
    liver = raw[:, ::-1, :] == 5
    assert_record_matches(result["liver"], oracle(liver, scan.ct, scan.affine))
    assert result["liver"]["centroid_x_ras_mm"] > result["spleen"]["centroid_x_ras_mm"]


def test_align_to_refuses_other_grids() -> None:
    labels = np.zeros((4, 5, 6), np.uint8)
    with pytest.raises(
        InputError, match=r"^SEG and CT are not on the same grid \(shape \(4, 5, 6\) vs \(4, 5, 7\)\)"
    ):
        statistics.align_to(labels, np.eye(4), (4, 5, 7), np.eye(4))
    shifted = np.eye(4)
    shifted[0, 3] = 0.5  # half a voxel
    with pytest.raises(InputError, match="different voxel-to-world affines"):
        statistics.align_to(labels, np.eye(4), (4, 5, 6), shifted)
    # A permutation and flip of the same voxels is matched, not refused.
    target = np.array([[0, 1, 0, 0], [-1, 0, 0, 4], [0, 0, 1, 0], [0, 0, 0, 1]], float)
    labels[1, 2, 3] = 1
    out, reordered = statistics.align_to(labels, np.eye(4), (5, 4, 6), target)
    assert reordered and out.shape == (5, 4, 6)
    (voxel,) = np.argwhere(out)
    np.testing.assert_allclose(nib.affines.apply_affine(target, voxel), [1, 2, 3])


def test_cohort_csv_has_one_row_per_case_and_structure() -> None:
    a = statistics.compute(
        np.ones((2, 2, 2), np.uint8), np.eye(4), np.zeros((2, 2, 2)), {1: "liver", 2: "spleen"}
    )
    text = statistics.csv_text([("case_a", a), ("case_b", a)])
    rows = list(csv.DictReader(io.StringIO(text)))
    assert list(rows[0]) == ["case", *statistics.COLUMNS]
    assert [(r["case"], r["structure"]) for r in rows] == [
        ("case_a", "liver"), ("case_a", "spleen"), ("case_b", "liver"), ("case_b", "spleen"),
    ]  # fmt: skip
    assert rows[1]["voxels"] == "0" and rows[1]["mean_hu"] == "" and rows[0]["touches_border"] == "true"


# --- command line ------------------------------------------------------------------------------


def read_csv(path_or_text: Path | str) -> list[dict[str, str]]:
    text = path_or_text.read_text() if isinstance(path_or_text, Path) else path_or_text
    return list(csv.DictReader(io.StringIO(text)))


def test_statistics_command_writes_json_and_csv(tmp_path: Path) -> None:
    out = tmp_path / "stats.json"
    result = CliRunner().invoke(app, ["statistics", str(TS_MASKS), str(TS_CT), "--output", str(out)])
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    assert doc["format"] == "stuseg-statistics/1" and doc["image"]["orientation"] == "RAS"
    assert len(doc["structures"]) == 117
    rows = read_csv(tmp_path / "stats.csv")
    assert len(rows) == 117
    liver = next(r for r in rows if r["structure"] == "liver")
    assert float(liver["volume_ml"]) == doc["structures"]["liver"]["volume_ml"]
    assert int(liver["voxels"]) == int(np.asanyarray(nib.load(TS_MASKS / "liver.nii.gz").dataobj).sum())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stats.csv", "stats.json"]


def test_statistics_command_prints_csv_without_output() -> None:
    result = CliRunner().invoke(app, ["statistics", str(TS_MASKS), str(TS_CT)])
    assert result.exit_code == 0, result.output
    rows = read_csv(result.stdout)
    assert len(rows) == 117 and rows[0]["structure"] == "adrenal_gland_left"


def test_statistics_command_in_a_subprocess(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = tmp_path / "s.json"
    cmd = [sys.executable, "-m", "stuseg", "statistics", str(TS_MASKS), str(TS_CT), "-o", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines() == [
        # TotalSegmentator's --fast pancreas lies in two halves 28 mm apart (see test_quality.py).
        "stuseg: quality: pancreas in 2 pieces (49% outside the largest)",
        f"wrote {out} and {tmp_path / 's.csv'} (40 of 117 structures present)",
    ]
    assert len(read_csv(tmp_path / "s.csv")) == 117


@pytest.fixture
def other_grid_ct(tmp_path: Path) -> Path:
    ct = nib.load(TS_CT)
    path = tmp_path / "other.nii.gz"
    nib.save(nib.Nifti1Image(np.asanyarray(ct.dataobj)[:, :, :29], ct.affine), path)
    return path


def test_statistics_on_another_grid_is_one_line_and_writes_nothing(
    tmp_path: Path, other_grid_ct: Path
) -> None:
    out = tmp_path / "out" / "s.json"
    out.parent.mkdir()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [sys.executable, "-m", "stuseg", "statistics", str(TS_MASKS), str(other_grid_ct), "-o", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        "stuseg: error: SEG and CT are not on the same grid (shape (122, 101, 30) vs (122, 101, 29)); "
        "give the CT the segmentation was made from"
    ]
    assert list(out.parent.iterdir()) == []


def test_statistics_on_a_shifted_affine_is_refused(tmp_path: Path) -> None:
    ct = nib.load(TS_CT)
    affine = ct.affine.copy()
    affine[2, 3] += 1.5  # half a slice
    path = tmp_path / "shifted.nii.gz"
    nib.save(nib.Nifti1Image(np.asanyarray(ct.dataobj), affine), path)
    result = CliRunner().invoke(app, ["statistics", str(TS_MASKS), str(path), "-o", str(tmp_path / "s.json")])
    assert result.exit_code == 1
    assert result.stderr.splitlines()[0] == (
        "stuseg: error: SEG and CT are not on the same grid (different voxel-to-world affines); "
        "give the CT the segmentation was made from"
    )
    assert "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shifted.nii.gz"]


def test_statistics_output_must_be_json_outside_the_inputs(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["statistics", str(TS_MASKS), str(TS_CT), "-o", str(tmp_path / "s.txt")])
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [f"stuseg: error: {tmp_path / 's.txt'} must end in .json"]
    inside = TS_MASKS / "s.json"
    result = CliRunner().invoke(app, ["statistics", str(TS_MASKS), str(TS_CT), "-o", str(inside)])
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        f"stuseg: error: the output {inside} lies inside the input folder {TS_MASKS}; give a file outside it"
    ]
    assert not inside.exists()
    assert list(tmp_path.iterdir()) == []


def test_multilabel_without_names_for_other_tools_labels(tmp_path: Path) -> None:
    """A TotalSegmentator multilabel file without --names: its values are not stuseg's."""
    result = CliRunner().invoke(
        app, ["statistics", str(TS / "abdomen_ct_dicom_multilabel.nii.gz"), str(DATA / "abdomen_ct_dicom")]
    )
    assert result.exit_code == 1
    assert result.stderr.splitlines()[0].startswith("stuseg: error: ")
    assert "Traceback" not in result.output


# --- predict --statistics ------------------------------------------------------------------------


@pytest.fixture
def small_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fabricate import small_checkpoint

    return small_checkpoint(lambda: tmp_path_factory.mktemp("fabricated"))


def test_predict_with_statistics_and_preview_in_a_folder(tmp_path: Path, make_nifti, monkeypatch) -> None:
    """The wiring of the two flags; the network is replaced by a fixed segmentation (the real
    network runs in the subprocess test below)."""
    from stuseg.images.io import Volume, label_image
    from stuseg.inference import pipeline
    from stuseg.structures import labels as lbl

    ct = make_nifti(shape=(40, 36, 30), affine=np.diag([-1.2, -1.2, 2.0, 1.0]))
    made = blobby_labels((40, 36, 30), 6, seed=4)

    def fake_segment(image: object, **kwargs: object) -> pipeline.Segmentation:
        assert isinstance(image, Volume)  # read once by the command, for statistics and preview
        return pipeline.Segmentation(
            image=label_image(made, image.header), names=dict(enumerate(lbl.STRUCTURES, 1)), size="small"
        )

    monkeypatch.setattr(pipeline, "segment", fake_segment)
    out = tmp_path / "masks"
    args = ["predict", str(ct), str(out), "--fast", "--statistics", "--preview", "-q"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert (out / "preview.png").is_file()
    doc = json.loads((out / "statistics.json").read_text())
    assert doc["image"]["model_size"] == "small" and doc["image"]["mode"] == "fast"
    assert doc["image"]["orientation"] == "LPS"
    assert len(doc["structures"]) == 104 and len(read_csv(out / "statistics.csv")) == 104
    # The same numbers as measuring the written masks on the input, mask by mask.
    ct_img = nib.load(ct)
    ct_data = ct_img.get_fdata(dtype=np.float32)
    present = {name: rec for name, rec in doc["structures"].items() if rec["voxels"]}
    assert len(present) == 6 == len(np.unique(made)) - 1
    for name, rec in present.items():
        mask = np.asanyarray(nib.load(out / f"{name}.nii.gz").dataobj) != 0
        assert_record_matches(rec, oracle(mask, ct_data, ct_img.affine))


@pytest.mark.slow  # runs the real (fabricated) network: ~30 s on a busy 2-core machine
def test_predict_ml_with_statistics_in_a_subprocess(tmp_path: Path, small_model: Path, make_nifti) -> None:
    ct = make_nifti(shape=(36, 32, 28))
    out = tmp_path / "seg.nii.gz"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [sys.executable, "-m", "stuseg", "predict", str(ct), str(out), "--weights", str(small_model)]
    cmd += ["--ml", "--fast", "--step-size", "1.0", "--device", "cpu", "--statistics"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, check=False)
    assert done.returncode == 0, done.stderr
    assert "statistics" in done.stderr.splitlines()[-1]
    doc = json.loads((tmp_path / "seg.statistics.json").read_text())
    rows = read_csv(tmp_path / "seg.statistics.csv")
    labels = np.asanyarray(nib.load(out).dataobj)
    counts = np.bincount(labels.ravel(), minlength=105)
    assert {r["structure"]: int(r["voxels"]) for r in rows} == {
        name: int(counts[rec["label"]]) for name, rec in doc["structures"].items()
    }
    assert not (tmp_path / "seg.preview.png").exists()


def test_stusegs_own_results_keep_model_indices(tmp_path: Path, make_nifti) -> None:
    """A stuseg multilabel file and a stuseg mask folder give records labelled by model index."""
    from stuseg.images.io import label_image
    from stuseg.structures import labels as lbl

    ct = make_nifti(shape=(20, 18, 16))
    header = nib.load(ct).header
    data = np.zeros((20, 18, 16), np.uint8)
    liver, spleen = lbl.index_of("liver"), lbl.index_of("spleen")
    data[2:9, 3:10, 4:12] = liver
    data[11:17, 5:9, 2:7] = spleen
    labelmaps.save_multilabel(data, header, tmp_path / "seg.nii.gz", {liver: "liver", spleen: "spleen"})
    folder = tmp_path / "masks"
    folder.mkdir()
    for value, name in ((liver, "liver"), (spleen, "spleen"), (lbl.index_of("aorta"), "aorta")):
        nib.save(label_image((data == value).astype(np.uint8), header), folder / f"{name}.nii.gz")
    ct_data = nib.load(ct).get_fdata(dtype=np.float32)
    for seg in (tmp_path / "seg.nii.gz", folder):
        scan = scans.load_scan(seg, ct)
        result = statistics.compute(scan.labels, scan.affine, scan.ct, scan.names).by_name()
        assert result["liver"]["label"] == liver and result["spleen"]["label"] == spleen
        for name, value in (("liver", liver), ("spleen", spleen)):
            assert_record_matches(result[name], oracle(data == value, ct_data, nib.load(ct).affine))
    assert result["aorta"]["voxels"] == 0 and result["aorta"]["label"] == lbl.index_of("aorta")


def test_of_segmentation_for_seg_statistics(make_nifti) -> None:
    """What ``Segmentation.statistics(ct)`` delegates to: a path, a Volume or an array."""
    from stuseg.images.io import label_image, read_image
    from stuseg.inference import pipeline

    ct = make_nifti(shape=(16, 14, 12), affine=np.diag([-1.5, -1.5, 2.5, 1.0]))
    volume = read_image(ct)
    data = blobby_labels((16, 14, 12), 3, seed=6)
    seg = pipeline.Segmentation(
        image=label_image(data, volume.header), names={1: "liver", 2: "spleen", 3: "aorta"}
    )
    seg.size = "base"
    for source in (ct, volume, volume.data):
        result = statistics.of_segmentation(seg, source, mode="fast")
        assert result.image["model_size"] == "base" and result.image["mode"] == "fast"
        for rec in result.structures:
            assert_record_matches(rec, oracle(data == rec["label"], volume.data, volume.affine))
    other = read_image(make_nifti(shape=(16, 14, 12), name="other.nii.gz"))  # 1.5 mm RAS
    with pytest.raises(InputError, match=r"^the CT is not on the segmentation's grid"):
        statistics.of_segmentation(seg, other)
