"""``--help`` of every command reads as the user types it: no Python types, no braces.

Each command's help is taken through Typer's test runner (the list of commands comes from the
Typer app, so a new command is checked too); ``predict --help`` also from a real
``python -m stuseg``, which must print the same.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from stuseg.cli import app

# What Typer 0.2x writes unless told otherwise: ``{INPUT}``, ``INPUT <str>``, ``<list[Path]>``.
TYPE_NOISE = re.compile(r"<(str|int|float|path|bool|Path|list\[[^\]]*\]|float range|int range)>")


def _commands() -> list[list[str]]:
    found = [[]]
    for info in app.registered_commands:
        found.append([info.name])
    for group in app.registered_groups:
        found.append([group.name])
        found.extend([group.name, c.name] for c in group.typer_instance.registered_commands)
    return found


def _help(words: list[str]) -> str:
    result = CliRunner().invoke(app, [*words, "--help"], terminal_width=80)
    assert result.exit_code == 0, result.output
    return result.stdout


def _help_of_the_real_command(words: list[str]) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "stuseg", *words, "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture(scope="module")
def helps() -> dict[str, str]:
    return {" ".join(words): _help(words) for words in _commands()}


def test_every_command_is_checked(helps: dict[str, str]) -> None:
    assert {"predict", "batch", "export-labels", "statistics", "preview", "finetune prepare"} <= set(helps)


def test_no_python_types_or_braces_in_any_help(helps: dict[str, str]) -> None:
    for words, text in helps.items():
        assert TYPE_NOISE.search(text) is None, f"stuseg {words} --help: {TYPE_NOISE.search(text)}"
        usage = text.splitlines()[0]
        assert "{" not in usage, f"stuseg {words} --help: {usage}"


def test_usage_names_the_arguments_as_typed(helps: dict[str, str]) -> None:
    assert helps["predict"].splitlines()[0].endswith("predict [OPTIONS] INPUT OUTPUT")
    assert helps["batch"].splitlines()[0].endswith("batch [OPTIONS] SOURCE...")
    assert helps["export-labels"].splitlines()[0].endswith("export-labels [OPTIONS] SEGMENTATION OUTPUT")
    assert re.search(r"^  SOURCE\.\.\.\s+CT files", helps["batch"], re.MULTILINE)
    assert re.search(r"^  -s, --size SIZE\s", helps["predict"], re.MULTILINE)
    assert re.search(r"^  --checkpoint <final\|best>", helps["predict"], re.MULTILINE)  # choices stay


def test_fast_is_described_as_measured(helps: dict[str, str]) -> None:
    text = " ".join(helps["predict"].split())
    assert "far less memory" not in text and "much less" not in text.lower()
    assert "same network time" in text


def test_the_real_command_prints_the_same_help(helps: dict[str, str]) -> None:
    real = _help_of_the_real_command(["predict"]).splitlines()
    assert real[0] == "Usage: python -m stuseg predict [OPTIONS] INPUT OUTPUT"
    # the same words; the runner names the program otherwise, and the terminal's width may differ
    assert " ".join(real[1:]).split() == " ".join(helps["predict"].splitlines()[1:]).split()
