"""Segmenter: one loaded model for many images, the same result as segment(), stage by stage."""

from __future__ import annotations

import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from fabricate import tiny_network

from stuseg.images.io import read_image
from stuseg.inference import memory, pipeline
from stuseg.inference.pipeline import Segmenter, segment
from stuseg.weights.cache import LoadedWeights

# Anisotropic voxels, so that the image is resampled on the way in and back out.
ZOOMS = (1.1, 0.9, 2.0)


def _ct(tmp_path: Path, seed: int, name: str = "ct.nii.gz") -> Path:
    rng = np.random.default_rng(seed)
    data = rng.normal(0, 300, (34, 40, 18)).astype(np.float32) - 200
    data[:2] = 0  # a zero border to crop
    affine = np.diag([*ZOOMS, 1.0])
    affine[:3, 3] = [4.0, -7.5, 30.0]
    img = nib.Nifti1Image(data, affine)
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=2)
    path = tmp_path / name
    nib.save(img, path)
    return path


def _same(a: pipeline.Segmentation, b: pipeline.Segmentation) -> None:
    assert a.labels.dtype == b.labels.dtype == np.uint8
    np.testing.assert_array_equal(a.labels, b.labels)
    assert a.image.header.binaryblock == b.image.header.binaryblock
    assert (a.names, a.device, a.size) == (b.names, b.device, b.size)


@pytest.mark.parametrize("fast", [False, True])
def test_segmenter_equals_segment_bit_for_bit(tmp_path: Path, fast: bool) -> None:
    path = _ct(tmp_path, 0)
    net = tiny_network()
    expect = segment(path, model=net, fast=fast, device="cpu", roi_subset=["organs"])
    assert len(np.unique(expect.labels)) > 2  # a labelling, not one class
    got = Segmenter(model=net, fast=fast, device="cpu", roi_subset=["organs"])(path)
    _same(got, expect)
    assert expect.image.shape == nib.load(path).shape
    assert set(expect.timings) >= {"read", "load", "preprocess", "network", "export"}
    assert "load" not in got.timings  # a Segmenter loads once, in __init__: see load_seconds


def test_stages_in_different_threads_equal_a_call(tmp_path: Path) -> None:
    path = _ct(tmp_path, 1)
    segmenter = Segmenter(model=tiny_network(), device="cpu")
    whole = segmenter(path)
    with ThreadPoolExecutor(1) as a, ThreadPoolExecutor(1) as b, ThreadPoolExecutor(1) as c:
        prepared = a.submit(segmenter.prepare, path).result()
        inferred = b.submit(segmenter.infer, prepared).result()
        staged = c.submit(segmenter.finish, inferred).result()
    _same(staged, whole)


@pytest.mark.slow
def test_one_load_for_several_images(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    loads = []

    def counting_load(size, weights, device):
        loads.append((size, weights, device))
        return tiny_network().to(device), LoadedWeights("small", {}, "test", tmp_path / "w", "0" * 64)

    monkeypatch.setattr(pipeline, "load_model", counting_load)
    segmenter = Segmenter("small", device="cpu", fast=True)
    assert len(loads) == 1
    first, second = segmenter(_ct(tmp_path, 2, "a.nii.gz")), segmenter(_ct(tmp_path, 3, "b.nii.gz"))
    assert len(loads) == 1
    assert first.size == second.size == "small"
    assert not np.array_equal(first.labels, second.labels)  # two different images were segmented
    # And each equals a fresh one-shot run of the same network.
    _same(second, segment(tmp_path / "b.nii.gz", model=tiny_network(), size="small", device="cpu", fast=True))


def test_source_is_the_callers_volume_or_none(tmp_path: Path) -> None:
    path = _ct(tmp_path, 4)
    segmenter = Segmenter(model=tiny_network(), device="cpu", fast=True)
    volume = read_image(path)
    assert segmenter(volume).source is volume
    assert segmenter(path).source is None


class FakeLibc:
    """Records what would have been asked of glibc."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append(("mallopt", param, value))
        return 1

    def malloc_trim(self, pad: int) -> int:
        self.calls.append(("malloc_trim", pad))
        return 1


def test_a_library_call_tunes_malloc_while_it_runs_and_puts_the_defaults_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    libc = FakeLibc()
    monkeypatch.setattr(memory, "_glibc", lambda: libc)
    # M_MMAP_MAX (-4) and M_TRIM_THRESHOLD (-1) from glibc's malloc.h, glibc's defaults after.
    tune = [("mallopt", -4, 0), ("mallopt", -1, 2**31 - 1)]
    restore = [("mallopt", -4, 65536), ("mallopt", -1, 128 * 1024), ("malloc_trim", 0)]
    segment(_ct(tmp_path, 5), model=tiny_network(), device="cpu", fast=True)
    mallopts = [c for c in libc.calls if c[0] == "mallopt"]
    assert mallopts == tune + restore[:2]  # once, around the network
    at = libc.calls.index(restore[0])
    assert libc.calls[at : at + 3] == restore
    libc.calls.clear()
    Segmenter(model=tiny_network(), device="cpu")(_ct(tmp_path, 6, "b.nii.gz"))
    assert [c for c in libc.calls if c[0] == "mallopt"] == tune + restore[:2]


def test_a_host_can_keep_stuseg_away_from_malloc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    libc = FakeLibc()
    monkeypatch.setattr(memory, "_glibc", lambda: libc)
    monkeypatch.setenv("STUSEG_TUNE_MALLOC", "0")
    segment(_ct(tmp_path, 5), model=tiny_network(), device="cpu", fast=True)
    assert [c for c in libc.calls if c[0] == "mallopt"] == []
    assert ("malloc_trim", 0) in libc.calls  # returning free pages changes no setting


def test_a_process_tuned_for_good_stays_tuned(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    libc = FakeLibc()
    monkeypatch.setattr(memory, "_glibc", lambda: libc)
    assert pipeline.keep_freed_memory("cpu") is True  # the command line's opt-in
    assert libc.calls == [("mallopt", -4, 0), ("mallopt", -1, 2**31 - 1)]
    segment(_ct(tmp_path, 5), model=tiny_network(), device="cpu", fast=True)
    assert [c for c in libc.calls[2:] if c[0] == "mallopt"] == []  # no defaults put back


def test_nested_and_concurrent_calls_share_one_tuning(monkeypatch: pytest.MonkeyPatch) -> None:
    libc = FakeLibc()
    monkeypatch.setattr(memory, "_glibc", lambda: libc)
    entered, release = threading.Barrier(3), threading.Event()

    def call() -> None:
        with memory.tuned():
            entered.wait()
            release.wait()

    threads = [threading.Thread(target=call) for _ in range(2)]
    for t in threads:
        t.start()
    entered.wait()
    with memory.tuned():
        assert len([c for c in libc.calls if c[0] == "mallopt"]) == 2  # set once, by the first
    assert len(libc.calls) == 2  # the other two are still inside
    release.set()
    for t in threads:
        t.join()
    assert libc.calls[2:] == [("mallopt", -4, 65536), ("mallopt", -1, 128 * 1024), ("malloc_trim", 0)]


_FREE_THEN_TRIM = """
import numpy as np
from stuseg.inference import memory
from stuseg.inference import pipeline

def returned(voxels):
    block = np.ones(256 * 2**20, np.uint8)  # touched; from the heap, as mmap is off
    with open("/proc/self/statm") as fh:
        before = int(fh.read().split()[1])
    del block
    memory.release_free_memory(voxels)  # after a stage on an image of ``voxels``
    with open("/proc/self/statm") as fh:
        return (before - int(fh.read().split()[1])) * 4096

small, large = 160**3, memory.HOLD_VOXELS + 1
assert pipeline.keep_freed_memory("cpu") is True
print(returned(small))
assert pipeline.keep_freed_memory("cpu", many_images=True) is True
print(returned(small), returned(large))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc is Linux's")
def test_a_process_of_many_images_keeps_its_free_pages(tmp_path: Path) -> None:
    # The pages are counted by the kernel (RSS), in a fresh process: a batch keeps them between
    # small images; predict's process, and a batch after a large image, give them back.
    script = tmp_path / "free.py"
    script.write_text(_FREE_THEN_TRIM)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, check=True)
    one_image, many_small, many_large = (int(n) for n in done.stdout.split())
    assert one_image > 200 * 2**20
    assert abs(many_small) < 16 * 2**20
    assert many_large > 200 * 2**20


def test_keep_freed_memory_without_glibc(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memory, "_glibc", lambda: None)
    assert pipeline.keep_freed_memory("cpu") is False
    memory.release_free_memory()  # a no-op, not an error
    with memory.tuned():  # likewise
        pass


def test_a_volume_with_infinite_voxels_is_refused_like_a_file(tmp_path: Path) -> None:
    from stuseg.errors import InputError

    volume = read_image(_ct(tmp_path, 3))
    volume.data[5, 6, 7] = np.inf
    volume.data[1, 2, 3] = -np.inf
    with pytest.raises(InputError) as caught:
        segment(volume, model=tiny_network(), device="cpu")
    assert str(caught.value).startswith("the image holds 2 infinite voxels (Inf); ")


def test_statistics_of_a_segmentation_use_its_source_volume(tmp_path: Path) -> None:
    from stuseg.errors import InputError

    volume = read_image(_ct(tmp_path, 4))
    seg = segment(volume, model=tiny_network(), device="cpu", roi_subset=["organs"])
    stats = seg.statistics()
    by_name = {r["structure"]: r for r in stats.structures}
    for value, name in seg.names.items():
        mask = seg.labels == value
        assert by_name[name]["voxels"] == int(mask.sum())
        if mask.any():  # oracle: numpy on the same arrays, in float64
            assert by_name[name]["mean_hu"] == pytest.approx(
                float(volume.data[mask].astype(np.float64).mean())
            )
    from_path = segment(_ct(tmp_path, 4, "again.nii.gz"), model=tiny_network(), device="cpu")
    with pytest.raises(InputError, match="give the CT"):
        from_path.statistics()
