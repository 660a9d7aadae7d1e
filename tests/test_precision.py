"""``--precision``: what ``auto`` picks, how native bfloat16 is detected, that the network really
runs in the type asked for while the sums stay float32, where the choice is recorded, and how far
bfloat16's labels agree with float32's on the decisive test weights and the real scans.

The agreement: random STU-Nets whose classes each win somewhere (the decisive weights of the
agreement tests of ``test_model_v2_vs_nnunet``: PyTorch's initialisation with the heads' biases at
zero, so that the class follows the features) in nnU-Net v2 model folders, on the real abdomen
and chest CTs of ``tests/data``, normal and ``--fast``. No trained weights can be had here (the
hub is unreachable), and the real scans with the published plan and random weights are noise. The
target for ``auto`` to pick bfloat16 on the CPU is >= 99.9% of voxels equal and a mean
per-structure Dice >= 0.995. It is not met (99.1-99.6%, 0.984-0.994 when measured): that test is
an expected failure, strict, so that the day it holds the suite says so and ``auto`` can change.

On weights that decide as a trained model does (``trained_weights``: a small STU-Net fitted to
TotalSegmentator's masks of the real abdomen) bfloat16 comes closer (99.77-99.88%, Dice
0.994-0.996 when measured) and still falls short, where float16, ``auto``'s choice on CUDA,
meets the target; those tests guard the figures and print them (``pytest -s``).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import trained_weights
from model_folders import write_v2_folder

from stuseg import batch
from stuseg.errors import InputError
from stuseg.inference.head import ClassProbabilities
from stuseg.inference.pipeline import Segmenter, segment
from stuseg.model import precision
from stuseg.model.network import Arch, build_network
from stuseg.results.outputs import MARKER

NO_BF16 = "this CPU has no native bfloat16 (AMX-BF16, AVX512_BF16 or Arm BF16); bfloat16 would be emulated"
needs_bf16 = pytest.mark.skipif(precision.native_bfloat16() is None, reason=NO_BF16)
CPU, CUDA, MPS = torch.device("cpu"), torch.device("cuda"), torch.device("mps")


def test_auto_is_float16_on_cuda_and_float32_on_the_cpu_and_mps() -> None:
    assert precision.resolve("auto", CUDA) == "float16"
    assert precision.resolve("AUTO", CPU) == "float32"  # whatever the CPU: see stuseg.model.precision
    assert precision.resolve("auto", MPS) == "float32"
    assert precision.resolve("bfloat16", CPU) == "bfloat16"
    assert precision.resolve("float32", CUDA) == "float32"


@pytest.mark.parametrize(
    ("name", "device", "says"),
    [
        ("float16", CPU, "float16 is for CUDA GPUs"),
        ("bfloat16", MPS, "not supported on MPS"),
        ("half", CPU, "use one of auto, float32, bfloat16, float16"),
    ],
)
def test_what_a_device_cannot_run_is_refused_in_one_line(name: str, device: torch.device, says: str) -> None:
    with pytest.raises(InputError, match=says) as info:
        precision.resolve(name, device)
    assert "\n" not in str(info.value)


@pytest.fixture
def cpuinfo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Point the detection at a fabricated /proc/cpuinfo, with torch's own answer out of the way."""

    def write(text: str) -> str | None:
        path = tmp_path / "cpuinfo"
        path.write_text(text)
        monkeypatch.setattr(precision, "PROC_CPUINFO", path)
        monkeypatch.setattr(precision, "_torch_flags", lambda: None)
        monkeypatch.setattr(precision.sys, "platform", "linux")
        precision.native_bfloat16.cache_clear()
        return precision.native_bfloat16()

    yield write
    precision.native_bfloat16.cache_clear()


def test_native_bfloat16_is_read_from_the_kernels_cpu_flags(cpuinfo) -> None:
    skylake = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw avx512_vnni\n"
    sapphire = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
    zen4 = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16\n"
    graviton3 = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n"
    neoverse_n1 = "processor\t: 0\nFeatures\t: fp asimd atomics fphp asimdhp\n"
    assert cpuinfo(skylake) is None  # AVX-512 alone: torch says "AVX512" here too
    assert cpuinfo(sapphire) == "amx_bf16"
    assert cpuinfo(zen4) == "avx512_bf16"
    assert cpuinfo(graviton3) == "bf16"
    assert cpuinfo(neoverse_n1) is None
    assert cpuinfo("") is None


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="no /proc/cpuinfo (not Linux)")
def test_torch_and_the_kernel_agree_about_this_cpu() -> None:
    flags = precision._linux_flags()
    by_kernel = bool(flags & {"amx_bf16", "avx512_bf16", "bf16"})
    assert (precision.native_bfloat16() is not None) == by_kernel


class ConvProbe(torch.nn.Module):
    """A convolution that records the type of what it computed; logits classes-first."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv3d(1, 3, 1)
        self.seen: set[torch.dtype] = set()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        self.seen.add(y.dtype)
        return y


def _volume(tmp_path: Path, shape: tuple[int, int, int] = (20, 22, 18)) -> Path:
    data = np.random.default_rng(0).normal(0, 300, shape).astype(np.float32) - 500
    path = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(data, np.diag([1.5, 1.5, 1.5, 1.0])), path)
    return path


@pytest.mark.parametrize(("asked", "dtype"), [("bfloat16", torch.bfloat16), ("float32", torch.float32)])
def test_the_network_runs_in_the_type_asked_for(tmp_path: Path, asked: str, dtype: torch.dtype) -> None:
    import dataclasses

    from stuseg.model.plan import PLAN

    plan = dataclasses.replace(PLAN, num_classes=3)
    segmenter = Segmenter(model=ConvProbe(), plan=plan, device="cpu", precision=asked)
    seg = segmenter(_volume(tmp_path))
    assert segmenter.net.seen == {dtype}  # the network that ran (bfloat16: a channels-last copy)
    assert seg.precision == asked
    assert Segmenter(model=ConvProbe(), plan=plan, device="cpu").precision == "float32"  # auto


@pytest.mark.slow  # oneDNN makes its bfloat16 kernels on first use: seconds on 2 cores
def test_the_head_softmax_and_sums_stay_float32_under_bfloat16() -> None:
    """The sums a bfloat16 network adds are float32 probabilities: each voxel's sum is the tile
    weight to float32 accuracy (a bfloat16 softmax would be off by ~1e-3), and they are close to
    float32's, but not equal (the network did run in bfloat16)."""
    torch.manual_seed(0)
    net = build_network(Arch(dims=(4, 4, 4, 4, 4, 4), depths=(1,) * 6, num_classes=5)).eval()
    x = torch.randn(1, 1, 32, 32, 32)
    weight = torch.rand(32, 32, 32, 1) + 0.5
    sums = {}
    for name, autocast in (("float32", None), ("bfloat16", torch.bfloat16)):
        target = torch.zeros(32, 32, 32, 5)
        with torch.inference_mode():
            ClassProbabilities(net, autocast=autocast).accumulate(x, [target], weight)
        assert target.dtype == torch.float32
        torch.testing.assert_close(target.sum(-1, keepdim=True), weight, rtol=1e-5, atol=1e-6)
        sums[name] = target
    difference = (sums["bfloat16"] - sums["float32"]).abs()
    assert 0 < difference.max() < 0.2


CHANNELS_LAST = torch.channels_last_3d


def _record_convolutions(net: torch.nn.Module, seen: list[tuple[bool, bool]]) -> None:
    """Each 3D convolution of ``net`` adds (its input is channels-last, its weight is) when it
    runs; recorded through a closure, so a copy of ``net`` records into the same list."""

    def hook(conv: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        seen.append(
            (
                args[0].is_contiguous(memory_format=CHANNELS_LAST),
                conv.weight.is_contiguous(memory_format=CHANNELS_LAST),
            )
        )

    for module in net.modules():
        if isinstance(module, torch.nn.Conv3d):
            module.register_forward_pre_hook(hook)


def _layout(net: torch.nn.Module) -> list[tuple[str, tuple[int, ...], int]]:
    return [(name, t.stride(), t.data_ptr()) for name, t in net.state_dict().items()]


@pytest.mark.filterwarnings("ignore:this CPU has no native bfloat16")  # emulated: slow, not wrong
@pytest.mark.parametrize("asked", ["bfloat16", "float32"])
def test_bfloat16_on_the_cpu_feeds_the_network_channels_last(tmp_path: Path, asked: str) -> None:
    """bfloat16 on the CPU: every convolution's weight and input (the network's 2-channel input,
    and every activation after it: the norms keep the layout) in channels_last_3d when they run;
    float32: the default layout, unchanged. The caller's module is left as it was either way."""
    import dataclasses

    from stuseg.model.plan import PLAN, Normalization

    torch.manual_seed(0)
    net = build_network(Arch((4, 4, 4, 4, 4, 4), (1,) * 6, in_channels=2, num_classes=3)).eval()
    seen: list[tuple[bool, bool]] = []
    _record_convolutions(net, seen)
    before = _layout(net)
    zscore = Normalization()
    plan = dataclasses.replace(PLAN, num_classes=3, patch_size=(32, 32, 32), channels=(zscore, zscore))
    ct = _volume(tmp_path)
    segmenter = Segmenter(model=net, plan=plan, device="cpu", precision=asked)
    segmenter([ct, ct])
    assert seen, "no convolution ran"
    if asked == "bfloat16":
        assert seen[0][0], "the network's input was not channels-last"
        assert all(weight for _, weight in seen), "a convolution ran with channels-first weights"
        assert all(given for given, _ in seen), "a convolution's input was reordered to channels-first"
        assert segmenter.net is not net  # a copy was converted, not the caller's module
    else:
        assert not seen[0][0] and not all(weight for _, weight in seen)
        assert segmenter.net is net
    assert _layout(net) == before


def test_a_channels_last_network_computes_what_the_network_computes() -> None:
    """``to_channels_last`` (its norms by ``group_norm``) in float32 against the network as built:
    the same state dict, the same features to float32 accuracy, and features that stay
    channels-last (so the head reads them without a copy)."""
    from stuseg.model.network import GroupwiseInstanceNorm3d, to_channels_last

    torch.manual_seed(0)
    net = build_network(Arch((4, 8, 8, 8, 8, 8), (1,) * 6, num_classes=3)).eval()
    x = torch.randn(2, 1, 32, 32, 32) * 100 + 40  # off-centre: the norms' statistics matter
    with torch.inference_mode():
        expected = net.features(x)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    last = to_channels_last(copy.deepcopy(net))
    assert any(isinstance(m, GroupwiseInstanceNorm3d) for m in last.modules())
    got_state = last.state_dict()
    assert list(got_state) == list(state)
    assert all(torch.equal(got_state[k], v) for k, v in state.items())
    with torch.inference_mode():
        got = last.features(x.contiguous(memory_format=CHANNELS_LAST))
    assert got.is_contiguous(memory_format=CHANNELS_LAST)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


class _Uncopyable(torch.nn.Module):
    """A network module that ``copy.deepcopy`` refuses (it holds a lock)."""

    def __init__(self) -> None:
        super().__init__()
        import threading

        self.conv = torch.nn.Conv3d(1, 3, 3, padding=1)
        self.lock = threading.Lock()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


@pytest.mark.filterwarnings("ignore:this CPU has no native bfloat16")
def test_a_module_that_cannot_be_copied_runs_in_bfloat16_in_its_own_layout(tmp_path: Path) -> None:
    import dataclasses

    from stuseg.model.plan import PLAN

    net = _Uncopyable()
    before = _layout(net)
    plan = dataclasses.replace(PLAN, num_classes=3, patch_size=(16, 16, 16))
    segmenter = Segmenter(model=net, plan=plan, device="cpu", precision="bfloat16")
    assert segmenter.net is net and _layout(net) == before
    assert segmenter(_volume(tmp_path)).precision == "bfloat16"


@pytest.mark.filterwarnings("ignore:this CPU has no native bfloat16")
def test_float32_after_bfloat16_on_the_same_module_is_bit_identical(tmp_path: Path) -> None:
    """A bfloat16 Segmenter made from the caller's module must not change what a float32 one
    made from it afterwards computes: the module's own float32 output, bit for bit, and the labels."""
    import dataclasses

    from stuseg.model.plan import PLAN

    torch.manual_seed(0)
    net = build_network(Arch((4, 4, 8, 8, 8, 8), (1,) * 6, num_classes=5)).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.3)  # labels that vary from voxel to voxel (as fabricate.tiny_network)
    plan = dataclasses.replace(PLAN, num_classes=5, patch_size=(32, 32, 32))
    ct = _volume(tmp_path)
    x = torch.randn(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        logits = net(x)
    first = Segmenter(model=net, plan=plan, device="cpu", fast=True)(ct).labels
    in_bf16 = Segmenter(model=net, plan=plan, device="cpu", fast=True, precision="bfloat16")
    assert in_bf16(ct).precision == "bfloat16"
    again = Segmenter(model=net, plan=plan, device="cpu", fast=True)(ct).labels
    with torch.inference_mode():
        assert torch.equal(net(x), logits)
    assert len(np.unique(first)) >= 3, "the weights label too few classes to compare"
    np.testing.assert_array_equal(again, first)


@pytest.mark.filterwarnings("ignore:this CPU has no native bfloat16")
def test_bfloat16_with_mirroring_agrees_with_float32_with_mirroring(tmp_path: Path) -> None:
    """The mirrorings flip a channels-last input and flip the classes-last result back: bfloat16
    with ``tta`` labels as float32 with ``tta`` does but for rounding, whereas leaving the
    mirrorings out changes a third of the labels of these weights (so a misplaced flip would show)."""
    import dataclasses

    from stuseg.model.plan import PLAN

    torch.manual_seed(0)
    net = build_network(Arch((4, 4, 8, 8, 8, 8), (1,) * 6, num_classes=5)).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.3)
    plan = dataclasses.replace(PLAN, num_classes=5, patch_size=(32, 32, 32))
    ct = _volume(tmp_path)

    def labels(tta: bool, asked: str) -> np.ndarray:
        return Segmenter(model=net, plan=plan, device="cpu", tta=tta, precision=asked)(ct).labels

    mirrored = labels(True, "float32")
    assert (labels(True, "bfloat16") == mirrored).mean() >= 0.99
    assert (labels(False, "float32") == mirrored).mean() < 0.9


def test_a_bad_precision_on_the_command_line_is_one_usage_line(tmp_path: Path) -> None:
    ct = _volume(tmp_path)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    base = [sys.executable, "-m", "stuseg", "predict", str(ct), str(tmp_path / "out")]
    run = {"capture_output": True, "text": True, "env": env, "timeout": 300}
    done = subprocess.run([*base, "--precision", "half"], **run)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "Invalid value for '--precision'" in done.stderr and "'half' is not one of" in done.stderr
    cmd = [*base, "--precision", "float16", "--device", "cpu"]
    done = subprocess.run(cmd, **run)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "stuseg: error: --precision float16 is for CUDA GPUs; on the CPU use bfloat16 (a CPU with "
        "native bfloat16 runs it faster) or float32"
    ]
    assert not (tmp_path / "out").exists()


DATA = Path(__file__).parent / "data"
S = (1, 1, 1)
DOWN = (S, (2, 2, 2), (2, 2, 2), (2, 2, 2), (2, 2, 2), S)  # the first conv's stride, then 4 halvings


@dataclass(frozen=True)
class Model:
    """A decisive model folder (see the module's docstring) for a real CT of tests/data."""

    image: str
    spacing: tuple[float, float, float]
    patch: tuple[int, int, int]
    labels: tuple[str, ...]
    block: tuple[slice, ...] | None = None  # a part of the image, for a quick test


def _decisive(arch: Arch) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    net = build_network(arch)
    with torch.no_grad():
        for head in net.seg_outputs:
            head.bias.zero_()
    return net.state_dict()


def _folder(model: Model, tmp: Path) -> Path:
    arch = Arch((4, 8, 16, 32, 64, 64), (1,) * 6, DOWN[1:], 1, len(model.labels) + 1)
    return write_v2_folder(
        tmp / "models",
        _decisive(arch),
        spacing=model.spacing,
        patch_size=model.patch,
        strides=DOWN,
        labels=model.labels,
    )


def _image(model: Model, tmp: Path) -> Path:
    img = nib.load(DATA / model.image)
    data = np.asarray(img.dataobj).astype(np.float32)
    path = tmp / "case_0000.nii.gz"
    nib.save(nib.Nifti1Image(data[model.block] if model.block else data, img.affine), path)
    return path


# A 60^3 block of the real abdomen, 3 mm: a few seconds a run.
QUICK = Model(
    "abdomen_ct_3mm.nii.gz", (3.0, 3.0, 3.0), (32, 32, 32), ("organ", "vessel"), np.s_[30:90, 20:80, 26:86]
)


@pytest.mark.slow
@pytest.mark.parametrize("asked", ["bfloat16", "auto"])
def test_predict_records_the_precision_it_ran_in(tmp_path: Path, asked: str) -> None:
    folder, image = _folder(QUICK, tmp_path), _image(QUICK, tmp_path)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "stuseg", "predict", str(image), str(out), "--model", str(folder)]
    cmd += ["--device", "cpu", "--precision", asked, "--statistics"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ), timeout=600)
    assert done.returncode == 0, done.stderr
    ran = "bfloat16" if asked == "bfloat16" else "float32"
    marker = json.loads((out / MARKER).read_text())
    assert marker["options"]["precision"] == ran  # what ran, not what was asked
    stats = json.loads((out / "statistics.json").read_text())
    assert stats["image"]["precision"] == ran
    summary = done.stderr.strip().splitlines()[-1]
    assert ("on cpu, bfloat16)" in summary) == (ran == "bfloat16")


@pytest.mark.slow
def test_a_batch_resumed_in_another_precision_redoes_its_cases(tmp_path: Path) -> None:
    folder, image = _folder(QUICK, tmp_path), _image(QUICK, tmp_path)
    cases = batch.discover([image]).cases
    out = tmp_path / "out"
    in_bf16 = Segmenter(model=folder, device="cpu", precision="bfloat16")
    assert [r.status for r in batch.run(cases, in_bf16, out)] == ["ok"]
    assert [r.status for r in batch.run(cases, in_bf16, out)] == ["skipped"]
    in_fp32 = Segmenter(model=folder, device="cpu", precision="float32")
    assert [r.status for r in batch.run(cases, in_fp32, out)] == ["ok"]
    assert [r.status for r in batch.run(cases, in_fp32, out)] == ["skipped"]
    records = batch.read_log(out / batch.LOG_NAME)
    assert [r["options"]["precision"] for r in records] == ["bfloat16"] * 2 + ["float32"] * 2
    assert records[0]["fingerprint"]["precision"] == "bfloat16"
    # float32 keeps the fingerprint of records made before the option existed, which resume it.
    assert "precision" not in records[-1]["fingerprint"]
    marker = json.loads((out / cases[0].id / MARKER).read_text())
    assert marker["options"]["precision"] == "float32"


# --- agreement, bfloat16 against float32 ------------------------------------------------------

REAL = {
    "abdomen 3 mm": Model(
        "abdomen_ct_3mm.nii.gz", (3.0, 3.0, 3.0), (64, 64, 64), ("liver", "spleen", "kidney", "bone")
    ),
    "chest 1.5 mm, LPS": Model(
        "chest_ct_1p5mm_lps.nii.gz", (2.5, 2.5, 2.5), (48, 48, 48), ("lung", "heart", "bone")
    ),
}
_MEASURED: dict[tuple[str, bool], tuple[float, float]] = {}


def _dice(a: np.ndarray, b: np.ndarray, value: int) -> float:
    """The Dice between the voxels of ``value`` in two label maps."""
    return float(2 * np.sum((a == value) & (b == value)) / (np.sum(a == value) + np.sum(b == value)))


def _mean_dice(a: np.ndarray, b: np.ndarray) -> float:
    """The mean Dice between two label maps over the structures (values > 0) either holds."""
    present = [v for v in np.union1d(np.unique(a), np.unique(b)) if v > 0]
    return float(np.mean([_dice(a, b, v) for v in present]))


def _agreement(name: str, fast: bool, tmp_path: Path) -> tuple[float, float]:
    """(share of voxels equal, mean Dice over the structures either labels), bfloat16 vs float32."""
    if (name, fast) not in _MEASURED:
        model = REAL[name]
        folder, image = _folder(model, tmp_path), _image(model, tmp_path)
        a = segment(image, model=folder, device="cpu", fast=fast, precision="float32").labels
        b = segment(image, model=folder, device="cpu", fast=fast, precision="bfloat16").labels
        present = [v for v in np.union1d(np.unique(a), np.unique(b)) if v > 0]
        assert len(present) >= 3, f"{name}: only labels {present}: the weights are not decisive"
        _MEASURED[name, fast] = float((a == b).mean()), _mean_dice(a, b)
        # The figures themselves, for the record (``pytest -s``).
        print(
            f"{name}, {'fast' if fast else 'normal'}: {_MEASURED[name, fast][0]:.4%} of voxels equal, "
            f"mean Dice {_MEASURED[name, fast][1]:.4f} over {len(present)} structures"
        )
    return _MEASURED[name, fast]


@pytest.mark.slow
@needs_bf16
@pytest.mark.parametrize("fast", [False, True], ids=["normal", "fast"])
@pytest.mark.parametrize("name", list(REAL))
def test_bfloat16_stays_close_to_float32_on_real_scans(name: str, fast: bool, tmp_path: Path) -> None:
    """A guard on the bfloat16 path (a wrong layout, a head or sums in 8 bits would fall far
    below): what was measured, less a margin."""
    equal, dice = _agreement(name, fast, tmp_path)
    assert equal >= 0.98, f"{name}: {equal:.4%} of voxels equal"
    assert dice >= 0.97, f"{name}: mean Dice {dice:.4f}"


@pytest.mark.slow
@needs_bf16
@pytest.mark.xfail(
    strict=True,
    reason="on random decisive weights bfloat16 agrees with float32 on 99.1-99.6% of voxels (mean "
    "Dice 0.984-0.994): why auto stays float32 on the CPU",
)
@pytest.mark.parametrize("fast", [False, True], ids=["normal", "fast"])
@pytest.mark.parametrize("name", list(REAL))
def test_bfloat16_meets_the_target_for_auto(name: str, fast: bool, tmp_path: Path) -> None:
    equal, dice = _agreement(name, fast, tmp_path)
    assert equal >= 0.999, f"{name}: {equal:.4%} of voxels equal"
    assert dice >= 0.995, f"{name}: mean Dice {dice:.4f}"


# --- agreement on weights that decide like a trained model's ---------------------------------
# Random weights label by small margins everywhere; a trained network only at organ borders. The
# weights of ``trained_weights`` (a small STU-Net fitted to TotalSegmentator's masks of the real
# abdomen in a few minutes) show how far each reduced type moves a trained network's labels.


@pytest.fixture(scope="module")
def trained() -> dict[str, torch.Tensor]:
    return trained_weights.train()


@pytest.fixture(scope="module")
def trained_folder(trained: dict[str, torch.Tensor], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return trained_weights.write_folder(tmp_path_factory.mktemp("trained"), trained)


@pytest.mark.slow
def test_the_trained_weights_segment_the_abdomen_as_totalsegmentator_did(trained_folder: Path) -> None:
    """The fixture is what it claims (and stuseg reads its v2 folder the right way round): in
    float32 its labels on the 30 labelled slices match the masks it was fitted to."""
    image = DATA / "abdomen_ct_3mm.nii.gz"
    labels = segment(image, model=trained_folder, device="cpu", precision="float32").labels
    _, truth = trained_weights.labelled_slices()
    first = trained_weights.FIRST_SLICE
    found = labels[:, :, first : first + truth.shape[2]]
    liver = _dice(found, truth, 1)
    assert liver >= 0.9, f"liver Dice {liver:.3f}"
    assert _mean_dice(found, truth) >= 0.75


def _tile_labels(net: torch.nn.Module, x: torch.Tensor, dtype: torch.dtype | None) -> np.ndarray:
    with (
        torch.inference_mode(),
        torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None),
    ):
        return net(x).float().argmax(1)[0].numpy()


@pytest.mark.slow
def test_float16_the_cuda_default_meets_the_target_on_trained_weights(
    trained: dict[str, torch.Tensor],
) -> None:
    """``auto`` is float16 on CUDA, as in the original pipeline. On trained weights its labels
    agree with float32's on >= 99.9% of voxels with a mean Dice >= 0.995, the target that
    bfloat16 must meet for ``auto`` to pick it on the CPU. The network runs on the whole real
    abdomen at once, on the CPU (what counts is the type's rounding, not its speed). bfloat16's
    figure on the same input is printed beside it (``pytest -s``)."""
    net = build_network(trained_weights.ARCH)
    net.load_state_dict(trained)
    net.eval()
    ct = np.asarray(nib.load(DATA / "abdomen_ct_3mm.nii.gz").dataobj, dtype=np.float32).T  # (z, y, x)
    x = torch.from_numpy(trained_weights.normalised(ct))
    shape = x.shape
    x = torch.nn.functional.pad(x, (0, -shape[2] % 16, 0, -shape[1] % 16, 0, -shape[0] % 16))[None, None]
    inside = tuple(slice(0, n) for n in shape)
    reference = _tile_labels(net, x, None)[inside]
    figures = {}
    for name, dtype in (("float16", torch.float16), ("bfloat16", torch.bfloat16)):
        labels = _tile_labels(net, x, dtype)[inside]
        figures[name] = float((labels == reference).mean()), _mean_dice(labels, reference)
        equal, dice = figures[name]
        print(f"trained weights, {name}: {equal:.4%} of voxels equal, mean Dice {dice:.4f}")
    # Every structure (the small rib class may vanish where training went otherwise): decisive.
    assert len(np.unique(reference)) >= trained_weights.ARCH.num_classes - 1
    equal, dice = figures["float16"]
    assert equal >= 0.999, f"float16: {equal:.4%} of voxels equal"
    assert dice >= 0.995, f"float16: mean Dice {dice:.4f}"


@pytest.mark.slow
@needs_bf16
@pytest.mark.parametrize("fast", [False, True], ids=["normal", "fast"])
@pytest.mark.parametrize("image", ["abdomen_ct_3mm.nii.gz", "chest_ct_1p5mm_lps.nii.gz"])
def test_bfloat16_on_trained_weights(trained_folder: Path, image: str, fast: bool) -> None:
    """The whole pipeline, bfloat16 against float32, on the trained weights: closer than on
    random weights, still short of the target (measured: see ``stuseg.model.precision``). A guard
    with a margin below what was measured; the figures are printed (``pytest -s``)."""
    a = segment(DATA / image, model=trained_folder, device="cpu", fast=fast, precision="float32").labels
    b = segment(DATA / image, model=trained_folder, device="cpu", fast=fast, precision="bfloat16").labels
    equal, dice = float((a == b).mean()), _mean_dice(a, b)
    mode = "fast" if fast else "normal"
    print(f"trained weights, {image}, {mode}: {equal:.4%} of voxels equal, mean Dice {dice:.4f}")
    assert equal >= 0.997, f"{equal:.4%} of voxels equal"
    assert dice >= 0.99, f"mean Dice {dice:.4f}"
