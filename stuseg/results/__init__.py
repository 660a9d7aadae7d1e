"""A result on disk: one owner (``write``) and the writers per format.

``write`` (where every output of one scan goes, the checks before any work, ``write_result``),
``outputs`` (staging, so that a result appears whole or not at all, and the run marker),
``locks`` (one run per output), ``labelmaps`` (masks and multilabel files), ``dicomseg`` and
``rtstruct`` (the DICOM outputs).

``stuseg.results.Request``, ``stuseg.results.write_result``, ... are ``stuseg.results.write``'s
names, imported on first use.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "PRODUCTS",
    "Layout",
    "Product",
    "Request",
    "Sources",
    "Written",
    "check_request",
    "dicom_source",
    "mode_name",
    "read_ct",
    "write_result",
]


def __getattr__(name: str) -> Any:
    """``stuseg.results.X`` for a public name of ``stuseg.results.write`` (PEP 562)."""
    if name in __all__:
        from stuseg.results import write

        return getattr(write, name)
    raise AttributeError(f"module 'stuseg.results' has no attribute {name!r}")
