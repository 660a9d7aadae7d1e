"""Reading images and writing label maps; a volume always travels with its geometry.

``Volume.data`` is indexed like nibabel's arrays (i, j, k) and ``Volume.affine`` maps those
indices to RAS+ millimetres (the NIfTI convention). ``Volume.header`` is the NIfTI header whose
qform/sform (and their codes) every output copies, so a mask lies exactly on the input's grid.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from stuseg.errors import OutputError


@dataclass
class Volume:
    """A 3D image with the geometry needed to write results on the same grid."""

    data: np.ndarray
    affine: np.ndarray
    header: nib.Nifti1Header

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along i, j, k (column norms of the affine)."""
        sp = np.linalg.norm(self.affine[:3, :3], axis=0)
        return (float(sp[0]), float(sp[1]), float(sp[2]))


def nifti_header_for(affine: np.ndarray, shape: tuple[int, ...], code: int = 1) -> nib.Nifti1Header:
    """A NIfTI header with both qform and sform set to ``affine`` (code 1 = scanner)."""
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_qform(affine, code=code)
    hdr.set_sform(affine, code=code)
    hdr.set_xyzt_units("mm", "sec")
    return hdr


_GEOMETRY_FIELDS = (
    "qform_code",
    "sform_code",
    "quatern_b",
    "quatern_c",
    "quatern_d",
    "qoffset_x",
    "qoffset_y",
    "qoffset_z",
    "srow_x",
    "srow_y",
    "srow_z",
    "xyzt_units",
)


def label_image(data: np.ndarray, like: nib.Nifti1Header) -> nib.Nifti1Image:
    """A uint8 NIfTI image on the grid of header ``like``: same shape, qform, sform and codes."""
    if data.dtype != np.uint8:
        raise TypeError("label images are written as uint8")
    shape = tuple(int(s) for s in like.get_data_shape()[:3])
    if data.shape != shape:
        raise ValueError(f"label map shape {data.shape} differs from the reference grid {shape}")
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(data.shape)
    hdr.set_data_dtype(np.uint8)
    # Copy the geometry fields verbatim (not re-derived from a matrix), so qform, sform, their
    # codes and pixdim are bitwise the input's.
    for field in _GEOMETRY_FIELDS:
        hdr[field] = like[field]
    pixdim = hdr["pixdim"].copy()
    pixdim[0:4] = like["pixdim"][0:4]  # pixdim[0] is qfac, the qform's handedness
    hdr["pixdim"] = pixdim
    # No intensity scaling for label values.
    hdr.set_slope_inter(1.0, 0.0)
    img = nib.Nifti1Image(data, None, header=hdr)
    return img


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; rename it to ``path`` only if the block succeeds.

    The temporary name keeps the final suffixes (``.nii.gz``) so writers pick the same format.
    An interrupted or failed write never leaves a truncated file under the final name.
    """
    path = Path(path)
    suffixes = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
    tmp = path.with_name(
        f".{path.name[: len(path.name) - len(suffixes)]}.{uuid.uuid4().hex[:8]}.partial{suffixes}"
    )
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def save_image(img: nib.Nifti1Image, path: Path) -> None:
    """Write a NIfTI image atomically; disk-full and permission problems become OutputError."""
    try:
        with atomic_path(Path(path)) as tmp:
            nib.save(img, tmp)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise OutputError(f"cannot write {path}: {reason}") from None


def write_label_map(data: np.ndarray, like: nib.Nifti1Header, path: Path) -> None:
    """Write a uint8 label map or mask on the grid of ``like``, atomically."""
    save_image(label_image(data, like), path)
