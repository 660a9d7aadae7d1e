"""A hostile user's battery (issue 11): every case through the real CLI in a subprocess.

Each case asserts the exit status, the exact first line of stderr, that no traceback was
printed, and the state of the disk afterwards: the inputs' bytes unchanged and no partial,
hidden or stale files. Most cases are refused before any work. Cases that need a finished
prediction run the CLI with the network stage replaced by a threshold of the real image
(``FAKE_PREDICT`` below): what they test is what happens around writing, and they stay fast.
The network itself is covered end to end by tests/test_predict_cli.py.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from stuseg.cli import app
from stuseg.results import labelmaps
from stuseg.results.outputs import MARKER
from stuseg.structures import labels

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).parent / "data"
ALL_MASKS = sorted(f"{n}.nii.gz" for n in labels.STRUCTURES)

# `python -c` launcher: the real CLI, with `stuseg.inference.pipeline` replaced by a module whose segment()
# reads the image for real and labels it by thresholds (liver above 0 HU, spleen in -500..0),
# honouring --roi-subset. STUSEG_TEST_SLOW_WRITE=<file>: the first mask written creates <file> and
# waits until the test has removed it (so however loaded the machine, the write is still under
# way when the test acts), then every write sleeps, so a test can send a signal while masks are
# being written.
FAKE_PREDICT = """
import os, sys, time, types
import numpy as np
import stuseg
from stuseg.results import labelmaps
from stuseg.structures import labels
from stuseg.images.io import label_image, read_image

def segment(image, *, roi_subset=None, series=None, **_):
    volume = read_image(image, series=series)
    keep = labels.select(roi_subset) if roi_subset else list(range(1, 105))
    lab = np.zeros(volume.data.shape, np.uint8, order="F")
    lab[(volume.data > -500) & (volume.data <= 0)] = labels.index_of("spleen")
    lab[volume.data > 0] = labels.index_of("liver")
    lut = np.zeros(256, np.uint8)
    lut[keep] = keep
    lab = np.asfortranarray(lut[lab])
    return types.SimpleNamespace(image=label_image(lab, volume.header), labels=lab,
        names={i: labels.LABELS[i] for i in keep}, timings={}, peak_rss_bytes=None,
        peak_gpu_bytes=None, device="cpu", size="fake", precision="float32", confidence=None)

fake = types.ModuleType("stuseg.inference.pipeline")
fake.segment = segment
fake.keep_freed_memory = lambda device="cpu": False  # the malloc tuning the command opts into
sys.modules["stuseg.inference.pipeline"] = stuseg.inference.pipeline = fake
ready = os.environ.get("STUSEG_TEST_SLOW_WRITE")
if ready:
    real_write = labelmaps.write_nifti
    first = [True]
    def slow_write(img, path):
        real_write(img, path)
        if first[0]:
            first[0] = False
            open(ready, "a").close()
            deadline = time.monotonic() + 120
            while os.path.exists(ready) and time.monotonic() < deadline:
                time.sleep(0.02)
        time.sleep(1.5)
    labelmaps.write_nifti = slow_write
sys.argv = ["stuseg", *sys.argv[1:]]
from stuseg.cli import main
main()
"""


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", **extra}


def stuseg(*args: object, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """`python -m stuseg ARGS` with this checkout's code."""
    cmd = [sys.executable, "-m", "stuseg", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=cwd, timeout=300, check=False)


def fake_predict(*args: object, **env: str) -> subprocess.CompletedProcess[str]:
    """`stuseg predict ARGS` with the network replaced (see FAKE_PREDICT)."""
    cmd = [sys.executable, "-c", FAKE_PREDICT, "predict", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(**env), timeout=300, check=False)


def tree(folder: Path) -> dict[str, str]:
    """Every file and folder under ``folder`` (hidden ones too) -> sha256 of its bytes ('' for folders)."""
    found = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        found[rel] = "" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def refused(done: subprocess.CompletedProcess[str], first_line: str, code: int = 1) -> None:
    assert done.returncode == code, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert done.stderr.splitlines()[0] == first_line, done.stderr
    assert len(done.stderr.splitlines()) == 1, done.stderr


def no_staging_left(folder: Path) -> None:
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".stuseg-")]


@pytest.fixture
def ct(make_nifti) -> Path:
    """A small synthetic CT (40 x 36 x 32 voxels, 1.5 mm)."""
    return make_nifti()


@pytest.fixture
def seg(tmp_path: Path, ct: Path) -> Path:
    """A multilabel file (liver and spleen) with its sidecars, as `predict --ml` writes it."""
    data = np.asanyarray(nib.load(ct).dataobj)
    values = np.where(data > 0, 40, np.where(data > -500, 77, 0)).astype(np.uint8)
    path = tmp_path / "seg.nii.gz"
    labelmaps.save_multilabel(values, nib.load(ct).header, path, dict(enumerate(labels.STRUCTURES, 1)))
    return path


# --- 1. data loss: an output that is, lies inside or contains an input ---------------------------


def test_predict_onto_its_own_input_is_refused(tmp_path: Path, ct: Path) -> None:
    before = tree(tmp_path)
    done = stuseg("predict", ct, ct, "--ml")
    refused(
        done,
        f"stuseg: error: the output {ct} is the input {ct}; writing it would destroy the input, "
        "so give a new file name",
    )
    assert tree(tmp_path) == before


def test_export_onto_its_own_input_is_refused(tmp_path: Path, seg: Path) -> None:
    before = tree(tmp_path)
    done = stuseg("export-labels", seg, seg, "--ml", "--labels", "liver")
    refused(
        done,
        f"stuseg: error: the output {seg} is the input {seg}; writing it would destroy the input, "
        "so give a new file name",
    )
    # seg.nii -> its sidecar seg.json would replace the input's label table
    done = stuseg("export-labels", seg, tmp_path / "seg.nii", "--ml", "--labels", "liver")
    sidecar = tmp_path / "seg.json"
    refused(
        done,
        f"stuseg: error: the output {sidecar} is the input {sidecar}; writing it would destroy the input, "
        "so give a new file name",
    )
    assert tree(tmp_path) == before


def test_a_symlink_output_pointing_at_the_input_is_refused(tmp_path: Path, ct: Path) -> None:
    link = tmp_path / "result.nii.gz"
    link.symlink_to(ct)
    before = tree(tmp_path)
    done = stuseg("predict", ct, link, "--ml", "--overwrite")
    refused(
        done,
        f"stuseg: error: the output {link} is the input {ct}; writing it would destroy the input, "
        "so give a new file name",
    )
    assert tree(tmp_path) == before and link.is_symlink()


def test_output_inside_the_input_dicom_folder_is_refused(tmp_path: Path) -> None:
    series = tmp_path / "series"
    shutil.copytree(DATA / "abdomen_ct_dicom", series)
    before = tree(tmp_path)
    done = stuseg("predict", series, series / "masks")
    refused(
        done,
        f"stuseg: error: the output {series / 'masks'} lies inside the input folder {series}; "
        "give a folder outside it",
    )
    assert tree(tmp_path) == before


def test_output_folder_holding_the_input_is_refused(tmp_path: Path, ct: Path) -> None:
    before = tree(tmp_path)
    done = stuseg("predict", ct, tmp_path, "--overwrite")
    refused(
        done,
        f"stuseg: error: the output {tmp_path} contains the input {ct}; replacing it would delete the "
        "input, so give a new folder name",
    )
    assert tree(tmp_path) == before


# --- 2. stale and mixed results; the user's own files ------------------------------------------


def test_a_second_run_replaces_the_previous_folder_as_a_whole(tmp_path: Path, ct: Path) -> None:
    out = tmp_path / "out"
    first = fake_predict(ct, out)
    assert first.returncode == 0, first.stderr
    assert sorted(p.name for p in out.iterdir()) == [MARKER, *ALL_MASKS]
    second = fake_predict(ct, out, "--roi-subset", "liver")
    assert second.returncode == 0, second.stderr
    assert "Traceback" not in second.stderr
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "liver.nii.gz"]
    marker = json.loads((out / MARKER).read_text())
    assert marker["command"] == "predict" and marker["options"]["roi_subset"] == ["liver"]
    assert marker["files"] == ["liver.nii.gz"] and marker["inputs"] == [str(ct.resolve())]
    no_staging_left(tmp_path)


def test_a_folder_of_the_users_files_is_kept_unless_overwrite(tmp_path: Path, ct: Path) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "liver.nii.gz").write_bytes(b"my manual segmentation")
    (mine / "notes.txt").write_text("do not delete")
    before = tree(tmp_path)
    refused(
        fake_predict(ct, mine),
        f"stuseg: error: the folder {mine} holds files stuseg did not write (liver.nii.gz and 1 more); "
        "give a new folder, or add --overwrite to replace the folder and everything in it",
    )
    assert tree(tmp_path) == before
    done = fake_predict(ct, mine, "--overwrite", "--roi-subset", "liver,spleen")
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in mine.iterdir()) == [MARKER, "liver.nii.gz", "spleen.nii.gz"]
    no_staging_left(tmp_path)


def test_a_users_file_is_not_replaced_by_a_multilabel_output(tmp_path: Path, ct: Path) -> None:
    mine = tmp_path / "mine.nii.gz"
    shutil.copy(ct, mine)
    before = tree(tmp_path)
    refused(
        stuseg("predict", ct, mine, "--ml"),
        f"stuseg: error: the file {mine} exists and was not written by stuseg; give a new file name, "
        "or add --overwrite to replace it",
    )
    (tmp_path / "x.json").write_text("{}")  # the sidecar of x.nii.gz would replace it
    refused(
        stuseg("predict", ct, tmp_path / "x.nii.gz", "--ml"),
        f"stuseg: error: the file {tmp_path / 'x.json'} exists and was not written by stuseg; give a new "
        "file name, or add --overwrite to replace it",
    )
    assert tree(tmp_path) == {**before, "x.json": hashlib.sha256(b"{}").hexdigest()}


def test_a_multilabel_output_stuseg_wrote_is_replaced(tmp_path: Path, ct: Path, seg: Path) -> None:
    again = fake_predict(ct, seg, "--ml", "--roi-subset", "liver")
    assert again.returncode == 0, again.stderr
    assert json.loads((tmp_path / "seg.json").read_text())["labels"] == {"40": "liver"}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["ct.nii.gz", "seg.nii.gz", "seg.json", "seg.itksnap.txt", "seg.ctbl"]
    )


@pytest.mark.parametrize("ml", [False, True])
def test_an_empty_output_path_is_refused(tmp_path: Path, ct: Path, ml: bool) -> None:
    before = tree(tmp_path)
    done = stuseg("predict", ct, "", *(["--ml"] if ml else []), cwd=tmp_path)
    refused(
        done, f"stuseg: error: the output path is empty; give the name of a new {'file' if ml else 'folder'}"
    )
    refused(
        stuseg("predict", "", "out", cwd=tmp_path),
        "stuseg: error: the INPUT path is empty; give a file or folder name",
    )
    assert tree(tmp_path) == before


def test_the_current_folder_is_not_an_output(tmp_path: Path, make_nifti) -> None:
    work = tmp_path / "work"
    work.mkdir()
    ct = make_nifti(name="elsewhere.nii.gz")
    before = tree(tmp_path)
    done = stuseg("predict", ct, ".", cwd=work)
    refused(
        done,
        "stuseg: error: the output . is the current folder or holds it; give the name of a new folder "
        "such as out",
    )
    assert tree(tmp_path) == before


# --- neighbours: wrong kinds, missing and read-only parents -------------------------------------


@pytest.mark.slow
def test_output_of_the_wrong_kind_is_refused_before_any_work(tmp_path: Path, ct: Path) -> None:
    (tmp_path / "taken").write_text("x")
    (tmp_path / "dir.nii.gz").mkdir()
    before = tree(tmp_path)
    # No weights exist anywhere here: reaching the model would fail differently, so each of these
    # is refused before any work.
    cases = [
        (["predict", ct, tmp_path / "taken"],
         f"the output {tmp_path / 'taken'} is a file, but a folder is written here; give a folder name, "
         "or add --ml for one multilabel file"),
        (["predict", ct, tmp_path / "dir.nii.gz", "--ml"],
         f"the output {tmp_path / 'dir.nii.gz'} is a folder, but a file is written here; give a file name "
         "such as seg.nii.gz, or leave out --ml for a folder of masks"),
        (["predict", ct, tmp_path / "seg", "--ml"],
         f"{tmp_path / 'seg'} is not a NIfTI file name; end it in .nii.gz"),
        (["predict", ct, tmp_path / "masks.nii.gz"],
         f"{tmp_path / 'masks.nii.gz'} looks like a file name but masks are written into a folder; give a "
         "folder name, or add --ml for one multilabel file"),
        (["predict", ct, tmp_path / "no" / "out"],
         f"the folder {tmp_path / 'no'} does not exist; create it first (mkdir -p '{tmp_path / 'no'}')"),
    ]  # fmt: skip
    for args, message in cases:
        refused(stuseg(*args), f"stuseg: error: {message}")
    assert tree(tmp_path) == before


def test_a_read_only_output_folder_is_refused(tmp_path: Path, ct: Path) -> None:
    parent = tmp_path / "ro"
    parent.mkdir()
    cmd = [sys.executable, "-m", "stuseg", "predict", str(ct), str(parent / "out")]
    if os.geteuid() != 0:
        parent.chmod(0o555)
    else:  # root ignores permission bits: make the folder a read-only mount in a private namespace
        if shutil.which("unshare") is None:
            pytest.skip("running as root without unshare: cannot make a read-only folder")
        probe = subprocess.run(
            [
                "unshare",
                "-m",
                "sh",
                "-c",
                f"mount --bind '{parent}' '{parent}' && mount -o remount,bind,ro '{parent}' '{parent}'",
            ],
            capture_output=True,
            check=False,
        )
        if probe.returncode != 0:
            pytest.skip("running as root without the right to mount: cannot make a read-only folder")
        mount = f"mount --bind '{parent}' '{parent}' && mount -o remount,bind,ro '{parent}' '{parent}'"
        cmd = ["unshare", "-m", "sh", "-c", f'{mount} && exec "$@"', "sh", *cmd]
    done = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300, check=False)
    parent.chmod(0o755)
    refused(
        done,
        f"stuseg: error: cannot write into {parent} (permission denied or read-only); choose another place",
    )
    assert list(parent.iterdir()) == []


# --- 3-5. tracebacks, one clear line, wrong or missing diagnosis -----------------------------------


def test_export_of_an_rgb_nifti(tmp_path: Path) -> None:
    rgb = np.zeros((4, 4, 4), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    path = tmp_path / "rgb.nii.gz"
    nib.save(nib.Nifti1Image(rgb, np.eye(4)), path)
    before = tree(tmp_path)
    refused(
        stuseg("export-labels", path, tmp_path / "out", "--labels", "liver"),
        f"stuseg: error: {path} holds RGB or vector pixels; stuseg needs a single-channel label map",
    )
    assert tree(tmp_path) == before


def test_export_of_a_zero_voxel_image(tmp_path: Path) -> None:
    path = tmp_path / "empty.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((0, 5, 5), np.uint8), np.eye(4)), path)
    before = tree(tmp_path)
    refused(
        stuseg("export-labels", path, tmp_path / "out", "--labels", "liver"),
        f"stuseg: error: {path} contains no voxels (shape (0, 5, 5)); check the file or export it again",
    )
    assert tree(tmp_path) == before


@pytest.mark.parametrize("command", [pytest.param("predict", marks=pytest.mark.slow), "export-labels"])
def test_damaged_files_give_one_line_without_library_noise(tmp_path: Path, ct: Path, command: str) -> None:
    random_gz = tmp_path / "random.nii.gz"  # a valid gzip stream of random bytes: nibabel logs about it
    random_gz.write_bytes(gzip.compress(np.random.default_rng(0).bytes(4000)))
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(ct.read_bytes()[: ct.stat().st_size // 2])
    before = tree(tmp_path)
    extra = ["--labels", "liver"] if command == "export-labels" else []
    for path in (random_gz, truncated):
        refused(
            stuseg(command, path, tmp_path / "out", *extra),
            f"stuseg: error: cannot read {path}: it is damaged, truncated or not a NIfTI image; "
            "check the file or export it again",
        )
    assert tree(tmp_path) == before


def test_a_bad_metaimage_header_is_quoted_in_the_one_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.mha"
    path.write_text("NDims = 3\nElementType = MET_SHORT\nElementDataFile = LOCAL\n")
    before = tree(tmp_path)
    refused(
        stuseg("predict", path, tmp_path / "out"),
        f"stuseg: error: cannot read {path}: it is damaged, truncated or not a MetaImage image, or its data "
        "file is missing (ITK: DimSize required and not defined); check the file or export it again",
    )
    assert tree(tmp_path) == before


def test_a_repaired_header_is_one_warning_line(tmp_path: Path, seg: Path) -> None:
    raw = bytearray(gzip.decompress(seg.read_bytes()))
    raw[80:84] = np.float32(-1.5).tobytes()  # pixdim[1] < 0: nibabel logs "should be positive"
    odd = tmp_path / "odd.nii.gz"
    odd.write_bytes(gzip.compress(bytes(raw)))
    done = stuseg("export-labels", odd, tmp_path / "out", "--labels", "liver")
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines() == [
        "wrote 1 file",
        f"stuseg: warning: {odd} has an inconsistent header that nibabel repaired (pixdim[1,2,3] should "
        "be positive; setting to abs of pixdim values); check that the result lies where you expect",
    ]


def test_inf_voxels_are_refused_before_any_work(tmp_path: Path, make_nifti) -> None:
    data = np.full((20, 20, 20), -1000.0, np.float32)
    data[3, 4, 5] = np.inf
    ct = make_nifti(shape=(20, 20, 20), data=data, name="inf.nii.gz")
    before = tree(tmp_path)
    refused(
        stuseg("predict", ct, tmp_path / "out"),
        f"stuseg: error: {ct} holds 1 infinite voxel (Inf); stuseg cannot tell what they stand for, so "
        "replace them with finite values (e.g. clip to -1024..3071 HU) and run again",
    )
    assert tree(tmp_path) == before


# --- 6. leftovers: signals while writing, a full disk --------------------------------------------


def _start_slow_predict(tmp_path: Path, ct: Path, out: Path) -> tuple[subprocess.Popen, Path]:
    ready = tmp_path / "ready.flag"
    cmd = [sys.executable, "-c", FAKE_PREDICT, "predict", str(ct), str(out)]
    child = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(STUSEG_TEST_SLOW_WRITE=str(ready)),
        # Ctrl-C as a terminal gives it, also where pytest itself ignores SIGINT (a shell's
        # background job does): an ignored SIGINT is inherited, and stuseg rightly keeps it.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 120
    while not ready.exists():
        assert child.poll() is None, child.communicate()
        assert time.monotonic() < deadline, "the writer never started"
        time.sleep(0.05)
    ready.unlink()
    return child, ready


@pytest.mark.parametrize(
    ("sig", "code", "line"),
    [
        (signal.SIGTERM, 143, "stuseg: error: terminated by SIGTERM"),
        (signal.SIGINT, 130, "stuseg: error: interrupted by Ctrl-C"),
    ],
)
def test_a_signal_while_writing_leaves_nothing(
    tmp_path: Path, ct: Path, sig: int, code: int, line: str
) -> None:
    out = tmp_path / "out"
    child, _ = _start_slow_predict(tmp_path, ct, out)
    child.send_signal(sig)
    _, stderr = child.communicate(timeout=120)
    assert child.returncode == code, stderr
    assert "Traceback" not in stderr
    assert stderr.splitlines()[0] == line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct.nii.gz"]


def test_a_previous_complete_result_survives_an_interrupted_run(tmp_path: Path, ct: Path) -> None:
    out = tmp_path / "out"
    assert fake_predict(ct, out, "--roi-subset", "liver").returncode == 0
    before = tree(tmp_path)
    child, _ = _start_slow_predict(tmp_path, ct, out)
    child.send_signal(signal.SIGTERM)
    assert child.communicate(timeout=120) and child.returncode == 143
    assert tree(tmp_path) == before


def test_leftovers_of_a_killed_run_are_removed_by_the_next(tmp_path: Path, ct: Path) -> None:
    out = tmp_path / "out"
    child, _ = _start_slow_predict(tmp_path, ct, out)
    child.kill()  # SIGKILL: no cleanup can run
    child.communicate(timeout=60)
    left = [p.name for p in tmp_path.iterdir() if p.name.startswith(".stuseg-staging-")]
    assert len(left) == 1 and not out.exists()
    done = fake_predict(ct, out)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct.nii.gz", "out"]
    assert sorted(p.name for p in out.iterdir()) == [MARKER, *ALL_MASKS]


@pytest.mark.parametrize("ml", [False, True])
def test_a_full_disk_leaves_neither_masks_nor_a_multilabel_file(
    tmp_path: Path, ct: Path, monkeypatch, ml: bool
) -> None:
    """In-process, the writer made to fail: ENOSPC on the 31st of 40 encoded masks, or on the --ml file."""
    from stuseg.inference import pipeline

    header = nib.load(ct).header
    lab = np.asfortranarray(
        (np.arange(np.prod(header.get_data_shape())) % 41).reshape(header.get_data_shape())
    )
    lab = lab.astype(np.uint8)  # structures 1..40 present, 41..104 absent
    fake = type("Seg", (), {})()
    fake.labels, fake.image = lab, nib.Nifti1Image(lab, None, header=header)
    fake.names, fake.timings = dict(enumerate(labels.STRUCTURES, 1)), {}
    fake.peak_rss_bytes, fake.peak_gpu_bytes, fake.device, fake.size = None, None, "cpu", "fake"
    fake.precision, fake.confidence = "float32", None
    monkeypatch.setattr(pipeline, "segment", lambda *a, **k: fake)
    real_write = labelmaps.write_nifti
    calls = []

    def full_disk(img, path):
        calls.append(path)
        if len(calls) == (1 if ml else 31):
            path.write_bytes(b"\x1f\x8b")  # half a file
            raise OSError(28, "No space left on device")
        real_write(img, path)

    monkeypatch.setattr(labelmaps, "write_nifti", full_disk)
    before = tree(tmp_path)
    target = tmp_path / ("seg.nii.gz" if ml else "out")
    result = CliRunner().invoke(app, ["predict", str(ct), str(target), *(["--ml"] if ml else [])])
    assert result.exit_code == 1, result.output
    assert (
        result.stderr
        == f"stuseg: error: cannot write {target}: No space left on device; nothing was written\n"
    )
    assert len(calls) >= (1 if ml else 31)
    assert tree(tmp_path) == before
