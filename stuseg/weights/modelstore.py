"""stuseg's registry of fine-tuned models: ``<STUSEG_HOME>/models/<name>/``.

``import_model`` copies what inference needs out of an nnU-Net model folder: a ``model.json``
written by stuseg (plan, network, labels, channels, folds with sha256s, where it came from) and
one verified safetensors file per fold. The entry appears whole or not at all (written into a
staging folder, then renamed). ``resolve_model`` accepts a folder path or a registered name;
loading a registered fold (``stuseg.weights.modelfolder.load_fold``) checks the sha256 recorded here.

``model.json`` is read strictly: a missing or unknown key is a damaged entry, named as such.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stuseg.errors import InputError, WeightsError
from stuseg.model.network import Arch
from stuseg.model.plan import Normalization, Plan
from stuseg.weights.cache import sha256_file, stuseg_home
from stuseg.weights.modelfolder import Fold, TrainedModel, cache_fold, read_model_folder

__all__ = [
    "FORMAT",
    "RegisteredModel",
    "import_model",
    "models_folder",
    "registered_models",
    "resolve_model",
]

FORMAT = "stuseg-model/1"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_RESERVED = {"cache"}  # models/cache holds the conversions of nnU-Net checkpoints


def models_folder() -> Path:
    """Where registered models live: ``<STUSEG_HOME>/models``."""
    return stuseg_home() / "models"


def _check_name(name: str) -> str:
    if not _NAME.fullmatch(name) or name in _RESERVED:
        raise InputError(
            f"invalid model name {name!r}: use letters, digits, '-', '_' and '.', starting with a letter "
            "or digit (at most 100 characters; 'cache' is reserved)"
        )
    return name


# --------------------------------------------------------------------------------------------
# model.json


def _record(model: TrainedModel, name: str, folds: list[dict[str, str]]) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "name": name,
        "framework": model.framework,
        "trainer": model.trainer,
        "source": str(model.source.resolve()),
        "plan": dataclasses.asdict(model.plan),
        "arch": dataclasses.asdict(model.arch),
        "labels": {str(k): v for k, v in model.labels.items()},
        "channel_names": list(model.channel_names),
        "folds": folds,
    }


_KEYS = {
    "format",
    "name",
    "framework",
    "trainer",
    "source",
    "plan",
    "arch",
    "labels",
    "channel_names",
    "folds",
}
_FOLD_KEYS = {"name", "file", "sha256", "source_checkpoint", "source_sha256"}


class _Damaged(InputError):
    pass


def _fields(raw: Any, keys: set[str], what: str) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise _Damaged(f"{what} is not a JSON object")
    missing, unknown = sorted(keys - set(raw)), sorted(set(raw) - keys)
    if missing:
        raise _Damaged(f"{what} has no {missing[0]!r}")
    if unknown:
        raise _Damaged(f"{what} has an unknown key {unknown[0]!r}")
    return raw


def _dataclass_fields(cls: Any) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def _parse(raw: Any, entry: Path) -> tuple[TrainedModel, dict[str, Any]]:
    """A ``TrainedModel`` from a model.json's content (strict); raises ``_Damaged``."""
    record = _fields(raw, _KEYS, "model.json")
    if record["format"] != FORMAT:
        raise _Damaged(f"model.json has format {record['format']!r}, this stuseg reads {FORMAT!r}")
    try:
        plan_raw = _fields(record["plan"], _dataclass_fields(Plan), "its plan")
        channels = tuple(
            Normalization(**_fields(c, _dataclass_fields(Normalization), "a plan channel"))
            for c in plan_raw["channels"]
        )
        plan = Plan(
            **{
                **plan_raw,
                "target_spacing": tuple(float(v) for v in plan_raw["target_spacing"]),
                "patch_size": tuple(int(v) for v in plan_raw["patch_size"]),
                "channels": channels,
                "transpose": tuple(int(v) for v in plan_raw["transpose"]),
                "mirror_axes": tuple(int(v) for v in plan_raw["mirror_axes"]),
            }
        )
        arch_raw = _fields(record["arch"], _dataclass_fields(Arch), "its arch")
        arch = Arch(
            dims=tuple(int(v) for v in arch_raw["dims"]),
            depths=tuple(int(v) for v in arch_raw["depths"]),
            strides=tuple((int(a), int(b), int(c)) for a, b, c in arch_raw["strides"]),
            in_channels=int(arch_raw["in_channels"]),
            num_classes=int(arch_raw["num_classes"]),
        )
        folds = []
        for f in record["folds"]:
            f = _fields(f, _FOLD_KEYS, "a fold")
            if Path(f["file"]).name != f["file"]:
                raise _Damaged(f"fold file {f['file']!r} is not a file name inside the entry")
            folds.append(Fold(str(f["name"]), entry / f["file"], str(f["sha256"]), str(f["source_sha256"])))
        model = TrainedModel(
            source=entry,
            framework=str(record["framework"]),
            plan=plan,
            arch=arch,
            labels={int(k): str(v) for k, v in record["labels"].items()},
            channel_names=tuple(str(c) for c in record["channel_names"]),
            folds=tuple(folds),
            trainer=str(record["trainer"]),
        )
    except _Damaged:
        raise
    except (TypeError, ValueError, AttributeError, KeyError) as exc:
        raise _Damaged(f"a value is not what stuseg wrote ({exc})") from None
    if not model.folds:
        raise _Damaged("it lists no folds")
    return model, record


def _read_entry(name: str) -> tuple[TrainedModel, dict[str, Any]]:
    entry = models_folder() / name
    path = entry / "model.json"
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"registered model {name!r} has no model.json ({path}); import it again") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path} cannot be read ({exc}); import the model again with --overwrite") from None
    try:
        return _parse(raw, entry)
    except _Damaged as exc:
        raise InputError(f"{path} is damaged: {exc}; import the model again with --overwrite") from None


def _pick_folds(model: TrainedModel, folds: Sequence[str] | None) -> TrainedModel:
    """``model`` with only the ``folds`` named (all for None); a fold it lacks is one line."""
    if folds is None:
        return model
    have = {f.name: f for f in model.folds}
    missing = [f for f in folds if f not in have]
    if missing:
        raise InputError(
            f"registered model {model.source.name!r} has no fold {missing[0]}; it has {', '.join(have)}"
        )
    return dataclasses.replace(model, folds=tuple(have[f] for f in dict.fromkeys(folds)))


# --------------------------------------------------------------------------------------------
# Import


def _fsync_write(path: Path, text: str) -> None:
    with path.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def import_model(
    folder: Path,
    name: str,
    *,
    folds: Sequence[str] | None = None,
    checkpoint: str = "final",
    overwrite: bool = False,
) -> TrainedModel:
    """Register an nnU-Net model folder under ``name``: model.json and one safetensors per fold.

    Args:
        folder: the nnU-Net v1 or v2 model folder (``read_model_folder``).
        name: letters, digits, ``-``, ``_`` and ``.``.
        folds: the folds to import; default every fold with the checkpoint.
        checkpoint: ``final`` or ``best``.
        overwrite: replace a model registered under the same name.

    Returns:
        The registered model, as ``resolve_model(name)`` reads it.

    Raises:
        InputError: invalid name, the name is taken (without ``overwrite``), or the folder cannot be
            used (``read_model_folder``).
        WeightsError: a checkpoint cannot be read; the registry cannot be written. Nothing is left
            half-written.
    """
    _check_name(name)
    root = models_folder()
    dest = root / name
    if dest.exists() and not overwrite:
        raise InputError(
            f"a model named {name!r} is registered already ({dest}); choose another name or overwrite it"
        )
    model = read_model_folder(Path(folder), folds=folds, checkpoint=checkpoint)
    try:
        root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".staging", dir=root))
    except OSError as exc:
        raise WeightsError(f"the model registry {root} cannot be written ({exc.strerror or exc})") from None
    try:
        entries = []
        for fold in model.folds:
            cached, source_sha = cache_fold(model, fold)
            file = f"fold_{fold.name}.safetensors"
            shutil.copyfile(cached, staging / file)
            entries.append(
                {
                    "name": fold.name,
                    "file": file,
                    "sha256": sha256_file(staging / file),
                    "source_checkpoint": str(fold.checkpoint.resolve()),
                    "source_sha256": source_sha,
                }
            )
        _fsync_write(staging / "model.json", json.dumps(_record(model, name, entries), indent=1) + "\n")
        if dest.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".old", dir=root))
            os.replace(dest, trash / name)
            os.replace(staging, dest)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(staging, dest)
    except OSError as exc:
        raise WeightsError(f"cannot write model {name!r} into {root} ({exc.strerror or exc})") from None
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return _read_entry(name)[0]


# --------------------------------------------------------------------------------------------
# Listing and resolving


@dataclass(frozen=True)
class RegisteredModel:
    """One row of ``stuseg models``."""

    name: str
    path: Path
    framework: str | None
    size: str | None  # small/base/large/huge/custom
    classes: int | None  # labels, background excluded
    channels: tuple[str, ...]
    folds: tuple[str, ...]
    source: str | None  # the folder it was imported from
    source_sha256: tuple[str, ...]  # of each fold's original checkpoint
    problem: str | None = None  # why the entry cannot be used; the other fields are then empty


def _names() -> list[str]:
    root = models_folder()
    if not root.is_dir():
        return []
    return sorted(
        p.name for p in root.iterdir() if p.is_dir() and _NAME.fullmatch(p.name) and p.name not in _RESERVED
    )


def registered_models() -> list[RegisteredModel]:
    """Every registered model, by name; an entry whose model.json cannot be read says why.

    Returns:
        The rows (empty when nothing is registered).
    """
    rows = []
    for name in _names():
        path = models_folder() / name
        try:
            model, record = _read_entry(name)
        except InputError as exc:
            rows.append(RegisteredModel(name, path, None, None, None, (), (), None, (), str(exc)))
            continue
        rows.append(
            RegisteredModel(
                name=name,
                path=path,
                framework=model.framework,
                size=model.size,
                classes=len(model.labels),
                channels=model.channel_names,
                folds=tuple(f.name for f in model.folds),
                source=record["source"],
                source_sha256=tuple(str(f["source_sha256"]) for f in record["folds"]),
            )
        )
    return rows


def resolve_model(
    name_or_path: str | Path, *, folds: Sequence[str] | None = None, checkpoint: str = "final"
) -> TrainedModel:
    """A model from a folder path (an nnU-Net model folder) or a registered name.

    Args:
        name_or_path: an existing folder, or the name given to ``import_model``.
        folds: the folds to use (default: all); ``checkpoint``: ``final`` or ``best``, for a
            folder (a registered model holds the checkpoint it was imported with).

    Returns:
        The model (a registered one's folds are its verified safetensors files).

    Raises:
        InputError: neither an existing folder nor a registered name (the message lists the
            registered names, closest first), a damaged registry entry, or a folder that cannot
            be used.
    """
    text = str(name_or_path)
    if Path(text).is_dir():
        return read_model_folder(Path(text), folds=folds, checkpoint=checkpoint)
    names = _names()
    if text in names:
        return _pick_folds(_read_entry(text)[0], folds)
    looks_like_path = os.sep in text or "/" in text or text.startswith(".")
    if not names:
        if looks_like_path:
            raise InputError(f"model folder {text} does not exist")
        raise InputError(
            f"no model named {text!r} is registered and no folder {text} exists; register one with "
            "`stuseg import-model DIR --name NAME`"
        )
    # Closest first (difflib's similarity ratio), ties in alphabetical order.
    ordered = sorted(names, key=lambda n: (-difflib.SequenceMatcher(None, text, n).ratio(), n))
    what = f"folder {text} does not exist" if looks_like_path else f"no model named {text!r} is registered"
    raise InputError(f"{what}; registered models: {', '.join(ordered)}")
