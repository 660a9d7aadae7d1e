"""nnU-Net v2's own predictor as an oracle: run it in-process, on the CPU, on a model folder.

A test utility, not a test file. nnU-Net (the ``finetune`` extra, 2.8.x) does everything that
decides a label: its image reader, its preprocessing (crop to non-zero, normalisation,
resampling), its sliding window (Gaussian, mirroring, float16 sums) and its export (resampling the
logits back, softmax, argmax, undoing the crop and the transpose). This module only builds the
network and hands it over.

How the predictor is driven: ``nnUNetPredictor.manual_initialization`` with a network built here,
the plans/configuration managers and dataset.json that nnU-Net reads itself, each fold's
``network_weights`` and the checkpoint's ``inference_allowed_mirroring_axes``. Never
``initialize_from_trained_model_folder``: that looks the trainer class up by name, which imports
every trainer module of nnU-Net, one of which imports timm and so torchvision, and the CPU test
environment's torchvision does not import (see constraints-cpu.txt).

The network is ``stuseg.model.network.STUNet``, its ``Arch`` derived here from the checkpoint's shapes
(independently of stuseg's own model-folder reader, which is what the oracle checks) and its
strides from the plans.

Threads: the predictor runs the network on ``min(8, torch.get_num_threads())`` threads
(``predict_logits_from_preprocessed_data``); the export would switch to 8 threads
(``default_num_processes``) unless told otherwise, so it is given the current count.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from batchgenerators.utilities.file_and_folder_operations import load_json
from nnunetv2.inference.data_iterators import PreprocessAdapterFromNpy
from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import nn

# nnU-Net's label is in doubt where its top two logits are closer than this share of the largest.
# The sliding window sums Gaussian-weighted tile logits into float16 (``predicted_logits``,
# dtype=torch.half): each addition rounds to within 2^-11 of the running sum, so a label whose two best
# logits differ by a few parts in a thousand may follow the rounding rather than the network.
DOUBT_SHARE = 0.002

# STU-Net's module names: the encoder stages and the full-resolution head.
_STAGE = "conv_blocks_context"
_HEAD = "seg_outputs.0.weight"


def read_folder(folder: Path) -> tuple[PlansManager, ConfigurationManager, dict, str]:
    """plans.json, the folder's configuration, dataset.json and the trainer's name, as nnU-Net reads them.

    The folder is named ``Trainer__Plans__configuration`` (nnU-Net's layout); returns
    ``(plans_manager, configuration_manager, dataset_json, trainer_name)``.
    """
    parts = folder.name.split("__")
    if len(parts) != 3:
        raise ValueError(f"{folder.name!r}: nnU-Net v2 names a model folder Trainer__Plans__configuration")
    trainer_name, _, configuration = parts
    plans_manager = PlansManager(load_json(str(folder / "plans.json")))
    dataset_json = load_json(str(folder / "dataset.json"))
    return plans_manager, plans_manager.get_configuration(configuration), dataset_json, trainer_name


def stunet_from_state_dict(
    state: Mapping[str, torch.Tensor], plan_strides: Sequence[Sequence[int]]
) -> nn.Module:
    """The STU-Net whose parameters have these shapes, with the plans' downsampling strides.

    ``plan_strides`` is the plans' per-stage list whose first entry (the input stage, always
    [1, 1, 1]) is not a downsampling; the rest is cut or padded with [1, 1, 1] to one stride per
    stage after the first.
    """
    from stuseg.model.network import Arch, STUNet

    stages = sorted({int(k.split(".")[1]) for k in state if k.startswith(f"{_STAGE}.")})
    dims = tuple(int(state[f"{_STAGE}.{s}.0.conv1.weight"].shape[0]) for s in stages)
    # Blocks per stage: the distinct block indices b of conv_blocks_context.s.b.conv1.weight.
    blocks = [k.split(".") for k in state if k.startswith(f"{_STAGE}.") and k.endswith(".conv1.weight")]
    depths = tuple(len({b for _, st, b, *_ in blocks if int(st) == s}) for s in stages)
    downsampling = [tuple(int(v) for v in s) for s in plan_strides[1:]][: len(stages) - 1]
    downsampling += [(1, 1, 1)] * (len(stages) - 1 - len(downsampling))
    arch = Arch(
        dims=dims,
        depths=depths,
        strides=tuple(downsampling),
        in_channels=int(state[f"{_STAGE}.0.0.conv1.weight"].shape[1]),
        num_classes=int(state[_HEAD].shape[0]),
    )
    return STUNet(arch).eval()


def make_predictor(
    folder: Path,
    network: nn.Module,
    parameters: list[dict],
    mirror_axes: Sequence[int] | None,
    *,
    mirror: bool = False,
    step_size: float = 0.5,
) -> nnUNetPredictor:
    """nnU-Net's predictor on the CPU for this folder's plans, with a network given here.

    ``parameters``: one state dict per fold (nnU-Net loads each into ``network`` and averages the
    folds' logits); ``mirror_axes``: the checkpoint's ``inference_allowed_mirroring_axes``.
    """
    plans_manager, configuration_manager, dataset_json, trainer_name = read_folder(folder)
    predictor = nnUNetPredictor(
        tile_step_size=step_size,
        use_gaussian=True,
        use_mirroring=mirror,
        perform_everything_on_device=False,
        device=torch.device("cpu"),
        verbose=False,
        allow_tqdm=False,
    )
    predictor.manual_initialization(
        network,
        plans_manager,
        configuration_manager,
        parameters,
        dataset_json,
        trainer_name,
        tuple(mirror_axes) if mirror_axes is not None else None,
    )
    return predictor


def folder_predictor(
    folder: Path,
    *,
    folds: Sequence[str] = ("0",),
    mirror: bool = False,
    checkpoint: str = "checkpoint_final.pth",
    step_size: float = 0.5,
) -> nnUNetPredictor:
    """nnU-Net's predictor for a model folder's folds, with the STU-Net their checkpoints describe."""
    # weights_only=False: nnU-Net's checkpoints hold plain Python objects besides tensors; in this
    # oracle they are files the tests wrote, never downloads.
    paths = [folder / f"fold_{fold}" / checkpoint for fold in folds]
    saved = [torch.load(path, map_location="cpu", weights_only=False) for path in paths]
    _, configuration_manager, _, _ = read_folder(folder)
    # nnU-Net's own reading of the strides: architecture.arch_kwargs.strides, which its
    # ConfigurationManager also fills from pool_op_kernel_sizes when it reads the older format.
    network = stunet_from_state_dict(saved[0]["network_weights"], configuration_manager.pool_op_kernel_sizes)
    return make_predictor(
        folder,
        network,
        [s["network_weights"] for s in saved],
        saved[0].get("inference_allowed_mirroring_axes"),
        mirror=mirror,
        step_size=step_size,
    )


def predict_case(predictor: nnUNetPredictor, images: Sequence[Path]) -> tuple[np.ndarray, np.ndarray]:
    """One case through an initialised predictor: (labels, doubt) on the input's SimpleITK grid.

    The steps of ``nnUNetPredictor.predict_single_npy_array``, taken one by one so that the
    float16 logits stay at hand for the doubt map and the export runs on the current thread count:
    nnU-Net's reader, ``PreprocessAdapterFromNpy`` (its preprocessing, no worker processes),
    ``predict_logits_from_preprocessed_data`` and
    ``convert_predicted_logits_to_segmentation_with_correct_shape(return_probabilities=True)``.

    The doubt map, computed from what that export returns. Its probabilities are a softmax of the
    logits resampled to the input grid, so their logarithms give the top-two gap (to float32
    rounding, ~1e-7): ``log p1 - log p2 = l1 - l2``. A softmax forgets the logits' level, so the
    scale comes from nnU-Net's float16 logits themselves: ``max_k |l_k|`` per voxel of the
    network's grid, taken to the input grid by the same export (``_to_input_grid``). A voxel is in doubt where
    ``l1 - l2 <= DOUBT_SHARE * scale``. With nnU-Net's default linear resampling of logits the
    resampled scale is at least ``|l1|`` there, so this is the 0.2 % rule or slightly wider. Voxels
    outside nnU-Net's crop box are background by construction (probability exactly 1) and never in
    doubt. Region-based models (sigmoid per region, no softmax) are refused: none of this holds.
    """
    if predictor.label_manager.has_regions:
        raise ValueError("the oracle reads softmax probabilities; this model is region-based (sigmoids)")
    plans_manager, configuration_manager = predictor.plans_manager, predictor.configuration_manager
    data, properties = plans_manager.image_reader_writer_class().read_images([str(p) for p in images])
    batch = next(
        PreprocessAdapterFromNpy(
            [data],
            None,
            [properties],
            None,
            plans_manager,
            predictor.dataset_json,
            configuration_manager,
            num_threads_in_multithreaded=1,
        )
    )
    logits = predictor.predict_logits_from_preprocessed_data(batch["data"]).cpu()
    labels, probabilities = convert_predicted_logits_to_segmentation_with_correct_shape(
        logits,
        plans_manager,
        configuration_manager,
        predictor.label_manager,
        batch["data_properties"],
        return_probabilities=True,
        num_threads_torch=torch.get_num_threads(),
    )
    top2 = np.sort(probabilities, axis=0)[-2:].astype(np.float64)
    with np.errstate(divide="ignore"):
        gap = np.log(top2[1]) - np.log(top2[0])
    scale = _to_input_grid(predictor, logits.float().abs().amax(0), batch["data_properties"])
    doubt = np.isfinite(gap) & (gap <= DOUBT_SHARE * scale)
    return np.asarray(labels), doubt


def _to_input_grid(predictor: nnUNetPredictor, values: torch.Tensor, properties: dict) -> np.ndarray:
    """A map on the network's grid taken to the input grid by nnU-Net's own export.

    The export resamples every channel alike (a linear map of each channel) and then applies a
    softmax; fed channel 0 = values / s and zeros elsewhere, it returns q with
    ``log q0 - log q1 = resampled(values) / s`` (to float32 rounding). s, the map's largest value,
    keeps the exponentials in range. Outside the crop box the result is +inf (q1 = 0 there).
    """
    s = float(values.max()) or 1.0
    channels = torch.zeros((predictor.label_manager.num_segmentation_heads, *values.shape))
    channels[0] = values / s
    _, q = convert_predicted_logits_to_segmentation_with_correct_shape(
        channels,
        predictor.plans_manager,
        predictor.configuration_manager,
        predictor.label_manager,
        properties,
        return_probabilities=True,
        num_threads_torch=torch.get_num_threads(),
    )
    with np.errstate(divide="ignore"):
        return s * (np.log(q[0].astype(np.float64)) - np.log(q[1].astype(np.float64)))


def nnunet_v2_predict(
    folder: Path,
    images: list[Path],
    *,
    folds: Sequence[str] = ("0",),
    mirror: bool = False,
    checkpoint: str = "checkpoint_final.pth",
    step_size: float = 0.5,
) -> tuple[np.ndarray, np.ndarray]:
    """nnU-Net's label map for one case (channels = images, in nnU-Net's order), on the input grid as
    SimpleITK reads it ((z, y, x) = the NIfTI array transposed), and a boolean 'doubt' map: voxels where
    nnU-Net's own label depends on its float16 tile sums (top two logits within 0.2% of the largest;
    see ``predict_case`` for exactly what is computed)."""
    predictor = folder_predictor(
        folder, folds=folds, mirror=mirror, checkpoint=checkpoint, step_size=step_size
    )
    return predict_case(predictor, images)
