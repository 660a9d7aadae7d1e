"""stuseg: segment the 104 TotalSegmentator structures in CT with STU-Net, in plain PyTorch.

The public API::

    import stuseg

    seg = stuseg.segment("ct.nii.gz", size="base", fast=True)  # one call, nothing written
    segmenter = stuseg.Segmenter("base", fast=True)             # loads the model once ...
    seg = segmenter("ct.nii.gz")                                # ... for many images

- ``segment`` and ``Segmenter`` (``stuseg.pipeline``) return a ``Segmentation``: ``image`` (a
  nibabel uint8 label map on the input's grid, values = model channel indices), ``names``
  (``{value: structure name}``), timings and peak memory.
- ``read_image`` and ``Volume`` (``stuseg.io``): an image's voxels with its affine, as stuseg
  reads it; ``StusegWarning``: what stuseg warns about (unusual input).
- ``build_network`` (``stuseg.network``) builds an STU-Net of one size, untrained.
- Submodules for the rest, importable as attributes too: ``stuseg.batch`` (cohorts),
  ``stuseg.results`` (a result on disk: where each output goes, the one writer),
  ``stuseg.cohort`` (a batch folder's tables), ``stuseg.labels``, ``stuseg.statistics``,
  ``stuseg.memory``, ``stuseg.weights``.
- Errors: every failure caused by the user's input, files or weights is a ``StusegError``
  (``InputError``, ``OutputError``, ``LabelError``, ``WeightsError``) with a one-line message.
- ``stuseg.labels`` holds the label table (names, groups, TotalSegmentator v1 numbering).

Importing ``stuseg`` imports neither torch nor numba: ``segment``, ``Segmenter`` and
``build_network`` are resolved on first access (PEP 562), so the command line's ``--help``,
``labels`` and ``export-labels`` start quickly.

What stuseg changes in the process, so that a library call is as fast as the command line:

- On import, if torch is not imported yet and neither ``OMP_WAIT_POLICY`` nor
  ``GOMP_SPINCOUNT`` is set: ``GOMP_SPINCOUNT=10000`` in ``os.environ`` (idle OpenMP threads
  sleep sooner; ``stuseg.threads.spin_briefly_on_import``). Opt out: ``STUSEG_TUNE_OPENMP=0``.
- While a ``Segmenter`` runs the network on the CPU: glibc's malloc keeps large blocks in the
  heap, its defaults are restored afterwards (``stuseg.memory.tuned``). Opt out:
  ``STUSEG_TUNE_MALLOC=0``.
- While a call runs: torch's and numba's thread counts (``stuseg.threads.limit_threads``),
  restored afterwards.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from stuseg.errors import InputError, LabelError, OutputError, StusegError, WeightsError
from stuseg.threads import spin_briefly_on_import as _spin_briefly_on_import

_spin_briefly_on_import()  # before torch loads, or not at all: see its docstring

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
    from stuseg.io import Volume, read_image
    from stuseg.network import build_network
    from stuseg.pipeline import Segmentation, Segmenter, segment

# Public name -> the module that defines it; imported (with torch) on first access only.
_LAZY = {
    "segment": "stuseg.pipeline",
    "Segmenter": "stuseg.pipeline",
    "Segmentation": "stuseg.pipeline",
    "build_network": "stuseg.network",
    "read_image": "stuseg.io",
    "Volume": "stuseg.io",
    "StusegWarning": "stuseg.errors",
}
# Submodules a user reaches as ``stuseg.batch.run(...)`` after a plain ``import stuseg``.
_SUBMODULES = ("batch", "cohort", "labels", "memory", "results", "statistics", "weights")


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
        # Not cached here: stuseg.segment stays whatever stuseg.pipeline.segment is now.
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"stuseg.{name}")  # the import binds it here for next time
    raise AttributeError(f"module 'stuseg' has no attribute {name!r}")


def __dir__() -> list[str]:
    """The module's names, including the lazily imported ones (for tab completion)."""
    return sorted({*globals(), *__all__, *_SUBMODULES})
