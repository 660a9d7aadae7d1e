"""Quality flags of a label map (pieces, laterality, empty, cut by the field of view), each against
an oracle computed another way, on crafted label maps and on TotalSegmentator's real results."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage
from typer.testing import CliRunner

from stuseg.analysis import quality, statistics
from stuseg.cli import app
from stuseg.results import scans
from stuseg.structures import labels as lbl

DATA = Path(__file__).parent / "data"
TS = DATA / "totalseg_results"


def flags(labels: np.ndarray, affine: np.ndarray, names: dict[int, str]) -> dict[str, dict[str, object]]:
    return statistics.compute(labels, affine, np.zeros(labels.shape, np.float32), names).by_name()


# --- pieces --------------------------------------------------------------------------------------


def test_a_structure_split_in_two_counts_two_pieces_and_the_exact_share() -> None:
    labels = np.zeros((20, 16, 12), np.uint8)
    labels[2:8, 2:7, 2:6] = 1  # 6 x 5 x 4 = 120 voxels
    labels[11:13, 9:12, 5:9] = 1  # 2 x 3 x 4 = 24 voxels, three voxels apart
    labels[15, 13, 9] = 1  # one voxel ...
    labels[16, 14, 10] = 1  # ... and another touching it at a corner only: one piece of 2
    names = {1: "liver", 2: "colon", 3: "my_tumour"}
    rec = flags(labels, np.eye(4), names)["liver"]
    assert rec["fragments"] == 3 and rec["voxels"] == 146
    assert rec["outside_largest_share"] == 26 / 146 == rec["stray_share"]
    assert rec["fragmented"] is True and rec["empty"] is False
    # The same pieces under names that may be in pieces, or outside the published table: counted,
    # never flagged.
    for value, name in ((2, "colon"), (3, "my_tumour")):
        rec = flags(labels * value, np.eye(4), names)[name]
        assert (rec["fragments"], rec["outside_largest_share"], rec["fragmented"]) == (3, 26 / 146, None)


def test_an_island_below_the_threshold_is_not_flagged() -> None:
    labels = np.zeros((30, 30, 30), np.uint8)
    labels[2:22, 2:22, 2:22] = 1  # 8000 voxels
    labels[25:27, 25:27, 25:27] = 1  # 8 voxels: 0.1 %
    rec = flags(labels, np.eye(4), {1: "spleen"})["spleen"]
    assert rec["fragments"] == 2 and rec["stray_share"] == 8 / 8008 and rec["fragmented"] is False
    one = np.zeros((5, 5, 5), np.uint8)
    one[1:4, 1:4, 1:4] = 1
    rec = flags(one, np.eye(4), {1: "spleen"})["spleen"]
    assert (rec["fragments"], rec["outside_largest_share"], rec["stray_share"]) == (1, 0.0, 0.0)


def test_pieces_cut_apart_by_the_field_of_view_are_not_stray() -> None:
    """An arch whose top lies above the last slice: two pieces, both reaching that face."""
    labels = np.zeros((20, 10, 12), np.uint8)
    labels[3:6, 3:6, 4:12] = 1  # 72 voxels up to the last slice
    labels[12:15, 3:6, 6:12] = 1  # 54 voxels up to the last slice
    rec = flags(labels, np.eye(4), {1: "aorta"})["aorta"]
    assert rec["fragments"] == 2 and rec["outside_largest_share"] == 54 / 126
    assert rec["stray_share"] == 0.0 and rec["fragmented"] is False and rec["touches_border"] is True
    # A piece at a face while the largest lies inside: the largest is the whole structure.
    labels[:] = 0
    labels[3:9, 3:6, 2:8] = 1  # 108 voxels, inside
    labels[12:15, 3:6, 6:12] = 1  # 54 voxels at the last slice
    rec = flags(labels, np.eye(4), {1: "aorta"})["aorta"]
    assert rec["stray_share"] == 54 / 162 == rec["outside_largest_share"] and rec["fragmented"] is True


def test_pieces_match_labelling_the_whole_volume_on_real_results() -> None:
    """Counted in each bounding box (stuseg) = counted on the whole mask (scipy, here), for every
    structure of TotalSegmentator's two results; the border rule written again here."""
    v2_names = TS / "totalsegmentator_v2_total_labels.json"
    for seg, ct, names in (
        (TS / "abdomen_ct_sm_masks", TS / "abdomen_ct_sm.nii.gz", None),
        (TS / "abdomen_ct_dicom_multilabel.nii.gz", DATA / "abdomen_ct_dicom", v2_names),
    ):
        scan = scans.load_scan(seg, ct, names=names)
        result = statistics.compute(scan.labels, scan.affine, scan.ct, scan.names).by_name()
        checked = 0
        for layer in scan.labels:
            for value in np.unique(layer)[1:]:
                rec = result[scan.names[int(value)]]
                ids, n = ndimage.label(layer == value, structure=np.ones((3, 3, 3)))
                sizes = np.array([(ids == i).sum() for i in range(1, n + 1)])
                big = int(sizes.argmax()) + 1
                faces = np.zeros(layer.shape, bool)
                faces[[0, -1]] = faces[:, [0, -1]] = faces[:, :, [0, -1]] = True
                at_face = set(np.unique(ids[faces]).tolist()) - {0}
                excused = at_face - {big} if big in at_face else set()
                stray = sum(int(s) for i, s in enumerate(sizes, 1) if i != big and i not in excused)
                assert rec["fragments"] == n, rec["structure"]
                assert rec["outside_largest_share"] == (sizes.sum() - sizes.max()) / sizes.sum()
                assert rec["stray_share"] == stray / sizes.sum(), rec["structure"]
                checked += 1
        assert checked in (40, 31)


# --- laterality ----------------------------------------------------------------------------------


def kidneys(swapped: bool) -> nib.Nifti1Image:
    """A label map stored RAS (1.5 mm): kidney_left on the patient's left (low i), the right one
    on the right, or the two labels swapped."""
    labels = np.zeros((40, 20, 16), np.uint8)
    left, right = lbl.index_of("kidney_left"), lbl.index_of("kidney_right")
    if swapped:
        left, right = right, left
    labels[4:12, 6:14, 4:12] = left  # i 4-11: x = -60..-49.5 mm (RAS: the patient's left)
    labels[26:34, 6:14, 4:12] = right  # x = -21..-10.5 mm
    labels[18:22, 8:12, 2:14] = lbl.index_of("vertebrae_L1")  # one piece, no partner
    affine = np.diag([1.5, 1.5, 1.5, 1.0])
    affine[:3, 3] = [-66.0, -20.0, 30.0]
    return nib.Nifti1Image(labels, affine)


def as_lps(image: nib.Nifti1Image) -> nib.Nifti1Image:
    """The same voxels stored LPS (nibabel's reorientation: arrays flipped, affine to match)."""
    now = nib.orientations.io_orientation(image.affine)
    lps = nib.orientations.axcodes2ornt(("L", "P", "S"))
    return image.as_reoriented(nib.orientations.ornt_transform(now, lps))


def centroid_x_ras(image: nib.Nifti1Image, value: int) -> float:
    """The mean world x of a structure's voxel centres (RAS), voxel by voxel."""
    data = np.asanyarray(image.dataobj)
    return float(nib.affines.apply_affine(image.affine, np.argwhere(data == value))[:, 0].mean())


@pytest.mark.parametrize("swapped", [False, True])
def test_a_swapped_pair_is_flagged_whether_stored_ras_or_lps(swapped: bool) -> None:
    names = dict(enumerate(lbl.STRUCTURES, 1))
    ras = kidneys(swapped)
    lps = as_lps(ras)
    assert "".join(nib.aff2axcodes(lps.affine)) == "LPS"
    assert not np.array_equal(np.asanyarray(lps.dataobj), np.asanyarray(ras.dataobj))
    left, right = lbl.index_of("kidney_left"), lbl.index_of("kidney_right")
    # Oracle: the patient's left is RAS -x; left minus right, from every voxel's world position.
    want = -(centroid_x_ras(ras, left) - centroid_x_ras(ras, right))
    assert want == pytest.approx(-33.0 if swapped else 33.0)  # 22 voxels of 1.5 mm
    for image in (ras, lps):
        result = statistics.compute(
            np.asanyarray(image.dataobj), image.affine, np.zeros(image.shape, np.float32), names
        )
        recs = result.by_name()
        for name in ("kidney_left", "kidney_right"):
            assert recs[name]["side_offset_mm"] == pytest.approx(want, abs=1e-9)
            assert recs[name]["wrong_side"] is swapped
        assert recs["vertebrae_L1"]["side_offset_mm"] is None and recs["vertebrae_L1"]["wrong_side"] is None
        assert recs["rib_left_3"]["wrong_side"] is None  # absent pair
        assert result.flagged()["wrong_side"] == (["kidney_left", "kidney_right"] if swapped else [])


def test_the_side_margin() -> None:
    """Centroids within SIDE_MARGIN_MM the wrong way round are not flagged; beyond it they are."""
    names = {1: "iliac_vena_left", 2: "iliac_vena_right"}
    for gap_mm, flagged in ((9.0, False), (11.0, True)):
        labels = np.zeros((30, 4, 4), np.uint8)
        labels[10, 1:3, 1:3] = 2
        labels[10 + int(gap_mm), 1:3, 1:3] = 1  # 1 mm voxels, RAS: the left vein further right
        recs = flags(labels, np.eye(4), names)
        assert recs["iliac_vena_left"]["side_offset_mm"] == -gap_mm
        assert recs["iliac_vena_left"]["wrong_side"] is flagged is recs["iliac_vena_right"]["wrong_side"]
    assert quality.SIDE_MARGIN_MM == 10.0


def test_real_results_raise_no_wrong_side_flag_and_their_fragment_flags() -> None:
    """TotalSegmentator's results: every pair the right way round by far; one fragment flag (a
    pancreas in two halves, 28 mm apart inside the field of view)."""
    masks = scans.load_scan(TS / "abdomen_ct_sm_masks", TS / "abdomen_ct_sm.nii.gz")
    dicom = scans.load_scan(
        TS / "abdomen_ct_dicom_multilabel.nii.gz",
        DATA / "abdomen_ct_dicom",
        names=TS / "totalsegmentator_v2_total_labels.json",
    )
    for scan, pairs, fragmented in ((masks, 11, ["pancreas"]), (dicom, 9, [])):
        result = statistics.compute(scan.labels, scan.affine, scan.ct, scan.names)
        offsets = [r["side_offset_mm"] for r in result.structures if r["side_offset_mm"] is not None]
        assert len(offsets) == 2 * pairs and min(offsets) > 60  # paired structures lie 6 cm or more apart
        assert result.flagged()["wrong_side"] == []
        assert result.flagged()["fragmented"] == fragmented


# --- empty, cut by the field of view, the summary ----------------------------------------------------


def test_empty_and_touching_the_edge() -> None:
    labels = np.zeros((10, 10, 10), np.uint8)
    labels[0:3, 4:6, 4:6] = 1  # reaches the face i = 0
    labels[4:7, 4:7, 4:7] = 2  # inside
    result = statistics.compute(
        labels, np.eye(4), np.zeros((10, 10, 10)), {1: "liver", 2: "spleen", 3: "aorta"}
    )
    recs = result.by_name()
    assert recs["liver"]["touches_border"] is True and recs["spleen"]["touches_border"] is False
    assert recs["aorta"]["empty"] is True and recs["liver"]["empty"] is False
    absent = recs["aorta"]
    for field in (
        "fragments",
        "outside_largest_share",
        "stray_share",
        "fragmented",
        "side_offset_mm",
        "wrong_side",
    ):
        assert absent[field] is None, field
    assert result.flagged() == {
        "empty": ["aorta"],
        "touches_border": ["liver"],
        "fragmented": [],
        "wrong_side": [],
        "low_confidence": [],  # no probabilities seen: never flagged
    }
    doc = json.loads(result.to_json())
    assert doc["quality"] == result.flagged()
    assert "fragmented" in doc["units"] and "wrong_side" in doc["units"]
    rows = statistics.csv_text([(None, result)]).splitlines()
    assert rows[0].endswith(
        "touches_border,empty,fragments,outside_largest_share,stray_share,fragmented,side_offset_mm,wrong_side,"
        "mean_probability,low_probability_share,low_confidence"
    )
    assert rows[3].endswith(",true,,,,,,,,,")  # aorta: empty, every other flag blank


def write_crafted(tmp_path: Path) -> tuple[Path, Path]:
    """A stuseg multilabel file with the kidneys swapped and a liver in two pieces, and its CT."""
    image = kidneys(swapped=True)
    labels = np.asanyarray(image.dataobj).copy()
    liver = lbl.index_of("liver")
    labels[4:14, 15:19, 2:8] = liver  # 240 voxels
    labels[30:34, 16:19, 10:14] = liver  # 48 voxels
    names = {v: lbl.STRUCTURES[v - 1] for v in np.unique(labels)[1:]}
    from stuseg.results import labelmaps

    seg = tmp_path / "seg.nii.gz"
    labelmaps.save_multilabel(labels, image.header, seg, names)
    ct = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros(labels.shape, np.int16), image.affine), ct)
    return seg, ct


LINE = (
    "stuseg: quality: kidney_left on the wrong side of kidney_right; "
    "liver in 2 pieces (17% outside the largest)"
)


def test_statistics_command_prints_the_quality_line(tmp_path: Path) -> None:
    seg, ct = write_crafted(tmp_path)
    result = CliRunner().invoke(app, ["statistics", str(seg), str(ct), "-o", str(tmp_path / "s.json")])
    assert result.exit_code == 0, result.output
    assert result.stderr.splitlines()[0] == LINE
    result = CliRunner().invoke(app, ["statistics", str(seg), str(ct)])  # CSV on stdout, the line on stderr
    assert result.stderr.splitlines() == [LINE] and "kidney_left" in result.stdout


def test_the_quality_line_names_at_most_six_findings() -> None:
    labels = np.zeros((60, 8, 8), np.uint8)
    names = {}
    for n in range(1, 9):  # eight ribs, each in two halves far apart
        names[n] = f"rib_left_{n}"
        labels[n * 3, 2:4, 2:4] = n
        labels[n * 3 + 30, 2:4, 2:4] = n
    from stuseg.cli.render import quality_line

    line = quality_line(statistics.compute(labels, np.eye(4), np.zeros(labels.shape), names))
    assert line is not None
    assert line.startswith("stuseg: quality: rib_left_1 in 2 pieces (50% outside the largest); ")
    assert line.endswith("; and 2 more (see statistics.json)") and line.count(" pieces ") == 6
    assert quality_line(statistics.compute(labels[:30], np.eye(4), np.zeros((30, 8, 8)), names)) is None


@pytest.mark.parametrize("crafted", [True, False])
def test_predict_with_statistics_prints_the_quality_line_only_when_flagged(
    tmp_path: Path, make_nifti, monkeypatch: pytest.MonkeyPatch, crafted: bool
) -> None:
    """The network is replaced by a fixed label map: the crafted one, or its kidneys the right way
    round and its liver in one piece."""
    from stuseg.images.io import label_image
    from stuseg.inference import pipeline

    seg_path, _ = write_crafted(tmp_path)
    made = np.asanyarray(nib.load(seg_path).dataobj)
    if not crafted:
        made = np.asanyarray(kidneys(swapped=False).dataobj)
    ct = make_nifti(shape=made.shape, affine=kidneys(False).affine)

    def fake_segment(image: object, **kwargs: object) -> pipeline.Segmentation:
        return pipeline.Segmentation(
            image=label_image(made, image.header),  # type: ignore[attr-defined]
            names=dict(enumerate(lbl.STRUCTURES, 1)),
            size="small",
        )

    monkeypatch.setattr(pipeline, "segment", fake_segment)
    result = CliRunner().invoke(app, ["predict", str(ct), str(tmp_path / "out"), "--statistics"])
    assert result.exit_code == 0, result.output
    lines = result.stderr.splitlines()
    assert lines[-1].startswith("wrote 104 masks")
    assert [line for line in lines if "quality" in line] == ([LINE] if crafted else [])
    if crafted:
        assert lines[-2] == LINE
    quiet = CliRunner().invoke(app, ["predict", str(ct), str(tmp_path / "q"), "--statistics", "-q"])
    assert quiet.exit_code == 0 and quiet.stderr == ""


def test_remove_small_blobs_drops_the_pieces_below_the_volume_in_mm3() -> None:
    from stuseg.analysis.quality import remove_small_blobs

    labels = np.zeros((20, 20, 20), np.uint8)
    labels[2:8, 2:8, 2:8] = 1  # 216 voxels: kept
    labels[12, 12, 12] = 1  # 1 voxel
    labels[15:17, 15:17, 15] = 1  # 4 voxels
    labels[0:2, 18:20, 18:20] = 2  # 8 voxels: all of structure 2
    labels[10:13, 0:3, 0:3] = 3  # 27 voxels
    affine = np.diag([2.0, 2.0, 3.0, 1.0])  # 12 mm3 per voxel
    # Below 60 mm3: pieces of fewer than 5 voxels (1 and 4 voxels of 1); 8 voxels = 96 mm3 stay.
    kept = labels.copy()
    kept[12, 12, 12] = 0
    kept[15:17, 15:17, 15] = 0
    assert remove_small_blobs(labels, affine, 60.0) == {1: 5}
    np.testing.assert_array_equal(labels, kept)
    # Below 100 mm3 structure 2 (96 mm3) goes whole; 27 voxels (324 mm3) stay.
    assert remove_small_blobs(labels, affine, 100.0) == {2: 8}
    assert set(np.unique(labels)) == {0, 1, 3}
    with pytest.raises(ValueError, match="positive volume"):
        remove_small_blobs(labels, affine, 0.0)
