"""`stuseg finetune train` end to end: nnU-Net v2 plans, preprocesses and trains STU-Net small.

A tiny dataset (4 cases of 40x48x48 voxels: a bright sphere and a brighter box on noise, written
by ``stuseg.finetune.prepare_dataset``), fabricated "pretrained" small weights in the published
v1 format, fold ``all``, 2 training iterations per epoch on the CPU. Two runs are shared by the
tests (module fixtures): one through the command line at lr 1e-2, one through the library at lr 0
(the control), which the resume test then extends by one epoch. Slow: minutes on 2 cores.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from fabricate import random_state_dict, write_checkpoint
from nnunet_oracle import nnunet_v2_predict
from typer.testing import CliRunner

from stuseg.cli import app
from stuseg.finetune import run as ft

REPO = Path(__file__).resolve().parents[1]
EPOCHS = 5
SHAPE = (40, 48, 48)
LABELS = {"sphere": 1, "box": 2}
Pretrained = tuple[Path, dict[str, torch.Tensor]]  # the weights file and the tensors it holds


def _write_case(folder: Path, case: str, seed: int) -> None:
    """A sphere (label 1, +300) and a box (label 2, +600) at random places in noise around -800."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in SHAPE], indexing="ij")).astype(float)
    labels = np.zeros(SHAPE, np.uint8)
    sphere = rng.uniform([12, 12, 12], [28, 20, 20])[:, None, None, None]
    box = rng.uniform([12, 28, 28], [28, 36, 36])[:, None, None, None]
    labels[((grid - sphere) ** 2).sum(0) < 36] = 1
    labels[(np.abs(grid - box) < 5).all(0)] = 2
    image = rng.normal(-800, 20, SHAPE) + 300 * (labels == 1) + 600 * (labels == 2)
    affine = np.diag([1.5, 1.5, 1.5, 1.0])
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "labels").mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(image.astype(np.float32), affine), folder / "images" / f"{case}.nii.gz")
    nib.save(nib.Nifti1Image(labels, affine), folder / "labels" / f"{case}.nii.gz")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from stuseg.finetune.dataset import prepare_dataset

    source = tmp_path_factory.mktemp("scans")
    for i in range(4):
        _write_case(source, f"case{i}", seed=i)
    out = tmp_path_factory.mktemp("raw") / "Dataset042_Shapes"
    prepare_dataset(source, out, LABELS)
    return out


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> Pretrained:
    """Published-style small weights (an nnU-Net v1 .model file) and the state dict they hold."""
    state = random_state_dict("small", seed=3)
    path = write_checkpoint(tmp_path_factory.mktemp("weights") / "small_ep4k.model", state)
    return path, state


def _env(home: Path) -> dict[str, str]:
    return {
        **os.environ,
        "STUSEG_HOME": str(home),
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p),
    }


@pytest.fixture(scope="module")
def trained(
    dataset: Path, pretrained: Pretrained, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """The command line's run: lr 1e-2, EPOCHS epochs of 2 iterations, nnU-Net's final validation."""
    run = tmp_path_factory.mktemp("runs") / "run"
    command = [
        sys.executable, "-m", "stuseg", "finetune", "train", str(dataset), "-o", str(run),
        "--size", "small", "--weights", str(pretrained[0]), "--fold", "all", "--device", "cpu",
        "--epochs", str(EPOCHS), "--iterations-per-epoch", "2", "--lr", "1e-2",
    ]  # fmt: skip
    done = subprocess.run(
        command,
        capture_output=True,
        text=True,
        env=_env(tmp_path_factory.mktemp("home")),
        timeout=900,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return run, done


@pytest.fixture(scope="module")
def control(dataset: Path, pretrained: Pretrained, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same run through the library with lr 0: the weights never move."""
    run = tmp_path_factory.mktemp("runs") / "control"
    settings = ft.resolve_settings(
        size="small",
        fold="all",
        epochs=EPOCHS,
        iterations_per_epoch=2,
        lr=0.0,
        device="cpu",
        weights=pretrained[0],
        final_validation=False,
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STUSEG_HOME", str(tmp_path_factory.mktemp("home")))
        ft.train(dataset, run, settings)
    return run


def _checkpoint(run: Path, name: str = "checkpoint_final.pth") -> dict:
    # weights_only=False: nnU-Net's checkpoints hold numpy scalars; these are files this test wrote.
    return torch.load(run / "model" / "fold_all" / name, map_location="cpu", weights_only=False)


def _train_losses(run: Path) -> list[float]:
    return [float(v) for v in _checkpoint(run)["logging"]["train_losses"]]


@pytest.mark.slow
def test_every_pretrained_tensor_but_the_heads_is_loaded(
    trained: tuple[Path, object], pretrained: Pretrained
) -> None:
    run, _ = trained
    record = json.loads((run / ft.RECORD).read_text())
    _, state = pretrained
    heads = {k for k in state if k.startswith("seg_outputs.")}
    assert set(record["weights"]["keys_loaded"]) == set(state) - heads
    assert set(record["weights"]["keys_reinitialised"]) >= heads
    assert record["weights"]["path"] == str(pretrained[0].resolve())
    settings = record["settings"]
    assert (settings["size"], settings["fold"], settings["epochs"]) == ("small", "all", EPOCHS)
    assert (settings["iterations_per_epoch"], settings["val_iterations_per_epoch"]) == (2, 1)
    assert (settings["lr"], settings["normalization"], settings["from_scratch"]) == (0.01, "zscore", False)
    assert set(record["versions"]) == {"stuseg", "nnunetv2", "torch"}
    patch = record["plans_patch"]
    assert patch["strides"]["after"][0] == [1, 1, 1] and len(patch["strides"]["after"]) == 6
    plans = json.loads((run / "model" / "plans.json").read_text())
    arch = plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
    assert len(arch["strides"]) == arch["n_stages"] == 6
    assert plans["configurations"]["3d_fullres"]["normalization_schemes"] == ["ZScoreNormalization"]


@pytest.mark.slow
def test_the_command_reports_each_epoch_on_one_line(
    trained: tuple[Path, subprocess.CompletedProcess],
) -> None:
    _, done = trained
    lines = [line for line in done.stderr.splitlines() if line.startswith("epoch ")]
    assert [line.split(",")[0] for line in lines] == [f"epoch {e}/{EPOCHS}" for e in range(1, EPOCHS + 1)]
    assert all("train loss" in line and "pseudo Dice" in line and line.endswith(" s") for line in lines)
    assert "Traceback" not in done.stderr


@pytest.mark.slow
def test_the_final_validation_ran(trained: tuple[Path, subprocess.CompletedProcess]) -> None:
    run, _ = trained
    summary = json.loads((run / "model" / "fold_all" / "validation" / "summary.json").read_text())
    assert "foreground_mean" in summary
    assert json.loads((run / ft.RECORD).read_text())["status"] == "validated"


@pytest.mark.slow
def test_lr_0_keeps_the_pretrained_weights_and_the_loss_falls_only_with_learning(
    trained: tuple[Path, object], control: Path, pretrained: Pretrained
) -> None:
    _, state = pretrained
    weights = _checkpoint(control)["network_weights"]
    for key, value in state.items():
        if not key.startswith("seg_outputs."):
            torch.testing.assert_close(weights[key], value, rtol=0, atol=0, msg=key)
    learning, still = _train_losses(trained[0]), _train_losses(control)
    assert len(learning) == len(still) == EPOCHS
    assert learning[-1] < learning[0], learning
    # The control: the same batches' losses move by chance only; learning moves them further down.
    assert learning[0] - learning[-1] > still[0] - still[-1], (learning, still)


@pytest.mark.slow
def test_resume_runs_the_next_epoch_only(control: Path, dataset: Path) -> None:
    lines: list[str] = []
    reports: list[ft.EpochReport] = []
    result = ft.train(
        None, control, None, resume=True, epochs=EPOCHS + 1, progress=lines.append, on_epoch=reports.append
    )
    assert [r.epoch for r in reports] == [EPOCHS + 1]
    assert any(f"at epoch {EPOCHS + 1} of {EPOCHS + 1}" in line for line in lines), lines
    assert result.epochs_done == EPOCHS + 1
    assert _checkpoint(control)["current_epoch"] == EPOCHS + 1
    assert len(_train_losses(control)) == EPOCHS + 1
    record = json.loads((control / ft.RECORD).read_text())
    assert (record["settings"]["epochs"], record["resumed_from_epoch"]) == (EPOCHS + 1, EPOCHS)
    with pytest.raises(ft.TrainingError, match="extend"):  # done: only a larger --epochs continues
        ft.train(dataset, control, None, resume=True)


@pytest.mark.slow
def test_stuseg_and_nnunet_predict_the_trained_folder_alike(
    trained: tuple[Path, object], dataset: Path
) -> None:
    import stuseg

    run, _ = trained
    image = dataset / "imagesTr" / "case1_0000.nii.gz"
    # nnU-Net reads the trainer from the folder name: the link RUN/model resolved.
    theirs, doubt = nnunet_v2_predict((run / "model").resolve(), [image], folds=("all",))
    seg = stuseg.segment(image, model=run / "model", device="cpu")
    ours = np.asarray(seg.labels).transpose(2, 1, 0)  # NIfTI (i, j, k) -> SimpleITK's (z, y, x)
    sure = ~doubt
    # A network of a few iterations has near-tied logits in places: more doubt than a trained one.
    assert doubt.mean() < 0.2, doubt.mean()
    assert (ours[sure] == theirs[sure]).mean() >= 0.999, (ours[sure] == theirs[sure]).mean()


@pytest.mark.slow
def test_ctrl_c_keeps_the_last_checkpoint_and_says_how_to_resume(
    dataset: Path, pretrained: Pretrained, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    command = [
        sys.executable, "-m", "stuseg", "finetune", "train", str(dataset), "-o", str(run),
        "--size", "small", "--weights", str(pretrained[0]), "--fold", "all", "--device", "cpu",
        "--epochs", "100", "--iterations-per-epoch", "2", "--save-every", "1", "--no-final-validation",
    ]  # fmt: skip
    # Its own session: the signal below reaches the command and its worker, as Ctrl-C on a terminal does.
    process = subprocess.Popen(
        command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=_env(tmp_path / "home"),
        start_new_session=True,
    )  # fmt: skip
    assert process.stderr is not None
    seen: list[str] = []
    for line in iter(process.stderr.readline, ""):
        seen.append(line)
        if line.startswith("epoch 2/"):
            break
    latest = run / "model" / "fold_all" / "checkpoint_latest.pth"
    # Interrupt once epoch 2's checkpoint is whole (nnU-Net writes it just after the epoch's line),
    # well before epoch 3's: nnU-Net writes checkpoints in place, and an interrupted write is lost.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if torch.load(latest, map_location="cpu", weights_only=False)["current_epoch"] >= 2:
                break
        except (OSError, RuntimeError, EOFError, KeyError):
            time.sleep(0.1)
    os.killpg(process.pid, signal.SIGINT)
    rest = process.communicate(timeout=120)[1]
    assert process.returncode == 130, "".join(seen) + rest
    last = rest.strip().splitlines()[-1]
    assert "interrupted by Ctrl-C" in last and "checkpoint_latest.pth" in last and "--resume" in last, last
    saved = torch.load(latest, map_location="cpu", weights_only=False)["current_epoch"]
    reports: list[ft.EpochReport] = []
    ft.train(dataset, run, None, resume=True, epochs=saved + 1, on_epoch=reports.append)
    assert [r.epoch for r in reports] == [saved + 1]


def test_trainer_path_is_what_nnunet_searches(tmp_path: Path) -> None:
    """nnU-Net's own lookup, over that folder alone (its own tree imports torchvision, which fails here)."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class

    from stuseg.finetune import trainer

    result = CliRunner().invoke(app, ["finetune", "trainer-path"])
    assert result.exit_code == 0, result.stderr
    folder = result.stdout.strip()
    assert Path(folder) == ft.trainer_path()
    for size in ft.SIZES:
        found = recursive_find_python_class(
            folder, f"STUNetTrainer_{size}", None, base_folder=folder, cleanup_imports_from_base_folder=True
        )
        assert found is getattr(trainer, f"STUNetTrainer_{size}")
        assert issubclass(found, nnUNetTrainer)


def _bad(args: list[str]) -> str:
    result = CliRunner().invoke(app, ["finetune", "train", *args])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code != 0 and len(lines) == 1, result.stderr
    return lines[0]


def _raw(tmp_path: Path, with_json: bool = True) -> Path:
    folder = tmp_path / "Dataset007_Tiny"
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    if with_json:
        meta = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "a": 1}, "numTraining": 0}
        (folder / "dataset.json").write_text(json.dumps({**meta, "file_ending": ".nii.gz"}))
    return folder


def test_bad_inputs_get_one_line_each(tmp_path: Path) -> None:
    raw = _raw(tmp_path)
    out = str(tmp_path / "run")
    cpu = ["--device", "cpu"]
    assert "no dataset.json" in _bad(
        [str(_raw(tmp_path / "b", with_json=False)), "-o", out, "--size", "small", *cpu]
    )
    assert "did you mean small" in _bad([str(raw), "-o", out, "--size", "smal", *cpu])
    assert "unknown fold '7'" in _bad([str(raw), "-o", out, "--size", "small", "--fold", "7", *cpu])
    assert "no fine-tuning run to resume" in _bad(["-o", out, "--resume"])
    assert "stuseg download --size small" in _bad([str(raw), "-o", out, "--size", "small", *cpu])
    assert "--lr must be" in _bad([str(raw), "-o", out, "--size", "small", "--lr", "-1", *cpu])
    assert "one device" in _bad([str(raw), "-o", out, "--size", "small", "--gpus", "2", *cpu])
    assert "--size" in _bad([str(raw), "-o", out, *cpu])
    assert not (tmp_path / "run").exists()  # nothing was started


def test_patch_plans_gives_stunet_six_stages_and_one_normalisation() -> None:
    config = {
        "patch_size": [40, 48, 48],
        "normalization_schemes": ["CTNormalization", "ZScoreNormalization"],
        "architecture": {
            "arch_kwargs": {
                "n_stages": 7,
                "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2], [1, 2, 2], [1, 1, 2]],
                "kernel_sizes": [[1, 3, 3]] * 7,
                "features_per_stage": [32, 64, 128, 256, 320, 320, 320],
                "n_conv_per_stage": [2] * 7,
                "n_conv_per_stage_decoder": [2] * 6,
            }
        },
    }
    plans, changes = ft.patch_plans({"configurations": {"3d_fullres": config}}, "ct")
    new = plans["configurations"]["3d_fullres"]
    kwargs = new["architecture"]["arch_kwargs"]
    assert kwargs["strides"] == [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2], [1, 2, 2]]
    assert kwargs["n_stages"] == 6 and kwargs["kernel_sizes"] == [[3, 3, 3]] * 6
    assert len(kwargs["features_per_stage"]) == 6 and len(kwargs["n_conv_per_stage_decoder"]) == 5
    assert new["patch_size"] == [40, 32, 32]  # multiples of the strides' product (8, 32, 32)
    assert new["normalization_schemes"] == ["CTNormalization"] * 2
    assert set(changes) >= {"strides", "n_stages", "kernel_sizes", "patch_size", "normalization_schemes"}
    assert config["architecture"]["arch_kwargs"]["n_stages"] == 7  # the input is left alone


def test_settings_take_nnunets_defaults() -> None:
    settings = ft.resolve_settings(size="S")
    assert (settings.size, settings.fold, settings.epochs, settings.iterations_per_epoch) == (
        "small",
        "0",
        1000,
        250,
    )
    assert (settings.val_iterations_per_epoch, settings.lr, settings.save_every) == (50, 1e-3, 50)
    assert ft.resolve_settings(size="base", from_scratch=True).lr == 1e-2
    assert ft.resolve_settings(size="base", lr=0).lr == 0.0  # a control run
    assert ft.resolve_settings(size="base", iterations_per_epoch=100).val_iterations_per_epoch == 20
    assert ft.resolve_settings(size="base", iterations_per_epoch=2).val_iterations_per_epoch == 1


def test_a_dataset_folder_gets_an_nnunet_name(tmp_path: Path) -> None:
    assert ft.dataset_name(tmp_path / "Dataset042_Shapes") == "Dataset042_Shapes"
    assert ft.dataset_name(tmp_path / "my liver-scans") == "Dataset500_myliverscans"
    assert ft.dataset_name(tmp_path / "Dataset42_Short") == "Dataset500_Dataset42Short"


def test_epoch_parser_reads_nnunets_lines() -> None:
    parser = ft.EpochParser(10)
    lines = [
        "2026-12-07 12:00:00.1: Epoch 4",
        "2026-12-07 12:00:00.2: Current learning rate: 0.00998",
        "2026-12-07 12:00:09.3: train_loss -0.4321",
        "2026-12-07 12:00:09.4: val_loss -0.3",
        "2026-12-07 12:00:09.5: Pseudo dice [np.float32(0.5), np.float32(0.0312)]",
        "2026-12-07 12:00:09.6: Epoch time: 9.5 s",
    ]
    reports = [r for r in map(parser.feed, lines) if r is not None]
    assert reports == [ft.EpochReport(5, 10, -0.4321, -0.3, (0.5, 0.0312), 9.5)]
