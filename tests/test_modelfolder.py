"""Reading fine-tuned nnU-Net v1/v2 model folders (stuseg.weights.modelfolder) and the model registry
(stuseg.weights.modelstore, ``stuseg import-model`` / ``stuseg models``). Folders are fabricated by
tests/model_folders.py with tiny STU-Nets."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO
from model_folders import (
    CT_PROPERTIES,
    published_arch,
    state_dict_of,
    tiny_arch,
    write_published_v1_folder,
    write_v1_folder,
    write_v2_folder,
)
from typer.testing import CliRunner

from stuseg.cli import app
from stuseg.errors import InputError, WeightsError
from stuseg.model.network import SIZES, Arch
from stuseg.model.plan import PLAN, Normalization, Plan
from stuseg.weights import checkpoints, modelfolder, modelstore
from stuseg.weights.modelfolder import Fold, load_fold, read_model_folder

ARCH = tiny_arch(3)  # background, liver, tumour


# The CT normalisation the fabricated folders' statistics describe.
CT_NORMALIZATION = Normalization(
    "ct",
    lower=CT_PROPERTIES["percentile_00_5"],
    upper=CT_PROPERTIES["percentile_99_5"],
    mean=CT_PROPERTIES["mean"],
    std=CT_PROPERTIES["std"],
)


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    return state_dict_of(ARCH)


def one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text
    return text


# -------------------------------------------------------------------------------------- nnU-Net v2


@pytest.mark.parametrize("old_plans_format", [False, True], ids=["plans-2.3+", "plans-2.2"])
def test_v2_plan_is_read_as_written(tmp_path: Path, state: dict, old_plans_format: bool) -> None:
    folder = write_v2_folder(tmp_path, state, old_plans_format=old_plans_format, folds=("0", "1", "all"))
    model = read_model_folder(folder)
    assert model.framework == "nnU-Net v2"
    assert model.plan == Plan(
        target_spacing=(2.5, 0.8, 0.8),
        patch_size=(64, 128, 128),
        num_classes=3,
        channels=(CT_NORMALIZATION,),
        framework="v2",
        reorient=False,
        transpose=(0, 1, 2),
        mirror_axes=(0, 1, 2),
    )
    # v2 strides without the first stage's [1, 1, 1]
    assert model.arch == Arch(
        dims=ARCH.dims,
        depths=ARCH.depths,
        strides=((1, 2, 2), (2, 2, 2), (2, 2, 2), (2, 2, 2), (1, 2, 2)),
        num_classes=3,
    )
    assert model.labels == {1: "liver", 2: "tumour"}
    assert model.channel_names == ("CT",)
    assert [f.name for f in model.folds] == ["0", "1", "all"]
    assert model.trainer == "STUNetTrainer_base_ft"
    assert model.size == "custom"


def test_v2_channels_readers_transpose_and_mirroring(tmp_path: Path) -> None:
    arch = tiny_arch(2, in_channels=5)
    folder = write_v2_folder(
        tmp_path,
        state_dict_of(arch),
        labels=("lesion",),
        channel_names=("T1", "T2", "none", "rescale", "rgb"),
        normalization=(
            "ZScoreNormalization",
            "ZScoreNormalization",
            "NoNormalization",
            "RescaleTo01Normalization",
            "RGBTo01Normalization",
        ),
        use_mask=(True, False, False, False, False),
        reader="NibabelIOWithReorient",
        transpose=(2, 0, 1),
        mirror_axes=(1, 2),
    )
    plan = read_model_folder(folder).plan
    assert plan.channels == (
        Normalization("zscore", use_mask=True),
        Normalization("zscore"),
        Normalization("none"),
        Normalization("rescale_0_1"),
        Normalization("rgb_0_1"),
    )
    assert plan.reorient is True
    assert plan.transpose == (2, 0, 1)
    assert plan.mirror_axes == (1, 2)


@pytest.mark.parametrize("reader", ["SimpleITKIO", "NibabelIO"])
def test_v2_readers_that_keep_the_voxel_order(tmp_path: Path, state: dict, reader: str) -> None:
    assert read_model_folder(write_v2_folder(tmp_path, state, reader=reader)).plan.reorient is False


def test_v2_no_mirroring_when_the_checkpoint_allows_none(tmp_path: Path, state: dict) -> None:
    # nnU-Net's predictor mirrors nothing when inference_allowed_mirroring_axes is None.
    folder = write_v2_folder(tmp_path, state, mirror_axes=None)
    assert read_model_folder(folder).plan.mirror_axes == ()


def test_v2_configuration_from_the_checkpoint_and_inherits_from(tmp_path: Path, state: dict) -> None:
    # A folder not named TRAINER__PLANS__CONFIGURATION: the checkpoint's init_args name it.
    folder = write_v2_folder(
        tmp_path,
        state,
        configuration="3d_fullres_bs4",
        folder_name="my_model",
        configuration_changes={"inherits_from": "3d_fullres", "batch_size": 4},
    )
    model = read_model_folder(folder)
    assert model.plan.patch_size == (64, 128, 128)  # inherited


def test_v2_strides_are_padded_and_cut_to_five(tmp_path: Path, state: dict) -> None:
    few = write_v2_folder(tmp_path / "few", state, strides=((1, 1, 1), (2, 2, 2), (2, 2, 2)))
    assert read_model_folder(few).arch.strides == ((2, 2, 2), (2, 2, 2), (1, 1, 1), (1, 1, 1), (1, 1, 1))
    many = [(1, 1, 1), *[(2, 2, 2)] * 4, (1, 2, 2), (1, 2, 2)]
    cut = write_v2_folder(tmp_path / "many", state, strides=many)
    assert read_model_folder(cut).arch.strides == ((2, 2, 2),) * 4 + ((1, 2, 2),)


def test_v2_ignore_label_is_not_a_class(tmp_path: Path) -> None:
    folder = write_v2_folder(
        tmp_path, state_dict_of(tiny_arch(2)), labels={"background": 0, "liver": 1, "ignore": 2}
    )
    model = read_model_folder(folder)
    assert model.labels == {1: "liver"}
    assert model.plan.num_classes == 2


@pytest.mark.parametrize("spelling", ["numpy1", "numpy2"])
def test_v2_checkpoints_with_numpy_scalars_load_in_both_spellings(
    tmp_path: Path, state: dict, spelling: str
) -> None:
    folder = write_v2_folder(tmp_path, state, numpy_spelling=spelling)
    model = read_model_folder(folder)
    loaded = load_fold(model, model.folds[0])
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state)


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod."])
def test_wrapper_prefixes_are_stripped(tmp_path: Path, state: dict, prefix: str) -> None:
    model = read_model_folder(write_v2_folder(tmp_path, state, prefix=prefix))
    assert load_fold(model, model.folds[0]).keys() == state.keys()


# ------------------------------------------------------------------------------------- v2 refusals


def refusal(tmp_path: Path, state: dict, **kwargs: object) -> tuple[Path, str]:
    folder = write_v2_folder(tmp_path, state, **kwargs)
    with pytest.raises(InputError) as exc:
        read_model_folder(folder)
    return folder, one_line(exc)


def test_v2_refuses_2d(tmp_path: Path, state: dict) -> None:
    folder, message = refusal(tmp_path, state, configuration="2d")
    assert message == (
        f"{folder} uses the 2d configuration 2d, which stuseg does not support "
        "(stuseg runs 3d full-resolution networks)"
    )


def test_v2_refuses_3d_lowres(tmp_path: Path, state: dict) -> None:
    folder, message = refusal(tmp_path, state, configuration="3d_lowres")
    assert message == (
        f"{folder} uses the low-resolution configuration 3d_lowres, which stuseg does not support "
        "(stuseg runs 3d full-resolution networks)"
    )


def test_v2_refuses_the_cascade(tmp_path: Path, state: dict) -> None:
    folder, message = refusal(tmp_path, state, configuration="3d_cascade_fullres")
    assert message == (
        f"{folder} uses the cascade configuration 3d_cascade_fullres (previous_stage 3d_lowres), which "
        "stuseg does not support (stuseg runs one 3d full-resolution network)"
    )


def test_v2_refuses_region_labels(tmp_path: Path) -> None:
    labels = {"background": 0, "whole": [1, 2], "core": 2}
    folder, message = refusal(tmp_path, state_dict_of(tiny_arch(2)), labels=labels)
    assert message == (
        f"{folder} uses region-based labels (label 'whole' is [1, 2]), which stuseg does not support "
        "(stuseg runs one label per voxel)"
    )
    folder, message = refusal(
        tmp_path / "order", state_dict_of(ARCH), dataset_changes={"regions_class_order": [1, 2]}
    )
    assert message == (
        f"{folder} uses region-based labels (regions_class_order), which stuseg does not support "
        "(stuseg runs one label per voxel)"
    )


def test_v2_refuses_other_readers(tmp_path: Path, state: dict) -> None:
    folder, message = refusal(tmp_path, state, reader="NaturalImage2DIO")
    assert message == (
        f"{folder} uses image reader NaturalImage2DIO, which stuseg does not support "
        "(stuseg reads images as SimpleITKIO, NibabelIO, NibabelIOWithReorient)"
    )


def test_v2_refuses_other_normalisations(tmp_path: Path, state: dict) -> None:
    folder, message = refusal(tmp_path, state, normalization=("MyNormalization",))
    assert message == (
        f"{folder} uses normalisation MyNormalization for channel 0, which stuseg does not support "
        "(stuseg implements CTNormalization, ZScoreNormalization, NoNormalization, "
        "RescaleTo01Normalization, RGBTo01Normalization)"
    )


HINT = (
    "stuseg resamples as nnU-Net's default: resample_data_or_seg_to_shape, order 3 (order_z 0) for "
    "images and 1 (order_z 0) for probabilities, force_separate_z null"
)


def test_v2_refuses_other_resampling(tmp_path: Path, state: dict) -> None:
    folder, message = refusal(
        tmp_path, state, configuration_changes={"resampling_fn_data": "resample_torch_fornnunet"}
    )
    assert message == (
        f"{folder} uses resampling_fn_data resample_torch_fornnunet, which stuseg does not support ({HINT})"
    )
    kwargs = {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": True}
    folder, message = refusal(
        tmp_path / "kw", state, configuration_changes={"resampling_fn_probabilities_kwargs": kwargs}
    )
    assert message == (
        f"{folder} uses resampling_fn_probabilities_kwargs "
        '{"order": 1, "order_z": 0, "force_separate_z": true}, which stuseg does not support '
        f"({HINT})"
    )


def test_a_plain_nnunet_network_is_not_an_stunet(tmp_path: Path) -> None:
    plain = {
        "encoder.stages.0.0.convs.0.conv.weight": torch.zeros(32, 1, 3, 3, 3),
        "decoder.seg_layers.4.weight": torch.zeros(3, 32, 1, 1, 1),
    }
    folder = write_v2_folder(tmp_path, plain)
    with pytest.raises(InputError) as exc:
        read_model_folder(folder)
    assert one_line(exc) == (
        f"the network in {folder / 'fold_0' / 'checkpoint_final.pth'} is not a STU-Net: it has no tensor "
        "conv_blocks_context.0.0.conv1.weight (its first tensor is encoder.stages.0.0.convs.0.conv.weight); "
        "stuseg runs models trained with an STU-Net trainer"
    )


def test_a_network_with_a_stray_tensor_is_not_an_stunet(tmp_path: Path, state: dict) -> None:
    folder = write_v2_folder(tmp_path, {**state, "extra.weight": torch.zeros(1)})
    with pytest.raises(InputError, match=r"it has a tensor extra\.weight that STU-Net does not"):
        read_model_folder(folder)


def test_channels_and_classes_must_agree_with_the_plan(tmp_path: Path, state: dict) -> None:
    folder = write_v2_folder(tmp_path / "c", state, channel_names=("CT", "PET"))
    with pytest.raises(InputError) as exc:
        read_model_folder(folder)
    assert one_line(exc) == f"{folder}: the network takes 1 input channel(s) but the plan has 2 (CT, PET)"
    folder = write_v2_folder(tmp_path / "k", state, labels=("liver",))
    with pytest.raises(InputError) as exc:
        read_model_folder(folder)
    assert one_line(exc) == (
        f"{folder}: the network has 3 output classes but the dataset has 2 labels (background included)"
    )


# ------------------------------------------------------------------------------------------ folds


def test_folds_are_picked_and_missing_ones_named(tmp_path: Path, state: dict) -> None:
    folder = write_v2_folder(tmp_path, state, folds=("0", "1", "2"))
    assert [f.name for f in read_model_folder(folder, folds=["2", "0"]).folds] == ["2", "0"]
    with pytest.raises(InputError) as exc:
        read_model_folder(folder, folds=["4"])
    assert one_line(exc) == (
        f"{folder} has no fold 4 with checkpoint_final.pth; there: fold_0 (checkpoint_final.pth); "
        "fold_1 (checkpoint_final.pth); fold_2 (checkpoint_final.pth)"
    )
    with pytest.raises(InputError) as exc:
        read_model_folder(folder, checkpoint="best")
    assert one_line(exc).startswith(f"{folder} has no fold with checkpoint_best.pth; there: fold_0 (")


def test_best_checkpoint(tmp_path: Path, state: dict) -> None:
    folder = write_v2_folder(tmp_path, state, checkpoint="best")
    assert read_model_folder(folder, checkpoint="best").folds[0].checkpoint.name == "checkpoint_best.pth"


def test_not_a_model_folder(tmp_path: Path) -> None:
    with pytest.raises(InputError) as exc:
        read_model_folder(tmp_path)
    assert one_line(exc) == (
        f"{tmp_path} is not an nnU-Net model folder: it has neither plans.json (nnU-Net v2) nor plans.pkl "
        "(nnU-Net v1); give the folder that holds the fold_* folders"
    )
    with pytest.raises(InputError, match="does not exist"):
        read_model_folder(tmp_path / "nope")


# -------------------------------------------------------------------------------- the network


@pytest.mark.parametrize("size", list(SIZES))
def test_arch_of_every_published_size_is_inferred(size: str) -> None:
    shapes = checkpoints._expected_shapes(size)
    arch = modelfolder.arch_from_shapes(shapes, SIZES[size].strides, Path("x"))
    assert arch == SIZES[size]


@pytest.mark.parametrize(
    "arch",
    [
        Arch(dims=(4, 8, 16, 32, 64, 64), depths=(1,) * 6, num_classes=7),
        Arch(dims=(8, 8, 16, 16, 32, 48), depths=(2, 1, 3, 1, 1, 2), in_channels=3, num_classes=2),
    ],
    ids=["tiny", "uneven"],
)
def test_arch_of_custom_networks_is_inferred(arch: Arch) -> None:
    shapes = checkpoints.shapes_of(state_dict_of(arch))
    assert modelfolder.arch_from_shapes(shapes, arch.strides, Path("x")) == arch


@pytest.mark.parametrize("size", list(SIZES))
def test_size_names_a_published_shape(size: str) -> None:
    model = modelfolder.TrainedModel(Path("x"), "nnU-Net v2", PLAN, SIZES[size], {}, ("CT",), (), "t")
    assert model.size == size


# ------------------------------------------------------------------------------------- nnU-Net v1


@pytest.mark.parametrize("spelling", ["numpy1", "numpy2"])
def test_v1_plan_is_read_as_written(tmp_path: Path, state: dict, spelling: str) -> None:
    folder = write_v1_folder(tmp_path, state, numpy_spelling=spelling, folds=("0", "3"))
    model = read_model_folder(folder)
    assert model.framework == "nnU-Net v1"
    assert model.plan == Plan(
        target_spacing=(3.0, 0.8, 0.8),
        patch_size=(64, 160, 160),
        num_classes=3,
        channels=(CT_NORMALIZATION,),
        framework="v1",
        reorient=True,
        transpose=(0, 1, 2),
        mirror_axes=(0, 1, 2),
    )
    # v1 pool_op_kernel_sizes have no leading [1, 1, 1]
    assert model.arch.strides == ((1, 2, 2), (2, 2, 2), (2, 2, 2), (2, 2, 2), (1, 2, 2))
    assert model.labels == {1: "class_1", 2: "class_2"}
    assert [f.name for f in model.folds] == ["0", "3"]
    assert load_fold(model, model.folds[1]).keys() == state.keys()


def test_v1_schemes_labels_and_stage(tmp_path: Path) -> None:
    arch = tiny_arch(3, in_channels=2)
    folder = write_v1_folder(
        tmp_path,
        state_dict_of(arch),
        modalities=("T1", "noNormChannel"),
        normalization_schemes=("nonCT", "noNorm"),
        labels={"0": "background", "1": "kidney", "2": "cyst"},
        stages=2,  # fullres is the last stage; the checkpoint says stage 1
        module_prefix=True,
    )
    model = read_model_folder(folder)
    assert model.plan.channels == (Normalization("zscore"), Normalization("none"))
    assert model.plan.target_spacing == (3.0, 0.8, 0.8)
    assert model.labels == {1: "kidney", 2: "cyst"}
    assert model.channel_names == ("T1", "noNormChannel")


def test_v1_published_plan_is_the_published_path(tmp_path: Path) -> None:
    arch = published_arch()
    model = read_model_folder(write_published_v1_folder(tmp_path, state_dict_of(arch)))
    assert model.plan == PLAN
    assert model.arch == arch
    order = json.loads((REPO / "tests" / "data" / "reference" / "label_order.json").read_text())["order"]
    assert model.labels == {i: name for i, name in enumerate(order) if i}
    assert model.trainer == "STUNetTrainer_base"


def v1_refusal(tmp_path: Path, state: dict, **kwargs: object) -> tuple[Path, str]:
    folder = write_v1_folder(tmp_path, state, **kwargs)
    with pytest.raises(InputError) as exc:
        read_model_folder(folder)
    return folder, one_line(exc)


def test_v1_refuses_use_mask_for_norm(tmp_path: Path, state: dict) -> None:
    folder, message = v1_refusal(
        tmp_path, state, modalities=("MR",), normalization_schemes=("nonCT",), use_mask_for_norm=(True,)
    )
    assert message == (
        f"{folder} uses use_mask_for_norm for channel 0, which stuseg does not support (nnU-Net v1 "
        "normalises after resampling, inside a resampled mask; stuseg does not implement that)"
    )


def test_v1_refuses_other_schemes(tmp_path: Path, state: dict) -> None:
    folder, message = v1_refusal(tmp_path, state, normalization_schemes=("CT2",))
    assert message == (
        f"{folder} uses normalization scheme 'CT2' for channel 0, which stuseg does not support "
        "(stuseg implements nonCT, CT and noNorm)"
    )


@pytest.mark.parametrize("network", ["3d_lowres", "3d_cascade_fullres", "2d"])
def test_v1_refuses_other_configurations(tmp_path: Path, state: dict, network: str) -> None:
    folder, message = v1_refusal(tmp_path, state, network=network)
    assert message == (
        f"{folder} uses the {network} configuration, which stuseg does not support "
        "(stuseg runs 3d_fullres networks)"
    )


def test_v1_refuses_the_low_resolution_stage_and_cascade_trainers(tmp_path: Path, state: dict) -> None:
    folder, message = v1_refusal(tmp_path / "a", state, stages=2, stage=0)
    assert message == (
        f"{folder} uses the 3d_lowres configuration (stage 0 of 2), which stuseg does not support "
        "(stuseg runs 3d_fullres networks)"
    )
    folder, message = v1_refusal(tmp_path / "b", state, trainer="nnUNetTrainerV2CascadeFullRes")
    assert message == (
        f"{folder} uses the cascade trainer nnUNetTrainerV2CascadeFullRes, which stuseg does not "
        "support (stuseg runs 3d_fullres networks)"
    )


def test_v1_refuses_other_export_params(tmp_path: Path, state: dict) -> None:
    params = {"force_separate_z": True, "interpolation_order": 1, "interpolation_order_z": 0}
    folder, message = v1_refusal(tmp_path, state, plans_changes={"segmentation_export_params": params})
    assert message == (
        f"{folder} uses segmentation_export_params "
        '{"force_separate_z": true, "interpolation_order": 1, "interpolation_order_z": 0}, which stuseg '
        "does not support (stuseg exports as nnU-Net v1's default: force_separate_z None, "
        "interpolation orders 1 and 0)"
    )
    defaults = {"force_separate_z": None, "interpolation_order": 1, "interpolation_order_z": 0}
    ok = write_v1_folder(tmp_path / "ok", state, plans_changes={"segmentation_export_params": defaults})
    assert read_model_folder(ok).plan.num_classes == 3


class Exploit:
    """Unpickling this runs os.system (a file appears) unless the unpickler refuses it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("which", ["plans.pkl", "model.pkl"])
def test_a_malicious_pickle_is_refused_and_never_runs(tmp_path: Path, state: dict, which: str) -> None:
    folder = write_v1_folder(tmp_path, state)
    marker = tmp_path / "pwned"
    target = (
        folder / "plans.pkl" if which == "plans.pkl" else folder / "fold_0/model_final_checkpoint.model.pkl"
    )
    target.write_bytes(pickle.dumps({"num_classes": 2, "payload": Exploit(marker)}))
    with pytest.raises(InputError) as exc:
        read_model_folder(folder)
    assert one_line(exc) == (
        f"{target} holds a Python object (posix.system) that nnU-Net plans do not contain; "
        "refusing to unpickle it"
    )
    assert not marker.exists()


def test_plain_pickles_of_every_protocol_are_read(tmp_path: Path) -> None:
    import numpy as np

    data = {"a": np.arange(4.0), "b": np.float32(2), "c": {1, 2}, "d": b"\x00\xff"}
    for protocol in range(2, pickle.HIGHEST_PROTOCOL + 1):
        path = tmp_path / f"p{protocol}.pkl"
        path.write_bytes(pickle.dumps(data, protocol=protocol))
        back = modelfolder.read_plain_pickle(path)
        assert back["a"].tolist() == [0.0, 1.0, 2.0, 3.0] and back["b"] == 2 and back["c"] == {1, 2}
        assert back["d"] == b"\x00\xff"


def test_a_malicious_checkpoint_is_refused(tmp_path: Path, state: dict) -> None:
    folder = write_v2_folder(tmp_path, state)
    ckpt = folder / "fold_0" / "checkpoint_final.pth"
    marker = tmp_path / "pwned"
    torch.save({"network_weights": state, "x": Exploit(marker)}, ckpt)
    with pytest.raises(WeightsError, match=r"holds a Python object \(posix.system\)"):
        read_model_folder(folder)
    assert not marker.exists()


# ------------------------------------------------------------------------------------- the cache


def test_a_fold_is_converted_once(tmp_path: Path, state: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    model = read_model_folder(write_v2_folder(tmp_path, state))
    fold = model.folds[0]
    first = load_fold(model, fold)
    path, sha = modelfolder.cache_fold(model, fold)
    assert path == modelfolder.stuseg_home() / "models" / "cache" / f"{sha}.safetensors"
    assert checkpoints.validate_safetensors(path)["source_sha256"] == sha
    mtime = path.stat().st_mtime_ns

    def no_source(*args: object) -> None:
        raise AssertionError("the source checkpoint was read again")

    monkeypatch.setattr(modelfolder, "_source_state", no_source)
    second = load_fold(model, fold)
    assert path.stat().st_mtime_ns == mtime
    assert all(torch.equal(first[k], second[k]) for k in state)


def test_a_damaged_cache_is_converted_again(tmp_path: Path, state: dict) -> None:
    from stuseg.images.io import StusegWarning

    model = read_model_folder(write_v2_folder(tmp_path, state))
    fold = model.folds[0]
    path, _ = modelfolder.cache_fold(model, fold)
    with path.open("r+b") as f:
        f.truncate(path.stat().st_size - 100)
    with pytest.warns(StusegWarning, match="was damaged .* it was converted again"):
        loaded = load_fold(model, fold)
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    assert checkpoints.validate_safetensors(path)  # sound again


def test_a_changed_checkpoint_is_another_cache_entry(tmp_path: Path, state: dict) -> None:
    folder = write_v2_folder(tmp_path, state)
    model = read_model_folder(folder)
    a, _ = modelfolder.cache_fold(model, model.folds[0])
    write_v2_folder(tmp_path, state_dict_of(ARCH, seed=1))
    b, _ = modelfolder.cache_fold(model, model.folds[0])
    assert a != b


# ---------------------------------------------------------------------------------- the registry


def test_import_list_resolve_and_load(tmp_path: Path, state: dict) -> None:
    folder = write_v2_folder(tmp_path, state, folds=("0", "1"))
    source = read_model_folder(folder)
    imported = modelstore.import_model(folder, "liver-v2", folds=["1"])
    assert imported == modelstore.resolve_model("liver-v2")
    assert imported.source == modelstore.models_folder() / "liver-v2"
    assert (imported.plan, imported.arch, imported.labels) == (source.plan, source.arch, source.labels)
    assert [f.name for f in imported.folds] == ["1"]
    loaded = load_fold(imported, imported.folds[0])
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    (row,) = modelstore.registered_models()
    assert (row.name, row.framework, row.size, row.classes, row.channels, row.folds) == (
        "liver-v2",
        "nnU-Net v2",
        "custom",
        2,
        ("CT",),
        ("1",),
    )
    from stuseg.weights.cache import sha256_file

    assert row.source_sha256 == (sha256_file(folder / "fold_1" / "checkpoint_final.pth"),)
    assert modelstore.resolve_model(str(folder)) == source
    assert not [p for p in modelstore.models_folder().iterdir() if p.name.startswith(".")]  # no staging left


def test_import_refuses_a_taken_name_unless_overwrite(tmp_path: Path, state: dict) -> None:
    folder = write_v2_folder(tmp_path, state)
    modelstore.import_model(folder, "m")
    with pytest.raises(InputError) as exc:
        modelstore.import_model(folder, "m")
    assert one_line(exc) == (
        f"a model named 'm' is registered already ({modelstore.models_folder() / 'm'}); "
        "choose another name or overwrite it"
    )
    v1 = write_v1_folder(tmp_path, state)
    assert modelstore.import_model(v1, "m", overwrite=True).framework == "nnU-Net v1"
    assert [r.framework for r in modelstore.registered_models()] == ["nnU-Net v1"]


@pytest.mark.parametrize("name", ["", "a/b", "..", ".hidden", "cache", "x y"])
def test_import_refuses_bad_names(tmp_path: Path, name: str) -> None:
    with pytest.raises(InputError, match="invalid model name"):
        modelstore.import_model(tmp_path, name)


def test_an_unknown_name_lists_the_registered_ones_closest_first(tmp_path: Path, state: dict) -> None:
    folder = write_v2_folder(tmp_path, state)
    for name in ("alpha", "liver-v2", "liver-v1"):
        modelstore.import_model(folder, name)
    with pytest.raises(InputError) as exc:
        modelstore.resolve_model("liver-v3")
    assert one_line(exc) == (
        "no model named 'liver-v3' is registered; registered models: liver-v1, liver-v2, alpha"
    )


def test_registered_weights_are_verified(tmp_path: Path, state: dict) -> None:
    model = modelstore.import_model(write_v2_folder(tmp_path, state), "m")
    fold = model.folds[0]
    data = bytearray(fold.checkpoint.read_bytes())
    data[-1] ^= 1  # a flipped bit: the header is still sound
    fold.checkpoint.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="recorded when the model was imported"):
        load_fold(model, fold)


def test_a_damaged_model_json_is_named(tmp_path: Path, state: dict) -> None:
    model = modelstore.import_model(write_v2_folder(tmp_path, state), "m")
    record = json.loads((model.source / "model.json").read_text())
    del record["plan"]["patch_size"]
    (model.source / "model.json").write_text(json.dumps(record))
    with pytest.raises(InputError) as exc:
        modelstore.resolve_model("m")
    assert one_line(exc) == (
        f"{model.source / 'model.json'} is damaged: its plan has no 'patch_size'; "
        "import the model again with --overwrite"
    )
    (row,) = modelstore.registered_models()
    assert row.problem == str(exc.value)


def test_fold_sha_is_part_of_a_registered_fold() -> None:
    assert Fold("0", Path("x")).sha256 is None


# -------------------------------------------------------------------------------------------- CLI


def test_cli_import_model_and_models(tmp_path: Path, state: dict) -> None:
    folder = write_v2_folder(tmp_path, state, folds=("0", "1"))
    runner = CliRunner()
    result = runner.invoke(app, ["import-model", str(folder), "--name", "liver", "--folds", "0,1"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(modelstore.models_folder() / "liver")
    result = runner.invoke(app, ["models", "--json"])
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.stdout)
    assert (row["name"], row["folds"], row["classes"]) == ("liver", ["0", "1"], 2)
    result = runner.invoke(app, ["import-model", str(tmp_path), "--name", "x"])
    assert result.exit_code == 1
    assert result.stderr.startswith(f"stuseg: error: {tmp_path} is not an nnU-Net model folder")


@pytest.mark.slow  # three interpreters that import torch: about 9 s
def test_cli_round_trip_in_a_real_process(tmp_path: Path, state: dict) -> None:
    folder = write_v1_folder(tmp_path, state)
    env = {**os.environ, "STUSEG_HOME": str(tmp_path / "home"), "PYTHONPATH": str(REPO)}

    def stuseg(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "stuseg", *args], env=env, cwd=tmp_path, capture_output=True, text=True
        )

    proc = stuseg("import-model", str(folder), "--name", "kidney.v1", "--checkpoint", "final")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == "kidney.v1: imported STU-Net custom (nnU-Net v1, 2 labels, fold 0)"
    proc = stuseg("models")
    assert proc.returncode == 0, proc.stderr
    assert "kidney.v1" in proc.stdout and "nnU-Net v1" in proc.stdout
    proc = stuseg("import-model", str(folder), "--name", "kidney.v1")
    assert proc.returncode == 1
    assert proc.stderr.startswith("stuseg: error: a model named 'kidney.v1' is registered already")
    model_json = tmp_path / "home" / "models" / "kidney.v1" / "model.json"
    assert json.loads(model_json.read_text())["framework"] == "nnU-Net v1"
