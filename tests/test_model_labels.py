"""A fine-tuned model's own label table through every output: masks, --ml and its sidecars,
statistics, preview, export-labels, colours, the pipeline's selection and the batch log.

The expected names are written out here by hand from the rule documented in
``stuseg.structures.labels.file_name`` (e.g. "kidney/left" -> ``kidney_left``), not computed with it.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from stuseg import batch
from stuseg.cli import app
from stuseg.errors import InputError, LabelError
from stuseg.images.io import Volume, label_image
from stuseg.inference import pipeline
from stuseg.model.plan import PLAN, Plan
from stuseg.results import labelmaps
from stuseg.structures import labels

SHAPE = (24, 20, 16)
RAW = {0: "background", 1: "Liver Tumour", 2: "kidney/left", 3: "GTVp"}
SAFE = {1: "Liver_Tumour", 2: "kidney_left", 3: "GTVp"}  # by hand, from the documented rule


def blocks(shape: tuple[int, int, int] = SHAPE) -> np.ndarray:
    """Values 1..3 in three disjoint boxes (value 3 touches no border)."""
    data = np.zeros(shape, np.uint8)
    data[2:8, 3:9, 2:6] = 1
    data[12:20, 4:10, 6:12] = 2
    data[5:9, 12:16, 8:11] = 3
    return data


def invoke(*args: object) -> object:
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture
def model_predict(monkeypatch: pytest.MonkeyPatch) -> np.ndarray:
    """``pipeline.segment`` replaced by a model whose Segmentation carries its own names."""
    made = blocks()

    def fake_segment(image: object, **kwargs: object) -> pipeline.Segmentation:
        header = image.header if isinstance(image, Volume) else nib.load(str(image)).header
        return pipeline.Segmentation(
            image=label_image(made, header), names=labels.model_names(RAW), size="custom"
        )

    monkeypatch.setattr(pipeline, "segment", fake_segment)
    return made


# --- predict's outputs ---------------------------------------------------------------------------


def test_model_names_are_the_published_rule_applied() -> None:
    assert labels.model_names(RAW) == SAFE


def test_predict_masks_statistics_and_preview_use_the_models_names(
    tmp_path: Path, make_nifti, model_predict: np.ndarray
) -> None:
    ct = make_nifti(shape=SHAPE)
    out = tmp_path / "masks"
    result = invoke("predict", ct, out, "--statistics", "--preview", "-q")
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    masks = ["GTVp.nii.gz", "Liver_Tumour.nii.gz", "kidney_left.nii.gz"]
    assert names == sorted([*masks, "preview.png", "statistics.csv", "statistics.json"])
    for value, name in SAFE.items():
        mask = np.asarray(nib.load(out / f"{name}.nii.gz").dataobj)
        np.testing.assert_array_equal(mask, (model_predict == value).astype(np.uint8), err_msg=name)
    doc = json.loads((out / "statistics.json").read_text(encoding="utf-8"))
    assert list(doc["structures"]) == ["Liver_Tumour", "kidney_left", "GTVp"]
    assert [doc["structures"][n]["voxels"] for n in SAFE.values()] == [144, 288, 48]
    rows = (out / "statistics.csv").read_text(encoding="utf-8").splitlines()[1:]
    assert [r.split(",")[:3] for r in rows] == [["Liver_Tumour", "1", "144"], ["kidney_left", "2", "288"],
                                                ["GTVp", "3", "48"]]  # fmt: skip


def test_predict_ml_carries_the_models_names_in_every_sidecar(
    tmp_path: Path, make_nifti, model_predict: np.ndarray
) -> None:
    ct = make_nifti(shape=SHAPE)
    out = tmp_path / "seg.nii.gz"
    result = invoke("predict", ct, out, "--ml", "-q")
    assert result.exit_code == 0, result.output
    expected = {"1": "Liver_Tumour", "2": "kidney_left", "3": "GTVp"}
    doc = json.loads((tmp_path / "seg.json").read_text(encoding="utf-8"))
    assert doc["labels"] == expected and doc["numbering"] == "model"
    img = nib.load(out)
    (ext,) = [e for e in img.header.extensions if e.get_code() == 6]
    assert json.loads(ext.get_content())["labels"] == expected
    snap = (tmp_path / "seg.itksnap.txt").read_text(encoding="utf-8").splitlines()
    assert [line.split('"')[1] for line in snap[2:]] == ["Clear Label", *expected.values()]
    ctbl = (tmp_path / "seg.ctbl").read_text(encoding="utf-8").splitlines()
    assert [line.split()[:2] for line in ctbl[2:]] == [
        ["0", "background"],
        *([k, v] for k, v in expected.items()),
    ]
    np.testing.assert_array_equal(np.asarray(img.dataobj), model_predict)
    # read back with the names the file carries, without --names
    stats = invoke("statistics", out, ct, "--output", tmp_path / "stats.json")
    assert stats.exit_code == 0, stats.output
    assert list(json.loads((tmp_path / "stats.json").read_text())["structures"]) == list(expected.values())


# --- many classes, any names ---------------------------------------------------------------------

# 255 classes: spaces, slashes, unicode, a Windows device name, case-insensitive twins.
MANY_RAW = {v: f"Läsion {v}" for v in range(1, 256)}
MANY_RAW.update({1: "CON", 2: "a/b", 3: "A B", 4: "肝臓 腫瘍", 5: "GTVp", 6: "gtvp"})
MANY = {v: f"Läsion_{v}" for v in range(1, 256)}
MANY.update({1: "CON_", 2: "a_b_2", 3: "A_B_3", 4: "肝臓_腫瘍", 5: "GTVp_5", 6: "gtvp_6"})


def many_labels() -> np.ndarray:
    data = np.zeros((16, 16, 2), np.uint8)
    data.reshape(-1)[:255] = np.arange(1, 256, dtype=np.uint8)  # every value, one voxel each
    return data


def test_255_classes_through_ml_statistics_preview_and_colours(tmp_path: Path) -> None:
    assert labels.model_names(MANY_RAW) == MANY
    data = many_labels()
    header = nib.Nifti1Header()
    header.set_data_shape(data.shape)
    header.set_sform(np.diag([1.0, 1.0, 2.0, 1.0]), code=1)
    path = tmp_path / "seg.nii.gz"
    labelmaps.save_multilabel(data, header, path, MANY, numbering="model")
    loaded = labelmaps.load_own_labels(path)
    assert loaded is not None and loaded[2] == MANY
    np.testing.assert_array_equal(loaded[0], data)
    colors = labelmaps.label_colors(MANY)
    assert len(set(colors.values())) == 255
    ct = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros(data.shape, np.int16), np.diag([1.0, 1.0, 2.0, 1.0])), ct)
    for extra in ([], ["--names", tmp_path / "seg.json"]):
        result = invoke("statistics", path, ct, "--output", tmp_path / "s.json", "--overwrite", *extra)
        assert result.exit_code == 0, result.output
        structures = json.loads((tmp_path / "s.json").read_text(encoding="utf-8"))["structures"]
        assert list(structures) == list(MANY.values()) and {r["voxels"] for r in structures.values()} == {1}
    result = invoke("preview", path, ct, tmp_path / "p.png")
    assert result.exit_code == 0, result.output
    with pytest.raises(ValueError, match="invalid label entry 1: 'a \"quoted\" name'"):
        labelmaps.save_multilabel(data, header, tmp_path / "x.nii.gz", {**MANY, 1: 'a "quoted" name'})


def test_masks_of_unsafe_names_stay_inside_their_folder(tmp_path: Path) -> None:
    header = nib.Nifti1Header()
    header.set_data_shape(SHAPE)
    folder = tmp_path / "masks"
    folder.mkdir()
    raw = {1: "../escape", 2: "kidney/left", 3: "NUL"}
    written = labelmaps.write_masks(folder, blocks(), header, raw)
    assert [p.name for p in written] == ["_escape.nii.gz", "kidney_left.nii.gz", "NUL_.nii.gz"]
    assert sorted(p.name for p in tmp_path.rglob("*.nii.gz")) == sorted(p.name for p in written)


# --- export-labels of a model's own --ml file ------------------------------------------------------


@pytest.fixture
def own_file(tmp_path: Path) -> Path:
    header = nib.Nifti1Header()
    header.set_data_shape(SHAPE)
    header.set_sform(np.diag([1.5, 1.5, 1.5, 1.0]), code=1)
    path = tmp_path / "seg.nii.gz"
    labelmaps.save_multilabel(blocks(), header, path, SAFE, numbering="model")
    return path


def test_export_labels_selects_from_the_files_own_names(tmp_path: Path, own_file: Path) -> None:
    data = blocks()
    result = invoke("export-labels", own_file, tmp_path / "out", "-l", "Liver Tumour, kidney_*")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "out").glob("*.nii.gz")) == [
        "Liver_Tumour.nii.gz",
        "kidney_left.nii.gz",
    ]
    got = np.asarray(nib.load(tmp_path / "out" / "kidney_left.nii.gz").dataobj)
    np.testing.assert_array_equal(got, (data == 2).astype(np.uint8))

    result = invoke("export-labels", own_file, tmp_path / "c.nii.gz", "-l", "GTVp,kidney_left", "--ml",
                    "--numbering", "compact")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "c.json").read_text())["labels"] == {"1": "kidney_left", "2": "GTVp"}
    got = np.asarray(nib.load(tmp_path / "c.nii.gz").dataobj)
    np.testing.assert_array_equal(got, np.select([data == 2, data == 3], [1, 2], 0).astype(np.uint8))

    result = invoke("export-labels", own_file, tmp_path / "u", "-l", "*", "--combine", "lesions")
    assert result.exit_code == 0, result.output
    got = np.asarray(nib.load(tmp_path / "u" / "lesions.nii.gz").dataobj)
    np.testing.assert_array_equal(got, (data > 0).astype(np.uint8))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-l", "liver"], "unknown structure 'liver', did you mean 'Liver_Tumour'?"),
        (
            ["-g", "organs"],
            "unknown structure 'organs'; the model's structures are 'Liver_Tumour', 'kidney_left', 'GTVp'",
        ),
        (
            ["-l", "GTVp", "--ml", "--numbering", "totalsegmentator-v1"],
            "--numbering totalsegmentator-v1 applies to the published structures only; {seg} is named "
            "by its label table, so choose model or compact",
        ),
        (
            ["-l", "GTVp", "--combine", "gtvp"],
            "--combine name 'gtvp' is a structure's name; choose another so the union cannot be "
            "mistaken for that structure",
        ),
    ],
)
def test_export_labels_errors_for_own_names(
    tmp_path: Path, own_file: Path, args: list[str], message: str
) -> None:
    out = tmp_path / ("o.nii.gz" if "--ml" in args else "o")
    result = invoke("export-labels", own_file, out, *args)
    assert result.exit_code == 1
    assert result.stderr == f"stuseg: error: {message.format(seg=own_file)}\n"
    assert not out.exists()


# --- colours -------------------------------------------------------------------------------------


def test_published_colours_follow_the_structure_and_model_colours_follow_the_names() -> None:
    published = dict(enumerate(labels.STRUCTURES, start=1))
    every = labelmaps.label_colors(published)
    # a structure has one colour in every table that holds it, under any value
    assert labelmaps.label_colors({7: "liver"}) == {7: every[labels.index_of("liver")]}
    assert labelmaps.label_colors({1: "aorta", 2: "Liver"}) == {
        1: every[labels.index_of("aorta")],
        2: every[labels.index_of("liver")],
    }
    one = labelmaps.label_colors(SAFE)
    assert len(set(one.values())) == 3
    # the same names under other values: the same colours
    again = labelmaps.label_colors({v + 10: n for v, n in SAFE.items()})
    assert [again[v + 10] for v in SAFE] == [one[v] for v in SAFE]
    assert labelmaps.label_colors({1: "GTVp"}) == labelmaps.label_colors({1: "gtvp"})  # case-insensitive


# --- the pipeline's selection ----------------------------------------------------------------------

PLAN4 = Plan(PLAN.target_spacing, PLAN.patch_size, 4)


def test_check_options_selects_from_a_models_own_names() -> None:
    keep, _, _ = pipeline._check_options(0.5, ["liver tumour", "GTV*"], "cpu", 1, PLAN4, RAW)
    assert keep == [1, 3]
    keep, _, _ = pipeline._check_options(0.5, ["kidney/left"], "cpu", 1, PLAN4, RAW)
    assert keep == [2]
    assert [pipeline._class_name(v, PLAN4, RAW) for v in (1, 2, 3)] == list(SAFE.values())
    assert [pipeline._class_name(v, PLAN4) for v in (1, 3)] == ["class_1", "class_3"]
    assert pipeline._check_options(0.5, None, "cpu", 1, PLAN4, RAW)[0] == [1, 2, 3]
    # the published table, given as names, keeps its groups
    published = dict(enumerate(labels.LABELS))
    assert pipeline._check_options(0.5, ["vessels"], "cpu", 1, PLAN, published)[0] == labels.select(
        ["vessels"]
    )
    assert pipeline._check_options(0.5, ["vessels"], "cpu", 1)[0] == labels.select(["vessels"])
    with pytest.raises(LabelError) as exc:
        pipeline._check_options(0.5, ["organs"], "cpu", 1, PLAN4, RAW)
    assert str(exc.value) == (
        "unknown structure 'organs'; the model's structures are 'Liver_Tumour', 'kidney_left', 'GTVp'"
    )


def test_check_options_refuses_a_table_that_does_not_fit_the_model() -> None:
    with pytest.raises(InputError) as exc:
        pipeline._check_options(0.5, None, "cpu", 1, PLAN4, {1: "a", 2: "b"})
    assert str(exc.value) == (
        "the label table names 2 values (1, 2) but the model has 3 classes, 1 to 3; "
        "give the model's own table"
    )


# --- the batch log ---------------------------------------------------------------------------------


def test_batch_settings_log_a_models_own_names() -> None:
    segmenter = SimpleNamespace(plan=PLAN4, keep=[1, 3], names=RAW)
    assert batch.model_table(segmenter) == (("Liver_Tumour", "GTVp"), 3)
    kept = ("Liver_Tumour", "GTVp")
    settings = batch.Settings(size="custom", weights_sha256="0" * 64, labels=(1, 3), names=kept, classes=3)
    assert settings.options()["roi_subset"] == ["Liver_Tumour", "GTVp"]
    assert settings.fingerprint()["names"] == ["Liver_Tumour", "GTVp"]
    every = batch.Settings(size="custom", weights_sha256="0", labels=(1, 2, 3), names=tuple(SAFE.values()))
    assert every.options()["roi_subset"] is None
    # a plan of other classes without names: class_<value>
    assert batch.model_table(SimpleNamespace(plan=PLAN4, keep=[2])) == (("class_2",), 3)


def test_batch_settings_of_the_published_table_are_as_before() -> None:
    assert batch.model_table(SimpleNamespace(plan=PLAN, keep=[40, 77])) == ((), 0)
    settings = batch.Settings(size="base", weights_sha256="0" * 64, labels=(40, 77))
    assert settings.options()["roi_subset"] == ["liver", "spleen"]
    assert settings.fingerprint() == {
        "size": "base",
        "weights_sha256": "0" * 64,
        "fast": False,
        "tta": False,
        "step_size": 0.5,
        "labels": [40, 77],
        "multilabel": False,
    }
    assert (
        batch.Settings(size="base", weights_sha256="0", labels=tuple(range(1, 105))).options()["roi_subset"]
        is None
    )
