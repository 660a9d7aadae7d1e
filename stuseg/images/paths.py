"""File-name rules: which suffixes name images, and a name without its suffix. One definition.

Suffixes are matched without regard to letter case (``CT.NII.GZ`` is a NIfTI file like
``ct.nii.gz``), and the double suffix ``.nii.gz`` counts as one. Pure string work: nothing here
touches the file system.
"""

from __future__ import annotations

import re
from pathlib import Path

__all__ = [
    "IMAGE_SUFFIXES",
    "NIFTI_SUFFIXES",
    "SITK_SUFFIXES",
    "channel_name",
    "channel_of",
    "image_suffix",
    "nifti_stem",
    "stem",
]

NIFTI_SUFFIXES = (".nii.gz", ".nii")
SITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")  # read through SimpleITK
IMAGE_SUFFIXES = NIFTI_SUFFIXES + SITK_SUFFIXES  # longest first where one ends another


def image_suffix(path: str | Path) -> str:
    """The suffix in lower case, ``.nii.gz`` taken whole (``""`` for a name without one)."""
    name = Path(path).name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") and len(name) > len(".nii.gz") else Path(name).suffix


def nifti_stem(path: str | Path) -> str | None:
    """``seg`` for ``seg.nii.gz``, ``seg.NII.GZ`` or ``seg.nii``; None if not named as NIfTI."""
    return _strip(Path(path).name, NIFTI_SUFFIXES)


def stem(path: str | Path) -> str:
    """The name without its image suffix (``.nii.gz`` whole), else without its last suffix."""
    name = Path(path).name
    stripped = _strip(name, IMAGE_SUFFIXES)
    if stripped is not None:
        return stripped
    return Path(name).stem if "." in name.lstrip(".") else name


def _strip(name: str, suffixes: tuple[str, ...]) -> str | None:
    lower = name.lower()
    for suffix in suffixes:
        if lower.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return None


# nnU-Net names a case's input channels <case>_0000<suffix>, <case>_0001<suffix>, ...
_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


def channel_of(path: str | Path) -> tuple[str, int] | None:
    """(case, channel) for a file named as nnU-Net names channels (``ct_0001.nii.gz`` -> ("ct", 1)),
    else None."""
    match = _CHANNEL.match(stem(path))
    return (match["case"], int(match["channel"])) if match else None


def channel_name(path: str | Path, channel: int) -> Path:
    """The file of ``channel`` beside ``path``, a case's channel 0 named as nnU-Net does: the same
    case and suffix (``case_0000.nii.gz``, 1 -> ``case_0001.nii.gz``)."""
    path = Path(path)
    found = channel_of(path)
    if found is None:
        raise ValueError(f"{path.name} is not named <case>_<4-digit channel><suffix>")
    suffix = path.name[len(stem(path)) :]
    return path.with_name(f"{found[0]}_{channel:04d}{suffix}")
