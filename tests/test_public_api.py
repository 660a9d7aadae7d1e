"""Every public module declares its public names (``__all__``), and the declaration is whole.

The oracle is the module's source read with ``ast``: every function and class it defines at top
level without a leading underscore must be declared (constants may stay module-internal), and every
declared name must exist. Command modules declare only their Typer app and entry point: their
commands are not API.
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import pytest

import stuseg

PACKAGE = Path(stuseg.__file__).parent
# Entry points: the command line's app, not a library API.
COMMAND_MODULES = {
    "stuseg.cli.app": ["app", "main"],
    "stuseg.finetune.cli": ["app"],
    "stuseg.finetune.worker": ["main"],
}
MODULES = sorted(
    m.name
    for m in pkgutil.walk_packages([str(PACKAGE)], "stuseg.")
    if not m.name.endswith("__main__") and ".nnunet_trainers" not in m.name
)


def _defined(name: str) -> set[str]:
    """Public functions and classes defined at the top level of a module's source."""
    module = importlib.import_module(name)
    tree = ast.parse(Path(module.__file__).read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            found.add(node.name)
    return {n for n in found if not n.startswith("_")}


def test_the_walk_finds_the_modules() -> None:
    assert {
        "stuseg.structures.colors",
        "stuseg.structures.labels",
        "stuseg.inference.pipeline",
        "stuseg.cli.app",
        "stuseg.finetune.run",
    } <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_a_module_declares_all_its_public_names(name: str) -> None:
    module = importlib.import_module(name)
    declared = getattr(module, "__all__", None)
    assert declared is not None, f"{name} has no __all__"
    assert len(declared) == len(set(declared))
    missing = [n for n in declared if not hasattr(module, n)]
    assert missing == [], f"{name}.__all__ names what it lacks"
    if name in COMMAND_MODULES:
        assert sorted(declared) == sorted(COMMAND_MODULES[name])
    elif name != "stuseg":  # the package's lazy face declares what it re-exports
        undeclared = sorted(_defined(name) - set(declared) - {"jit"})
        assert undeclared == [], f"{name} defines public names missing from __all__"


def test_the_package_exports_the_python_api() -> None:
    for name in ("segment", "Segmenter", "Segmentation", "Volume", "read_image", "StusegWarning"):
        assert name in stuseg.__all__
        assert getattr(stuseg, name) is not None
