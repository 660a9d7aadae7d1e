"""Weight files' sha256 remembered by their stat stamp (stuseg.weights.digests): hashed once while
unchanged, hashed again after any change a user or program can make, never wrong. The oracle is
hashlib over the file's bytes as the test wrote them."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest
import torch
from model_folders import state_dict_of, tiny_arch, write_v2_folder

from stuseg.errors import WeightsError
from stuseg.weights import digests, modelstore
from stuseg.weights.modelfolder import load_fold


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The files hashed (read whole) from here on; files count as settled at once."""
    seen: list[Path] = []
    whole = digests.sha256_file

    def counting(path: Path, *args: object) -> str:
        seen.append(Path(path))
        return whole(path, *args)

    monkeypatch.setattr(digests, "sha256_file", counting)
    monkeypatch.setattr(digests, "RACY_SECONDS", 0.0)
    return seen


def _write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def _rewrite_keeping_size_and_times(path: Path, data: bytes) -> str:
    """New bytes of the same length, the access and modification times put back (``cp -p``)."""
    st = path.stat()
    assert len(data) == st.st_size
    time.sleep(0.05)  # past the clock tick of the first write, as any later write is
    sha = _write(path, data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    return sha


def test_an_unchanged_file_is_read_once(tmp_path: Path, reads: list[Path]) -> None:
    weights = tmp_path / "w.bin"
    sha = _write(weights, os.urandom(3 << 20))
    assert [digests.remembered_sha256(weights) for _ in range(3)] == [sha] * 3
    assert reads == [weights]
    assert (Path(os.environ["STUSEG_HOME"]) / digests.MEMO_NAME).is_file()


def test_bytes_rewritten_in_place_with_size_and_times_restored_are_hashed_again(
    tmp_path: Path, reads: list[Path]
) -> None:
    weights = tmp_path / "w.bin"
    _write(weights, b"a" * 4096)
    digests.remembered_sha256(weights)
    changed = _rewrite_keeping_size_and_times(weights, b"b" * 4096)
    assert digests.remembered_sha256(weights) == changed
    assert len(reads) == 2


def test_a_file_replaced_by_another_is_hashed_again(tmp_path: Path, reads: list[Path]) -> None:
    weights, other = tmp_path / "w.bin", tmp_path / "other.bin"
    _write(weights, b"a" * 4096)
    digests.remembered_sha256(weights)
    st = weights.stat()
    sha = _write(other, b"b" * 4096)
    os.utime(other, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(other, weights)
    assert digests.remembered_sha256(weights) == sha


def test_a_file_written_just_now_is_hashed_but_not_remembered(
    tmp_path: Path, reads: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(digests, "RACY_SECONDS", 60.0)
    weights = tmp_path / "w.bin"
    sha = _write(weights, b"x" * 1000)
    assert digests.remembered_sha256(weights) == digests.remembered_sha256(weights) == sha
    assert len(reads) == 2


@pytest.mark.parametrize("memo", ["garbage", "list", "folder"])
def test_a_damaged_or_unwritable_memo_costs_time_only(
    tmp_path: Path, reads: list[Path], monkeypatch: pytest.MonkeyPatch, memo: str
) -> None:
    home = tmp_path / "home"
    home.mkdir()
    memo_file = home / digests.MEMO_NAME
    if memo == "folder":  # where the memo should be: it can be neither read nor replaced
        memo_file.mkdir()
    else:
        memo_file.write_text("{not json" if memo == "garbage" else "[1, 2]")
    monkeypatch.setenv("STUSEG_HOME", str(home))
    weights = tmp_path / "w.bin"
    sha = _write(weights, b"y" * 1000)
    assert digests.remembered_sha256(weights) == digests.remembered_sha256(weights) == sha
    assert len(reads) == (2 if memo == "folder" else 1)


def test_a_registered_model_is_hashed_once_and_a_changed_fold_is_still_refused(
    tmp_path: Path, reads: list[Path]
) -> None:
    arch = tiny_arch()
    state = state_dict_of(arch)
    model = modelstore.import_model(write_v2_folder(tmp_path, state), "m")
    fold = model.folds[0]
    reads.clear()  # the import hashes what it copies, afresh
    for _ in range(3):
        loaded = load_fold(model, fold)
        assert all(torch.equal(loaded[k], state[k]) for k in state)
    assert reads == [fold.checkpoint]
    data = bytearray(fold.checkpoint.read_bytes())
    data[-1] ^= 1  # a flipped bit: the header is still sound
    _rewrite_keeping_size_and_times(fold.checkpoint, bytes(data))
    with pytest.raises(WeightsError, match="recorded when the model was imported"):
        load_fold(model, fold)
