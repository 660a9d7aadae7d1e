"""The repository itself: it stands alone, and its torch range, constraints, CI and README agree.

The stand-alone check lives in ``.ci/run`` (``.ci/run check-standalone``); these tests run that
same script, on this repository and on small repositories made here that break the rule.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import REPO
from packaging.specifiers import SpecifierSet
from packaging.version import Version

CI = REPO / ".ci" / "run"
# Assembled from pieces so that this file does not itself match the rule it tests.
BESIDE = "shar" + "ed"


def _check(repo: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(repo / ".ci" / "run"), "check-standalone"],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_no_tracked_file_refers_to_the_folder_beside_the_repo() -> None:
    proc = _check(REPO)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("ci: stands alone")


@pytest.fixture
def toy_repo(tmp_path: Path) -> Path:
    """A git repository holding a copy of .ci/run and one innocent tracked file."""
    repo = tmp_path / "toy"
    (repo / ".ci").mkdir(parents=True)
    shutil.copy2(CI, repo / ".ci" / "run")
    (repo / "notes.md").write_text(
        f"Memory {BESIDE} by threads; {BESIDE}_cache/ and un{BESIDE}/ are other names.\n"
    )
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True)
    return repo


def test_the_check_passes_a_clean_repository(toy_repo: Path) -> None:
    proc = _check(toy_repo)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize(
    "text",
    [
        f"see ../{BESIDE}/reference/nnunet.md",
        f"data in {BESIDE}/data, here",
        f"path = ROOT.parent / '{BESIDE}' / 'data'",
        f'path = ROOT.parent / "{BESIDE}"/"reference"',
        f"windows ..\\{BESIDE}\\data",
    ],
)
@pytest.mark.parametrize("binary", [False, True], ids=["text", "binary"])
def test_the_check_fails_on_each_spelling(toy_repo: Path, text: str, binary: bool) -> None:
    bad = toy_repo / "sub" / ("blob.bin" if binary else "paths.py")
    bad.parent.mkdir()
    bad.write_bytes((b"\x00\x01" if binary else b"") + f"x = 1\n{text}\n".encode())
    subprocess.run(["git", "add", "-A"], cwd=toy_repo, check=True)
    proc = _check(toy_repo)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert lines[0].startswith("sub/blob.bin:2:" if binary else "sub/paths.py:2:")
    assert lines[-1].startswith(f"ci: FAILED: the tracked files above refer to the '{BESIDE}' folder")


def test_an_untracked_file_is_not_the_check_s_business(toy_repo: Path) -> None:
    (toy_repo / "scratch.txt").write_text(f"../{BESIDE}/data\n")
    assert _check(toy_repo).returncode == 0


def test_the_check_fails_outside_a_git_checkout(tmp_path: Path) -> None:
    (tmp_path / ".ci").mkdir()
    shutil.copy2(CI, tmp_path / ".ci" / "run")
    proc = _check(tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("ci: FAILED: git grep could not search")


# --- the torch range --------------------------------------------------------------------------------


def _ci_value(name: str) -> str:
    found = re.search(rf"^{name}=(\S+)", CI.read_text(), re.MULTILINE)
    assert found, f"{name} not set in .ci/run"
    return found[1]


def _torch_range() -> SpecifierSet:
    found = re.search(r'^\s*"torch([^"]*)",', (REPO / "pyproject.toml").read_text(), re.MULTILINE)
    assert found, "no torch requirement in pyproject.toml"
    return SpecifierSet(found[1])


def test_ci_tests_the_declared_torch_floor_and_a_current_release() -> None:
    declared = _torch_range()
    floor, main = Version(_ci_value("TORCH_FLOOR")), Version(_ci_value("TORCH_MAIN"))
    assert floor in declared and main in declared
    lower = [Version(s.version) for s in declared if s.operator == ">="]
    assert lower == [Version(f"{floor.major}.{floor.minor}")], "the floor CI tests is the declared floor"
    assert Version(f"{floor.major}.{floor.minor - 1}.99") not in declared
    assert main > floor


def test_the_floor_tests_exist() -> None:
    found = re.search(r"^FLOOR_TESTS=\(([^)]*)\)", CI.read_text(), re.MULTILINE)
    assert found
    paths = found[1].split()
    assert paths
    for path in paths:
        assert (REPO / path).is_file(), f".ci/run runs {path} against the torch floor, but it does not exist"


def test_readme_states_the_declared_torch_range() -> None:
    declared = str(_torch_range())
    readme = (REPO / "README.md").read_text()
    stated = set(re.findall(r"`torch([<>=!~][^`]*)`", readme))
    assert stated, "README.md names no torch range"
    assert {str(SpecifierSet(s)) for s in stated} == {declared}


def test_the_cpu_constraints_pin_the_torch_ci_tests() -> None:
    """The README's install command and .ci/run take the constraints file; its torch is CI's."""
    pins = dict(
        line.split("==")
        for line in (REPO / "constraints-cpu.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    )
    assert pins.keys() == {"torch", "torchvision"}
    assert pins["torch"] == _ci_value("TORCH_MAIN")
    install = 'python3 -m pip install -c constraints-cpu.txt -e ".[test]"'
    assert install in (REPO / "README.md").read_text()
    assert install.replace("pip install", "pip install --quiet") in CI.read_text()
