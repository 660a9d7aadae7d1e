"""A result on disk: one owner (``write``) and the writers per format.

``write`` (where every output of one scan goes, the checks before any work, ``write_result``),
``outputs`` (staging, so that a result appears whole or not at all, and the run marker),
``locks`` (one run per output), ``labelmaps`` (masks and multilabel files), ``dicomseg`` and
``rtstruct`` (the DICOM outputs).

``stuseg.results.Request``, ``stuseg.results.write_result``, ... are ``stuseg.results.write``'s
names, imported on first use.
"""

from __future__ import annotations

from stuseg._moved import forwarding

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


__getattr__ = forwarding(__name__, "stuseg.results.write", __all__)
