"""stuseg finetune prepare: sources, label tables, every bad case at once, nnU-Net's own checker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from stuseg.errors import InputError, LabelError, OutputError
from stuseg.finetune.dataset import DatasetError, label_table, labels_from_option, prepare_dataset
from stuseg.results.outputs import MARKER

SHAPE = (12, 10, 8)
AFFINE = np.array([[-1.5, 0, 0, 20.0], [0, -1.2, 0, 30.0], [0, 0, 2.0, -40.0], [0, 0, 0, 1]])


def ct(seed: int = 0, shape: tuple[int, int, int] = SHAPE) -> np.ndarray:
    return np.random.default_rng(seed).integers(-1000, 1500, shape).astype(np.int16)


def seg(values: tuple[int, ...] = (1, 2), shape: tuple[int, int, int] = SHAPE) -> np.ndarray:
    data = np.zeros(shape, np.uint8)
    for i, v in enumerate(values):
        data[2 + i, 2:5, 2:5] = v
    return data


def save(path: Path, data: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


def pairs_folder(root: Path, n: int = 3) -> Path:
    for i in range(n):
        save(root / "images" / f"case{i}.nii.gz", ct(i))
        save(root / "labels" / f"case{i}.nii.gz", seg())
    return root


def run_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "stuseg", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, check=False)


# --- label tables -----------------------------------------------------------------------------


def test_label_table_forms_agree(tmp_path: Path) -> None:
    expected = {1: "liver", 2: "tumour"}
    assert label_table(["liver", "tumour"]) == expected
    assert label_table({"liver": 1, "tumour": 2}) == expected
    assert label_table({"1": "liver", "2": "tumour", "0": "background"}) == expected
    by_value = save_json(tmp_path / "a.json", {"1": "liver", "2": "tumour"})
    by_name = save_json(tmp_path / "b.json", {"liver": 1, "tumour": 2})
    assert labels_from_option(str(by_value)) == labels_from_option(str(by_name)) == expected
    assert labels_from_option("liver, tumour") == expected


def save_json(path: Path, doc: object) -> Path:
    path.write_text(json.dumps(doc))
    return path


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"1": "liver", "3": "tumour"}, "label values must be 1 to 2 without gaps"),
        (["liver", "Liver"], "two labels are named 'liver' and 'Liver'"),
        (["liver", "ignore"], "'ignore' is a reserved name"),
        ({"0": "liver"}, "value 0 is background"),
        ({"liver": 1, "2": "tumour"}, "mixes forms"),
        ([], "names no structure"),
        ([f"s{i}" for i in range(256)], "at most 255"),
    ],
)
def test_bad_label_tables_are_refused(table: object, message: str) -> None:
    with pytest.raises(LabelError, match=message):
        label_table(table)  # type: ignore[arg-type]


def test_a_json_table_with_a_key_twice_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "labels.json"
    path.write_text('{"1": "liver", "1": "tumour"}')
    with pytest.raises(LabelError, match="gives the key '1' twice"):
        labels_from_option(str(path))


# --- sources ----------------------------------------------------------------------------------


def check_written(out: Path, ids: list[str], channels: int = 1) -> None:
    """The raw layout: one file per channel, uint8 labels, every file on the first image's grid."""
    assert sorted(p.name for p in out.iterdir()) == sorted([MARKER, "dataset.json", "imagesTr", "labelsTr"])
    assert sorted(p.name for p in (out / "labelsTr").iterdir()) == [f"{i}.nii.gz" for i in ids]
    images = [f"{i}_{c:04d}.nii.gz" for i in ids for c in range(channels)]
    assert sorted(p.name for p in (out / "imagesTr").iterdir()) == sorted(images)
    for case in ids:
        label = nib.load(out / "labelsTr" / f"{case}.nii.gz")
        assert label.get_data_dtype() == np.uint8
        for c in range(channels):
            image = nib.load(out / "imagesTr" / f"{case}_{c:04d}.nii.gz")
            assert image.shape == label.shape
            np.testing.assert_array_equal(image.affine, label.affine)
            np.testing.assert_allclose(image.affine, AFFINE)


def test_images_and_labels_folders(tmp_path: Path) -> None:
    src = pairs_folder(tmp_path / "src")
    result = prepare_dataset(src, tmp_path / "Dataset501_Liver", ["liver", "tumour"])
    check_written(result.folder, ["case0", "case1", "case2"])
    doc = json.loads(result.dataset_json.read_text())
    assert doc == {
        "name": "Dataset501_Liver",
        "channel_names": {"0": "CT"},
        "labels": {"background": 0, "liver": 1, "tumour": 2},
        "numTraining": 3,
        "file_ending": ".nii.gz",
    }
    assert result.labels == {"background": 0, "liver": 1, "tumour": 2}
    assert [c.id for c in result.cases] == ["case0", "case1", "case2"]
    image = nib.load(result.cases[1].images[0])
    assert image.get_data_dtype() == np.int16  # whole HU values keep int16
    np.testing.assert_array_equal(np.asanyarray(image.dataobj), ct(1))
    np.testing.assert_array_equal(np.asanyarray(nib.load(result.cases[1].label).dataobj), seg())


def test_side_by_side_folder_with_nrrd_image_and_float_labels(tmp_path: Path) -> None:
    src = tmp_path / "src"
    save(src / "a.nii.gz", ct(0))
    save(src / "a_seg.nii.gz", seg().astype(np.float32))  # whole-number floats are labels too
    # An NRRD image (LPS) of the same grid as the NIfTI label beside it.
    image = sitk.GetImageFromArray(ct(1).T.copy())
    image.SetSpacing((1.5, 1.2, 2.0))
    image.SetOrigin((-20.0, -30.0, -40.0))
    image.SetDirection((1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))
    sitk.WriteImage(image, str(src / "b.nrrd"))
    save(src / "b_Label.nii.gz", seg())
    result = prepare_dataset(src, tmp_path / "out", ["liver", "tumour"])
    check_written(result.folder, ["a", "b"])
    np.testing.assert_array_equal(np.asanyarray(nib.load(result.cases[1].images[0]).dataobj), ct(1))


def test_nnunet_layout_with_two_channels(tmp_path: Path) -> None:
    src = tmp_path / "src"
    for case in ("p1", "p2"):
        save(src / "imagesTr" / f"{case}_0000.nii.gz", ct(1))
        save(src / "imagesTr" / f"{case}_0001.nii.gz", ct(2).astype(np.float32) / 7)
        save(src / "labelsTr" / f"{case}.nii.gz", seg((1,)))
    (src / "dataset.json").write_text("{}")  # a source's own dataset.json is not an image
    result = prepare_dataset(src, tmp_path / "out", ["lesion"], channel_names=["CT", "PET"])
    check_written(result.folder, ["p1", "p2"], channels=2)
    pet = nib.load(result.cases[0].images[1])
    assert pet.get_data_dtype() == np.float32  # fractional values stay float32
    np.testing.assert_allclose(np.asanyarray(pet.dataobj), ct(2).astype(np.float32) / 7)


def test_csv_with_two_channels_and_case_column(tmp_path: Path) -> None:
    data = tmp_path / "data"
    for i in range(2):
        save(data / f"ct{i}.nii.gz", ct(i))
        save(data / f"pet{i}.nii.gz", ct(i + 5))
        save(data / f"mask{i}.nii.gz", seg())
    table = tmp_path / "cases.csv"
    table.write_text(
        "case,image,image_1,label,notes\n"
        + "".join(
            f"patient {i},data/ct{i}.nii.gz,data/pet{i}.nii.gz,data/mask{i}.nii.gz,x\n" for i in range(2)
        )
    )
    result = prepare_dataset(table, tmp_path / "out", {"liver": 1, "tumour": 2}, channel_names=("CT", "PET"))
    check_written(result.folder, ["patient_0", "patient_1"], channels=2)
    assert json.loads(result.dataset_json.read_text())["channel_names"] == {"0": "CT", "1": "PET"}


def test_an_image_without_its_label_beside_it(tmp_path: Path) -> None:
    src = tmp_path / "src"
    save(src / "a.nii.gz", ct(0))
    save(src / "a_seg.nii.gz", seg())
    save(src / "b.nii.gz", ct(1))
    with pytest.raises(DatasetError) as caught:
        prepare_dataset(src, tmp_path / "out", ["liver", "tumour"])
    assert caught.value.problems == (f"{src / 'b.nii.gz'}: has no label file b_seg.* or b_label.* in {src}",)


def test_a_folder_of_two_layouts_is_refused(tmp_path: Path) -> None:
    src = pairs_folder(tmp_path / "src", 1)
    save(src / "x_seg.nii.gz", seg())
    with pytest.raises(InputError, match="mixes two layouts"):
        prepare_dataset(src, tmp_path / "out", ["liver", "tumour"])


def test_csv_channels_must_match_the_names(tmp_path: Path) -> None:
    table = tmp_path / "cases.csv"
    table.write_text("image,image_1,label\na.nii.gz,b.nii.gz,c.nii.gz\n")
    with pytest.raises(InputError, match="has 2 image columns but 1 channel is named"):
        prepare_dataset(table, tmp_path / "out", ["liver"])


# --- bad cases --------------------------------------------------------------------------------


def bad_source(root: Path) -> tuple[Path, dict[str, str]]:
    """A CSV source with one good case and one of each problem; the expected line per case."""
    files = root / "files"
    save(files / "good.nii.gz", ct(0))
    save(files / "good_label.nii.gz", seg())
    rows = [("good", "good.nii.gz", "good_label.nii.gz")]
    expected = {}

    def case(
        name: str, label: np.ndarray | None, line: str, image_shape: tuple[int, int, int] = SHAPE
    ) -> None:
        save(files / f"{name}.nii.gz", ct(1, image_shape))
        if label is not None:
            save(files / f"{name}_label.nii.gz", label)
        rows.append((name, f"{name}.nii.gz", f"{name}_label.nii.gz"))
        expected[name] = line.format(label=files / f"{name}_label.nii.gz", image=files / f"{name}.nii.gz")

    case(
        "grid",
        seg(),
        "{label}: not on the grid of its image {image} (shape (12, 10, 8) vs the image's (12, 10, 9))",
        (12, 10, 9),
    )
    case(
        "stray",
        seg((1, 7)),
        "{label}: holds label value 7 that the label table does not name (0 background, 1 liver, 2 tumour)",
    )
    case(
        "empty",
        seg(()),
        "{label}: holds no labelled voxel (only background 0); label something or leave the case out",
    )
    fractional = seg().astype(np.float32)
    fractional[0, 0, 0] = 0.5
    case(
        "fraction",
        fractional,
        "{label}: holds non-integer label values (such as 0.5); a label map holds whole numbers 0, 1, 2, ...",
    )
    case("unreadable", None, "")
    (files / "unreadable_label.nii.gz").write_bytes(b"not a nifti file")
    expected["unreadable"] = (
        f"cannot read {files / 'unreadable_label.nii.gz'}: it is damaged, truncated or not a NIfTI image; "
        "check the file or export it again"
    )
    # Two rows whose ids coincide once made safe ("dup id" and "dup_id").
    save(files / "dup.nii.gz", ct(2))
    save(files / "dup_label.nii.gz", seg())
    rows += [("dup id", "dup.nii.gz", "dup_label.nii.gz"), ("DUP_id", "dup.nii.gz", "good_label.nii.gz")]
    expected["dup"] = (
        f"{files / 'dup_label.nii.gz'} and {files / 'good_label.nii.gz'}: cases with the same id 'dup_id'; "
        "rename one (or set a CSV's case column)"
    )
    table = root / "cases.csv"
    table.write_text("case,image,label\n" + "".join(f"{c},files/{i},files/{lb}\n" for c, i, lb in rows))
    return table, expected


def test_every_bad_case_is_listed_at_once_and_nothing_is_written(tmp_path: Path) -> None:
    table, expected = bad_source(tmp_path)
    out = tmp_path / "out"
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(DatasetError) as caught:
        prepare_dataset(table, out, ["liver", "tumour"])
    assert sorted(caught.value.problems) == sorted(expected.values())
    assert caught.value.summary.startswith(f"6 problems with the cases in {table}; nothing was written")
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no output, no staged leftover


def test_pairing_problems_are_listed_with_the_case_problems(tmp_path: Path) -> None:
    src = pairs_folder(tmp_path / "src", 2)
    save(src / "images" / "lonely.nii.gz", ct(3))
    save(src / "labels" / "orphan.nii.gz", seg())
    save(src / "labels" / "case1.nii.gz", seg((1, 9)))
    with pytest.raises(DatasetError) as caught:
        prepare_dataset(src, tmp_path / "out", ["liver", "tumour"])
    assert caught.value.problems == (
        f"{src / 'images' / 'lonely.nii.gz'}: has no label file lonely.* in {src / 'labels'}",
        f"{src / 'labels' / 'orphan.nii.gz'}: has no image of the same name",
        f"{src / 'labels' / 'case1.nii.gz'}: holds label value 9 that the label table does not name "
        "(0 background, 1 liver, 2 tumour)",
    )
    assert not (tmp_path / "out").exists()


# --- the output folder ------------------------------------------------------------------------


def test_a_folder_of_other_files_is_refused_and_a_previous_dataset_replaced(tmp_path: Path) -> None:
    src = pairs_folder(tmp_path / "src", 2)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="holds files stuseg did not write"):
        prepare_dataset(src, out, ["liver", "tumour"])
    assert (out / "notes.txt").read_text() == "mine"
    prepare_dataset(src, out, ["liver", "tumour"], overwrite=True)
    assert not (out / "notes.txt").exists()
    (src / "images" / "case1.nii.gz").unlink()
    (src / "labels" / "case1.nii.gz").unlink()
    result = prepare_dataset(src, out, ["liver", "tumour"])  # its own earlier dataset: replaced whole
    check_written(result.folder, ["case0"])


def test_the_output_may_not_lie_inside_the_source(tmp_path: Path) -> None:
    src = pairs_folder(tmp_path / "src", 1)
    with pytest.raises(OutputError, match="lies inside the input folder"):
        prepare_dataset(src, src / "dataset", ["liver", "tumour"])


def test_nnunet_accepts_the_dataset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """nnU-Net v2's own checker on a dataset in its nnUNet_raw layout: two channels, int16 and float."""
    raw = tmp_path / "nnUNet_raw"
    raw.mkdir()
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(name, str(tmp_path / name))
    data = tmp_path / "data"
    for i in range(3):
        save(data / f"ct{i}.nii.gz", ct(i))
        save(data / f"pet{i}.nii.gz", ct(i + 3).astype(np.float32) / 3)
        save(data / f"mask{i}.nii.gz", seg((1, 2) if i else (2,)))
    table = tmp_path / "cases.csv"
    table.write_text(
        "image,image_1,label\n"
        + "".join(f"data/ct{i}.nii.gz,data/pet{i}.nii.gz,data/mask{i}.nii.gz\n" for i in range(3))
    )
    result = prepare_dataset(table, raw / "Dataset777_Test", ["liver", "tumour"], channel_names=["CT", "PET"])
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    verify_dataset_integrity(str(result.folder), num_processes=1)  # raises on errors, prints warnings
    said = capfd.readouterr().out
    assert "verify_dataset_integrity Done" in said
    assert "Warning" not in said and "Error" not in said, said
    # The checker is live: a value the table does not name fails it.
    save(result.cases[0].label, seg((3,)), nib.load(result.cases[0].label).affine)
    with pytest.raises(RuntimeError, match="unexpected labels"):
        verify_dataset_integrity(str(result.folder), num_processes=1)


# --- the command line -------------------------------------------------------------------------


def test_cli_prepares_a_dataset(tmp_path: Path) -> None:
    src = pairs_folder(tmp_path / "src", 2)
    labels = save_json(tmp_path / "labels.json", {"1": "liver", "2": "tumour"})
    out = tmp_path / "ds"
    done = run_cli("finetune", "prepare", src, "-o", out, "--labels", labels)
    assert done.returncode == 0, done.stderr
    assert done.stderr == f"prepared 2 cases (labels 1 liver, 2 tumour; channel CT) in {out}\n"
    assert done.stdout == f"{out}\n"
    check_written(out, ["case0", "case1"])
    run = json.loads((out / MARKER).read_text())
    assert run["command"] == "finetune-prepare"


def test_cli_lists_bad_cases_on_stderr_and_exits_1(tmp_path: Path) -> None:
    table, expected = bad_source(tmp_path)
    out = tmp_path / "ds"
    done = run_cli("finetune", "prepare", table, "-o", out, "--labels", "liver,tumour")
    assert done.returncode == 1
    lines = done.stderr.splitlines()
    assert sorted(lines[:-1]) == sorted(f"stuseg: error: {line}" for line in expected.values())
    assert lines[-1].startswith(f"stuseg: error: 6 problems with the cases in {table}; nothing was written")
    assert done.stdout == ""
    assert not out.exists()


def test_cli_refuses_a_bad_label_table_in_one_line(tmp_path: Path) -> None:
    src = pairs_folder(tmp_path / "src", 1)
    done = run_cli("finetune", "prepare", src, "-o", tmp_path / "ds", "--labels", "liver,,tumour")
    assert done.returncode == 1
    assert done.stderr == "stuseg: error: label 2 has an empty name; give every label a name\n"
