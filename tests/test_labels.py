"""The label table against the reference, selection semantics, and ``stuseg labels``."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REFERENCE, REPO
from typer.testing import CliRunner

from stuseg.cli import app
from stuseg.errors import LabelError
from stuseg.structures import labels

# The oracle: STU-Net's own label_orders.json and TotalSegmentator v1's class map, recorded with
# their sources in tests/data/reference/ (never a copy of stuseg's table).
LABEL_ORDER = REFERENCE / "label_order.json"


@pytest.fixture(scope="module")
def ref() -> dict:
    return json.loads(LABEL_ORDER.read_text())


@pytest.fixture(scope="module")
def idx(ref: dict) -> dict[str, int]:
    """Reference name -> channel index, so expected indices come from the reference, not the table."""
    return {name: i for i, name in enumerate(ref["order"])}


def _reference_group(name: str) -> str:
    """The group of a structure by a naming rule written here, independent of stuseg's table."""
    bones = ("vertebrae_", "rib_", "humerus_", "scapula_", "clavicula_", "femur_", "hip_")
    if name.startswith(bones) or name == "sacrum":
        return "bones"
    if name.startswith(("gluteus_", "autochthon_", "iliopsoas_")):
        return "muscles"
    if name in {"aorta", "inferior_vena_cava", "portal_vein_and_splenic_vein", "pulmonary_artery"}:
        return "vessels"
    if name.startswith(("iliac_artery_", "iliac_vena_")):
        return "vessels"
    return "organs"


# --- the table ---------------------------------------------------------------------------------


def test_order_matches_reference(ref: dict) -> None:
    assert list(labels.LABELS) == ref["order"]
    assert len(labels.LABELS) == ref["num_outputs"] == 105
    assert {str(i): n for i, n in enumerate(labels.LABELS)} == ref["index_to_name"]
    assert [(s.index, s.name) for s in labels.TABLE] == list(enumerate(ref["order"]))[1:]
    # The reference's rule, checked on the reference itself: Python sorted() order.
    assert ref["order"][1:] == sorted(ref["order"][1:])


def test_totalseg_v1_index_matches_reference(ref: dict) -> None:
    expected = {int(k): v for k, v in ref["stunet_index_to_totalseg_v1_index"].items()}
    assert expected == labels.TOTALSEG_V1_INDEX
    assert {s.index: s.totalseg_v1 for s in labels.TABLE} == {k: v for k, v in expected.items() if k}
    # Cross-check against TotalSegmentator's own class map, by name.
    official = ref["official_totalsegmentator_v1_order"]["index_to_name"]
    for row in labels.TABLE:
        assert official[str(row.totalseg_v1)] == row.name
    inverse = {int(k): v for k, v in ref["totalseg_v1_index_to_stunet_index"].items()}
    assert {v: k for k, v in labels.TOTALSEG_V1_INDEX.items()} == inverse


def test_groups_follow_the_naming_rule_and_the_readme_counts(ref: dict) -> None:
    expected = {g: tuple(n for n in ref["order"][1:] if _reference_group(n) == g) for g in labels.GROUPS}
    assert expected == labels.GROUPS
    assert {s.name: s.group.value for s in labels.TABLE} == {n: _reference_group(n) for n in ref["order"][1:]}
    # The README's counts (27 organs, 59 bones, 10 muscles, 8 vessels).
    assert {g: len(names) for g, names in labels.GROUPS.items()} == {
        "organs": 27,
        "bones": 59,
        "muscles": 10,
        "vessels": 8,
    }


# --- selection -----------------------------------------------------------------------------------


def test_select_exact_and_case_insensitive(idx: dict[str, int]) -> None:
    assert labels.select(["liver"]) == [idx["liver"]]
    assert labels.select(["LIVER", "Spleen"]) == sorted([idx["liver"], idx["spleen"]])
    assert labels.select(["vertebrae_l1"]) == [idx["vertebrae_L1"]]


def test_select_groups_patterns_and_combinations(ref: dict, idx: dict[str, int]) -> None:
    names = ref["order"][1:]
    muscles = [idx[n] for n in names if _reference_group(n) == "muscles"]
    assert labels.select(["muscles"]) == muscles
    assert labels.select(["rib_*"]) == [idx[n] for n in names if n.startswith("rib_")]
    assert len(labels.select(["rib_*"])) == 24
    assert labels.select(["vertebrae_L*"]) == [idx[f"vertebrae_L{k}"] for k in range(1, 6)]
    assert [ref["order"][i] for i in labels.select(["vertebrae_T1*"])] == [
        "vertebrae_T1",
        "vertebrae_T10",
        "vertebrae_T11",
        "vertebrae_T12",
    ]
    assert labels.select(["kidney_?ight"]) == [idx["kidney_right"]]
    combined = labels.select(["vessels", "liver", "rib_left_1*"])
    ribs = [idx[f"rib_left_{k}"] for k in (1, 10, 11, 12)]
    vessels = [idx[n] for n in names if _reference_group(n) == "vessels"]
    assert combined == sorted({*vessels, idx["liver"], *ribs})


def test_select_removes_duplicates_sorts_and_splits_commas(idx: dict[str, int]) -> None:
    assert labels.select(["spleen", "liver", "LIVER", "organs"]) == labels.select(["organs"])
    assert labels.select(["spleen,liver", "liver spleen"]) == sorted([idx["liver"], idx["spleen"]])
    assert labels.select(iter(["aorta"])) == [idx["aorta"]]


@pytest.mark.parametrize(
    ("patterns", "message"),
    [
        (["livr"], "unknown structure 'livr', did you mean 'liver'?"),
        (["kidney"], "unknown structure 'kidney', did you mean 'kidney_left' or 'kidney_right'?"),
        (["organ"], "unknown structure 'organ', did you mean 'organs'?"),
        (["qqqqzzz"], "unknown structure 'qqqqzzz'; run 'stuseg labels' to list the names"),
        (["rib_x*"], "pattern 'rib_x*' matches no structure; run 'stuseg labels' to list the names"),
        (["background"], "'background' is label 0, not a structure; run 'stuseg labels' to list the names"),
        ([], "no structures named; give structure names, groups or patterns such as 'rib_*'"),
        ([" , "], "no structures named; give structure names, groups or patterns such as 'rib_*'"),
    ],
)
def test_select_errors(patterns: list[str], message: str) -> None:
    with pytest.raises(LabelError) as exc:
        labels.select(patterns)
    assert str(exc.value) == message


def test_lookup_index_of_and_describe(ref: dict, idx: dict[str, int]) -> None:
    row = labels.lookup(" Rib_Left_3 ")
    assert (row.index, row.name, row.group) == (idx["rib_left_3"], "rib_left_3", labels.Group.BONES)
    assert labels.index_of("PULMONARY_ARTERY") == idx["pulmonary_artery"]
    with pytest.raises(LabelError, match="did you mean 'liver'"):
        labels.lookup("livers")
    with pytest.raises(LabelError, match="'background' is label 0"):
        labels.index_of("Background")
    vessels = [n for n in ref["order"][1:] if _reference_group(n) == "vessels"]
    assert [r.name for r in labels.describe("vessels")] == vessels
    assert [r.name for r in labels.describe(" Vessels")] == vessels
    assert labels.describe(labels.Group.BONES) == labels.describe("bones")
    assert [r.name for r in labels.describe()] == ref["order"][1:]
    with pytest.raises(LabelError, match="unknown group 'tendons'"):
        labels.describe("tendons")


def test_renumbering(ref: dict, idx: dict[str, int]) -> None:
    chosen = labels.select(["rib_left_1*", "liver"])
    in_order = sorted(idx[n] for n in ("liver", "rib_left_1", "rib_left_10", "rib_left_11", "rib_left_12"))
    assert chosen == in_order
    assert labels.renumbering(chosen) == {i: i for i in in_order}
    assert labels.renumbering(reversed(chosen), "compact") == {i: k for k, i in enumerate(in_order, 1)}
    v1 = labels.renumbering(chosen, labels.Numbering.TOTALSEG_V1)
    assert v1 == {i: ref["stunet_index_to_totalseg_v1_index"][str(i)] for i in in_order}
    official = ref["official_totalsegmentator_v1_order"]["index_to_name"]
    assert [official[str(v)] for v in v1.values()] == [ref["order"][i] for i in in_order]
    with pytest.raises(LabelError, match="unknown numbering 'octal'"):
        labels.renumbering(chosen, "octal")
    with pytest.raises(LabelError, match="label value 105 is not a structure index"):
        labels.renumbering([105])
    with pytest.raises(LabelError, match="label value 0 is not a structure index"):
        labels.renumbering([0, 3])


def _run(args: list[str]) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )


# --- the command ---------------------------------------------------------------------------------


def test_labels_json_in_a_real_process(ref: dict) -> None:
    proc = _run(["-m", "stuseg", "labels", "--json"])
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert [r["name"] for r in rows] == ref["order"][1:]
    first = {"index": 1, "name": "adrenal_gland_left", "group": "organs", "totalsegmentator_v1_index": 12}
    assert rows[0] == first
    assert {r["index"]: r["totalsegmentator_v1_index"] for r in rows} == {
        int(k): v for k, v in ref["stunet_index_to_totalseg_v1_index"].items() if k != "0"
    }


def test_labels_table_and_group_filter(ref: dict) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["labels"])
    assert result.exit_code == 0, result.output
    for name in ref["order"][1:]:
        assert f" {name} " in result.stdout
    result = runner.invoke(app, ["labels", "--group", "muscles", "--json"])
    assert result.exit_code == 0
    muscles = [n for n in ref["order"][1:] if _reference_group(n) == "muscles"]
    assert [r["name"] for r in json.loads(result.stdout)] == muscles
    assert result.stderr == ""


def test_labels_unknown_group_fails() -> None:
    result = CliRunner().invoke(app, ["labels", "--group", "tendons"])
    assert result.exit_code == 2
    assert "'tendons' is not one of 'organs', 'bones', 'muscles', 'vessels'" in result.stderr
    assert result.stdout == ""
    proc = _run(["-m", "stuseg", "labels", "--group", "tendons"])
    assert proc.returncode == 2
    assert proc.stderr.splitlines()[0] == "Usage: python -m stuseg labels [OPTIONS]"
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""


# --- label tables of other models ----------------------------------------------------------------


def test_file_name_leaves_every_published_name_alone(ref: dict) -> None:
    for name in ref["order"][1:]:
        assert labels.file_name(name) == name


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("Liver Tumour", "Liver_Tumour"),
        ("kidney/left", "kidney_left"),
        ("kidney\\left", "kidney_left"),
        ("GTVp", "GTVp"),
        ("class_3", "class_3"),
        ("  a \t b  ", "a_b"),  # surrounding whitespace dropped, an inner run is one _
        ('a<>:"|?*b', "a_b"),  # one run of characters Windows forbids
        ("line\nbreak\x00nul", "line_break_nul"),
        ("evil\u202egnp.exe", "evil_gnp.exe"),  # a right-to-left override is invisible: replaced
        ("ＧＴＶｐ", "GTVp"),  # NFKC: full-width letters
        ("Leber – Läsion", "Leber_–_Läsion"),  # other unicode stays
        (".hidden.", "hidden"),
        ("..", "unnamed"),
        ("", "unnamed"),
        ("CON", "CON_"),
        ("nul.nii", "nul_.nii"),
        ("com1", "com1_"),
        ("LPT9", "LPT9_"),
        ("CONSOLE", "CONSOLE"),
        ("COM10", "COM10"),
    ],
)
def test_file_name_rule(name: str, expected: str) -> None:
    assert labels.file_name(name) == expected


def test_file_name_caps_the_length_at_a_character_boundary() -> None:
    assert labels.file_name("x" * 300) == "x" * 120
    long = labels.file_name("ä" * 100)  # 2 bytes each in UTF-8
    assert long == "ä" * 60 and len(long.encode("utf-8")) == 120
    assert labels.file_name("a" * 119 + ". b") == "a" * 119  # no trailing dot after the cut


def test_model_names_are_safe_unique_and_deterministic(ref: dict) -> None:
    published = dict(enumerate(ref["order"]))
    assert labels.model_names(published) == {i: n for i, n in published.items() if i}
    table = {0: "background", 3: "Liver", 1: "liver", 2: "Liver Tumour", 4: "liver_tumour", 5: "GTVp"}
    assert labels.model_names(table) == {
        1: "liver_1",
        2: "Liver_Tumour_2",
        3: "Liver_3",
        4: "liver_tumour_4",
        5: "GTVp",
    }
    assert list(labels.model_names(table)) == [1, 2, 3, 4, 5]
    # A suffixed name that meets a name of the table is suffixed again.
    assert labels.model_names({1: "a", 2: "A", 3: "a_2"}) == {1: "a_1", 2: "A_2_2", 3: "a_2"}
    many = labels.model_names({v: "Tumour" for v in range(1, 256)})
    assert len({n.casefold() for n in many.values()}) == 255 and many[255] == "Tumour_255"


def test_model_names_refuse_values_beyond_uint8() -> None:
    with pytest.raises(LabelError) as exc:
        labels.model_names({1: "a", 256: "b"})
    assert str(exc.value) == "label value 256 is outside 0..255; a label map holds values 1 to 255"


MODEL = {0: "background", 1: "Liver Tumour", 2: "kidney/left", 3: "GTVp", 4: "kidney/right", 5: "class_5"}


def test_select_from_names_patterns_and_file_names() -> None:
    assert labels.select_from(MODEL, ["gtvp"]) == [3]
    assert labels.select_from(MODEL, ["liver tumour, GTVp", "GTVP"]) == [1, 3]
    assert labels.select_from(MODEL, ["Liver_Tumour"]) == [1]  # the name as its file shows it
    assert labels.select_from(MODEL, ["kidney_*"]) == [2, 4]
    assert labels.select_from(MODEL, ["kidney/?ight"]) == [4]
    assert labels.select_from(labels.model_names(MODEL), ["kidney/left"]) == [2]
    # the published table through select_from: names and patterns as select, no groups
    published = dict(enumerate(labels.LABELS))
    assert labels.select_from(published, ["rib_left_1*", "liver"]) == labels.select(["rib_left_1*", "liver"])


@pytest.mark.parametrize(
    ("patterns", "message"),
    [
        (["kidney"], "unknown structure 'kidney', did you mean 'kidney/left' or 'kidney/right'?"),
        (["gtv"], "unknown structure 'gtv', did you mean 'GTVp'?"),
        (
            ["zzzz"],
            "unknown structure 'zzzz'; the model's structures are 'Liver Tumour', 'kidney/left', 'GTVp', "
            "'kidney/right', 'class_5'",
        ),
        (
            ["lung_*"],
            "pattern 'lung_*' matches no structure; the model's structures are 'Liver Tumour', "
            "'kidney/left', 'GTVp', 'kidney/right', 'class_5'",
        ),
        (
            ["background"],
            "'background' is label 0, not a structure; the model's structures are 'Liver Tumour', "
            "'kidney/left', 'GTVp', 'kidney/right', 'class_5'",
        ),
        ([" , "], "no structures named; give structure names or patterns such as 'kidney_*'"),
        (
            ["organs"],
            "unknown structure 'organs'; the model's structures are 'Liver Tumour', 'kidney/left', "
            "'GTVp', 'kidney/right', 'class_5'",
        ),
    ],
)
def test_select_from_errors(patterns: list[str], message: str) -> None:
    with pytest.raises(LabelError) as exc:
        labels.select_from(MODEL, patterns)
    assert str(exc.value) == message


def test_select_from_lists_at_most_eight_names() -> None:
    table = {v: f"class_{v}" for v in range(1, 21)}
    with pytest.raises(LabelError) as exc:
        labels.select_from(table, ["tumour"])
    assert str(exc.value) == (
        "unknown structure 'tumour'; the model's structures are 'class_1', 'class_2', 'class_3', "
        "'class_4', 'class_5', 'class_6', 'class_7', 'class_8', ... (20 in all)"
    )


def test_left_right_pairs_of_the_published_table(ref: dict) -> None:
    """Pairs by replacing 'left' with 'right' in the reference names (a plain string rule written
    here): 30 pairs, and the one lateral name without a partner is the middle lobe."""
    names = set(ref["order"][1:])
    expected = {
        (n, n.replace("left", "right")) for n in names if "left" in n and n.replace("left", "right") in names
    }
    assert set(labels.LEFT_RIGHT_PAIRS) == expected and len(expected) == 30
    paired = {n for pair in expected for n in pair}
    assert {n for n in names if ("left" in n or "right" in n) and n not in paired} == {
        "lung_middle_lobe_right"
    }


def test_left_right_pairs_of_any_names() -> None:
    names = ["Kidney Left", "kidney right", "rib_left_3", "rib_right_3", "rib_right_4", "left_lung",
             "leftover", "atrial_appendage_left", "lung_left_left", "lung_right_right"]  # fmt: skip
    assert labels.left_right_pairs(names) == [("Kidney Left", "kidney right"), ("rib_left_3", "rib_right_3")]
    assert labels.left_right_pairs(["a_right", "a_left"]) == [("a_left", "a_right")]


def test_one_piece_structures() -> None:
    assert set(labels.MAY_BE_IN_PIECES) <= set(labels.STRUCTURES)
    assert len(labels.ONE_PIECE) == 104 - len(labels.MAY_BE_IN_PIECES) == 100
    assert labels.one_piece("liver") and labels.one_piece(" Kidney_Left") and labels.one_piece("vertebrae_L1")
    assert not labels.one_piece("colon") and not labels.one_piece("small_bowel")
    # Names outside the published table (TotalSegmentator v2's, a model's own): nothing is known.
    assert not labels.one_piece("heart") and not labels.one_piece("Liver Tumour")
