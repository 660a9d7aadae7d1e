"""RTSTRUCT output: contours read back with pydicom, filled again on the series' slices, and compared
with the structures they came from.

The oracle never uses stuseg's geometry. Each contour point (LPS mm) goes back to its slice's pixel
indices through the inverse of that slice's ImagePositionPatient / ImageOrientationPatient /
PixelSpacing, written here; the polygons of an ROI on a slice are filled by parity at the pixel
centres with matplotlib's point-in-polygon test. The expected masks are TotalSegmentator's real
result on the same series, sampled at every pixel centre of every slice through the affine of
TotalSegmentator's own NIfTI file (nibabel), not the grid stuseg reads. Laterality is checked in
patient coordinates straight from ContourData.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from fabricate import small_checkpoint
from matplotlib.path import Path as PolygonPath
from test_dicomseg import SUBSET, _fake_segment, ts_on_series_grid
from typer.testing import CliRunner

from stuseg.cli import app
from stuseg.errors import OutputError
from stuseg.images.io import StusegWarning, label_image, read_image
from stuseg.results import dicomseg, rtstruct
from stuseg.structures import labels

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).parent / "data"
SERIES = DATA / "abdomen_ct_dicom_uids"
TS = DATA / "totalseg_results"
CT_NIFTI = DATA / "abdomen_ct_3mm.nii.gz"

# The brief's bar: structures of at least this many voxels must reach this Dice.
MIN_VOXELS, MIN_DICE = 1000, 0.95


# --- oracle helpers ----------------------------------------------------------------------------


def source_headers() -> dict[str, pydicom.Dataset]:
    return {
        str(ds.SOPInstanceUID): ds
        for ds in (pydicom.dcmread(f, stop_before_pixels=True) for f in sorted(SERIES.iterdir()))
    }


def slice_frame(ds: pydicom.Dataset) -> tuple[np.ndarray, np.ndarray, np.ndarray, float, float]:
    """IPP, row direction (along a row: column index + 1), column direction, row and column spacing."""
    ipp = np.array([float(v) for v in ds.ImagePositionPatient])
    iop = np.array([float(v) for v in ds.ImageOrientationPatient])
    row_spacing, col_spacing = (float(v) for v in ds.PixelSpacing)
    return ipp, iop[:3], iop[3:], row_spacing, col_spacing


def to_pixels(points: np.ndarray, ds: pydicom.Dataset) -> np.ndarray:
    """LPS points (N, 3) on image ``ds`` -> (row, column) pixel indices (N, 2); the points must lie in
    the image's plane."""
    ipp, along_row, along_col, row_spacing, col_spacing = slice_frame(ds)
    offset = points - ipp
    normal = np.cross(along_row, along_col)
    assert np.abs(offset @ normal).max() < 1e-3  # on this slice, not beside it
    return np.stack([offset @ along_col / row_spacing, offset @ along_row / col_spacing], axis=1)


def fill(polygons: list[np.ndarray], rows: int, cols: int) -> np.ndarray:
    """Pixels whose centre lies inside an odd number of the (row, column) polygons."""
    mask = np.zeros((rows, cols), bool)
    for poly in polygons:
        lo = np.maximum(np.floor(poly.min(axis=0)).astype(int), 0)
        hi = np.minimum(np.ceil(poly.max(axis=0)).astype(int) + 1, (rows, cols))
        rr, cc = np.mgrid[lo[0] : hi[0], lo[1] : hi[1]]
        centres = np.stack([rr.ravel(), cc.ravel()], axis=1)
        inside = PolygonPath(poly).contains_points(centres).reshape(rr.shape)
        mask[lo[0] : hi[0], lo[1] : hi[1]] ^= inside
    return mask


def rasterise(path: Path, sources: dict[str, pydicom.Dataset]) -> dict[str, dict[str, np.ndarray]]:
    """ROI name -> SOP Instance UID -> its filled contours (Rows, Columns) on that source image."""
    ds = pydicom.dcmread(path)
    names = {int(r.ROINumber): str(r.ROIName) for r in ds.StructureSetROISequence}
    result: dict[str, dict[str, np.ndarray]] = {}
    for item in ds.ROIContourSequence:
        polygons: dict[str, list[np.ndarray]] = {}
        for contour in item.ContourSequence:
            assert contour.ContourGeometricType == "CLOSED_PLANAR"
            (ref,) = contour.ContourImageSequence
            source = sources[ref.ReferencedSOPInstanceUID]
            assert ref.ReferencedSOPClassUID == source.SOPClassUID
            points = np.array([float(v) for v in contour.ContourData]).reshape(-1, 3)
            assert len(points) == int(contour.NumberOfContourPoints) >= 3
            polygons.setdefault(ref.ReferencedSOPInstanceUID, []).append(to_pixels(points, source))
        result[names[int(item.ReferencedROINumber)]] = {
            uid: fill(polys, int(sources[uid].Rows), int(sources[uid].Columns))
            for uid, polys in polygons.items()
        }
    return result


def expected_slices(sources: dict[str, pydicom.Dataset]) -> dict[str, np.ndarray]:
    """TotalSegmentator's result at every pixel centre of every source image (stuseg's numbering):
    SOP Instance UID -> label image (Rows, Columns)."""
    img = nib.load(TS / "abdomen_ct_dicom_multilabel.nii.gz")
    data = np.asarray(img.dataobj)
    inverse = np.linalg.inv(img.affine)
    v2 = {
        int(k): v for k, v in json.loads((TS / "totalsegmentator_v2_total_labels.json").read_text()).items()
    }
    lut = np.zeros(256, np.uint8)
    for value, name in v2.items():
        if name in labels.STRUCTURES:
            lut[value] = labels.index_of(name)
    out = {}
    for uid, ds in sources.items():
        ipp, along_row, along_col, row_spacing, col_spacing = slice_frame(ds)
        m, n = np.mgrid[0 : int(ds.Rows), 0 : int(ds.Columns)]
        lps = ipp + n[..., None] * col_spacing * along_row + m[..., None] * row_spacing * along_col
        ras = lps * np.array([-1.0, -1.0, 1.0])
        ijk = ras @ inverse[:3, :3].T + inverse[:3, 3]
        nearest = np.rint(ijk)
        assert np.abs(ijk - nearest).max() < 1e-3  # the NIfTI is on the series' grid
        i, j, k = (nearest[..., a].astype(int) for a in range(3))
        out[uid] = lut[data[i, j, k]]
    return out


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def dice_by_structure(
    filled: dict[str, dict[str, np.ndarray]], expected: dict[str, np.ndarray], order: list[str]
) -> dict[str, tuple[float, int]]:
    """Structure -> (Dice of its filled contours against its mask over the series, mask voxels);
    ``order``: the SOP Instance UIDs whose slices are compared (in the same order for both)."""
    present = sorted({int(v) for lab in expected.values() for v in np.unique(lab) if v})
    result = {}
    for value in present:
        name = labels.LABELS[value]
        truth = np.stack([expected[uid] == value for uid in order])
        empty = np.zeros_like(truth[0])
        got = np.stack([filled.get(name, {}).get(uid, empty) for uid in order])
        result[name] = (dice(got, truth), int(truth.sum()))
    return result


def failing(scores: dict[str, tuple[float, int]]) -> list[str]:
    """The structures of at least MIN_VOXELS voxels below MIN_DICE: the test's acceptance rule."""
    return [name for name, (d, voxels) in scores.items() if voxels >= MIN_VOXELS and d < MIN_DICE]


def dciodvfy_errors(path: Path) -> list[str]:
    exe = shutil.which("dciodvfy")
    if exe is None:
        pytest.skip("dciodvfy (Debian package dicom3tools) is not installed; .ci/run installs it")
    done = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=120, check=False)
    lines = (done.stdout + done.stderr).splitlines()
    assert "RTStructureSet" in lines, lines  # it recognised the IOD
    return [line for line in lines if line.startswith("Error")]


def ctbl_colors(path: Path) -> dict[str, tuple[int, int, int]]:
    """name -> RGB from a 3D Slicer color table file (``value name R G B A`` lines)."""
    colors = {}
    for line in path.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        _, name, r, g, b, _a = line.split()
        colors[name] = (int(r), int(g), int(b))
    return colors


def check_against_masks(filled: dict[str, dict[str, np.ndarray]], out: Path, sources) -> None:
    """Every ROI, filled again, equals its NIfTI mask in ``out`` slice by slice, and every
    non-empty mask has its ROI."""
    affine = read_image(SERIES).affine
    # The premises of this axial series on its RAS grid: i runs R->L (LPS +x), j A->P (LPS +y), k
    # up, so pixel (row m, column n) of the slice at height z is voxel (n, m, (z - z0) / dz).
    assert affine[0, 0] < 0 and affine[1, 1] < 0 and affine[2, 2] > 0
    assert np.count_nonzero(affine[:3, :3] - np.diag(np.diag(affine[:3, :3]))) == 0
    for path in sorted(out.glob("*.nii.gz")):
        name = path.name.removesuffix(".nii.gz")
        mask = np.asarray(nib.load(path).dataobj).astype(bool)
        assert (name in filled) == mask.any(), name
        for uid, got in filled.get(name, {}).items():
            k = round((float(sources[uid].ImagePositionPatient[2]) - affine[2, 3]) / affine[2, 2])
            np.testing.assert_array_equal(got, mask[:, :, k].T, err_msg=name)
        assert sum(m.sum() for m in filled.get(name, {}).values()) == mask.sum(), name


# --- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sources() -> dict[str, pydicom.Dataset]:
    return source_headers()


@pytest.fixture(scope="module")
def series_volume():
    return read_image(SERIES)


@pytest.fixture(scope="module")
def ts_labels(series_volume) -> np.ndarray:
    return ts_on_series_grid(series_volume.affine)


@pytest.fixture(scope="module")
def ts_rt(tmp_path_factory: pytest.TempPathFactory, series_volume, ts_labels) -> Path:
    """TotalSegmentator's real result on the series, written through stuseg's RTSTRUCT writer."""
    path = tmp_path_factory.mktemp("ts") / "rtstruct.dcm"
    image = label_image(ts_labels, series_volume.header)
    source = dicomseg.read_dicom_source(SERIES, output="rtstruct")
    names = dict(enumerate(labels.LABELS))
    del names[0]
    assert rtstruct.write_rtstruct(image, names, source, path, algorithm="STU-Net base") == path
    return path


@pytest.fixture(scope="module")
def ts_filled(ts_rt: Path, sources) -> dict[str, dict[str, np.ndarray]]:
    return rasterise(ts_rt, sources)


@pytest.fixture(scope="module")
def expected(sources) -> dict[str, np.ndarray]:
    return expected_slices(sources)


# --- outline tracing ----------------------------------------------------------------------------


def test_outlines_enclose_exactly_each_labels_pixels() -> None:
    """Random label images (holes, diagonal touches, pieces at the border): parity-filling each
    label's polygons gives back its pixels; outer outlines are clockwise, holes counter-clockwise."""
    rng = np.random.default_rng(7)
    for _ in range(100):
        frame = (rng.random((14, 17)) < 0.45) * rng.integers(1, 4, (14, 17))
        found = rtstruct.outlines(frame)
        assert set(found) == set(np.unique(frame)) - {0}
        for value, polygons in found.items():
            np.testing.assert_array_equal(fill(polygons, 14, 17), frame == value)
            # shoelace area in (x = column, y = row): positive = clockwise with rows pointing down
            areas = [
                0.5 * np.sum(p[:, 1] * np.roll(p[:, 0], -1) - np.roll(p[:, 1], -1) * p[:, 0])
                for p in polygons
            ]
            assert sum(areas) == pytest.approx(np.sum(frame == value))  # holes subtract


def test_a_ring_is_an_outer_outline_and_a_hole() -> None:
    frame = np.zeros((7, 7), np.uint8)
    frame[1:6, 1:6] = 5
    frame[3, 3] = 0
    outer, hole = sorted(rtstruct.outlines(frame)[5], key=lambda p: -np.ptp(p[:, 0]))
    assert sorted(map(tuple, outer.tolist())) == [(0.5, 0.5), (0.5, 5.5), (5.5, 0.5), (5.5, 5.5)]
    assert sorted(map(tuple, hole.tolist())) == [(2.5, 2.5), (2.5, 3.5), (3.5, 2.5), (3.5, 3.5)]
    assert rtstruct.outlines(np.zeros((3, 3), np.uint8)) == {}


# --- TotalSegmentator's real result through the writer ------------------------------------------


def test_real_result_passes_dciodvfy(ts_rt: Path) -> None:
    assert dciodvfy_errors(ts_rt) == []


def test_contours_filled_again_give_the_masks_on_the_right_slices(ts_filled, expected, sources) -> None:
    by_z = sorted(sources, key=lambda uid: float(sources[uid].ImagePositionPatient[2]))
    scores = dice_by_structure(ts_filled, expected, by_z)
    large = [n for n, (_, voxels) in scores.items() if voxels >= MIN_VOXELS]
    assert {"liver", "spleen", "aorta", "stomach", "vertebrae_T12"} <= set(large)  # real anatomy
    assert failing(scores) == []
    # Outlines along pixel edges enclose exactly the structure's pixels: Dice 1 for every structure.
    assert {n: d for n, (d, _) in scores.items() if d != 1.0} == {}
    # Only present structures have an ROI.
    assert sorted(ts_filled) == sorted(scores)


def test_a_mirrored_or_shifted_result_fails_the_same_check(ts_filled, expected, sources) -> None:
    by_z = sorted(sources, key=lambda uid: float(sources[uid].ImagePositionPatient[2]))
    large = [n for n, (_, v) in dice_by_structure(ts_filled, expected, by_z).items() if v >= MIN_VOXELS]
    mirrored = {n: {uid: m[:, ::-1] for uid, m in s.items()} for n, s in ts_filled.items()}  # left-right
    upside_down = {n: {uid: m[::-1] for uid, m in s.items()} for n, s in ts_filled.items()}  # front-back
    # Each slice's contours compared with the next slice up's mask (a one-slice shift).
    shifted = dice_by_structure(ts_filled, {a: expected[b] for a, b in zip(by_z[:-1], by_z[1:])}, by_z[:-1])
    flipped = dice_by_structure(mirrored, expected, by_z)
    # Mirrored left-right, every large structure falls below the bar (Dice <= 0.35 on this series);
    # shifted by one 2 mm slice, most do (Dice 0.74 to 0.99: 15 of 25 below 0.95 when written).
    assert set(failing(flipped)) == set(large), flipped
    assert len(failing(shifted)) >= len(large) // 2, shifted
    # Mirrored front to back (the mirror TotalSegmentator 2.18 fixed in its RTSTRUCT), every one.
    assert set(failing(dice_by_structure(upside_down, expected, by_z))) == set(large)


def test_left_structures_lie_on_the_patients_left(ts_rt: Path) -> None:
    """In LPS, +x is the patient's left: each left structure's contour points lie, on average,
    at a larger x than its right partner's (read straight from ContourData)."""
    ds = pydicom.dcmread(ts_rt)
    names = {int(r.ROINumber): str(r.ROIName) for r in ds.StructureSetROISequence}
    mean_x = {}
    for item in ds.ROIContourSequence:
        xs = np.concatenate([np.array([float(v) for v in c.ContourData])[0::3] for c in item.ContourSequence])
        mean_x[names[int(item.ReferencedROINumber)]] = xs.mean()
    pairs = [
        (n, n.replace("_left", "_right"))
        for n in mean_x
        if "_left" in n and n.replace("_left", "_right") in mean_x
    ]
    assert len(pairs) >= 2, sorted(mean_x)
    for left, right in pairs:
        assert mean_x[left] > mean_x[right] + 10, (left, mean_x[left], mean_x[right])


def test_references_names_and_header(ts_rt: Path, sources, ts_labels) -> None:
    ds = pydicom.dcmread(ts_rt)
    first = next(iter(sources.values()))
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.481.3" and ds.Modality == "RTSTRUCT"
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID not in sources
    assert ds.SeriesInstanceUID != first.SeriesInstanceUID
    for key in (
        "StudyInstanceUID",
        "PatientID",
        "PatientName",
        "PatientSex",
        "StudyDate",
        "FrameOfReferenceUID",
    ):
        assert str(ds.get(key)) == str(first.get(key)), key
    assert ds.ApprovalStatus == "UNAPPROVED"
    (frame_of_reference,) = ds.ReferencedFrameOfReferenceSequence
    assert frame_of_reference.FrameOfReferenceUID == first.FrameOfReferenceUID
    (study,) = frame_of_reference.RTReferencedStudySequence
    assert study.ReferencedSOPInstanceUID == first.StudyInstanceUID
    (series,) = study.RTReferencedSeriesSequence
    assert series.SeriesInstanceUID == first.SeriesInstanceUID
    assert {r.ReferencedSOPInstanceUID for r in series.ContourImageSequence} == set(sources)
    # One ROI per structure present, in label order, named as the model names it.
    present = [labels.LABELS[v] for v in np.unique(ts_labels) if v]
    assert [str(r.ROIName) for r in ds.StructureSetROISequence] == present
    assert [int(r.ROINumber) for r in ds.StructureSetROISequence] == list(range(1, len(present) + 1))
    for roi in ds.StructureSetROISequence:
        assert roi.ReferencedFrameOfReferenceUID == first.FrameOfReferenceUID
        assert roi.ROIGenerationAlgorithm == "AUTOMATIC"
    assert [int(o.ReferencedROINumber) for o in ds.RTROIObservationsSequence] == list(
        range(1, len(present) + 1)
    )
    assert {o.RTROIInterpretedType for o in ds.RTROIObservationsSequence} == {"ORGAN"}


def test_no_structure_present_writes_nothing_and_warns(tmp_path: Path, series_volume) -> None:
    image = label_image(np.zeros(series_volume.data.shape, np.uint8), series_volume.header)
    source = dicomseg.read_dicom_source(SERIES, output="rtstruct")
    with pytest.warns(StusegWarning, match="no structure was found"):
        assert rtstruct.write_rtstruct(image, {1: "spleen"}, source, tmp_path / "rt.dcm") is None
    assert not (tmp_path / "rt.dcm").exists()


def test_a_label_map_off_the_series_grid_is_refused(tmp_path: Path, series_volume, ts_labels) -> None:
    moved = series_volume.affine.copy()
    moved[:3, 3] += moved[:3, 2] * 0.5  # half a slice along k
    header = series_volume.header.copy()
    header.set_qform(moved, 1)
    header.set_sform(moved, 1)
    source = dicomseg.read_dicom_source(SERIES, output="rtstruct")
    with pytest.raises(OutputError, match="does not lie on the grid of the label map"):
        rtstruct.write_rtstruct(label_image(ts_labels, header), {5: "liver"}, source, tmp_path / "rt.dcm")
    assert not (tmp_path / "rt.dcm").exists()


def test_rtstruct_path_for() -> None:
    assert rtstruct.rtstruct_path_for(Path("out"), False) == Path("out/rtstruct.dcm")
    assert rtstruct.rtstruct_path_for(Path("d/case.nii.gz"), True) == Path("d/case_rtstruct.dcm")


# --- the command line -----------------------------------------------------------------------------


@pytest.mark.slow  # about 6 s on 2 cores
def test_cli_writes_masks_seg_and_rtstruct_together(tmp_path: Path, monkeypatch, ts_labels, sources) -> None:
    from stuseg.inference import pipeline

    monkeypatch.setattr(pipeline, "segment", _fake_segment(ts_labels))
    out = tmp_path / "out"
    args = ["predict", str(SERIES), str(out)]
    args += ["--output-type", "nifti", "--output-type", "dicom-seg", "--output-type", "rtstruct"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert result.stderr.strip().startswith(
        f"wrote 7 masks in {out} and {out / 'seg.dcm'} and {out / 'rtstruct.dcm'} (small on cpu)"
    )
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [".stuseg-run.json", "seg.dcm", "rtstruct.dcm", *(f"{n}.nii.gz" for n in SUBSET)]
    )
    filled = rasterise(out / "rtstruct.dcm", sources)
    assert sorted(filled) == sorted(n for n in SUBSET if n != "kidney_left")  # kidney_left: absent
    check_against_masks(filled, out, sources)


def test_cli_ml_rtstruct_colours_are_the_viewer_tables(tmp_path: Path, monkeypatch, ts_labels) -> None:
    from stuseg.inference import pipeline

    monkeypatch.setattr(pipeline, "segment", _fake_segment(ts_labels))
    out = tmp_path / "case.nii.gz"
    result = CliRunner().invoke(
        app, ["predict", str(SERIES), str(out), "--ml", "--output-type", "nifti", "--output-type", "rtstruct"]
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "case_rtstruct.dcm").is_file()
    table = ctbl_colors(next(tmp_path.glob("*.ctbl")))
    ds = pydicom.dcmread(tmp_path / "case_rtstruct.dcm")
    names = {int(r.ROINumber): str(r.ROIName) for r in ds.StructureSetROISequence}
    shown = {
        names[int(i.ReferencedROINumber)]: tuple(int(c) for c in i.ROIDisplayColor)
        for i in ds.ROIContourSequence
    }
    assert len(shown) == 6
    assert shown == {n: table[n] for n in shown}


def test_cli_rtstruct_alone(tmp_path: Path, monkeypatch, ts_labels) -> None:
    from stuseg.inference import pipeline

    monkeypatch.setattr(pipeline, "segment", _fake_segment(ts_labels))
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["predict", str(SERIES), str(out), "--output-type", "rtstruct"])
    assert result.exit_code == 0, result.output
    assert result.stderr.strip().startswith(f"wrote {out / 'rtstruct.dcm'} (small on cpu)")
    assert sorted(p.name for p in out.iterdir()) == [".stuseg-run.json", "rtstruct.dcm"]


def test_cli_a_failing_rtstruct_leaves_nothing(tmp_path: Path, monkeypatch, ts_labels) -> None:
    from stuseg.inference import pipeline

    monkeypatch.setattr(pipeline, "segment", _fake_segment(ts_labels))

    def broken(*args, **kwargs):
        raise OutputError("disk full (simulated)")

    monkeypatch.setattr(rtstruct, "write_rtstruct", broken)
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app, ["predict", str(SERIES), str(out), "--output-type", "nifti", "--output-type", "rtstruct"]
    )
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == ["stuseg: error: disk full (simulated)"]
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == []


def test_cli_nifti_input_is_refused_in_one_line(tmp_path: Path) -> None:
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "stuseg", "predict", str(CT_NIFTI), str(out), "--output-type", "rtstruct"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        "stuseg: error: --output-type rtstruct needs a folder holding a DICOM series as INPUT, "
        f"but {CT_NIFTI} is not one; use --output-type nifti for this input"
    ]
    assert not out.exists() and list(tmp_path.iterdir()) == []


# --- a series turned in-plane, with non-square pixels ---------------------------------------------


@pytest.fixture(scope="module")
def turned_series(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test series with every slice turned a quarter turn in its plane (a row runs towards the
    patient's back, a column towards the patient's right) and pixels 0.6 mm wide, 0.8 mm high;
    the pixel data are unchanged, so the scan lies differently in the patient, as a scanner would
    have stored it."""
    folder = tmp_path_factory.mktemp("turned")
    for f in sorted(SERIES.iterdir()):
        ds = pydicom.dcmread(f)
        ds.ImageOrientationPatient = [0, 1, 0, -1, 0, 0]
        ds.PixelSpacing = [0.8, 0.6]  # between rows, between columns
        ds.save_as(folder / f.name)
    return folder


def shapes_at(lps: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """Label 1 in a ball of 15 mm radius 50 mm to the patient's left of ``centre``, label 2 in a box
    to the patient's right and 20 mm in front (LPS: +x left, -y anterior)."""
    out = np.zeros(lps.shape[:-1], np.uint8)
    d = lps - centre
    out[np.sum((d - [50.0, 0.0, 0.0]) ** 2, axis=-1) < 15.0**2] = 1
    box = (np.abs(d[..., 0] + 60.3) < 25.1) & (np.abs(d[..., 1] + 20.2) < 10.1) & (np.abs(d[..., 2]) < 9.9)
    out[box] = 2
    return out


def test_contours_follow_each_slices_own_orientation(tmp_path: Path, turned_series: Path) -> None:
    """Shapes defined in patient millimetres, labelled on the grid stuseg reads from the turned
    series, come back from the RTSTRUCT on exactly the pixels whose centres lie in them (computed
    from each slice's header here), on the patient's correct side."""
    sources = {
        str(ds.SOPInstanceUID): ds for ds in (pydicom.dcmread(f) for f in sorted(turned_series.iterdir()))
    }
    centres = {}
    for uid, ds in sources.items():
        ipp, along_row, along_col, row_spacing, col_spacing = slice_frame(ds)
        m, n = np.mgrid[0 : int(ds.Rows), 0 : int(ds.Columns)]
        centres[uid] = ipp + n[..., None] * col_spacing * along_row + m[..., None] * row_spacing * along_col
    middle = np.mean([c.reshape(-1, 3).mean(axis=0) for c in centres.values()], axis=0)
    vol = read_image(turned_series)
    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in vol.data.shape], indexing="ij"), axis=-1)
    ras = ijk @ vol.affine[:3, :3].T + vol.affine[:3, 3]
    labels_map = shapes_at(ras * np.array([-1.0, -1.0, 1.0]), middle)
    path = tmp_path / "rt.dcm"
    source = dicomseg.read_dicom_source(turned_series, output="rtstruct")
    rtstruct.write_rtstruct(
        label_image(labels_map, vol.header), {1: "ball_left", 2: "box_right"}, source, path
    )
    assert dciodvfy_errors(path) == []
    filled = rasterise(path, sources)
    for value, name in ((1, "ball_left"), (2, "box_right")):
        expected = {uid: shapes_at(c, middle) == value for uid, c in centres.items()}
        assert sum(e.sum() for e in expected.values()) >= MIN_VOXELS
        for uid, truth in expected.items():
            got = filled[name].get(uid, np.zeros_like(truth))
            np.testing.assert_array_equal(got, truth, err_msg=f"{name} on {uid}")
    ds = pydicom.dcmread(path)
    mean_x = [
        np.mean([float(v) for c in item.ContourSequence for v in c.ContourData[0::3]])
        for item in ds.ROIContourSequence
    ]
    assert mean_x[0] > middle[0] + 40 and mean_x[1] < middle[0] - 40  # ball left, box right


# --- one real run: the fabricated small model, as a user runs it --------------------------------


@pytest.mark.slow
def test_real_run_rtstruct_equals_its_nifti_masks(tmp_path_factory: pytest.TempPathFactory, sources) -> None:
    """``stuseg predict`` in a subprocess, with random weights (many ragged structures: a hard case
    for the outlines): the RTSTRUCT is valid and filled again equals the masks written beside it."""
    model = small_checkpoint(lambda: tmp_path_factory.mktemp("fabricated"))
    out = tmp_path_factory.mktemp("run") / "out"
    cmd = [sys.executable, "-m", "stuseg", "predict", str(SERIES), str(out), "--output-type", "nifti"]
    cmd += ["--output-type", "rtstruct", "--weights", str(model), "--step-size", "1.0", "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "STUSEG_HOME": str(tmp_path_factory.mktemp("home"))}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, check=False)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    assert f"{out / 'rtstruct.dcm'} (small on cpu)" in done.stderr.splitlines()[-1]
    assert dciodvfy_errors(out / "rtstruct.dcm") == []
    filled = rasterise(out / "rtstruct.dcm", sources)
    assert len(filled) >= 5
    check_against_masks(filled, out, sources)


def test_cli_missing_extra_is_one_line_naming_it(tmp_path: Path) -> None:
    out = tmp_path / "out"
    code = (
        "import sys; sys.modules['pydicom'] = None; from stuseg.cli import main; "
        f"sys.argv = ['stuseg', 'predict', {str(SERIES)!r}, {str(out)!r}, '--output-type', 'rtstruct']; "
        "main()"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        "stuseg: error: --output-type rtstruct needs the optional DICOM support; install it with: "
        'pip install "stuseg[dicom]"'
    ]
    assert not out.exists()


# --- a batch: one RTSTRUCT per DICOM case -------------------------------------------------------


@pytest.mark.slow  # about 17 s on 2 cores
def test_batch_writes_an_rtstruct_per_dicom_case(tmp_path: Path, sources) -> None:
    """A batch over a DICOM series and a NIfTI scan asking for masks and an RTSTRUCT: the series
    case gets a valid RTSTRUCT whose contours, filled again, are its masks; the NIfTI case gets its
    masks, and its record says why it has no RTSTRUCT (as for a DICOM-SEG)."""
    from test_batch import Threshold, write_ct

    from stuseg import batch
    from stuseg.inference.pipeline import Segmenter
    from stuseg.results import write as results

    shutil.copytree(SERIES, tmp_path / "in" / "series")
    write_ct(tmp_path / "in" / "a.nii.gz", shape=(30, 28, 26), seed=1)
    cases = batch.discover([tmp_path / "in"]).cases
    segmenter = Segmenter(model=Threshold.build(), device="cpu", step_size=1.0, fast=True)
    out = tmp_path / "out"
    request = results.Request(nifti=True, rtstruct=True)
    done = {r.case.id: r for r in batch.run(cases, segmenter, out, request=request)}
    assert [r.status for r in done.values()] == ["ok", "ok"]
    records = {r["case"]: r for r in batch.read_log(out / batch.LOG_NAME)}
    series_case = next(c for c in records if c != "a")
    assert records[series_case]["products"] == ["nifti", "rtstruct"]
    assert records["a"]["products"] == ["nifti"]
    assert any(
        "no RTSTRUCT was written: the input is not a DICOM series" in w for w in records["a"]["warnings"]
    )
    assert not (out / "a" / "rtstruct.dcm").exists() and (out / "a" / "liver.nii.gz").is_file()
    rt = out / series_case / "rtstruct.dcm"
    assert dciodvfy_errors(rt) == []
    filled = rasterise(rt, sources)
    assert "liver" in filled
    check_against_masks(filled, out / series_case, sources)
    # Resumed with the same request: done; the RTSTRUCT is not written again.
    before = rt.read_bytes()
    assert [r.status for r in batch.run(cases, segmenter, out, request=request)] == ["skipped", "skipped"]
    assert rt.read_bytes() == before
