"""The network against the reference state dicts, the manifest reader, and reading/importing/loading
checkpoints in the original nnU-Net v1 container. Nothing here touches the network (the internet)."""

from __future__ import annotations

import errno
import fractions
import hashlib
import json
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from fabricate import (
    checkpoint_dict,
    random_state_dict,
    shaped_state_dict,
    small_checkpoint,
    write_checkpoint,
)
from typer.testing import CliRunner

from stuseg.cli import app
from stuseg.errors import WeightsError
from stuseg.model import network, sizes
from stuseg.model.network import SIZES, Arch, build_network
from stuseg.weights import cache as weights
from stuseg.weights import checkpoints, manifest

REFERENCE = Path(__file__).parent / "data" / "reference"
REPO = Path(__file__).resolve().parents[1]
# Parameter counts as published with STU-Net (arXiv 2304.06716, Table 1: 14.6M, 58.26M, 440.30M,
# 1457.33M), exact values from the reference state dicts in tests/data/reference/.
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
    raw = json.loads(manifest.default_manifest_path().read_text())
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
    assert sum(v.numel() for v in net.state_dict().values()) == PARAMS[size] == ref["total_params"]


def test_forward_output_and_divisibility() -> None:
    net = build_network(TINY)
    with torch.no_grad():
        assert net(torch.zeros(1, 1, 32, 32, 64)).shape == (1, 105, 32, 32, 64)
        with pytest.raises(ValueError, match="divisible"):
            net(torch.zeros(1, 1, 32, 32, 48))


# ---------------------------------------------------------------------------------------------- manifest


def test_shipped_manifest() -> None:
    m = manifest.load_manifest()
    assert list(m.entries) == list(SIZES)
    small, base = m.entry("S"), m.entry("base")
    # The published files as listed by the hub at commit 75d04688 (huggingface.co/ziyanhuang/STU-Net).
    assert (small.filename, small.size_bytes) == ("small_ep4k.model", 117_497_661)
    assert small.sha256 == "f440f401bf4cac1d1d6f7c4635542ef057193a5f96c0b3c661a6179afeab7be6"
    assert base.sha256 == "7232a6296d320da1d60debe873a1d3fcad74e9404272db8f7440e30d62c5997a"
    assert small.revision == base.revision == "75d046881d0273899b65bf3ef1ee601e9973e7c8"
    for size, e in m.entries.items():
        assert e.repo == "ziyanhuang/STU-Net"
        ref = json.loads((REFERENCE / f"stunet_state_dict_{size}.json").read_text())
        assert e.parameters == ref["total_params"]
        assert e.converted_bytes == 4 * ref["total_params"]
    for size in ("large", "huge"):
        assert m.entry(size).pin == "branch" and m.entry(size).sha256 is None
        assert "a50a937" in m.entry(size).note


def test_manifest_is_a_real_file_in_the_package_and_the_top_level_copy_is_identical() -> None:
    packaged = manifest.default_manifest_path()
    assert packaged.parent == Path(manifest.__file__).parent
    assert packaged.is_file() and not packaged.is_symlink()
    assert packaged.read_bytes() == (REPO / "weights_manifest.json").read_bytes()


def test_plan_facts_are_not_in_the_manifest(tmp_path: Path) -> None:
    # They live in stuseg/model/plan.py only; an old (schema 1) manifest that still carries them is refused.
    raw = json.loads(manifest.default_manifest_path().read_text())
    for entry in raw["models"].values():
        assert not {"target_spacing", "patch_size", "normalization", "num_classes"} & set(entry)
    with pytest.raises(WeightsError, match=r"unknown keys \['patch_size'\]"):
        manifest.load_manifest(manifest_with(tmp_path, patch_size=[128, 128, 128]))
    raw["schema"] = 1
    path = tmp_path / "old.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(WeightsError, match=r"schema 1 is not supported \(expected 2\)"):
        manifest.load_manifest(path)


def test_size_names_are_the_network_table_in_order() -> None:
    # sizes.py keeps the names without importing torch; network.SIZES is the table they name.
    assert tuple(network.SIZES) == sizes.SIZE_NAMES == ("small", "base", "large", "huge")


@pytest.mark.parametrize(
    ("given", "size"),
    [("small", "small"), ("S", "small"), (" Base ", "base"), ("l", "large"), ("HUGE", "huge")],
)
def test_a_size_is_named_by_its_name_or_first_letter(given: str, size: str) -> None:
    assert sizes.canonical_size(given) == size
    assert network.build_network(given, device="meta").arch == network.SIZES[size]  # meta: no memory


@pytest.mark.parametrize("given", ["xl", "", "sm", "bases"])
def test_an_unknown_size_is_one_line_listing_the_sizes(given: str) -> None:
    line = f"unknown model size {given!r}; valid sizes: small (S), base (B), large (L), huge (H)"
    with pytest.raises(WeightsError) as raised:
        sizes.canonical_size(given)
    assert str(raised.value) == line
    with pytest.raises(WeightsError, match=re.escape(line)):
        network.build_network(given, device="meta")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"extra": 1}, "unknown keys"),
        ({"sha256": "F440"}, "sha256 must be 64 lowercase hex"),
        ({"size_bytes": "117MB"}, "size_bytes must be a positive integer"),
        ({"revision": "main"}, "pinned to a commit"),
        ({"parameters": True}, "parameters must be a positive integer"),
        ({"pin": "tag"}, "pin must be 'commit' or 'branch'"),
        ({"repo": "STU-Net"}, "repo must be a 'owner/name' string"),
    ],
)
def test_malformed_manifest_entry(tmp_path: Path, change: dict, message: str) -> None:
    with pytest.raises(WeightsError, match=message):
        manifest.load_manifest(manifest_with(tmp_path, **change))


def test_malformed_manifest_file(tmp_path: Path) -> None:
    path = tmp_path / "m.json"
    raw = json.loads(manifest.default_manifest_path().read_text())
    del raw["models"]["base"]["note"]
    path.write_text(json.dumps(raw))
    with pytest.raises(WeightsError, match=r"missing keys \['note'\]"):
        manifest.load_manifest(path)
    raw = {"schema": 2, "models": {"xl": {}}}
    path.write_text(json.dumps(raw))
    with pytest.raises(WeightsError, match="unknown size 'xl'"):
        manifest.load_manifest(path)
    path.write_text("{")
    with pytest.raises(WeightsError, match="cannot be read"):
        manifest.load_manifest(path)
    with pytest.raises(WeightsError, match="does not exist"):
        manifest.load_manifest(tmp_path / "missing.json")
    with pytest.raises(WeightsError, match="is a folder"):
        manifest.load_manifest(tmp_path)


def test_unknown_size_lists_valid_ones() -> None:
    with pytest.raises(WeightsError, match=r"valid sizes: small \(S\), base \(B\), large \(L\), huge \(H\)"):
        manifest.load_manifest().entry("medium")


# ---------------------------------------------------------------------------------------------- import / load


def read_safetensors_by_hand(path: Path) -> tuple[dict, dict[str, bytes]]:
    """The file format as its specification states it: u64 header length, JSON header, data."""
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + n])
    data = blob[8 + n :]
    meta = header.pop("__metadata__")
    return meta, {k: data[v["data_offsets"][0] : v["data_offsets"][1]] for k, v in header.items()}


def test_import_and_strict_round_trip(small_ckpt: Path) -> None:
    result = weights.import_weights(small_ckpt)
    # Our fabricated file is not the published one: accepted by architecture, and said so.
    assert result.size == "small" and result.verified_by == weights.BY_ARCH
    assert "not byte-identical" in result.note
    assert result.path == weights.cached_path("small") == cache_files()[0]
    assert result.sha256 == hashlib.sha256(small_ckpt.read_bytes()).hexdigest()

    loaded = weights.load_weights("small", download=False)
    net = build_network("small")
    net.load_state_dict(loaded.state_dict, strict=True)
    expected = random_state_dict("small", 0)
    assert all(torch.equal(p, expected[k]) for k, p in net.state_dict().items())

    # The cached file, read by hand from the format's definition: the fabricated fp32 bytes, and
    # the record of where they came from.
    meta, raw = read_safetensors_by_hand(result.path)
    assert raw.keys() == expected.keys()
    assert all(raw[k] == expected[k].numpy().astype("<f4").tobytes() for k in expected)
    assert meta["source"] == str(small_ckpt.resolve()) and meta["verified_by"] == weights.BY_ARCH
    assert meta["source_sha256"] == result.sha256 and meta["stuseg_size"] == "small"
    assert [s.present for s in weights.weights_status()] == [True, False, False, False]


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads the mappings from Linux's /proc")
def test_cached_tensors_are_memory_mapped(small_ckpt: Path) -> None:
    weights.import_weights(small_ckpt)
    loaded = weights.load_weights("small", download=False)
    path = str(weights.cached_path("small"))
    # Every tensor's memory lies inside a mapping of the cached file (Linux: /proc/self/maps).
    maps = [line.split() for line in Path("/proc/self/maps").read_text().splitlines()]
    spans = [tuple(int(x, 16) for x in m[0].split("-")) for m in maps if len(m) >= 6 and m[5] == path]
    assert spans
    for t in loaded.state_dict.values():
        assert any(lo <= t.data_ptr() < hi for lo, hi in spans)


def test_import_verified_by_manifest_hash(small_ckpt: Path, tmp_path: Path) -> None:
    sha = hashlib.sha256(small_ckpt.read_bytes()).hexdigest()
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
    # Random bytes behind a pickle opcode make the weights-only unpickler fail in different ways
    # (UnpicklingError, IndexError, UnicodeDecodeError, KeyError, ...); each must give the same
    # one-line error. Behind a zip signature, torch's zip reader fails instead.
    for seed in range(64):
        noise = np.random.default_rng(seed).bytes(4096)
        for head in (b"\x80\x02", b"PK\x03\x04"):
            garbage.write_bytes(head + noise)
            with pytest.raises(WeightsError, match="truncated or corrupted") as info:
                weights.import_weights(garbage)
            assert "\n" not in str(info.value) and len(str(info.value)) < 300
        garbage.write_bytes(b"\x00" + noise)  # not a format stuseg reads at all
        with pytest.raises(WeightsError, match="is not a checkpoint: it holds no format stuseg knows"):
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
    renamed = tmp_path / "ct.safetensors"
    renamed.write_bytes((REPO / "tests" / "data" / "abdomen_ct_3mm.nii.gz").read_bytes())
    with pytest.raises(WeightsError, match="is not a checkpoint: it holds gzip-compressed data"):
        weights.import_weights(renamed)
    (tmp_path / "empty.model").write_bytes(b"")
    with pytest.raises(WeightsError, match="is empty, not a checkpoint"):
        weights.import_weights(tmp_path / "empty.model")
    assert cache_files() == []


def test_legacy_torch_format_is_read(tmp_path: Path) -> None:
    # Checkpoints saved by torch < 1.6 are a plain pickle stream (no zip, so no mmap).
    path = tmp_path / "old.model"
    torch.save(checkpoint_dict(shaped_state_dict("small")), path, _use_new_zipfile_serialization=False)
    assert path.read_bytes()[:2] == b"\x80\x02"
    assert weights.load_weights(path=path).size == "small"


def write_header(path: Path, header: object, data: bytes = b"") -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


F32x2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


@pytest.mark.parametrize(
    ("header", "data", "message"),
    [
        ({"a": 1}, b"", "is not a valid safetensors file: entry 'a' of its header is not a tensor"),
        ({"a": {"dtype": "F32", "shape": [2]}}, b"\0" * 8, "tensor 'a' has no data_offsets"),
        (
            {"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}},
            b"\0" * 8,
            r"tensor 'a' has shape \[3\] \(12 bytes of F32\) but data_offsets \[0, 8\] \(8 bytes\)",
        ),
        ({"a": {**F32x2, "dtype": "Q7"}}, b"\0" * 8, "tensor 'a' has dtype 'Q7', which stuseg does not read"),
        ({"a": {**F32x2, "shape": [-2]}}, b"\0" * 8, "not a list of non-negative integers"),
        ({"a": {**F32x2, "data_offsets": [0]}}, b"\0" * 8, r"data_offsets \[0\], not \[begin, end\]"),
        ({"a": {**F32x2, "extra": 1}}, b"\0" * 8, r"tensor 'a' has unknown keys \['extra'\]"),
        ({"a": F32x2}, b"\0" * 4, "is truncated: its header describes 8 bytes of tensors but only 4 follow"),
        ({"a": F32x2}, b"\0" * 12, "4 bytes follow the last tensor"),
        ({"a": {**F32x2, "data_offsets": [4, 12]}}, b"\0" * 12, "starts at byte 4 of the data, expected 0"),
        ({"__metadata__": {"a": 1}}, b"", "its __metadata__ is not a table of strings"),
        ([1, 2], b"", "its header is not a JSON object"),
    ],
)
def test_malformed_safetensors_header(tmp_path: Path, header: object, data: bytes, message: str) -> None:
    path = write_header(tmp_path / "w.safetensors", header, data)
    with pytest.raises(WeightsError, match=message):
        weights.load_weights(path=path)
    with pytest.raises(WeightsError, match=message):
        weights.import_weights(path)
    assert cache_files() == []


def test_damaged_safetensors_prefix(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    path.write_bytes(b"\x05\x00")
    with pytest.raises(WeightsError, match="is truncated: it has 2 bytes, fewer than the 8"):
        weights.load_weights(path=path)
    path.write_bytes(struct.pack("<Q", 50) + b"{}")
    with pytest.raises(WeightsError, match="is truncated: its header needs 50 bytes but only 2 follow"):
        weights.load_weights(path=path)
    path.write_bytes(struct.pack("<Q", 2) + b"\xff{")
    with pytest.raises(WeightsError, match="its header is not JSON"):
        weights.load_weights(path=path)


def test_header_reader_accepts_what_the_library_writes(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    tensors = {
        "w": torch.arange(6, dtype=torch.float16).reshape(2, 3),
        "b": torch.tensor([True, False]),
        "e": torch.zeros(0, 4),
        "i": torch.arange(5, dtype=torch.int64),
    }
    save_file(tensors, str(tmp_path / "x.safetensors"), {"k": "v"})
    assert checkpoints.validate_safetensors(tmp_path / "x.safetensors") == {"k": "v"}
    save_file(tensors, str(tmp_path / "y.safetensors"))
    assert checkpoints.validate_safetensors(tmp_path / "y.safetensors") == {}


def test_disk_full(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_checkpoint(tmp_path / "s.model", shaped_state_dict("small"))
    monkeypatch.setattr(checkpoints, "_free_bytes", lambda folder: 1000)
    with pytest.raises(WeightsError, match="disk full"):
        weights.import_weights(path)
    assert cache_files() == []
    monkeypatch.undo()

    def no_space(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoints.os, "fsync", no_space)
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


def test_weights_listing_imports_neither_torch_nor_numba(small_ckpt: Path) -> None:
    weights.import_weights(small_ckpt)  # a cached file to read, too
    code = (
        "import sys; from typer.testing import CliRunner; from stuseg.cli import app; "
        "r = CliRunner().invoke(app, ['weights', '--json']); assert r.exit_code == 0, r.output; "
        "print(sorted(m for m in ('torch', 'numba', 'numpy') if m in sys.modules))"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
