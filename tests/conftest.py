"""Shared fixtures. Every test runs with private caches: nothing touches the user's home."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
# Everything the tests read is committed here (sources and licences: data/README.md). No test skips
# when a file is missing: a missing file is a failure.
DATA = Path(__file__).resolve().parent / "data"
REFERENCE = DATA / "reference"


@pytest.fixture(autouse=True)
def hermetic_env(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point stuseg's and huggingface_hub's caches at a per-test temporary folder."""
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("STUSEG_HOME", str(home / "stuseg"))
    monkeypatch.setenv("HF_HOME", str(home / "hf"))
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    return home


@pytest.fixture(autouse=True)
def allocator_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts with the allocator policy of a fresh process, and whatever it changes is
    undone after it: a command run in this process (e.g. by a module-scoped fixture, which runs
    before this fixture) tunes malloc for good, as the command line does."""
    from stuseg.inference import memory

    monkeypatch.setattr(memory, "_hold_free_pages", False)
    monkeypatch.setattr(memory, "_process_tuned", False)


def make_ct_array(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    """A CT-like int16 volume: air at -1000, a soft-tissue body, a few bright blobs."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    body = (grid[0] ** 2 + grid[1] ** 2) < 0.7
    vol = np.full(shape, -1000, np.int16)
    vol[body] = 40
    for _ in range(4):
        c = rng.uniform(-0.5, 0.5, 3)
        r = rng.uniform(0.1, 0.25)
        blob = ((grid - c[:, None, None, None]) ** 2).sum(0) < r**2
        vol[blob & body] = rng.integers(100, 900)
    noise = rng.normal(0, 10, shape).astype(np.int16)
    return vol + noise


@pytest.fixture
def make_nifti(tmp_path: Path) -> Callable[..., Path]:
    """Write a synthetic CT NIfTI with a given shape and affine (default 1.5 mm RAS) and return its path."""

    def factory(
        shape: tuple[int, int, int] = (40, 36, 32),
        affine: np.ndarray | None = None,
        name: str = "ct.nii.gz",
        data: np.ndarray | None = None,
        seed: int = 0,
    ) -> Path:
        aff = np.diag([1.5, 1.5, 1.5, 1.0]) if affine is None else np.asarray(affine, float)
        arr = make_ct_array(shape, seed) if data is None else data
        img = nib.Nifti1Image(arr, aff)
        img.header.set_qform(aff, code=1)
        img.header.set_sform(aff, code=1)
        path = tmp_path / name
        nib.save(img, path)
        return path

    return factory
