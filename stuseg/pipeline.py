"""segment(): read -> preprocess -> sliding-window predict -> back to the input grid -> write.

Everything runs in one process and hands arrays from stage to stage; the K-channel class
probabilities are only ever held for one row of tiles at network resolution (see predict.py)
and a few output rows at input resolution (see postprocess.py).
"""

from __future__ import annotations

import contextlib
import resource
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch

from stuseg import labels as label_table
from stuseg.errors import InputError, StusegError
from stuseg.io import StusegWarning, Volume, label_image, read_image
from stuseg.network import STUNet, build_network
from stuseg.plan import PLAN
from stuseg.postprocess import ProbabilityExport, resample_labels, slab_labels
from stuseg.predict import class_probabilities, mirrored, sliding_window
from stuseg.preprocess import preprocess, restore

TARGET_SPACING = PLAN.target_spacing
PATCH = PLAN.patch_size
NUM_CLASSES = PLAN.num_classes

Progress = Callable[[int, int], None]


@dataclass
class Segmentation:
    """A label map on the input grid (values = model channel index) and how it was made."""

    image: nib.Nifti1Image  # uint8; 0 = background
    names: dict[int, str]  # label value -> structure name, for every selected structure
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
    peak_rss_bytes: int | None = None
    peak_gpu_bytes: int | None = None
    device: str = "cpu"
    size: str = ""

    @property
    def labels(self) -> np.ndarray:
        return np.asanyarray(self.image.dataobj)


class _Stages:
    """Wall time per named stage."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - start)

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` -> CUDA when present, else CPU; otherwise check that the device exists."""
    name = device.strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise InputError(f"unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError(
                f"there is no {dev}; this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise InputError("--device mps was asked for but MPS is not available; use --device cpu")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise InputError(f"unsupported device {device!r}; use auto, cpu, cuda, cuda:N or mps")
    return dev


def load_model(size: str | None, weights: Path | None, device: torch.device) -> tuple[STUNet, str]:
    """Build the network of ``size`` (or the size of ``weights``) and load verified weights.

    Without ``weights``, ``size`` (default ``base``) comes from stuseg's cache, downloaded if
    needed. With ``weights``, the file's size is inferred; a ``size`` given too must agree.
    """
    from stuseg.weights import load_weights

    loaded = load_weights(size or ("base" if weights is None else None), weights)
    net = build_network(loaded.size, device="meta")
    # assign=True adopts the (memory-mapped) tensors instead of copying into fresh parameters.
    net.load_state_dict(loaded.state_dict, strict=True, assign=True)
    return net.to(device).eval(), loaded.size


def check_ct(volume: Volume) -> None:
    """Warn about inputs the models were not trained for; never refuse them."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN input: nanmin warns, we decide below
        lowest = float(np.nanmin(volume.data)) if volume.data.size else np.nan
    if np.isfinite(lowest) and lowest > -500:
        warnings.warn(
            "the image has no values below -500, so it may not be a CT in Hounsfield units; "
            "results will likely be meaningless",
            StusegWarning,
            stacklevel=3,
        )


def _patch_fn(net: torch.nn.Module, device: torch.device, tta: bool, stages: _Stages) -> Callable:
    """The per-batch function the sliding window calls: network (+ mirror TTA) -> softmax."""
    fn = class_probabilities(net, on_time=stages.add)
    if device.type == "cuda":
        # Convolutions in float16 as the original (nnU-Net's autocast); softmax in float32.
        probabilities = fn

        def fn(x: torch.Tensor) -> torch.Tensor:
            with torch.autocast("cuda", dtype=torch.float16):
                return probabilities(x)

    fn = mirrored(fn) if tta else fn

    def measure(call: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        before = {k: stages.seconds.get(k, 0.0) for k in ("softmax", "accumulate")}
        result = call()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        # "network" is the forward passes alone: the CPU softmax and the accumulation into the
        # sliding-window buffers are reported apart (the latter as part of "export").
        inside = sum(stages.seconds.get(k, 0.0) - v for k, v in before.items())
        stages.add("network", time.perf_counter() - start - inside)
        return result

    def timed(x: torch.Tensor) -> torch.Tensor:
        return measure(lambda: fn(x))

    accumulate = getattr(fn, "accumulate", None)
    if accumulate is not None:
        timed.accumulate = lambda x, targets, weight: measure(lambda: accumulate(x, targets, weight))  # type: ignore[attr-defined]
    return timed


def _run_network(
    x: np.ndarray,
    net: torch.nn.Module,
    device: torch.device,
    *,
    fast: bool,
    tta: bool,
    step_size: float,
    out_shape: tuple[int, int, int],
    separate_axis: int | None,
    batch_size: int,
    progress: Progress | None,
    stages: _Stages,
) -> np.ndarray:
    """Sliding window over the preprocessed volume, reduced to labels at ``out_shape`` as it streams."""
    start = time.perf_counter()
    before = stages.seconds.get("network", 0.0)
    softmax_before = stages.seconds.get("softmax", 0.0)
    fn = _patch_fn(net, device, tta, stages)
    xt = torch.from_numpy(x)[None].to(device)
    normal = None
    net_labels = None
    with torch.inference_mode():
        for slab in sliding_window(xt, fn, NUM_CLASSES, PATCH, step_size, batch_size, on_tile=progress):
            if fast:
                if net_labels is None:
                    net_labels = np.empty(x.shape, np.uint8)
                index = [slice(None)] * 3
                index[slab.axis] = slice(slab.start, slab.stop)
                slab_labels(slab, net_labels[tuple(index)])
            else:
                if normal is None:
                    normal = ProbabilityExport(x.shape, out_shape, separate_axis, slab.axis, NUM_CLASSES)
                normal.add(slab)
            del slab
        del xt
        if fast:
            assert net_labels is not None
            labels = resample_labels(net_labels, out_shape, separate_axis)
        else:
            assert normal is not None
            labels = normal.result()
    network = stages.seconds.get("network", 0.0) - before
    softmax = stages.seconds.get("softmax", 0.0) - softmax_before
    stages.seconds.pop("accumulate", None)  # part of "export"
    stages.add("export", time.perf_counter() - start - network - softmax)
    return labels


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to reuse freed memory instead of returning it to the kernel.

    Every tile allocates and frees gigabytes of activations. By default glibc serves blocks
    this large with fresh mmap()s, so each one is page-faulted and zeroed by the kernel again:
    on 2 CPU cores that doubled the time per tile (7.2 s -> 3.1 s for the small model on
    128^3, benchmarks/RESULTS.md). Serving them from the heap and never trimming it keeps the
    pages; the cost is that RSS stays at its peak until the process ends. Returns whether the
    setting took effect (glibc on Linux only).
    """
    libc = _glibc()
    if libc is None:
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # from glibc's malloc.h
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))


def release_free_memory() -> None:
    """Return free heap pages to the kernel (glibc ``malloc_trim``) between stages.

    With ``keep_freed_memory`` the heap keeps every page it ever had, so memory freed by one
    stage (the float64 spline coefficients of preprocessing) would still count in RSS while
    the next (the row accumulator) grows the heap elsewhere.
    """
    libc = _glibc()
    if libc is not None:
        with contextlib.suppress(AttributeError):  # malloc_trim is glibc's, not musl's
            libc.malloc_trim(0)


def _glibc() -> Any:
    """The C library through ctypes on Linux, else None."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def _peak_rss() -> int | None:
    if sys.platform.startswith("linux"):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if sys.platform == "darwin":
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return None


def segment(
    image: str | Path | Volume,
    *,
    size: str | None = None,
    fast: bool = False,
    tta: bool = False,
    step_size: float = 0.5,
    device: str = "auto",
    weights: Path | None = None,
    roi_subset: Sequence[str] | None = None,
    series: str | None = None,
    model: torch.nn.Module | None = None,
    batch_size: int | None = None,
    progress: Progress | None = None,
) -> Segmentation:
    """Segment a CT: a path (NIfTI, NRRD, MHA/MHD, DICOM folder) or a ``Volume``.

    Returns the label map on the input grid (values = model channel index, see
    ``stuseg.labels.LABELS``). ``size`` defaults to ``base``, or to the size of ``weights``.
    ``roi_subset`` keeps only those structures (names, groups or patterns). ``model`` replaces
    the published network, e.g. for tests or fine-tuned weights. On the CPU this sets glibc's
    malloc to keep freed memory (see ``keep_freed_memory``).
    """
    if not 0 < step_size <= 1:
        raise InputError(f"--step-size must be in (0, 1], got {step_size}")
    keep = label_table.select(roi_subset) if roi_subset else list(range(1, NUM_CLASSES))
    dev = resolve_device(device)
    if dev.type == "cpu":
        keep_freed_memory()
    stages = _Stages()
    with stages("read"):
        volume = image if isinstance(image, Volume) else read_image(Path(image), series=series)
        check_ct(volume)
    with stages("load"):
        if model is None:
            net, size = load_model(size, weights, dev)
        else:
            net, size = model.to(dev).eval(), size or "custom"
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    with stages("preprocess"):
        x, geometry, had_nan = preprocess(volume.data, volume.affine, TARGET_SPACING)
        header = volume.header
        if not isinstance(image, Volume):
            del volume  # our own copy of the input voxels is no longer needed
        release_free_memory()
    if had_nan:
        warnings.warn(
            "the image contains NaN voxels; they were set to 0 as nnU-Net does", StusegWarning, stacklevel=2
        )
    try:
        labels = _run_network(
            x,
            net,
            dev,
            fast=fast,
            tta=tta,
            step_size=step_size,
            out_shape=geometry.cropped_shape,
            separate_axis=geometry.separate_axis,
            batch_size=batch_size or (2 if dev.type == "cuda" else 1),
            progress=progress,
            stages=stages,
        )
    except torch.cuda.OutOfMemoryError:
        raise StusegError(
            f"the GPU ran out of memory for the {size} model; close other GPU programs, "
            "use a smaller --size, or run on the CPU with --device cpu"
        ) from None
    del x
    release_free_memory()
    with stages("export"):
        full = restore(labels, geometry)
        del labels
        if len(keep) < NUM_CLASSES - 1:
            lut = np.zeros(256, np.uint8)
            lut[keep] = keep
            full = np.asfortranarray(lut[full])
        img = label_image(full, header)
    return Segmentation(
        image=img,
        names={i: label_table.LABELS[i] for i in keep},
        timings=stages.seconds,
        peak_rss_bytes=_peak_rss(),
        peak_gpu_bytes=torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None,
        device=str(dev),
        size=size,
    )
