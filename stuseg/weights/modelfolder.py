"""A fine-tuned nnU-Net (v1 or v2) model folder: read it safely, describe it, load its folds.

``read_model_folder`` turns a folder that nnU-Net training left behind into a ``TrainedModel``:
the ``Plan`` the pipeline needs (spacing, patch, normalisation per channel, transpose, mirroring),
the ``Arch`` of its STU-Net (read from the checkpoint's tensor shapes, not from a trainer name),
its labels and channel names, and its folds. Whatever stuseg cannot reproduce (2d, low-resolution
and cascade configurations, region-based labels, other readers, normalisations or resampling) is
refused with one line naming the folder and what is unsupported.

Nothing in a folder is executed. nnU-Net v1 plans (``plans.pkl``, ``*.model.pkl``) are Python
pickles: they are read by an unpickler that builds only plain data (dicts, lists, numpy arrays and
scalars) and refuses, without building it, any other object. Checkpoints are read with
``torch.load(weights_only=True)`` and numpy's plain types allowed (``stuseg.weights.checkpoints``).

``load_fold`` converts a fold's checkpoint once into ``<STUSEG_HOME>/models/cache/<sha256 of the
checkpoint>.safetensors`` and memory-maps it from then on.
"""

from __future__ import annotations

import io
import json
import math
import pickle
import warnings
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stuseg.errors import InputError, WeightsError
from stuseg.model.network import SIZES, Arch, Stride
from stuseg.model.plan import Normalization, Plan
from stuseg.weights.cache import stuseg_home
from stuseg.weights.checkpoints import (
    load_container,
    ndarray_reconstruct,
    read_checkpoint,
    shapes_of,
    strip_wrappers,
    write_safetensors,
)
from stuseg.weights.digests import remembered_sha256

if TYPE_CHECKING:
    import torch

__all__ = [
    "CHECKPOINTS",
    "Fold",
    "TrainedModel",
    "arch_from_shapes",
    "cache_fold",
    "load_fold",
    "load_fold_identified",
    "network_mismatch",
    "read_model_folder",
    "read_plain_pickle",
    "stunet_strides",
]

V1 = "nnU-Net v1"
V2 = "nnU-Net v2"

# --checkpoint final|best -> the file name in each fold folder.
CHECKPOINTS: dict[str, dict[str, str]] = {
    V2: {"final": "checkpoint_final.pth", "best": "checkpoint_best.pth"},
    V1: {"final": "model_final_checkpoint.model", "best": "model_best.model"},
}

# STU-Net has 6 resolution stages, so 5 downsamplings.
N_STRIDES = 5


@dataclass(frozen=True)
class Fold:
    """One trained fold of a model."""

    name: str  # "0".."4" or "all"
    checkpoint: Path  # the source file (an nnU-Net checkpoint, or a registered model's safetensors)
    # A registered model's safetensors must have this sha256 (recorded in its model.json);
    # None for a checkpoint read from an nnU-Net folder.
    sha256: str | None = None
    # The sha256 of the original nnU-Net checkpoint, recorded for a registered model's fold (a
    # folder's is computed when the fold is loaded): the weights' identity either way.
    source_sha256: str | None = None


@dataclass(frozen=True)
class TrainedModel:
    """What inference needs to know of a trained model, and where its weights are."""

    source: Path  # the folder (or registry entry) it was read from
    framework: str  # "nnU-Net v1" | "nnU-Net v2"
    plan: Plan
    arch: Arch  # from the checkpoint's tensor shapes and the plan's strides
    labels: dict[int, str]  # label value -> name as the dataset names it (background excluded)
    channel_names: tuple[str, ...]
    folds: tuple[Fold, ...]
    trainer: str  # trainer class name, for display

    @property
    def size(self) -> str:
        """small/base/large/huge when the widths and depths are those of a ``SIZES`` row, else custom."""
        for name, row in SIZES.items():
            if row.dims == self.arch.dims and row.depths == self.arch.depths:
                return name
        return "custom"


# --------------------------------------------------------------------------------------------
# Plain-data pickles (nnU-Net v1 plans)


def _latin1(text: str, encoding: str) -> bytes:
    """``_codecs.encode``, which protocol-2 pickles use to spell bytes (latin-1 only)."""
    if encoding != "latin1":
        raise pickle.UnpicklingError(f"refusing _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


def _frombuffer(buffer: Any, dtype: Any, shape: Any, order: str) -> Any:
    """numpy's ``_frombuffer`` (protocol-5 arrays), building a plain array from bytes."""
    import numpy as np

    return np.frombuffer(buffer, dtype=dtype).reshape(shape, order=order).copy()


def _plain_globals() -> dict[tuple[str, str], Any]:
    """The globals a pickle of plain data needs, by (module, name) as the pickle spells them."""
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    allowed: dict[tuple[str, str], Any] = {
        ("collections", "OrderedDict"): OrderedDict,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1,
    }
    for module in ("builtins", "__builtin__"):  # protocol 2 spells builtins the Python 2 way
        allowed.update({(module, "set"): set, (module, "frozenset"): frozenset, (module, "slice"): slice})
    for module in ("numpy.core", "numpy._core"):  # numpy 1 and numpy 2 spellings
        allowed[(f"{module}.multiarray", "_reconstruct")] = ndarray_reconstruct
        allowed[(f"{module}.multiarray", "scalar")] = core.multiarray.scalar
        allowed[(f"{module}.numeric", "_frombuffer")] = _frombuffer
    for name in ("float64", "float32", "float16", "int64", "int32", "int16", "int8", "uint8", "bool"):
        cls = type(np.dtype(name))
        allowed[("numpy.dtypes", cls.__name__)] = cls
    return allowed


class _Refused(Exception):
    def __init__(self, name: str) -> None:
        self.name = name


class _PlainUnpickler(pickle.Unpickler):
    """Builds dicts, lists, tuples, strings, numbers, numpy arrays and scalars; nothing else."""

    def __init__(self, data: bytes) -> None:
        super().__init__(io.BytesIO(data))
        self._allowed = _plain_globals()

    def find_class(self, module: str, name: str) -> Any:
        found = self._allowed.get((module, name))
        if found is None:
            raise _Refused(f"{module}.{name}")
        return found

    def persistent_load(self, pid: Any) -> Any:
        raise _Refused("a persistent reference")


def read_plain_pickle(path: Path) -> Any:
    """Unpickle an nnU-Net v1 plans file (``plans.pkl``, ``*.model.pkl``) without running code.

    Args:
        path: the file.

    Returns:
        The plain data it holds (dicts, OrderedDicts, lists, numpy arrays and scalars, ...).

    Raises:
        InputError: the file cannot be read, is damaged, or holds any other Python object
            (named; it is never built, so no code from the file runs).
    """
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise InputError(f"{path} cannot be read ({exc.strerror or exc})") from None
    try:
        return _PlainUnpickler(data).load()
    except _Refused as exc:
        raise InputError(
            f"{path} holds a Python object ({exc.name}) that nnU-Net plans do not contain; "
            "refusing to unpickle it"
        ) from None
    except Exception as exc:
        # Damage fails in arbitrary ways (UnpicklingError, EOFError, ValueError, ...); the
        # restricted unpickler builds nothing but plain data, so none of it ran code.
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(
            f"{path} is truncated or corrupted and cannot be read as nnU-Net plans ({detail})"
        ) from None


# --------------------------------------------------------------------------------------------
# Small readers


def _unsupported(folder: Path, what: str, hint: str) -> InputError:
    return InputError(f"{folder} uses {what}, which stuseg does not support ({hint})")


def _get(mapping: Any, key: Any, where: Path | str, what: str = "") -> Any:
    """``mapping[key]``, also under ``str(key)`` (JSON) or ``int(key)`` (pickles); one line if absent."""
    if isinstance(mapping, Mapping):
        for k in (key, str(key), int(key) if isinstance(key, str) and key.isdigit() else None):
            if k is not None and k in mapping:
                return mapping[k]
    inside = f" in {what}" if what else ""
    raise InputError(f"{where} is not an nnU-Net plan stuseg can read: it has no {key!r}{inside}")


def _floats3(value: Any, where: Path, what: str) -> tuple[float, float, float]:
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        out = ()
    if len(out) != 3 or not all(math.isfinite(v) and v > 0 for v in out):
        raise InputError(f"{where}: {what} {_show(value)} is not three positive numbers (a 3D plan)")
    return out[0], out[1], out[2]


def _ints3(value: Any, where: Path | str, what: str) -> tuple[int, int, int]:
    try:
        out = tuple(int(v) for v in value)
    except (TypeError, ValueError):
        out = ()
    if len(out) != 3 or not all(v > 0 for v in out):
        raise InputError(f"{where}: {what} {_show(value)} is not three positive integers (a 3D plan)")
    return out[0], out[1], out[2]


def _show(value: Any) -> str:
    """A short rendering of plan values (numpy arrays as lists)."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    text = json.dumps(value, default=str) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def stunet_strides(pool_ops: Any, where: Path | str) -> tuple[Stride, ...]:
    """STU-Net's 5 strides from a plan's downsampling list (already without a leading [1, 1, 1]).

    STU-Net always has 6 stages: a plan with fewer poolings is padded with [1, 1, 1] (no
    downsampling), one with more is cut, as the STU-Net trainers do. ``where`` (the plan's file,
    or words for it) starts the message of an ``InputError`` when an entry is not 3 positive
    integers, e.g. a 2D plan.
    """
    if not isinstance(pool_ops, Sequence) and not hasattr(pool_ops, "tolist"):
        raise InputError(f"{where}: the pooling/strides entry {_show(pool_ops)} is not a list")
    strides = [_ints3(p, where, "stride") for p in list(pool_ops)[:N_STRIDES]]
    strides += [(1, 1, 1)] * (N_STRIDES - len(strides))
    return tuple(strides)


def _fold_order(name: str) -> tuple[int, int, str]:
    return (0, int(name), "") if name.isdigit() else (1, 0, name)


def _pick_folds(folder: Path, filename: str, folds: Sequence[str] | None) -> tuple[Fold, ...]:
    present = {
        p.name.removeprefix("fold_"): p for p in folder.glob("fold_*") if p.is_dir() and p.name != "fold_"
    }
    with_ckpt = sorted((n for n, p in present.items() if (p / filename).is_file()), key=_fold_order)

    def there() -> str:
        if not present:
            return "it has no fold_* folders"
        parts = []
        for name in sorted(present, key=_fold_order):
            files = sorted(p.name for p in present[name].iterdir() if p.suffix in (".pth", ".model"))
            parts.append(f"fold_{name} ({', '.join(files) if files else 'no checkpoint'})")
        return "there: " + "; ".join(parts)

    if folds is None:
        if not with_ckpt:
            raise InputError(f"{folder} has no fold with {filename}; {there()}")
        chosen = with_ckpt
    else:
        chosen = list(dict.fromkeys(str(f).strip().removeprefix("fold_") for f in folds))
        if not chosen:
            raise InputError("no folds given; name at least one fold (0-4 or all)")
        for name in chosen:
            if name not in with_ckpt:
                raise InputError(f"{folder} has no fold {name} with {filename}; {there()}")
    return tuple(Fold(name, present[name] / filename) for name in chosen)


def _checkpoint_name(framework: str, checkpoint: str) -> str:
    names = CHECKPOINTS[framework]
    if checkpoint not in names:
        raise InputError(f"unknown checkpoint {checkpoint!r}; choose {' or '.join(names)}")
    return names[checkpoint]


# --------------------------------------------------------------------------------------------
# The network: from tensor shapes


def arch_from_shapes(shapes: Mapping[str, tuple[int, ...]], strides: Sequence[Stride], where: Path) -> Arch:
    """The STU-Net a state dict is, from its tensor shapes (widths, blocks, channels, classes).

    Args:
        shapes: name -> shape, without wrapper prefixes.
        strides: the plan's 5 downsampling strides (they change no shape).
        where: the checkpoint, for messages.

    Returns:
        The ``Arch`` whose ``STUNet`` has exactly these keys and shapes.

    Raises:
        InputError: the state dict is not an STU-Net's (one line naming a key).
    """
    first = "conv_blocks_context.0.0.conv1.weight"
    if first not in shapes:
        example = next(iter(shapes), "nothing")
        raise InputError(
            f"the network in {where} is not a STU-Net: it has no tensor {first} (its first tensor is "
            f"{example}); stuseg runs models trained with an STU-Net trainer"
        )
    dims, depths = [], []
    while f"conv_blocks_context.{len(dims)}.0.conv1.weight" in shapes:
        s = len(dims)
        dims.append(shapes[f"conv_blocks_context.{s}.0.conv1.weight"][0])
        depth = 1
        while f"conv_blocks_context.{s}.{depth}.conv1.weight" in shapes:
            depth += 1
        depths.append(depth)
    if len(dims) != N_STRIDES + 1:
        raise InputError(
            f"the network in {where} is not a STU-Net: it has {len(dims)} resolution stages, STU-Net has "
            f"{N_STRIDES + 1}"
        )
    head = shapes.get("seg_outputs.0.weight")
    if head is None:
        raise InputError(f"the network in {where} is not a STU-Net: it has no tensor seg_outputs.0.weight")
    arch = Arch(
        dims=tuple(dims),
        depths=tuple(depths),
        strides=tuple(strides),
        in_channels=shapes[first][1],
        num_classes=head[0],
    )
    problem = network_mismatch(shapes, arch)
    if problem:
        raise InputError(f"the network in {where} is not a STU-Net: {problem}")
    return arch


def _expected(arch: Arch) -> dict[str, tuple[int, ...]]:
    from stuseg.model.network import build_network

    return shapes_of(build_network(arch, device="meta").state_dict())


def network_mismatch(shapes: Mapping[str, tuple[int, ...]], arch: Arch) -> str | None:
    """How a state dict differs from ``STUNet(arch)``'s keys and shapes, or None if it does not.

    Args:
        shapes: name -> shape.
        arch: the network it must be.

    Returns:
        One clause naming the first difference (a missing, unexpected or differently shaped tensor).
    """
    expected = _expected(arch)
    for key, shape in expected.items():
        if key not in shapes:
            return f"it has no tensor {key}"
        if tuple(shapes[key]) != shape:
            return f"tensor {key} has shape {list(shapes[key])}, expected {list(shape)}"
    extra = next((k for k in shapes if k not in expected), None)
    return f"it has a tensor {extra} that STU-Net does not" if extra else None


def _agree(folder: Path, arch: Arch, plan: Plan, channel_names: Sequence[str]) -> None:
    if arch.in_channels != plan.in_channels:
        raise InputError(
            f"{folder}: the network takes {arch.in_channels} input channel(s) but the plan has "
            f"{plan.in_channels} ({', '.join(channel_names)})"
        )
    if arch.num_classes != plan.num_classes:
        raise InputError(
            f"{folder}: the network has {arch.num_classes} output classes but the dataset has "
            f"{plan.num_classes} labels (background included)"
        )


# --------------------------------------------------------------------------------------------
# nnU-Net v2


_V2_NORMS = {
    "CTNormalization": "ct",
    "ZScoreNormalization": "zscore",
    "NoNormalization": "none",
    "RescaleTo01Normalization": "rescale_0_1",
    "RGBTo01Normalization": "rgb_0_1",
}
# image_reader_writer -> Plan.reorient
_V2_READERS = {"SimpleITKIO": False, "NibabelIO": False, "NibabelIOWithReorient": True}
# nnU-Net v2's default resampling (the only one stuseg implements): name, order, order_z.
_V2_RESAMPLING = {
    "resampling_fn_data": ("resample_data_or_seg_to_shape", 3, 0),
    "resampling_fn_probabilities": ("resample_data_or_seg_to_shape", 1, 0),
}


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(
            f"{path} is missing; an nnU-Net v2 model folder has plans.json and dataset.json"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path} cannot be read as JSON ({exc})") from None


def _configuration(plans: Mapping[str, Any], name: str, where: Path) -> dict[str, Any]:
    """The configuration ``name`` with ``inherits_from`` resolved (the parent's keys, overridden)."""
    configurations = _get(plans, "configurations", where)
    chain: list[str] = []
    merged: dict[str, Any] = {}
    current: str | None = name
    while current is not None:
        if current in chain:
            raise InputError(f"{where}: configuration {name!r} inherits from itself ({' -> '.join(chain)})")
        if current not in configurations:
            known = ", ".join(configurations)
            raise InputError(f"{where} has no configuration {current!r} (it has {known})")
        chain.append(current)
        entry = configurations[current]
        merged = {**entry, **merged}
        current = entry.get("inherits_from")
    merged.pop("inherits_from", None)
    return merged


def _v2_checkpoint(path: Path) -> dict[str, Any]:
    import torch

    obj = load_container(path)
    weights = obj.get("network_weights") if isinstance(obj, dict) else None
    if not isinstance(weights, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in weights.items()
    ):
        raise WeightsError(f"{path} is not an nnU-Net v2 checkpoint: it has no 'network_weights' tensors")
    return obj


def _v2_labels(dataset: Mapping[str, Any], folder: Path) -> tuple[dict[int, str], int]:
    raw = _get(dataset, "labels", folder / "dataset.json")
    if "regions_class_order" in dataset:
        raise _unsupported(
            folder, "region-based labels (regions_class_order)", "stuseg runs one label per voxel"
        )
    labels: dict[int, str] = {}
    for name, value in raw.items():
        if isinstance(value, (list, tuple)):
            raise _unsupported(
                folder,
                f"region-based labels (label {name!r} is {_show(value)})",
                "stuseg runs one label per voxel",
            )
        if name == "ignore":
            continue  # not an output channel
        if not isinstance(value, int) or isinstance(value, bool):
            raise InputError(
                f"{folder / 'dataset.json'}: label {name!r} has value {_show(value)}, not an integer"
            )
        labels[value] = name
    if sorted(labels) != list(range(len(labels))) or 0 not in labels:
        raise InputError(
            f"{folder / 'dataset.json'}: label values {sorted(labels)} are not 0, 1, 2, ... without gaps"
        )
    num_classes = len(labels)
    labels.pop(0)
    return dict(sorted(labels.items())), num_classes


def _channel_names(dataset: Mapping[str, Any], where: Path) -> tuple[str, ...]:
    raw = dataset.get("channel_names", dataset.get("modality"))
    if not isinstance(raw, Mapping) or not raw:
        raise InputError(f"{where} names no input channels (channel_names or modality)")
    return tuple(str(raw[k]) for k in sorted(raw, key=lambda k: int(k)))


def _v2_normalization(
    configuration: Mapping[str, Any], plans: Mapping[str, Any], c: int, folder: Path
) -> Normalization:
    where = folder / "plans.json"
    scheme_name = _get(configuration, "normalization_schemes", where)[c]
    scheme = _V2_NORMS.get(scheme_name)
    if scheme is None:
        raise _unsupported(
            folder,
            f"normalisation {scheme_name} for channel {c}",
            f"stuseg implements {', '.join(_V2_NORMS)}",
        )
    use_mask = bool(_get(configuration, "use_mask_for_norm", where)[c])
    if scheme == "zscore":
        return Normalization("zscore", use_mask=use_mask)
    if scheme != "ct":
        return Normalization(scheme)
    props = _get(_get(plans, "foreground_intensity_properties_per_channel", where), str(c), where)
    return Normalization(
        "ct",
        lower=float(_get(props, "percentile_00_5", where)),
        upper=float(_get(props, "percentile_99_5", where)),
        mean=float(_get(props, "mean", where)),
        std=float(_get(props, "std", where)),
    )


def _v2_check_resampling(configuration: Mapping[str, Any], folder: Path) -> None:
    where = folder / "plans.json"
    hint = (
        "stuseg resamples as nnU-Net's default: resample_data_or_seg_to_shape, order 3 (order_z 0) for "
        "images and 1 (order_z 0) for probabilities, force_separate_z null"
    )
    for key, (function, order, order_z) in _V2_RESAMPLING.items():
        name = _get(configuration, key, where)
        if name != function:
            raise _unsupported(folder, f"{key} {name}", hint)
        kwargs = dict(_get(configuration, f"{key}_kwargs", where))
        kwargs.pop("is_seg", None)
        want = {"order": order, "order_z": order_z, "force_separate_z": None}
        if kwargs != want:
            raise _unsupported(folder, f"{key}_kwargs {_show(kwargs)}", hint)


def _read_v2(folder: Path, folds: Sequence[str] | None, checkpoint: str) -> TrainedModel:
    plans = _json(folder / "plans.json")
    dataset = _json(folder / "dataset.json")
    where = folder / "plans.json"
    chosen = _pick_folds(folder, _checkpoint_name(V2, checkpoint), folds)
    first = _v2_checkpoint(chosen[0].checkpoint)
    init_args = first.get("init_args") if isinstance(first.get("init_args"), Mapping) else {}

    parts = folder.name.split("__")
    name = parts[2] if len(parts) == 3 and parts[2] else init_args.get("configuration")
    if not isinstance(name, str):
        raise InputError(
            f"{folder} names no configuration: the folder is not named TRAINER__PLANS__CONFIGURATION and "
            f"{chosen[0].checkpoint.name} has no init_args['configuration']"
        )
    configuration = _configuration(plans, name, where)
    if configuration.get("previous_stage"):
        raise _unsupported(
            folder,
            f"the cascade configuration {name} (previous_stage {configuration['previous_stage']})",
            "stuseg runs one 3d full-resolution network",
        )
    patch = _get(configuration, "patch_size", where, name)
    if name == "2d" or len(patch) != 3:
        raise _unsupported(folder, f"the 2d configuration {name}", "stuseg runs 3d full-resolution networks")
    if name == "3d_lowres" or configuration.get("next_stage"):
        raise _unsupported(
            folder, f"the low-resolution configuration {name}", "stuseg runs 3d full-resolution networks"
        )
    reader = _get(plans, "image_reader_writer", where)
    if reader not in _V2_READERS:
        raise _unsupported(
            folder, f"image reader {reader}", f"stuseg reads images as {', '.join(_V2_READERS)}"
        )
    preprocessor = configuration.get("preprocessor_name", "DefaultPreprocessor")
    if preprocessor != "DefaultPreprocessor":
        raise _unsupported(
            folder, f"preprocessor {preprocessor}", "stuseg preprocesses as DefaultPreprocessor"
        )
    _v2_check_resampling(configuration, folder)

    architecture = configuration.get("architecture")
    if isinstance(architecture, Mapping) and "arch_kwargs" in architecture:
        plan_strides = _get(architecture["arch_kwargs"], "strides", where, f"{name} architecture")
    else:  # the plans format up to nnU-Net 2.2 (and the STU-Net authors' fork)
        plan_strides = _get(configuration, "pool_op_kernel_sizes", where, name)
    # v2 lists the first stage's stride ([1, 1, 1]) too; STU-Net's strides are the downsamplings.
    strides = stunet_strides(list(plan_strides)[1:], where)

    labels, num_classes = _v2_labels(dataset, folder)
    channel_names = _channel_names(dataset, folder / "dataset.json")
    mirror = first.get("inference_allowed_mirroring_axes")
    plan = Plan(
        target_spacing=_floats3(_get(configuration, "spacing", where, name), where, "spacing"),
        patch_size=_ints3(patch, where, "patch_size"),
        num_classes=num_classes,
        channels=tuple(_v2_normalization(configuration, plans, c, folder) for c in range(len(channel_names))),
        framework="v2",
        reorient=_V2_READERS[reader],
        transpose=_ints_perm(_get(plans, "transpose_forward", where), where),
        # nnU-Net's predictor mirrors nothing when the checkpoint says None or lacks the entry.
        mirror_axes=tuple(int(a) for a in mirror) if mirror is not None else (),
    )
    arch = _fold_arch(
        chosen, strides, lambda p: _v2_checkpoint(p)["network_weights"], first["network_weights"]
    )
    _agree(folder, arch, plan, channel_names)
    trainer = first.get("trainer_name") or (parts[0] if len(parts) == 3 else "unknown")
    return TrainedModel(folder, V2, plan, arch, labels, channel_names, chosen, str(trainer))


def _ints_perm(value: Any, where: Path) -> tuple[int, int, int]:
    out = tuple(int(v) for v in value)
    if sorted(out) != [0, 1, 2]:
        raise InputError(f"{where}: transpose_forward {_show(value)} is not a permutation of 0, 1, 2")
    return out[0], out[1], out[2]


def _fold_arch(
    folds: Sequence[Fold], strides: Sequence[Stride], read: Any, first: Mapping[str, torch.Tensor]
) -> Arch:
    """The arch of the first fold's network; every other fold must be the same network."""
    arch = arch_from_shapes(shapes_of(strip_wrappers(first)), strides, folds[0].checkpoint)
    for fold in folds[1:]:
        problem = network_mismatch(shapes_of(strip_wrappers(read(fold.checkpoint))), arch)
        if problem:
            raise InputError(
                f"fold {fold.name} ({fold.checkpoint}) is another network than fold {folds[0].name}: "
                f"{problem}"
            )
    return arch


# --------------------------------------------------------------------------------------------
# nnU-Net v1


_V1_NORMS = {"nonCT": "zscore", "CT": "ct", "noNorm": "none"}
_V1_EXPORT_DEFAULTS = {"force_separate_z": None, "interpolation_order": 1, "interpolation_order_z": 0}
_NOT_FULLRES = ("2d", "3d_lowres", "3d_cascade_fullres")


def _v1_refuse_configuration(folder: Path, info: Mapping[str, Any], trainer: str) -> None:
    init = info.get("init") or ()
    output_folder = str(init[2]) if len(init) > 2 and init[2] else ""
    for where in (folder, Path(output_folder)):
        found = next((p for p in where.parts if p in _NOT_FULLRES), None)
        if found:
            raise _unsupported(folder, f"the {found} configuration", "stuseg runs 3d_fullres networks")
    if "Cascade" in trainer:
        raise _unsupported(folder, f"the cascade trainer {trainer}", "stuseg runs 3d_fullres networks")


def _v1_stage(info: Mapping[str, Any], plans: Mapping[str, Any], folder: Path) -> Mapping[str, Any]:
    """The stage plan a checkpoint was trained with: its own plans at ``init[5]``, else plans.pkl's last."""
    own = info.get("plans")
    init = info.get("init") or ()
    if isinstance(own, Mapping) and isinstance(own.get("plans_per_stage"), Mapping) and len(init) > 5:
        stages, stage = own["plans_per_stage"], int(init[5])
    else:
        stages = _get(plans, "plans_per_stage", folder / "plans.pkl")
        stage = max(int(k) for k in stages)
    if stage < len(stages) - 1:
        raise _unsupported(
            folder,
            f"the 3d_lowres configuration (stage {stage} of {len(stages)})",
            "stuseg runs 3d_fullres networks",
        )
    return _get(stages, stage, folder, "plans_per_stage")


def _v1_labels(folder: Path, num_classes: int) -> dict[int, str]:
    path = folder / "dataset.json"
    if not path.is_file():
        return {n: f"class_{n}" for n in range(1, num_classes)}
    raw = _get(_json(path), "labels", path)
    labels: dict[int, str] = {}
    for key, value in raw.items():
        # v1 writes {"0": "background", "1": "liver"}; v2 {"background": 0, "liver": 1}.
        number, name = (value, key) if isinstance(value, int) else (key, value)
        try:
            labels[int(number)] = str(name)
        except (TypeError, ValueError):
            raise InputError(f"{path}: label {key!r}: {_show(value)} is not a label value and name") from None
    if sorted(labels) != list(range(num_classes)):
        raise InputError(
            f"{path} has labels {sorted(labels)} but the plans have {num_classes} classes "
            "(background included)"
        )
    labels.pop(0)
    return labels


def _read_v1(folder: Path, folds: Sequence[str] | None, checkpoint: str) -> TrainedModel:
    plans = read_plain_pickle(folder / "plans.pkl")
    if not isinstance(plans, Mapping):
        raise InputError(f"{folder / 'plans.pkl'} does not hold nnU-Net plans (a dict)")
    chosen = _pick_folds(folder, _checkpoint_name(V1, checkpoint), folds)
    for fold in chosen:
        if not Path(f"{fold.checkpoint}.pkl").is_file():
            raise InputError(
                f"{fold.checkpoint}.pkl is missing: nnU-Net v1 keeps a checkpoint's plans beside it"
            )
    info = read_plain_pickle(Path(f"{chosen[0].checkpoint}.pkl"))
    if not isinstance(info, Mapping):
        raise InputError(f"{chosen[0].checkpoint}.pkl does not hold an nnU-Net v1 checkpoint record (a dict)")
    trainer = str(info.get("name") or "unknown")
    _v1_refuse_configuration(folder, info, trainer)
    # The checkpoint's own copy of the plans is what it was trained with; plans.pkl fills gaps.
    own = info["plans"] if isinstance(info.get("plans"), Mapping) else plans

    def pick(key: str) -> Any:
        return own[key] if key in own else _get(plans, key, folder / "plans.pkl")

    stage = _v1_stage(info, plans, folder)
    where = folder / "plans.pkl"
    patch = _get(stage, "patch_size", where, "the stage plan")
    if len(patch) != 3:
        raise _unsupported(folder, "the 2d configuration", "stuseg runs 3d_fullres networks")
    export = pick("segmentation_export_params") if "segmentation_export_params" in {*own, *plans} else None
    if export is not None and dict(export) != _V1_EXPORT_DEFAULTS:
        raise _unsupported(
            folder,
            f"segmentation_export_params {_show(dict(export))}",
            "stuseg exports as nnU-Net v1's default: force_separate_z None, interpolation orders 1 and 0",
        )
    preprocessor = own.get("preprocessor_name", plans.get("preprocessor_name", "GenericPreprocessor"))
    if preprocessor != "GenericPreprocessor":
        raise _unsupported(
            folder, f"preprocessor {preprocessor}", "stuseg preprocesses as GenericPreprocessor"
        )

    schemes = pick("normalization_schemes")
    use_mask = pick("use_mask_for_norm")
    properties = None
    channels = []
    for c in sorted(int(k) for k in schemes):
        name = _get(schemes, c, where, "normalization_schemes")
        scheme = _V1_NORMS.get(name)
        if scheme is None:
            raise _unsupported(
                folder,
                f"normalization scheme {name!r} for channel {c}",
                "stuseg implements nonCT, CT and noNorm",
            )
        if scheme == "zscore" and _get(use_mask, c, where, "use_mask_for_norm"):
            raise _unsupported(
                folder,
                f"use_mask_for_norm for channel {c}",
                "nnU-Net v1 normalises after resampling, inside a resampled mask; "
                "stuseg does not implement that",
            )
        if scheme == "ct":
            if properties is None:
                dataset_properties = own.get("dataset_properties") or {}
                properties = dataset_properties.get("intensityproperties") or _get(
                    _get(plans, "dataset_properties", where), "intensityproperties", where
                )
            props = _get(properties, c, where, "intensityproperties")
            channels.append(
                Normalization(
                    "ct",
                    lower=float(_get(props, "percentile_00_5", where)),
                    upper=float(_get(props, "percentile_99_5", where)),
                    mean=float(_get(props, "mean", where)),
                    std=float(_get(props, "sd", where)),
                )
            )
        else:
            channels.append(Normalization(scheme))
    num_classes = int(pick("num_classes")) + 1
    modalities = own.get("modalities") or plans.get("modalities") or {}
    channel_names = tuple(str(modalities.get(c, f"channel_{c}")) for c in range(len(channels)))
    plan = Plan(
        target_spacing=_floats3(
            _get(stage, "current_spacing", where, "the stage plan"), where, "current_spacing"
        ),
        patch_size=_ints3(patch, where, "patch_size"),
        num_classes=num_classes,
        channels=tuple(channels),
        framework="v1",
        # stuseg's published-model path reorients to RAS: a v1 folder keeps that path, so that a
        # folder made from the published plan gives exactly the published models' results.
        reorient=True,
        transpose=_ints_perm(pick("transpose_forward"), where),
        mirror_axes=(0, 1, 2),  # nnU-Net v1 mirrors 3D networks on all axes
    )
    # v1 pool_op_kernel_sizes list only the downsamplings (no leading [1, 1, 1]).
    strides = stunet_strides(_get(stage, "pool_op_kernel_sizes", where, "the stage plan"), where)
    first, _ = read_checkpoint(chosen[0].checkpoint)
    arch = _fold_arch(chosen, strides, lambda p: read_checkpoint(p)[0], first)
    _agree(folder, arch, plan, channel_names)
    labels = _v1_labels(folder, num_classes)
    return TrainedModel(folder, V1, plan, arch, labels, channel_names, chosen, trainer)


# --------------------------------------------------------------------------------------------
# The public face


def read_model_folder(
    path: Path, *, folds: Sequence[str] | None = None, checkpoint: str = "final"
) -> TrainedModel:
    """Read an nnU-Net v1 or v2 model folder of an STU-Net: plan, network, labels, folds.

    Args:
        path: the folder holding ``plans.json`` + ``dataset.json`` (v2) or ``plans.pkl`` (v1) and
            ``fold_*`` folders.
        folds: the folds to use ("0".."4", "all"); default every fold that has the checkpoint.
        checkpoint: ``final`` or ``best``.

    Returns:
        The model. Its checkpoints were read (safely) to learn the network; ``load_fold`` loads them.

    Raises:
        InputError: not a model folder, a fold or checkpoint missing (the message says what is
            there), a configuration, label scheme, reader, normalisation or resampling stuseg does
            not support, a network that is not an STU-Net or disagrees with the plan, or a pickle
            holding more than plain data.
        WeightsError: a checkpoint is damaged or holds objects a checkpoint does not contain.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise InputError(
            f"model folder {folder} {'is not a folder' if folder.exists() else 'does not exist'}"
        )
    if (folder / "plans.json").is_file():
        return _read_v2(folder, folds, checkpoint)
    if (folder / "plans.pkl").is_file():
        return _read_v1(folder, folds, checkpoint)
    raise InputError(
        f"{folder} is not an nnU-Net model folder: it has neither plans.json (nnU-Net v2) nor plans.pkl "
        "(nnU-Net v1); give the folder that holds the fold_* folders"
    )


def _source_state(model: TrainedModel, fold: Fold) -> dict[str, torch.Tensor]:
    """The fold's network parameters from its nnU-Net checkpoint, checked against the model's arch."""
    if model.framework == V2:
        state = strip_wrappers(_v2_checkpoint(fold.checkpoint)["network_weights"])
    else:
        state, _ = read_checkpoint(fold.checkpoint)
    problem = network_mismatch(shapes_of(state), model.arch)
    if problem:
        raise WeightsError(f"{fold.checkpoint} is not the network of {model.source}: {problem}")
    return state


def _cache_folder() -> Path:
    return stuseg_home() / "models" / "cache"


def _sound_cache(path: Path, sha: str, arch: Arch) -> tuple[dict[str, torch.Tensor] | None, str | None]:
    """The cached tensors if ``path`` is a sound conversion of the checkpoint ``sha``, else why not."""
    if not path.exists():
        return None, None
    try:
        tensors, meta = read_checkpoint(path)
    except WeightsError as exc:
        return None, str(exc)
    if meta.get("source_sha256") != sha:
        return None, f"{path.name} was not converted from that checkpoint"
    problem = network_mismatch(shapes_of(tensors), arch)
    if problem:
        return None, f"{path.name} is another network ({problem})"
    return tensors, None


def cache_fold(model: TrainedModel, fold: Fold) -> tuple[Path, str]:
    """Convert a fold's checkpoint into stuseg's cache, once; later calls find it there.

    The cache file is ``<STUSEG_HOME>/models/cache/<sha256 of the checkpoint>.safetensors``,
    written atomically. A cached file that is damaged (its header does not describe its bytes, it
    records another source, or holds another network) is converted again, with a
    ``StusegWarning`` saying so.

    Args:
        model: the model the fold belongs to (its arch is checked).
        fold: a fold read from an nnU-Net folder.

    Returns:
        (the cache file, the sha256 of the checkpoint).

    Raises:
        WeightsError: the checkpoint cannot be read or is another network; the cache cannot be
            written (disk full, read-only).
    """
    try:
        sha = remembered_sha256(fold.checkpoint)
    except OSError as exc:
        raise WeightsError(f"checkpoint {fold.checkpoint} cannot be read ({exc.strerror or exc})") from None
    dest = _cache_folder() / f"{sha}.safetensors"
    tensors, damage = _sound_cache(dest, sha, model.arch)
    if tensors is not None:
        return dest, sha
    state = _source_state(model, fold)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WeightsError(
            f"the stuseg cache {dest.parent} cannot be created ({exc.strerror or exc})"
        ) from None
    metadata = {"format": "pt", "source": str(fold.checkpoint.resolve()), "source_sha256": sha}
    write_safetensors(state, dest, metadata)
    if damage:
        from stuseg.errors import StusegWarning

        warnings.warn(
            f"the cached conversion of {fold.checkpoint} was damaged ({damage}); it was converted again",
            StusegWarning,
            stacklevel=2,
        )
    return dest, sha


def load_fold_identified(model: TrainedModel, fold: Fold) -> tuple[dict[str, torch.Tensor], str]:
    """The verified network parameters of one fold (memory-mapped safetensors).

    A fold of an nnU-Net folder is converted once into the cache (``cache_fold``) and read from
    there. A fold of a registered model is its own safetensors file, whose sha256 must be the one
    recorded when it was imported.

    Args:
        model: the model.
        fold: one of ``model.folds``.

    Returns:
        name -> tensor, exactly ``STUNet(model.arch)``'s keys and shapes; and the sha256 of the
        original checkpoint, the weights' identity whether read from the folder or the registry.

    Raises:
        WeightsError: unreadable, damaged, another network, or (registered) not the recorded bytes.
    """
    if fold.sha256 is None:
        path, source_sha = cache_fold(model, fold)
    else:
        path = fold.checkpoint
        try:
            actual = remembered_sha256(path)
        except OSError as exc:
            raise WeightsError(f"weights file {path} cannot be read ({exc.strerror or exc})") from None
        if actual != fold.sha256:
            raise WeightsError(
                f"{path} has sha256 {actual[:12]}..., not the {fold.sha256[:12]}... recorded when the model "
                f"was imported; import it again with `stuseg import-model SOURCE --name {model.source.name} "
                "--overwrite`"
            )
        source_sha = fold.source_sha256 or actual
    tensors, _ = read_checkpoint(path)
    problem = network_mismatch(shapes_of(tensors), model.arch)
    if problem:
        raise WeightsError(f"{path} is not the network of {model.source}: {problem}")
    return tensors, source_sha


def load_fold(model: TrainedModel, fold: Fold) -> dict[str, torch.Tensor]:
    """``load_fold_identified`` without the identity: the verified parameters of one fold."""
    return load_fold_identified(model, fold)[0]
