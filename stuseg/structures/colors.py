"""Structure colours: one RGB colour per label, the same in every output that shows one.

The preview, the ITK-SNAP and 3D Slicer label tables (``stuseg.results.labelmaps``), the DICOM-SEG's
RecommendedDisplayCIELabValue (``stuseg.results.dicomseg``) and any other writer take their colours from
:func:`label_colors`.

- The published model's structures have the anatomical colours of 3D Slicer's terminologies
  (``data/colors.csv``: its header names the sources and licences), changed only where two
  structures that can touch would look alike: such pairs differ by at least
  ``NEIGHBOUR_DISTANCE`` (CIEDE2000), and every two structures by at least ``LEGEND_DISTANCE``.
- Any other name (a fine-tuned model's labels) gets a colour derived from its name alone, the
  first of a fixed sequence of candidates that keeps ``NEIGHBOUR_DISTANCE`` from the colours
  already in the table (a new structure may touch any of them); where none does, the least
  distance asked for steps down, so the colour stays deterministic and distinct.

Colour science here is sRGB (IEC 61966-2-1) <-> CIE L*a*b* (D65 white) and the CIEDE2000 colour
difference (CIE 142-2001; Sharma, Wu and Dalal 2005).
"""

from __future__ import annotations

import csv
import functools
import zlib
from collections.abc import Mapping
from importlib import resources

import numpy as np

__all__ = [
    "LEGEND_DISTANCE",
    "NEIGHBOUR_DISTANCE",
    "delta_e",
    "lab_to_rgb",
    "label_colors",
    "rgb_to_lab",
    "structure_colors",
]

RGB = tuple[int, int, int]

# CIEDE2000 of about 1 is a just-noticeable difference side by side; differences up to about 10
# need a second look. Touching structures are shown as half-transparent fills over a grey CT
# (preview.FILL_ALPHA) and as thin outlines, which halves the chroma of a fill: 20 keeps a pair
# apart at a glance even then.
NEIGHBOUR_DISTANCE = 20.0
# Any two structures of one table: told apart in a legend swatch placed next to each other.
LEGEND_DISTANCE = 3.0
# Less distance asked for, step by step, when no candidate of a new name keeps the one before.
_FALLBACK_STEPS = (NEIGHBOUR_DISTANCE, 12.0, 6.0, LEGEND_DISTANCE, 1.0, 0.0)
_WHITE_D65 = np.array([0.95047, 1.0, 1.08883])
_SRGB_TO_XYZ = np.array(
    [[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750], [0.0193339, 0.1191920, 0.9503041]]
)


def rgb_to_lab(rgb: np.ndarray | tuple[float, float, float]) -> np.ndarray:
    """sRGB in 0..255 (any shape ending in 3) -> CIE L*a*b* (D65)."""
    c = np.asarray(rgb, np.float64) / 255.0
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    xyz = linear @ _SRGB_TO_XYZ.T / _WHITE_D65
    eps = (6 / 29) ** 3
    f = np.where(xyz > eps, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


def lab_to_rgb(lab: np.ndarray | tuple[float, float, float]) -> np.ndarray:
    """CIE L*a*b* (D65) -> sRGB in 0..255, unclipped (out-of-gamut colours fall outside 0..255)."""
    lab = np.asarray(lab, np.float64)
    fy = (lab[..., 0] + 16) / 116
    f = np.stack([fy + lab[..., 1] / 500, fy, fy - lab[..., 2] / 200], -1)
    xyz = np.where(f > 6 / 29, f**3, 3 * (6 / 29) ** 2 * (f - 4 / 29)) * _WHITE_D65
    linear = xyz @ np.linalg.inv(_SRGB_TO_XYZ).T
    c = np.where(linear <= 0.0031308, 12.92 * linear, 1.055 * np.abs(linear) ** (1 / 2.4) - 0.055)
    return c * 255.0


def delta_e(lab1: np.ndarray, lab2: np.ndarray) -> np.ndarray:
    """CIEDE2000 colour difference of L*a*b* colours (arrays ending in 3, broadcast together)."""
    lab1, lab2 = np.asarray(lab1, np.float64), np.asarray(lab2, np.float64)
    l1, a1, b1 = lab1[..., 0], lab1[..., 1], lab1[..., 2]
    l2, a2, b2 = lab2[..., 0], lab2[..., 1], lab2[..., 2]
    c_mean = (np.hypot(a1, b1) + np.hypot(a2, b2)) / 2
    g = 0.5 * (1 - np.sqrt(c_mean**7 / (c_mean**7 + 25.0**7)))
    a1p, a2p = a1 * (1 + g), a2 * (1 + g)
    c1p, c2p = np.hypot(a1p, b1), np.hypot(a2p, b2)
    h1p = np.degrees(np.arctan2(b1, a1p)) % 360
    h2p = np.degrees(np.arctan2(b2, a2p)) % 360
    dh = h2p - h1p
    dh = np.where(dh > 180, dh - 360, np.where(dh < -180, dh + 360, dh))
    dh = np.where(c1p * c2p == 0, 0.0, dh)
    d_l, d_c = l2 - l1, c2p - c1p
    d_h = 2 * np.sqrt(c1p * c2p) * np.sin(np.radians(dh / 2))
    l_mean, cp_mean = (l1 + l2) / 2, (c1p + c2p) / 2
    h_sum = h1p + h2p
    h_mean = np.where(np.abs(h1p - h2p) > 180, np.where(h_sum < 360, h_sum + 360, h_sum - 360), h_sum) / 2
    h_mean = np.where(c1p * c2p == 0, h_sum, h_mean)
    t = (
        1
        - 0.17 * np.cos(np.radians(h_mean - 30))
        + 0.24 * np.cos(np.radians(2 * h_mean))
        + 0.32 * np.cos(np.radians(3 * h_mean + 6))
        - 0.20 * np.cos(np.radians(4 * h_mean - 63))
    )
    s_l = 1 + 0.015 * (l_mean - 50) ** 2 / np.sqrt(20 + (l_mean - 50) ** 2)
    s_c = 1 + 0.045 * cp_mean
    s_h = 1 + 0.015 * cp_mean * t
    r_c = 2 * np.sqrt(cp_mean**7 / (cp_mean**7 + 25.0**7))
    r_t = -np.sin(np.radians(2 * 30 * np.exp(-(((h_mean - 275) / 25) ** 2)))) * r_c
    return np.sqrt((d_l / s_l) ** 2 + (d_c / s_c) ** 2 + (d_h / s_h) ** 2 + r_t * (d_c / s_c) * (d_h / s_h))


@functools.cache
def structure_colors() -> dict[str, RGB]:
    """The colour of every structure of the published models, by name, from ``data/colors.csv``."""
    text = resources.files("stuseg").joinpath("data/colors.csv").read_text(encoding="utf-8")
    rows = csv.DictReader(line for line in text.splitlines() if not line.startswith("#"))
    return {r["structure"]: (int(r["r"]), int(r["g"]), int(r["b"])) for r in rows}


@functools.cache
def _candidates(folded: str) -> tuple[np.ndarray, np.ndarray]:
    """A name's candidate colours (RGB and L*a*b*), in a fixed order that starts at a hue taken
    from the name: hues step by the golden angle, lightness and chroma through four levels."""
    start = zlib.crc32(folded.encode("utf-8", "surrogatepass")) / 2**32 * 360
    rows = []
    for step in range(128):
        hue = np.radians(start + step * 137.50776405)
        light, chroma = ((65, 55), (50, 60), (78, 45), (40, 45))[step % 4]
        rows.append((light, chroma * np.cos(hue), chroma * np.sin(hue)))
    rgb = np.rint(np.clip(lab_to_rgb(np.array(rows)), 0, 255))
    return rgb.astype(np.int64), rgb_to_lab(rgb)


def _fallback(folded: str, used: list[np.ndarray]) -> RGB:
    rgb, lab = _candidates(folded)
    if not used:
        return tuple(int(x) for x in rgb[0])  # type: ignore[return-value]
    least = delta_e(lab[:, None, :], np.array(used)[None, :, :]).min(axis=1)
    for needed in _FALLBACK_STEPS:
        ok = np.nonzero(least > needed if needed == 0 else least >= needed)[0]
        if ok.size:
            return tuple(int(x) for x in rgb[ok[0]])  # type: ignore[return-value]
    return tuple(int(x) for x in rgb[int(np.argmax(least))])  # type: ignore[return-value]


def label_colors(names: Mapping[int, str]) -> dict[int, RGB]:
    """An RGB colour per label value of the table ``names`` (value -> structure name).

    A published structure's colour is its row of ``data/colors.csv`` (names compared case-blind).
    Any other name gets its first candidate colour that keeps ``NEIGHBOUR_DISTANCE`` from every
    colour given before it (published ones first, then the others in case-folded name order);
    where none does, the least distance steps down (12, 6, 3, 1, then any unused colour). The
    result depends only on the set of names, never on their values.
    """
    known = {n.lower(): c for n, c in structure_colors().items()}
    colors = {v: known[str(n).lower()] for v, n in names.items() if str(n).lower() in known}
    used = [rgb_to_lab(c) for c in colors.values()]
    for folded, value in sorted((str(n).casefold(), v) for v, n in names.items() if v not in colors):
        colors[value] = _fallback(folded, used)
        used.append(rgb_to_lab(colors[value]))
    return {v: colors[v] for v in names}
