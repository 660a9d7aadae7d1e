"""Reading images and writing label maps; a volume always travels with its geometry.

``Volume.data`` is indexed like nibabel's arrays (i, j, k) and ``Volume.affine`` maps those
indices to RAS+ millimetres (the NIfTI convention). ``Volume.header`` is the NIfTI header whose
qform/sform (and their codes) every output copies, so a mask lies exactly on the input's grid.
"""

from __future__ import annotations

import contextlib
import logging
import os
import struct
import sys
import tempfile
import threading
import warnings
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from stuseg.errors import InputError, StusegWarning
from stuseg.images.checks import check_gantry_tilt, check_slice_spacing
from stuseg.images.geometry import LPS_TO_RAS
from stuseg.images.paths import NIFTI_SUFFIXES, SITK_SUFFIXES, image_suffix

__all__ = [
    "SUPPORTED_INPUTS",
    "SeriesInfo",
    "StusegWarning",
    "Volume",
    "check_finite",
    "check_pixel_kind",
    "dicom_series_files",
    "image_on_grid",
    "label_image",
    "label_values",
    "load_nifti",
    "looks_like_dicom",
    "nifti_header_for",
    "read_image",
    "read_label_map",
    "spatial_shape",
]

# SimpleITK is imported inside the functions that need it: NIfTI input and `stuseg --help` do not
# pay for its import.


@dataclass
class Volume:
    """A 3D image with the geometry needed to write results on the same grid."""

    data: np.ndarray
    affine: np.ndarray
    header: nib.Nifti1Header
    # DICOM Modality (0008,0060) of a series read from DICOM; None for other formats.
    modality: str | None = None


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
    return image_on_grid(data, like)


def label_values(
    data: np.ndarray, dtype: type[np.unsignedinteger], error: type[Exception], why: str = ""
) -> np.ndarray:
    """``data`` as label values of the unsigned ``dtype``: as it is where its type is unsigned and
    no wider, else cast once its values are checked to be integers that ``dtype`` holds.

    Raises:
        ``error``: the values are not integers, or lie outside 0..max of ``dtype`` (``why`` says
            what that bound is for).
    """
    if data.dtype.kind == "u" and data.dtype.itemsize <= np.dtype(dtype).itemsize:
        return data
    if not np.issubdtype(data.dtype, np.integer):
        raise error(f"a label map must hold integers, not {data.dtype}")
    top = int(np.iinfo(dtype).max)
    if data.size and (data.min() < 0 or data.max() > top):
        raise error(f"label values must lie in 0..{top}{why}")
    return data.astype(dtype)


def image_on_grid(data: np.ndarray, like: nib.Nifti1Header) -> nib.Nifti1Image:
    """A NIfTI image of ``data`` as stored (its dtype, no intensity scaling) on the grid of header
    ``like``: same shape, qform, sform, their codes and pixdim, bit for bit."""
    shape = tuple(int(s) for s in like.get_data_shape()[:3])
    if data.shape != shape:
        raise ValueError(f"array shape {data.shape} differs from the reference grid {shape}")
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(data.shape)
    hdr.set_data_dtype(data.dtype)
    # Copy the geometry fields verbatim (not re-derived from a matrix), so qform, sform, their
    # codes and pixdim are bitwise the input's.
    for field in _GEOMETRY_FIELDS:
        hdr[field] = like[field]
    pixdim = hdr["pixdim"].copy()
    pixdim[0:4] = like["pixdim"][0:4]  # pixdim[0] is qfac, the qform's handedness
    hdr["pixdim"] = pixdim
    # No intensity scaling: the values are written as they are.
    hdr.set_slope_inter(1.0, 0.0)
    # The header's own best affine as the image's: ``img.affine`` is then the input's matrix, and
    # since the two agree, nibabel changes none of the copied fields when it builds or saves it.
    return nib.Nifti1Image(data, hdr.get_best_affine(), header=hdr)


# --------------------------------------------------------------------------------------------------
# Reading

SUPPORTED_INPUTS = (
    "a NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr) or MetaImage (.mha, .mhd) file, "
    "or a folder holding one DICOM series"
)

# Everything that nibabel raises for a damaged, truncated or foreign file.
_NIBABEL_READ_ERRORS = (
    nib.filebasedimages.ImageFileError,
    nib.spatialimages.HeaderDataError,
    OSError,
    EOFError,
    ValueError,
    zlib.error,
)

# (x, y, z) LPS <-> RAS: negate the first two world axes. Its own inverse.


@dataclass(frozen=True)
class SeriesInfo:
    """One DICOM series in a folder: its SeriesInstanceUID, SeriesDescription and file count."""

    uid: str
    description: str
    n_files: int


def looks_like_dicom(path: Path) -> bool:
    """A DICOM file by its extension or its ``DICM`` marker at byte 128 (PS3.10)."""
    if path.suffix.lower() in (".dcm", ".dicom", ".ima"):
        return True
    try:
        with path.open("rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def read_image(path: Path, series: str | None = None) -> Volume:
    """Read a 3D CT image: NIfTI, NRRD, MetaImage, or a folder with a DICOM series.

    ``series`` picks one SeriesInstanceUID in a DICOM folder that holds several. Every problem a
    user can fix raises :class:`InputError` with a one-line message.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path} does not exist; check the path")
    if path.is_dir():
        return _read_dicom_folder(path, series)
    if series is not None:
        raise InputError(f"--series applies only to a DICOM folder, but {path} is a file; leave it out")
    suffix = image_suffix(path)
    if suffix in NIFTI_SUFFIXES:
        return _read_nifti(path)
    if suffix in SITK_SUFFIXES:
        _check_detached_data_file(path)
        return _volume_from_sitk(_sitk_read_file(path), path)
    if looks_like_dicom(path):
        raise InputError(
            f"{path} is a single DICOM file; pass the folder that holds the whole series instead"
        )
    raise InputError(f"{path} has an unsupported file type; use {SUPPORTED_INPUTS}")


def check_pixel_kind(
    path: Path, dtype: np.dtype | None, components: int = 1, *, what: str = "CT image"
) -> None:
    """Refuse complex, RGB and vector pixels with a one-line :class:`InputError`.

    Args:
        path: the file, for the message.
        dtype: its voxel type (None where the reader does not say).
        components: values per voxel as the reader reports them.
        what: what the command needs, e.g. "CT image" or "label map".

    Raises:
        InputError: the pixels are complex or have several components.
    """
    gray = " (grayscale)" if what == "CT image" else ""
    if dtype is not None and dtype.kind == "c":  # before the vector test: ITK counts 2 components
        raise InputError(f"{path} holds complex values; stuseg needs a real-valued{gray} {what}")
    if components > 1 or (dtype is not None and dtype.fields is not None):
        raise InputError(f"{path} holds RGB or vector pixels; stuseg needs a single-channel{gray} {what}")


def spatial_shape(path: Path, shape: tuple[int, ...], *, what: str = "CT volume") -> tuple[int, int, int]:
    """The 3D shape of an image, accepting trailing singleton dimensions (x, y, z, 1[, 1]).

    Args:
        path: the file, for the message.
        shape: its full shape.
        what: what the command needs, e.g. "CT volume" or "label map".

    Returns:
        The first three dimensions.

    Raises:
        InputError: fewer than 3 dimensions, no voxels, or several volumes.
    """
    if len(shape) < 3:
        raise InputError(f"{path} is a {len(shape)}D image of shape {shape}; stuseg needs a 3D {what}")
    if 0 in shape:
        raise InputError(f"{path} contains no voxels (shape {shape}); check the file or export it again")
    extra = int(np.prod(shape[3:]))
    if extra != 1:
        raise InputError(
            f"{path} holds {extra} volumes (shape {shape}); stuseg needs one 3D {what}, "
            "so extract the one you want first"
        )
    return (int(shape[0]), int(shape[1]), int(shape[2]))


def check_finite(path: Path, data: np.ndarray) -> None:
    """Refuse infinite voxels (``InputError``, with their count); ``read_image`` calls it.

    NaN has a convention the models were trained with (nnU-Net sets it to 0, and so does the
    preprocessing here); Inf has none. Any value put in its place would silently change the scan,
    and a conversion that produced Inf may have damaged more, so the user decides.

    Args:
        path: where the voxels come from, for the message.
        data: the voxels; only floating-point arrays can hold Inf.

    Raises:
        InputError: the count of infinite voxels and what to do.
    """
    if data.dtype.kind != "f":
        return
    # Counted per slab along the last (slowest in Fortran order) axis: no full-volume temporary.
    infinite = sum(int(np.count_nonzero(np.isinf(data[..., k]))) for k in range(data.shape[-1]))
    if infinite:
        raise InputError(
            f"{path} holds {infinite} infinite voxel{'s' if infinite > 1 else ''} (Inf); stuseg cannot "
            "tell what they stand for, so replace them with finite values (e.g. clip to -1024..3071 HU) "
            "and run again"
        )


def _check_affine(path: Path, affine: np.ndarray) -> None:
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise InputError(
            f"{path} has an invalid voxel-to-world matrix (singular or not finite); fix its header"
        )


_NIBABEL_LOG = threading.Lock()


@contextlib.contextmanager
def _nibabel_messages() -> Iterator[list[str]]:
    """Collect what nibabel logs (header repairs such as 'pixdim[1,2,3] should be positive')
    instead of letting its handler print it on stderr; library code must not print."""
    logger = logging.getLogger("nibabel.global")
    said: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            said.append(record.getMessage())

    with _NIBABEL_LOG:
        saved = logger.handlers[:], logger.propagate
        logger.handlers, logger.propagate = [Collect()], False
        try:
            yield said
        finally:
            logger.handlers, logger.propagate = saved


def load_nifti(path: Path) -> nib.Nifti1Image:
    """Read a NIfTI-1 or NIfTI-2 file: the one NIfTI reader of stuseg (CT images, label maps, masks).

    A ``.nii.gz`` is inflated whole with ISA-L (a third of zlib's time); the header size tells
    NIfTI-1 (348 bytes) from NIfTI-2 (540) in either byte order. The file's length is checked
    against its header, so a truncated file fails here, not later when its voxels are used.
    nibabel's log messages about repaired headers are not printed: they become one
    :class:`StusegWarning`.

    Args:
        path: a ``.nii`` or ``.nii.gz`` file.

    Returns:
        The image (``Nifti2Image`` is a subclass of ``Nifti1Image``).

    Raises:
        InputError: the file cannot be read, is truncated, or is not a NIfTI image.
    """
    from isal import igzip
    from isal.igzip_lib import IsalError

    path = Path(path)
    damaged = (
        f"cannot read {path}: it is damaged, truncated or not a NIfTI image; "
        "check the file or export it again"
    )
    with _nibabel_messages() as said:
        try:
            if path.name.lower().endswith(".gz"):
                with igzip.open(path, "rb") as fh:
                    raw = fh.read()
                nifti2 = raw[:4] in (struct.pack("<i", 540), struct.pack(">i", 540))
                img = (nib.Nifti2Image if nifti2 else nib.Nifti1Image).from_bytes(raw)
                available = len(raw)
            else:
                img = nib.load(path)
                available = path.stat().st_size
        except (*_NIBABEL_READ_ERRORS, IsalError):
            raise InputError(damaged) from None
        if not isinstance(img, nib.Nifti1Image):
            raise InputError(damaged)
        hdr = img.header
        try:
            offset = int(getattr(img.dataobj, "offset", hdr.get_data_offset()))  # where voxels start
            needed = offset + int(np.prod(img.shape)) * hdr.get_data_dtype().itemsize
        except (*_NIBABEL_READ_ERRORS, TypeError):
            raise InputError(damaged) from None
        if available < needed:
            raise InputError(
                f"cannot read {path}: it is truncated ({available} of {needed} bytes); "
                "copy or export the file again"
            )
    if said:
        warnings.warn(
            f"{path} has an inconsistent header that nibabel repaired ({'; '.join(said)}); "
            "check that the result lies where you expect",
            StusegWarning,
            stacklevel=2,
        )
    return img


def _read_nifti(path: Path) -> Volume:
    img = load_nifti(path)
    hdr = img.header
    check_pixel_kind(path, hdr.get_data_dtype())
    shape3 = spatial_shape(path, img.shape)
    if int(hdr["qform_code"]) == 0 and int(hdr["sform_code"]) == 0:
        warnings.warn(
            f"{path} has neither a qform nor an sform; its orientation is unknown, so the image is "
            "assumed to lie in nibabel's default frame and the outputs will say the same",
            StusegWarning,
            stacklevel=3,  # the caller of read_image
        )
    # get_fdata applies scl_slope / scl_inter; NaNs stay NaN (the preprocessor handles them).
    volume = _nifti_volume(path, img, shape3, lambda: img.get_fdata(dtype=np.float32, caching="unchanged"))
    check_finite(path, volume.data)
    return volume


def _nifti_volume(
    path: Path, img: nib.Nifti1Image, shape3: tuple[int, int, int], read: Callable[[], np.ndarray]
) -> Volume:
    """The Volume of a loaded NIfTI whose header was checked: its affine checked, its voxels
    read by ``read`` (damage is one line), a 4D (x, y, z, 1[, 1]) array made 3D."""
    affine = np.asarray(img.affine, dtype=np.float64)
    _check_affine(path, affine)
    try:
        data = read()
    except _NIBABEL_READ_ERRORS:
        raise InputError(
            f"cannot read {path}: it is damaged, truncated or not a NIfTI image; "
            "check the file or export it again"
        ) from None
    header = img.header.copy()
    if data.ndim > 3:
        # Only dim changes: qform, sform, codes and pixdim[1:4] are the input's, so the outputs
        # describe the same 3D grid.
        data = data.reshape(shape3, order="A")
        header.set_data_shape(shape3)
    return Volume(data=data, affine=affine, header=header)


@contextlib.contextmanager
def _quiet_itk() -> Iterator[list[str]]:
    """Keep ITK, MetaIO and GDCM off the terminal; yield a list that receives what they printed.

    ITK's warnings are switched off; MetaIO and GDCM write their complaints to the C-level stderr,
    so file descriptor 2 is pointed at a temporary file for the duration (this process-wide
    redirection also hides what other threads print meanwhile). Library code must not print:
    the checks that matter are raised or warned properly, and a reader's complaint can be quoted.
    """
    import SimpleITK as sitk

    previous = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    said: list[str] = []
    with contextlib.suppress(Exception):
        sys.stderr.flush()
    with tempfile.TemporaryFile() as sink:
        try:
            saved = os.dup(2)
        except OSError:  # no stderr at all
            saved = None
        else:
            os.dup2(sink.fileno(), 2)
        try:
            yield said
        finally:
            if saved is not None:
                os.dup2(saved, 2)
                os.close(saved)
            sitk.ProcessObject.SetGlobalWarningDisplay(previous)
            sink.seek(0)
            text = sink.read().decode("utf-8", "replace")
            said.extend(line.strip() for line in text.splitlines() if line.strip())


def _quote(said: list[str], who: str) -> str:
    """`` (ITK: first line)``, short, or nothing."""
    if not said:
        return ""
    first = said[0].rstrip(".")
    return f" ({who}: {first[:120]})"


def _check_detached_data_file(path: Path) -> None:
    """For .mhd / .nhdr headers, check that a single named data file exists.

    MetaIO prints its own complaint to the console before failing, so look first. Lists, file
    patterns and data stored in the header itself are left to SimpleITK.
    """
    suffix = image_suffix(path)
    if suffix not in (".mhd", ".nhdr"):
        return
    keys = ("elementdatafile",) if suffix == ".mhd" else ("data file", "datafile")
    try:
        with path.open("r", encoding="latin-1") as f:
            lines = [f.readline() for _ in range(200)]
    except OSError:
        return
    for line in lines:
        key, sep, value = line.partition("=" if suffix == ".mhd" else ":")
        value = value.strip()
        if not sep or key.strip().lower() not in keys:
            continue
        if " " in value or "%" in value or value.upper() in ("LOCAL", "LIST") or not value:
            return
        data_file = path.parent / value
        if not data_file.exists():
            raise InputError(
                f"the data file {data_file} that {path} refers to does not exist; "
                "keep it next to its header or export the image again"
            )
        return


def _sitk_read_file(path: Path):  # -> sitk.Image
    import SimpleITK as sitk

    kind = "NRRD" if image_suffix(path) in (".nrrd", ".nhdr") else "MetaImage"
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    with _quiet_itk() as said:
        try:
            return reader.Execute()
        except RuntimeError:
            pass
    raise InputError(
        f"cannot read {path}: it is damaged, truncated or not a {kind} image, or its data file is "
        f"missing{_quote(said, 'ITK')}; check the file or export it again"
    )


def _volume_from_sitk(img, path: Path, *, label_map: bool = False) -> Volume:  # img: sitk.Image
    """A Volume from a SimpleITK image: array to (i, j, k), ITK's LPS geometry to a RAS affine.

    An image's voxels become float32; a label map's (``label_map``) keep their stored type.
    """
    import SimpleITK as sitk

    dtype = None
    if img.GetPixelID() in (sitk.sitkComplexFloat32, sitk.sitkComplexFloat64):
        dtype = np.dtype(np.complex64)
    check_pixel_kind(
        path, dtype, img.GetNumberOfComponentsPerPixel(), what="label map" if label_map else "CT image"
    )
    dim = img.GetDimension()
    shape3 = spatial_shape(
        path, tuple(int(s) for s in img.GetSize()), what="label map" if label_map else "CT volume"
    )
    # ITK's geometry: physical point (LPS mm) = origin + direction @ diag(spacing) @ (i, j, k),
    # where i runs along x (fastest in memory). For 4D+ images with singleton trailing axes keep
    # the spatial 3x3 block.
    direction = np.asarray(img.GetDirection(), dtype=np.float64).reshape(dim, dim)[:3, :3]
    spacing = np.asarray(img.GetSpacing(), dtype=np.float64)[:3]
    origin = np.asarray(img.GetOrigin(), dtype=np.float64)[:3]
    affine = np.eye(4)
    # NIfTI/nibabel want RAS+: negate the first two rows (x: L -> R, y: P -> A).
    affine[:3, :3] = LPS_TO_RAS @ direction @ np.diag(spacing)
    affine[:3, 3] = LPS_TO_RAS @ origin
    _check_affine(path, affine)
    # GetArrayViewFromImage is indexed [z, y, x] (C order); its transpose is [x, y, z] = (i, j, k)
    # in Fortran order, the same layout nibabel gives. astype copies, so nothing refers to `img`.
    view = sitk.GetArrayViewFromImage(img)
    data = view.reshape(view.shape[-3:]).T.astype(view.dtype if label_map else np.float32)
    if not label_map:
        check_finite(path, data)
    return Volume(data=data, affine=affine, header=nifti_header_for(affine, shape3))


def read_label_map(path: Path) -> Volume:
    """Read a label map file (NIfTI, NRRD or MetaImage) with its geometry, voxels as stored.

    The same readers as :func:`read_image` (so both affines are comparable with
    ``geometry.same_grid``), but the voxels keep their type (a NIfTI scaling, if any, is applied)
    and are not checked: whether they are usable labels is the caller's question.

    Args:
        path: the file.

    Returns:
        The label map; ``data`` is 3D, ``affine`` RAS+ as for images.

    Raises:
        InputError: the file does not exist, is a folder, cannot be read, or is not one 3D volume
            of single values.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path} does not exist; check the path")
    if path.is_dir():
        raise InputError(f"{path} is a folder; a label map is one file (NIfTI, NRRD or MetaImage)")
    suffix = image_suffix(path)
    if suffix in SITK_SUFFIXES:
        _check_detached_data_file(path)
        return _volume_from_sitk(_sitk_read_file(path), path, label_map=True)
    if suffix not in NIFTI_SUFFIXES:
        raise InputError(
            f"{path} has an unsupported file type for a label map; use NIfTI (.nii, .nii.gz), NRRD "
            "(.nrrd, .nhdr) or MetaImage (.mha, .mhd)"
        )
    img = load_nifti(path)
    hdr = img.header
    check_pixel_kind(path, hdr.get_data_dtype(), what="label map")
    shape3 = spatial_shape(path, img.shape, what="label map")
    return _nifti_volume(path, img, shape3, lambda: np.asanyarray(img.dataobj))


def dicom_series_files(folder: Path, series: str | None = None) -> list[Path]:
    """The files of the DICOM series in ``folder`` that ``read_image(folder, series)`` reads, in
    GDCM's slice order.

    Raises:
        InputError: the folder holds no DICOM series (with UID ``series``), or several and no ``series``.
    """
    scanned = _scan_dicom_folder(Path(folder))
    chosen = [f for info, f in scanned if series is None or info.uid == series.strip()]
    if not chosen:
        which = f" with UID {series!r}" if series is not None else ""
        raise InputError(f"{folder} holds no DICOM series{which}; check INPUT (subfolders are not searched)")
    if len(chosen) > 1:
        raise InputError(f"{folder} holds {len(chosen)} DICOM series; pick one with --series UID")
    return [Path(f) for f in chosen[0]]


def _scan_dicom_folder(folder: Path) -> list[tuple[SeriesInfo, tuple[str, ...]]]:
    """Each series in ``folder`` with its files, sorted by GDCM along the slice normal."""
    import SimpleITK as sitk

    found = []
    with _quiet_itk():
        for uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)):
            files = tuple(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid))
            info = SeriesInfo(uid=uid, description=_series_description(files[0]), n_files=len(files))
            found.append((info, files))
    return found


def _series_description(file: str) -> str:
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(file)
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return ""
    return reader.GetMetaData("0008|103e").strip() if reader.HasMetaDataKey("0008|103e") else ""


def _format_series(info: SeriesInfo) -> str:
    uid = info.uid or "(empty UID)"
    return f"{uid} ('{info.description}', {info.n_files} slices)"


def _read_dicom_folder(folder: Path, series: str | None) -> Volume:
    import SimpleITK as sitk

    if not any(folder.iterdir()):
        raise InputError(f"{folder} is an empty folder; pass {SUPPORTED_INPUTS}")
    scanned = _scan_dicom_folder(folder)
    found = [info for info, _ in scanned]
    if not found:
        raise InputError(
            f"{folder} contains no DICOM files (subfolders are not searched); pass {SUPPORTED_INPUTS}"
        )
    if series is None:
        if len(found) > 1:
            listing = ", ".join(_format_series(s) for s in found)
            raise InputError(
                f"{folder} holds {len(found)} DICOM series: {listing}; pick one with --series UID"
            )
        files = scanned[0][1]
    else:
        matches = [series_files for info, series_files in scanned if info.uid == series.strip()]
        if not matches:
            valid = ", ".join(_format_series(s) for s in found)
            raise InputError(f"{folder} has no DICOM series with UID {series!r}; valid UIDs: {valid}")
        files = matches[0]

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()
    img = None
    with _quiet_itk() as said, contextlib.suppress(RuntimeError):
        img = reader.Execute()
    if img is None:
        raise InputError(
            f"cannot read the DICOM series in {folder}: its files are damaged, use an unsupported "
            f"encoding or do not form one volume{_quote(said, 'ITK')}; check the files or export the "
            "series again"
        )
    positions = _slice_positions(reader, len(files))
    if positions is not None and len(positions) > 2 and img.GetDimension() == 3:
        # The slice checks (stuseg.images.checks): tilt first, since a tilted stack is also unevenly
        # spaced along the normal.
        direction = np.asarray(img.GetDirection(), dtype=np.float64).reshape(3, 3)
        check_gantry_tilt(folder, positions, direction[:, 2], float(min(img.GetSpacing()[:2])))
        check_slice_spacing(folder, positions, direction[:, 2], files)
    volume = _volume_from_sitk(img, folder)
    if reader.HasMetaDataKey(0, "0008|0060"):
        volume.modality = reader.GetMetaData(0, "0008|0060").strip() or None
    return volume


def _slice_positions(reader, n_files: int) -> np.ndarray | None:
    """ImagePositionPatient (LPS mm) of each file read by ``reader``; None where any is unusable."""
    positions = []
    for n in range(n_files):
        if not reader.HasMetaDataKey(n, "0020|0032"):
            return None
        try:
            xyz = [float(v) for v in reader.GetMetaData(n, "0020|0032").split("\\")]
        except ValueError:
            return None
        if len(xyz) != 3:
            return None
        positions.append(xyz)
    return np.asarray(positions, dtype=np.float64)
