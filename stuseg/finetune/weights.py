"""Pretrained STU-Net weights into a network that is to be fine-tuned.

The rules are those of the STU-Net authors' fine-tuning loader (their code is not used here):
every tensor of the file except the segmentation heads (``seg_outputs.*``) must exist in the
network with the same shape and is copied as it is; the heads keep the network's new
initialisation (the class count usually differs); and a network with more input channels than
the pretrained one (CT + PET) gets the image-facing convolutions repeated over its channels.
Anything else that does not fit is refused with one line naming the keys.

This module does not import nnU-Net: it is used by the trainers in ``stuseg.finetune.trainer``
and testable without them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stuseg.errors import WeightsError
from stuseg.model.network import SIZES
from stuseg.weights.cache import sha256_file
from stuseg.weights.checkpoints import load_container, read_checkpoint, sniff, strip_wrappers

if TYPE_CHECKING:
    import torch

    from stuseg.model.network import STUNet

__all__ = ["HEADS", "IMAGE_CONVS", "WeightsReport", "load_pretrained", "read_network_tensors"]

# The segmentation heads: never taken from the file (new classes, new heads).
HEADS = "seg_outputs."
# The convolutions that read the image itself: their input dimension is the image's channels.
IMAGE_CONVS = ("conv_blocks_context.0.0.conv1.weight", "conv_blocks_context.0.0.conv3.weight")
# How many keys an error message names before "and N more".
_SHOWN = 3


@dataclass(frozen=True)
class WeightsReport:
    """What ``load_pretrained`` did, for the training log and the run record."""

    path: Path
    sha256: str  # of the file as read
    size: str  # what the file holds: small/base/large/huge, or a description of other widths
    keys_loaded: tuple[str, ...]  # copied from the file (includes the repeated ones)
    keys_reinitialised: tuple[str, ...]  # the heads, left as the network initialised them
    keys_repeated_over_channels: tuple[str, ...]  # 1-channel image convolutions repeated over channels


def read_network_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The network tensors of a checkpoint, read without running code from it.

    Args:
        path: a published nnU-Net v1 ``.model`` (``state_dict``), an nnU-Net v2 ``.pth``
            (``network_weights``), a bare ``torch.save`` state dict, or a ``.safetensors`` file
            (stuseg's cache).

    Returns:
        name -> tensor without the ``module.``/``_orig_mod.`` prefixes of wrappers.

    Raises:
        WeightsError: missing, not a checkpoint, damaged, holding Python objects a checkpoint does
            not, or holding no network weights.
    """
    import torch

    path = Path(path)
    if sniff(path) == "safetensors":
        tensors, _ = read_checkpoint(path)
        return strip_wrappers(tensors)
    obj: Any = load_container(path)
    state: Any = None
    if isinstance(obj, dict):
        # nnU-Net v2 names them network_weights, v1 state_dict; a bare state dict is the tensors.
        for key in ("network_weights", "state_dict"):
            if key in obj:
                state = obj[key]
                break
        else:
            state = obj
    if not (
        isinstance(state, Mapping)
        and state
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items())
    ):
        raise WeightsError(
            f"{path} holds no network weights: stuseg reads an nnU-Net v2 checkpoint's 'network_weights', "
            "a v1 .model's 'state_dict', a state dict or a .safetensors file"
        )
    return strip_wrappers(state)


def _stages(shapes: Mapping[str, Sequence[int]]) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """(widths, residual blocks) per encoder stage of an STU-Net state dict, or None if it has none."""
    dims: list[int] = []
    depths: list[int] = []
    while f"conv_blocks_context.{len(dims)}.0.conv1.weight" in shapes:
        stage = len(dims)
        shape = shapes[f"conv_blocks_context.{stage}.0.conv1.weight"]
        dims.append(int(shape[0]) if len(shape) else 0)
        depth = 1
        while f"conv_blocks_context.{stage}.{depth}.conv1.weight" in shapes:
            depth += 1
        depths.append(depth)
    return (tuple(dims), tuple(depths)) if dims else None


def _size_name(dims: tuple[int, ...], depths: tuple[int, ...]) -> str:
    for name, row in SIZES.items():
        if row.dims == dims and row.depths == depths:
            return name
    return f"custom (widths {list(dims)}, blocks {list(depths)})"


def _tensors(n: int) -> str:
    return f"{n} tensor" if n == 1 else f"{n} tensors"


def _keys(keys: Sequence[str]) -> str:
    shown = ", ".join(keys[:_SHOWN])
    return shown + (f" and {len(keys) - _SHOWN} more" if len(keys) > _SHOWN else "")


def _dtype(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def load_pretrained(network: STUNet, path: Path) -> WeightsReport:
    """Copy pretrained STU-Net weights into ``network``, all but its segmentation heads.

    Every tensor of the file except ``seg_outputs.*`` must exist in the network with the same
    shape and dtype, and every tensor of the network except its heads must be in the file; they
    are copied bit for bit. The heads keep the network's own initialisation. When the network
    takes C > 1 input channels and the file's image convolutions (``IMAGE_CONVS``) take one, these
    are repeated C times along their input dimension (the STU-Net authors' rule for CT + PET).

    Args:
        network: the STU-Net to fine-tune (its heads sized for the new classes).
        path: the weights file (see ``read_network_tensors``).

    Returns:
        What was loaded, repeated and left new, and the file's sha256.

    Raises:
        WeightsError: the file cannot be read; it holds another STU-Net size than the network
            (one line naming both), other input channels than 1 or the network's, or tensors that
            are missing, extra, or of another shape or dtype (the first few keys named, with what
            was expected).
    """
    path = Path(path)
    tensors = read_network_tensors(path)
    own = network.state_dict()
    net_size = _size_name(network.arch.dims, network.arch.depths)

    stages = _stages({k: v.shape for k, v in tensors.items()})
    if stages is None:
        raise WeightsError(
            f"{path} does not hold STU-Net weights: it has no tensor {IMAGE_CONVS[0]} "
            f"(its first tensor is {next(iter(tensors))})"
        )
    file_size = _size_name(*stages)
    if stages != (network.arch.dims, network.arch.depths):
        raise WeightsError(
            f"{path} holds STU-Net {file_size} weights but the network is STU-Net {net_size}; "
            f"give {net_size} weights or fine-tune the {file_size} size"
        )

    wanted = [k for k in own if not k.startswith(HEADS)]
    given = [k for k in tensors if not k.startswith(HEADS)]
    missing = [k for k in wanted if k not in tensors]
    if missing:
        raise WeightsError(
            f"{path} lacks {_tensors(len(missing))} of the STU-Net {net_size} network: {_keys(missing)}"
        )
    extra = [k for k in given if k not in own]
    if extra:
        raise WeightsError(
            f"{path} has {_tensors(len(extra))} that the STU-Net {net_size} network does not: {_keys(extra)}"
        )

    channels = network.arch.in_channels
    first = tensors[IMAGE_CONVS[0]].shape
    taken = int(first[1]) if len(first) == 5 else channels  # a malformed shape is reported below
    if taken not in (1, channels):
        raise WeightsError(
            f"{path} is for {taken} input channels and the network takes {channels}; "
            "weights for 1 channel are repeated over any number of channels, others must match"
        )
    state: dict[str, torch.Tensor] = {}
    repeated: list[str] = []
    wrong: list[str] = []
    for key in wanted:
        value, expected = tensors[key], own[key]
        if key in IMAGE_CONVS and taken == 1 < channels and value.shape[1:2] == (1,):
            value = value.repeat(1, channels, *([1] * (value.dim() - 2)))
            repeated.append(key)
        if value.shape != expected.shape:
            wrong.append(f"{key} {list(tensors[key].shape)} (expected {list(expected.shape)})")
        elif value.dtype != expected.dtype:
            wrong.append(f"{key} {_dtype(value)} (expected {_dtype(expected)})")
        else:
            state[key] = value
    if wrong:
        raise WeightsError(f"{path} has {_tensors(len(wrong))} unlike the network's: {_keys(wrong)}")

    heads = [k for k in own if k.startswith(HEADS)]
    # The heads' own tensors go back in unchanged, so that loading is strict: every key is set.
    network.load_state_dict({**state, **{k: own[k] for k in heads}}, strict=True)
    return WeightsReport(
        path=path,
        sha256=sha256_file(path),
        size=file_size,
        keys_loaded=tuple(state),
        keys_reinitialised=tuple(heads),
        keys_repeated_over_channels=tuple(repeated),
    )
