"""Structure colours: anatomical, apart where structures touch, one colour per structure everywhere.

Oracles: scikit-image's colour conversions and CIEDE2000 (an implementation other than stuseg's),
the CIEDE2000 test pairs published by Sharma, Wu and Dalal (2005), and TotalSegmentator's real
results, where the touching pairs are found here by dilating one mask by one voxel.
"""

from __future__ import annotations

import json
import re

import nibabel as nib
import numpy as np
import pytest
from conftest import DATA
from scipy import ndimage
from skimage.color import deltaE_ciede2000, rgb2lab

from stuseg.results import labelmaps
from stuseg.structures import colors, labels

RESULTS = DATA / "totalseg_results"
ALL = dict(enumerate(labels.STRUCTURES, start=1))


def _lab(rgb: tuple[int, int, int]) -> np.ndarray:
    return rgb2lab(np.array(rgb, float).reshape(1, 1, 3) / 255.0).reshape(3)


def _distance(a: tuple[int, int, int], b: tuple[int, int, int]) -> float:
    return float(deltaE_ciede2000(_lab(a), _lab(b)))


# --- colour science ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lab1", "lab2", "expected"),
    [  # Sharma, Wu and Dalal (2005), Table 1: pairs 1, 7, 17, 18, 25, 34
        ((50.0, 2.6772, -79.7751), (50.0, 0.0, -82.7485), 2.0425),
        ((50.0, 0.0, 0.0), (50.0, -1.0, 2.0), 2.3669),
        ((50.0, 2.5, 0.0), (73.0, 25.0, -18.0), 27.1492),
        ((50.0, 2.5, 0.0), (61.0, -5.0, 29.0), 22.8977),
        ((60.2574, -34.0099, 36.2677), (60.4626, -34.1751, 39.4387), 1.2644),
        ((2.0776, 0.0795, -1.1350), (0.9033, -0.0636, -0.5514), 0.9082),
    ],
)
def test_ciede2000_on_the_published_test_pairs(lab1, lab2, expected) -> None:
    assert float(colors.delta_e(np.array(lab1), np.array(lab2))) == pytest.approx(expected, abs=1e-4)


def test_conversions_and_distance_agree_with_scikit_image() -> None:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (500, 3))
    other = rng.integers(0, 256, (500, 3))
    lab = colors.rgb_to_lab(rgb)
    np.testing.assert_allclose(lab, rgb2lab(rgb / 255.0), atol=0.01)  # scikit-image rounds its matrix
    np.testing.assert_allclose(colors.lab_to_rgb(lab), rgb, atol=1e-6)
    ref = deltaE_ciede2000(rgb2lab(rgb / 255.0), rgb2lab(other / 255.0))
    np.testing.assert_allclose(colors.delta_e(lab, colors.rgb_to_lab(other)), ref, atol=0.05)


# --- the published structures ------------------------------------------------------------------


def _touching(found: dict[str, np.ndarray]) -> set[tuple[str, str]]:
    """Pairs whose masks touch: one mask grown by one voxel (26-neighbourhood) meets the other.
    Each mask is grown inside its bounding box widened by one voxel, where all of its growth lies."""
    pairs = set()
    for a in sorted(found):
        box = ndimage.find_objects(found[a].astype(np.uint8))[0]
        box = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in box)
        grown = ndimage.binary_dilation(found[a][box], structure=np.ones((3, 3, 3), bool))
        pairs |= {(a, b) for b in sorted(found) if a < b and (grown & found[b][box]).any()}
    return pairs


def _real_touching_pairs() -> set[tuple[str, str]]:
    ours = set(labels.STRUCTURES)  # TotalSegmentator v2 names that are also ours
    masks = {}
    for path in sorted((RESULTS / "abdomen_ct_sm_masks").glob("*.nii.gz")):
        name = path.name.removesuffix(".nii.gz")
        if name in ours and (data := np.asanyarray(nib.load(path).dataobj) > 0).any():
            masks[name] = data
    multi = np.asanyarray(nib.load(RESULTS / "abdomen_ct_dicom_multilabel.nii.gz").dataobj)
    table = json.loads((RESULTS / "totalsegmentator_v2_total_labels.json").read_text(encoding="utf-8"))
    in_multi = {n: multi == int(v) for v, n in table.items() if n in ours and (multi == int(v)).any()}
    return _touching(masks) | _touching(in_multi)


def test_structures_that_touch_in_real_results_look_different() -> None:
    pairs = _real_touching_pairs()
    assert len(pairs) >= 40, pairs  # abdominal organs, vessels, vertebrae, muscles, ribs
    assert {("adrenal_gland_right", "liver"), ("kidney_left", "spleen"), ("aorta", "duodenum")} <= pairs
    palette = colors.label_colors(ALL)
    by_name = {ALL[v]: c for v, c in palette.items()}
    close = {(a, b): round(_distance(by_name[a], by_name[b]), 1) for a, b in pairs}
    assert {p: d for p, d in close.items() if d < colors.NEIGHBOUR_DISTANCE} == {}


def test_the_colours_the_issue_found_alike_are_now_apart() -> None:
    palette = {ALL[v]: c for v, c in colors.label_colors(ALL).items()}
    for a, b in [
        ("aorta", "inferior_vena_cava"),
        ("kidney_left", "autochthon_left"),
        ("pancreas", "urinary_bladder"),
    ]:
        assert _distance(palette[a], palette[b]) >= colors.NEIGHBOUR_DISTANCE, (a, b)


def test_every_two_structures_can_be_told_apart_in_a_legend() -> None:
    palette = list(colors.label_colors(ALL).values())
    labs = rgb2lab(np.array(palette, float).reshape(-1, 1, 3) / 255.0).reshape(-1, 3)
    i, j = np.triu_indices(len(palette), 1)
    assert deltaE_ciede2000(labs[i], labs[j]).min() >= colors.LEGEND_DISTANCE


def test_colours_keep_their_anatomical_meaning() -> None:
    """Arteries red or orange, systemic veins blue, bones lighter than muscles on average: the
    published table's sense survives the separation of neighbours."""
    palette = {ALL[v]: _lab(c) for v, c in colors.label_colors(ALL).items()}
    hue = {n: np.degrees(np.arctan2(lab[2], lab[1])) % 360 for n, lab in palette.items()}
    for artery in ("aorta", "iliac_artery_left", "iliac_artery_right"):
        assert hue[artery] < 90 or hue[artery] > 340, (artery, hue[artery])  # red through orange
    for vein in ("inferior_vena_cava", "iliac_vena_left", "iliac_vena_right", "portal_vein_and_splenic_vein"):
        assert 180 < hue[vein] < 300, (vein, hue[vein])  # cyan through blue
    bones = [palette[n][0] for n in labels.GROUPS["bones"]]
    muscles = [palette[n][0] for n in labels.GROUPS["muscles"]]
    assert np.mean(bones) > np.mean(muscles) + 15


def test_the_table_records_its_published_colours_and_sources() -> None:
    text = (colors.resources.files("stuseg") / "data" / "colors.csv").read_text(encoding="utf-8")
    assert "Apache License 2.0" in text and "3D Slicer License" in text
    rows = [line.split(",") for line in text.splitlines() if not line.startswith("#")][1:]
    assert [r[0] for r in rows] == list(labels.STRUCTURES)
    published = {r[0]: tuple(int(x) for x in r[4:7]) for r in rows}
    # spot checks against the sources: 3D Slicer's aorta and vein, TotalSegmentator's ribs
    assert published["aorta"] == (224, 97, 76)
    assert published["inferior_vena_cava"] == (0, 151, 206)
    assert published["rib_left_5"] == (253, 232, 158)
    assert {r[7] for r in rows} == {"totalsegmentator", "slicer", "slicer-parent"}


# --- names outside the table ---------------------------------------------------------------------


def test_a_new_name_keeps_its_distance_and_its_colour() -> None:
    table = {1: "liver", 2: "aorta", 3: "GTVp", 4: "lymph_node_level_II"}
    palette = colors.label_colors(table)
    for new in (3, 4):
        for other in (1, 2, 3, 4):
            if other != new:
                assert _distance(palette[new], palette[other]) >= colors.NEIGHBOUR_DISTANCE
    # the same set of names under other values: the same colours
    again = colors.label_colors({7: "lymph_node_level_II", 9: "liver", 1: "GTVp", 2: "aorta"})
    assert again[1] == palette[3] and again[7] == palette[4]
    assert colors.label_colors({1: "gtvp"}) == colors.label_colors({1: "GTVp"})  # case-blind


def test_255_new_names_get_255_colours() -> None:
    many = {v: f"class_{v:03d}" for v in range(1, 256)}
    palette = colors.label_colors(many)
    assert len(set(palette.values())) == 255
    assert colors.label_colors(many) == palette  # deterministic


# --- one colour per structure in every output --------------------------------------------------------


def test_viewer_tables_use_the_colours() -> None:
    names = {1: "liver", 5: "aorta", 6: "inferior_vena_cava", 9: "GTVp"}
    want = colors.label_colors(names)
    ctbl = re.findall(r"^(\d+) \S+ (\d+) (\d+) (\d+) 255$", labelmaps.slicer_ctbl(names), re.MULTILINE)
    assert {int(v): (int(r), int(g), int(b)) for v, r, g, b in ctbl} == want
    snap = re.findall(
        r"^\s*(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+1\s+1\s+1", labelmaps.itksnap_text(names), re.MULTILINE
    )
    assert {int(v): (int(r), int(g), int(b)) for v, r, g, b in snap} == want
    assert labelmaps.label_colors is colors.label_colors  # the old import path still works
