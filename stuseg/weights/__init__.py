"""Which weights, verified and cached; fine-tuned nnU-Net model folders and their registry.

``manifest`` (which published checkpoint each size is, pinned with its hash), ``checkpoints``
(read, validate and write checkpoint files), ``digests`` (files' sha256, remembered while a file
is unchanged), ``cache`` (download, import, load, report what is
there), ``modelfolder`` (a fine-tuned nnU-Net v1/v2 folder, read safely), ``modelstore`` (the
registry of imported models).

``stuseg.weights.download_weights``, ``stuseg.weights.load_weights``, ... are
``stuseg.weights.cache``'s names, imported on first use.
"""

from __future__ import annotations

from stuseg._moved import forwarding

__all__ = [
    "BY_ARCH",
    "BY_HUB",
    "BY_MANIFEST",
    "Installed",
    "LoadedWeights",
    "Progress",
    "WeightsStatus",
    "cached_path",
    "download_weights",
    "import_weights",
    "load_weights",
    "sha256_file",
    "stuseg_home",
    "weights_status",
]


__getattr__ = forwarding(__name__, "stuseg.weights.cache", __all__)
