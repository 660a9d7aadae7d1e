"""Weights that decide like a trained model's, made here in a few minutes: a small STU-Net fitted
to TotalSegmentator's real segmentation of the real abdomen CT in ``tests/data``.

Random weights label a CT by small margins everywhere, so they overstate how much a change of
arithmetic (bfloat16, float16) moves the labels. A trained network is confident inside organs and
uncertain only at their borders. No trained STU-Net can be downloaded on the test machines, so
``train`` fits one: STU-Net's own architecture (``stuseg.model.network``, a narrow one), the CT
normalised as an nnU-Net v2 model folder of ``model_folders.write_v2_folder`` normalises it, and
TotalSegmentator's ``--fast`` masks of slices 82-111 (``totalseg_results/abdomen_ct_sm_masks``)
grouped into eight structures. A few hundred AdamW steps of cross-entropy plus soft Dice on random
crops of those 30 slices reach a training Dice of about 0.95 (liver 0.98).

This is a test fixture, not a trainer for users: ``stuseg finetune`` trains with nnU-Net v2.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from model_folders import CT_PROPERTIES, write_v2_folder

from stuseg.model.network import Arch, build_network

DATA = Path(__file__).parent / "data"
MASKS = DATA / "totalseg_results" / "abdomen_ct_sm_masks"
FIRST_SLICE = 82  # abdomen_ct_sm.nii.gz is slices 82-111 of abdomen_ct_3mm.nii.gz
# The structures, each made of TotalSegmentator masks (all non-empty on those slices).
STRUCTURES = {
    "liver": ("liver",),
    "spleen": ("spleen",),
    "kidney": ("kidney_left", "kidney_right"),
    "stomach": ("stomach",),
    "colon": ("colon",),
    "back_muscle": ("autochthon_left", "autochthon_right"),
    "vertebra": ("vertebrae_T11", "vertebrae_T12", "vertebrae_L1", "vertebrae_L2"),
    "rib": tuple(f"rib_{side}_{i}" for side in ("left", "right") for i in range(7, 13)),
}
SPACING = (3.0, 3.0, 3.0)
PATCH = (32, 64, 64)
STRIDES = ((1, 1, 1), (2, 2, 2), (2, 2, 2), (2, 2, 2), (2, 2, 2), (1, 1, 1))
ARCH = Arch((4, 8, 16, 32, 64, 64), (1,) * 6, STRIDES[1:], 1, len(STRUCTURES) + 1)


def labelled_slices() -> tuple[np.ndarray, np.ndarray]:
    """(CT in HU, labels 0..8) of the 30 labelled slices, as nibabel reads them (x, y, z)."""
    ct = np.asarray(nib.load(DATA / "abdomen_ct_3mm.nii.gz").dataobj, dtype=np.float32)
    ct = ct[:, :, FIRST_SLICE : FIRST_SLICE + 30]
    labels = np.zeros(ct.shape, np.int64)
    for value, parts in enumerate(STRUCTURES.values(), 1):
        for part in parts:
            labels[np.asarray(nib.load(MASKS / f"{part}.nii.gz").dataobj) > 0] = value
    return ct, labels


def normalised(hu: np.ndarray) -> np.ndarray:
    """CT values as the model folder's CTNormalization makes them (``CT_PROPERTIES``)."""
    lo, hi = CT_PROPERTIES["percentile_00_5"], CT_PROPERTIES["percentile_99_5"]
    return (np.clip(hu, lo, hi) - CT_PROPERTIES["mean"]) / CT_PROPERTIES["std"]


def train(iterations: int = 600, seed: int = 0) -> dict[str, torch.Tensor]:
    """The state dict of ``ARCH`` fitted to the labelled slices (about 3 minutes on 2 cores)."""
    ct, labels = labelled_slices()
    x = normalised(ct)
    # nnU-Net v2 (SimpleITK) hands the network the voxels as (z, y, x); one slice of air above
    # and below makes 32 slices, a multiple of the network's divisor.
    image = F.pad(torch.from_numpy(x.T.copy()), (0, 0, 0, 0, 1, 1), value=float(x.min()))
    target = F.pad(torch.from_numpy(labels.T.copy()), (0, 0, 0, 0, 1, 1))
    torch.manual_seed(seed)
    net = build_network(ARCH).train()
    optimiser = torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=1e-4)
    crops = torch.Generator().manual_seed(seed)
    for step in range(iterations):
        ys = torch.randint(0, image.shape[1] - PATCH[1] + 1, (2,), generator=crops).tolist()
        xs = torch.randint(0, image.shape[2] - PATCH[2] + 1, (2,), generator=crops).tolist()
        batch = torch.stack([image[:, y : y + PATCH[1], x : x + PATCH[2]] for y, x in zip(ys, xs)])[:, None]
        truth = torch.stack([target[:, y : y + PATCH[1], x : x + PATCH[2]] for y, x in zip(ys, xs)])
        for group in optimiser.param_groups:
            group["lr"] = 1e-2 * (1 - step / iterations) ** 0.9
        logits = net(batch)
        probs = logits.softmax(1)
        onehot = F.one_hot(truth, ARCH.num_classes).permute(0, 4, 1, 2, 3).float()
        overlap = 2 * (probs * onehot).sum((0, 2, 3, 4)) + 1
        dice = overlap / (probs.sum((0, 2, 3, 4)) + onehot.sum((0, 2, 3, 4)) + 1)
        loss = F.cross_entropy(logits, truth) + 1 - dice[1:].mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return {k: v.detach().clone() for k, v in net.eval().state_dict().items()}


def write_folder(root: Path, state_dict: dict[str, torch.Tensor]) -> Path:
    """An nnU-Net v2 model folder of the trained weights (3 mm, the structures' names)."""
    return write_v2_folder(
        root, state_dict, spacing=SPACING, patch_size=PATCH, strides=STRIDES, labels=tuple(STRUCTURES)
    )
