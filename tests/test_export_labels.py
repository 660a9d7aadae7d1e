"""Reading and writing segmentations, and ``stuseg export-labels`` end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from stuseg.cli import app
from stuseg.errors import InputError, LabelError, OutputError
from stuseg.images.io import label_image
from stuseg.results import labelmaps
from stuseg.results.outputs import MARKER
from stuseg.structures import labels

REFERENCE = Path(__file__).parent / "data" / "reference" / "label_order.json"

SHAPE = (7, 9, 5)  # odd and anisotropic, so an axis swap cannot go unnoticed
PRESENT = ("aorta", "liver", "rib_left_1", "rib_left_10", "spleen", "vertebrae_L1")
GEOMETRY = ("qform_code", "sform_code", "quatern_b", "quatern_c", "quatern_d", "qoffset_x",
            "qoffset_y", "qoffset_z", "srow_x", "srow_y", "srow_z", "pixdim", "dim")  # fmt: skip


def oblique_lps_header() -> nib.Nifti1Header:
    """Rotated about two axes, LPS-like (x and y flipped), qform and sform with different codes."""
    a, b = np.deg2rad(20), np.deg2rad(-12)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    affine = np.eye(4)
    affine[:3, :3] = np.diag([-1, -1, 1]) @ rz @ rx @ np.diag([0.8, 1.25, 3.0])
    affine[:3, 3] = [120.5, -88.25, 40.0]
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(SHAPE)
    hdr.set_qform(affine, code=1)  # scanner
    sform = affine.copy()
    sform[0, 1] += 0.01  # a shear only the sform can hold: both must be copied, not re-derived
    hdr.set_sform(sform, code=2)  # aligned
    return hdr


def assert_same_geometry(path: Path, like: nib.Nifti1Header) -> None:
    out = nib.load(path).header
    for field in GEOMETRY:
        assert np.array_equal(out[field][:4] if field == "pixdim" else out[field],
                              like[field][:4] if field == "pixdim" else like[field]), field  # fmt: skip


@pytest.fixture
def header() -> nib.Nifti1Header:
    return oblique_lps_header()


@pytest.fixture
def seg() -> np.ndarray:
    """A model-index label map holding the PRESENT structures; kidney_left (38) is absent."""
    rng = np.random.default_rng(4)
    values = np.array([0, *(labels.index_of(n) for n in PRESENT)], np.uint8)
    return values[rng.integers(0, len(values), SHAPE)]


@pytest.fixture
def ml_file(tmp_path: Path, seg: np.ndarray, header: nib.Nifti1Header) -> Path:
    """A multilabel file as ``predict --ml`` writes it."""
    path = tmp_path / "pred" / "seg.nii.gz"
    path.parent.mkdir()
    labelmaps.save_multilabel(seg, header, path, dict(enumerate(labels.STRUCTURES, 1)), numbering="model")
    return path


@pytest.fixture
def mask_dir(tmp_path: Path, seg: np.ndarray, header: nib.Nifti1Header) -> Path:
    """A folder of masks as ``predict`` writes it: one 0/1 uint8 mask per structure, some empty."""
    folder = tmp_path / "masks"
    folder.mkdir()
    for name in (*PRESENT, "stomach"):
        mask = (seg == labels.index_of(name)).astype(np.uint8)
        write_label_map(mask, header, folder / f"{name}.nii.gz")
    return folder


def write_label_map(data: np.ndarray, header: nib.Nifti1Header, path: Path) -> None:
    labelmaps.write_nifti(label_image(data, header), path)


def invoke(*args: object) -> object:
    return CliRunner().invoke(app, [str(a) for a in args])


def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# --- save_multilabel / load_segmentation -------------------------------------------------------------


def test_save_multilabel_carries_names_everywhere(tmp_path: Path, header: nib.Nifti1Header) -> None:
    data = np.zeros(SHAPE, np.uint8)
    data[1:3, 2:5, 1] = 7
    data[4, :, 3] = 200
    names = {7: "liver", 200: "my lesion"}
    out = tmp_path / "x.nii.gz"
    labelmaps.save_multilabel(data, header, out, names)
    assert files_in(tmp_path) == ["x.ctbl", "x.itksnap.txt", "x.json", "x.nii.gz"]

    img = nib.load(out)
    assert img.get_data_dtype() == np.uint8
    assert np.array_equal(np.asanyarray(img.dataobj), data)
    assert_same_geometry(out, header)
    sidecar = json.loads((tmp_path / "x.json").read_text())
    assert sidecar == {"format": "stuseg-labels/1", "labels": {"7": "liver", "200": "my lesion"}}
    [ext] = [e for e in img.header.extensions if e.get_code() == 6]
    assert json.loads(ext.get_content()) == sidecar
    assert labelmaps.read_names(img, out) == names

    itk = [ln for ln in (tmp_path / "x.itksnap.txt").read_text().splitlines() if not ln.startswith("#")]
    assert [ln.split()[0] for ln in itk] == ["0", "7", "200"]
    assert itk[1].endswith('"liver"') and itk[2].endswith('"my lesion"')
    ctbl = [ln.split() for ln in (tmp_path / "x.ctbl").read_text().splitlines() if not ln.startswith("#")]
    assert [row[:2] for row in ctbl] == [["0", "background"], ["7", "liver"], ["200", "my_lesion"]]
    assert all(len(row) == 6 and all(0 <= int(c) <= 255 for c in row[2:]) for row in ctbl)


def test_save_multilabel_rejects_unnamed_values(tmp_path: Path, header: nib.Nifti1Header) -> None:
    data = np.full(SHAPE, 3, np.uint8)
    with pytest.raises(ValueError, match=r"label values \[3\]"):
        labelmaps.save_multilabel(data, header, tmp_path / "x.nii.gz", {1: "liver"})
    with pytest.raises(OutputError, match=r"end it in \.nii\.gz"):
        labelmaps.save_multilabel(data, header, tmp_path / "x.nrrd", {3: "aorta"})
    assert files_in(tmp_path) == []


def test_load_multilabel_and_folder_agree(ml_file: Path, mask_dir: Path, seg: np.ndarray) -> None:
    lab, hdr, names = labelmaps.load_segmentation(ml_file)
    assert lab.dtype == np.uint8 and np.array_equal(lab, seg)
    assert names == dict(enumerate(labels.STRUCTURES, 1))
    lab2, hdr2, names2 = labelmaps.load_segmentation(mask_dir)
    assert np.array_equal(lab2, seg)
    assert sorted(names2.values()) == sorted((*PRESENT, "stomach"))
    for field in GEOMETRY:
        assert np.array_equal(hdr[field], hdr2[field])


def test_load_plain_file_assumes_model_numbering(tmp_path: Path, seg: np.ndarray, header) -> None:
    write_label_map(seg, header, tmp_path / "plain.nii.gz")  # as STU-Net writes it: no names
    lab, _, names = labelmaps.load_segmentation(tmp_path / "plain.nii.gz")
    assert np.array_equal(lab, seg) and len(names) == 104


def test_load_folder_only_reads_requested(mask_dir: Path, seg: np.ndarray) -> None:
    lab, _, names = labelmaps.load_segmentation(mask_dir, only=[40, 38])
    assert names == {40: "liver"}
    assert np.array_equal(lab, np.where(seg == 40, 40, 0))
    with pytest.raises(InputError, match="holds no mask of the requested structures"):
        labelmaps.load_segmentation(mask_dir, only=[38])


# --- export-labels: round trips, numbering, geometry ---------------------------------------------


def test_multilabel_to_masks_and_back(tmp_path: Path, ml_file: Path, seg: np.ndarray, header) -> None:
    out = tmp_path / "out"
    result = invoke(
        "export-labels", ml_file, out, "--labels", "liver", "-l", "RIB_left_1*", "--group", "vessels"
    )
    assert result.exit_code == 0, result.stderr
    expected = ["aorta", *labels.GROUPS["vessels"][1:], "liver", "rib_left_1", "rib_left_10", "rib_left_11",
                "rib_left_12"]  # fmt: skip
    assert files_in(out) == [MARKER, *sorted(f"{n}.nii.gz" for n in expected)]
    assert result.stdout.splitlines() == [
        str(out / f"{n}.nii.gz") for n in sorted(expected, key=labels.index_of)
    ]
    assert result.stderr.splitlines() == [
        "note: no voxels for 9 structures (iliac_artery_left, iliac_artery_right, iliac_vena_left, ...)",
        "wrote 13 files",
    ]
    for name in expected:
        img = nib.load(out / f"{name}.nii.gz")
        assert img.get_data_dtype() == np.uint8
        assert np.array_equal(np.asanyarray(img.dataobj), seg == labels.index_of(name))
        assert_same_geometry(out / f"{name}.nii.gz", header)

    back = tmp_path / "back.nii.gz"
    result = invoke("export-labels", out, back, "--labels", "liver,rib_left_10", "--ml")
    assert result.exit_code == 0, result.stderr
    lab, _, names = labelmaps.load_segmentation(back)
    assert np.array_equal(lab, np.where(np.isin(seg, [40, 50]), seg, 0))
    assert names == {40: "liver", 50: "rib_left_10"}
    assert_same_geometry(back, header)


def test_masks_to_multilabel_round_trip(tmp_path: Path, mask_dir: Path, seg: np.ndarray, header) -> None:
    out = tmp_path / "sub" / "all.nii.gz"
    out.parent.mkdir()
    result = invoke("export-labels", mask_dir, out, "--labels", "*", "--ml")
    assert result.exit_code == 0, result.stderr
    assert result.stderr.splitlines() == [  # the folder has 7 of the 104 masks, stomach empty
        f"note: {mask_dir} has no mask for 97 structures (adrenal_gland_left, adrenal_gland_right, "
        "autochthon_left, ...)",
        "note: no voxels for stomach",
        "wrote 4 files",
    ]
    assert files_in(out.parent) == ["all.ctbl", "all.itksnap.txt", "all.json", "all.nii.gz"]
    lab, _, names = labelmaps.load_segmentation(out)
    assert np.array_equal(lab, seg)
    assert sorted(names.values()) == sorted((*PRESENT, "stomach"))
    assert_same_geometry(out, header)

    again = tmp_path / "again"
    assert invoke("export-labels", out, again, "-g", "bones").exit_code == 0
    assert files_in(again) == [MARKER, "rib_left_1.nii.gz", "rib_left_10.nii.gz", "vertebrae_L1.nii.gz"]


@pytest.mark.parametrize("numbering", ["compact", "totalsegmentator-v1"])
def test_ml_numbering(tmp_path: Path, ml_file: Path, seg: np.ndarray, numbering: str) -> None:
    ref = json.loads(REFERENCE.read_text())["stunet_index_to_totalseg_v1_index"]
    chosen = [3, 40, 49, 50, 88]  # aorta, liver, rib_left_1, rib_left_10, vertebrae_L1
    out = tmp_path / "renum.nii.gz"
    result = invoke("export-labels", ml_file, out, "-l", "aorta,liver,rib_left_1,rib_left_10,vertebrae_L1",
                    "--ml", "--numbering", numbering)  # fmt: skip
    assert result.exit_code == 0, result.stderr
    value = dict(zip(chosen, range(1, 6))) if numbering == "compact" else {i: ref[str(i)] for i in chosen}
    expected = np.zeros_like(seg)
    for i, v in value.items():
        expected[seg == i] = v
    assert np.array_equal(np.asanyarray(nib.load(out).dataobj), expected)
    sidecar = json.loads((tmp_path / "renum.json").read_text())
    assert sidecar["numbering"] == numbering
    assert sidecar["labels"] == {str(v): labels.STRUCTURES[i - 1] for i, v in value.items()}
    # The carried names undo the renumbering on the way back in.
    lab, _, names = labelmaps.load_segmentation(out)
    assert np.array_equal(lab, np.where(np.isin(seg, chosen), seg, 0))
    assert sorted(names) == chosen


def test_combine_writes_the_union(tmp_path: Path, mask_dir: Path, seg: np.ndarray, header) -> None:
    out = tmp_path / "union"
    result = invoke("export-labels", mask_dir, out, "-l", "rib_*", "--combine", "ribs")
    assert result.exit_code == 0, result.stderr
    img = nib.load(out / "ribs.nii.gz")
    assert np.array_equal(np.asanyarray(img.dataobj), np.isin(seg, [49, 50]).astype(np.uint8))
    assert_same_geometry(out / "ribs.nii.gz", header)
    assert result.stdout.splitlines() == [str(out / "ribs.nii.gz")]
    assert files_in(out) == [MARKER, "ribs.nii.gz"]


def test_nothing_is_left_when_a_write_fails(tmp_path: Path, ml_file: Path, monkeypatch) -> None:
    calls = []
    real_write = labelmaps.write_nifti

    def flaky_write(img: nib.Nifti1Image, path: Path) -> None:
        calls.append(path)
        if len(calls) == 3:
            path.write_bytes(b"\x1f\x8b half")
            raise OSError(28, "No space left on device")
        real_write(img, path)

    monkeypatch.setattr(labelmaps, "write_nifti", flaky_write)
    before = files_in(tmp_path)
    out = tmp_path / "out"
    result = invoke("export-labels", ml_file, out, "--group", "bones")
    assert result.exit_code == 1
    assert (
        result.stderr == f"stuseg: error: cannot write {out}: No space left on device; nothing was written\n"
    )
    assert files_in(tmp_path) == before  # no output folder, no hidden staging folder


# --- export-labels: every error, one line, nothing written ---------------------------------------


def test_error_unknown_structure(tmp_path: Path, ml_file: Path) -> None:
    result = invoke("export-labels", ml_file, tmp_path / "out", "--labels", "livr")
    assert result.exit_code == 1
    assert result.stderr == "stuseg: error: unknown structure 'livr', did you mean 'liver'?\n"
    assert not (tmp_path / "out").exists()


def test_error_values_above_104(tmp_path: Path, header) -> None:
    data = np.zeros(SHAPE, np.int16)
    data[0, 0, 0] = 117
    path = tmp_path / "seg.nii.gz"
    nib.save(nib.Nifti1Image(data, header.get_best_affine()), path)
    result = invoke("export-labels", path, tmp_path / "out", "-l", "liver")
    assert result.exit_code == 1
    assert result.stderr == (
        f"stuseg: error: {path} holds label value 117 but the model has only 104 structures; "
        "name its values with --names FILE.json (another tool's label table)\n"
    )
    assert not (tmp_path / "out").exists()


def test_error_non_integer_data(tmp_path: Path, header) -> None:
    data = np.zeros(SHAPE, np.float32)
    data[1, 2, 3] = 40.5
    path = tmp_path / "seg.nii.gz"
    nib.save(nib.Nifti1Image(data, header.get_best_affine()), path)
    result = invoke("export-labels", path, tmp_path / "out.nii.gz", "-l", "liver", "--ml")
    assert result.exit_code == 1
    assert result.stderr == (
        f"stuseg: error: {path} holds the non-integer value 40.5; give a label map of whole numbers "
        "such as 'stuseg predict --ml' writes\n"
    )
    assert files_in(tmp_path) == ["seg.nii.gz"]


def test_integer_valued_float_file_is_accepted(tmp_path: Path, seg: np.ndarray, header) -> None:
    path = tmp_path / "seg.nii.gz"
    nib.save(nib.Nifti1Image(seg.astype(np.float32), header.get_best_affine()), path)
    assert invoke("export-labels", path, tmp_path / "out", "-l", "liver").exit_code == 0


@pytest.mark.parametrize("what", ["shape", "affine"])
def test_error_masks_disagree(tmp_path: Path, mask_dir: Path, header, what: str) -> None:
    if what == "shape":
        nib.save(
            nib.Nifti1Image(np.zeros((7, 9, 6), np.uint8), header.get_best_affine()),
            mask_dir / "spleen.nii.gz",
        )
    else:
        moved = nib.Nifti1Image(np.zeros(SHAPE, np.uint8), header.get_best_affine() + np.eye(4) * 0.5)
        nib.save(moved, mask_dir / "spleen.nii.gz")
    result = invoke("export-labels", mask_dir, tmp_path / "out", "-l", "organs")
    assert result.exit_code == 1
    assert result.stderr == (
        f"stuseg: error: masks liver.nii.gz and spleen.nii.gz in {mask_dir} differ in {what}; "
        "give a folder whose masks come from one segmentation\n"
    )
    assert not (tmp_path / "out").exists()


def test_error_folder_without_requested_structures(tmp_path: Path, mask_dir: Path) -> None:
    result = invoke("export-labels", mask_dir, tmp_path / "out", "-l", "kidney_*", "-g", "muscles")
    assert result.exit_code == 1
    assert result.stderr == (
        f"stuseg: error: folder {mask_dir} holds no mask of the requested structures; "
        "run 'ls' on it to see which structures it has\n"
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    result = invoke("export-labels", empty, tmp_path / "out", "-l", "liver")
    assert result.stderr == (
        f"stuseg: error: folder {empty} holds no <structure>.nii.gz masks; "
        "give a folder written by 'stuseg predict'\n"
    )
    assert not (tmp_path / "out").exists()


def test_error_output_is_a_file_for_masks(tmp_path: Path, ml_file: Path) -> None:
    target = tmp_path / "taken"
    target.write_text("keep me")
    result = invoke("export-labels", ml_file, target, "-l", "liver")
    assert result.exit_code == 1
    assert result.stderr == (
        f"stuseg: error: the output {target} is a file, but a folder is written here; "
        "give a folder name, or add --ml for one multilabel file\n"
    )
    assert target.read_text() == "keep me"
    result = invoke("export-labels", ml_file, tmp_path / "liver.nii.gz", "-l", "liver")
    assert result.exit_code == 1
    assert "looks like a file name but masks are written into a folder" in result.stderr
    assert not (tmp_path / "liver.nii.gz").exists()


def test_error_output_is_a_folder_for_ml(tmp_path: Path, ml_file: Path) -> None:
    target = tmp_path / "dir.nii.gz"
    target.mkdir()
    result = invoke("export-labels", ml_file, target, "-l", "liver", "--ml")
    assert result.exit_code == 1
    assert result.stderr == (
        f"stuseg: error: the output {target} is a folder, but a file is written here; give a file name "
        "such as seg.nii.gz, or leave out --ml for a folder of masks\n"
    )
    assert files_in(target) == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "name the structures to export with --labels or --group (see 'stuseg labels')"),
        (["-l", "liver", "--ml", "--combine", "x"], "--ml and --combine exclude each other; choose one"),
        (["-l", "liver", "--numbering", "compact"],
         "--numbering applies to --ml output only; add --ml or drop --numbering"),
        (["-l", "lung_*", "--combine", "Liver"],
         "--combine name 'Liver' is a structure's name; choose another so the union cannot be mistaken "
         "for that structure"),
        (["-l", "liver", "--combine", "../up"],
         "'../up' is not a plain name for --combine; use letters, digits and _"),
    ],
)  # fmt: skip
def test_error_bad_option_combinations(tmp_path: Path, ml_file: Path, args: list[str], message: str) -> None:
    result = invoke("export-labels", ml_file, tmp_path / "out", *args)
    assert result.exit_code != 0
    assert result.stderr == f"stuseg: error: {message}\n"
    assert not (tmp_path / "out").exists()


def test_error_missing_input(tmp_path: Path) -> None:
    result = invoke("export-labels", tmp_path / "nope.nii.gz", tmp_path / "out", "-l", "liver")
    assert result.exit_code == 1
    assert result.stderr == (
        f"stuseg: error: {tmp_path / 'nope.nii.gz'} does not exist; give a multilabel .nii.gz or a folder "
        "of masks from 'stuseg predict'\n"
    )


def test_error_overlapping_masks(tmp_path: Path, mask_dir: Path, seg: np.ndarray, header) -> None:
    write_label_map((seg == labels.index_of("liver")).astype(np.uint8), header, mask_dir / "spleen.nii.gz")
    result = invoke("export-labels", mask_dir, tmp_path / "out", "-l", "liver,spleen")
    assert result.exit_code == 1
    assert result.stderr == (
        f"stuseg: error: masks liver and spleen in {mask_dir} overlap; one label map cannot hold both, "
        "so export them from separate folders\n"
    )


def test_error_carried_names_that_do_not_fit(tmp_path: Path, header) -> None:
    data = np.zeros(SHAPE, np.uint8)
    data[0, 0, 0], data[1, 1, 1] = 1, 2
    path = tmp_path / "seg.nii.gz"
    labelmaps.save_multilabel(data, header, path, {1: "liver", 2: "lungs"})
    with pytest.raises(LabelError, match="names label 2 'lungs', which is not one of the 104 structures"):
        labelmaps.load_segmentation(path)
    labelmaps.save_multilabel(data, header, path, {1: "liver", 2: "spleen"})
    (tmp_path / "seg.json").unlink()
    lab, _, names = labelmaps.load_segmentation(path)  # the header extension alone suffices
    assert names == {40: "liver", 77: "spleen"} and lab[0, 0, 0] == 40 and lab[1, 1, 1] == 77


def test_error_value_missing_from_sidecar_table(tmp_path: Path, header) -> None:
    data = np.zeros(SHAPE, np.uint8)
    data[0, 0, 0], data[1, 1, 1] = 1, 3
    path = tmp_path / "seg.nii.gz"
    write_label_map(data, header, path)  # no extension: the sidecar is the only table
    (tmp_path / "seg.json").write_text(json.dumps({"format": "stuseg-labels/1", "labels": {"1": "liver"}}))
    result = invoke("export-labels", path, tmp_path / "out", "-l", "liver")
    assert result.exit_code == 1
    assert result.stderr == (
        f"stuseg: error: {path} holds label value 3, which its label table does not name; "
        "give a segmentation written by 'stuseg predict --ml'\n"
    )


def test_export_into_a_folder_of_the_users_files(tmp_path: Path, ml_file: Path) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "liver.nii.gz").write_bytes(b"my own mask")
    result = invoke("export-labels", ml_file, mine, "-l", "liver")
    assert result.exit_code == 1
    assert result.stderr == (
        f"stuseg: error: the folder {mine} holds files stuseg did not write (liver.nii.gz); give a new "
        "folder, or add --overwrite to replace the folder and everything in it\n"
    )
    assert (mine / "liver.nii.gz").read_bytes() == b"my own mask"
    result = invoke("export-labels", ml_file, mine, "-l", "liver", "--overwrite")
    assert result.exit_code == 0, result.stderr
    assert files_in(mine) == [MARKER, "liver.nii.gz"]
    marker = json.loads((mine / MARKER).read_text())
    assert marker["command"] == "export-labels" and marker["inputs"] == [
        str(ml_file),
        str(ml_file.with_name("seg.json")),
    ]
    # the next export into the folder stuseg now owns replaces it without --overwrite
    assert invoke("export-labels", ml_file, mine, "-l", "aorta").exit_code == 0
    assert files_in(mine) == [MARKER, "aorta.nii.gz"]


# --- another tool's label map, named by --names ------------------------------------------------------

TS_RESULTS = Path(__file__).parent / "data" / "totalseg_results"
TS_MULTILABEL = TS_RESULTS / "abdomen_ct_dicom_multilabel.nii.gz"
TS_NAMES = TS_RESULTS / "totalsegmentator_v2_total_labels.json"


def run_cli(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "stuseg", *map(str, args)], capture_output=True, text=True, timeout=300
    )


def test_totalsegmentators_multilabel_file_exported_with_its_names(tmp_path: Path) -> None:
    table = {int(v): n for v, n in json.loads(TS_NAMES.read_text(encoding="utf-8")).items()}
    data = np.asanyarray(nib.load(TS_MULTILABEL).dataobj)
    assert data.max() > 104  # TotalSegmentator's numbering: beyond the model's 104 values
    out = tmp_path / "masks"
    done = run_cli(
        "export-labels", TS_MULTILABEL, out, "--names", TS_NAMES, "-l", "liver,kidney_*", "-g", "vessels"
    )
    assert done.returncode == 0, done.stderr
    by_name = {n: v for v, n in table.items()}
    vessels = {n for n in table.values() if n in labels.GROUPS["vessels"]}  # the group, by name
    expected = {"liver", *(n for n in table.values() if n.startswith("kidney_")), *vessels}
    assert {p.name.removesuffix(".nii.gz") for p in out.glob("*.nii.gz")} == expected
    for name in expected:
        mask = nib.load(out / f"{name}.nii.gz")
        np.testing.assert_array_equal(np.asanyarray(mask.dataobj), data == by_name[name], err_msg=name)
        np.testing.assert_array_equal(mask.affine, nib.load(TS_MULTILABEL).affine)
    assert np.any(data == by_name["liver"])
    assert done.stderr.strip().endswith(f"wrote {len(expected)} files")


def test_totalsegmentators_multilabel_file_to_a_compact_ml_file(tmp_path: Path) -> None:
    table = {n: int(v) for v, n in json.loads(TS_NAMES.read_text(encoding="utf-8")).items()}
    out = tmp_path / "vert.nii.gz"
    wanted = ["vertebrae_L1", "vertebrae_T12", "liver"]
    args = ["--ml", "--numbering", "compact", "--names", TS_NAMES, "-l", ",".join(wanted)]
    done = run_cli("export-labels", TS_MULTILABEL, out, *args)
    assert done.returncode == 0, done.stderr
    data = np.asanyarray(nib.load(TS_MULTILABEL).dataobj)
    written = labelmaps.load_named_labels(out, out.with_name("vert.json"))
    in_order = sorted(wanted, key=table.get)  # compact: 1..k in the file's own value order
    assert written[2] == dict(enumerate(in_order, start=1))
    expect = np.zeros(data.shape, np.uint8)
    for k, name in enumerate(in_order, start=1):
        expect[data == table[name]] = k
    np.testing.assert_array_equal(written[0], expect)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("folder", "--names applies to a multilabel file"),
        ("unnamed", "holds label value 5, which {names} does not name"),
        ("not-json", "is not a label table"),
        ("v1-numbering", "--numbering totalsegmentator-v1 applies to the published structures only"),
    ],
)
def test_names_errors_are_one_line_and_write_nothing(tmp_path: Path, case: str, message: str) -> None:
    names = tmp_path / "names.json"
    names.write_text(json.dumps({"1": "spleen", "2": "kidney_right"}), encoding="utf-8")
    seg = TS_MULTILABEL
    extra: list[object] = []
    if case == "folder":
        seg = TS_RESULTS / "abdomen_ct_sm_masks"
    elif case == "not-json":
        names.write_text("spleen\nkidney_right\n", encoding="utf-8")
    elif case == "v1-numbering":
        extra = ["--ml", "--numbering", "totalsegmentator-v1"]
    out = tmp_path / ("out.nii.gz" if extra else "out")
    done = run_cli("export-labels", seg, out, "--names", names, "-l", "spleen", *extra)
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert message.format(names=names) in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["names.json"]


# --- a folder of masks named by its files: a fine-tuned model's, or another tool's -------------------


def _own_folder(tmp_path: Path, header: nib.Nifti1Header) -> tuple[Path, dict[str, np.ndarray]]:
    """A folder as ``stuseg predict --model`` writes it for a model whose structures are partly
    not published ones (``kidney``, ``tumour``), and the masks the test put in it."""
    shape = header.get_data_shape()
    rng = np.random.default_rng(3)
    regions = rng.integers(0, 4, size=shape)  # 0 background, then one structure each: no overlap
    masks = {name: (regions == k).astype(np.uint8) for k, name in enumerate(["tumour", "kidney", "liver"], 1)}
    folder = tmp_path / "seg"
    folder.mkdir()
    for name, mask in masks.items():
        nib.save(nib.Nifti1Image(mask, header.get_best_affine(), header), folder / f"{name}.nii.gz")
    return folder, masks


def test_a_folder_of_a_models_own_structures_exports_by_its_names(tmp_path: Path, header) -> None:
    folder, masks = _own_folder(tmp_path, header)
    done = run_cli("export-labels", folder, tmp_path / "some", "-l", "kidney,tumour")
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (tmp_path / "some").glob("*.nii.gz")) == ["kidney.nii.gz", "tumour.nii.gz"]
    for name in ("kidney", "tumour"):
        written = nib.load(tmp_path / "some" / f"{name}.nii.gz")
        np.testing.assert_array_equal(np.asanyarray(written.dataobj), masks[name], err_msg=name)
        assert_same_geometry(tmp_path / "some" / f"{name}.nii.gz", header)
    # A group selects by the names the folder shares with the published structures.
    done = run_cli("export-labels", folder, tmp_path / "organs", "-g", "organs", "-l", "tumour")
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (tmp_path / "organs").glob("*.nii.gz")) == ["liver.nii.gz", "tumour.nii.gz"]
    done = run_cli("export-labels", folder, tmp_path / "union", "-l", "kidney,tumour", "--combine", "both")
    assert done.returncode == 0, done.stderr
    union = np.asanyarray(nib.load(tmp_path / "union" / "both.nii.gz").dataobj)
    np.testing.assert_array_equal(union, masks["kidney"] | masks["tumour"])


def test_only_the_masks_asked_for_are_read(tmp_path: Path, header) -> None:
    folder, masks = _own_folder(tmp_path, header)
    (folder / "liver.nii.gz").write_bytes(b"\x1f\x8b\x08\x00 not a whole gzip stream")
    done = run_cli("export-labels", folder, tmp_path / "ml.nii.gz", "-l", "tumour,kidney", "--ml")
    assert done.returncode == 0, done.stderr
    data, _, names = labelmaps.load_named_labels(tmp_path / "ml.nii.gz", tmp_path / "ml.json")
    assert names == {1: "kidney", 2: "tumour"}
    np.testing.assert_array_equal(data, masks["kidney"] + 2 * masks["tumour"])
    broken = run_cli("export-labels", folder, tmp_path / "liver", "-l", "liver")
    assert broken.returncode == 1 and "liver.nii.gz" in broken.stderr and broken.stderr.count("\n") == 1


def test_a_folder_of_own_structures_to_an_ml_file_numbers_them_by_name(tmp_path: Path, header) -> None:
    folder, masks = _own_folder(tmp_path, header)
    out = tmp_path / "two.nii.gz"
    done = run_cli("export-labels", folder, out, "-l", "tumour,kidney", "--ml")
    assert done.returncode == 0, done.stderr
    data, _, names = labelmaps.load_named_labels(out, out.with_name("two.json"))
    assert names == {1: "kidney", 2: "tumour"}  # 1..k in name order: a folder carries no values
    np.testing.assert_array_equal(data, masks["kidney"] + 2 * masks["tumour"])
    refused = run_cli(
        "export-labels", folder, tmp_path / "m.nii.gz", "-l", "kidney", "--ml", "--numbering", "model"
    )
    assert refused.returncode == 1
    assert refused.stderr.strip() == (
        f"stuseg: error: {folder} is a folder of masks, which carries no label values; its --ml file "
        "numbers the structures 1..k in name order (--numbering compact)"
    )
    assert not (tmp_path / "m.nii.gz").exists()


def test_overlapping_masks_of_own_structures_are_exported_one_at_a_time(tmp_path: Path, header) -> None:
    folder, masks = _own_folder(tmp_path, header)
    cyst = masks["kidney"] | masks["tumour"]
    nib.save(nib.Nifti1Image(cyst, header.get_best_affine(), header), folder / "cyst.nii.gz")
    for out, extra in ((tmp_path / "ml.nii.gz", ["--ml"]), (tmp_path / "masks", [])):
        done = run_cli("export-labels", folder, out, "-l", "cyst,kidney", *extra)
        assert done.returncode == 1
        assert done.stderr.strip() == (
            f"stuseg: error: masks cyst and kidney in {folder} overlap; one label map cannot hold both, "
            "so export them one at a time"
        )
        assert not out.exists()
    alone = run_cli("export-labels", folder, tmp_path / "cyst", "-l", "cyst")
    assert alone.returncode == 0, alone.stderr
    np.testing.assert_array_equal(np.asanyarray(nib.load(tmp_path / "cyst" / "cyst.nii.gz").dataobj), cyst)


def test_totalsegmentators_folder_exports_its_own_names_too(tmp_path: Path) -> None:
    source = TS_RESULTS / "abdomen_ct_sm_masks"
    assert (source / "heart.nii.gz").name.removesuffix(".nii.gz") not in labels.STRUCTURES
    out = tmp_path / "out"
    done = run_cli("export-labels", source, out, "-l", "heart", "-g", "organs")
    assert done.returncode == 0, done.stderr
    names = {p.name.removesuffix(".nii.gz") for p in source.glob("*.nii.gz")}
    organs = {n for n in names if n in labels.GROUPS["organs"]}
    assert {p.name.removesuffix(".nii.gz") for p in out.glob("*.nii.gz")} == organs | {"heart"}
    for name in organs | {"heart"}:
        mine, theirs = nib.load(out / f"{name}.nii.gz"), nib.load(source / f"{name}.nii.gz")
        np.testing.assert_array_equal(np.asanyarray(mine.dataobj) != 0, np.asanyarray(theirs.dataobj) != 0)
        np.testing.assert_array_equal(mine.affine, theirs.affine)
