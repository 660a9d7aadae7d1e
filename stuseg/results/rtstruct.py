"""DICOM RT Structure Set (RTSTRUCT) output for results on a DICOM series, written with pydicom.

One RT Structure Set per run: one ROI per structure present, named as the model names it, coloured
as in the viewer colour tables (``labelmaps.label_colors``), its contours on the source slices and
referencing them (Referenced Frame of Reference, RT Referenced Study / Series, and each contour's
Contour Image Sequence naming its slice's SOP Instance UID). Patient and study attributes are
copied from the source; the structure set is marked UNAPPROVED (an automatic result, reviewed by
nobody yet).

Contours. The label map is placed on each source image's pixels through that image's own
ImagePositionPatient, ImageOrientationPatient and PixelSpacing (``dicomseg.label_frames``, the
mapping the DICOM-SEG uses), so no flip or slice order is assumed. On each slice, each structure's
outline is traced along the pixel edges (:func:`outlines`): the polygons run through pixel corners,
so they enclose exactly the structure's pixels, with the area of its pixel count, and a reader that
fills by pixel centres gets the label map back voxel for voxel. Corners become patient coordinates
(LPS mm) with the same slice's geometry: pixel (row m, column n) is at IPP + n * PixelSpacing[1] *
IOP[:3] + m * PixelSpacing[0] * IOP[3:].

Holes. DICOM's CLOSED_PLANAR contours have no notion of a hole. A hole (e.g. the lumen inside a
vessel wall, a gap inside a bone) is written as its own CLOSED_PLANAR contour inside the outer one,
and the contours of one ROI on one slice combine by parity (a point is inside when an odd number of
them surround it): the rule radiotherapy planning systems and viewers such as Orthanc's apply to
nested contours. Outer outlines run clockwise on the image (rows down), holes counter-clockwise.
Keyholes (one contour cut open into each hole) were not chosen: they put a zero-width channel into
every holed structure, which readers draw as a line across it. Pieces touching only at a corner are
separate contours that share that corner point.

Library: pydicom, in the ``stuseg[dicom]`` extra already (highdicom has no RT Structure Set). The
outline tracer is numpy. rt-utils 1.2.7 (its latest release, January 2023) was not used: it maps
every slice with the first slice's geometry and a mean slice spacing (wrong for uneven spacing or a
reordered series), multiplies the row direction by the row spacing (wrong for non-square pixels),
traces contours through boundary pixel centres with OpenCV (half a pixel inside the structure; a
one-pixel piece becomes a point) and needs opencv-python.

The file is written in Implicit VR Little Endian, the transfer syntax every DICOM reader supports,
in which an element's length is not limited to the 64 KiB of Explicit VR's DS elements (a long
ContourData can exceed it).
"""

from __future__ import annotations

import datetime as _dt
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from stuseg.errors import OutputError
from stuseg.images import paths
from stuseg.results.dicomseg import DicomSource, label_frames

__all__ = ["RT_STRUCTURE_SET_STORAGE", "outlines", "rtstruct_path_for", "write_rtstruct"]

RT_STRUCTURE_SET_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
# The SOP class an RT Referenced Study Sequence item gives for a study. No current SOP class stands
# for a study; writers of RTSTRUCTs use the retired Study Component Management (this one) or
# Detached Study Management (1.2.840.10008.3.1.2.3.1) SOP class; dciodvfy accepts this one.
_STUDY_COMPONENT_MANAGEMENT = "1.2.840.10008.3.1.2.3.2"

# Direction of each edge of an outline as a (row, column) step: east, south, west, north. Walking
# along an edge, the structure lies on the right (rows point down), so outer outlines run clockwise.
_STEP = np.array([[0, 1], [1, 0], [0, -1], [-1, 0]], dtype=np.int64)

# Copied from the source: patient and study (type 2 where present in the source, else empty).
_PATIENT_STUDY = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)
_OPTIONAL_COPIED = ("IssuerOfPatientID", "PatientAge", "PatientSize", "PatientWeight", "StudyDescription")
# LO (at most 64 characters): ROIName, StructureSetName.
_LO_CHARS = 64


def rtstruct_path_for(output: Path, multilabel: bool) -> Path:
    """Where ``stuseg predict`` writes the RTSTRUCT: ``rtstruct.dcm`` in the output folder, or,
    with ``--ml OUT.nii.gz``, ``OUT_rtstruct.dcm`` beside the multilabel file.

    Args:
        output: the OUTPUT of ``stuseg predict``.
        multilabel: whether ``--ml`` was given (OUTPUT is then a file).

    Returns:
        The path of the RTSTRUCT file.
    """
    output = Path(output)
    if not multilabel:
        return output / "rtstruct.dcm"
    return output.with_name(paths.stem(output) + "_rtstruct.dcm")


def outlines(frame: np.ndarray) -> dict[int, list[np.ndarray]]:
    """The outlines of every labelled region of one 2D label image, along the pixel edges.

    Args:
        frame: integer labels indexed [row, column]; 0 is background.

    Returns:
        Label value -> its closed polygons, each an array (N, 2) of (row, column) corner points in
        pixel-index units (pixel (m, n) is the square m +- 0.5, n +- 0.5), without repeating the
        first point and with no point in the middle of a straight run. Outer outlines run clockwise
        on the image, holes counter-clockwise; together (by parity) they enclose exactly the pixels
        of the label. A region touching another of its label only at a corner has its own polygon.
    """
    f = np.pad(np.asarray(frame), 1)  # background all round: every outline closes
    above, below, left, right = f[:-1], f[1:], f[:, :-1], f[:, 1:]
    edges = []  # (label, start row, start column, direction), corners on the padded image
    for mask, lab, dr, dc, d in (
        ((above != below) & (below != 0), below, 1, 0, 0),  # east, along the top of `below`
        ((above != below) & (above != 0), above, 1, 1, 2),  # west, along the bottom of `above`
        ((left != right) & (right != 0), right, 1, 1, 3),  # north, up the left side of `right`
        ((left != right) & (left != 0), left, 0, 1, 1),  # south, down the right side of `left`
    ):
        r, c = np.nonzero(mask)
        edges.append((lab[r, c].astype(np.int64), r + dr, c + dc, np.full(r.size, d)))
    lab, row, col, d = (np.concatenate(part) for part in zip(*edges))
    if lab.size == 0:
        return {}
    height, width = f.shape[0] + 1, f.shape[1] + 1  # corner rows and columns

    def key(rows: np.ndarray, cols: np.ndarray, dirs: np.ndarray) -> np.ndarray:
        return ((lab * height + rows) * width + cols) * 4 + dirs

    order = np.argsort(key(row, col, d))
    keys = key(row, col, d)[order]
    end_row, end_col = row + _STEP[d, 0], col + _STEP[d, 1]
    succ = np.full(lab.size, -1, dtype=np.int64)
    # At a corner shared by two diagonal pixels of the label, two edges leave: turning right keeps
    # to the pixel walked along, so diagonal neighbours get separate polygons.
    for turn in (3, 0, 1):  # left, straight, right: the last found wins
        wanted = key(end_row, end_col, (d + turn) % 4)
        at = np.minimum(np.searchsorted(keys, wanted), keys.size - 1)
        found = keys[at] == wanted
        succ[found] = order[at[found]]
    result: dict[int, list[np.ndarray]] = {}
    for loop in _cycles(succ):
        turns = d[loop] != np.roll(d[loop], 1)  # keep the corners only
        points = np.stack([row[loop][turns], col[loop][turns]], axis=1) - 1.5  # padding, corner
        result.setdefault(int(lab[loop[0]]), []).append(points.astype(np.float64))
    return result


def _cycles(succ: np.ndarray) -> list[np.ndarray]:
    """The cycles of the permutation ``succ`` (edge -> next edge of its outline), as edge indices."""
    nxt = succ.tolist()
    seen = bytearray(len(nxt))
    loops = []
    for first in range(len(nxt)):
        if seen[first]:
            continue
        loop = []
        e = first
        while not seen[e]:
            seen[e] = 1
            loop.append(e)
            e = nxt[e]
        loops.append(np.asarray(loop, dtype=np.int64))
    return loops


def _patient_points(points: np.ndarray, ds: Any) -> np.ndarray:
    """(row, column) points of image ``ds`` -> (N, 3) LPS millimetres, by that image's geometry."""
    position = np.asarray([float(v) for v in ds.ImagePositionPatient], dtype=np.float64)
    cosines = np.asarray([float(v) for v in ds.ImageOrientationPatient], dtype=np.float64)
    row_spacing, col_spacing = (float(v) for v in ds.PixelSpacing)
    along_col = cosines[:3] * col_spacing  # one column to the right (n + 1)
    along_row = cosines[3:] * row_spacing  # one row down (m + 1)
    return position + points[:, 1:2] * along_col + points[:, 0:1] * along_row


def _contour_data(points: np.ndarray) -> Any:
    """ContourData (3006,0050) as an encoded element: the coordinates rounded to a micrometre (far
    below a pixel), each written as its shortest repr (e.g. -1234.567; DS allows 16 characters).

    A raw element, written as it is: pydicom would otherwise make and validate one DS object per
    coordinate (0.6 million for a 300-slice abdomen), the largest item in the writer's profile.
    """
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag

    values = (np.round(points, 3) + 0.0).ravel().tolist()  # + 0.0: no "-0.0"
    text = "\\".join(map(repr, values)).encode("ascii")
    if len(text) % 2:
        text += b" "  # DICOM values have an even length; DS pads with a space
    return RawDataElement(
        Tag(0x3006, 0x0050), "DS", len(text), text, 0, is_implicit_VR=True, is_little_endian=True
    )


def _image_ref(ds: Any) -> Any:
    from pydicom.dataset import Dataset

    ref = Dataset()
    ref.ReferencedSOPClassUID = ds.SOPClassUID
    ref.ReferencedSOPInstanceUID = ds.SOPInstanceUID
    return ref


def _contours_by_label(
    frames: np.ndarray, datasets: Sequence[Any], values: set[int]
) -> dict[int, list[tuple[Any, np.ndarray]]]:
    """Label value -> its contours: (source image, (N, 3) LPS points), slice by slice."""
    found: dict[int, list[tuple[Any, np.ndarray]]] = {}
    for frame, ds in zip(frames, datasets):
        if not frame.any():
            continue
        for value, polygons in outlines(frame).items():
            if value in values:
                found.setdefault(value, []).extend((ds, _patient_points(p, ds)) for p in polygons)
    return found


def _header(source: DicomSource, algorithm: str, version: str) -> Any:
    """The RTSTRUCT's patient, study, series, equipment, structure set and reference attributes."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ImplicitVRLittleEndian, generate_uid

    first = source.datasets[0]
    now = _dt.datetime.now()
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = RT_STRUCTURE_SET_STORAGE
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    if "SpecificCharacterSet" in first:
        ds.SpecificCharacterSet = first.SpecificCharacterSet
    ds.SOPClassUID = RT_STRUCTURE_SET_STORAGE
    ds.InstanceCreationDate = ds.StructureSetDate = ds.SeriesDate = now.strftime("%Y%m%d")
    ds.InstanceCreationTime = ds.StructureSetTime = ds.SeriesTime = now.strftime("%H%M%S")
    for name in _PATIENT_STUDY:
        setattr(ds, name, first.get(name, ""))
    for name in _OPTIONAL_COPIED:
        if first.get(name) not in (None, ""):
            setattr(ds, name, first.get(name))
    # Frame of Reference module: the source's (every contour is in its patient coordinates).
    ds.FrameOfReferenceUID = first.FrameOfReferenceUID
    ds.PositionReferenceIndicator = first.get("PositionReferenceIndicator", "")
    ds.Modality = "RTSTRUCT"
    ds.SeriesInstanceUID = generate_uid()
    # A derived series is numbered apart from its source and from the DICOM-SEG (1000 + its number).
    ds.SeriesNumber = 2000 + int(first.get("SeriesNumber") or 0)
    ds.SeriesDescription = f"stuseg {algorithm}"
    ds.OperatorsName = ""
    ds.Manufacturer = "stuseg"
    ds.ManufacturerModelName = algorithm[:_LO_CHARS]
    ds.SoftwareVersions = version
    ds.StructureSetLabel = "STUSEG"
    ds.StructureSetName = f"{algorithm} structures"[:_LO_CHARS]
    ds.StructureSetDescription = f"{algorithm} segmentation by stuseg {version}"
    ds.InstanceNumber = 1
    ds.ApprovalStatus = "UNAPPROVED"
    series = Dataset()
    series.SeriesInstanceUID = first.SeriesInstanceUID
    series.ContourImageSequence = [_image_ref(d) for d in source.datasets]
    study = Dataset()
    study.ReferencedSOPClassUID = _STUDY_COMPONENT_MANAGEMENT
    study.ReferencedSOPInstanceUID = first.StudyInstanceUID
    study.RTReferencedSeriesSequence = [series]
    frame_of_reference = Dataset()
    frame_of_reference.FrameOfReferenceUID = first.FrameOfReferenceUID
    frame_of_reference.RTReferencedStudySequence = [study]
    ds.ReferencedFrameOfReferenceSequence = [frame_of_reference]
    return ds


def _add_rois(
    ds: Any,
    rois: Sequence[tuple[str, tuple[int, int, int], list[tuple[Any, np.ndarray]]]],
    frame_of_reference: str,
    description: str,
) -> None:
    """Fill the Structure Set ROI, ROI Contour and RT ROI Observations sequences, ROI n = rois[n-1]."""
    from pydicom.charset import default_encoding
    from pydicom.dataset import Dataset

    roi_items, contour_items, observations = [], [], []
    for number, (name, color, contours) in enumerate(rois, start=1):
        roi = Dataset()
        roi.ROINumber = number
        roi.ReferencedFrameOfReferenceUID = frame_of_reference
        roi.ROIName = name[:_LO_CHARS]
        roi.ROIGenerationAlgorithm = "AUTOMATIC"
        roi.ROIGenerationDescription = description
        roi_items.append(roi)
        item = Dataset()
        item.ReferencedROINumber = number
        item.ROIDisplayColor = list(color)
        item.ContourSequence = []
        for count, (image, points) in enumerate(contours, start=1):
            contour = Dataset()
            contour.ContourNumber = count
            contour.ContourImageSequence = [_image_ref(image)]
            contour.ContourGeometricType = "CLOSED_PLANAR"
            contour.NumberOfContourPoints = len(points)
            contour[0x30060050] = _contour_data(points)
            # The encoding the raw ContourData is in, so that pydicom writes it without decoding it
            # (Dataset.set_original_encoding's purpose): the file's transfer syntax, and the
            # character set pydicom gives a new item (ASCII digits read the same in any).
            contour.set_original_encoding(True, True, default_encoding)
            item.ContourSequence.append(contour)
        contour_items.append(item)
        observation = Dataset()
        observation.ObservationNumber = number
        observation.ReferencedROINumber = number
        observation.RTROIInterpretedType = "ORGAN"
        observation.ROIInterpreter = ""
        observations.append(observation)
    ds.StructureSetROISequence = roi_items
    ds.ROIContourSequence = contour_items
    ds.RTROIObservationsSequence = observations


def write_rtstruct(
    labels: Any,
    names: Mapping[int, str],
    source: DicomSource,
    path: Path,
    *,
    algorithm: str = "STU-Net",
    colors: Mapping[int, tuple[int, int, int]] | None = None,
) -> Path | None:
    """Write one RT Structure Set: one ROI per structure present, contoured on the source slices.

    Args:
        labels: the label map as a nibabel image (values = label values of ``names``) on the grid
            read from ``source``'s series, e.g. ``Segmentation.image``.
        names: label value -> structure name (the ROI's name); values absent from the label map,
            or not in ``names``, get no ROI.
        source: the series the labels were computed on, from ``dicomseg.read_dicom_source``.
        path: the file to write (a plain write: callers write into a staged folder or file).
        algorithm: the algorithm named in the structure set (e.g. ``"STU-Net base"``).
        colors: label value -> RGB display colour; by default the viewer tables' colours,
            ``labelmaps.label_colors(names)``.

    Returns:
        ``path``, or None (with a warning) when no structure is present: an RT Structure Set
        needs at least one ROI.

    Raises:
        OutputError: the labels do not lie on the source images, or the file cannot be written.
    """
    from stuseg import __version__
    from stuseg.errors import StusegWarning
    from stuseg.results.labelmaps import label_colors

    data = np.asanyarray(labels.dataobj)
    # Segmentation.image keeps its geometry in the header only (its .affine is None).
    affine = labels.affine if labels.affine is not None else labels.header.get_best_affine()
    frames = label_frames(data, affine, source.datasets)
    contours = _contours_by_label(frames, source.datasets, {int(v) for v in names if int(v) > 0})
    if not contours:
        warnings.warn(
            f"no structure was found, so {path} was not written (an RTSTRUCT needs at least one ROI)",
            StusegWarning,
            stacklevel=2,
        )
        return None
    colors = dict(colors) if colors is not None else label_colors(names)
    rois = [(str(names[v]), colors[v], contours[v]) for v in sorted(contours)]
    ds = _header(source, algorithm, __version__)
    description = f"{algorithm} by stuseg {__version__}"
    _add_rois(ds, rois, str(source.datasets[0].FrameOfReferenceUID), description)
    if not all(name.isascii() for name, _, _ in rois):
        # The source's character set may not hold every character of a model's names; UTF-8 does.
        ds.SpecificCharacterSet = "ISO_IR 192"
    try:
        ds.save_as(Path(path), enforce_file_format=True)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None
    return Path(path)
