"""Hostile inputs to the weights commands, through the real command line (issue "never lose, mix or
half-write a user's data"): damaged and foreign weight files, an unusable STUSEG_HOME, a damaged
cache. Each case checks the exit status, the exact first line of stderr, that no traceback is
printed, and what is on disk afterwards.

The checkpoints are fabricated (tests/fabricate.py); "the hub" is a closed port or the loopback
server of tests/hub.py.
"""

from __future__ import annotations

import errno
import json
import os
import struct
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fabricate import shaped_state_dict, write_checkpoint
from hub import FakeHub
from typer.testing import CliRunner

from stuseg.cli import app
from stuseg.weights import cache as weights

REPO = Path(__file__).resolve().parents[1]
CT_AS_WEIGHTS = Path(__file__).parent / "data" / "abdomen_ct_3mm.nii.gz"
CLOSED = "http://127.0.0.1:9"  # the discard port: nothing listens, connections are refused at once


@pytest.fixture(scope="module")
def small_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A valid small checkpoint with every parameter 0 (tiny on disk: zero-stride tensors)."""
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "small.model", shaped_state_dict("small"))


@pytest.fixture
def ct(make_nifti: Callable[..., Path]) -> Path:
    return make_nifti((40, 36, 32))


def stuseg(*args: str | Path, **env: str) -> subprocess.CompletedProcess[str]:
    """``python -m stuseg ARGS`` with this checkout first on the path and the test's caches."""
    full_env = {**os.environ, "HF_ENDPOINT": CLOSED, **env}
    full_env["PYTHONPATH"] = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, "-m", "stuseg", *map(str, args)],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def first_error_line(proc: subprocess.CompletedProcess[str], *, predict: bool = False) -> str:
    """Exit status 1, no traceback; the first line of stderr (after the blank line that predict's
    tile bar leaves when stderr is not a terminal; the error rendering is fixed elsewhere)."""
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    text = proc.stderr.lstrip("\n") if predict else proc.stderr
    return text.splitlines()[0]


def cache_files() -> list[Path]:
    home = weights.stuseg_home()
    return sorted(p for p in home.rglob("*") if p.is_file()) if home.is_dir() else []


def write_safetensors(path: Path, header: object, data: bytes) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


F32x2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
BAD_HEADERS = {
    "not a tensor table": (
        {"a": 1},
        "is not a valid safetensors file: entry 'a' of its header is not a tensor "
        "(dtype, shape, data_offsets)",
    ),
    "no data_offsets": (
        {"a": {"dtype": "F32", "shape": [2]}},
        "is not a valid safetensors file: tensor 'a' has no data_offsets",
    ),
    "shape against offsets": (
        {"a": {**F32x2, "shape": [3]}},
        "is not a valid safetensors file: tensor 'a' has shape [3] (12 bytes of F32) "
        "but data_offsets [0, 8] (8 bytes)",
    ),
    "unknown dtype": (
        {"a": {**F32x2, "dtype": "Q7"}},
        "is not a valid safetensors file: tensor 'a' has dtype 'Q7', which stuseg does not read "
        "(F64, F32, F16, BF16, I64, I32, I16, I8, U8, BOOL)",
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(BAD_HEADERS))
def test_malformed_safetensors(case: str, tmp_path: Path, ct: Path) -> None:
    header, message = BAD_HEADERS[case]
    bad = write_safetensors(tmp_path / "w.safetensors", header, b"\0" * 8)
    before = bad.read_bytes()

    line = first_error_line(stuseg("import-weights", bad))
    assert line == f"stuseg: error: {bad} {message}"
    out = tmp_path / "out"
    line = first_error_line(stuseg("predict", ct, out, "--weights", bad), predict=True)
    assert line == f"stuseg: error: {bad} {message}"

    assert not out.exists() and cache_files() == [] and bad.read_bytes() == before


@pytest.mark.slow
def test_truncated_model(tmp_path: Path, small_model: Path, ct: Path) -> None:
    cut = tmp_path / "small_ep4k.model"
    cut.write_bytes(small_model.read_bytes()[: small_model.stat().st_size // 2])
    expected = (
        f"stuseg: error: {cut} is truncated or corrupted and cannot be read as a checkpoint "
        "(its zip directory is missing, as in an incomplete download)"
    )
    proc = stuseg("import-weights", cut)
    assert first_error_line(proc) == expected and len(proc.stderr.splitlines()) == 1
    out = tmp_path / "out"
    assert first_error_line(stuseg("predict", ct, out, "--weights", cut), predict=True) == expected
    assert not out.exists() and cache_files() == []


def test_folder_and_image_given_as_weights(tmp_path: Path, ct: Path) -> None:
    folder = tmp_path / "weights_dir"
    folder.mkdir()
    out = tmp_path / "out"
    line = first_error_line(stuseg("predict", ct, out, "--weights", folder), predict=True)
    assert line == (
        f"stuseg: error: {folder} is a folder, not a weights file; give the checkpoint file itself "
        "(.model or .safetensors)"
    )
    line = first_error_line(stuseg("import-weights", CT_AS_WEIGHTS))
    assert line == (
        f"stuseg: error: {CT_AS_WEIGHTS} is not a checkpoint: it holds gzip-compressed data, such as a "
        ".nii.gz image; stuseg reads nnU-Net v1 .model files (PyTorch zip) and .safetensors files"
    )
    assert not out.exists() and cache_files() == [] and list(folder.iterdir()) == []


def test_stuseg_home_is_a_file(tmp_path: Path, small_model: Path) -> None:
    home = tmp_path / "not_a_folder"
    home.write_text("mine")
    line = first_error_line(stuseg("import-weights", small_model, STUSEG_HOME=str(home)))
    assert line == (
        f"stuseg: error: the stuseg cache {home / 'weights'} cannot be created: {home} is a file, "
        "not a folder; set STUSEG_HOME to a folder"
    )
    assert home.read_text() == "mine"


@pytest.mark.parametrize(
    ("code", "reason"), [(errno.EROFS, "Read-only file system"), (errno.EACCES, "Permission denied")]
)
def test_stuseg_home_not_writable(
    code: int, reason: str, small_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Tests run as root, where a 0o555 folder still takes files: the refusal a read-only mount or
    # a foreign folder gives is simulated where stuseg first tries to write into the cache.
    def refuse(*args: object, **kwargs: object) -> tuple[int, str]:
        raise OSError(code, reason)

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    result = CliRunner().invoke(app, ["import-weights", str(small_model)])
    assert result.exit_code == 1, result.output
    folder = weights.stuseg_home() / "weights"
    assert result.output.splitlines()[0] == (
        f"stuseg: error: the stuseg cache {folder} is not writable ({reason}); "
        "set STUSEG_HOME to a writable folder"
    )
    assert cache_files() == []


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into 0o555 folders")
def test_stuseg_home_read_only_for_real(tmp_path: Path, small_model: Path) -> None:
    home = tmp_path / "ro"
    home.mkdir()
    home.chmod(0o555)
    try:
        line = first_error_line(stuseg("import-weights", small_model, STUSEG_HOME=str(home)))
    finally:
        home.chmod(0o755)
    assert line == (
        f"stuseg: error: the stuseg cache {home / 'weights'} is not writable (Permission denied); "
        "set STUSEG_HOME to a writable folder"
    )
    assert list(home.iterdir()) == []


def truncate(path: Path, keep: int) -> None:
    with path.open("r+b") as f:
        f.truncate(keep)


@pytest.mark.slow
def test_damaged_imported_cache(tmp_path: Path, small_model: Path, ct: Path) -> None:
    assert stuseg("import-weights", small_model).returncode == 0
    cached = weights.cached_path("small")
    size = cached.stat().st_size
    truncate(cached, 1_000_000)
    (n,) = struct.unpack("<Q", cached.read_bytes()[:8])
    detail = f"its header describes {size - 8 - n} bytes of tensors but only {1_000_000 - 8 - n} follow"

    listing = stuseg("weights", "--json")
    assert listing.returncode == 0, listing.stderr
    rows = {r["size"]: r for r in json.loads(listing.stdout)}
    assert (rows["small"]["present"], rows["small"]["damaged"]) == (False, detail)
    assert rows["base"]["damaged"] is None and not rows["base"]["present"]
    table = stuseg("weights")
    assert table.returncode == 0 and "damaged (see below)" in table.stdout
    assert table.stderr.splitlines()[0] == (
        f"note: the cached weights for small are damaged ({detail}); repair with "
        "`stuseg download --size small --force` or import them again"
    )

    # Imported weights are not swapped for the published ones behind the user's back.
    out = tmp_path / "out"
    line = first_error_line(stuseg("predict", ct, out, "--size", "small"), predict=True)
    assert line == (
        f"stuseg: error: the cached weights for small are damaged ({detail}); they were imported from "
        f"{small_model.resolve()}: run `stuseg import-weights {small_model.resolve()}` again"
    )
    assert not out.exists() and cached.stat().st_size == 1_000_000

    # ... and importing again repairs them.
    assert stuseg("import-weights", small_model).returncode == 0
    assert cached.stat().st_size == size
    assert json.loads(stuseg("weights", "--json").stdout)[0]["present"]


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    with FakeHub() as server:
        yield server


def hub_manifest(hub: FakeHub, data: bytes, folder: Path) -> Path:
    """A manifest whose small entry is ``data`` on the loopback hub, pinned to a commit."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    served = hub.add("test-org/STU-Net", "small_ep4k.model", data, commit)
    raw = json.loads((REPO / "stuseg" / "weights" / "weights_manifest.json").read_text())
    entry = raw["models"]["small"]
    entry.update(repo="test-org/STU-Net", revision=commit, size_bytes=len(data), sha256=served.sha256)
    raw["models"] = {"small": entry}
    path = folder / "manifest.json"
    path.write_text(json.dumps(raw))
    return path


LOAD = (
    "import sys, warnings; warnings.simplefilter('always'); from stuseg.weights.cache import load_weights; "
    "w = load_weights('small', manifest=sys.argv[1]); print(w.size, w.verified_by)"
)


@pytest.mark.slow
def test_damaged_downloaded_cache_is_repaired(
    hub: FakeHub, tmp_path: Path, small_model: Path, ct: Path
) -> None:
    manifest = hub_manifest(hub, small_model.read_bytes(), tmp_path)
    assert stuseg("download", "--size", "small", "--manifest", manifest, HF_ENDPOINT=hub.url).returncode == 0
    cached = weights.cached_path("small")
    good = cached.read_bytes()
    (n,) = struct.unpack("<Q", good[:8])
    truncate(cached, 8 + n + 100)  # the header (and its record of the source) survives
    detail = f"its header describes {len(good) - 8 - n} bytes of tensors but only 100 follow"

    # The hub is down: the damage is named, and so is the way out.
    proc = subprocess.run(
        [sys.executable, "-c", LOAD, str(manifest)],
        env={**os.environ, "PYTHONPATH": str(REPO), "HF_ENDPOINT": CLOSED},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(
        f"stuseg.errors.WeightsError: the cached weights for small are damaged ({detail}), and downloading "
        "them again failed: cannot download small_ep4k.model"
    )
    assert "stuseg import-weights FILE" in last and cached.stat().st_size == 8 + n + 100

    # The hub is back: repaired (downloaded and verified again), and said so.
    proc = subprocess.run(
        [sys.executable, "-c", LOAD, str(manifest)],
        env={**os.environ, "PYTHONPATH": str(REPO), "HF_ENDPOINT": hub.url},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"small {weights.BY_MANIFEST}"
    assert (
        f"the cached weights for small are damaged ({detail}); they were downloaded and verified again"
        in proc.stderr
    )
    # The same header (as JSON: the library writes metadata keys in no fixed order) and data.
    repaired = cached.read_bytes()
    (m,) = struct.unpack("<Q", repaired[:8])
    assert json.loads(repaired[8 : 8 + m]) == json.loads(good[8 : 8 + n])
    assert repaired[8 + m :] == good[8 + n :]

    # A header cut short no longer says where the weights came from: nothing is replaced unasked.
    truncate(cached, 4096)
    out = tmp_path / "out"
    line = first_error_line(stuseg("predict", ct, out, "--size", "small"), predict=True)
    assert line == (
        f"stuseg: error: the cached weights for small are damaged (its header needs {n} bytes but only "
        "4088 follow); run `stuseg download --size small --force` or `stuseg import-weights FILE`"
    )
    assert not out.exists() and cached.stat().st_size == 4096


@pytest.mark.slow
def test_uncached_default_size_suggests_the_cached_one(tmp_path: Path, small_model: Path, ct: Path) -> None:
    assert stuseg("import-weights", small_model).returncode == 0
    out = tmp_path / "out"
    line = first_error_line(stuseg("predict", ct, out), predict=True)  # default size: base
    assert line.startswith(
        f"stuseg: error: cannot download base_ep4k.model from ziyanhuang/STU-Net@75d046881d02 from {CLOSED} "
    )
    assert line.endswith("`stuseg import-weights FILE`; weights for small are in the cache: use --size small")
    assert not out.exists() and [p.name for p in cache_files()] == ["small.safetensors"]
