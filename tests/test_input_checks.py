"""Input checks before the network runs (``stuseg.images.checks``): each bad input gives its one line, and
the real scans in tests/data give none, except the thick, small-field-of-view chest, which is
built to be both and says so."""

from __future__ import annotations

import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid
from test_predict_cli import run_cli

from stuseg.errors import InputError
from stuseg.images.checks import check_slice_spacing
from stuseg.images.io import dicom_series_files, read_image
from stuseg.inference.pipeline import _check_channels, prepare
from stuseg.model.plan import PLAN, Normalization, Plan

DATA = Path(__file__).parent / "data"
SERIES = DATA / "abdomen_ct_dicom_uids"
THICK_CT = DATA / "chest_ct_5mm_small_fov.nii.gz"
REAL = [
    "abdomen_ct_3mm.nii.gz",
    "chest_ct_1p5mm_lps.nii.gz",
    "totalseg_results/abdomen_ct_sm.nii.gz",
    "abdomen_ct_dicom",
    "abdomen_ct_dicom_uids",
]
THICK_LINE = (
    "the image has 5 mm slices (voxel axis 3) and the model works at 1.5 mm: structures thinner than "
    "about two slices (10 mm) may be missed or cut short"
)
FOV_LINE = (
    "the field of view across the body is 165 x 144 mm, smaller than the model's 192 x 192 mm tile: "
    "structures cut by its edge will be incomplete and those near it may be mislabelled"
)
# The published plan with nnU-Net's "ct" normalisation (fixed HU bounds), as a fine-tuned CT model has.
CT_NORMALISED = Plan(
    target_spacing=(1.5, 1.5, 1.5),
    patch_size=(128, 128, 128),
    num_classes=105,
    channels=(Normalization("ct", lower=-1000.0, upper=1500.0, mean=50.0, std=300.0),),
)


def _messages(path: Path | str) -> list[str]:
    """What reading and checking ``path`` (as ``prepare`` does, without preprocessing) warns."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _check_channels([path], [read_image(Path(path))], None, PLAN)
    return [str(w.message) for w in caught]


@pytest.mark.parametrize("name", REAL)
def test_real_scans_are_silent(name: str) -> None:
    assert _messages(DATA / name) == []


def test_real_thick_small_fov_chest_says_both() -> None:
    assert _messages(THICK_CT) == [THICK_LINE, FOV_LINE]


# --- values not in Hounsfield units ------------------------------------------------------------


@pytest.fixture(scope="module")
def raw_ct(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real 3 mm abdomen as a scanner stores it before rescaling: HU + 1024, clipped at 0."""
    img = nib.load(DATA / "abdomen_ct_3mm.nii.gz")
    raw = np.clip(np.asarray(img.dataobj, np.int32) + 1024, 0, None).astype(np.uint16)
    path = tmp_path_factory.mktemp("raw") / "raw.nii.gz"
    nib.save(nib.Nifti1Image(raw, img.affine, img.header), path)
    return path


def test_raw_stored_values_warn_for_a_zscore_model(raw_ct: Path) -> None:
    assert _messages(raw_ct) == [
        f"{raw_ct} holds values from 0 to 4406, none below 0: they look like raw stored values without "
        "RescaleSlope/RescaleIntercept, not Hounsfield units; convert them to HU (for most CT: "
        "value - 1024); this model normalises each image by its own statistics, so the masks may still be "
        "usable, but HU values read from them will not be"
    ]


def test_raw_stored_values_are_refused_for_fixed_hu_bounds(raw_ct: Path) -> None:
    with pytest.raises(InputError) as exc:
        prepare(raw_ct, plan=CT_NORMALISED)
    assert str(exc.value) == (
        f"{raw_ct} holds values from 0 to 4406, none below 0: they look like raw stored values without "
        "RescaleSlope/RescaleIntercept, not Hounsfield units; convert them to HU (for most CT: value - 1024) "
        "and run again"
    )


def test_no_air_warns(make_nifti) -> None:
    body = np.full((140, 140, 20), 40, np.int16)
    body[::7] = -450
    path = make_nifti(data=body, shape=body.shape)
    assert _messages(path) == [
        f"{path} has no values below -900 (its lowest is -450), so it holds no air and may not be a CT "
        "in Hounsfield units; results will likely be meaningless"
    ]


# --- DICOM series made from the real one --------------------------------------------------------


def _edit_series(tmp_path: Path, edit, drop: tuple[int, ...] = ()) -> tuple[Path, list[Path]]:
    """A copy of the real series in GDCM's slice order, ``edit(k, dataset)`` applied to slice k,
    slices ``drop`` left out; returns the folder and the files of the kept slices, in order."""
    folder = tmp_path / "series"
    folder.mkdir()
    kept = []
    for k, src in enumerate(dicom_series_files(SERIES)):
        if k in drop:
            continue
        ds = pydicom.dcmread(src)
        edit(k, ds)
        ds.save_as(folder / src.name)
        kept.append(folder / src.name)
    return folder, kept


def _tilted(degrees: float):
    """Shift each slice along the image rows (y) by its distance along the normal x tan(angle)."""
    first = float(pydicom.dcmread(dicom_series_files(SERIES)[0]).ImagePositionPatient[2])

    def edit(k: int, ds: pydicom.Dataset) -> None:
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y + (z - first) * np.tan(np.radians(degrees)), z]

    return edit


def test_gantry_tilt_is_refused(tmp_path: Path) -> None:
    folder, _ = _edit_series(tmp_path, _tilted(15.0))
    with pytest.raises(InputError) as exc:
        read_image(folder)
    assert str(exc.value) == (
        f"the DICOM slices in {folder} are stacked at 15.00 degrees to their normal (gantry tilt: the last "
        "slice lies 10.18 mm sideways of the first); stuseg does not shear images, so resample the series "
        "to a regular grid first"
    )


def test_a_fifth_of_a_degree_of_tilt_is_refused(tmp_path: Path) -> None:
    """38 mm x tan(0.2 degree) = 0.13 mm sideways, over 0.1 of a 0.98 mm pixel."""
    folder, _ = _edit_series(tmp_path, _tilted(0.2))
    with pytest.raises(InputError, match=r"stacked at 0\.20 degrees .* 0\.13 mm sideways"):
        read_image(folder)


def test_tilt_within_rounding_is_read(tmp_path: Path) -> None:
    folder, _ = _edit_series(tmp_path, _tilted(0.05))
    assert read_image(folder).data.shape == (512, 512, 20)


def test_missing_slice_names_the_gap(tmp_path: Path) -> None:
    folder, kept = _edit_series(tmp_path, lambda k, ds: None, drop=(9,))
    with pytest.raises(InputError) as exc:
        read_image(folder)
    assert str(exc.value) == (
        f"the DICOM series in {folder} has a 4 mm gap between slices 9 and 10 of 19 ({kept[8].name}, "
        f"{kept[9].name}) where the others are 2 mm apart (a slice is missing); export the complete series "
        "or resample it to a regular grid first"
    )


def test_duplicate_slice_names_the_pair(tmp_path: Path) -> None:
    folder, kept = _edit_series(tmp_path, lambda k, ds: None)
    copy = pydicom.dcmread(kept[4])
    copy.SOPInstanceUID = generate_uid()
    copy.save_as(folder / "copy.dcm")
    # With two slices at one position GDCM orders the files the other way round: counted from there.
    with pytest.raises(InputError) as exc:
        read_image(folder)
    assert str(exc.value) == (
        f"the DICOM series in {folder} has two slices at the same position between slices 16 and 17 of 21 "
        f"({kept[4].name}, copy.dcm) (duplicates, or two acquisitions in one series); export the complete "
        "series or resample it to a regular grid first"
    )


@pytest.mark.parametrize(
    ("along", "what"),
    [
        (
            [0.0, 2.0, 4.0, 7.0, 9.0, 11.0],
            "uneven slice spacing, 2 to 3 mm (the largest jump between slices 3 and 4 of 6 (f2, f3))",
        ),
        ([5.0, 5.0, 5.0], "all 3 slices at one position (one slice saved 3 times, or a series of repeats)"),
    ],
)
def test_slice_spacing_messages(along: list[float], what: str) -> None:
    positions = np.array([[10.0, -4.0, z] for z in along])
    with pytest.raises(InputError) as exc:
        check_slice_spacing(
            Path("s"), positions, np.array([0.0, 0.0, 1.0]), [f"f{k}" for k in range(len(along))]
        )
    end = "export the complete series or resample it to a regular grid first"
    assert str(exc.value) == f"the DICOM series in s has {what}; {end}"


def _mr(k: int, ds: pydicom.Dataset) -> None:
    ds.Modality = "MR"


def test_mr_series_is_refused_for_a_ct_channel(tmp_path: Path) -> None:
    folder, _ = _edit_series(tmp_path, _mr)
    assert read_image(folder).modality == "MR"
    with pytest.raises(InputError) as exc:
        prepare(folder)
    assert str(exc.value) == (
        f"{folder} is a DICOM series of modality MR, not CT; the model expects CT here, so pass the CT "
        "series of the study"
    )


def test_mr_series_is_read_for_a_channel_that_is_not_ct(tmp_path: Path) -> None:
    folder, _ = _edit_series(tmp_path, _mr)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _check_channels([folder], [read_image(folder)], ["T1"], PLAN)


def test_real_series_reads_as_ct() -> None:
    assert read_image(SERIES).modality == "CT"


# --- geometry against the model's plan ----------------------------------------------------------


def test_thresholds_follow_the_plan(make_nifti) -> None:
    """4.4 mm slices are not thick for 1.5 mm, 4.5 mm are; a fine-tuned 5 mm plan is not warned."""
    body = np.full((140, 140, 20), -1000, np.int16)
    for z, silent in ((4.4, True), (4.5, False)):
        path = make_nifti(data=body, shape=body.shape, affine=np.diag([1.5, 1.5, z, 1.0]), name=f"{z}.nii.gz")
        assert (_messages(path) == []) is silent
    # A plan trained at 5 mm with a 96 x 96 in-plane tile (144 mm): neither warning.
    thick_plan = Plan(target_spacing=(5.0, 1.5, 1.5), patch_size=(32, 96, 96), num_classes=105)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _check_channels([THICK_CT], [read_image(THICK_CT)], None, thick_plan)


def test_head_foot_range_is_not_a_small_field_of_view(make_nifti) -> None:
    """A 30 mm slab of a 210 mm-wide scan: short, but the body's outline is whole."""
    slab = np.full((140, 140, 20), -1000, np.int16)
    assert _messages(make_nifti(data=slab, shape=slab.shape)) == []


# --- through `stuseg predict` -------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fabricate import small_checkpoint

    return small_checkpoint(lambda: tmp_path_factory.mktemp("fabricated"))


@pytest.mark.slow  # two tiles of the small network on the CPU
def test_cli_real_thick_chest_prints_its_two_warnings(tmp_path: Path, small_model: Path) -> None:
    out = tmp_path / "seg.nii.gz"
    done = run_cli("predict", THICK_CT, out, "--weights", small_model, "--ml", "--fast", "--step-size", "1.0")
    assert done.returncode == 0, done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines[:2] == [f"stuseg: warning: {THICK_LINE}", f"stuseg: warning: {FOV_LINE}"], done.stderr
    assert len(lines) == 3 and lines[2].startswith("wrote"), done.stderr


@pytest.mark.slow  # four tiles of the small network on the CPU
def test_cli_real_abdomen_is_silent(tmp_path: Path, small_model: Path) -> None:
    out = tmp_path / "seg.nii.gz"
    ct = DATA / "totalseg_results" / "abdomen_ct_sm.nii.gz"
    done = run_cli("predict", ct, out, "--weights", small_model, "--ml", "--fast", "--step-size", "1.0")
    assert done.returncode == 0, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("wrote"), done.stderr
