"""Write stuseg/data/colors.csv: the published anatomical colours, separated where neighbours collide.

Run from the repository root with the two published terminology files (see the CSV's header for
where each comes from):

    python3 scripts/make_colors.py TotalSegmentator.term.json SlicerGeneralAnatomy.json

1. Each structure's published colour: its SNOMED CT type (and laterality modifier) from
   ``stuseg/data/snomed_ct.csv`` looked up in TotalSegmentator's 3D Slicer terminology, else in
   3D Slicer's general anatomy terminology, else the colour of the enclosing structure named in
   ``_PARENT`` (face -> head, the atria -> heart).
2. Pairs that can touch: ``_neighbour_pairs`` (anatomy, written out below) and every pair that
   touches in TotalSegmentator's real results in ``tests/data/totalseg_results``.
3. In label order, each structure keeps its published colour where that is at least
   ``NEIGHBOUR_DISTANCE`` (CIEDE2000) from every neighbour already placed and ``LEGEND_DISTANCE``
   from every structure already placed; otherwise it takes the nearest colour (CIEDE2000 from the
   published one) among lightness, chroma and hue steps around it that does.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from stuseg.structures import labels as lbl
from stuseg.structures.colors import LEGEND_DISTANCE, NEIGHBOUR_DISTANCE, delta_e, lab_to_rgb, rgb_to_lab

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "tests" / "data" / "totalseg_results"
_PARENT = {"face": "69536005", "heart_atrium_left": "80891009", "heart_atrium_right": "80891009"}
HEADER = """\
# Display colours of the 104 structures that stuseg segments, one row per structure, in label order.
# Every output that shows a colour takes it from here (stuseg.structures.colors.label_colors): the
# preview, the ITK-SNAP and 3D Slicer label tables, the DICOM-SEG's RecommendedDisplayCIELabValue.
#
# published_r/g/b: the recommendedDisplayRGBValue of the structure's SNOMED CT type and laterality
# (stuseg/data/snomed_ct.csv) in, by source:
#   totalsegmentator: TotalSegmentator's 3D Slicer terminology, github.com/lassoan/SlicerTotalSegmentator,
#     TotalSegmentator/Resources/SegmentationCategoryTypeModifier-TotalSegmentator.term.json at commit
#     6a82370b44a864bc855fcde7abf683c5191df011; Apache License 2.0.
#   slicer: 3D Slicer's general anatomy terminology, github.com/Slicer/Slicer,
#     Modules/Loadable/Terminologies/Resources/SegmentationCategoryTypeModifier-SlicerGeneralAnatomy.json
#     at commit 583e9b37d50ead7daf7b783dce465ccaecec8809; 3D Slicer License (BSD style).
#   slicer-parent: the same 3D Slicer table has no colour for the structure; the colour of the
#     structure that holds it (face: Head; heart atria: Heart).
# Only the colours (facts) are carried over.
# r/g/b: the colour stuseg uses. Equal to the published one unless two structures that can touch, or
# any two structures, would look alike; then the nearest colour that keeps them apart (CIEDE2000 at
# least {neighbour} between neighbours, {legend} between any two). Made by scripts/make_colors.py.
"""


def _published_tables(paths: list[Path]) -> list[dict[tuple[str, str], tuple[int, int, int]]]:
    tables = []
    for path in paths:
        doc = json.loads(path.read_text(encoding="utf-8"))
        table: dict[tuple[str, str], tuple[int, int, int]] = {}
        for category in doc["SegmentationCodes"]["Category"]:
            for kind in category["Type"]:
                if "recommendedDisplayRGBValue" in kind:
                    table[(kind["CodeValue"], "")] = tuple(kind["recommendedDisplayRGBValue"])
                for mod in kind.get("Modifier", []):
                    if "recommendedDisplayRGBValue" in mod:
                        table[(kind["CodeValue"], mod["CodeValue"])] = tuple(
                            mod["recommendedDisplayRGBValue"]
                        )
        tables.append(table)
    return tables


def published(paths: list[Path]) -> dict[str, tuple[tuple[int, int, int], str]]:
    ts, slicer = _published_tables(paths)
    text = (REPO / "stuseg" / "data" / "snomed_ct.csv").read_text(encoding="utf-8")
    rows = csv.DictReader(line for line in text.splitlines() if not line.startswith("#"))
    out = {}
    for r in rows:
        key, bare = (r["type_code"], r["modifier_code"]), (r["type_code"], "")
        for source, table in (("totalsegmentator", ts), ("slicer", slicer)):
            if key in table or bare in table:
                out[r["structure"]] = (table.get(key) or table[bare], source)
                break
        else:
            out[r["structure"]] = (slicer[(_PARENT[r["structure"]], "")], "slicer-parent")
    return out


def _chain(names: list[str]) -> list[tuple[str, str]]:
    return list(itertools.pairwise(names))


def _neighbour_pairs() -> set[frozenset[str]]:
    """Structures that can touch in a body, side by side; a generous list."""
    spine = [f"vertebrae_C{i}" for i in range(1, 8)] + [f"vertebrae_T{i}" for i in range(1, 13)]
    spine += [f"vertebrae_L{i}" for i in range(1, 6)] + ["sacrum"]
    pairs = _chain(spine)
    heart = ["heart_atrium_left", "heart_atrium_right", "heart_ventricle_left", "heart_ventricle_right"]
    heart += ["heart_myocardium", "aorta", "pulmonary_artery"]
    pairs += itertools.combinations(heart, 2)
    for side in ("left", "right"):
        ribs = [f"rib_{side}_{i}" for i in range(1, 13)]
        pairs += _chain(ribs)
        for i in range(1, 13):
            pairs += [(f"rib_{side}_{i}", f"vertebrae_T{j}") for j in (i - 1, i, i + 1) if 1 <= j <= 12]
            pairs += [(f"rib_{side}_{i}", f"autochthon_{side}")]
        pairs += [(f"rib_{side}_{i}", f"scapula_{side}") for i in range(1, 9)]
        pairs += [(f"clavicula_{side}", f"rib_{side}_1"), (f"clavicula_{side}", f"scapula_{side}")]
        pairs += [(f"humerus_{side}", f"scapula_{side}"), (f"humerus_{side}", f"clavicula_{side}")]
        lobes = [f"lung_upper_lobe_{side}", f"lung_lower_lobe_{side}"]
        lobes += ["lung_middle_lobe_right"] if side == "right" else []
        pairs += itertools.combinations([*lobes, "trachea"], 2)
        pairs += [(lobe, h) for lobe in lobes for h in heart]
        pelvis = [f"hip_{side}", f"femur_{side}", f"iliopsoas_{side}", "sacrum", "urinary_bladder"]
        pelvis += [f"gluteus_{m}_{side}" for m in ("maximus", "medius", "minimus")]
        pelvis += [f"iliac_artery_{side}", f"iliac_vena_{side}", "colon", "small_bowel"]
        pairs += itertools.combinations(pelvis, 2)
        pairs += [(f"kidney_{side}", f"adrenal_gland_{side}"), (f"kidney_{side}", f"autochthon_{side}")]
        pairs += [(f"kidney_{side}", f"iliopsoas_{side}"), (f"iliopsoas_{side}", f"autochthon_{side}")]
        pairs += [(f"autochthon_{side}", v) for v in spine[7:]]
        pairs += [(f"iliopsoas_{side}", v) for v in spine[16:]]
        pairs += [("aorta", f"iliac_artery_{side}"), ("inferior_vena_cava", f"iliac_vena_{side}")]
    abdomen = ["liver", "gallbladder", "stomach", "duodenum", "pancreas", "spleen", "colon", "small_bowel"]
    abdomen += ["kidney_left", "kidney_right", "adrenal_gland_left", "adrenal_gland_right", "aorta"]
    abdomen += ["inferior_vena_cava", "portal_vein_and_splenic_vein", "esophagus", "urinary_bladder"]
    pairs += itertools.combinations(abdomen, 2)
    pairs += [("esophagus", "trachea"), ("esophagus", "aorta"), ("aorta", "pulmonary_artery")]
    pairs += [("aorta", v) for v in spine[7:]] + [("inferior_vena_cava", v) for v in spine[16:]]
    pairs += [("esophagus", v) for v in spine[:12]] + [("trachea", v) for v in spine[:9]]
    pairs += [("brain", "face"), ("face", "vertebrae_C1"), ("face", "vertebrae_C2")]
    # Left and right halves that meet at the midline (behind the spinous processes, at the pubic
    # symphysis, at the aortic bifurcation and the caval confluence).
    for structure in ("autochthon", "hip", "iliac_artery", "iliac_vena", "gluteus_maximus"):
        pairs += [(f"{structure}_left", f"{structure}_right")]
    known = set(lbl.STRUCTURES)
    assert all(a in known and b in known for a, b in pairs), [p for p in pairs if not set(p) <= known]
    return {frozenset(p) for p in pairs}


def touching_in_results() -> set[frozenset[str]]:
    """Pairs of stuseg structures that touch (one voxel's 26-neighbourhood) in the real results."""
    known = set(lbl.STRUCTURES)
    masks = {p.name[: -len(".nii.gz")]: p for p in sorted((RESULTS / "abdomen_ct_sm_masks").glob("*.nii.gz"))}
    volumes = {n: np.asanyarray(nib.load(p).dataobj) > 0 for n, p in masks.items() if n in known}
    multi = np.asanyarray(nib.load(RESULTS / "abdomen_ct_dicom_multilabel.nii.gz").dataobj)
    names = json.loads((RESULTS / "totalsegmentator_v2_total_labels.json").read_text(encoding="utf-8"))
    pairs: set[frozenset[str]] = set()
    for found in (volumes, {n: multi == int(v) for v, n in names.items() if n in known}):
        present = {n: m for n, m in found.items() if m.any()}
        grown = {n: ndimage.binary_dilation(m, np.ones((3, 3, 3), bool)) for n, m in present.items()}
        pairs |= {
            frozenset((a, b)) for a, b in itertools.combinations(present, 2) if (grown[a] & present[b]).any()
        }
    return pairs


def _options(rgb: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Colours around ``rgb`` (lightness, chroma and hue steps in CIE LCh), nearest first."""
    lab = rgb_to_lab(rgb)
    chroma, hue = np.hypot(lab[1], lab[2]), np.arctan2(lab[2], lab[1])
    rows = []
    for dl, dc, dh in itertools.product(range(-45, 46, 3), range(-30, 41, 5), range(-150, 151, 6)):
        c, h = max(chroma + dc, 0.0), hue + np.radians(dh)
        rows.append((min(max(lab[0] + dl, 5.0), 97.0), c * np.cos(h), c * np.sin(h)))
    raw = lab_to_rgb(np.array(rows))
    inside = ((raw >= -0.5) & (raw <= 255.5)).all(axis=1)
    rgb_options = np.rint(np.clip(raw[inside], 0, 255)).astype(np.int64)
    labs = rgb_to_lab(rgb_options)
    order = np.argsort(delta_e(labs, lab[None, :]), kind="stable")
    return rgb_options[order], labs[order]


def separate(start: dict[str, tuple[int, int, int]], neighbours: set[frozenset[str]]) -> dict[str, tuple]:
    placed: dict[str, tuple[int, int, int]] = {}
    for name in lbl.STRUCTURES:
        rgb_options, labs = _options(start[name])
        others = list(placed)
        need = np.array(
            [NEIGHBOUR_DISTANCE if frozenset((name, o)) in neighbours else LEGEND_DISTANCE for o in others]
        )
        if others:
            dist = delta_e(labs[:, None, :], rgb_to_lab(np.array([placed[o] for o in others]))[None, :, :])
            ok = np.nonzero((dist >= need[None, :]).all(axis=1))[0]
        else:
            ok = np.array([0])
        if not ok.size:
            raise SystemExit(f"no colour near {start[name]} keeps {name} apart from its neighbours")
        placed[name] = tuple(int(x) for x in rgb_options[ok[0]])
    return placed


def main(argv: list[str]) -> None:
    pub = published([Path(a) for a in argv])
    neighbours = _neighbour_pairs() | touching_in_results()
    used = separate({n: c for n, (c, _) in pub.items()}, neighbours)
    out = io.StringIO()
    out.write(HEADER.format(neighbour=f"{NEIGHBOUR_DISTANCE:g}", legend=f"{LEGEND_DISTANCE:g}"))
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["structure", "r", "g", "b", "published_r", "published_g", "published_b", "source"])
    for name in lbl.STRUCTURES:
        writer.writerow([name, *used[name], *pub[name][0], pub[name][1]])
    (REPO / "stuseg" / "data" / "colors.csv").write_text(out.getvalue(), encoding="utf-8")
    changed = sum(used[n] != pub[n][0] for n in lbl.STRUCTURES)
    print(
        f"{len(neighbours)} neighbour pairs; {changed} of {len(used)} colours moved from the published ones"
    )


if __name__ == "__main__":
    main(sys.argv[1:])
