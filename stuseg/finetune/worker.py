"""The child process of ``stuseg finetune train``: nnU-Net's planning, preprocessing and training.

Run as ``python -m stuseg.finetune.worker RUN --settings JSON [--resume]`` by
``stuseg.finetune.run``, with nnU-Net's folders (``nnUNet_raw``, ``nnUNet_preprocessed``,
``nnUNet_results``) in its environment. Everything nnU-Net prints goes to stdout as nnU-Net
prints it; the worker's own events are single lines ``@stuseg {json}`` (a phase, or an error
meant for the user). The trainer class is stuseg's, instantiated here: never looked up by name.

The ``__main__`` guard matters: nnU-Net's preprocessing and validation export start processes
with the ``spawn`` method, which import this module again.
"""

from __future__ import annotations

import argparse
import json
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from stuseg.finetune.run import (
    CONFIGURATION,
    EVENT,
    PLANS,
    TrainSettings,
    checkpoint_to_resume,
    dataset_id,
    patch_plans,
    read_record,
    update_record,
)

__all__ = ["main"]


def _event(**event: Any) -> None:
    sys.stdout.write(EVENT + json.dumps(event) + "\n")
    sys.stdout.flush()


def _versions() -> dict[str, str]:
    import torch

    import stuseg

    try:
        nnunet = version("nnunetv2")
    except PackageNotFoundError:
        nnunet = "unknown"
    return {"stuseg": stuseg.__version__, "nnunetv2": nnunet, "torch": torch.__version__}


def plan_and_preprocess(run: Path, name: str, settings: TrainSettings) -> dict:
    """Fingerprint, plan (nnU-Net's default ExperimentPlanner), patch plans.json for STU-Net,
    preprocess 3d_fullres.

    Returns the record of the patch. Preprocessing comes after the patch: it normalises the images
    with the plans' normalisation schemes and crops to the plans' spacing.
    """
    import os

    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprint_dataset,
        plan_experiment_dataset,
        preprocess_dataset,
    )

    ident = dataset_id(name)
    processes = 1 if settings.device == "cpu" else max(1, min(4, (os.cpu_count() or 2) - 1))
    _event(phase="fingerprinting the dataset (nnU-Net)")
    extract_fingerprint_dataset(ident, num_processes=processes, check_dataset_integrity=True, clean=True)
    _event(phase="planning (nnU-Net's ExperimentPlanner)")
    plan_experiment_dataset(ident, ExperimentPlanner)
    plans_file = run / "nnUNet_preprocessed" / name / f"{PLANS}.json"
    patched, changes = patch_plans(json.loads(plans_file.read_text()), settings.normalization)
    plans_file.write_text(json.dumps(patched, indent=4, sort_keys=False) + "\n")
    _event(phase="preprocessing 3d_fullres (nnU-Net)")
    preprocess_dataset(ident, PLANS, (CONFIGURATION,), (processes,), show_progress_bar=False)
    return changes


def train(run: Path, settings: TrainSettings, resume: bool, augmentation_workers: int | None = None) -> None:
    import os

    import torch

    from stuseg.finetune import trainer as trainers

    record = read_record(run)
    name = record["dataset_name"]
    if not resume or not record.get("preprocessed"):
        changes = plan_and_preprocess(run, name, settings)
        update_record(run, plans_patch=changes, preprocessed=True)

    if augmentation_workers is not None:
        # Read by nnU-Net when its trainer builds the data loaders (get_allowed_n_proc_DA).
        os.environ["nnUNet_n_proc_DA"] = str(augmentation_workers)  # noqa: SIM112 (nnU-Net's name)
    preprocessed = run / "nnUNet_preprocessed" / name
    plans = json.loads((preprocessed / f"{PLANS}.json").read_text())
    dataset_json = json.loads((preprocessed / "dataset.json").read_text())
    # nnUNetTrainer.__init__ takes this flag out of the plans (nnU-Net's own driver puts it there).
    plans["continue_training"] = resume
    fold: int | str = "all" if settings.fold == "all" else int(settings.fold)
    cls = getattr(trainers, f"STUNetTrainer_{settings.size}")
    trainer = cls(plans, CONFIGURATION, fold, dataset_json, torch.device(settings.device))
    trainer.num_epochs = settings.epochs
    trainer.num_iterations_per_epoch = settings.iterations_per_epoch
    trainer.num_val_iterations_per_epoch = settings.val_iterations_per_epoch
    trainer.initial_lr = settings.lr
    trainer.save_every = settings.save_every
    # A resumed run takes its weights from the checkpoint; the pretrained file was read once.
    trainer.pretrained = None if (resume or settings.weights is None) else Path(settings.weights)

    if resume:
        checkpoint = checkpoint_to_resume(Path(trainer.output_folder))
        if checkpoint is None:
            _event(error=f"{trainer.output_folder} holds no checkpoint to resume from")
            raise SystemExit(2)
        trainer.load_checkpoint(str(checkpoint))  # initialises the trainer first
        if trainer.current_epoch >= settings.epochs:
            _event(
                error=f"the run has done all {trainer.current_epoch} epochs; "
                f"give --epochs larger than {trainer.current_epoch} to extend it"
            )
            raise SystemExit(2)
        _event(
            phase=f"resuming from {checkpoint.name} at epoch {trainer.current_epoch + 1} of {settings.epochs}"
        )
        update_record(
            run,
            settings=_settings_dict(settings),
            resumed_from_epoch=trainer.current_epoch,
            **_versions_entry(),
        )
    else:
        trainer.initialize()
        report = trainer.weights_report  # None from scratch
        weights = None
        if report is not None:
            weights = {
                "path": str(report.path),
                "sha256": report.sha256,
                "size": report.size,
                "keys_loaded": list(report.keys_loaded),
                "keys_reinitialised": list(report.keys_reinitialised),
                "keys_repeated_over_channels": list(report.keys_repeated_over_channels),
            }
        update_record(
            run,
            weights=weights,
            **_versions_entry(),
        )
        _event(phase=f"training {settings.epochs} epochs of {settings.iterations_per_epoch} iterations")

    update_record(run, status="training")
    trainer.run_training()
    update_record(run, status="trained", epochs_done=trainer.current_epoch)
    if settings.final_validation:
        _event(phase="final validation (nnU-Net)")
        trainer.perform_actual_validation()
        update_record(run, status="validated")


def _settings_dict(settings: TrainSettings) -> dict:
    from dataclasses import asdict

    return asdict(settings)


def _versions_entry() -> dict:
    return {"versions": _versions()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stuseg.finetune.worker")
    parser.add_argument("run", type=Path)
    parser.add_argument("--settings", required=True)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--augmentation-workers", type=int)
    args = parser.parse_args(argv)
    settings = TrainSettings(**json.loads(args.settings))
    train(args.run, settings, args.resume, args.augmentation_workers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
