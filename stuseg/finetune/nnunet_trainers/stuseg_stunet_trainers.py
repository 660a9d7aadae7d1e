"""stuseg's STU-Net trainers, for nnU-Net's own commands (``nnUNet_extTrainer``).

nnU-Net 2.8 looks a trainer up by name in its own tree, then in each folder listed in the
environment variable ``nnUNet_extTrainer``: it imports every module of that folder as a top-level
module and takes the class of that name (it must subclass ``nnUNetTrainer``). This folder holds
only this module, which names stuseg's trainers, so that for example::

    export nnUNet_extTrainer="$(stuseg finetune trainer-path)"
    nnUNetv2_train 500 3d_fullres 0 -tr STUNetTrainer_small

finds them. ``stuseg finetune trainer-path`` prints the folder.
"""

from stuseg.finetune.trainer import (
    STUNetTrainer,
    STUNetTrainer_base,
    STUNetTrainer_huge,
    STUNetTrainer_large,
    STUNetTrainer_small,
)

__all__ = [
    "STUNetTrainer",
    "STUNetTrainer_base",
    "STUNetTrainer_huge",
    "STUNetTrainer_large",
    "STUNetTrainer_small",
]
