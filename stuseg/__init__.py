"""stuseg: segment the 104 TotalSegmentator structures in CT with STU-Net, in plain PyTorch.

The public API::

    import stuseg

    seg = stuseg.segment("ct.nii.gz", size="base", fast=True)  # one call, nothing written
    segmenter = stuseg.Segmenter("base", fast=True)             # loads the model once ...
    seg = segmenter("ct.nii.gz")                                # ... for many images

- ``segment`` and ``Segmenter`` (``stuseg.inference.pipeline``) return a ``Segmentation``: ``image`` (a
  nibabel uint8 label map on the input's grid, values = model channel indices), ``names``
  (``{value: structure name}``), timings and peak memory.
- ``read_image`` and ``Volume`` (``stuseg.images.io``): an image's voxels with its affine, as stuseg
  reads it; ``StusegWarning``: what stuseg warns about (unusual input).
- ``build_network`` (``stuseg.model.network``) builds an STU-Net of one size, untrained.
- One package per job for the rest (``ARCHITECTURE.md``), importable as attributes too:
  ``stuseg.batch`` (cohorts; the work is in ``stuseg.runs``), ``stuseg.results`` (a result on
  disk: where each output goes, the one writer), ``stuseg.analysis`` (statistics, quality, the
  preview, a batch folder's tables), ``stuseg.structures`` (the label table, colours),
  ``stuseg.images``, ``stuseg.inference``, ``stuseg.model``, ``stuseg.weights``.
- The flat modules' old paths (``stuseg.io``, ``stuseg.pipeline``, ...) still import, with a
  ``DeprecationWarning`` naming the new one (``stuseg._moved``).
- Errors: every failure caused by the user's input, files or weights is a ``StusegError``
  (``InputError``, ``OutputError``, ``LabelError``, ``WeightsError``) with a one-line message.
- ``stuseg.structures.labels`` holds the label table (names, groups, TotalSegmentator v1 numbering).

Importing ``stuseg`` imports neither torch nor numba: ``segment``, ``Segmenter`` and
``build_network`` are resolved on first access (PEP 562), so the command line's ``--help``,
``labels`` and ``export-labels`` start quickly.

What stuseg changes in the process, so that a library call is as fast as the command line:

- On import, if torch is not imported yet and neither ``OMP_WAIT_POLICY`` nor
  ``GOMP_SPINCOUNT`` is set: ``GOMP_SPINCOUNT=10000`` in ``os.environ`` (idle OpenMP threads
  sleep sooner; ``stuseg.inference.threads.spin_briefly_on_import``). Opt out: ``STUSEG_TUNE_OPENMP=0``.
- While a ``Segmenter`` runs the network on the CPU: glibc's malloc keeps large blocks in the
  heap, its defaults are restored afterwards (``stuseg.inference.memory.tuned``). Opt out:
  ``STUSEG_TUNE_MALLOC=0``.
- While a call runs: torch's and numba's thread counts (``stuseg.inference.threads.limit_threads``),
  restored afterwards.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from stuseg._moved import MOVED
from stuseg._moved import install as _install_moved
from stuseg.errors import InputError, LabelError, OutputError, StusegError, WeightsError
from stuseg.inference.threads import spin_briefly_on_import as _spin_briefly_on_import

_spin_briefly_on_import()  # before torch loads, or not at all: see its docstring
_install_moved()  # stuseg.io, stuseg.pipeline, ...: the flat modules' old import paths

__version__ = "0.1.0"

__all__ = [
    "InputError",
    "LabelError",
    "OutputError",
    "Segmentation",
    "Segmenter",
    "StusegError",
    "StusegWarning",
    "Volume",
    "WeightsError",
    "__version__",
    "build_network",
    "read_image",
    "segment",
]

if TYPE_CHECKING:
    from stuseg.errors import StusegWarning
    from stuseg.images.io import Volume, read_image
    from stuseg.inference.pipeline import Segmentation, Segmenter, segment
    from stuseg.model.network import build_network

# Public name -> the module that defines it; imported (with torch) on first access only.
_LAZY = {
    "segment": "stuseg.inference.pipeline",
    "Segmenter": "stuseg.inference.pipeline",
    "Segmentation": "stuseg.inference.pipeline",
    "build_network": "stuseg.model.network",
    "read_image": "stuseg.images.io",
    "Volume": "stuseg.images.io",
    "StusegWarning": "stuseg.errors",
}
# Packages a user reaches as ``stuseg.batch.run(...)`` after a plain ``import stuseg``.
_SUBMODULES = (
    "analysis",
    "batch",
    "images",
    "inference",
    "model",
    "results",
    "runs",
    "structures",
    "weights",
)


def __getattr__(name: str) -> Any:
    """Resolve the lazily imported public names (PEP 562).

    Args:
        name: the attribute asked for.

    Returns:
        The object ``name`` in the module that defines it (importing that module once).

    Raises:
        AttributeError: ``name`` is not part of stuseg's public API.
    """
    import importlib

    if name in _LAZY:
        # Not cached here: stuseg.segment stays whatever stuseg.inference.pipeline.segment is now.
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in _SUBMODULES or f"stuseg.{name}" in MOVED:  # an old flat name warns as it imports
        return importlib.import_module(f"stuseg.{name}")  # the import binds it here for next time
    raise AttributeError(f"module 'stuseg' has no attribute {name!r}")


def __dir__() -> list[str]:
    """The module's names, including the lazily imported ones (for tab completion)."""
    return sorted({*globals(), *__all__, *_SUBMODULES})
