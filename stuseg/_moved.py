"""The import paths of stuseg 0.x's flat modules, kept working: ``stuseg.io`` is ``stuseg.images.io``.

The modules moved into one package per job (``ARCHITECTURE.md``). Importing a module by its old
name gives the very module object of the new name (so a patch through either name patches both)
and a ``DeprecationWarning`` naming the new path. ``stuseg.results``, ``stuseg.weights`` and
``stuseg.cli`` are packages now; their old names (``Request``, ``download_weights``, ``main``, ...)
are forwarded by the packages themselves (``forwarding``).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

__all__ = ["MOVED", "forwarding", "install"]

# Old name -> new name.
MOVED = {
    "stuseg.batch_ray": "stuseg.runs.cluster",
    "stuseg.checkpoints": "stuseg.weights.checkpoints",
    "stuseg.checks": "stuseg.images.checks",
    "stuseg.cohort": "stuseg.runs.cohort",
    "stuseg.colors": "stuseg.structures.colors",
    "stuseg.dicomseg": "stuseg.results.dicomseg",
    "stuseg.fixedsums": "stuseg.inference.fixedsums",
    "stuseg.geometry": "stuseg.images.geometry",
    "stuseg.head": "stuseg.inference.head",
    "stuseg.helptext": "stuseg.cli.helptext",
    "stuseg.io": "stuseg.images.io",
    "stuseg.kernels": "stuseg.inference.kernels",
    "stuseg.labelmaps": "stuseg.results.labelmaps",
    "stuseg.labels": "stuseg.structures.labels",
    "stuseg.locks": "stuseg.results.locks",
    "stuseg.manifest": "stuseg.weights.manifest",
    "stuseg.memory": "stuseg.inference.memory",
    "stuseg.modelfolder": "stuseg.weights.modelfolder",
    "stuseg.modelstore": "stuseg.weights.modelstore",
    "stuseg.network": "stuseg.model.network",
    "stuseg.outputs": "stuseg.results.outputs",
    "stuseg.paths": "stuseg.images.paths",
    "stuseg.pipeline": "stuseg.inference.pipeline",
    "stuseg.plan": "stuseg.model.plan",
    "stuseg.postprocess": "stuseg.inference.postprocess",
    "stuseg.precision": "stuseg.model.precision",
    "stuseg.predict": "stuseg.inference.predict",
    "stuseg.preprocess": "stuseg.inference.preprocess",
    "stuseg.preview": "stuseg.analysis.preview",
    "stuseg.quality": "stuseg.analysis.quality",
    "stuseg.rtstruct": "stuseg.results.rtstruct",
    "stuseg.statistics": "stuseg.analysis.statistics",
    "stuseg.threads": "stuseg.inference.threads",
}


class _Moved(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds the old names only; loading one puts the new module under the old name."""

    def find_spec(
        self, fullname: str, path: object = None, target: object = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in MOVED:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return None  # a placeholder; exec_module replaces it in sys.modules

    def exec_module(self, module: ModuleType) -> None:
        new = MOVED[module.__name__]
        warnings.warn(
            f"{module.__name__} moved to {new}; import it from there (the old path will be removed)",
            DeprecationWarning,
            stacklevel=2,
        )
        # The import system returns what sys.modules holds under the name once this returns.
        sys.modules[module.__name__] = importlib.import_module(new)


def install() -> None:
    """Put the finder at the end of ``sys.meta_path`` once (real modules are always found first)."""
    if not any(isinstance(f, _Moved) for f in sys.meta_path):
        sys.meta_path.append(_Moved())


def forwarding(package: str, face: str, names: Sequence[str]) -> Callable[[str], Any]:
    """A package's ``__getattr__`` (PEP 562) that hands on ``names`` from its ``face`` module,
    imported on first use (so importing the package, or another of its modules, stays light)."""

    def __getattr__(name: str) -> Any:
        if name in names:
            return getattr(importlib.import_module(face), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
