"""The fine-tuning driver: a labelled dataset in, a trained nnU-Net v2 model folder out.

nnU-Net v2 does the work: its fingerprint, its default ``ExperimentPlanner``, its preprocessing
and its trainer's ``run_training`` (no training loop here). This module prepares a run folder,
checks what the user gave, starts one child process (``python -m stuseg.finetune.worker``) whose
environment names the run's nnU-Net folders, and turns what the child prints into one report per
epoch. nnU-Net is imported only in that child: it reads its folders from environment variables,
and its validation export starts processes of its own.

A run folder RUN::

    RUN/stuseg-finetune.json        what was asked and done (see ``RECORD``)
    RUN/finetune.log                everything nnU-Net printed
    RUN/nnUNet_raw/DatasetNNN_Name  a link to the dataset (a copy where links are not allowed)
    RUN/nnUNet_preprocessed/...     plans.json (patched for STU-Net) and the preprocessed cases
    RUN/nnUNet_results/DatasetNNN_Name/STUNetTrainer_<size>__nnUNetPlans__3d_fullres
                                    the trained model folder (plans.json, dataset.json, fold_*/)
    RUN/model                       a link to that folder: ``stuseg predict --model RUN/model``

Plans patch (``patch_plans``): STU-Net has six stages, five downsamplings and five deep-supervision
heads whatever the dataset; nnU-Net's plan has as many stages as the patch allows. The
configuration's per-stage lists are cut or padded to six (strides padded with [1, 1, 1]: no
downsampling), every kernel is 3x3x3, so that nnU-Net derives exactly five deep-supervision
scales from the strides. The intensity normalisation becomes the pretraining's per-image z-score
(``ZScoreNormalization``) unless ``ct`` is asked for.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from stuseg.errors import InputError, StusegError, WeightsError

__all__ = [
    "CONFIGURATION",
    "DEFAULT_ID",
    "EPOCHS",
    "EVENT",
    "FOLDS",
    "ITERATIONS",
    "LOG",
    "LR_FINETUNE",
    "LR_SCRATCH",
    "NORMALIZATIONS",
    "PLANS",
    "RECORD",
    "SAVE_EVERY",
    "SIZES",
    "STAGES",
    "VAL_ITERATIONS",
    "EpochCallback",
    "EpochParser",
    "EpochReport",
    "Progress",
    "RunResult",
    "TrainSettings",
    "TrainingError",
    "augmentation_workers",
    "check_choice",
    "check_dataset",
    "check_size",
    "checkpoint_to_resume",
    "dataset_id",
    "dataset_name",
    "model_folder",
    "patch_plans",
    "read_record",
    "resolve_settings",
    "resume_hint",
    "train",
    "trainer_name",
    "trainer_path",
    "update_record",
    "val_iterations",
    "worker_environment",
]

RECORD = "stuseg-finetune.json"
LOG = "finetune.log"
CONFIGURATION = "3d_fullres"
PLANS = "nnUNetPlans"
SIZES = ("small", "base", "large", "huge")
FOLDS = ("0", "1", "2", "3", "4", "all")
NORMALIZATIONS = {"zscore": "ZScoreNormalization", "ct": "CTNormalization"}

# nnU-Net's defaults (nnUNetTrainer.__init__): epochs, iterations per epoch, validation iterations.
EPOCHS = 1000
ITERATIONS = 250
VAL_ITERATIONS = 50
# nnU-Net writes checkpoint_latest.pth every this many epochs (nnUNetTrainer.save_every).
SAVE_EVERY = 50
# Learning rates: the STU-Net authors' fine-tuning rate (their ``_ft`` trainers) and nnU-Net's own
# rate, which they used for training from scratch.
LR_FINETUNE = 1e-3
LR_SCRATCH = 1e-2

# STU-Net: six stages, so five downsampling strides and five deep-supervision heads.
STAGES = 6
# A dataset folder not named DatasetNNN_Name gets this id: each run folder holds one dataset, so
# the id only has to be a valid one (nnU-Net's ids have three digits).
DEFAULT_ID = 500
_DATASET_NAME = re.compile(r"^Dataset(\d{3})_[A-Za-z0-9_]+$")

# The worker's own lines among nnU-Net's output: this prefix, then one JSON object.
EVENT = "@stuseg "


class TrainingError(StusegError):
    """nnU-Net stopped with an error, or the run cannot be continued as asked."""


@dataclass(frozen=True)
class TrainSettings:
    """Everything a training run is started with (resolved: no defaults left to guess)."""

    size: str
    fold: str
    epochs: int = EPOCHS
    iterations_per_epoch: int = ITERATIONS
    val_iterations_per_epoch: int = VAL_ITERATIONS
    lr: float = LR_FINETUNE
    device: str = "cuda"
    normalization: str = "zscore"
    from_scratch: bool = False
    weights: str | None = None  # the pretrained weights file (None from scratch)
    final_validation: bool = True
    save_every: int = SAVE_EVERY  # epochs between checkpoints (what an interrupted run resumes from)


@dataclass(frozen=True)
class EpochReport:
    """One finished epoch, as nnU-Net logged it (``epoch`` counts from 1)."""

    epoch: int
    epochs: int
    train_loss: float | None = None
    val_loss: float | None = None
    pseudo_dice: tuple[float, ...] = ()
    seconds: float | None = None


@dataclass(frozen=True)
class RunResult:
    run: Path
    model_folder: Path
    epochs_done: int
    record: dict[str, Any] = field(default_factory=dict)


Progress = Callable[[str], None]  # a phase line: "planning and preprocessing", "training", ...
EpochCallback = Callable[[EpochReport], None]


# --------------------------------------------------------------------------------------------
# Settings


def val_iterations(iterations_per_epoch: int) -> int:
    """nnU-Net's 50 validation iterations per 250 training iterations, shrunk in proportion (at least 1)."""
    return max(1, round(VAL_ITERATIONS * iterations_per_epoch / ITERATIONS))


def check_choice(value: str, choices: Sequence[str], what: str) -> str:
    """``value`` if it is one of ``choices``; else an InputError naming them (and the closest)."""
    import difflib

    if value in choices:
        return value
    close = difflib.get_close_matches(value, choices, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    raise InputError(f"unknown {what} {value!r}{hint}; choose one of {', '.join(choices)}")


def check_size(size: str) -> str:
    """small, base, large or huge (or S, B, L, H, as elsewhere in stuseg), else an InputError."""
    key = size.strip().lower()
    return check_choice({name[0]: name for name in SIZES}.get(key, key), SIZES, "size")


def resolve_settings(
    *,
    size: str,
    fold: str = "0",
    epochs: int | None = None,
    iterations_per_epoch: int | None = None,
    lr: float | None = None,
    device: str = "cuda",
    normalization: str = "zscore",
    from_scratch: bool = False,
    weights: Path | None = None,
    final_validation: bool = True,
    save_every: int | None = None,
) -> TrainSettings:
    """Check the options and fill in nnU-Net's defaults; the pretrained weights are checked later."""
    size = check_size(size)
    fold = check_choice(str(fold).strip().lower(), FOLDS, "fold")
    normalization = check_choice(normalization.strip().lower(), tuple(NORMALIZATIONS), "normalization")
    device = check_choice(device.strip().lower(), ("cuda", "cpu", "mps"), "device")
    epochs = EPOCHS if epochs is None else epochs
    iterations = ITERATIONS if iterations_per_epoch is None else iterations_per_epoch
    if epochs < 1:
        raise InputError(f"--epochs must be at least 1 (got {epochs})")
    if iterations < 1:
        raise InputError(f"--iterations-per-epoch must be at least 1 (got {iterations})")
    save_every = SAVE_EVERY if save_every is None else save_every
    if save_every < 1:
        raise InputError(f"--save-every must be at least 1 (got {save_every})")
    if lr is None:
        lr = LR_SCRATCH if from_scratch else LR_FINETUNE
    # lr 0 is allowed on purpose: a control run whose weights never move.
    if not math.isfinite(lr) or lr < 0:
        raise InputError(f"--lr must be a number >= 0 (got {lr})")
    if from_scratch and weights is not None:
        raise InputError("--from-scratch and --weights exclude each other: drop one")
    return TrainSettings(
        size=size,
        fold=fold,
        epochs=epochs,
        iterations_per_epoch=iterations,
        val_iterations_per_epoch=val_iterations(iterations),
        lr=float(lr),
        device=device,
        normalization=normalization,
        from_scratch=from_scratch,
        weights=str(weights) if weights is not None else None,
        final_validation=final_validation,
        save_every=save_every,
    )


# --------------------------------------------------------------------------------------------
# The plans patch (pure: a dict in, a dict and what changed out)


def _fit(values: list[Any], n: int, pad: Any) -> list[Any]:
    """``values`` cut to ``n`` entries or padded with ``pad``."""
    return [*values[:n], *[pad] * max(0, n - len(values))]


def patch_plans(plans: Mapping[str, Any], normalization: str = "zscore") -> tuple[dict[str, Any], dict]:
    """nnU-Net's plans made acceptable to STU-Net, and a record of each change.

    In the ``3d_fullres`` configuration: ``architecture.arch_kwargs.strides`` exactly six
    entries, the first [1, 1, 1], the rest the plan's (cut to five, or padded with [1, 1, 1]),
    ``n_stages`` 6, ``kernel_sizes`` 3x3x3 everywhere, the other per-stage lists
    (``features_per_stage``, ``n_conv_per_stage``: six; ``n_conv_per_stage_decoder``: five) cut or
    padded with their last entry; ``patch_size`` rounded down to a multiple of the strides'
    product where it is not one; ``normalization_schemes`` one scheme for every channel.
    """
    out = json.loads(json.dumps(plans))  # a deep copy of plain JSON data
    try:
        configuration = out["configurations"][CONFIGURATION]
        kwargs = configuration["architecture"]["arch_kwargs"]
        strides = [list(map(int, s)) for s in kwargs["strides"]]
    except (KeyError, TypeError) as exc:
        raise InputError(f"nnU-Net's plans have no {CONFIGURATION} architecture to patch ({exc})") from None
    changes: dict[str, Any] = {}

    def change(key: str, before: Any, after: Any) -> None:
        if before != after:
            changes[key] = {"before": before, "after": after}

    from stuseg.weights.modelfolder import (
        stunet_strides,  # the one cut-or-pad rule, shared with reading folders
    )

    new_strides = [[1, 1, 1], *(list(s) for s in stunet_strides(strides[1:], f"the {CONFIGURATION} plan"))]
    change("strides", strides, new_strides)
    kwargs["strides"] = new_strides
    change("n_stages", kwargs.get("n_stages"), STAGES)
    kwargs["n_stages"] = STAGES
    kernels = [[3, 3, 3]] * STAGES
    change("kernel_sizes", kwargs.get("kernel_sizes"), kernels)
    kwargs["kernel_sizes"] = kernels
    for key, n in (
        ("features_per_stage", STAGES),
        ("n_conv_per_stage", STAGES),
        ("n_conv_per_stage_decoder", STAGES - 1),
    ):
        if isinstance(kwargs.get(key), list) and kwargs[key]:
            fitted = _fit(kwargs[key], n, kwargs[key][-1])
            change(key, kwargs[key], fitted)
            kwargs[key] = fitted

    divisor = [math.prod(s[axis] for s in new_strides) for axis in range(3)]
    patch = [int(p) for p in configuration["patch_size"]]
    # Every stride must divide what reaches it: the patch a multiple of the strides' product
    # (nnU-Net's planner guarantees this for its own strides; cutting strides keeps it).
    fitted_patch = [max(d, p - p % d) for p, d in zip(patch, divisor)]
    change("patch_size", patch, fitted_patch)
    configuration["patch_size"] = fitted_patch

    channels = len(configuration.get("normalization_schemes") or [None])
    schemes = [NORMALIZATIONS[normalization]] * channels
    change("normalization_schemes", configuration.get("normalization_schemes"), schemes)
    configuration["normalization_schemes"] = schemes
    return out, changes


# --------------------------------------------------------------------------------------------
# The run folder


def dataset_name(dataset: Path) -> str:
    """nnU-Net's name for the dataset: its folder's own when it is ``DatasetNNN_Name``, else
    ``Dataset500_<the folder name's letters and digits>``."""
    name = dataset.resolve().name
    if _DATASET_NAME.match(name):
        return name
    cleaned = re.sub(r"[^A-Za-z0-9]+", "", name) or "Data"
    return f"Dataset{DEFAULT_ID:03d}_{cleaned}"


def dataset_id(name: str) -> int:
    return int(name[len("Dataset") : len("Dataset") + 3])


def trainer_path() -> Path:
    """The folder to put in ``nnUNet_extTrainer`` so that nnU-Net's own commands find stuseg's trainers.

    It holds one module naming the classes of ``stuseg.finetune.trainer`` (nnU-Net imports each
    module of such a folder as a top-level module and looks for the class by name).
    """
    return Path(__file__).resolve().parent / "nnunet_trainers"


def trainer_name(size: str) -> str:
    return f"STUNetTrainer_{size}"


def model_folder(run: Path, name: str, size: str) -> Path:
    """Where nnU-Net writes the trained model folder of this run."""
    return run / "nnUNet_results" / name / f"{trainer_name(size)}__{PLANS}__{CONFIGURATION}"


def check_dataset(dataset: Path) -> dict[str, Any]:
    """dataset.json of an nnU-Net v2 raw dataset, after the checks that fit in one line each."""
    if not dataset.is_dir():
        raise InputError(
            f"{dataset} is not a folder; give an nnU-Net raw dataset (dataset.json, imagesTr, labelsTr)"
        )
    meta = dataset / "dataset.json"
    if not meta.is_file():
        raise InputError(
            f"{dataset} has no dataset.json; prepare the dataset first (`stuseg finetune prepare`)"
        )
    try:
        info = json.loads(meta.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{meta} cannot be read as JSON ({exc})") from None
    missing = [k for k in ("channel_names", "labels", "numTraining", "file_ending") if k not in info]
    if not isinstance(info, dict) or missing:
        raise InputError(
            f"{meta} lacks {', '.join(missing) or 'its entries'}; it is not an nnU-Net v2 dataset.json"
        )
    for sub in ("imagesTr", "labelsTr"):
        if not (dataset / sub).is_dir():
            raise InputError(f"{dataset} has no {sub} folder; it is not an nnU-Net raw dataset")
    return info


def _link_or_copy(target: Path, link: Path) -> None:
    """``link`` pointing at ``target`` (a folder); a copy where the system allows no links."""
    try:
        link.symlink_to(target, target_is_directory=True)
    except OSError:
        shutil.copytree(target, link)


def read_record(run: Path) -> dict[str, Any]:
    path = run / RECORD
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise TrainingError(
            f"{run} holds no fine-tuning run to resume (no {RECORD}); start one without --resume"
        ) from None
    except (OSError, ValueError) as exc:
        raise TrainingError(f"{path} cannot be read ({exc})") from None


def update_record(run: Path, **changes: Any) -> dict[str, Any]:
    """Merge ``changes`` into RUN/stuseg-finetune.json (written whole, then renamed into place)."""
    path = run / RECORD
    record = json.loads(path.read_text()) if path.exists() else {}
    record.update(changes)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(record, indent=2, default=str) + "\n")
    os.replace(tmp, path)
    return record


def checkpoint_to_resume(folder: Path) -> Path | None:
    """The checkpoint a resumed run starts from: the periodic one while a run is under way, else
    the final one (nnU-Net deletes the periodic one when a run ends)."""
    for name in ("checkpoint_latest.pth", "checkpoint_final.pth"):
        if (folder / name).is_file():
            return folder / name
    return None


def resume_hint(run: Path) -> str:
    """One line: what stays after an interrupted run, and how to go on."""
    try:
        record = json.loads((run / RECORD).read_text())
        folder = Path(record["fold_folder"])
    except (OSError, ValueError, KeyError):
        return f"nothing to resume in {run} yet; delete it and start the run again"
    checkpoint = checkpoint_to_resume(folder)
    if checkpoint is None:
        every = record.get("settings", {}).get("save_every", SAVE_EVERY)
        return (
            f"no checkpoint was saved yet (one every {every} epochs, --save-every); "
            f"delete {run} and start the run again"
        )
    command = f"stuseg finetune train {record['dataset']} -o {run} --resume"
    return f"{checkpoint.name} stays in {folder}; continue with `{command}`"


def _pretrained(settings: TrainSettings) -> TrainSettings:
    """The settings with the pretrained weights file checked (and found in the cache if not given)."""
    from dataclasses import replace

    from stuseg.weights.cache import load_weights

    if settings.from_scratch:
        return settings
    if settings.weights is not None:
        path = Path(settings.weights)
        if not path.is_file():
            raise WeightsError(f"--weights {path}: no such file")
        loaded = load_weights(settings.size, path=path)  # checks it is a checkpoint of this size
        return replace(settings, weights=str(loaded.path.resolve()))
    try:
        loaded = load_weights(settings.size, download=False)
    except WeightsError:
        raise WeightsError(
            f"the pretrained {settings.size} weights are not downloaded; run `stuseg download --size "
            f"{settings.size}` (or give --weights FILE, or --from-scratch)"
        ) from None
    return replace(settings, weights=str(loaded.path))


def _check_device(device: str, gpus: int) -> None:
    import torch

    if gpus != 1:
        raise InputError(
            f"--gpus {gpus}: stuseg trains on one device; for several GPUs run nnU-Net's own "
            "`nnUNetv2_train ... -num_gpus N` with nnUNet_extTrainer set to `stuseg finetune trainer-path`"
            if gpus > 1
            else f"--gpus must be at least 1 (got {gpus})"
        )
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("no CUDA GPU is available here; use --device cpu (slow) or --device mps")
    if device == "mps" and not torch.backends.mps.is_available():
        raise InputError("Apple's MPS device is not available here; use --device cpu or --device cuda")


# --------------------------------------------------------------------------------------------
# Starting a run

# What a resumed run may change besides --epochs: neither changes what is learnt.
_MAY_CHANGE = ("device", "save_every")


def train(
    dataset: Path | None,
    run: Path,
    settings: TrainSettings | None = None,
    *,
    resume: bool = False,
    epochs: int | None = None,
    changes: Mapping[str, Any] | None = None,
    gpus: int = 1,
    progress: Progress | None = None,
    on_epoch: EpochCallback | None = None,
) -> RunResult:
    """Fine-tune (or train from scratch) on ``dataset``, in the run folder ``run``.

    Args:
        dataset: an nnU-Net v2 raw dataset (dataset.json, imagesTr, labelsTr). On resume it may
            be None (the record names it) but must otherwise be the recorded one.
        run: the run folder; a new run needs an empty or absent folder.
        settings: the resolved options (``resolve_settings``) of a new run; ignored on resume
            (the recorded ones are used).
        resume: continue the run in ``run`` from its last checkpoint.
        epochs: on resume, a new total number of epochs (to extend a finished run).
        changes: on resume, the options the user gave (``TrainSettings`` field names): each must
            be the recorded value, except ``device`` and ``save_every``, which may change.
        gpus: 1 (several GPUs are refused, with a pointer to nnU-Net's own command).
        progress: called with a line for each phase.
        on_epoch: called after each epoch with what nnU-Net logged.

    Returns:
        The run folder, its trained model folder, the epochs done and the record.

    Raises:
        InputError: a bad dataset, option or run folder. WeightsError: no pretrained weights.
        TrainingError: nnU-Net stopped with an error; nothing to resume.
        KeyboardInterrupt: Ctrl-C, after the child process has stopped (``resume_hint`` says what stays).
    """
    run = Path(run)
    say = progress or (lambda line: None)
    if resume:
        record = read_record(run)
        recorded = record["settings"]
        if dataset is not None and Path(dataset).resolve() != Path(record["dataset"]):
            raise InputError(f"{run} was trained on {record['dataset']}, not {dataset}")
        for key, value in (changes or {}).items():
            if key not in _MAY_CHANGE and recorded.get(key) != value:
                raise InputError(
                    f"{run} was trained with {key} {recorded.get(key)!r}, not {value!r}; a resumed run "
                    "keeps its settings (only --epochs, --device and --save-every may change)"
                )
        merged = {**recorded, **{k: v for k, v in (changes or {}).items() if k in _MAY_CHANGE}}
        if epochs is not None:
            if epochs < 1:
                raise InputError(f"--epochs must be at least 1 (got {epochs})")
            merged["epochs"] = epochs
        settings = TrainSettings(**merged)
        _check_device(settings.device, gpus)
        folder = Path(record["fold_folder"])
        if checkpoint_to_resume(folder) is None:
            raise TrainingError(
                f"{folder} holds no checkpoint yet (one every {settings.save_every} epochs, --save-every, "
                f"and one at the end); delete {run} and start the run again without --resume"
            )
        name = record["dataset_name"]
    else:
        if settings is None or dataset is None:
            raise InputError("a new run needs a dataset and its settings")
        check_dataset(Path(dataset))
        if run.exists() and (not run.is_dir() or any(run.iterdir())):
            if (run / RECORD).exists():
                raise InputError(
                    f"{run} already holds a run; add --resume to continue it, "
                    "or delete it or choose another -o"
                )
            raise InputError(f"{run} exists and is not an empty folder; choose another -o")
        _check_device(settings.device, gpus)
        settings = _pretrained(settings)
        name = dataset_name(Path(dataset))
        folder = model_folder(run, name, settings.size) / f"fold_{settings.fold}"
        for sub in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
            (run / sub).mkdir(parents=True, exist_ok=True)
        _link_or_copy(Path(dataset).resolve(), run / "nnUNet_raw" / name)
        model = run / "model"
        with contextlib.suppress(OSError):  # no links here: the record names the folder
            model.symlink_to(
                model_folder(run, name, settings.size).relative_to(run), target_is_directory=True
            )
        update_record(
            run,
            dataset=str(Path(dataset).resolve()),
            dataset_name=name,
            model_folder=str(model_folder(run, name, settings.size).resolve()),
            fold_folder=str(folder.resolve()),
            settings=asdict(settings),
            status="started",
        )
    say(f"run folder {run}; model folder {model_folder(run, name, settings.size)}")
    _run_worker(run, settings, resume=resume, say=say, on_epoch=on_epoch)
    record = read_record(run)
    return RunResult(run, model_folder(run, name, settings.size), int(record.get("epochs_done", 0)), record)


def worker_environment(run: Path, device: str) -> dict[str, str]:
    """The child's environment: the run's nnU-Net folders, and modest parallelism on the CPU."""
    from stuseg.inference.threads import limit_spin_waiting

    env = dict(os.environ)
    run = run.resolve()
    env["nnUNet_raw"] = str(run / "nnUNet_raw")
    env["nnUNet_preprocessed"] = str(run / "nnUNet_preprocessed")
    env["nnUNet_results"] = str(run / "nnUNet_results")
    env["PYTHONUNBUFFERED"] = "1"  # each nnU-Net line as it is printed
    # A process that exists to run stuseg: short OpenMP spins, as the command line sets for itself
    # (stuseg.inference.threads), also when the driver is called as a library.
    limit_spin_waiting(env)
    # The child imports the very stuseg this process runs (an unpacked or editable copy included).
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    if device == "cpu":
        # On the CPU the network is the bottleneck: one export process, no torch.compile (nnU-Net
        # compiles only on CUDA anyway). Augmentation workers: see ``augmentation_workers``.
        env.setdefault("nnUNet_def_n_proc", "1")
        env["nnUNet_compile"] = "false"
    return env


def augmentation_workers(device: str) -> int | None:
    """nnU-Net's ``nnUNet_n_proc_DA`` for training: 0 on the CPU (augmentation in the training
    process, which the network keeps busy anyway), nnU-Net's own choice elsewhere (None).

    Set by the worker for training only: nnU-Net's planner also calls ``torch.set_num_threads``
    with this value, which refuses 0. A value the user set is kept.
    """
    if "nnUNet_n_proc_DA" in os.environ or device != "cpu":
        return None
    return 0


_LOSS = re.compile(r":\s(train_loss|val_loss)\s+(\S+)\s*$")
_EPOCH = re.compile(r":\sEpoch\s(\d+)\s*$")
_DICE = re.compile(r":\sPseudo dice\s+\[(.*)\]\s*$")
_TIME = re.compile(r":\sEpoch time:\s+(\S+)\s*s\s*$")
_NUMBER = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?|nan")


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


class EpochParser:
    """nnU-Net's per-epoch lines (``print_to_log_file``) gathered into one ``EpochReport``.

    nnU-Net prints ``Epoch N``, then ``train_loss``, ``val_loss``, ``Pseudo dice [...]`` and
    ``Epoch time: T s``; the report is complete with the time line.
    """

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs
        self.current: dict[str, Any] = {}

    def feed(self, line: str) -> EpochReport | None:
        if m := _EPOCH.search(line):
            self.current = {"epoch": int(m.group(1)) + 1}
        elif not self.current:
            return None
        elif m := _LOSS.search(line):
            self.current[m.group(1)] = _number(m.group(2))
        elif m := _DICE.search(line):
            # nnU-Net prints numpy scalars: "[np.float32(0.5), np.float32(0.25)]" (numpy 2) or "[0.5, 0.25]".
            text = re.sub(r"np\.float\d+\(", "", m.group(1))
            self.current["pseudo_dice"] = tuple(float(v) for v in _NUMBER.findall(text))
        elif m := _TIME.search(line):
            report = EpochReport(
                epoch=self.current["epoch"],
                epochs=self.epochs,
                train_loss=self.current.get("train_loss"),
                val_loss=self.current.get("val_loss"),
                pseudo_dice=self.current.get("pseudo_dice", ()),
                seconds=_number(m.group(1)),
            )
            self.current = {}
            return report
        return None


def _lines(stream: Any) -> Iterator[str]:
    for raw in iter(stream.readline, ""):
        yield raw.rstrip("\n")


def _run_worker(
    run: Path, settings: TrainSettings, *, resume: bool, say: Progress, on_epoch: EpochCallback | None
) -> None:
    """Start the worker, forward its events and epochs, and stop it cleanly on Ctrl-C."""
    command = [sys.executable, "-m", "stuseg.finetune.worker", str(run.resolve())]
    if resume:
        command.append("--resume")
    workers = augmentation_workers(settings.device)
    if workers is not None:
        command += ["--augmentation-workers", str(workers)]
    command += ["--settings", json.dumps(asdict(settings))]
    parser = EpochParser(settings.epochs)
    error: str | None = None
    tail: list[str] = []
    with (run / LOG).open("a") as log:
        log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {'resume' if resume else 'start'}\n")
        child = subprocess.Popen(
            command,
            env=worker_environment(run, settings.device),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            bufsize=1,
        )
        try:
            assert child.stdout is not None
            for line in _lines(child.stdout):
                if line.startswith(EVENT):
                    event = json.loads(line[len(EVENT) :])
                    if event.get("error"):
                        error = event["error"]
                    elif event.get("phase"):
                        say(event["phase"])
                    continue
                log.write(line + "\n")
                log.flush()
                tail = [*tail[-19:], line]
                report = parser.feed(line)
                if report is not None and on_epoch is not None:
                    on_epoch(report)
            code = child.wait()
        except KeyboardInterrupt:
            _stop(child)
            raise
        finally:
            if child.poll() is None:
                _stop(child)
    if error is not None:
        raise TrainingError(error)
    if code != 0:
        last = next((t for t in reversed(tail) if t.strip()), "no output")
        raise TrainingError(
            f"nnU-Net stopped with an error: {last.strip()} (the whole output is in {run / LOG})"
        )


def _stop(child: subprocess.Popen) -> None:
    """Interrupt the child like Ctrl-C (it may have had it already), then end it if it lingers."""
    if child.poll() is None:
        child.send_signal(signal.SIGINT)
    try:
        child.wait(timeout=30)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()
