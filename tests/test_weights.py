"""The network against the reference state dicts, the manifest reader, and reading/importing/loading
checkpoints in the original nnU-Net v1 container. Nothing here touches the network."""

from __future__ import annotations

import errno
import fractions
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from fabricate import random_state_dict, shaped_state_dict, small_checkpoint, write_checkpoint
from typer.testing import CliRunner

from stuseg import weights
from stuseg.cli import app
from stuseg.errors import WeightsError
from stuseg.network import SIZES, Arch, build_network, count_parameters

REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "reference"
REPO = Path(__file__).resolve().parents[1]
PARAMS = {"small": 14_596_941, "base": 58_262_669, "large": 440_302_605, "huge": 1_457_326_221}
TINY = Arch(dims=(2, 4, 4, 4, 4, 4), depths=(1,) * 6)


@pytest.fixture(scope="session")
def small_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return small_checkpoint(lambda: tmp_path_factory.mktemp("fabricated"))


def cache_files() -> list[Path]:
    folder = weights.stuseg_home() / "weights"
    return sorted(folder.iterdir()) if folder.exists() else []


def manifest_with(tmp_path: Path, **changes: object) -> Path:
    """The shipped manifest with some fields of the small entry changed."""
    raw = json.loads((REPO / "weights_manifest.json").read_text())
    raw["models"]["small"].update(changes)
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(raw))
    return path


# ---------------------------------------------------------------------------------------------- network


@pytest.mark.parametrize("size", list(SIZES))
def test_state_dict_matches_reference(size: str) -> None:
    ref = json.loads((REFERENCE / f"stunet_state_dict_{size}.json").read_text())
    net = build_network(size, device="meta")
    got = {k: list(v.shape) for k, v in net.state_dict().items()}
    assert got == dict(ref["state_dict"])
    assert count_parameters(net) == PARAMS[size] == ref["total_params"]


def test_aliases_build_the_same_table_row() -> None:
    assert build_network("S", device="meta").arch == build_network("small", device="meta").arch
    with pytest.raises(ValueError, match=r"small.*base.*large.*huge"):
        build_network("xl", device="meta")


def test_forward_output_and_divisibility() -> None:
    net = build_network(TINY)
    with torch.no_grad():
        assert net(torch.zeros(1, 1, 32, 32, 64)).shape == (1, 105, 32, 32, 64)
        with pytest.raises(ValueError, match="divisible"):
            net(torch.zeros(1, 1, 32, 32, 48))


# ---------------------------------------------------------------------------------------------- manifest


def test_shipped_manifest() -> None:
    m = weights.load_manifest()
    assert list(m.entries) == list(SIZES)
    small, base = m.entry("S"), m.entry("base")
    assert (small.filename, small.size_bytes) == ("small_ep4k.model", 117_497_661)
    assert small.sha256 == "f440f401bf4cac1d1d6f7c4635542ef057193a5f96c0b3c661a6179afeab7be6"
    assert base.sha256 == "7232a6296d320da1d60debe873a1d3fcad74e9404272db8f7440e30d62c5997a"
    assert small.revision == base.revision == "75d046881d0273899b65bf3ef1ee601e9973e7c8"
    for size, e in m.entries.items():
        assert e.repo == "ziyanhuang/STU-Net"
        assert e.parameters == PARAMS[size]
        assert e.target_spacing == (1.5, 1.5, 1.5) and e.patch_size == (128, 128, 128)
        assert e.num_classes == 105 and e.normalization == "zscore"
    for size in ("large", "huge"):
        assert m.entry(size).pin == "branch" and m.entry(size).sha256 is None
        assert "a50a937" in m.entry(size).note


def test_packaged_manifest_is_the_top_level_file() -> None:
    packaged = weights.default_manifest_path()
    assert packaged.read_bytes() == (REPO / "weights_manifest.json").read_bytes()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"extra": 1}, "unknown keys"),
        ({"sha256": "F440"}, "sha256 must be 64 lowercase hex"),
        ({"size_bytes": "117MB"}, "size_bytes must be a positive integer"),
        ({"patch_size": [128, 128]}, "patch_size must be a list of 3"),
        ({"revision": "main"}, "pinned to a commit"),
        ({"num_classes": True}, "num_classes must be a positive integer"),
    ],
)
def test_malformed_manifest_entry(tmp_path: Path, change: dict, message: str) -> None:
    with pytest.raises(WeightsError, match=message):
        weights.load_manifest(manifest_with(tmp_path, **change))


def test_malformed_manifest_file(tmp_path: Path) -> None:
    path = tmp_path / "m.json"
    raw = json.loads((REPO / "weights_manifest.json").read_text())
    del raw["models"]["base"]["note"]
    path.write_text(json.dumps(raw))
    with pytest.raises(WeightsError, match=r"missing keys \['note'\]"):
        weights.load_manifest(path)
    raw = {"schema": 1, "models": {"xl": {}}}
    path.write_text(json.dumps(raw))
    with pytest.raises(WeightsError, match="unknown size 'xl'"):
        weights.load_manifest(path)
    path.write_text("{")
    with pytest.raises(WeightsError, match="cannot be read"):
        weights.load_manifest(path)
    with pytest.raises(WeightsError, match="does not exist"):
        weights.load_manifest(tmp_path / "missing.json")


def test_unknown_size_lists_valid_ones() -> None:
    with pytest.raises(WeightsError, match=r"valid sizes: small \(S\), base \(B\), large \(L\), huge \(H\)"):
        weights.load_manifest().entry("medium")


# ---------------------------------------------------------------------------------------------- import / load


def test_import_and_strict_round_trip(small_ckpt: Path) -> None:
    result = weights.import_weights(small_ckpt)
    # Our fabricated file is not the published one: accepted by architecture, and said so.
    assert result.size == "small" and result.verified_by == weights.BY_ARCH
    assert "not byte-identical" in result.note
    assert result.path == weights.cached_path("small") == cache_files()[0]

    loaded = weights.load_weights("small", download=False)
    net = build_network("small")
    net.load_state_dict(loaded.state_dict, strict=True)
    expected = random_state_dict("small", 0)
    assert all(torch.equal(p, expected[k]) for k, p in net.state_dict().items())

    # The file is plain safetensors that the reference implementation reads the same way.
    from safetensors.torch import load_file

    other = load_file(str(result.path))
    assert all(torch.equal(other[k], expected[k]) for k in expected)
    assert [s.present for s in weights.weights_status()] == [True, False, False, False]


def test_import_verified_by_manifest_hash(small_ckpt: Path, tmp_path: Path) -> None:
    sha = weights.sha256_file(small_ckpt)
    manifest = manifest_with(tmp_path, sha256=sha, size_bytes=small_ckpt.stat().st_size)
    result = weights.import_weights(small_ckpt, "S", manifest=manifest)
    assert (result.verified_by, result.note) == (weights.BY_MANIFEST, "")
    direct = weights.load_weights("small", small_ckpt, manifest=manifest)
    assert direct.verified_by == weights.BY_MANIFEST and direct.size == "small"


def test_numpy1_spelling_and_module_prefix(tmp_path: Path) -> None:
    path = write_checkpoint(
        tmp_path / "old.model", shaped_state_dict("base"), numpy_spelling="numpy1", module_prefix=True
    )
    loaded = weights.load_weights(path=path)
    assert loaded.size == "base" and loaded.verified_by == weights.BY_ARCH
    assert not any(k.startswith("module.") for k in loaded.state_dict)


def test_checkpoint_of_another_size(tmp_path: Path) -> None:
    path = write_checkpoint(tmp_path / "huge_ep4k.model", shaped_state_dict("huge"))
    with pytest.raises(WeightsError, match="STU-Net huge, not small; use --size huge"):
        weights.import_weights(path, "small")
    with pytest.raises(WeightsError, match="STU-Net huge, not base"):
        weights.load_weights("base", path)
    assert cache_files() == []


def test_checkpoint_of_another_architecture(tmp_path: Path) -> None:
    other = Arch(dims=SIZES["small"].dims, depths=SIZES["small"].depths, num_classes=118)
    path = write_checkpoint(tmp_path / "v2.model", shaped_state_dict(other))
    expected = r"no STU-Net size \(130 tensors, 118 output classes; closest is small"
    with pytest.raises(WeightsError, match=expected):
        weights.import_weights(path)
    assert cache_files() == []


def test_truncated_checkpoint(small_ckpt: Path, tmp_path: Path) -> None:
    cut = tmp_path / "small_ep4k.model"
    with small_ckpt.open("rb") as f:
        cut.write_bytes(f.read(small_ckpt.stat().st_size // 2))
    with pytest.raises(WeightsError, match="truncated or corrupted"):
        weights.import_weights(cut)
    assert cache_files() == []


def test_garbage_and_foreign_files(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.model"
    # Random bytes make the unpickler fail in different ways: UnpicklingError, IndexError (seed 17),
    # UnicodeDecodeError (54), KeyError (62), ... Each must give the same one-line error.
    for seed in range(64):
        garbage.write_bytes(np.random.default_rng(seed).bytes(4096))
        with pytest.raises(WeightsError, match="truncated or corrupted"):
            weights.import_weights(garbage)
    unsafe = tmp_path / "unsafe.model"
    torch.save({"state_dict": {}, "extra": fractions.Fraction(1, 3)}, unsafe)
    with pytest.raises(WeightsError, match=r"\(fractions.Fraction\).*refusing to unpickle"):
        weights.import_weights(unsafe)
    notckpt = tmp_path / "other.pt"
    torch.save({"model": [1, 2, 3]}, notckpt)
    with pytest.raises(WeightsError, match="no 'state_dict'"):
        weights.import_weights(notckpt)
    with pytest.raises(WeightsError, match="does not exist"):
        weights.import_weights(tmp_path / "nope.model")
    assert cache_files() == []


def test_disk_full(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_checkpoint(tmp_path / "s.model", shaped_state_dict("small"))
    monkeypatch.setattr(weights, "_free_bytes", lambda folder: 1000)
    with pytest.raises(WeightsError, match="disk full"):
        weights.import_weights(path)
    assert cache_files() == []
    monkeypatch.undo()

    def no_space(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(weights.os, "fsync", no_space)
    with pytest.raises(WeightsError, match="disk full while writing"):
        weights.import_weights(path)
    assert cache_files() == []  # no temporary file left behind either


def test_cold_cache_without_download() -> None:
    with pytest.raises(WeightsError, match=r"stuseg download --size base.*stuseg import-weights"):
        weights.load_weights("B", download=False)
    with pytest.raises(WeightsError, match="give a model size"):
        weights.load_weights()


def test_cli_import_and_weights(small_ckpt: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    huge = write_checkpoint(tmp_path / "huge.model", shaped_state_dict("huge"))
    bad = runner.invoke(app, ["import-weights", str(huge), "--size", "small"])
    assert bad.exit_code == 1
    assert bad.output.strip().startswith("stuseg: error:") and "STU-Net huge" in bad.output
    assert bad.output.strip().count("\n") == 0

    ok = runner.invoke(app, ["import-weights", str(small_ckpt)])
    assert ok.exit_code == 0, ok.output
    assert str(weights.cached_path("small")) in ok.output

    listing = runner.invoke(app, ["weights", "--json"])
    rows = {r["size"]: r for r in json.loads(listing.stdout)}
    assert rows["small"]["present"] and rows["small"]["verified_by"] == weights.BY_ARCH
    assert not rows["huge"]["present"] and rows["huge"]["pin"] == "branch"
