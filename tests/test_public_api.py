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
import subprocess
import sys
from pathlib import Path

import pytest

import stuseg

PACKAGE = Path(stuseg.__file__).parent
# Entry points: the command line's app, not a library API.
COMMAND_MODULES = {
    "stuseg.cli": ["app", "main"],
    "stuseg.cli.commands": ["app", "main"],
    "stuseg.cli.finetune": ["app"],
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
        "stuseg.cli.base",
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


# The flat modules of stuseg <= 0.x and where each went; written out here, not read from stuseg.
OLD_PATHS = {
    "stuseg.io": "stuseg.images.io",
    "stuseg.pipeline": "stuseg.inference.pipeline",
    "stuseg.labels": "stuseg.structures.labels",
    "stuseg.statistics": "stuseg.analysis.statistics",
    "stuseg.labelmaps": "stuseg.results.labelmaps",
    "stuseg.network": "stuseg.model.network",
    "stuseg.batch_ray": "stuseg.runs.cluster",
}


@pytest.mark.parametrize(("old", "new"), sorted(OLD_PATHS.items()))
def test_an_old_import_path_gives_the_moved_module_and_says_where_it_went(old: str, new: str) -> None:
    code = (
        "import importlib, warnings\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        f"    old = importlib.import_module({old!r})\n"
        f"print(old is importlib.import_module({new!r}), old.__name__)\n"
        "print([str(w.message) for w in caught if w.category is DeprecationWarning])\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    same, messages = proc.stdout.splitlines()
    assert same == f"True {new}"
    assert f"{old} moved to {new}" in messages


def test_every_old_flat_module_still_imports() -> None:
    """Each old path the finder knows resolves (a typo in its table would only show when a user hit it)."""
    from stuseg._moved import MOVED

    for old, new in MOVED.items():
        assert not (PACKAGE / f"{old.split('.')[-1]}.py").exists(), old
        with pytest.warns(DeprecationWarning, match=f"{old} moved to {new}"):
            sys.modules.pop(old, None)
            assert importlib.import_module(old) is importlib.import_module(new)


def test_the_packages_forward_their_face_modules_names() -> None:
    from stuseg import results, weights

    write = importlib.import_module("stuseg.results.write")
    cache = importlib.import_module("stuseg.weights.cache")
    assert results.write_result is write.write_result
    assert weights.download_weights is cache.download_weights
    # Each package declares its face's names, all of them (a name added to the face alone would
    # not be forwarded).
    assert sorted(results.__all__) == sorted(write.__all__)
    assert sorted(weights.__all__) == sorted(cache.__all__)
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        results.nothing  # noqa: B018
