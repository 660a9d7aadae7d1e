"""DICOM-SEG output: read the SEG back and compare it, pixel for pixel, with the NIfTI results.

The oracle places each SEG frame on the series grid from DICOM's and NIfTI's definitions, not
through stuseg's mapping: for this axial series (rows along +y, columns along +x in LPS) a frame
at height z is slice k = (z - z_first) / dz of a RAS-stored NIfTI, and pixel (row m, column n) is
voxel (n, m, k) there. The premises are asserted, and corner pixels are cross-checked with
SimpleITK's own geometry. Real anatomy comes from TotalSegmentator's result on the same series.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from fabricate import small_checkpoint
from typer.testing import CliRunner

from stuseg.cli import app
from stuseg.errors import InputError, OutputError
from stuseg.images.io import dicom_series_files, label_image, read_image
from stuseg.results import dicomseg
from stuseg.results.write import Layout
from stuseg.structures import labels

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).parent / "data"
SERIES = DATA / "abdomen_ct_dicom_uids"
BAD_SERIES = DATA / "abdomen_ct_dicom"
TS = DATA / "totalseg_results"


# --- oracle helpers ----------------------------------------------------------------------------


def ts_on_series_grid(series_affine: np.ndarray) -> np.ndarray:
    """TotalSegmentator's multilabel result (v2 numbering, LAS) brought onto the series grid (RAS
    from SimpleITK) and renumbered to stuseg's labels where the v2 name is a stuseg name."""
    img = nib.load(TS / "abdomen_ct_dicom_multilabel.nii.gz")
    v2 = {
        int(k): v for k, v in json.loads((TS / "totalsegmentator_v2_total_labels.json").read_text()).items()
    }
    data = np.asarray(img.dataobj)
    # series index = T @ TotalSegmentator index; both grids are the series' slices, so T must be a
    # signed permutation with whole-voxel offsets.
    t = np.linalg.inv(series_affine) @ img.affine
    m = np.rint(t[:3, :3])
    np.testing.assert_allclose(t[:3, :3], m, atol=1e-6)
    perm = [int(np.argmax(np.abs(m[a]))) for a in range(3)]
    out = data.transpose(perm)
    for a in range(3):
        sign = m[a, perm[a]]
        assert abs(sign) == 1
        expected_offset = 0 if sign > 0 else out.shape[a] - 1
        assert abs(t[a, 3] - expected_offset) < 1e-4
        if sign < 0:
            out = np.flip(out, axis=a)
    lut = np.zeros(256, np.uint8)
    for value, name in v2.items():
        if name in labels.STRUCTURES:
            lut[value] = labels.index_of(name)
    return np.ascontiguousarray(lut[out])


def seg_on_grid(path: Path, affine: np.ndarray, shape: tuple[int, int, int]) -> dict[str, np.ndarray]:
    """Each segment of the SEG file (read with pydicom) as a 0/1 mask on a RAS NIfTI grid of an
    axial series: segment label -> mask (X, Y, Z)."""
    ds = pydicom.dcmread(path)
    shared = ds.SharedFunctionalGroupsSequence[0]
    assert [float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient] == [
        1,
        0,
        0,
        0,
        1,
        0,
    ]
    spacing = [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing]
    # The NIfTI premises of the oracle: i runs along R->L (LPS +x), j along A->P (LPS +y), k up.
    assert affine[0, 0] == pytest.approx(-spacing[1]) and affine[1, 1] == pytest.approx(-spacing[0])
    assert np.count_nonzero(affine[:3, :3] - np.diag(np.diag(affine[:3, :3]))) == 0 and affine[2, 2] > 0
    origin_lps = np.array([-affine[0, 3], -affine[1, 3], affine[2, 3]])
    frames = ds.pixel_array.reshape(-1, ds.Rows, ds.Columns)
    labels_by_number = {int(s.SegmentNumber): str(s.SegmentLabel) for s in ds.SegmentSequence}
    masks = {name: np.zeros(shape, np.uint8) for name in labels_by_number.values()}
    for f, item in enumerate(ds.PerFrameFunctionalGroupsSequence):
        number = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        ipp = np.array([float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient])
        np.testing.assert_allclose(ipp[:2], origin_lps[:2], atol=1e-3)  # first pixel = voxel (0, 0)
        k = (ipp[2] - origin_lps[2]) / affine[2, 2]
        assert abs(k - round(k)) < 1e-3
        masks[labels_by_number[number]][:, :, round(k)] = frames[f].T  # [row m, col n] -> [n, m]
    return masks


def nifti_corner_check(nifti_path: Path, seg_path: Path) -> None:
    """SimpleITK's own geometry of a NIfTI file puts each SEG frame's first and last pixel at the
    voxel the oracle used (voxel (0, 0, k) and (X-1, Y-1, k))."""
    img = sitk.ReadImage(str(nifti_path))
    ds = pydicom.dcmread(seg_path, stop_before_pixels=True)
    spacing = [float(v) for v in ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing]
    for item in ds.PerFrameFunctionalGroupsSequence[:5]:
        ipp = np.array([float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient])
        first = img.TransformPhysicalPointToIndex(tuple(ipp))
        last_point = ipp + np.array([(ds.Columns - 1) * spacing[1], (ds.Rows - 1) * spacing[0], 0.0])
        last = img.TransformPhysicalPointToIndex(tuple(last_point))
        assert first[:2] == (0, 0) and last[:2] == (ds.Columns - 1, ds.Rows - 1) and first[2] == last[2]


def dciodvfy_errors(path: Path) -> list[str]:
    exe = shutil.which("dciodvfy")
    if exe is None:
        pytest.skip("dciodvfy (Debian package dicom3tools) is not installed; .ci/run installs it")
    done = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=120, check=False)
    lines = (done.stdout + done.stderr).splitlines()
    assert any("Segmentation" in line for line in lines), lines  # it recognised the IOD
    return [line for line in lines if line.startswith("Error")]


def source_headers() -> dict[str, pydicom.Dataset]:
    return {
        str(ds.SOPInstanceUID): ds
        for ds in (pydicom.dcmread(f, stop_before_pixels=True) for f in sorted(SERIES.iterdir()))
    }


def check_references(seg_path: Path) -> None:
    """Study / series / frame of reference / per-frame source references and copied attributes."""
    ds = pydicom.dcmread(seg_path, stop_before_pixels=True)
    sources = source_headers()
    first = next(iter(sources.values()))
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"  # Segmentation Storage
    assert ds.SegmentationType == "BINARY"
    for key in ("StudyInstanceUID", "FrameOfReferenceUID", "PatientID", "PatientName", "PatientSex"):
        assert str(ds.get(key)) == str(first.get(key)), key
    for key in ("StudyDate", "StudyTime", "AccessionNumber", "StudyID", "PatientBirthDate"):
        assert str(ds.get(key)) == str(first.get(key)), key
    assert ds.SeriesInstanceUID != first.SeriesInstanceUID and ds.SOPInstanceUID not in sources
    (ref,) = ds.ReferencedSeriesSequence
    assert ref.SeriesInstanceUID == first.SeriesInstanceUID
    assert {r.ReferencedSOPInstanceUID for r in ref.ReferencedInstanceSequence} == set(sources)
    for item in ds.PerFrameFunctionalGroupsSequence:
        src = item.DerivationImageSequence[0].SourceImageSequence[0]
        source = sources[src.ReferencedSOPInstanceUID]
        assert src.ReferencedSOPClassUID == source.SOPClassUID
        # the frame lies on the slice it references
        ipp = [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]
        np.testing.assert_allclose(ipp, [float(v) for v in source.ImagePositionPatient], atol=1e-4)


def check_snomed(seg_path: Path) -> None:
    ds = pydicom.dcmread(seg_path, stop_before_pixels=True)
    for s in ds.SegmentSequence:
        category = s.SegmentedPropertyCategoryCodeSequence[0]
        kind = s.SegmentedPropertyTypeCodeSequence[0]
        assert category.CodingSchemeDesignator == "SCT" and kind.CodingSchemeDesignator == "SCT"
        assert category.CodeValue == "123037004"  # Anatomical Structure, for all 104
        name = str(s.SegmentLabel)
        modifier = kind.get("SegmentedPropertyTypeModifierCodeSequence")
        if name.endswith("_left") or "_left_" in name:
            assert modifier[0].CodeValue == "7771000" and modifier[0].CodeMeaning == "Left"
        elif name.endswith("_right") or "_right_" in name:
            assert modifier[0].CodeValue == "24028007" and modifier[0].CodeMeaning == "Right"
        else:
            assert modifier is None, name


# --- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def series_volume():
    return read_image(SERIES)


@pytest.fixture(scope="module")
def ts_labels(series_volume) -> np.ndarray:
    return ts_on_series_grid(series_volume.affine)


@pytest.fixture(scope="module")
def ts_seg(tmp_path_factory: pytest.TempPathFactory, series_volume, ts_labels) -> Path:
    """TotalSegmentator's real result on the series, written through stuseg's SEG writer."""
    path = tmp_path_factory.mktemp("ts") / "seg.dcm"
    image = label_image(ts_labels, series_volume.header)
    source = dicomseg.read_dicom_source(SERIES)
    names = dict(enumerate(labels.LABELS))
    del names[0]
    assert dicomseg.write_dicom_seg(image, names, source, path) == path
    return path


# --- the SNOMED table ---------------------------------------------------------------------------


def test_every_structure_has_snomed_codes() -> None:
    table = dicomseg.snomed_table()
    assert sorted(table) == sorted(labels.STRUCTURES)  # each of the 104, nothing else
    for name, codes in table.items():
        for value, meaning in (codes.category, codes.type):
            assert value.isdigit() and meaning, name
    # spot checks against the published SNOMED CT concepts
    assert table["liver"].type == ("10200004", "Liver")
    assert table["kidney_left"].type == ("64033007", "Kidney")
    assert table["kidney_left"].modifier == ("7771000", "Left")
    assert table["vertebrae_L1"].type == ("66794005", "L1 vertebra")
    assert table["aorta"].modifier is None


# --- TotalSegmentator's real result through the writer ------------------------------------------


def test_real_result_round_trips_voxel_for_voxel(ts_seg: Path, series_volume, ts_labels) -> None:
    present = [labels.LABELS[v] for v in np.unique(ts_labels) if v]
    assert {"liver", "spleen", "aorta", "stomach", "vertebrae_T12"} <= set(present)  # anatomy
    ds = pydicom.dcmread(ts_seg, stop_before_pixels=True)
    assert [str(s.SegmentLabel) for s in ds.SegmentSequence] == present  # label order, present only
    assert [int(s.SegmentNumber) for s in ds.SegmentSequence] == list(range(1, len(present) + 1))
    masks = seg_on_grid(ts_seg, series_volume.affine, ts_labels.shape)
    for name in present:
        np.testing.assert_array_equal(masks[name], ts_labels == labels.index_of(name), err_msg=name)


def test_real_result_read_by_highdicom_per_source_instance(ts_seg: Path, ts_labels) -> None:
    seg = hd.seg.segread(ts_seg)
    sources = source_headers()
    liver = next(d.SegmentNumber for d in seg.SegmentSequence if d.SegmentLabel == "liver")
    # the source image at the k-th lowest z is the k-th slice of the RAS grid
    by_z = sorted(sources, key=lambda uid: float(sources[uid].ImagePositionPatient[2]))
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=by_z, segment_numbers=[liver], skip_overlap_checks=True
    )
    assert pixels.shape == (20, 512, 512, 1)
    for k in range(20):
        np.testing.assert_array_equal(pixels[k, :, :, 0], (ts_labels[:, :, k] == labels.index_of("liver")).T)


def test_real_result_references_and_codes(ts_seg: Path) -> None:
    check_references(ts_seg)
    check_snomed(ts_seg)


def test_real_result_passes_dciodvfy(ts_seg: Path, tmp_path: Path) -> None:
    assert dciodvfy_errors(ts_seg) == []
    # and the check can fail: the same file without a Type 1 attribute
    broken = pydicom.dcmread(ts_seg)
    del broken.SegmentSequence[0].SegmentLabel
    broken.save_as(tmp_path / "broken.dcm")
    assert any("SegmentLabel" in line for line in dciodvfy_errors(tmp_path / "broken.dcm"))


def test_real_result_carries_the_structure_colours(ts_seg: Path) -> None:
    """RecommendedDisplayCIELabValue (PS3.3 C.10.7.1.1: L* scaled 0..100, a* and b* -128..127, to
    0..65535) converted back to sRGB with scikit-image: the colours of the preview and viewer tables."""
    from skimage.color import lab2rgb

    from stuseg.structures.colors import label_colors

    want = {labels.LABELS[v]: c for v, c in label_colors(dict(enumerate(labels.STRUCTURES, start=1))).items()}
    ds = pydicom.dcmread(ts_seg, stop_before_pixels=True)
    assert len(ds.SegmentSequence) > 20
    for item in ds.SegmentSequence:
        raw = np.array(item.RecommendedDisplayCIELabValue, float)
        lab = [raw[0] * 100 / 65535, raw[1] * 255 / 65535 - 128, raw[2] * 255 / 65535 - 128]
        rgb = lab2rgb(np.array(lab).reshape(1, 1, 3)).reshape(3) * 255
        np.testing.assert_allclose(
            rgb, want[str(item.SegmentLabel)], atol=1.0, err_msg=str(item.SegmentLabel)
        )


# --- geometry: a flip or transpose cannot pass -------------------------------------------------


def _world_lps(affine: np.ndarray, ijk: tuple[int, int, int]) -> np.ndarray:
    ras = affine @ np.array([*ijk, 1.0])
    return np.array([-ras[0], -ras[1], ras[2]])


def test_single_voxels_land_on_their_world_position(tmp_path: Path, series_volume) -> None:
    """Three marked voxels, asymmetric in every axis; each SEG pixel's world position (from the
    SEG's own frame geometry) must be its voxel's (from the NIfTI affine)."""
    marks = {1: (10, 300, 3), 2: (400, 7, 17), 3: (511, 0, 0)}
    data = np.zeros(series_volume.data.shape, np.uint8)
    for value, ijk in marks.items():
        data[ijk] = value
    path = tmp_path / "marks.dcm"
    source = dicomseg.read_dicom_source(SERIES)
    names = {1: "liver", 2: "spleen", 3: "aorta"}
    dicomseg.write_dicom_seg(label_image(data, series_volume.header), names, source, path)
    ds = pydicom.dcmread(path)
    shared = ds.SharedFunctionalGroupsSequence[0]
    iop = np.array([float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient])
    row_sp, col_sp = (float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing)
    frames = ds.pixel_array.reshape(-1, ds.Rows, ds.Columns)
    assert len(frames) == 3  # empty frames are omitted
    seen = {}
    for f, item in enumerate(ds.PerFrameFunctionalGroupsSequence):
        (m,), (n,) = np.nonzero(frames[f])
        ipp = np.array([float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient])
        world = ipp + n * col_sp * iop[:3] + m * row_sp * iop[3:]
        label = names[int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)]
        seen[label] = world
    for value, ijk in marks.items():
        np.testing.assert_allclose(seen[names[value]], _world_lps(series_volume.affine, ijk), atol=1e-3)


def test_frames_follow_positions_not_file_order(series_volume, ts_labels) -> None:
    source = dicomseg.read_dicom_source(SERIES)
    order = list(range(len(source.datasets)))
    random.Random(3).shuffle(order)
    shuffled = [source.datasets[i] for i in order]
    frames = dicomseg.label_frames(ts_labels, series_volume.affine, source.datasets)
    again = dicomseg.label_frames(ts_labels, series_volume.affine, shuffled)
    for new, old in enumerate(order):
        np.testing.assert_array_equal(again[new], frames[old])


@pytest.mark.parametrize(
    ("change", "message"), [("flip", "reaches outside the label map"), ("shift", "does not lie on the grid")]
)
def test_a_label_map_off_the_series_grid_is_refused(
    change: str, message: str, series_volume, ts_labels, tmp_path
) -> None:
    affine = series_volume.affine.copy()
    if change == "flip":
        affine[:3, 0] *= -1  # i runs the other way from the same corner: off the slices
    else:
        affine[:3, 3] += [0.5 * affine[0, 0], 0, 0]  # half a voxel off
    source = dicomseg.read_dicom_source(SERIES)
    path = tmp_path / "seg.dcm"
    with pytest.raises(OutputError, match=message):
        dicomseg.write_dicom_seg(nib.Nifti1Image(ts_labels, affine), {5: "aorta"}, source, path)
    assert list(tmp_path.iterdir()) == []


def test_the_same_image_stored_transposed_gives_the_same_frames(series_volume, ts_labels) -> None:
    """The writer follows the affine, not an assumed axis order."""
    source = dicomseg.read_dicom_source(SERIES)
    expected = dicomseg.label_frames(ts_labels, series_volume.affine, source.datasets)
    swapped = np.ascontiguousarray(ts_labels.transpose(1, 0, 2))
    frames = dicomseg.label_frames(swapped, series_volume.affine[:, [1, 0, 2, 3]], source.datasets)
    np.testing.assert_array_equal(frames, expected)
    flipped = np.ascontiguousarray(ts_labels[:, :, ::-1])
    affine = series_volume.affine.copy()
    affine[:3, 3] += affine[:3, 2] * (ts_labels.shape[2] - 1)
    affine[:3, 2] *= -1
    np.testing.assert_array_equal(dicomseg.label_frames(flipped, affine, source.datasets), expected)


def test_no_structure_present_writes_nothing_and_warns(tmp_path: Path, series_volume) -> None:
    image = label_image(np.zeros(series_volume.data.shape, np.uint8), series_volume.header)
    path = tmp_path / "seg.dcm"
    with pytest.warns(UserWarning, match="no structure was found"):
        assert dicomseg.write_dicom_seg(image, {1: "liver"}, dicomseg.read_dicom_source(SERIES), path) is None
    assert not path.exists()


def test_where_the_seg_goes() -> None:
    def seg(target: str, multilabel: bool) -> list[Path]:
        return Layout(Path(target), multilabel, ("dicom-seg",)).files()["dicom-seg"]

    assert seg("out", False) == [Path("out/seg.dcm")]
    assert seg("a/case.nii.gz", True) == [Path("a/case.dcm")]
    assert seg("a/case.nii", True) == [Path("a/case.dcm")]


def test_series_files_are_those_read_image_reads() -> None:
    files = dicom_series_files(SERIES)
    assert sorted(files) == sorted(SERIES.iterdir())
    with pytest.raises(InputError, match="holds no DICOM series with UID 'nope'; check INPUT"):
        dicom_series_files(SERIES, "nope")
    with pytest.raises(InputError, match="holds no DICOM series; check INPUT"):
        dicom_series_files(DATA / "reference")


# --- the command line ---------------------------------------------------------------------------


# Structures kept by the Typer-runner tests (as --roi-subset would): present ones and one absent.
SUBSET = ("aorta", "kidney_left", "liver", "rib_right_10", "spleen", "stomach", "vertebrae_T12")


def _fake_segment(ts_labels: np.ndarray, keep: tuple[str, ...] = SUBSET):
    """Stands in for the network in Typer-runner tests: TotalSegmentator's real labels, a subset."""
    from stuseg.inference import pipeline

    def segment(image, **kwargs):
        volume = read_image(Path(image), series=kwargs.get("series"))
        names = {labels.index_of(n): n for n in keep}
        lut = np.zeros(256, np.uint8)
        lut[list(names)] = list(names)
        data = lut[ts_labels]
        return pipeline.Segmentation(
            image=label_image(data, volume.header), names=names, size="small", device="cpu"
        )

    return segment


def test_cli_runner_writes_masks_and_a_matching_seg(
    tmp_path: Path, monkeypatch, ts_labels, series_volume
) -> None:
    from stuseg.inference import pipeline

    monkeypatch.setattr(pipeline, "segment", _fake_segment(ts_labels))
    out = tmp_path / "out"
    args = ["predict", str(SERIES), str(out), "--output-type", "nifti", "--output-type", "dicom-seg"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert result.stderr.strip().startswith(f"wrote 7 masks in {out} and {out / 'seg.dcm'} (small on cpu)")
    # The masks and the SEG, appearing together in one folder with stuseg's run marker.
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [".stuseg-run.json", "seg.dcm", *(f"{n}.nii.gz" for n in SUBSET)]
    )
    masks = seg_on_grid(out / "seg.dcm", series_volume.affine, ts_labels.shape)
    assert sorted(masks) == sorted(n for n in SUBSET if n != "kidney_left")  # kidney_left: absent
    for name in SUBSET:
        nifti = np.asarray(nib.load(out / f"{name}.nii.gz").dataobj)
        assert nifti.any() == (name in masks)
        if name in masks:
            np.testing.assert_array_equal(masks[name], nifti, err_msg=name)
    nifti_corner_check(out / "liver.nii.gz", out / "seg.dcm")


def test_cli_runner_ml_puts_the_seg_beside_the_file(tmp_path: Path, monkeypatch, ts_labels) -> None:
    from stuseg.inference import pipeline

    monkeypatch.setattr(pipeline, "segment", _fake_segment(ts_labels))
    out = tmp_path / "case.nii.gz"
    result = CliRunner().invoke(app, ["predict", str(SERIES), str(out), "--ml", "--output-type", "dicom-seg"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["case.dcm"]  # dicom-seg only: no NIfTI
    assert result.stderr.strip().startswith(f"wrote {tmp_path / 'case.dcm'} (small on cpu)")


def _refused(args: list[str], first_line: str, out: Path) -> None:
    result = CliRunner().invoke(app, ["predict", *args])
    assert result.exit_code == 1, result.output
    assert result.stderr.splitlines()[0] == first_line
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.output
    assert not out.exists()


def test_nifti_input_with_dicom_seg_is_refused_before_any_work(tmp_path: Path, monkeypatch) -> None:
    from stuseg.inference import pipeline

    monkeypatch.setattr(pipeline, "segment", lambda *a, **k: pytest.fail("segmented anyway"))
    ct = DATA / "abdomen_ct_3mm.nii.gz"
    out = tmp_path / "out"
    _refused(
        [str(ct), str(out), "--output-type", "dicom-seg"],
        f"stuseg: error: --output-type dicom-seg needs a folder holding a DICOM series as INPUT, but {ct} "
        "is not one; use --output-type nifti for this input",
        out,
    )


def test_badly_anonymised_series_is_refused_before_any_work(tmp_path: Path, monkeypatch) -> None:
    from stuseg.inference import pipeline

    monkeypatch.setattr(pipeline, "segment", lambda *a, **k: pytest.fail("segmented anyway"))
    out = tmp_path / "out"
    _refused(
        [str(BAD_SERIES), str(out), "--output-type", "nifti", "--output-type", "dicom-seg"],
        f"stuseg: error: cannot write a DICOM-SEG for {BAD_SERIES}: its files have no (or an empty) "
        "StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID, SOPClassUID, which the SEG must reference "
        "(a badly anonymised series?); fill them in with a DICOM tool, or leave out --output-type dicom-seg",
        out,
    )


def test_unknown_output_type(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["predict", str(SERIES), str(tmp_path / "o"), "--output-type", "png"])
    assert result.exit_code == 2 and "'png' is not one of 'nifti', 'dicom-seg'" in result.output
    assert not (tmp_path / "o").exists()


def test_missing_extra_is_one_line_naming_it(tmp_path: Path) -> None:
    out = tmp_path / "out"
    code = (
        "import sys; sys.modules['highdicom'] = None; from stuseg.cli import main; "
        f"sys.argv = ['stuseg', 'predict', {str(SERIES)!r}, {str(out)!r}, '--output-type', 'dicom-seg']; "
        "main()"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        "stuseg: error: --output-type dicom-seg needs the optional DICOM support; install it with: "
        'pip install "stuseg[dicom]"'
    ]
    assert not out.exists()


# --- one real run: the fabricated small model, as a user runs it --------------------------------


@pytest.fixture(scope="module")
def real_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    model = small_checkpoint(lambda: tmp_path_factory.mktemp("fabricated"))
    out = tmp_path_factory.mktemp("run") / "out"
    cmd = [sys.executable, "-m", "stuseg", "predict", str(SERIES), str(out), "--output-type", "nifti"]
    cmd += ["--output-type", "dicom-seg", "--weights", str(model), "--step-size", "1.0", "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "STUSEG_HOME": str(tmp_path_factory.mktemp("home"))}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, check=False)
    return out, done


@pytest.mark.slow
def test_real_run_seg_equals_its_nifti_masks(real_run, series_volume) -> None:
    out, done = real_run
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(f"wrote 104 masks in {out} and {out / 'seg.dcm'}")
    masks = seg_on_grid(out / "seg.dcm", series_volume.affine, series_volume.data.shape)
    present = []
    for name in labels.STRUCTURES:
        nifti = np.asarray(nib.load(out / f"{name}.nii.gz").dataobj)
        if nifti.any():
            present.append(name)
            np.testing.assert_array_equal(masks[name], nifti, err_msg=name)
    assert present and sorted(masks) == sorted(present)
    ds = pydicom.dcmread(out / "seg.dcm", stop_before_pixels=True)
    assert [str(s.SegmentLabel) for s in ds.SegmentSequence] == present
    assert ds.SegmentSequence[0].SegmentAlgorithmName == "STU-Net small"


@pytest.mark.slow
def test_real_run_seg_references_and_validity(real_run) -> None:
    out, done = real_run
    assert done.returncode == 0, done.stderr
    check_references(out / "seg.dcm")
    check_snomed(out / "seg.dcm")
    assert dciodvfy_errors(out / "seg.dcm") == []  # last: it skips where dciodvfy is missing


# --- a fine-tuned model's own structure names ---------------------------------------------------


def _model_result(series_volume) -> tuple[object, dict[int, str]]:
    data = np.zeros(series_volume.data.shape, np.uint8)
    data[100:140, 200:240, 2:6] = 1
    data[300:320, 300:330, 8:12] = 2
    data[250:260, 250:260, 14:16] = 3
    data[50:60, 50:60, 0:2] = 4
    names = labels.model_names({1: "Liver Tumour", 2: "GTVp", 3: "liver", 4: "肝臓 – Läsion"})
    return label_image(data, series_volume.header), names


def _segments(path: Path) -> dict[str, pydicom.Dataset]:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return {str(s.SegmentLabel): s for s in ds.SegmentSequence}


def test_the_generic_codes_are_tissue_in_dicoms_segmentation_tables() -> None:
    from pydicom.sr import _cid_dict
    from pydicom.sr.codedict import codes

    tissue = codes.SCT.Tissue
    assert "Tissue" in _cid_dict.cid_concepts[7150]["SCT"]  # Segmentation Property Categories
    assert "Tissue" in _cid_dict.cid_concepts[7151]["SCT"]  # Segmentation Property Types
    expected = (tissue.value, tissue.meaning)
    assert dicomseg.SnomedCodes(expected, expected, None) == dicomseg.GENERIC_CODES


def test_model_only_names_are_coded_generically_with_one_warning(tmp_path: Path, series_volume) -> None:
    from stuseg.images.io import StusegWarning

    image, names = _model_result(series_volume)
    path = tmp_path / "seg.dcm"
    with pytest.warns(StusegWarning) as caught:
        assert dicomseg.write_dicom_seg(image, names, dicomseg.read_dicom_source(SERIES), path) == path
    assert [str(w.message) for w in caught] == [
        "no SNOMED CT codes for Liver_Tumour, GTVp, 肝臓_–_Läsion, so the DICOM-SEG codes them as "
        "Tissue (SCT 85756007); give their codes with a codes file (predict --codes FILE)"
    ]
    segments = _segments(path)
    assert list(segments) == ["Liver_Tumour", "GTVp", "liver", "肝臓_–_Läsion"]  # unicode kept
    for name in ("Liver_Tumour", "GTVp", "肝臓_–_Läsion"):
        s = segments[name]
        for item in (s.SegmentedPropertyCategoryCodeSequence[0], s.SegmentedPropertyTypeCodeSequence[0]):
            assert (item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning) == (
                "85756007",
                "SCT",
                "Tissue",
            )
        assert s.SegmentDescription == name
    liver = segments["liver"]
    assert liver.SegmentedPropertyTypeCodeSequence[0].CodeValue == "10200004"  # the package's code
    assert "SegmentDescription" not in liver
    assert pydicom.dcmread(path, stop_before_pixels=True).SpecificCharacterSet == "ISO_IR 192"
    assert dciodvfy_errors(path) == []


CODES_CSV = """\
# codes of a tumour model
structure,category_code,category_meaning,type_code,type_meaning,modifier_code,modifier_meaning
GTVp,49755003,Morphologically Abnormal Structure,108369006,Neoplasm,,
Liver Tumour,49755003,Morphologically Abnormal Structure,108369006,Neoplasm,,
liver,123037004,Anatomical Structure,10200004,Liver,7771000,Left
"""


def test_user_codes_come_first_and_match_file_names(tmp_path: Path, series_volume) -> None:
    from stuseg.images.io import StusegWarning

    (tmp_path / "codes.csv").write_text(CODES_CSV, encoding="utf-8")
    codes = dicomseg.read_codes(tmp_path / "codes.csv")
    neoplasm = dicomseg.SnomedCodes(
        ("49755003", "Morphologically Abnormal Structure"), ("108369006", "Neoplasm"), None
    )
    assert codes["GTVp"] == codes["Liver Tumour"] == neoplasm
    doc = [
        {"structure": "GTVp", **dict(zip(dicomseg.CODE_COLUMNS[1:5], [*neoplasm.category, *neoplasm.type]))}
    ]
    (tmp_path / "codes.json").write_text(json.dumps(doc), encoding="utf-8")
    assert dicomseg.read_codes(tmp_path / "codes.json") == {"GTVp": neoplasm}

    image, names = _model_result(series_volume)
    path = tmp_path / "seg.dcm"
    with pytest.warns(StusegWarning) as caught:
        dicomseg.write_dicom_seg(image, names, dicomseg.read_dicom_source(SERIES), path, codes=codes)
    assert [str(w.message) for w in caught] == [
        "no SNOMED CT codes for 肝臓_–_Läsion, so the DICOM-SEG codes it as Tissue (SCT 85756007); "
        "give their codes with a codes file (predict --codes FILE)"
    ]
    segments = _segments(path)
    for name in ("Liver_Tumour", "GTVp"):  # "Liver Tumour" codes the output named Liver_Tumour
        assert segments[name].SegmentedPropertyTypeCodeSequence[0].CodeMeaning == "Neoplasm"
        assert "SegmentDescription" not in segments[name]
    modifier = (
        segments["liver"].SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence
    )
    assert modifier[0].CodeValue == "7771000"  # the user's row, not the package's
    assert dciodvfy_errors(path) == []


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "structure,category_code,category_meaning,type_code\nGTVp,1,a,2\n",
            "the codes file {p} lacks the column type_meaning; its header line must name structure, "
            "category_code, category_meaning, type_code, type_meaning, modifier_code, modifier_meaning",
        ),
        (
            "# c\nstructure,category_code,category_meaning,type_code,type_meaning\n"
            "GTVp,4975x003,A,108369006,N\n",
            "{p}, line 3: category_code '4975x003' is not a SNOMED CT concept id (6 to 18 digits); "
            "fix or remove it",
        ),
        (
            "structure,category_code,category_meaning,type_code,type_meaning\n,49755003,A,108369006,N\n",
            "{p}, line 2: the structure name is empty; fix or remove it",
        ),
        (
            "structure,category_code,category_meaning,type_code,type_meaning\nGTVp,49755003,A,108369006,\n",
            "{p}, line 2: type_meaning must be 1 to 64 characters without a backslash; fix or remove it",
        ),
        (
            "structure,category_code,category_meaning,type_code,type_meaning,modifier_code,modifier_meaning\n"
            "GTVp,49755003,A,108369006,N,7771000,\n",
            "{p}, line 2: modifier_meaning must be 1 to 64 characters without a backslash; fix or remove it",
        ),
        (
            "structure,category_code,category_meaning,type_code,type_meaning\n"
            "GTVp,49755003,A,108369006,N\nGTVp,49755003,A,108369006,N\n",
            "{p}, line 3: structure 'GTVp' is coded twice; keep one row",
        ),
    ],
)
def test_bad_codes_files_fail_with_one_line(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "codes.csv"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(InputError) as exc:
        dicomseg.read_codes(path)
    assert str(exc.value) == message.format(p=path)


def test_bad_json_codes_files(tmp_path: Path) -> None:
    path = tmp_path / "codes.json"
    path.write_text('{"GTVp": 1}', encoding="utf-8")
    with pytest.raises(InputError) as exc:
        dicomseg.read_codes(path)
    assert str(exc.value) == f"the codes file {path} must hold a JSON list of objects, one per structure"
    path.write_text('[{"structure": "GTVp", "category_code": "49755003"}]', encoding="utf-8")
    with pytest.raises(InputError) as exc:
        dicomseg.read_codes(path)
    assert str(exc.value) == (
        f"{path}, entry 1: category_meaning must be 1 to 64 characters without a backslash; fix or remove it"
    )
    with pytest.raises(InputError, match=r"^cannot read the codes file .*missing\.csv: No such file"):
        dicomseg.read_codes(tmp_path / "missing.csv")


# --- LABELMAP: one frame per slice, pixel value = segment number --------------------------------

LABEL_MAP_STORAGE = "1.2.840.10008.5.1.4.1.1.66.7"
# dciodvfy predating the Label Map Segmentation IOD reports "Information Object Not found" for it.
# Checked against the Segmentation IOD instead (same modules), it then reports exactly what a
# LABELMAP does differently: its type, the Background segment 0 that highdicom adds, and frames
# holding every segment (so without a per-frame SegmentIdentificationSequence).
LABELMAP_ONLY_ERRORS = {
    "Error - Unrecognized enumerated value <LABELMAP> for value 1 of attribute <Segmentation Type>",
    "Error - Value is zero for value 1 of attribute <Segment Number>",
    "Error - SegmentNumber not monotonically increasing from one by one - have SegmentSequence item "
    "number 1 (from one) with SegmentNumber of 0",
    "Error - Missing attribute Type 1 Required Element=<SegmentIdentificationSequence> "
    "Module=<SegmentationMacro>",
}


def labelmap_dciodvfy_errors(path: Path, tmp_path: Path) -> list[str]:
    """dciodvfy's errors for a LABELMAP SEG, less those only a dciodvfy without its IOD reports."""
    exe = shutil.which("dciodvfy")
    if exe is None:
        pytest.skip("dciodvfy (Debian package dicom3tools) is not installed; .ci/run installs it")
    done = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=120, check=False)
    lines = (done.stdout + done.stderr).splitlines()
    if "Error - Information Object Not found" not in lines:
        assert any("Segmentation" in line for line in lines), lines
        return [line for line in lines if line.startswith("Error")]
    as_seg = pydicom.dcmread(path)
    as_seg.SOPClassUID = as_seg.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.66.4"
    as_seg.save_as(tmp_path / "as_segmentation.dcm")
    errors = dciodvfy_errors(tmp_path / "as_segmentation.dcm")
    assert (
        "Error - Unrecognized enumerated value <LABELMAP> for value 1 of attribute <Segmentation Type>"
        in errors
    )
    return [line for line in errors if line not in LABELMAP_ONLY_ERRORS]


def volume_on_grid(volume: hd.Volume, affine: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """highdicom's volume (LPS affine, its own axis order) placed voxel by voxel on a RAS NIfTI grid
    through both affines: each of its voxels must land on a voxel of the grid."""
    to_grid = np.linalg.inv(affine) @ np.diag([-1.0, -1.0, 1.0, 1.0]) @ volume.affine
    index = np.indices(volume.array.shape).reshape(3, -1).astype(np.float64)
    exact = to_grid[:3, :3] @ index + to_grid[:3, 3:]
    nearest = np.rint(exact)
    assert np.max(np.abs(exact - nearest)) < 1e-3  # on the grid
    ijk = nearest.astype(np.intp)
    assert ijk.min() >= 0 and all(ijk[a].max() < shape[a] for a in range(3))  # inside it
    out = np.zeros(shape, volume.array.dtype)
    out[tuple(ijk)] = volume.array.reshape(-1)
    return out


@pytest.fixture(scope="module")
def seg_types(tmp_path_factory: pytest.TempPathFactory, ts_labels) -> dict[str, Path]:
    """``predict --ml --output-type nifti --output-type dicom-seg`` of the whole TotalSegmentator
    result, once without --dicom-seg-type (binary) and once with labelmap: -> the --ml NIfTI file
    (the SEG is case.dcm beside it)."""
    from stuseg.inference import pipeline

    runs = {}
    for kind in ("default", "labelmap"):
        out = tmp_path_factory.mktemp(kind) / "case.nii.gz"
        args = [
            "predict",
            str(SERIES),
            str(out),
            "--ml",
            "--output-type",
            "nifti",
            "--output-type",
            "dicom-seg",
        ]
        args += ["--dicom-seg-type", kind] if kind != "default" else []
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(pipeline, "segment", _fake_segment(ts_labels, labels.STRUCTURES))
            result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        assert result.stderr.strip().splitlines()[-1].startswith(f"wrote {out} and {out.parent / 'case.dcm'}")
        runs[kind] = out
    return runs


def test_labelmap_seg_equals_the_nifti_label_map(seg_types: dict[str, Path]) -> None:
    nifti_path = seg_types["labelmap"]
    seg_path = nifti_path.parent / "case.dcm"
    ds = pydicom.dcmread(seg_path, stop_before_pixels=True)
    assert ds.SOPClassUID == LABEL_MAP_STORAGE and ds.SegmentationType == "LABELMAP"
    nifti = nib.load(nifti_path)
    expected = np.asarray(nifti.dataobj)
    present = [labels.LABELS[v] for v in np.unique(expected) if v]
    assert len(present) > 20  # the whole anatomy, not the subset
    # Segment 0 is the background highdicom adds; the structures are 1..N in label order.
    assert [(int(s.SegmentNumber), str(s.SegmentLabel)) for s in ds.SegmentSequence] == [
        (0, "Background"),
        *enumerate(present, start=1),
    ]
    seg = hd.seg.segread(seg_path)
    volume = seg.get_volume(combine_segments=True)
    numbers = volume_on_grid(volume, nifti.affine, expected.shape)
    to_label = np.zeros(len(present) + 1, np.uint8)
    to_label[1:] = [labels.index_of(name) for name in present]
    decoded = to_label[numbers]
    np.testing.assert_array_equal(decoded, expected)
    # The comparison sees a mirrored or shifted map: the anatomy is not symmetric along any axis.
    for axis in range(3):
        assert not np.array_equal(decoded, np.flip(expected, axis)), axis
        assert not np.array_equal(decoded, np.roll(expected, 1, axis)), axis


def test_labelmap_segments_are_described_as_in_binary(seg_types: dict[str, Path]) -> None:
    binary = pydicom.dcmread(seg_types["default"].parent / "case.dcm", stop_before_pixels=True)
    labelmap = pydicom.dcmread(seg_types["labelmap"].parent / "case.dcm", stop_before_pixels=True)
    assert binary.SegmentationType == "BINARY"  # no --dicom-seg-type: binary, as before
    assert list(labelmap.SegmentSequence)[1:] == list(binary.SegmentSequence)  # numbers, names, codes
    background = labelmap.SegmentSequence[0]
    for item in (
        background.SegmentedPropertyCategoryCodeSequence[0],
        background.SegmentedPropertyTypeCodeSequence[0],
    ):
        assert (item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning) == (
            "125040",
            "DCM",
            "Background",
        )


def test_labelmap_seg_is_smaller_than_binary(seg_types: dict[str, Path]) -> None:
    binary = (seg_types["default"].parent / "case.dcm").stat().st_size
    labelmap = (seg_types["labelmap"].parent / "case.dcm").stat().st_size
    assert labelmap < binary / 2, (labelmap, binary)


def test_labelmap_seg_frames_are_the_source_slices(seg_types: dict[str, Path]) -> None:
    ds = pydicom.dcmread(seg_types["labelmap"].parent / "case.dcm", stop_before_pixels=True)
    sources = source_headers()
    assert ds.NumberOfFrames == len(ds.PerFrameFunctionalGroupsSequence) <= len(sources)
    frame_sources = []
    for item in ds.PerFrameFunctionalGroupsSequence:
        assert "SegmentIdentificationSequence" not in item  # one frame holds every segment
        uid = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        ipp = [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]
        np.testing.assert_allclose(ipp, [float(v) for v in sources[uid].ImagePositionPatient], atol=1e-4)
        frame_sources.append(uid)
    assert len(set(frame_sources)) == len(frame_sources)  # one frame per slice


def test_labelmap_seg_passes_dciodvfy(seg_types: dict[str, Path], tmp_path: Path) -> None:
    seg_path = seg_types["labelmap"].parent / "case.dcm"
    assert labelmap_dciodvfy_errors(seg_path, tmp_path) == []
    # and the check can fail: the same file without a Type 1 attribute
    broken = pydicom.dcmread(seg_path)
    del broken.SegmentSequence[1].SegmentLabel
    broken.save_as(tmp_path / "broken.dcm")
    assert any("SegmentLabel" in line for line in labelmap_dciodvfy_errors(tmp_path / "broken.dcm", tmp_path))


def test_dicom_seg_type_without_dicom_seg_is_refused(tmp_path: Path, monkeypatch) -> None:
    from stuseg.inference import pipeline

    monkeypatch.setattr(pipeline, "segment", lambda *a, **k: pytest.fail("segmented anyway"))
    out = tmp_path / "out"
    _refused(
        [str(SERIES), str(out), "--dicom-seg-type", "labelmap"],
        "stuseg: error: --dicom-seg-type applies to --output-type dicom-seg",
        out,
    )
    result = CliRunner().invoke(app, ["predict", str(SERIES), str(out), "--dicom-seg-type", "rle"])
    assert result.exit_code == 2 and "'rle' is not one of 'binary', 'labelmap'" in result.output


def test_seg_type_choices_and_a_wrong_one(tmp_path: Path, series_volume) -> None:
    from stuseg.cli.options import DicomSegType

    assert tuple(t.value for t in DicomSegType) == dicomseg.SEG_TYPES
    image = label_image(np.zeros(series_volume.data.shape, np.uint8), series_volume.header)
    source = dicomseg.read_dicom_source(SERIES)
    with pytest.raises(ValueError, match=r"^seg_type must be one of binary, labelmap, not 'LABELMAP'$"):
        dicomseg.write_dicom_seg(image, {1: "liver"}, source, tmp_path / "seg.dcm", seg_type="LABELMAP")
