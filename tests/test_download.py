"""The real download path through huggingface_hub, against a loopback server playing the hub.

HF_ENDPOINT and HF_HUB_OFFLINE are read by huggingface_hub at import, so the CLI runs as a
subprocess where they matter; in-process tests pass the endpoint and cache folder explicitly.
Test manifests describe fabricated files, since the published ones cannot be fetched here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from fabricate import random_state_dict, small_checkpoint
from hub import FakeHub, Mode

from stuseg.errors import WeightsError
from stuseg.model.network import build_network
from stuseg.weights import cache as weights
from stuseg.weights import checkpoints

REPO = Path(__file__).resolve().parents[1]
HUB_REPO = "test-org/STU-Net"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="session")
def small_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return small_checkpoint(lambda: tmp_path_factory.mktemp("fabricated"))


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    with FakeHub() as server:
        yield server


def serve(
    hub: FakeHub, tmp_path: Path, data: bytes, mode: Mode = "ok", *, pin: str = "commit", sha: str | None = ""
) -> Path:
    """Put ``data`` on the hub as small_ep4k.model; return a manifest describing it."""
    served = hub.add(HUB_REPO, "small_ep4k.model", data, COMMIT, mode=mode)
    raw = json.loads((REPO / "weights_manifest.json").read_text())
    entry = raw["models"]["small"]
    entry.update(repo=HUB_REPO, revision=COMMIT, size_bytes=len(data), sha256=served.sha256)
    if pin == "branch":
        entry.update(pin="branch", revision="main", size_bytes=None, sha256=None)
    if sha != "":
        entry["sha256"] = sha
    raw["models"] = {"small": entry}
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(raw))
    return path


def stuseg(*args: str, endpoint: str, offline: bool = False) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_ENDPOINT": endpoint, "HF_HUB_OFFLINE": "1" if offline else "0"}
    return subprocess.run(
        [sys.executable, "-m", "stuseg", *args], env=env, capture_output=True, text=True, timeout=120
    )


def one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("stuseg: error: "), proc.stderr
    return lines[0]


def hf_blobs() -> list[Path]:
    return [p for p in Path(os.environ["HF_HOME"]).rglob("blobs/*") if p.is_file()]


def stuseg_files() -> list[Path]:
    folder = weights.stuseg_home() / "weights"
    return sorted(folder.iterdir()) if folder.exists() else []


@pytest.mark.slow
def test_download_verify_convert_then_offline(hub: FakeHub, tmp_path: Path, small_ckpt: Path) -> None:
    manifest = serve(hub, tmp_path, small_ckpt.read_bytes())
    first = stuseg("download", "--size", "small", "--manifest", str(manifest), endpoint=hub.url)
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == str(weights.cached_path("small"))
    assert "downloaded, verified and converted" in first.stderr
    assert [m for m, _ in hub.requests].count("GET") == 1

    loaded = weights.load_weights("small", download=False, manifest=manifest)
    assert loaded.verified_by == weights.BY_MANIFEST
    net = build_network("small")
    net.load_state_dict(loaded.state_dict, strict=True)
    expected = random_state_dict("small", 0)
    assert all(torch.equal(v, expected[k]) for k, v in net.state_dict().items())

    # Offline with a warm cache: works, and not a single request reaches the hub.
    seen = len(hub.requests)
    again = stuseg("download", "-s", "S", "--manifest", str(manifest), endpoint=hub.url, offline=True)
    assert again.returncode == 0 and "already in the cache" in again.stderr
    # Only huggingface_hub's copy is left: converted again from it, still without a request.
    weights.cached_path("small").unlink()
    rebuilt = stuseg("download", "-s", "small", "--manifest", str(manifest), endpoint=hub.url, offline=True)
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert len(hub.requests) == seen
    (row,) = weights.weights_status(manifest)
    assert row.present and row.verified_by == weights.BY_MANIFEST


def test_offline_cold_cache(hub: FakeHub, tmp_path: Path) -> None:
    manifest = serve(hub, tmp_path, b"x" * 1000)
    proc = stuseg("download", "--size", "small", "--manifest", str(manifest), endpoint=hub.url, offline=True)
    line = one_error_line(proc)
    assert "offline" in line and "stuseg download --size small" in line and "import-weights" in line
    assert hub.requests == []
    assert stuseg_files() == []


def test_server_down(tmp_path: Path) -> None:
    hub = FakeHub()
    manifest = serve(hub, tmp_path, b"x" * 1000)
    url = hub.url
    hub.stop()  # never started: the port is closed
    line = one_error_line(stuseg("download", "-s", "small", "--manifest", str(manifest), endpoint=url))
    assert "cannot download" in line and "stuseg import-weights FILE" in line
    assert stuseg_files() == [] and hf_blobs() == []


def test_file_not_on_hub(hub: FakeHub, tmp_path: Path) -> None:
    manifest = serve(hub, tmp_path, b"x" * 1000)
    hub.files.clear()
    hub.add(HUB_REPO, "README.md", b"hello", COMMIT)
    line = one_error_line(stuseg("download", "-s", "small", "--manifest", str(manifest), endpoint=hub.url))
    assert f"small_ep4k.model was not found in {HUB_REPO} at {COMMIT}" in line
    assert stuseg_files() == [] and hf_blobs() == []


def test_corrupted_bytes_caught_by_our_hash(hub: FakeHub, tmp_path: Path) -> None:
    # Same length, headers describe the good file: only hashing the bytes can notice.
    manifest = serve(hub, tmp_path, os.urandom(300_000), mode="corrupt")
    with pytest.raises(WeightsError, match=r"has sha256 \w+, expected \w+; the file was deleted"):
        weights.download_weights("small", manifest=manifest, endpoint=hub.url, hf_cache_dir=tmp_path / "hf")
    assert not [p for p in (tmp_path / "hf").rglob("*") if p.is_file() and "blobs" in p.parts]
    assert not list((tmp_path / "hf").rglob("snapshots/*/*"))
    assert stuseg_files() == []


@pytest.mark.slow
def test_truncated_body(hub: FakeHub, tmp_path: Path) -> None:
    # huggingface_hub retries (resuming with Range) before giving up: ~5 s of its back-off.
    manifest = serve(hub, tmp_path, os.urandom(300_000), mode="truncate")
    with pytest.raises(WeightsError, match="cut short"):
        weights.download_weights("small", manifest=manifest, endpoint=hub.url, hf_cache_dir=tmp_path / "hf")
    assert not [p for p in (tmp_path / "hf").rglob("*") if p.is_file() and "blobs" in p.parts]
    assert stuseg_files() == []


def test_hub_serves_another_file_than_pinned(hub: FakeHub, tmp_path: Path) -> None:
    manifest = serve(hub, tmp_path, b"y" * 1000, sha="0" * 64)
    with pytest.raises(WeightsError, match=r"serves a different small_ep4k\.model"):
        weights.download_weights("small", manifest=manifest, endpoint=hub.url, hf_cache_dir=tmp_path / "hf")
    assert [m for m, _ in hub.requests] == ["HEAD"]


def test_weak_pin_checked_against_hub_sha(hub: FakeHub, tmp_path: Path, small_ckpt: Path) -> None:
    manifest = serve(hub, tmp_path, small_ckpt.read_bytes(), pin="branch")
    result = weights.download_weights(
        "small", manifest=manifest, endpoint=hub.url, hf_cache_dir=tmp_path / "hf"
    )
    assert (
        result.verified_by == weights.BY_HUB
        and result.sha256 == hub.files[(HUB_REPO, "small_ep4k.model")].sha256
    )
    assert any("/resolve/main/" in path for _, path in hub.requests)


def test_not_enough_disk_space(hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    manifest = serve(hub, tmp_path, b"z" * 100_000)
    monkeypatch.setattr(checkpoints, "_free_bytes", lambda folder: 10)
    with pytest.raises(WeightsError, match="disk full"):
        weights.download_weights("small", manifest=manifest, endpoint=hub.url, hf_cache_dir=tmp_path / "hf")
    assert "GET" not in [m for m, _ in hub.requests]


def test_a_bug_under_the_download_is_not_blamed_on_the_connection(
    hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An API change in huggingface_hub (a TypeError) surfaces as the bug it is; the network's
    own failures (test_server_down) keep their 'check the connection' line."""
    import huggingface_hub

    manifest = serve(hub, tmp_path, b"x" * 1000)

    def changed_api(*args, **kwargs):
        raise TypeError("get_hf_file_metadata() got an unexpected keyword argument 'url'")

    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", changed_api)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    with pytest.raises(TypeError, match="unexpected keyword argument"):
        weights.download_weights("small", manifest=manifest, endpoint=hub.url)
    assert stuseg_files() == [] and hf_blobs() == []
