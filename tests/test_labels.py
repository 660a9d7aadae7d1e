"""The label table against the reference, selection semantics, and ``stuseg labels``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from stuseg import labels
from stuseg.cli import app
from stuseg.errors import LabelError

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO.parent / "shared" / "reference" / "label_order.json"


@pytest.fixture(scope="module")
def ref() -> dict:
    return json.loads(REFERENCE.read_text())


# --- the table ---------------------------------------------------------------------------------


def test_order_matches_reference(ref: dict) -> None:
    assert list(labels.LABELS) == ref["order"]
    assert len(labels.LABELS) == ref["num_outputs"] == 105
    assert labels.LABELS[1:] == labels.STRUCTURES
    assert list(labels.STRUCTURES) == sorted(labels.STRUCTURES)  # Python sorted(): rib_left_10 < rib_left_2
    assert [s.index for s in labels.TABLE] == list(range(1, 105))


def test_totalseg_v1_index_matches_reference(ref: dict) -> None:
    expected = {int(k): v for k, v in ref["stunet_index_to_totalseg_v1_index"].items()}
    assert expected == labels.TOTALSEG_V1_INDEX
    official = ref["official_totalsegmentator_v1_order"]["index_to_name"]
    for index, name in enumerate(labels.STRUCTURES, start=1):
        assert official[str(labels.TOTALSEG_V1_INDEX[index])] == name
    assert sorted(labels.TOTALSEG_V1_INDEX.values()) == list(range(105))


def test_group_counts_and_partition() -> None:
    counts = {g: len(names) for g, names in labels.GROUPS.items()}
    assert counts == {"organs": 27, "bones": 59, "muscles": 10, "vessels": 8}
    everything = [n for names in labels.GROUPS.values() for n in names]
    assert sorted(everything) == sorted(labels.STRUCTURES)  # each structure in exactly one group
    for group, names in labels.GROUPS.items():
        assert all(labels.group_of(n) == group for n in names)
        assert [labels.index_of(n) for n in names] == sorted(labels.index_of(n) for n in names)


def test_group_membership_follows_the_issue() -> None:
    assert set(labels.GROUPS["vessels"]) == {
        "aorta",
        "inferior_vena_cava",
        "portal_vein_and_splenic_vein",
        "pulmonary_artery",
        "iliac_artery_left",
        "iliac_artery_right",
        "iliac_vena_left",
        "iliac_vena_right",
    }
    muscles = {f"{m}_{side}" for m in ("gluteus_maximus", "gluteus_medius", "gluteus_minimus")
               for side in ("left", "right")}  # fmt: skip
    muscles |= {f"{m}_{side}" for m in ("autochthon", "iliopsoas") for side in ("left", "right")}
    assert set(labels.GROUPS["muscles"]) == muscles
    bones = set(labels.GROUPS["bones"])
    assert sum(n.startswith("vertebrae_") for n in bones) == 24
    assert sum(n.startswith("rib_") for n in bones) == 24
    for b in ("humerus", "scapula", "clavicula", "femur", "hip"):
        assert {f"{b}_left", f"{b}_right"} <= bones
    assert "sacrum" in bones
    assert {"liver", "spleen", "brain", "face", "urinary_bladder"} <= set(labels.GROUPS["organs"])


# --- selection -----------------------------------------------------------------------------------


def test_select_exact_and_case_insensitive() -> None:
    assert labels.select(["liver"]) == [40]
    assert labels.select(["LIVER", "Spleen"]) == [40, 77]
    assert labels.select(["vertebrae_l1"]) == [88]


def test_select_groups_patterns_and_combinations() -> None:
    assert labels.select(["muscles"]) == [labels.index_of(n) for n in labels.GROUPS["muscles"]]
    assert len(labels.select(["rib_*"])) == 24
    assert labels.select(["vertebrae_L*"]) == [88, 89, 90, 91, 92]
    assert [labels.STRUCTURES[i - 1] for i in labels.select(["vertebrae_T1*"])] == [
        "vertebrae_T1",
        "vertebrae_T10",
        "vertebrae_T11",
        "vertebrae_T12",
    ]
    assert labels.select(["kidney_?ight"]) == [39]
    combined = labels.select(["vessels", "liver", "rib_left_1*"])
    assert combined == sorted({*labels.select(["vessels"]), 40, 49, 50, 51, 52})


def test_select_removes_duplicates_sorts_and_splits_commas() -> None:
    assert labels.select(["spleen", "liver", "LIVER", "organs"]) == labels.select(["organs"])
    assert labels.select(["spleen,liver", "liver spleen"]) == [40, 77]
    assert labels.select(iter(["aorta"])) == [3]


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


def test_group_of_and_describe() -> None:
    assert labels.group_of("Rib_Left_3") == "bones"
    assert labels.group_of("pulmonary_artery") == "vessels"
    with pytest.raises(LabelError, match="did you mean 'liver'"):
        labels.group_of("livers")
    assert [r.name for r in labels.describe("vessels")] == list(labels.GROUPS["vessels"])
    assert labels.describe(labels.Group.BONES) == labels.describe("bones")
    with pytest.raises(LabelError, match="unknown group 'tendons'"):
        labels.describe("tendons")


def test_renumbering(ref: dict) -> None:
    chosen = labels.select(["rib_left_1*", "liver"])  # 40, 49, 50, 51, 52
    assert labels.renumbering(chosen) == {i: i for i in chosen}
    assert labels.renumbering(chosen, "compact") == {40: 1, 49: 2, 50: 3, 51: 4, 52: 5}
    v1 = labels.renumbering(chosen, labels.Numbering.TOTALSEG_V1)
    assert v1 == {i: ref["stunet_index_to_totalseg_v1_index"][str(i)] for i in chosen}
    assert v1 == {40: 5, 49: 58, 50: 67, 51: 68, 52: 69}
    with pytest.raises(LabelError, match="unknown numbering 'octal'"):
        labels.renumbering(chosen, "octal")
    with pytest.raises(LabelError, match="label value 105 is not a structure index"):
        labels.renumbering([105])


def _run(args: list[str]) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )


def test_importing_labels_does_not_import_torch() -> None:
    proc = _run(["-c", "import sys, stuseg.labels; print('torch' in sys.modules)"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


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


def test_labels_table_and_group_filter() -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["labels"])
    assert result.exit_code == 0, result.output
    for name in labels.STRUCTURES:
        assert f" {name} " in result.stdout
    result = runner.invoke(app, ["labels", "--group", "muscles", "--json"])
    assert result.exit_code == 0
    assert [r["name"] for r in json.loads(result.stdout)] == list(labels.GROUPS["muscles"])
    assert result.stderr == ""


def test_labels_unknown_group_fails() -> None:
    result = CliRunner().invoke(app, ["labels", "--group", "tendons"])
    assert result.exit_code != 0
    assert "tendons" in result.stderr
