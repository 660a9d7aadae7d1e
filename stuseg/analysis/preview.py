"""A preview picture of a segmentation: three slices with the structures overlaid, a front view
of all structures, and a legend, drawn with Pillow (no display server, no 3D renderer).

The volume is first turned, with whole-voxel flips and axis swaps only (nibabel's
``io_orientation``), into the closest RAS+ storage, so any input orientation (RAS, LPS, ...)
gives the same picture. The views are drawn as radiologists read them: the patient's right on
the image's left (coronal, axial, front view), head up (coronal, sagittal, front view), anterior
at the top of the axial view and on the left of the sagittal view. Every view is resampled to
square pixels of one common size in millimetres, so anisotropic voxels are not squashed and
the views share one scale.

- CT: soft-tissue window, width 400 HU at level 40 HU.
- Slices: through the centroid of all labelled voxels. Structures are filled at 45% opacity
  over the CT and outlined at full colour.
- Front view: for each (x, z), the structure nearest the viewer looking at the patient's front
  (front-most labelled voxel along y), shaded by its depth and by the slope of the surface.
- Colours: ``stuseg.structures.colors.label_colors``, the colours of the viewer label files and the DICOM-SEG.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import nibabel as nib
import numpy as np

from stuseg.analysis.statistics import jit, label_counts
from stuseg.errors import InputError
from stuseg.structures.colors import label_colors

__all__ = [
    "FILL_ALPHA",
    "VIEW_PIXELS",
    "WINDOW_LEVEL_HU",
    "WINDOW_WIDTH_HU",
    "Views",
    "draw_views",
    "render",
    "write_preview",
]

if TYPE_CHECKING:
    from PIL import Image

WINDOW_LEVEL_HU = 40.0  # soft-tissue window: level 40 HU, width 400 HU
WINDOW_WIDTH_HU = 400.0
FILL_ALPHA = 0.45  # opacity of a structure's fill over the CT; outlines are opaque
VIEW_PIXELS = 384  # the longest side of the scanned volume spans this many pixels
_BACKGROUND = (40, 40, 40)  # canvas; the views have black backgrounds
_TEXT = (235, 235, 235)
_FONT_PX = 14
_GAP = 8  # pixels between panels


def _font(size: int = _FONT_PX):  # -> ImageFont.FreeTypeFont | ImageFont.ImageFont
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # Pillow's built-in scalable font
    except TypeError:  # pragma: no cover - Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def _merge(labels: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
    """One label map to paint: layers of overlapping masks are painted in order (last on top)."""
    if isinstance(labels, np.ndarray):
        return labels
    layers = list(labels)
    if len(layers) == 1:
        return layers[0]
    out = layers[0].copy()
    for layer in layers[1:]:
        np.copyto(out, layer, where=layer != 0)
    return out


def _to_ras(arr: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """A view of ``arr`` in the closest RAS+ storage (flips and axis swaps only)."""
    return nib.orientations.apply_orientation(arr, nib.io_orientation(affine))


def _ras_spacing(affine: np.ndarray) -> np.ndarray:
    """Voxel size in mm along the RAS-stored axes."""
    ornt = nib.io_orientation(affine)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    out = np.empty(3)
    out[ornt[:, 0].astype(int)] = spacing
    return out


def _window(ct: np.ndarray) -> np.ndarray:
    """CT values to 0..1 in the soft-tissue window."""
    lo = WINDOW_LEVEL_HU - WINDOW_WIDTH_HU / 2
    return np.clip((ct.astype(np.float32) - lo) / WINDOW_WIDTH_HU, 0.0, 1.0)


def _screen(plane: np.ndarray) -> np.ndarray:
    """A RAS plane (first axis x or y, second axis y or z) as displayed: the first axis descending
    left to right (patient's right, or anterior, on the left), the second descending top to
    bottom (superior, or anterior, at the top)."""
    return plane[::-1, ::-1].T


def _nearest(img: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resampling of a 2D array to ``shape`` (pixel centres aligned)."""
    rows = np.minimum(
        ((np.arange(shape[0]) + 0.5) * img.shape[0] / shape[0]).astype(np.intp), img.shape[0] - 1
    )
    cols = np.minimum(
        ((np.arange(shape[1]) + 0.5) * img.shape[1] / shape[1]).astype(np.intp), img.shape[1] - 1
    )
    return img[np.ix_(rows, cols)]


def _bilinear(img: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear resampling of a float 2D array to ``shape`` (Pillow's, pixel centres aligned)."""
    from PIL import Image

    pic = Image.fromarray(np.ascontiguousarray(img, dtype=np.float32), mode="F")
    return np.asarray(pic.resize((shape[1], shape[0]), Image.Resampling.BILINEAR))


def _outline(lab: np.ndarray) -> np.ndarray:
    """Labelled pixels with a 4-neighbour of another value."""
    edge = np.zeros(lab.shape, bool)
    edge[1:, :] |= lab[1:, :] != lab[:-1, :]
    edge[:-1, :] |= lab[:-1, :] != lab[1:, :]
    edge[:, 1:] |= lab[:, 1:] != lab[:, :-1]
    edge[:, :-1] |= lab[:, :-1] != lab[:, 1:]
    return edge & (lab != 0)


def _overlay(gray: np.ndarray, lab: np.ndarray, lut: np.ndarray) -> np.ndarray:
    """RGB uint8: the windowed CT with the labels filled and outlined in their colours."""
    rgb = np.repeat((gray * 255.0)[..., None], 3, axis=2)
    color = lut[lab].astype(np.float32)
    inside = lab != 0
    rgb[inside] = (1 - FILL_ALPHA) * rgb[inside] + FILL_ALPHA * color[inside]
    edge = _outline(lab)
    rgb[edge] = color[edge]
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def _pixels(extent_mm: tuple[float, float], pixel_mm: float) -> tuple[int, int]:
    return (max(1, round(extent_mm[0] / pixel_mm)), max(1, round(extent_mm[1] / pixel_mm)))


def _slice_view(
    ct_plane: np.ndarray,
    lab_plane: np.ndarray,
    spacing: tuple[float, float],
    pixel_mm: float,
    lut: np.ndarray,
) -> np.ndarray:
    """One displayed slice: planes already in screen orientation, spacing (rows, cols) in mm."""
    shape = _pixels((ct_plane.shape[0] * spacing[0], ct_plane.shape[1] * spacing[1]), pixel_mm)
    gray = np.clip(_bilinear(_window(ct_plane), shape), 0.0, 1.0)
    return _overlay(gray, _nearest(lab_plane, shape), lut)


@jit
def _first_from_front(lab, depth, seen):  # pragma: no cover - compiled
    """For each (x, z) of a RAS-ordered label map, the front-most labelled voxel: its depth in
    voxels from the anterior face (y = n1 - 1) and its label; ``depth`` starts at -1."""
    n0, n1, n2 = lab.shape
    for k in range(n2):
        for d in range(n1):
            j = n1 - 1 - d
            for i in range(n0):
                if depth[i, k] < 0 and lab[i, j, k] != 0:
                    depth[i, k] = d
                    seen[i, k] = lab[i, j, k]


def _front_view(lab: np.ndarray, spacing: np.ndarray, pixel_mm: float, lut: np.ndarray) -> np.ndarray:
    """The structures seen from the patient's front: RGB, shaded by depth and surface slope."""
    depth = np.full((lab.shape[0], lab.shape[2]), -1, np.int64)
    seen = np.zeros(depth.shape, lab.dtype)
    _first_from_front(lab, depth, seen)
    hit = depth >= 0
    shape = _pixels((lab.shape[2] * spacing[2], lab.shape[0] * spacing[0]), pixel_mm)
    seen_px = _nearest(_screen(seen), shape)
    if not hit.any():
        return np.zeros((*shape, 3), np.uint8)
    depth_mm = depth * spacing[1]
    near, far = depth_mm[hit].min(), depth_mm[hit].max()
    cue = 1.0 - 0.55 * (depth_mm - near) / max(far - near, 1e-6)  # farther is darker
    # Surface slope (mm of depth per mm across) on the voxel grid; clipped at the jumps between
    # structures. The outward normal (x, z, towards the viewer) tilts where the surface recedes.
    d_x, d_z = np.gradient(np.where(hit, depth_mm, far), spacing[0], spacing[2])
    d_x, d_z = np.clip(d_x, -4, 4), np.clip(d_z, -4, 4)
    normal = np.stack([d_x, d_z, np.ones_like(d_x)])
    normal /= np.linalg.norm(normal, axis=0)
    # Light from the viewer, a little from the patient's right (screen left) and from above.
    light = np.array([0.3, 0.4, 0.87])
    lambert = np.clip(np.tensordot(light / np.linalg.norm(light), normal, axes=1), 0.0, 1.0)
    shade = _bilinear(_screen(np.clip(cue * (0.35 + 0.65 * lambert), 0.0, 1.0)), shape)
    rgb = lut[seen_px].astype(np.float32) * np.clip(shade, 0.0, 1.0)[..., None]
    rgb[seen_px == 0] = 0
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


@dataclass
class Views:
    """The four pictures of a preview, before layout.

    ``images``: title -> RGB uint8 array (rows, cols, 3), square pixels of ``pixel_mm``;
    ``edges``: title -> the side of the patient at the image's (left, right) edge;
    ``present``: the label values with at least one voxel; ``colors``: value -> RGB;
    ``centre``: the (x, y, z) indices of the slices in the RAS-reoriented volume.
    """

    images: dict[str, np.ndarray]
    edges: dict[str, tuple[str, str]]
    present: list[int]
    colors: dict[int, tuple[int, int, int]]
    pixel_mm: float
    centre: tuple[int, int, int]


def draw_views(
    labels: np.ndarray | Sequence[np.ndarray],
    affine: np.ndarray,
    ct: np.ndarray,
    names: Mapping[int, str],
) -> Views:
    """The coronal, sagittal and axial slices through the structures' centroid and the front view.

    Args:
        labels: integer label map on the CT's grid, or layers of overlapping masks (last on top).
        affine: the voxel-to-RAS affine shared by ``labels`` and ``ct``.
        ct: intensities in HU, same shape as ``labels``.
        names: label value -> structure name (for the colours).

    Returns:
        The pictures and what they show (see ``Views``).

    Raises:
        InputError: ``labels`` and ``ct`` differ in shape.
    """
    lab = _merge(labels)
    ct = np.asanyarray(ct)
    if lab.shape != ct.shape or lab.ndim != 3:
        raise InputError(f"segmentation shape {lab.shape} and CT shape {ct.shape} differ")
    affine = np.asarray(affine, np.float64)
    colors = label_colors(names)
    counts, per_axis_storage = label_counts(lab)
    top = int(max(max(names, default=0), len(counts) - 1))
    lut = np.zeros((top + 1, 3), np.uint8)
    for value, rgb in colors.items():
        lut[value] = rgb
    lut[0] = 0
    present = [int(v) for v in np.flatnonzero(counts) if v]

    lab_r, ct_r = _to_ras(lab, affine), _to_ras(ct, affine)
    sp = _ras_spacing(affine)
    # Labelled voxels per index along each RAS axis: the storage axes' counts, reordered and flipped.
    ornt = nib.io_orientation(affine)
    per_axis = [np.empty(0)] * 3
    for axis, (ras_axis, flip) in enumerate(ornt.astype(int)):
        per_axis[ras_axis] = per_axis_storage[axis][::-1] if flip < 0 else per_axis_storage[axis]
    total = per_axis[0].sum()
    if total:
        cx, cy, cz = (round(float((np.arange(len(c)) * c).sum() / total)) for c in per_axis)
    else:
        cx, cy, cz = (n // 2 for n in lab_r.shape)
    pixel_mm = float(max(n * s for n, s in zip(lab_r.shape, sp))) / VIEW_PIXELS

    planes = {  # title: (CT plane, label plane, pixel size (rows, cols))
        "coronal": (ct_r[:, cy, :], lab_r[:, cy, :], (sp[2], sp[0])),
        "sagittal": (ct_r[cx, :, :], lab_r[cx, :, :], (sp[2], sp[1])),
        "axial": (ct_r[:, :, cz], lab_r[:, :, cz], (sp[1], sp[0])),
    }
    images = {
        t: _slice_view(_screen(c), _screen(lb), size, pixel_mm, lut) for t, (c, lb, size) in planes.items()
    }
    images["front view"] = _front_view(lab_r, sp, pixel_mm, lut)
    edges = {"coronal": ("R", "L"), "sagittal": ("A", "P"), "axial": ("R", "L"), "front view": ("R", "L")}
    return Views(images, edges, present, colors, pixel_mm, (cx, cy, cz))


def render(
    labels: np.ndarray | Sequence[np.ndarray],
    affine: np.ndarray,
    ct: np.ndarray,
    names: Mapping[int, str],
) -> Image.Image:
    """The preview picture of a segmentation on its CT: ``draw_views`` laid out in a 2 x 2 grid
    (coronal, sagittal / axial, front view) with titles, edge letters and a legend.

    Args:
        labels: integer label map on the CT's grid, or layers of overlapping masks (last on top).
        affine: the voxel-to-RAS affine shared by ``labels`` and ``ct``.
        ct: intensities in HU, same shape as ``labels``.
        names: label value -> structure name (for the legend and the colours).

    Returns:
        A Pillow RGB image.

    Raises:
        InputError: ``labels`` and ``ct`` differ in shape.
    """
    from PIL import Image, ImageDraw

    drawn = draw_views(labels, affine, ct, names)
    present = drawn.present
    views = [(t, drawn.images[t], drawn.edges[t]) for t in ("coronal", "sagittal", "axial", "front view")]

    font = _font()
    title_h = _FONT_PX + 6
    col_w = [max(views[0][1].shape[1], views[2][1].shape[1]), max(views[1][1].shape[1], views[3][1].shape[1])]
    row_h = [max(views[0][1].shape[0], views[1][1].shape[0]), max(views[2][1].shape[0], views[3][1].shape[0])]
    grid_w = _GAP + col_w[0] + _GAP + col_w[1] + _GAP
    grid_h = _GAP + 2 * (title_h + _GAP) + row_h[0] + row_h[1] + _GAP

    # Legend: a swatch and the name of each structure present, in columns as tall as the grid.
    line_h = _FONT_PX + 4
    legend_title = f"{len(present)} structures" if present else "no structures"
    per_col = max(1, (grid_h - 2 * _GAP - line_h) // line_h)
    n_cols = max(1, -(-len(present) // per_col))
    name_w = max((int(font.getlength(names[v])) for v in present), default=80)
    legend_col_w = 12 + 6 + name_w + 2 * _GAP
    canvas = Image.new("RGB", (grid_w + n_cols * legend_col_w, grid_h), _BACKGROUND)
    draw = ImageDraw.Draw(canvas)

    for n, (title, rgb, (left, right)) in enumerate(views):
        row, col = divmod(n, 2)
        x0 = _GAP + (col_w[0] + _GAP) * col
        y0 = _GAP + (title_h + row_h[0] + _GAP) * row
        draw.text((x0, y0), title, fill=_TEXT, font=font)
        y_img = y0 + title_h
        canvas.paste(Image.fromarray(rgb, mode="RGB"), (x0, y_img))
        h, w = rgb.shape[:2]
        # Which side of the patient each image edge shows.
        draw.text((x0 + 3, y_img + h // 2 - _FONT_PX // 2), left, fill=_TEXT, font=font)
        right_x = x0 + w - 3 - int(font.getlength(right))
        draw.text((right_x, y_img + h // 2 - _FONT_PX // 2), right, fill=_TEXT, font=font)

    x_leg = grid_w
    draw.text((x_leg + _GAP, _GAP), legend_title, fill=_TEXT, font=font)
    for n, value in enumerate(sorted(present, key=lambda v: names[v])):
        c, r = divmod(n, per_col)
        x = x_leg + _GAP + c * legend_col_w
        y = _GAP + line_h * (r + 1)
        draw.rectangle((x, y + 2, x + 11, y + 13), fill=drawn.colors[value])
        draw.text((x + 18, y), names[value], fill=_TEXT, font=font)
    return canvas


def write_preview(
    labels: np.ndarray | Sequence[np.ndarray],
    affine: np.ndarray,
    ct: np.ndarray,
    names: Mapping[int, str],
    png_path: Path,
) -> None:
    """Render the preview (see ``render``) and write it as PNG to ``png_path``.

    Plain write: callers write into a staged folder or a temporary file and move it into place.

    Raises:
        InputError: ``labels`` and ``ct`` differ in shape.
        OSError: the file cannot be written.
    """
    from PIL.PngImagePlugin import PngInfo

    from stuseg import __version__

    # A text chunk ahead of the pixels says who wrote the file, so a later run recognises it as
    # its own output (stuseg.results.outputs) and may replace it.
    info = PngInfo()
    info.add_text("Software", f"written by stuseg {__version__}")
    # compress level 3: near level 6 in size, in half the time
    render(labels, affine, ct, names).save(Path(png_path), format="PNG", compress_level=3, pnginfo=info)
