"""stuseg: segment the 104 TotalSegmentator structures in CT with STU-Net.

Importing this package does not import torch; ``segment`` and ``build_network`` load it on
first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from stuseg.errors import InputError, LabelError, OutputError, StusegError, WeightsError

__version__ = "0.1.0"

__all__ = [
    "InputError",
    "LabelError",
    "OutputError",
    "StusegError",
    "WeightsError",
    "__version__",
    "build_network",
    "segment",
]

if TYPE_CHECKING:
    from stuseg.network import build_network
    from stuseg.pipeline import segment

_LAZY = {"segment": "stuseg.pipeline", "build_network": "stuseg.network"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'stuseg' has no attribute {name!r}")
