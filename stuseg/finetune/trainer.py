"""STU-Net trainers for nnU-Net v2 (2.7 and later: tested with 2.8.1), with pretrained weights.

``STUNetTrainer_small`` ... ``STUNetTrainer_huge`` carry the names of the STU-Net authors'
trainers, so that result folders (``STUNetTrainer_base__nnUNetPlans__3d_fullres``) look familiar;
the code is stuseg's own, written for the current nnU-Net API (the authors' trainers target
nnU-Net 2.2 and break on later releases). They extend ``nnUNetTrainer`` through its own
extension points (subclassing, ``build_network_architecture``) and change nothing in nnU-Net.

What they change from ``nnUNetTrainer``:

- the network is ``stuseg.model.network.STUNet`` of the class's ``size``, with the plan's strides
  (``pool_op_kernel_sizes`` without its first entry, cut or padded with [1, 1, 1] to 5) and
  3x3x3 kernels whatever the plan says, as the authors' trainers build it;
- deep supervision is STU-Net's flag, with one loss scale per STU-Net decoder level;
- the learning rate starts at 1e-3 (the authors' ``_ft`` trainers), and pretrained weights are
  loaded by ``initialize()`` from ``pretrained`` (``stuseg.finetune.weights.load_pretrained``).

Everything else (SGD, poly schedule, epochs, augmentation, loss) is nnU-Net's default; a driver
sets ``num_epochs``, ``num_iterations_per_epoch`` etc. on the instance before ``initialize()``.

This module imports nnU-Net at the top: it is only imported when fine-tuning.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import nn
from torch._dynamo import OptimizedModule
from torch.nn.parallel import DistributedDataParallel

from stuseg.errors import WeightsError
from stuseg.finetune.weights import WeightsReport, load_pretrained
from stuseg.model.network import SIZES, Arch, Stride, STUNet
from stuseg.model.sizes import canonical_size
from stuseg.weights.modelfolder import stunet_strides

__all__ = [
    "STUNetTrainer",
    "STUNetTrainer_base",
    "STUNetTrainer_huge",
    "STUNetTrainer_large",
    "STUNetTrainer_small",
    "plan_strides",
]


def plan_strides(configuration_manager: ConfigurationManager) -> tuple[Stride, ...]:
    """STU-Net's 5 downsampling strides for an nnU-Net v2 plan configuration.

    Args:
        configuration_manager: the configuration (e.g. ``3d_fullres``) of the target plan.

    Returns:
        ``pool_op_kernel_sizes[1:]`` (the first entry is the full-resolution stage's [1, 1, 1]),
        cut or padded with [1, 1, 1] to 5.

    Raises:
        InputError: an entry is not 3 positive integers (a 2D configuration: STU-Net is 3D).
    """
    return stunet_strides(list(configuration_manager.pool_op_kernel_sizes)[1:], "the plan's configuration")


class STUNetTrainer(nnUNetTrainer):
    """nnU-Net v2 trainer of STU-Net ``size`` (base here), fine-tuning from ``pretrained`` weights.

    stuseg's own code for the current nnU-Net API, named as the STU-Net authors' trainers. Use:
    build it as any ``nnUNetTrainer`` (``continue_training`` in the plans dict may be left out:
    it defaults to False), set ``pretrained`` to a weights file (a published ``.model``, an
    nnU-Net v2 ``.pth`` or a ``.safetensors``) and any of nnU-Net's attributes, then
    ``initialize()`` or ``run_training()``. ``weights_report`` then says what was loaded.

    Without ``pretrained`` the network keeps its random initialisation (``from_scratch``); such a
    run may want nnU-Net's from-scratch learning rate: ``trainer.initial_lr = SCRATCH_LR``.
    """

    size: ClassVar[str] = "base"
    # The STU-Net authors' _ft learning rate, and nnU-Net's default for training from scratch.
    FINETUNE_LR: ClassVar[float] = 1e-3
    SCRATCH_LR: ClassVar[float] = 1e-2

    def __init__(
        self,
        plans: dict,
        configuration: str,
        fold: int | str,
        dataset_json: dict,
        device: torch.device = torch.device("cuda"),
    ) -> None:
        # nnU-Net's __init__ pops this key, which only its own get_trainer_from_args adds.
        if "continue_training" not in plans:
            plans = {**plans, "continue_training": False}
        super().__init__(plans, configuration, fold, dataset_json, device)  # type: ignore[arg-type]
        self.initial_lr = self.FINETUNE_LR
        self._pretrained: Path | None = None
        self.weights_report: WeightsReport | None = None

    @property
    def pretrained(self) -> Path | None:
        """The weights file ``initialize()`` loads into the network (all but its heads), or None."""
        return self._pretrained

    @pretrained.setter
    def pretrained(self, path: Path | str | None) -> None:
        if self.was_initialized:
            raise WeightsError(
                "pretrained weights must be set before the trainer is initialised; "
                "the network is already built"
            )
        self._pretrained = Path(path) if path is not None else None

    @property
    def from_scratch(self) -> bool:
        """True when no pretrained weights are (or were) loaded: the network starts random."""
        return self._pretrained is None

    @classmethod
    def build_network_architecture(  # type: ignore[override]
        cls,
        plans_manager: PlansManager,
        configuration_manager: ConfigurationManager,
        num_input_channels: int,
        num_output_channels: int,
        enable_deep_supervision: bool = True,
    ) -> nn.Module:
        """STU-Net of the class's ``size`` for a plan (nnU-Net 2.7+ signature).

        A classmethod, so that each size's subclass builds its own network; nnU-Net calls it on
        the instance (``initialize``) and on the class (its predictor), with the same arguments.

        Args:
            plans_manager: the plans (unused: STU-Net's widths come from ``SIZES``).
            configuration_manager: the configuration, for its strides.
            num_input_channels: image channels.
            num_output_channels: segmentation heads (classes, or regions).
            enable_deep_supervision: whether ``forward`` returns every decoder level's logits.

        Returns:
            The network, freshly initialised.

        Raises:
            InputError: the configuration is not 3D.
        """
        row = SIZES[canonical_size(cls.size)]
        arch = Arch(
            dims=row.dims,
            depths=row.depths,
            strides=plan_strides(configuration_manager),
            in_channels=num_input_channels,
            num_classes=num_output_channels,
        )
        network = STUNet(arch)
        network.deep_supervision = enable_deep_supervision
        return network

    def stunet(self) -> STUNet:
        """The STU-Net itself, out of any DistributedDataParallel or ``torch.compile`` wrapper.

        Raises:
            RuntimeError: the trainer is not initialised (there is no network yet).
        """
        network = self.network
        if isinstance(network, DistributedDataParallel):
            network = network.module
        if isinstance(network, OptimizedModule):
            network = network._orig_mod
        if not isinstance(network, STUNet):
            raise RuntimeError(f"{type(self).__name__} has no STU-Net yet: call initialize() first")
        return network

    def set_deep_supervision_enabled(self, enabled: bool) -> None:
        """Switch the network between training outputs (every decoder level) and one output."""
        self.stunet().deep_supervision = enabled

    def _get_deep_supervision_scales(self) -> list[list[float]] | None:
        """One scale per output of ``STUNet.decoder_logits``, relative to the patch.

        Output i has the resolution of encoder stage i: the patch divided by the product of the
        first i strides. Computed from STU-Net's 5 strides, not from the plan's own stage count,
        which can be more (cut) or fewer (padded with [1, 1, 1]).
        """
        if not self.enable_deep_supervision:
            return None
        strides = np.array(plan_strides(self.configuration_manager), dtype=np.float64)
        factors = np.cumprod(np.vstack([np.ones((1, 3)), strides[:-1]]), axis=0)
        return [list(1.0 / f) for f in factors]

    def initialize(self) -> None:
        """nnU-Net's ``initialize``, then the pretrained weights into the network (if set).

        Raises:
            WeightsError: the weights cannot be read or do not fit the network (one line; the
                trainer is then initialised with a random network and should be discarded).
        """
        super().initialize()
        network = self.stunet()
        if self._pretrained is None:
            self.print_to_log_file(
                f"STU-Net {self.size}: no pretrained weights, the network starts from its random "
                "initialisation",
                also_print_to_console=False,
            )
            return
        report = load_pretrained(network, self._pretrained)
        self.weights_report = report
        repeated = (
            f"; {len(report.keys_repeated_over_channels)} image convolutions repeated over "
            f"{network.arch.in_channels} input channels"
            if report.keys_repeated_over_channels
            else ""
        )
        self.print_to_log_file(
            f"STU-Net {self.size}: loaded {len(report.keys_loaded)} tensors from {report.path} "
            f"(sha256 {report.sha256}); {len(report.keys_reinitialised)} head tensors newly "
            f"initialised for {network.arch.num_classes} outputs{repeated}",
            also_print_to_console=False,
        )

    def save_checkpoint(self, filename: str) -> None:
        """nnU-Net's checkpoint, written beside ``filename`` and renamed onto it: an interrupt (Ctrl-C)
        during the write leaves the previous checkpoint whole, so the run can always resume."""
        partial = f"{filename}.partial"
        super().save_checkpoint(partial)
        if os.path.isfile(partial):  # only rank 0 writes, and not with checkpointing disabled
            os.replace(partial, filename)


class STUNetTrainer_small(STUNetTrainer):
    """STU-Net small (widths 16 to 256, 1 block per stage, 14.6M parameters); stuseg's own code."""

    size: ClassVar[str] = "small"


class STUNetTrainer_base(STUNetTrainer):
    """STU-Net base (widths 32 to 512, 1 block per stage, 58M parameters); stuseg's own code."""

    size: ClassVar[str] = "base"


class STUNetTrainer_large(STUNetTrainer):
    """STU-Net large (widths 64 to 1024, 2 blocks per stage, 440M parameters); stuseg's own code."""

    size: ClassVar[str] = "large"


class STUNetTrainer_huge(STUNetTrainer):
    """STU-Net huge (widths 96 to 1536, 3 blocks per stage, 1.46B parameters); stuseg's own code."""

    size: ClassVar[str] = "huge"
