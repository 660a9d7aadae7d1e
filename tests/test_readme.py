"""The README's Python examples run as written, each as a script of its own in a fresh interpreter.

What they name is made first, in a folder that stands for the user's: ``ct.nii.gz`` and
``ct2.nii.gz`` (small synthetic CTs), ``scans/`` with two of them, the small model's weights in
the cache (a fabricated checkpoint brought in with ``stuseg import-weights``, as a user without
the hub would), and a fine-tuned model registered as ``liver-v2`` (``stuseg import-model``).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import REPO, make_ct_array
from fabricate import small_checkpoint
from model_folders import state_dict_of, tiny_arch, write_v2_folder

README = REPO / "README.md"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)


def python_blocks() -> list[str]:
    return BLOCK.findall(README.read_text(encoding="utf-8"))


def _ct(path: Path, seed: int) -> None:
    affine = np.diag([1.5, 1.5, 1.5, 1.0])
    img = nib.Nifti1Image(make_ct_array((40, 36, 32), seed), affine)
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, path)


def _stuseg(*args: object, cwd: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "stuseg", *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr


@pytest.fixture
def user_folder(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path / "work"
    for name, seed in (("ct.nii.gz", 0), ("ct2.nii.gz", 1), ("scans/a.nii.gz", 2), ("scans/b.nii.gz", 3)):
        _ct(home / name, seed)
    _stuseg("import-weights", small_checkpoint(lambda: tmp_path_factory.mktemp("fabricated")), cwd=home)
    folder = write_v2_folder(
        tmp_path / "Dataset501_Liver",
        state_dict_of(tiny_arch(num_classes=3)),
        labels=("liver", "Liver_Tumour"),
    )
    _stuseg("import-model", folder, "--name", "liver-v2", cwd=home)
    return home


def test_the_readme_has_the_examples_this_test_runs() -> None:
    blocks = python_blocks()
    assert len(blocks) == 4
    assert any("stuseg.batch.run" in b for b in blocks)
    assert any("from stuseg.runs.cohort import cohort_of" in b for b in blocks)
    assert any('model="liver-v2"' in b for b in blocks)


@pytest.mark.slow  # three interpreters, each loading torch and running a model on CPU
def test_every_python_example_runs_as_written(user_folder: Path) -> None:
    for number, code in enumerate(python_blocks(), start=1):
        script = user_folder / f"example_{number}.py"
        script.write_text(code, encoding="utf-8")
        done = subprocess.run(
            [sys.executable, script.name], cwd=user_folder, capture_output=True, text=True, timeout=600
        )
        assert done.returncode == 0, f"README example {number}:\n{code}\n{done.stderr}"
    results = user_folder / "results"
    assert sorted(p.name for p in results.iterdir() if p.is_dir()) == ["a", "b"]
    assert (results / "stuseg-batch.jsonl").is_file()


def _bash_blocks() -> list[str]:
    return re.findall(r"^```bash\n(.*?)^```", README.read_text(encoding="utf-8"), re.MULTILINE | re.DOTALL)


def test_the_set_up_commands_come_first_and_the_user_install_names_real_extras() -> None:
    blocks = _bash_blocks()
    assert blocks[0].splitlines() == [
        'python3 -m pip install -c constraints-cpu.txt -e ".[test]"',
        'python3 -m pytest -m "not slow" -q',
    ]
    install = next(b for b in blocks if "download.pytorch.org/whl/cpu" in b)
    assert install.index("pip install torch") < install.index("pip install .")  # torch first
    project = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    section = project.split("[project.optional-dependencies]")[1].split("\n[")[0]
    extras = set(re.findall(r"^(\w+) = \[", section, re.MULTILINE))  # tomllib is Python 3.11+
    named = set(re.findall(r'"\.\[(\w+)\]"', install)) | set(re.findall(r"add (\w+) for", install))
    named |= set(re.findall(r", (\w+) for", install))
    assert named == {"dicom", "ray", "finetune"} and named <= set(extras)
