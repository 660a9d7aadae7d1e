"""File-name rules: which suffixes name images, and a name without its suffix. One definition.

Suffixes are matched without regard to letter case (``CT.NII.GZ`` is a NIfTI file like
``ct.nii.gz``), and the double suffix ``.nii.gz`` counts as one. Pure string work: nothing here
touches the file system.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["IMAGE_SUFFIXES", "NIFTI_SUFFIXES", "SITK_SUFFIXES", "image_suffix", "nifti_stem", "stem"]

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
