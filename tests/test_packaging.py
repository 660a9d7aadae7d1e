"""The wheel holds every file of the package: each module, the data, the trainers' folder.

A package left out of pyproject's list (``stuseg.runs`` once was) still imports from a checkout
or an editable install and fails only for a user who installs the wheel; so the wheel is built
here and read back.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # builds the wheel: 2 s here, longer where pip must fetch setuptools first
def test_the_wheel_holds_every_file_of_the_package(tmp_path: Path) -> None:
    tracked = subprocess.run(
        ["git", "ls-files", "stuseg", "pyproject.toml", "README.md"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    source = tmp_path / "source"  # a clean copy: a build/ folder left in the checkout could hide a loss
    for name in tracked:
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, source / name)
    build = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", str(source)]
    if importlib.util.find_spec("setuptools") is not None:  # else pip fetches it to build
        build.append("--no-build-isolation")
    subprocess.run([*build, "-w", str(tmp_path)], check=True, capture_output=True, timeout=600, cwd=tmp_path)
    (wheel,) = tmp_path.glob("stuseg-*.whl")
    packed = set(zipfile.ZipFile(wheel).namelist())
    package = [n for n in tracked if n.startswith("stuseg/")]
    assert len(package) > 60
    assert sorted(set(package) - packed) == []
