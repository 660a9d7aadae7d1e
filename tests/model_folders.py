"""Fabricate nnU-Net model folders of an STU-Net, shaped as the frameworks leave them.

- ``write_v2_folder``: ``Dataset123_X/STUNetTrainer_base_ft__nnUNetPlans__3d_fullres`` with
  ``plans.json``, ``dataset.json`` and ``fold_N/checkpoint_final.pth`` as nnU-Net 2.8.1 writes them
  (the checkpoint keys of reference: network_weights, optimizer_state, grad_scaler_state, logging
  with numpy scalars, _best_ema, current_epoch, init_args, trainer_name,
  inference_allowed_mirroring_axes); ``old_plans_format`` writes the plans of nnU-Net up to 2.2
  (the STU-Net authors' fork): ``pool_op_kernel_sizes`` and ``conv_kernel_sizes`` in the
  configuration instead of ``architecture.arch_kwargs``.
- ``write_v1_folder``: ``nnUNet/3d_fullres/Task123_X/STUNetTrainer_base_ft__nnUNetPlansv2.1`` with
  ``plans.pkl`` and ``fold_N/model_final_checkpoint.model`` + ``.model.pkl`` as nnU-Net 1.7.1 and the
  STU-Net authors' run_finetuning.py leave them (pickles holding numpy arrays and OrderedDicts).
- ``write_published_v1_folder``: a v1 folder with the published models' plan
  (``tests/data/reference/totalseg_plans.json``): 1.5 mm, 128^3 patch, 105 classes, nonCT.

Numpy scalars can be pickled in the numpy-2 or the numpy-1 spelling (``numpy_spelling``).
"""

from __future__ import annotations

import json
import pickle
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from fabricate import _numpy1_spelling, write_checkpoint

from stuseg.model.network import Arch, build_network

REFERENCE = Path(__file__).parent / "data" / "reference"
TINY_DIMS = (4, 8, 16, 32, 64, 64)
Spelling = Literal["numpy1", "numpy2"]

RESAMPLING = {
    "resampling_fn_data": "resample_data_or_seg_to_shape",
    "resampling_fn_seg": "resample_data_or_seg_to_shape",
    "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
    "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
    "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
    "resampling_fn_probabilities_kwargs": {
        "is_seg": False,
        "order": 1,
        "order_z": 0,
        "force_separate_z": None,
    },
}
# Per-channel foreground statistics as nnU-Net's fingerprint records them.
CT_PROPERTIES = {
    "max": 3071.0,
    "mean": 98.5,
    "median": 84.0,
    "min": -1024.0,
    "percentile_00_5": -958.0,
    "percentile_99_5": 1345.0,
    "std": 137.25,
}


def tiny_arch(num_classes: int = 3, in_channels: int = 1, depths: Sequence[int] = (1,) * 6) -> Arch:
    """A STU-Net with few channels (widths ``TINY_DIMS``): the real architecture, fast to save."""
    return Arch(dims=TINY_DIMS, depths=tuple(depths), in_channels=in_channels, num_classes=num_classes)


def state_dict_of(arch: Arch, seed: int = 0) -> dict[str, torch.Tensor]:
    """Deterministic fp32 values with exactly ``STUNet(arch)``'s keys and shapes."""
    gen = torch.Generator().manual_seed(seed)
    shapes = build_network(arch, device="meta").state_dict()
    return {k: torch.randn(v.shape, generator=gen) * 0.05 for k, v in shapes.items()}


def _deep_update(target: dict[str, Any], changes: Mapping[str, Any]) -> None:
    """Merge ``changes`` into ``target``; a value None deletes the key."""
    for key, value in changes.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(target.get(key), dict):
            _deep_update(target[key], value)
        else:
            target[key] = value


# --------------------------------------------------------------------------------------------- v2


def _v2_configuration(
    spacing: Sequence[float],
    patch_size: Sequence[int],
    strides: Sequence[Sequence[int]],
    normalization: Sequence[str],
    use_mask: Sequence[bool],
    old_format: bool,
) -> dict[str, Any]:
    n = len(strides)
    kernels = [[3, 3, 3]] * n
    config: dict[str, Any] = {
        "data_identifier": "nnUNetPlans_3d_fullres",
        "preprocessor_name": "DefaultPreprocessor",
        "batch_size": 2,
        "patch_size": list(patch_size),
        "median_image_size_in_voxels": [int(p * 1.5) for p in patch_size],
        "spacing": list(spacing),
        "normalization_schemes": list(normalization),
        "use_mask_for_norm": list(use_mask),
        **json.loads(json.dumps(RESAMPLING)),
    }
    if old_format:
        config.update(
            {
                "UNet_class_name": "PlainConvUNet",
                "UNet_base_num_features": 32,
                "n_conv_per_stage_encoder": [2] * n,
                "n_conv_per_stage_decoder": [2] * (n - 1),
                "num_pool_per_axis": [sum(s[a] > 1 for s in strides) for a in range(3)],
                "pool_op_kernel_sizes": [list(s) for s in strides],
                "conv_kernel_sizes": kernels,
                "unet_max_num_features": 320,
            }
        )
    else:
        config["architecture"] = {
            "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
            "arch_kwargs": {
                "n_stages": n,
                "features_per_stage": [min(32 * 2**i, 320) for i in range(n)],
                "conv_op": "torch.nn.modules.conv.Conv3d",
                "kernel_sizes": kernels,
                "strides": [list(s) for s in strides],
                "n_conv_per_stage": [2] * n,
                "n_conv_per_stage_decoder": [2] * (n - 1),
                "conv_bias": True,
                "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                "norm_op_kwargs": {"eps": 1e-05, "affine": True},
                "dropout_op": None,
                "dropout_op_kwargs": None,
                "nonlin": "torch.nn.LeakyReLU",
                "nonlin_kwargs": {"inplace": True},
            },
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
        }
    config["batch_dice"] = False
    return config


def v2_checkpoint(
    state_dict: Mapping[str, torch.Tensor],
    *,
    plans: dict[str, Any],
    dataset_json: dict[str, Any],
    configuration: str,
    fold: str,
    trainer: str,
    mirror_axes: Sequence[int] | None,
    prefix: str = "",
) -> dict[str, Any]:
    """The dict nnU-Net 2.8.1's ``save_checkpoint`` writes (``nnUNetTrainer.save_checkpoint``)."""
    params = list(state_dict.values())
    epochs = 5
    return {
        "network_weights": {prefix + k: v for k, v in state_dict.items()},
        "optimizer_state": {
            "state": {i: {"momentum_buffer": p * 0.5} for i, p in enumerate(params)},
            "param_groups": [
                {
                    "lr": 1.2e-4,
                    "momentum": 0.99,
                    "dampening": 0,
                    "weight_decay": 3e-05,
                    "nesterov": True,
                    "maximize": False,
                    "foreach": None,
                    "differentiable": False,
                    "fused": None,
                    "initial_lr": 1e-3,
                    "params": list(range(len(params))),
                }
            ],
        },
        "grad_scaler_state": {
            "scale": 65536.0,
            "growth_factor": 2.0,
            "backoff_factor": 0.5,
            "growth_interval": 2000,
            "_growth_tracker": 12,
        },
        # nnUNetLogger.get_checkpoint(): lists per epoch; losses and dice are numpy scalars.
        "logging": {
            "mean_fg_dice": [np.float64(0.5 + e / 100) for e in range(epochs)],
            "ema_fg_dice": [np.float64(0.45 + e / 100) for e in range(epochs)],
            "dice_per_class_or_region": [[np.float64(0.5), np.float64(0.6)] for _ in range(epochs)],
            "train_losses": [np.float32(-0.5 - e / 100) for e in range(epochs)],
            "val_losses": [np.float32(-0.4 - e / 100) for e in range(epochs)],
            "lrs": [1e-3 * (1 - e / 1000) ** 0.9 for e in range(epochs)],
            "epoch_start_timestamps": [1.7e9 + 100 * e for e in range(epochs)],
            "epoch_end_timestamps": [1.7e9 + 100 * e + 90 for e in range(epochs)],
        },
        "_best_ema": np.float64(0.49),
        "current_epoch": epochs,
        "init_args": {
            "plans": plans,
            "configuration": configuration,
            "fold": int(fold) if fold.isdigit() else fold,
            "dataset_json": dataset_json,
            "device": torch.device("cuda", 0),
        },
        "trainer_name": trainer,
        "inference_allowed_mirroring_axes": tuple(mirror_axes) if mirror_axes is not None else None,
    }


def _save(obj: Any, path: Path, numpy_spelling: Spelling) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if numpy_spelling == "numpy1":
        with _numpy1_spelling():
            torch.save(obj, path)
    else:
        torch.save(obj, path)


def write_v2_folder(
    root: Path,
    state_dict: Mapping[str, torch.Tensor],
    *,
    spacing: Sequence[float] = (2.5, 0.8, 0.8),
    patch_size: Sequence[int] = (64, 128, 128),
    strides: Sequence[Sequence[int]] = ((1, 1, 1), (1, 2, 2), (2, 2, 2), (2, 2, 2), (2, 2, 2), (1, 2, 2)),
    labels: Mapping[str, Any] | Sequence[str] = ("liver", "tumour"),
    channel_names: Sequence[str] = ("CT",),
    folds: Sequence[str] = ("0",),
    old_plans_format: bool = False,
    mirror_axes: Sequence[int] | None = (0, 1, 2),
    normalization: Sequence[str] | None = None,
    use_mask: Sequence[bool] | None = None,
    reader: str = "SimpleITKIO",
    transpose: Sequence[int] = (0, 1, 2),
    configuration: str = "3d_fullres",
    trainer: str = "STUNetTrainer_base_ft",
    dataset: str = "Dataset123_X",
    folder_name: str | None = None,
    checkpoint: Literal["final", "best"] = "final",
    numpy_spelling: Spelling = "numpy2",
    prefix: str = "",
    plans_changes: Mapping[str, Any] | None = None,
    configuration_changes: Mapping[str, Any] | None = None,
    dataset_changes: Mapping[str, Any] | None = None,
    fold_states: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
) -> Path:
    """Write an nnU-Net v2 model folder of an STU-Net; return the folder.

    Every fold holds ``state_dict``, except those ``fold_states`` gives weights of their own.

    ``strides`` are the plan's, first stage's [1, 1, 1] included, as v2 lists them. ``labels``
    are names (values 1, 2, ... after background) or a full ``{name: value}`` table.
    ``normalization`` is one nnU-Net scheme name per channel (default: CTNormalization for a
    channel named CT, else ZScoreNormalization). ``*_changes`` are merged into the files last
    (a value None deletes the key); ``configuration_changes`` apply to ``configuration``'s entry.
    """
    channels = len(channel_names)
    if normalization is None:
        normalization = ["CTNormalization" if c == "CT" else "ZScoreNormalization" for c in channel_names]
    use_mask = list(use_mask) if use_mask is not None else [False] * channels
    table = dict(labels) if isinstance(labels, Mapping) else {n: i + 1 for i, n in enumerate(labels)}
    if not isinstance(labels, Mapping):
        table = {"background": 0, **table}
    dataset_json: dict[str, Any] = {
        "channel_names": {str(i): n for i, n in enumerate(channel_names)},
        "labels": table,
        "numTraining": 4,
        "file_ending": ".nii.gz",
        "name": dataset,
    }
    _deep_update(dataset_json, dataset_changes or {})

    fullres = _v2_configuration(spacing, patch_size, strides, normalization, use_mask, old_plans_format)
    lowres = {
        **json.loads(json.dumps(fullres)),
        "data_identifier": "nnUNetPlans_3d_lowres",
        "spacing": [s * 2 for s in spacing],
        "next_stage": "3d_cascade_fullres",
    }
    plan_2d = {
        **json.loads(json.dumps(fullres)),
        "data_identifier": "nnUNetPlans_2d",
        "patch_size": list(patch_size[1:]),
        "spacing": list(spacing[1:]),
        "batch_size": 12,
    }
    configurations = {
        "2d": plan_2d,
        "3d_fullres": fullres,
        "3d_lowres": lowres,
        "3d_cascade_fullres": {"inherits_from": "3d_fullres", "previous_stage": "3d_lowres"},
    }
    _deep_update(configurations.setdefault(configuration, {}), configuration_changes or {})
    plans: dict[str, Any] = {
        "dataset_name": dataset,
        "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": list(spacing),
        "original_median_shape_after_transp": [int(p * 1.5) for p in patch_size],
        "image_reader_writer": reader,
        "transpose_forward": list(transpose),
        "transpose_backward": [list(transpose).index(a) for a in range(3)],
        "configurations": configurations,
        "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {
            str(c): dict(CT_PROPERTIES, mean=CT_PROPERTIES["mean"] + c) for c in range(channels)
        },
    }
    _deep_update(plans, plans_changes or {})

    folder = root / dataset / (folder_name or f"{trainer}__nnUNetPlans__{configuration}")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "plans.json").write_text(json.dumps(plans, indent=4))
    (folder / "dataset.json").write_text(json.dumps(dataset_json, indent=4))
    name = {"final": "checkpoint_final.pth", "best": "checkpoint_best.pth"}[checkpoint]
    for fold in folds:
        ckpt = v2_checkpoint(
            (fold_states or {}).get(fold, state_dict),
            plans=plans,
            dataset_json=dataset_json,
            configuration=configuration,
            fold=fold,
            trainer=trainer,
            mirror_axes=mirror_axes,
            prefix=prefix,
        )
        _save(ckpt, folder / f"fold_{fold}" / name, numpy_spelling)
    return folder


# --------------------------------------------------------------------------------------------- v1


def v1_plans(
    *,
    spacing: Sequence[float],
    patch_size: Sequence[int],
    pool_op_kernel_sizes: Sequence[Sequence[int]],
    num_classes: int,
    modalities: Sequence[str],
    normalization_schemes: Sequence[str],
    use_mask_for_norm: Sequence[bool],
    intensity_properties: Mapping[int, Mapping[str, float]] | None,
    transpose: Sequence[int] = (0, 1, 2),
    stages: int = 1,
) -> OrderedDict:
    """A full plans dict as nnU-Net 1.7.1's ExperimentPlanner3D_v21 pickles it (numpy inside)."""
    n_cases = 4
    stage_plans = OrderedDict()
    for stage in range(stages):
        factor = 2 ** (stages - 1 - stage)  # stage 0 of two is the low-resolution one
        stage_plans[stage] = {
            "batch_size": 2,
            "num_pool_per_axis": [sum(p[a] > 1 for p in pool_op_kernel_sizes) for a in range(3)],
            "patch_size": np.array(patch_size, dtype=np.int64),
            "median_patient_size_in_voxels": np.array([int(p * 1.5) for p in patch_size], dtype=np.int64),
            "current_spacing": np.array(spacing, dtype=np.float64) * factor,
            "original_spacing": np.array(spacing, dtype=np.float64),
            "do_dummy_2D_data_aug": False,
            "pool_op_kernel_sizes": [list(p) for p in pool_op_kernel_sizes],
            "conv_kernel_sizes": [[3, 3, 3]] * (len(pool_op_kernel_sizes) + 1),
        }
    classes = list(range(1, num_classes + 1))
    intensity = (
        OrderedDict((c, OrderedDict(p)) for c, p in intensity_properties.items())
        if intensity_properties is not None
        else None
    )
    return OrderedDict(
        num_stages=stages,
        num_modalities=len(modalities),
        modalities={i: m for i, m in enumerate(modalities)},
        normalization_schemes=OrderedDict((i, s) for i, s in enumerate(normalization_schemes)),
        dataset_properties={
            "all_sizes": [np.array([200, 180, 180]) for _ in range(n_cases)],
            "all_spacings": [np.array(spacing, dtype=np.float64) for _ in range(n_cases)],
            "all_classes": classes,
            "modalities": {i: m for i, m in enumerate(modalities)},
            "intensityproperties": intensity,
            "size_reductions": OrderedDict((f"case_{i:03d}", np.float64(0.93)) for i in range(n_cases)),
        },
        list_of_npz_files=[f"/data/nnUNet_raw_cropped/Task123_X/case_{i:03d}.npz" for i in range(n_cases)],
        original_spacings=[np.array(spacing, dtype=np.float64) for _ in range(n_cases)],
        original_sizes=[np.array([200, 180, 180]) for _ in range(n_cases)],
        preprocessed_data_folder="/data/nnUNet_preprocessed/Task123_X",
        num_classes=num_classes,
        all_classes=classes,
        base_num_features=32,
        use_mask_for_norm=OrderedDict((i, bool(m)) for i, m in enumerate(use_mask_for_norm)),
        keep_only_largest_region=None,
        min_region_size_per_class=None,
        min_size_per_class=None,
        transpose_forward=list(transpose),
        transpose_backward=[list(transpose).index(a) for a in range(3)],
        data_identifier="nnUNetData_plans_v2.1",
        plans_per_stage=stage_plans,
        preprocessor_name="GenericPreprocessor",
        conv_per_stage=2,
    )


def _pickle(obj: Any, path: Path, numpy_spelling: Spelling) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # nnU-Net 1.7.1 writes with batchgenerators' write_pickle: pickle.dump, default protocol.
    if numpy_spelling == "numpy1":
        with _numpy1_spelling():
            path.write_bytes(pickle.dumps(obj))
    else:
        path.write_bytes(pickle.dumps(obj))


def write_v1_folder(
    root: Path,
    state_dict: dict[str, torch.Tensor],
    *,
    spacing: Sequence[float] = (3.0, 0.8, 0.8),
    patch_size: Sequence[int] = (64, 160, 160),
    pool_op_kernel_sizes: Sequence[Sequence[int]] = ((1, 2, 2), (2, 2, 2), (2, 2, 2), (2, 2, 2), (1, 2, 2)),
    num_classes: int = 2,
    modalities: Sequence[str] = ("CT",),
    normalization_schemes: Sequence[str] | None = None,
    use_mask_for_norm: Sequence[bool] | None = None,
    intensity_properties: Mapping[int, Mapping[str, float]] | None = None,
    transpose: Sequence[int] = (0, 1, 2),
    stages: int = 1,
    stage: int | None = None,
    trainer: str = "STUNetTrainer_base_ft",
    task: str = "Task123_X",
    network: str = "3d_fullres",
    folds: Sequence[str] = ("0",),
    checkpoint: Literal["final", "best"] = "final",
    labels: Mapping[str, str] | None = None,
    numpy_spelling: Spelling = "numpy2",
    plans_changes: Mapping[str, Any] | None = None,
    plans: Mapping[str, Any] | None = None,
    init: Sequence[Any] | None = None,
    module_prefix: bool = False,
) -> Path:
    """Write an nnU-Net v1 model folder of an STU-Net as run_finetuning.py leaves it; return it.

    ``num_classes`` excludes background (as v1 plans count). ``pool_op_kernel_sizes`` are v1's
    (no leading [1, 1, 1]). ``normalization_schemes`` per channel (default: CT for a channel named
    CT, else nonCT); ``intensity_properties`` default to ``CT_PROPERTIES`` (``sd`` for ``std``) for
    every channel. ``labels`` ({"0": "background", "1": ...}) are written as a v1 dataset.json.
    ``plans`` replaces the whole plans dict (both pickles); ``plans_changes`` are merged into it.
    """
    if normalization_schemes is None:
        normalization_schemes = ["CT" if m == "CT" else "nonCT" for m in modalities]
    if intensity_properties is None:
        props = {k: v for k, v in CT_PROPERTIES.items() if k != "std"} | {"sd": CT_PROPERTIES["std"]}
        intensity_properties = {c: props for c in range(len(modalities))}
    if plans is None:
        plans = v1_plans(
            spacing=spacing,
            patch_size=patch_size,
            pool_op_kernel_sizes=pool_op_kernel_sizes,
            num_classes=num_classes,
            modalities=modalities,
            normalization_schemes=normalization_schemes,
            use_mask_for_norm=use_mask_for_norm or [False] * len(modalities),
            intensity_properties=intensity_properties,
            transpose=transpose,
            stages=stages,
        )
    plans = OrderedDict(plans)
    _deep_update(plans, plans_changes or {})
    folder = root / "nnUNet" / network / task / f"{trainer}__nnUNetPlansv2.1"
    _pickle(plans, folder / "plans.pkl", numpy_spelling)
    if labels is not None:
        (folder / "dataset.json").write_text(json.dumps({"name": task, "labels": dict(labels)}, indent=4))
    name = {"final": "model_final_checkpoint.model", "best": "model_best.model"}[checkpoint]
    for fold in folds:
        ckpt = folder / f"fold_{fold}" / name
        write_checkpoint(ckpt, dict(state_dict), numpy_spelling=numpy_spelling, module_prefix=module_prefix)
        # nnUNetTrainer.save_checkpoint: info = OrderedDict(init, name, class, plans) beside the file.
        info = OrderedDict(
            init=tuple(init)
            if init is not None
            else (
                f"/data/nnUNet_preprocessed/{task}/nnUNetPlansv2.1_plans_3D.pkl",
                int(fold) if fold.isdigit() else fold,
                str(Path("/data/RESULTS_FOLDER/nnUNet") / network / task / f"{trainer}__nnUNetPlansv2.1"),
                f"/data/nnUNet_preprocessed/{task}",
                True,
                stages - 1 if stage is None else stage,
                True,
                False,
                True,
            ),
            name=trainer,
            **{"class": f"<class 'nnunet.training.network_training.STUNetTrainer.{trainer}'>"},
            plans=plans,
        )
        _pickle(info, Path(f"{ckpt}.pkl"), numpy_spelling)
    return folder


def published_v1_plans() -> OrderedDict:
    """The published STU-Net models' plan (facts from ``totalseg_plans.json``) as a v1 pickle holds it."""
    facts = json.loads((REFERENCE / "totalseg_plans.json").read_text())["effective"]
    plans = v1_plans(
        spacing=facts["target_spacing"],
        patch_size=facts["patch_size"],
        pool_op_kernel_sizes=facts["pool_op_kernel_sizes"],
        num_classes=facts["num_classes_in_plans_excluding_background"],
        modalities=[facts["modalities"]["0"]],
        normalization_schemes=[facts["normalization_schemes"]["0"]],
        use_mask_for_norm=[facts["use_mask_for_norm"]["0"]],
        intensity_properties=None,
        transpose=facts["transpose_forward"],
    )
    plans["dataset_properties"]["intensityproperties"] = facts["intensity_properties"]
    return plans


def published_arch(dims: Sequence[int] = TINY_DIMS, depths: Sequence[int] = (1,) * 6) -> Arch:
    """A STU-Net with the published plan's strides and 105 classes (tiny widths by default)."""
    facts = json.loads((REFERENCE / "totalseg_plans.json").read_text())["effective"]
    strides = tuple(tuple(p) for p in facts["pool_op_kernel_sizes"])
    return Arch(dims=tuple(dims), depths=tuple(depths), strides=strides, num_classes=105)  # type: ignore[arg-type]


def write_published_v1_folder(root: Path, state_dict: dict[str, torch.Tensor], size: str = "base") -> Path:
    """A v1 folder made from the published plan, with the published label names in a dataset.json.

    ``state_dict`` must be a 105-class STU-Net (``published_arch``, or a published size's).
    """
    order = json.loads((REFERENCE / "label_order.json").read_text())["order"]
    return write_v1_folder(
        root,
        state_dict,
        plans=published_v1_plans(),
        trainer=f"STUNetTrainer_{size}",
        task="Task101_TotalSegmentator",
        labels={str(i): name for i, name in enumerate(order)},
        # The .model.pkl of the published checkpoints: init values as the STU-Net repository ships them.
        init=("", 0, "", "", False, 0, True, False, True),
    )
