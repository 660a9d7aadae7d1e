"""Import cost: the light commands and ``import stuseg`` must not import torch or numba.

Each case runs in a fresh interpreter, since this test process has long imported torch. Two
independent observations per case:

- in-process: a ``python3 -c`` script runs the command through ``stuseg.cli.main`` with
  ``sys.argv`` set, catches its SystemExit, and then reports which of torch and numba are in
  ``sys.modules`` (written to a file, so the command's own output stays apart);
- the real entry point: ``python3 -X importtime -m stuseg ...``, whose import log on stderr
  names every module the process imported.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import REFERENCE, REPO

HEAVY = ("torch", "numba")

# Runs `stuseg ARGS...` in-process; argv[1] is the report file, the rest are the command's arguments.
PROBE = """
import json, sys
report, args = sys.argv[1], sys.argv[2:]
code = 0
if args != ["<import>"]:
    sys.argv = ["stuseg", *args]
    from stuseg.cli import main
    try:
        main()
    except SystemExit as exc:
        code = exc.code
else:
    import stuseg
with open(report, "w") as f:
    json.dump({"code": code, "heavy": sorted(m for m in ("torch", "numba") if m in sys.modules)}, f)
"""


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO)}


def _in_process(args: list[str], tmp_path: Path) -> tuple[dict, subprocess.CompletedProcess[str]]:
    report = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, str(report), *args],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert report.is_file(), proc.stderr
    return json.loads(report.read_text()), proc


def _imported_top_level(args: list[str], cwd: Path) -> tuple[set[str], subprocess.CompletedProcess[str]]:
    """Top-level names of every module ``python3 -X importtime -m stuseg ARGS`` imported."""
    return _import_log(["-m", "stuseg", *args], cwd)


def _import_log(python_args: list[str], cwd: Path) -> tuple[set[str], subprocess.CompletedProcess[str]]:
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", *python_args],
        cwd=cwd,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    names = set()
    for line in proc.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            name = line.rsplit("|", 1)[1].strip()
            if name != "imported package":
                names.add(name.split(".")[0])
    assert "stuseg" in names, proc.stderr[-2000:]  # the log was read
    return names, proc


@pytest.fixture
def multilabel(tmp_path: Path) -> tuple[Path, np.ndarray]:
    """A small multilabel file whose values are model indices (liver and spleen from the reference)."""
    order = json.loads((REFERENCE / "label_order.json").read_text())["order"]
    data = np.zeros((20, 18, 10), np.uint8)
    data[2:8, 2:8, 2:5] = order.index("liver")
    data[10:15, 5:9, 4:8] = order.index("spleen")
    path = tmp_path / "seg.nii.gz"
    nib.save(nib.Nifti1Image(data, np.diag([1.5, 1.5, 3.0, 1.0])), path)
    return path, data


def test_import_stuseg(tmp_path: Path) -> None:
    result, proc = _in_process(["<import>"], tmp_path)
    assert result == {"code": 0, "heavy": []}, proc.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["--version"],
        ["labels"],
        ["labels", "--group", "vessels", "--json"],
        ["export-labels", "--help"],
        ["predict", "--help"],
        ["weights"],
        ["weights", "--json"],
    ],
    ids=" ".join,
)
def test_light_commands_in_process(args: list[str], tmp_path: Path) -> None:
    result, proc = _in_process(args, tmp_path)
    assert result["code"] in (0, None), proc.stderr
    assert result["heavy"] == [], f"stuseg {' '.join(args)} imported {result['heavy']}"


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["labels", "--json"],
        ["export-labels", "--help"],
        ["weights"],
    ],
    ids=" ".join,
)
def test_light_commands_as_python_m_stuseg(args: list[str], tmp_path: Path) -> None:
    names, proc = _imported_top_level(args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not names & set(HEAVY), f"python -m stuseg {' '.join(args)} imported {names & set(HEAVY)}"


@pytest.mark.parametrize("ml", [False, True], ids=["masks", "ml"])
def test_a_real_export_labels_run(multilabel: tuple[Path, np.ndarray], tmp_path: Path, ml: bool) -> None:
    seg, data = multilabel
    out = tmp_path / ("liver_spleen.nii.gz" if ml else "liver_spleen")
    args = ["export-labels", str(seg), str(out), "--labels", "liver,spleen", *(["--ml"] if ml else [])]
    result, proc = _in_process(args, tmp_path)
    assert result == {"code": 0, "heavy": []}, proc.stderr
    # The command really ran: its files hold the input's voxels.
    if ml:
        assert np.array_equal(np.asarray(nib.load(out).dataobj), data)
    else:
        order = json.loads((REFERENCE / "label_order.json").read_text())["order"]
        for name in ("liver", "spleen"):
            mask = np.asarray(nib.load(out / f"{name}.nii.gz").dataobj)
            assert np.array_equal(mask, (data == order.index(name)).astype(np.uint8))
    again = tmp_path / ("again.nii.gz" if ml else "again")
    names, proc = _imported_top_level([*args[:2], str(again), *args[3:]], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not names & set(HEAVY)


def test_both_checks_see_a_heavy_import(tmp_path: Path) -> None:
    """Negative control: the same observers report numba when stuseg's kernels are imported."""
    probe = PROBE.replace("import stuseg\n", "import stuseg.inference.kernels\n")
    assert probe != PROBE
    report = tmp_path / "heavy.json"
    subprocess.run(
        [sys.executable, "-c", probe, str(report), "<import>"], env=_env(), check=True, timeout=120
    )
    assert json.loads(report.read_text())["heavy"] == ["numba"]
    names, proc = _import_log(["-c", "import stuseg.inference.kernels"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert names & set(HEAVY) == {"numba"}


def test_public_api_resolves_lazily() -> None:
    import stuseg
    from stuseg.inference import pipeline
    from stuseg.model import network

    assert stuseg.segment is pipeline.segment
    assert stuseg.build_network is network.build_network
    assert issubclass(stuseg.WeightsError, stuseg.StusegError)
    assert set(stuseg.__all__) <= set(dir(stuseg))
    with pytest.raises(AttributeError, match="module 'stuseg' has no attribute 'segmenter'"):
        stuseg.segmenter  # noqa: B018


def test_segmenter_is_public() -> None:
    import stuseg
    from stuseg.inference import pipeline

    assert stuseg.Segmenter is pipeline.Segmenter


def test_a_plain_import_reaches_the_api_and_its_submodules(tmp_path: Path) -> None:
    """In a fresh interpreter, as the README's examples use it: ``import stuseg`` and nothing else."""
    script = """
import stuseg
from stuseg.images import io
from stuseg.inference import pipeline
run = stuseg.batch.run
import stuseg.runs.local
assert run is stuseg.runs.local.run
assert stuseg.structures.labels.LABELS[1] == "adrenal_gland_left"
assert (stuseg.Volume, stuseg.read_image) == (io.Volume, io.read_image)
assert stuseg.StusegWarning is io.StusegWarning
assert stuseg.Segmentation is pipeline.Segmentation
assert {"batch", "Segmentation", "read_image"} <= set(dir(stuseg))
print("ok")
"""
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=120
    )
    assert done.stdout.strip() == "ok", done.stderr
