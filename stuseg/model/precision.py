"""Which floating-point type the network's convolutions run in: ``--precision``.

``auto`` (the default) picks, per device:

- CUDA: float16 autocast, as the original nnU-Net v1 pipeline and stuseg always have.
- CPU: float32. bfloat16 runs only when asked for (``--precision bfloat16``): its labels do
  not agree with float32's on the 99.9% of voxels with a mean per-structure Dice of 0.995 that
  ``auto`` requires. Measured by ``tests/test_precision.py`` (``pytest -m slow -s``) on the real
  abdomen and chest CTs, normal and fast:

  - random STU-Nets whose classes each win somewhere (they decide by small margins
    everywhere): 99.09-99.60% of voxels equal, Dice 0.984-0.994;
  - a small STU-Net fitted by the tests in three minutes to TotalSegmentator's masks of the real
    abdomen (``tests/trained_weights.py``; no trained STU-Net can be downloaded on the test
    machines), which is confident inside organs as a trained model is: 99.77-99.88%, Dice
    0.994-0.996;
  - on those trained weights, the network alone on the whole abdomen: float16 (``auto`` on
    CUDA) 99.97%, Dice 0.999, meets the target; bfloat16 99.82%, Dice 0.995, does not. The gap
    is the type's (an 8-bit mantissa against float16's 11), not this implementation's.

  Running the first convolution (the one that reads the image) in float32 raised the random
  weights' agreement by 0.07-0.18 points but slowed a 128^3 tile of STU-Net small by 15-20%
  (a throwaway script, 2026-12-07 21:30), so it was left out.
- MPS: float32 (reduced precision there has not been measured).

"Natively" means an instruction set that multiplies bfloat16 numbers itself: AMX-BF16 (Intel
Sapphire Rapids and later), AVX512_BF16 (Intel Cooper Lake and later, AMD Zen 4 and later) or
Arm's BF16 extension (FEAT_BF16: Apple M2 and later, AWS Graviton 3 and later, Neoverse V1/N2).
Without one, oneDNN converts bfloat16 to float32 around every multiply and a bfloat16 network is
slower than float32 (why nnU-Net v2 leaves CPU autocast off). The flags come from the CPU itself:
``torch.cpu.get_capabilities()`` (torch's cpuinfo, every OS) where this torch has it, else the
kernel's ``/proc/cpuinfo`` flags (Linux) or ``sysctl hw.optional.arm.FEAT_BF16`` (macOS).
``torch.backends.cpu.get_cpu_capability()`` is not enough: it names the widest vector set torch's
own kernels use (``AVX512``), which Skylake servers without bfloat16 report too.

Whatever the choice, only the network up to its last decoder features runs in it
(``torch.autocast``: convolutions in the reduced type, and the activations between them, norms
included, in it too). The last 1x1 head, the softmax, the sliding window's sums and everything
after stay float32 on the CPU (``stuseg.inference.head``). bfloat16 keeps float32's range (no overflow
where float32 has none) with an 8-bit mantissa; the disagreement comes from rounding each
convolution's inputs and outputs to it (running the norms in float32 as well changed the
agreement above by 0.03 points, so they are left to autocast).

The layout (``channels_last``): bfloat16 on the CPU runs the network channels-last
(``torch.channels_last_3d``): its weights converted once, when the ``Segmenter`` is made (a
caller's own module as a copy), each tile's input likewise, and its instance norms computed by
``group_norm`` with one group per channel, whose kernel keeps that layout
(``stuseg.model.network.to_channels_last``). In PyTorch's default layout oneDNN reorders the
activations around every bfloat16 convolution: on one 128^3 tile of STU-Net small
(``benchmarks/bench_tile.py``, RESULTS.md, 2026-12-07 09:54) ``aten::copy_`` took 598 ms of a
1.15 s pass, and autocast gained only 1.1-1.2x over float32 against 1.6-1.9x channels-last.
Those figures time the whole network, its last 1x1 layer in bfloat16 included, which stuseg runs
in float32. For the features alone (what stuseg runs in bfloat16) channels-last with
``InstanceNorm3d`` was no faster than the default layout (it makes each norm's input
channels-first again; a throwaway script, 2026-12-07 18:03); as stuseg runs them now,
``bench_tile.py --precision bfloat16`` gave 0.48-0.67 s against 0.67-0.83 s in the default
layout, and ``--precision float32`` 1.35-1.74 s in float32 (variants ``*-features``, 18:41, on a
2-core machine busy with another job: ratios, not speeds). End to end (``bench_predict.py``,
512 x 512 x 300, small, ``--fast``, RESULTS.md 2026-12-07 18:45, quiet machine) the network
stage took 31 s in bfloat16 channels-last, 41 s in bfloat16 in the default layout, and 69-70 s
in float32. The agreement above is that of this
layout (99.09-99.60% of voxels, Dice 0.984-0.994; in the default layout 99.15-99.62% and
0.985-0.994). float32 keeps the default layout: channels-last is slower there (1.6-1.9 s against
1.24-1.50 s for that tile), and float32's results stay the same bit for bit.

Importing this module imports nothing heavy; torch is imported inside the functions that need it.
"""

from __future__ import annotations

import functools
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from stuseg.errors import InputError

if TYPE_CHECKING:
    import torch

__all__ = [
    "CHOICES",
    "PROC_CPUINFO",
    "channels_last",
    "check",
    "dtype",
    "native_bfloat16",
    "resolve",
    "slow_on_this_cpu",
]

CHOICES = ("auto", "float32", "bfloat16", "float16")

# CPU flags of native bfloat16 arithmetic, by the names torch.cpu.get_capabilities() and Linux's
# /proc/cpuinfo give them (x86: amx_bf16, avx512_bf16; arm64: bf16 in the "Features" line, and
# cpuinfo's sve_bf16).
_BF16_FLAGS = ("amx_bf16", "avx512_bf16", "bf16", "sve_bf16")

# Where Linux describes the CPU: a module attribute so that tests can point it at a fabricated file.
PROC_CPUINFO = Path("/proc/cpuinfo")


def check(precision: str) -> str:
    """``precision`` lower-cased if it is one of ``CHOICES``.

    Raises:
        InputError: anything else, naming the choices.
    """
    name = str(getattr(precision, "value", precision)).strip().lower()
    if name not in CHOICES:
        raise InputError(f"unknown precision {precision!r}; use one of {', '.join(CHOICES)}")
    return name


@functools.lru_cache(maxsize=1)
def native_bfloat16() -> str | None:
    """The CPU feature that computes bfloat16 natively (e.g. ``amx_bf16``), or None without one."""
    flags = _torch_flags()
    if flags is None:
        flags = _linux_flags() if sys.platform.startswith("linux") else _macos_flags()
    found = [f for f in _BF16_FLAGS if f in flags]
    return found[0] if found else None


def _torch_flags() -> set[str] | None:
    """The CPU's flags that torch's cpuinfo reports as present; None where this torch lacks it."""
    import torch

    get = getattr(getattr(torch, "cpu", None), "get_capabilities", None)
    if get is None:
        return None
    try:
        return {name for name, value in get().items() if value is True}
    except Exception:  # a build without cpuinfo: fall back to the OS
        return None


def _linux_flags() -> set[str]:
    """x86 ``flags`` and arm64 ``Features`` of the first CPU in ``/proc/cpuinfo``."""
    try:
        text = PROC_CPUINFO.read_text(errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def _macos_flags() -> set[str]:
    """``{"bf16"}`` on a Mac whose CPU has FEAT_BF16 (M2 and later), else empty."""
    if sys.platform != "darwin":
        return set()
    try:
        done = subprocess.run(
            ["sysctl", "-n", "hw.optional.arm.FEAT_BF16"], capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return set()
    return {"bf16"} if done.stdout.strip() == "1" else set()


def resolve(precision: str, device: torch.device) -> str:
    """The precision the network runs in on ``device``: ``float32``, ``bfloat16`` or ``float16``.

    bfloat16 asked for on a CPU without native bfloat16 runs (oneDNN emulates it, with the same
    rounding) but is slower than float32: ``slow_on_this_cpu`` says so.

    Raises:
        InputError: an unknown name, or a precision that ``device`` cannot run: float16 or
            bfloat16 on MPS, float16 on the CPU (see below), bfloat16 on a GPU without it.
    """
    import torch

    name = check(precision)
    kind = device.type
    if name == "auto":
        return "float16" if kind == "cuda" else "float32"  # the CPU: see the module's docstring
    if name == "float32":
        return name
    if kind == "mps":
        raise InputError(f"--precision {name} is not supported on MPS; use float32 (or auto)")
    if kind == "cpu" and name == "float16":
        # CPU autocast accepts float16, but only AVX512_FP16/AMX-FP16 CPUs compute it natively,
        # and float16's range (65504) is what bfloat16 was made to avoid; bfloat16 is the CPU's
        # reduced type.
        raise InputError(
            "--precision float16 is for CUDA GPUs; on the CPU use bfloat16 (a CPU with native "
            "bfloat16 runs it faster) or float32"
        )
    if kind == "cuda" and name == "bfloat16" and not torch.cuda.is_bf16_supported():
        raise InputError(f"this GPU ({device}) has no bfloat16; use --precision float16 or float32")
    return name


def slow_on_this_cpu(precision: str, device: torch.device) -> bool:
    """Whether a resolved ``precision`` on ``device`` is bfloat16 on a CPU that only emulates it."""
    return device.type == "cpu" and precision == "bfloat16" and native_bfloat16() is None


def channels_last(name: str, device: torch.device) -> bool:
    """Whether the network runs in ``torch.channels_last_3d`` (weights and input) for a resolved
    precision on ``device``: bfloat16 on the CPU only (see the module's docstring). float32, and
    every precision on an accelerator, keep PyTorch's default layout."""
    return device.type == "cpu" and check(name) == "bfloat16"


def dtype(name: str) -> torch.dtype | None:
    """The autocast type of a resolved precision; None for float32 (no autocast)."""
    import torch

    return {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[check(name)]
