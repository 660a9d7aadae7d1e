"""Reading images: geometry of real scans, SimpleITK formats, DICOM series, and every input error."""

from __future__ import annotations

import gzip
import shutil
import warnings
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from stuseg.errors import InputError
from stuseg.images.io import SUPPORTED_INPUTS, StusegWarning, Volume, label_image, label_values, read_image
from stuseg.results.labelmaps import write_nifti

DATA = Path(__file__).parent / "data"

# An oblique rotation (about an axis that is not a coordinate axis) for synthetic images.
_AXIS = np.array([1.0, 2.0, 3.0]) / np.linalg.norm([1.0, 2.0, 3.0])
_ANGLE = 0.4
_K = np.array([[0, -_AXIS[2], _AXIS[1]], [_AXIS[2], 0, -_AXIS[0]], [-_AXIS[1], _AXIS[0], 0]])
OBLIQUE = np.eye(3) + np.sin(_ANGLE) * _K + (1 - np.cos(_ANGLE)) * _K @ _K


def itk_point_ras(img: sitk.Image, index: Sequence[int]) -> np.ndarray:
    """Where ITK puts voxel ``index`` (x, y, z), converted from LPS to RAS."""
    x, y, z = img.TransformIndexToPhysicalPoint([int(i) for i in index])
    return np.array([-x, -y, z])


def voxel_ras(vol: Volume, index: Sequence[int]) -> np.ndarray:
    return (vol.affine @ [*index, 1.0])[:3]


def corners(shape: Sequence[int]) -> list[tuple[int, int, int]]:
    return [(i, j, k) for i in (0, shape[0] - 1) for j in (0, shape[1] - 1) for k in (0, shape[2] - 1)]


def synthetic_sitk(
    size: tuple[int, int, int] = (7, 6, 5),
    spacing: tuple[float, float, float] = (0.7, 1.1, 2.5),
    origin: tuple[float, float, float] = (12.5, -30.0, 41.0),
    direction: np.ndarray = OBLIQUE,
) -> sitk.Image:
    """A float32 image with distinct values, one bright voxel at (5, 1, 3), oblique by default."""
    arr = np.random.default_rng(1).normal(0, 100, size[::-1]).astype(np.float32)
    arr[3, 1, 5] = 5000.0  # [z, y, x]
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection(tuple(np.asarray(direction, float).ravel()))
    return img


def write_dicom_series(
    folder: Path,
    uid: str,
    description: str,
    size: tuple[int, int, int] = (6, 5, 4),
    direction: np.ndarray = OBLIQUE,
    skip: Sequence[int] = (),
    tilt_mm: float = 0.0,
) -> sitk.Image:
    """A small CT series, one file per slice, written by SimpleITK with its geometry tags.

    ``skip`` leaves slices out (a gap); ``tilt_mm`` shifts each slice sideways (gantry tilt).
    """
    folder.mkdir(parents=True, exist_ok=True)
    arr = (np.arange(np.prod(size)).reshape(size[::-1]) * 3 - 500).astype(np.int16)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((0.8, 0.9, 2.5))
    img.SetOrigin((-20.0, 15.0, 100.0))
    img.SetDirection(tuple(direction.ravel()))
    d = direction
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(size[2]):
        if k in skip:
            continue
        position = np.array(img.TransformIndexToPhysicalPoint((0, 0, k))) + tilt_mm * k * d[:, 1]
        tags = {
            "0008|0060": "CT",
            "0008|103e": description,
            "0020|000d": "1.2.826.0.1.3680043.2.1125.1",
            "0020|000e": uid,
            "0008|0018": f"{uid}.{k + 1}",
            "0020|0013": str(k + 1),
            "0020|0037": "\\".join(f"{v:.10f}" for v in (*d[:, 0], *d[:, 1])),
            "0020|0032": "\\".join(f"{v:.6f}" for v in position),
        }
        sl = img[:, :, k]
        for tag, value in tags.items():
            sl.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{description}{k:03d}.dcm"))
        writer.Execute(sl)
    return img


# ---------------------------------------------------------------------------------------------
# Real scans


@pytest.mark.parametrize(
    ("name", "shape", "codes"),
    [
        ("abdomen_ct_3mm.nii.gz", (122, 101, 112), ("R", "A", "S")),
        ("chest_ct_1p5mm_lps.nii.gz", (233, 167, 191), ("L", "P", "S")),
    ],
)
def test_real_nifti_keeps_header_affine_and_values(name: str, shape: tuple, codes: tuple) -> None:
    path = DATA / name
    ref = nib.load(path)
    vol = read_image(path)
    assert vol.data.shape == shape
    assert vol.data.dtype == np.float32
    np.testing.assert_array_equal(vol.affine, ref.affine)
    assert nib.aff2axcodes(vol.affine) == codes
    # The original header, verbatim: codes (qform 0, sform 2 here), quaternions, srows.
    assert vol.header.binaryblock == ref.header.binaryblock
    assert (int(vol.header["qform_code"]), int(vol.header["sform_code"])) == (0, 2)
    np.testing.assert_array_equal(vol.data, np.asanyarray(ref.dataobj).astype(np.float32))
    out = label_image(np.zeros(shape, np.uint8), vol.header)
    np.testing.assert_array_equal(out.header.get_best_affine(), ref.affine)


def test_real_dicom_matches_simpleitk_nifti_conversion(tmp_path: Path) -> None:
    folder = DATA / "abdomen_ct_dicom"
    vol = read_image(folder)
    assert vol.data.shape == (512, 512, 20)
    np.testing.assert_allclose(np.linalg.norm(vol.affine[:3, :3], axis=0), (0.9765625, 0.9765625, 2.0))
    assert nib.aff2axcodes(vol.affine) == ("L", "P", "S")
    assert (int(vol.header["qform_code"]), int(vol.header["sform_code"])) == (1, 1)
    assert vol.header.get_data_shape() == (512, 512, 20)

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder)))
    itk = reader.Execute()
    converted = tmp_path / "converted.nii"
    sitk.WriteImage(itk, str(converted))
    ref = nib.load(converted)
    np.testing.assert_array_equal(vol.data, ref.get_fdata(dtype=np.float32))
    np.testing.assert_allclose(vol.affine, ref.affine, atol=1e-4)
    # A known voxel lands where ITK puts it, and where nibabel puts it in the converted file.
    for index in [*corners(vol.data.shape), (100, 300, 7)]:
        np.testing.assert_allclose(voxel_ras(vol, index), itk_point_ras(itk, index), atol=1e-6)
        np.testing.assert_allclose(voxel_ras(vol, index), (ref.affine @ [*index, 1])[:3], atol=1e-3)
    assert vol.data.min() < -500  # HU after rescale slope/intercept


def test_real_dicom_series_is_listed_when_the_uid_does_not_match() -> None:
    # The anonymised series has an empty SeriesInstanceUID.
    folder = DATA / "abdomen_ct_dicom"
    with pytest.raises(InputError) as exc:
        read_image(folder, series="1.2.3")
    assert str(exc.value) == (
        f"{folder} has no DICOM series with UID '1.2.3'; valid UIDs: (empty UID) ('CT Body 3.0', 20 slices)"
    )


# ---------------------------------------------------------------------------------------------
# SimpleITK formats: arrays and oblique geometry


@pytest.mark.parametrize("suffix", [".nrrd", ".nhdr", ".mha", ".mhd"])
def test_simpleitk_formats_round_trip_oblique(tmp_path: Path, suffix: str) -> None:
    img = synthetic_sitk()
    path = tmp_path / f"ct{suffix}"
    sitk.WriteImage(img, str(path))
    vol = read_image(path)
    # (z, y, x) from SimpleITK -> (x, y, z) like nibabel.
    np.testing.assert_array_equal(vol.data, sitk.GetArrayFromImage(img).transpose(2, 1, 0))
    assert vol.data.shape == (7, 6, 5)
    # The bright voxel (5, 1, 3) is at the same physical point for ITK and for our affine.
    bright = np.unravel_index(np.argmax(vol.data), vol.data.shape)
    assert bright == (5, 1, 3)
    for index in [*corners(vol.data.shape), bright]:
        np.testing.assert_allclose(voxel_ras(vol, index), itk_point_ras(img, index), atol=1e-4)
    # ... and where nibabel puts it when SimpleITK converts the image to NIfTI.
    converted = tmp_path / "converted.nii.gz"
    sitk.WriteImage(img, str(converted))
    ref = nib.load(converted)
    np.testing.assert_allclose(vol.affine, ref.affine, atol=1e-4)
    np.testing.assert_array_equal(vol.data, ref.get_fdata(dtype=np.float32))
    # The header is the NIfTI equivalent: qform = sform = affine, code 1.
    assert (int(vol.header["qform_code"]), int(vol.header["sform_code"])) == (1, 1)
    np.testing.assert_allclose(vol.header.get_sform(), vol.affine, atol=1e-4)
    np.testing.assert_allclose(vol.header.get_qform(), vol.affine, atol=1e-4)


def test_lps_mha_reads_as_lps_axcodes(tmp_path: Path) -> None:
    path = tmp_path / "ct.mha"
    sitk.WriteImage(synthetic_sitk(direction=np.eye(3)), str(path))
    vol = read_image(path)
    # ITK's identity direction means +x = Left, +y = Posterior.
    assert nib.aff2axcodes(vol.affine) == ("L", "P", "S")
    np.testing.assert_allclose(np.linalg.norm(vol.affine[:3, :3], axis=0), (0.7, 1.1, 2.5))


def test_simpleitk_4d_with_trailing_singleton_is_squeezed(tmp_path: Path) -> None:
    img3 = synthetic_sitk()
    img4 = sitk.JoinSeries([img3])
    assert img4.GetDimension() == 4
    path = tmp_path / "ct4d.nrrd"
    sitk.WriteImage(img4, str(path))
    vol = read_image(path)
    assert vol.data.shape == (7, 6, 5)
    np.testing.assert_array_equal(vol.data, sitk.GetArrayFromImage(img3).transpose(2, 1, 0))
    for index in corners(vol.data.shape):
        np.testing.assert_allclose(voxel_ras(vol, index), itk_point_ras(img3, index), atol=1e-4)


# ---------------------------------------------------------------------------------------------
# NIfTI specifics: scaling, NaNs, squeezing


def test_nifti_scaling_and_nans_are_kept(tmp_path: Path) -> None:
    raw = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    img = nib.Nifti1Image(raw, np.eye(4))
    img.header.set_slope_inter(2.0, -1024.0)
    nib.save(img, tmp_path / "scaled.nii.gz")
    vol = read_image(tmp_path / "scaled.nii.gz")
    assert vol.data.dtype == np.float32
    np.testing.assert_array_equal(vol.data, raw * 2.0 - 1024.0)

    data = np.zeros((3, 3, 3), np.float32)
    data[1, 1, 1] = np.nan
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "nan.nii")
    vol = read_image(tmp_path / "nan.nii")
    assert np.isnan(vol.data[1, 1, 1]) and np.isnan(vol.data).sum() == 1


@pytest.mark.parametrize("extra", [(1,), (1, 1)])
def test_nifti_trailing_singletons_become_3d(make_nifti, extra: tuple[int, ...], tmp_path: Path) -> None:
    affine = np.array([[0, -0.8, 0, 10], [0.9, 0, 0, -5], [0, 0, 2.5, 30], [0, 0, 0, 1]])
    data = np.random.default_rng(0).integers(-1000, 1000, (5, 4, 3, *extra)).astype(np.int16)
    path = make_nifti(shape=(5, 4, 3), affine=affine, data=data, name="ct4d.nii.gz")
    original = nib.load(path).header
    vol = read_image(path)
    assert vol.data.shape == (5, 4, 3)
    np.testing.assert_array_equal(vol.data, data.reshape(5, 4, 3))
    np.testing.assert_array_equal(vol.affine, nib.load(path).affine)
    assert vol.header.get_data_shape() == (5, 4, 3) and vol.header["dim"][0] == 3
    for field in ("qform_code", "sform_code", "quatern_b", "quatern_c", "quatern_d", "srow_x", "srow_z"):
        np.testing.assert_array_equal(vol.header[field], original[field])
    out = tmp_path / "mask.nii.gz"
    write_nifti(label_image(np.ones((5, 4, 3), np.uint8), vol.header), out)
    back = nib.load(out)
    assert back.shape == (5, 4, 3)
    np.testing.assert_array_equal(back.affine, nib.load(path).affine)


def test_single_slice_is_3d(make_nifti) -> None:
    vol = read_image(make_nifti(shape=(8, 9, 1), data=np.zeros((8, 9, 1), np.int16)))
    assert vol.data.shape == (8, 9, 1)


def test_nifti_without_qform_or_sform_warns(tmp_path: Path) -> None:
    img = nib.Nifti1Image(np.zeros((3, 3, 3), np.int16), None)
    img.header.set_qform(None, code=0)
    img.header.set_sform(None, code=0)
    path = tmp_path / "noorient.nii.gz"
    nib.save(img, path)
    with pytest.warns(StusegWarning, match="has neither a qform nor an sform"):
        read_image(path)


def test_reading_a_good_file_raises_no_warning(make_nifti) -> None:
    path = make_nifti()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read_image(path)


# ---------------------------------------------------------------------------------------------
# DICOM series


def test_synthetic_oblique_dicom_series_geometry(tmp_path: Path) -> None:
    img = write_dicom_series(tmp_path / "series", "1.2.826.0.1.3680043.2.1125.7", "oblique")
    vol = read_image(tmp_path / "series")
    np.testing.assert_array_equal(vol.data, sitk.GetArrayFromImage(img).transpose(2, 1, 0))
    for index in corners(vol.data.shape):
        np.testing.assert_allclose(voxel_ras(vol, index), itk_point_ras(img, index), atol=1e-4)


def two_series(tmp_path: Path) -> Path:
    folder = tmp_path / "mixed"
    write_dicom_series(folder, "1.2.826.0.1.3680043.2.1125.1", "venous", size=(6, 5, 4))
    write_dicom_series(folder, "1.2.826.0.1.3680043.2.1125.2", "arterial", size=(6, 5, 3))
    return folder


SERIES = (
    "1.2.826.0.1.3680043.2.1125.1 ('venous', 4 slices)",
    "1.2.826.0.1.3680043.2.1125.2 ('arterial', 3 slices)",
)


def listings() -> set[str]:
    """The two series in either order (GDCM's order is not specified)."""
    return {", ".join(SERIES), ", ".join(reversed(SERIES))}


def test_mixed_series_folder_lists_them(tmp_path: Path) -> None:
    folder = two_series(tmp_path)
    with pytest.raises(InputError) as exc:
        read_image(folder)
    assert str(exc.value) in {
        f"{folder} holds 2 DICOM series: {x}; pick one with --series UID" for x in listings()
    }


def test_series_selection(tmp_path: Path) -> None:
    folder = two_series(tmp_path)
    assert read_image(folder, series="1.2.826.0.1.3680043.2.1125.2").data.shape == (6, 5, 3)
    assert read_image(folder, series="1.2.826.0.1.3680043.2.1125.1").data.shape == (6, 5, 4)
    with pytest.raises(InputError) as exc:
        read_image(folder, series="9.9")
    assert str(exc.value) in {
        f"{folder} has no DICOM series with UID '9.9'; valid UIDs: {x}" for x in listings()
    }


def test_real_and_synthetic_series_mixed(tmp_path: Path) -> None:
    folder = tmp_path / "both"
    shutil.copytree(DATA / "abdomen_ct_dicom", folder)
    write_dicom_series(folder, "1.2.826.0.1.3680043.2.1125.9", "extra")
    with pytest.raises(InputError, match=r"\(empty UID\) \('CT Body 3.0', 20 slices\)"):
        read_image(folder)
    assert read_image(folder, series="").data.shape == (512, 512, 20)


def test_missing_slice_is_an_error(tmp_path: Path) -> None:
    folder = tmp_path / "gap"
    write_dicom_series(folder, "1.2.826.0.1.3680043.2.1125.3", "gap", size=(6, 5, 6), skip=(2,))
    with pytest.raises(InputError) as exc:
        read_image(folder)
    assert str(exc.value) == (
        f"the DICOM series in {folder} has a 5 mm gap between slices 2 and 3 of 5 (gap001.dcm, gap003.dcm) "
        "where the others are 2.5 mm apart (a slice is missing); export the complete series or resample "
        "it to a regular grid first"
    )


def test_gantry_tilt_is_an_error(tmp_path: Path) -> None:
    folder = tmp_path / "tilt"
    write_dicom_series(folder, "1.2.826.0.1.3680043.2.1125.4", "tilt", direction=np.eye(3), tilt_mm=0.5)
    with pytest.raises(InputError) as exc:
        read_image(folder)
    assert str(exc.value) == (
        f"the DICOM slices in {folder} are stacked at 11.31 degrees to their normal (gantry tilt: the last "
        "slice lies 1.50 mm sideways of the first); stuseg does not shear images, so resample the series "
        "to a regular grid first"
    )


# ---------------------------------------------------------------------------------------------
# Bad input: one sentence naming the path and what to do


def test_missing_path(tmp_path: Path) -> None:
    path = tmp_path / "nope.nii.gz"
    with pytest.raises(InputError) as exc:
        read_image(path)
    assert str(exc.value) == f"{path} does not exist; check the path"


@pytest.mark.parametrize("name", ["text.nii.gz", "text.nii"])
def test_text_file_renamed_nifti(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_text("this is not an image\n" * 20)
    with pytest.raises(InputError) as exc:
        read_image(path)
    assert str(exc.value) == (
        f"cannot read {path}: it is damaged, truncated or not a NIfTI image; "
        "check the file or export it again"
    )


@pytest.mark.parametrize("keep", [0.3, 0.9])
def test_truncated_nifti(make_nifti, tmp_path: Path, keep: float) -> None:
    # Compress a raw NIfTI and cut the stream: data (0.9) or header too (0.3 of a small file).
    raw = make_nifti(shape=(40, 36, 32), name="ct.nii").read_bytes()
    path = tmp_path / "cut.nii.gz"
    full = gzip.compress(raw)
    path.write_bytes(full[: int(len(full) * keep)])
    with pytest.raises(InputError) as exc:
        read_image(path)
    assert str(exc.value) == (
        f"cannot read {path}: it is damaged, truncated or not a NIfTI image; "
        "check the file or export it again"
    )


@pytest.mark.parametrize(("name", "kind"), [("x.nrrd", "NRRD"), ("x.mha", "MetaImage")])
def test_text_file_renamed_simpleitk_format(tmp_path: Path, name: str, kind: str) -> None:
    path = tmp_path / name
    path.write_text("not an image\n")
    with pytest.raises(InputError) as exc:
        read_image(path)
    assert str(exc.value) == (
        f"cannot read {path}: it is damaged, truncated or not a {kind} image, or its data file is "
        "missing; check the file or export it again"
    )


@pytest.mark.parametrize(("name", "data_name"), [("ct.mhd", "ct.raw"), ("ct.nhdr", "ct.raw.gz")])
def test_header_without_its_data_file(tmp_path: Path, name: str, data_name: str) -> None:
    path = tmp_path / name
    sitk.WriteImage(synthetic_sitk(), str(path), useCompression=name.endswith(".nhdr"))
    (tmp_path / data_name).unlink()
    with pytest.raises(InputError) as exc:
        read_image(path)
    assert str(exc.value) == (
        f"the data file {tmp_path / data_name} that {path} refers to does not exist; "
        "keep it next to its header or export the image again"
    )


def test_unsupported_extension(tmp_path: Path) -> None:
    path = tmp_path / "ct.png"
    path.write_bytes(b"\x89PNG")
    with pytest.raises(InputError) as exc:
        read_image(path)
    assert str(exc.value) == (
        f"{path} has an unsupported file type; use a NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr) or "
        "MetaImage (.mha, .mhd) file, or a folder holding one DICOM series"
    )


def test_single_dicom_file(tmp_path: Path) -> None:
    write_dicom_series(tmp_path / "s", "1.2.826.0.1.3680043.2.1125.5", "one")
    path = tmp_path / "s" / "one000.dcm"
    with pytest.raises(InputError) as exc:
        read_image(path)
    assert str(exc.value) == (
        f"{path} is a single DICOM file; pass the folder that holds the whole series instead"
    )


def test_series_given_for_a_file(make_nifti) -> None:
    path = make_nifti()
    with pytest.raises(InputError) as exc:
        read_image(path, series="1.2.3")
    assert str(exc.value) == f"--series applies only to a DICOM folder, but {path} is a file; leave it out"


def test_empty_folder(tmp_path: Path) -> None:
    folder = tmp_path / "empty"
    folder.mkdir()
    with pytest.raises(InputError) as exc:
        read_image(folder)
    assert str(exc.value) == f"{folder} is an empty folder; pass {SUPPORTED_INPUTS}"


def test_folder_without_dicom(tmp_path: Path) -> None:
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "readme.txt").write_text("hello")
    (folder / "sub").mkdir()
    with pytest.raises(InputError) as exc:
        read_image(folder)
    assert str(exc.value) == (
        f"{folder} contains no DICOM files (subfolders are not searched); pass {SUPPORTED_INPUTS}"
    )


def test_2d_images(tmp_path: Path) -> None:
    nib.save(nib.Nifti1Image(np.zeros((10, 12), np.int16), np.eye(4)), tmp_path / "flat.nii.gz")
    with pytest.raises(InputError) as exc:
        read_image(tmp_path / "flat.nii.gz")
    assert str(exc.value) == (
        f"{tmp_path / 'flat.nii.gz'} is a 2D image of shape (10, 12); stuseg needs a 3D CT volume"
    )
    sitk.WriteImage(sitk.Image(10, 12, sitk.sitkInt16), str(tmp_path / "flat.mha"))
    with pytest.raises(InputError, match=r"flat\.mha is a 2D image of shape \(10, 12\)"):
        read_image(tmp_path / "flat.mha")


def test_4d_with_several_volumes(tmp_path: Path) -> None:
    path = tmp_path / "series4d.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 5, 6, 3), np.int16), np.eye(4)), path)
    with pytest.raises(InputError) as exc:
        read_image(path)
    assert str(exc.value) == (
        f"{path} holds 3 volumes (shape (4, 5, 6, 3)); stuseg needs one 3D CT volume, "
        "so extract the one you want first"
    )
    img4 = sitk.JoinSeries([synthetic_sitk(), synthetic_sitk()])
    sitk.WriteImage(img4, str(tmp_path / "two.mha"))
    with pytest.raises(InputError, match=r"holds 2 volumes \(shape \(7, 6, 5, 2\)\)"):
        read_image(tmp_path / "two.mha")


def test_complex_and_rgb_are_errors(tmp_path: Path) -> None:
    complex_path = tmp_path / "complex.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((3, 3, 3), np.complex64), np.eye(4)), complex_path)
    with pytest.raises(InputError) as exc:
        read_image(complex_path)
    assert str(exc.value) == (
        f"{complex_path} holds complex values; stuseg needs a real-valued (grayscale) CT image"
    )

    rgb = np.zeros((3, 3, 3), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    rgb_path = tmp_path / "rgb.nii.gz"
    nib.save(nib.Nifti1Image(rgb, np.eye(4)), rgb_path)
    with pytest.raises(InputError) as exc:
        read_image(rgb_path)
    assert str(exc.value) == (
        f"{rgb_path} holds RGB or vector pixels; stuseg needs a single-channel (grayscale) CT image"
    )

    vector_path = tmp_path / "rgb.mha"
    sitk.WriteImage(sitk.Image([4, 4, 4], sitk.sitkVectorUInt8, 3), str(vector_path))
    with pytest.raises(InputError, match=r"holds RGB or vector pixels"):
        read_image(vector_path)

    # MetaImage stores complex pixels as 2-component vectors, and reads them back as such.
    complex_mha = tmp_path / "complex.mha"
    sitk.WriteImage(sitk.Image([4, 4, 4], sitk.sitkComplexFloat32), str(complex_mha))
    with pytest.raises(InputError, match=r"holds RGB or vector pixels"):
        read_image(complex_mha)


def test_invalid_affine(tmp_path: Path) -> None:
    # An sform with a zero row (nibabel refuses to build one from an affine, so edit the header).
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((3, 3, 3))
    hdr.set_data_dtype(np.int16)
    hdr.set_sform(np.eye(4), code=1)
    hdr["srow_y"] = [0.0, 0.0, 0.0, 0.0]
    path = tmp_path / "singular.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((3, 3, 3), np.int16), None, header=hdr), path)
    with pytest.raises(InputError) as exc:
        read_image(path)
    assert str(exc.value) == (
        f"{path} has an invalid voxel-to-world matrix (singular or not finite); fix its header"
    )


@pytest.mark.parametrize("kind", ["nifti1", "nifti2"])
def test_gzipped_nifti_reads_as_nibabel_does(make_nifti, tmp_path: Path, kind: str) -> None:
    """.nii.gz is inflated by ISA-L, then parsed from memory: same voxels, affine and header."""
    src = make_nifti(shape=(21, 17, 9), name="ct.nii")
    ref = nib.load(src)
    cls = nib.Nifti2Image if kind == "nifti2" else nib.Nifti1Image
    img = cls(np.asanyarray(ref.dataobj), ref.affine, header=ref.header if kind == "nifti1" else None)
    img.header.set_qform(ref.affine, code=1)
    img.header.set_sform(ref.affine, code=1)
    path = tmp_path / f"{kind}.nii.gz"
    nib.save(img, path)
    vol = read_image(path)
    np.testing.assert_array_equal(vol.data, ref.get_fdata(dtype=np.float32))
    np.testing.assert_array_equal(vol.affine, ref.affine)
    assert isinstance(vol.header, cls.header_class)


def test_corrupt_deflate_stream(make_nifti, tmp_path: Path) -> None:
    raw = make_nifti(shape=(40, 36, 32), name="ct.nii").read_bytes()
    packed = bytearray(gzip.compress(raw))
    packed[len(packed) // 2 : len(packed) // 2 + 64] = bytes(64)  # damage the middle of the stream
    path = tmp_path / "damaged.nii.gz"
    path.write_bytes(bytes(packed))
    with pytest.raises(InputError) as exc:
        read_image(path)
    assert str(exc.value) == (
        f"cannot read {path}: it is damaged, truncated or not a NIfTI image; "
        "check the file or export it again"
    )


def test_truncated_uncompressed_nifti_says_how_much_is_missing(make_nifti, tmp_path: Path) -> None:
    raw = make_nifti(shape=(10, 10, 10), name="ct.nii").read_bytes()
    assert len(raw) == 352 + 10 * 10 * 10 * 2  # header + extension flag, then int16 voxels
    for path, data in (
        (tmp_path / "cut.nii", raw[:1000]),
        (tmp_path / "cut2.nii.gz", gzip.compress(raw[:1000])),
    ):
        path.write_bytes(data)
        with pytest.raises(InputError) as exc:
            read_image(path)
        assert (
            str(exc.value)
            == f"cannot read {path}: it is truncated (1000 of 2352 bytes); copy or export the file again"
        )


def test_infinite_voxels_are_refused_with_their_count(tmp_path: Path) -> None:
    data = np.full((6, 5, 4), -1000.0, np.float32)
    data[1, 2, 3], data[0, 0, 0], data[5, 4, 0] = np.inf, -np.inf, np.nan
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "inf.nii.gz")
    sitk.WriteImage(sitk.GetImageFromArray(data.T.copy()), str(tmp_path / "inf.mha"))
    for name in ("inf.nii.gz", "inf.mha"):
        with pytest.raises(InputError) as exc:
            read_image(tmp_path / name)
        assert str(exc.value) == (
            f"{tmp_path / name} holds 2 infinite voxels (Inf); stuseg cannot tell what they stand for, so "
            "replace them with finite values (e.g. clip to -1024..3071 HU) and run again"
        )


def test_nibabel_header_repairs_become_one_warning_not_log_lines(tmp_path: Path, capfd) -> None:
    img = nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), np.eye(4))
    img.header["pixdim"][1] = 0.0  # nibabel logs "pixdim[1,2,3] should be non-zero; setting 0 dims to 1"
    path = tmp_path / "pix.nii.gz"
    img.to_filename(path)
    capfd.readouterr()
    with pytest.warns(StusegWarning) as caught:
        read_image(path)
    assert capfd.readouterr() == ("", "")  # nothing printed by nibabel
    assert [str(w.message) for w in caught] == [
        f"{path} has an inconsistent header that nibabel repaired (pixdim[1,2,3] should be non-zero; "
        "setting 0 dims to 1); check that the result lies where you expect"
    ]


def test_metaio_complaints_are_quoted_not_printed(tmp_path: Path, capfd) -> None:
    path = tmp_path / "bad.mha"
    path.write_text("NDims = 3\nElementType = MET_SHORT\nElementDataFile = LOCAL\n")
    capfd.readouterr()
    with pytest.raises(InputError) as exc:
        read_image(path)
    assert capfd.readouterr() == ("", "")
    assert str(exc.value) == (
        f"cannot read {path}: it is damaged, truncated or not a MetaImage image, or its data file is missing "
        "(ITK: DimSize required and not defined); check the file or export it again"
    )


def test_label_values_keep_a_type_that_fits_and_check_the_rest() -> None:
    small = np.array([[0, 7]], np.uint8)
    assert label_values(small, np.uint16, ValueError) is small  # narrower unsigned: as it is
    wide = np.array([0, 300, 65535], np.int64)
    narrowed = label_values(wide, np.uint16, ValueError)
    assert narrowed.dtype == np.uint16 and narrowed.tolist() == [0, 300, 65535]
    with pytest.raises(ValueError, match=r"^label values must lie in 0\.\.255 to be written as uint8$"):
        label_values(np.array([256], np.uint16), np.uint8, ValueError, " to be written as uint8")
    with pytest.raises(KeyError, match=r"label values must lie in 0\.\.65535"):
        label_values(np.array([-1], np.int16), np.uint16, KeyError)
    with pytest.raises(ValueError, match=r"^a label map must hold integers, not float32$"):
        label_values(np.array([1.0], np.float32), np.uint8, ValueError)
    with pytest.raises(ValueError, match="must hold integers, not bool"):
        label_values(np.array([True]), np.uint8, ValueError)
