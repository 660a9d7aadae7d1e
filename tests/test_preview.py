"""The preview picture: orientation, aspect ratio, colours, LPS = RAS, and ``stuseg preview``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from stuseg.analysis import preview
from stuseg.cli import app
from stuseg.results import scans
from stuseg.results.labelmaps import label_colors

DATA = Path(__file__).parent / "data"
TS = DATA / "totalseg_results"
TS_CT = TS / "abdomen_ct_sm.nii.gz"
TS_MASKS = TS / "abdomen_ct_sm_masks"
NAMES = {1: "liver", 2: "spleen", 3: "aorta"}


def to_lps(arr: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The same image stored LPS: i and j reversed, the affine adjusted so every voxel keeps its
    world position."""
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[0, 3], flip[1, 3] = arr.shape[0] - 1, arr.shape[1] - 1
    return np.ascontiguousarray(arr[::-1, ::-1, :]), affine @ flip


def columns_and_rows(img: np.ndarray, rgb: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Pixel positions (rows, cols) whose colour is exactly ``rgb``."""
    rows, cols = np.nonzero((img == np.array(rgb, np.uint8)).all(axis=2))
    return rows, cols


@pytest.fixture
def marker_scan() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """RAS, 2 mm voxels: a body (uniform 40 HU), a 'liver' block on the patient's right (high x),
    a 'spleen' block on the left, an 'aorta' block at the top (high z) and front (high y)."""
    shape = (40, 30, 36)
    ct = np.full(shape, -1000.0, np.float32)
    ct[4:36, 4:26, 2:34] = 40.0
    labels = np.zeros(shape, np.uint8)
    labels[26:34, 10:20, 12:22] = 1  # liver: x high = patient's right
    labels[6:12, 10:20, 12:22] = 2  # spleen: patient's left
    labels[18:22, 20:24, 28:32] = 3  # aorta: anterior and superior
    return labels, np.diag([2.0, 2.0, 2.0, 1.0]), ct


def test_patient_right_is_image_left_head_up_anterior_up(marker_scan) -> None:
    labels, affine, ct = marker_scan
    views = preview.draw_views(labels, affine, ct, NAMES)
    colors = label_colors(NAMES)
    for title in ("coronal", "axial", "front view"):
        img = views.images[title]
        half = img.shape[1] / 2
        _, liver_cols = columns_and_rows(img, colors[1])
        _, spleen_cols = columns_and_rows(img, colors[2])
        if title == "front view":  # shaded: find the structures by hue instead
            liver_cols = np.nonzero(hue_mask(img, colors[1]))[1]
            spleen_cols = np.nonzero(hue_mask(img, colors[2]))[1]
        assert liver_cols.size and spleen_cols.size, title
        assert liver_cols.max() < half < spleen_cols.min(), title
    # Head up: the superior 'aorta' lies in the top half of the coronal and sagittal slices.
    coronal = preview.draw_views(np.where(labels == 3, 3, 0).astype(np.uint8), affine, ct, NAMES)
    for title in ("coronal", "sagittal"):
        rows, cols = columns_and_rows(coronal.images[title], colors[3])
        assert rows.size and rows.max() < coronal.images[title].shape[0] / 2, title
    # Anterior: top of the axial slice, left of the sagittal slice.
    rows, _ = columns_and_rows(coronal.images["axial"], colors[3])
    assert rows.max() < coronal.images["axial"].shape[0] / 2
    _, cols = columns_and_rows(coronal.images["sagittal"], colors[3])
    assert cols.max() < coronal.images["sagittal"].shape[1] / 2


def hue_mask(img: np.ndarray, rgb: tuple[int, int, int]) -> np.ndarray:
    """Pixels whose colour is a darker shade of ``rgb`` (same direction in RGB space)."""
    ref = np.array(rgb, float) / np.linalg.norm(rgb)
    norm = np.linalg.norm(img.astype(float), axis=2)
    cos = (img.astype(float) @ ref) / np.maximum(norm, 1e-9)
    return (norm > 20) & (cos > 0.999)


def test_lps_storage_gives_the_same_picture(marker_scan) -> None:
    labels, affine, ct = marker_scan
    lab_lps, aff_lps = to_lps(labels, affine)
    ct_lps, _ = to_lps(ct, affine)
    assert nib.aff2axcodes(aff_lps) == ("L", "P", "S")
    a = np.asarray(preview.render(labels, affine, ct, NAMES))
    b = np.asarray(preview.render(lab_lps, aff_lps, ct_lps, NAMES))
    np.testing.assert_array_equal(a, b)


def test_fill_and_outline_colours_under_a_structure(marker_scan) -> None:
    labels, affine, ct = marker_scan
    views = preview.draw_views(labels, affine, ct, NAMES)
    colors = label_colors(NAMES)
    axial = views.images["axial"]
    # The liver block spans x 26..33, y 10..19 (2 mm voxels); in the axial view (patient's right
    # on the left, anterior up) its middle is at column (40 - 30) * 2 mm, row (30 - 15) * 2 mm.
    px = views.pixel_mm
    row, col = round((30 - 15) * 2 / px), round((40 - 30) * 2 / px)
    gray = (40 - (-160)) / 400 * 255  # 40 HU in the W400/L40 window
    want = np.rint((1 - preview.FILL_ALPHA) * gray + preview.FILL_ALPHA * np.array(colors[1]))
    np.testing.assert_array_equal(axial[row, col], want)
    # Its outline is drawn in the pure colour, around that point.
    rows, cols = columns_and_rows(axial, colors[1])
    assert rows.min() < row < rows.max() and cols.min() < col < cols.max()


def test_anisotropic_voxels_keep_their_physical_aspect() -> None:
    """A 24 x 24 x 24 mm cube of 1 x 1 x 4 mm voxels is square in the coronal and sagittal views."""
    shape = (60, 60, 20)
    labels = np.zeros(shape, np.uint8)
    labels[18:42, 18:42, 7:13] = 1  # 24 voxels x 1 mm, 24 x 1 mm, 6 x 4 mm
    ct = np.zeros(shape, np.float32)
    views = preview.draw_views(labels, np.diag([1.0, 1.0, 4.0, 1.0]), ct, {1: "liver"})
    px = views.pixel_mm
    assert px == pytest.approx(80 / preview.VIEW_PIXELS)  # the longest side, z: 20 x 4 mm
    for title in ("coronal", "sagittal", "axial"):
        img = views.images[title]
        rows, cols = np.nonzero(img.any(axis=2) & (img.std(axis=2) > 1))  # coloured pixels
        height, width = np.ptp(rows) + 1, np.ptp(cols) + 1
        assert height == pytest.approx(24 / px, abs=2), title
        assert width == pytest.approx(24 / px, abs=2), title
    # The whole coronal view spans 60 mm across and 80 mm down.
    assert views.images["coronal"].shape[:2] == (round(80 / px), round(60 / px))


def test_overlapping_layers_are_painted_last_on_top() -> None:
    a = np.zeros((10, 10, 10), np.uint8)
    b = np.zeros((10, 10, 10), np.uint8)
    a[2:8, 2:8, 2:8] = 1
    b[4:6, 4:6, 4:6] = 2
    merged = preview._merge([a, b])
    assert merged[5, 5, 5] == 2 and merged[3, 3, 3] == 1


def test_real_scan_lps_copy_gives_the_same_picture_and_liver_on_the_left() -> None:
    scan = scans.load_scan(TS_MASKS, TS_CT)
    (labels,) = scan.labels
    lab_lps, aff_lps = to_lps(labels, scan.affine)
    ct_lps, _ = to_lps(scan.ct, scan.affine)
    a = preview.render(labels, scan.affine, scan.ct, scan.names)
    b = preview.render(lab_lps, aff_lps, ct_lps, scan.names)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    views = preview.draw_views(labels, scan.affine, scan.ct, scan.names)
    value = {n: v for v, n in scan.names.items()}
    colors = label_colors(scan.names)
    for title in ("coronal", "axial"):
        _, liver = columns_and_rows(views.images[title], colors[value["liver"]])
        _, spleen = columns_and_rows(views.images[title], colors[value["spleen"]])
        assert np.median(liver) < views.images[title].shape[1] / 2 < np.median(spleen), title


def test_real_lps_chest_bone_of_the_right_side_is_drawn_on_the_left() -> None:
    """The LPS chest CT: bone and contrast (> 250 HU) split at the body's middle along the
    patient's left-right axis; the same picture from the LPS file and its RAS copy."""
    img = nib.load(DATA / "chest_ct_1p5mm_lps.nii.gz")
    ct = img.get_fdata(dtype=np.float32)
    assert nib.aff2axcodes(img.affine) == ("L", "P", "S")
    # Stored LPS: the index i grows towards the patient's left.
    i_mid = int(np.median(np.nonzero(ct > -300)[0]))
    labels = np.zeros(ct.shape, np.uint8)
    labels[:i_mid][ct[:i_mid] > 250] = 1  # patient's right
    labels[i_mid:][ct[i_mid:] > 250] = 2
    names = {1: "rib_right_5", 2: "rib_left_5"}
    a = preview.render(labels, img.affine, ct, names)
    canonical = nib.as_closest_canonical(nib.Nifti1Image(labels, img.affine))
    ct_ras = nib.as_closest_canonical(img).get_fdata(dtype=np.float32)
    b = preview.render(np.asanyarray(canonical.dataobj), canonical.affine, ct_ras, names)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    views = preview.draw_views(labels, img.affine, ct, names)
    colors = label_colors(names)
    for title in ("coronal", "axial"):
        _, right = columns_and_rows(views.images[title], colors[1])
        _, left = columns_and_rows(views.images[title], colors[2])
        assert right.max() < left.min() + 2, title  # they meet at the midline, right side on the left


# --- command line ------------------------------------------------------------------------------


def test_preview_command_draws_totalsegmentator_masks(tmp_path: Path) -> None:
    out = tmp_path / "p.png"
    result = CliRunner().invoke(app, ["preview", str(TS_MASKS), str(TS_CT), str(out)])
    assert result.exit_code == 0, result.output
    assert result.stderr.strip() == f"wrote {out}"
    scan = scans.load_scan(TS_MASKS, TS_CT)
    with Image.open(out) as png:
        assert png.format == "PNG" and png.mode == "RGB"
        expected = preview.render(scan.labels, scan.affine, scan.ct, scan.names)
        assert png.size == expected.size
        np.testing.assert_array_equal(np.asarray(png), np.asarray(expected))
    assert [p.name for p in tmp_path.iterdir()] == ["p.png"]


def test_preview_command_in_a_subprocess_on_the_dicom_series(tmp_path: Path) -> None:
    out = tmp_path / "dicom.png"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [sys.executable, "-m", "stuseg", "preview", str(TS / "abdomen_ct_dicom_multilabel.nii.gz")]
    cmd += [
        str(DATA / "abdomen_ct_dicom"),
        str(out),
        "--names",
        str(TS / "totalsegmentator_v2_total_labels.json"),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines() == [
        f"note: {TS / 'abdomen_ct_dicom_multilabel.nii.gz'} is stored in another axis order than the CT; "
        "matched voxel for voxel",
        f"wrote {out}",
    ]
    with Image.open(out) as png:
        assert png.mode == "RGB" and min(png.size) > 300


def test_preview_on_another_grid_is_one_line_and_writes_nothing(tmp_path: Path) -> None:
    ct = nib.load(TS_CT)
    other = tmp_path / "ct" / "other.nii.gz"
    other.parent.mkdir()
    nib.save(nib.Nifti1Image(np.asanyarray(ct.dataobj)[:120], ct.affine), other)
    out = tmp_path / "out"
    out.mkdir()
    result = CliRunner().invoke(app, ["preview", str(TS_MASKS), str(other), str(out / "p.png")])
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        "stuseg: error: SEG and CT are not on the same grid (shape (122, 101, 30) vs (120, 101, 30)); "
        "give the CT the segmentation was made from"
    ]
    assert "Traceback" not in result.output
    assert list(out.iterdir()) == []


def test_preview_output_must_be_png(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["preview", str(TS_MASKS), str(TS_CT), str(tmp_path / "p.jpg")])
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [f"stuseg: error: {tmp_path / 'p.jpg'} must end in .png"]
    assert list(tmp_path.iterdir()) == []
