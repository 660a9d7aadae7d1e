"""Segment CT images: read -> preprocess -> sliding-window network -> back to the input grid.

``Segmenter`` holds a loaded network and the options; ``segment()`` is a one-shot wrapper.
Each stage hands arrays to the next within one process. The K-channel class probabilities
are only ever held for one row of tiles at network resolution (``stuseg.inference.predict``) and a few
output rows at input resolution (``stuseg.inference.postprocess``).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import nibabel as nib
import numpy as np
import torch

from stuseg.analysis.quality import Confidence
from stuseg.errors import InputError, StusegError, StusegWarning
from stuseg.images.checks import check_field_of_view, check_hounsfield, check_modality, check_slice_thickness
from stuseg.images.geometry import same_grid
from stuseg.images.io import Volume, check_finite, label_image, read_image
from stuseg.inference import memory
from stuseg.inference.fixedsums import MAX_ADDITIONS
from stuseg.inference.head import ClassProbabilities
from stuseg.inference.memory import peak_rss_bytes, release_free_memory
from stuseg.inference.postprocess import export_labels
from stuseg.inference.predict import (
    Autocast,
    Ensemble,
    Mirrored,
    PatchPredictor,
    Timed,
    mirror_flips,
    sliding_window,
    tile_overlap,
)
from stuseg.inference.preprocess import Geometry, preprocess, restore
from stuseg.inference.threads import limit_threads, thread_count
from stuseg.model import precision as precisions
from stuseg.model.network import STUNet, build_network, to_channels_last
from stuseg.model.plan import PLAN, Normalization, Plan
from stuseg.structures import labels as label_table

__all__ = [
    "Image",
    "Inferred",
    "Prepared",
    "Progress",
    "Segmentation",
    "Segmenter",
    "check_ct",
    "keep_freed_memory",
    "load_model",
    "parameters_sha256",
    "prepare",
    "resolve_device",
    "segment",
]

if TYPE_CHECKING:
    from stuseg.weights.cache import LoadedWeights
    from stuseg.weights.modelfolder import TrainedModel

Progress = Callable[[int, int], None]
Image = str | Path | Volume  # an input image: a path or a volume already read


@dataclass
class Segmentation:
    """A label map on the input grid (values = model channel index) and how it was made."""

    image: nib.Nifti1Image  # uint8; 0 = background; its header is the input's grid
    names: dict[int, str]  # label value -> structure name, for every selected structure
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
    peak_rss_bytes: int | None = None  # the process's peak so far; None where unknown
    peak_gpu_bytes: int | None = None
    device: str = "cpu"
    size: str = ""
    # The Volume the caller passed (its intensities, e.g. for statistics), or None when the
    # input was a path: stuseg does not keep a copy of the input voxels.
    source: Volume | None = None
    # What was done to the label map after the network (``remove_small_blobs``), or None.
    cleanup: dict[str, Any] | None = None
    # The type the network's convolutions ran in: float32, bfloat16 or float16 (stuseg.model.precision).
    precision: str = "float32"
    # The network's winning probabilities tallied per label value while the export streamed
    # (before any clean-up); None for a label map not made here.
    confidence: Confidence | None = None

    @property
    def labels(self) -> np.ndarray:
        """The label map as an array (values = model channel index, 0 = background)."""
        return np.asanyarray(self.image.dataobj)

    def remove_small_blobs(self, min_mm3: float) -> dict[str, int]:
        """Drop, in place, every piece of a structure smaller than ``min_mm3`` (opt-in clean-up).

        Pieces are 26-connected components (``stuseg.analysis.quality.remove_small_blobs``). Recorded in
        ``cleanup`` (and so in the statistics): the threshold and the voxels removed per structure.

        Returns:
            structure name -> voxels removed, for the structures that lost any.

        Raises:
            InputError: ``min_mm3`` is not a positive volume.
        """
        from stuseg.analysis.quality import remove_small_blobs

        try:
            removed = remove_small_blobs(self.labels, self.image.affine, min_mm3)
        except ValueError as exc:
            raise InputError(str(exc)) from None
        by_name = {self.names.get(v, f"label_{v}"): n for v, n in sorted(removed.items())}
        self.cleanup = {"remove_small_blobs_mm3": float(min_mm3), "voxels_removed": by_name}
        return by_name

    def statistics(
        self, ct: str | Path | Volume | np.ndarray | None = None, *, mode: str | None = None
    ) -> Any:
        """Per-structure statistics (volume, HU, centroid, bounding box) on the intensities of ``ct``.

        Args:
            ct: the CT this was made from (a path, Volume or array on the same grid); default: the
                ``source`` Volume, when the segmentation was made from one.
            mode: recorded in the result (e.g. ``fast``).

        Returns:
            A ``stuseg.analysis.statistics.Statistics`` (records per structure, image-level fields).

        Raises:
            InputError: no CT given and no source kept, or a CT on another grid.
        """
        from stuseg.analysis.statistics import of_segmentation

        if ct is None:
            if self.source is None:
                raise InputError("give the CT: this segmentation was made from a path, so no copy was kept")
            ct = self.source
        return of_segmentation(self, ct, mode=mode)


class _Stages:
    """Wall time per named stage, added to ``seconds`` (a new dict, or a copy of ``start``)."""

    def __init__(self, start: dict[str, float] | None = None) -> None:
        self.seconds: dict[str, float] = dict(start or {})

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


def load_model(size: str | None, weights: Path | None, device: torch.device) -> tuple[STUNet, LoadedWeights]:
    """Build the network of ``size`` (or the size of ``weights``) and load verified weights.

    Without ``weights``, ``size`` (default ``base``) comes from stuseg's cache, downloaded if
    needed. With ``weights``, the file's size is inferred; a ``size`` given too must agree.

    Returns:
        The network, and what was loaded (size, file, sha256) without its tensors.
    """
    import dataclasses

    from stuseg.weights.cache import load_weights

    loaded = load_weights(size or ("base" if weights is None else None), weights)
    net = build_network(loaded.size, device="meta")
    # assign=True adopts the (memory-mapped) tensors instead of copying into fresh parameters.
    net.load_state_dict(loaded.state_dict, strict=True, assign=True)
    return net.to(device).eval(), dataclasses.replace(loaded, state_dict={})


def parameters_sha256(net: torch.nn.Module) -> str:
    """A sha256 over a network's parameters and buffers (names, dtypes, shapes, bytes): the
    identity of weights that came as a network object rather than a file."""
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(net.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}\0".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def check_ct(
    volume: Volume, normalization: Normalization = Normalization(), *, what: str = "the image"
) -> None:
    """The checks of a CT channel (``stuseg.images.checks``): its modality, where DICOM says, and its
    values in Hounsfield units; ``normalization`` is the model's for this channel."""
    check_modality(volume.modality, what=what)
    check_hounsfield(volume.data, normalization, what=what)


def _predictor(
    nets: Sequence[torch.nn.Module],
    device: torch.device,
    tta: bool,
    plan: Plan = PLAN,
    precision: str = "float32",
) -> PatchPredictor:
    """What predicts a batch of tiles: network -> softmax (nnU-Net v1) or logits (v2), averaged over
    the mirrorings the plan allows with ``tta``, and over the folds (one network each).

    ``precision`` (resolved, ``stuseg.model.precision``): on CUDA a reduced type autocasts the whole
    predictor as the originals' float16 autocast does (softmax in float32); on the CPU only the
    network up to its features, the head, softmax and sums staying float32 (``stuseg.inference.head``),
    and bfloat16 there feeds the network channels-last input (``_in_layout`` made its weights so).
    """
    dtype = precisions.dtype(precision)
    last = precisions.channels_last(precision, device)
    members: list[PatchPredictor] = []
    for net in nets:
        v1 = plan.framework == "v1"
        member: PatchPredictor
        if device.type == "cuda" and dtype is not None:
            member = Autocast(ClassProbabilities(net, softmax=v1), "cuda", dtype)
        else:
            member = ClassProbabilities(net, softmax=v1, autocast=dtype, channels_last=last)
        if tta:
            member = Mirrored(member, mirror_flips(plan.mirror_axes, plan.framework))
        members.append(member)
    return members[0] if len(members) == 1 else Ensemble(members)


def _in_layout(
    nets: Sequence[torch.nn.Module], device: torch.device, precision: str, *, shared: bool
) -> list[torch.nn.Module]:
    """The networks in the memory layout that ``precision`` runs in on ``device``: for bfloat16 on
    the CPU ``stuseg.model.network.to_channels_last`` (weights in ``torch.channels_last_3d``, instance
    norms that keep that layout; ``stuseg.model.precision.channels_last``), otherwise unchanged.

    Networks loaded for this Segmenter are converted in place. A ``shared`` one (the caller's own
    module) is converted as a copy, one more copy of its weights while the Segmenter lives, so
    that the caller's module, and any float32 Segmenter made from it, keep their layout and their
    bit-exact float32 results. A module that cannot be copied runs in its own layout: the layout
    changes the speed, not the numbers' precision.
    """
    if not precisions.channels_last(precision, device):
        return list(nets)
    out = []
    for net in nets:
        if shared:
            try:
                net = copy.deepcopy(net)
            except (TypeError, RuntimeError, copy.Error):  # an attribute deepcopy refuses: keep its layout
                out.append(net)
                continue
        out.append(to_channels_last(net))
    return out


# Normal mode: the export holds a slab's mean scores (float32, K per voxel) and the row or two
# before it; slabs of about 48 MiB of scores (2 rows of a 224 x 202 plane of 105 classes) instead
# of 128 MiB keep about 0.1 GB less held on a 244 x 202 x 224 volume.
_NORMAL_SLAB_BYTES = 48 * 2**20


def _sums_dtype(
    shape: Sequence[int], n_nets: int, device: torch.device, plan: Plan, step_size: float
) -> torch.dtype:
    """uint16 fixed-point sums (half the sliding window's memory, ``stuseg.inference.fixedsums``) for
    probabilities on the CPU, where a voxel gets at most ``MAX_ADDITIONS`` terms (tiles over it
    times folds: every step of 0.5 and above with up to 2 folds); float32 otherwise (logits,
    accelerators, fine steps)."""
    additions = tile_overlap(shape, plan.patch_size, step_size) * n_nets
    if device.type == "cpu" and plan.framework == "v1" and additions <= MAX_ADDITIONS:
        return torch.uint16
    return torch.float32


def _run_network(
    x: np.ndarray,
    nets: Sequence[torch.nn.Module],
    device: torch.device,
    plan: Plan,
    *,
    fast: bool,
    tta: bool,
    step_size: float,
    out_shape: tuple[int, int, int],
    separate_axis: int | None,
    batch_size: int,
    progress: Progress | None,
    stages: _Stages,
    precision: str = "float32",
) -> tuple[np.ndarray, Confidence]:
    """Sliding window over the preprocessed volume, reduced to labels at ``out_shape`` as it streams,
    with the tallies of the labelled voxels' winning probabilities (``stuseg.analysis.quality.Confidence``).

    Timings: ``network`` is the forward passes alone; the softmax is reported apart, and the
    accumulation into the sliding-window buffers counts as ``export`` with the rest.
    """
    start = time.perf_counter()
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None
    timed = Timed(_predictor(nets, device, tta, plan, precision), sync)
    with torch.inference_mode():
        slabs = sliding_window(
            torch.from_numpy(x).to(device),
            timed,
            plan.num_classes,
            plan.patch_size,
            step_size,
            batch_size,
            on_tile=progress,
            sums_dtype=_sums_dtype(x.shape[1:], len(nets), device, plan, step_size),
            slab_bytes=_NORMAL_SLAB_BYTES if not fast else 128 * 2**20,
        )
        # nnU-Net v2 averages logits over tiles (the probability is their softmax), v1 probabilities.
        labels, confidence = export_labels(
            slabs,
            x.shape[1:],
            out_shape,
            separate_axis,
            plan.num_classes,
            fast=fast,
            logits=plan.framework != "v1",
        )
    inside = timed.breakdown
    softmax = inside.get("softmax", 0.0)
    network = timed.seconds - softmax - inside.get("accumulate", 0.0)
    stages.add("network", network)
    if softmax:  # only the CPU path times its softmax apart
        stages.add("softmax", softmax)
    stages.add("export", time.perf_counter() - start - network - softmax)
    return labels, confidence


def keep_freed_memory(device: str = "cpu", *, many_images: bool = False) -> bool:
    """For a process that exists to run stuseg: large blocks from the heap and freed pages kept,
    for good (``stuseg.inference.memory.tune_process``); the command line and batch workers call this first.

    Library calls get the same settings for their duration without it (``stuseg.inference.memory.tuned``).

    Args:
        device: the device the process will use (as ``Segmenter``'s ``device``); only the CPU
            needs this, so for any other device nothing is changed.
        many_images: keep the pages of small images between stages and images.

    Returns:
        Whether the setting took effect (glibc on Linux, CPU device).

    Raises:
        InputError: ``device`` is not a valid device name or not present.
    """
    if resolve_device(device).type != "cpu":
        return False
    return memory.tune_process(many_images=many_images)


def _tuned(device: torch.device) -> contextlib.AbstractContextManager[None]:
    """``stuseg.inference.memory.tuned()`` for work on the CPU, nothing for an accelerator's."""
    return memory.tuned() if device.type == "cpu" else contextlib.nullcontext()


@dataclass
class Prepared:
    """One image ready for the network: the output of ``Segmenter.prepare``.

    Holds the normalized (C, z, y, x) float32 array at the target spacing, the geometry to undo
    the preprocessing, the input's NIfTI header (its grid) and the caller's ``Volume`` if one
    was passed (``source``; None for a path: the input voxels are not kept).
    """

    x: np.ndarray
    geometry: Geometry
    header: nib.Nifti1Header
    source: Volume | None
    timings: dict[str, float]


@dataclass
class Inferred:
    """One image's label map on the cropped input grid: the output of ``Segmenter.infer``."""

    labels: np.ndarray  # (z, y, x) uint8 on geometry.cropped_shape, values = model channel index
    geometry: Geometry
    header: nib.Nifti1Header
    source: Volume | None
    timings: dict[str, float]
    peak_gpu_bytes: int | None
    confidence: Confidence | None = None  # the winning probabilities' tallies per label value


class Segmenter:
    """A loaded model and a set of options, to segment any number of images.

    The network is built and its weights loaded once, here. ``segmenter(image)`` does the whole
    work for one image; ``prepare``, ``infer`` and ``finish`` are the same work in three stages
    (CPU only, the network, CPU only) that a batch can overlap across images, each stage in any
    thread. Calling the three in turn gives exactly what ``segmenter(image)`` gives.

    Args:
        size: ``small``, ``base``, ``large`` or ``huge`` (or S/B/L/H); default ``base``, or the
            size of ``weights``.
        weights: a local ``.model`` or ``.safetensors`` file instead of stuseg's cache.
        device: ``auto`` (CUDA when present, else CPU), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.
        fast: argmax at the network resolution, then resample the label map (a slightly cheaper export).
        tta: average over the 8 mirrorings.
        step_size: tile step as a fraction of the patch, in (0, 1].
        roi_subset: keep only these structures (names, groups, shell patterns).
        model: a fine-tuned STU-Net instead of the published ones: an nnU-Net v1 or v2 model
            folder, the name of one registered with ``stuseg import-model``, or a
            ``stuseg.weights.modelfolder.TrainedModel``; its plan, labels and folds come with it. Or a
            network module (tests), used with ``plan``.
        folds: the folds of a model folder to average (default: every fold present).
        checkpoint: ``final`` or ``best``, which checkpoint of each fold (model folders).
        plan: the preprocessing and tiling plan a network module was trained with (target
            spacing, patch, class count); default the published models' ``stuseg.model.plan.PLAN``. With
            a class count other than the published 105, structures are named ``class_1``,
            ``class_2``, ... and ``roi_subset`` (which names published structures) cannot be used.
        batch_size: tiles per forward pass (default 2 on CUDA, else 1).
        threads: CPU threads for this work (default ``stuseg.inference.threads.available_cpus()``).
        precision: the type of the network's convolutions: ``auto`` (float16 on CUDA, float32
            on the CPU and MPS), ``float32``, ``bfloat16`` or ``float16`` (CUDA only); see
            ``stuseg.model.precision``. The resolved choice is ``self.precision`` and each
            Segmentation's ``precision``. bfloat16 on the CPU runs the network with its weights
            and input in ``torch.channels_last_3d``: a network module given as ``model`` is then
            copied (``self.net`` is the copy), so the caller's module keeps its layout.

    While the network runs on the CPU, glibc's malloc serves large blocks from the heap and its
    defaults come back afterwards (see ``stuseg.inference.memory``; ``STUSEG_TUNE_MALLOC=0`` leaves malloc
    alone), so a library call is as fast as the command line.

    Raises:
        InputError: a bad option (step size, device, thread count, precision).
        LabelError: an unknown name in ``roi_subset``.
        WeightsError: the weights cannot be found, downloaded, verified or loaded.
    """

    def __init__(
        self,
        size: str | None = None,
        *,
        weights: Path | None = None,
        device: str = "auto",
        fast: bool = False,
        tta: bool = False,
        step_size: float = 0.5,
        roi_subset: Sequence[str] | None = None,
        model: torch.nn.Module | str | Path | TrainedModel | None = None,
        folds: Sequence[str] | None = None,
        checkpoint: str = "final",
        plan: Plan = PLAN,
        batch_size: int | None = None,
        threads: int | None = None,
        precision: str = "auto",
    ) -> None:
        start = time.perf_counter()
        self.trained = (
            None
            if model is None or isinstance(model, torch.nn.Module)
            else _trained(model, folds, checkpoint)
        )
        if self.trained is not None:
            if size is not None or weights is not None:
                raise InputError(
                    "a model folder brings its own network and weights: leave out --size and --weights"
                )
            plan = self.trained.plan
        labels = self.trained.labels if self.trained is not None else None
        self.keep, self.device, self.threads = _check_options(
            step_size, roi_subset, device, threads, plan, labels
        )
        self.plan = plan
        self.precision = precisions.resolve(precision, self.device)
        if precisions.slow_on_this_cpu(self.precision, self.device):
            warnings.warn(
                "this CPU has no native bfloat16 (AMX-BF16, AVX512_BF16 or Arm BF16): --precision "
                "bfloat16 is emulated here and slower than float32",
                StusegWarning,
                stacklevel=2,
            )
        self.names = {v: _class_name(v, plan, labels) for v in range(1, plan.num_classes)}
        self.fast, self.tta, self.step_size = fast, tta, step_size
        self.batch_size = batch_size or (2 if self.device.type == "cuda" else 1)
        self._identity: Callable[[], str]
        if self.trained is not None:
            self.nets, sha = _load_folds(self.trained, self.device)
            self.size, self._identity = self.trained.size, lambda: sha
        elif model is None:
            net, loaded = load_model(size, weights, self.device)
            self.nets, self.size = [net], loaded.size
            self._identity = lambda: loaded.sha256  # hashed on first use, once
        else:
            self.nets, self.size = [model.to(self.device).eval()], size or "custom"
            self._identity = functools.cache(lambda: parameters_sha256(self.nets[0]))
        # The caller's module only is shared; networks loaded here are this Segmenter's own.
        shared = model is not None and self.trained is None
        self.nets = _in_layout(self.nets, self.device, self.precision, shared=shared)
        self.net = self.nets[0]
        self.load_seconds = time.perf_counter() - start

    @property
    def weights_sha256(self) -> str:
        """The sha256 that identifies the loaded weights, the same whatever loaded them (the
        command line, the Python API, a Ray worker): the original checkpoint's for the published
        or a ``weights`` file (recorded in stuseg's converted files), one over the folds' for a
        model folder, one over the parameters for a network object. Run logs record it, and a
        batch resumes only results made with the same."""
        return self._identity()

    def __call__(
        self, image: Image | Sequence[Image], *, series: str | None = None, progress: Progress | None = None
    ) -> Segmentation:
        """Segment one image (see ``segment``); the same as ``finish(infer(prepare(image)))``."""
        return self.finish(self.infer(self.prepare(image, series=series), progress=progress))

    segment = __call__

    Image = str | Path | Volume

    def prepare(
        self, image: Image | Sequence[Image], *, series: str | None = None, threads: int | None = None
    ) -> Prepared:
        """Read (unless given a ``Volume``), check and preprocess one image for this model's plan.

        CPU only, no model. ``threads`` overrides the Segmenter's own count for this call (a
        batch reads with fewer while the network runs).

        Raises:
            InputError: the image cannot be read or is empty.
        """
        return prepare(
            image,
            series=series,
            threads=threads or self.threads,
            plan=self.plan,
            channel_names=self.trained.channel_names if self.trained is not None else None,
        )

    def infer(self, prepared: Prepared, *, progress: Progress | None = None) -> Inferred:
        """Sliding window over the prepared image, reduced to labels on the cropped input grid.

        ``progress(done, total)`` is told about every tile.

        Raises:
            StusegError: the GPU ran out of memory.
        """
        stages = _Stages(prepared.timings)
        dev = self.device
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        try:
            # On the CPU, glibc's malloc keeps the tiles' large blocks in the heap meanwhile
            # (stuseg.inference.memory.tuned: 1.6x faster on 2 cores), as the command line does.
            with limit_threads(self.threads), _tuned(dev):
                labels, confidence = _run_network(
                    prepared.x,
                    self.nets,
                    dev,
                    self.plan,
                    fast=self.fast,
                    tta=self.tta,
                    step_size=self.step_size,
                    out_shape=prepared.geometry.cropped_shape,
                    separate_axis=prepared.geometry.export_axis,
                    batch_size=self.batch_size,
                    progress=progress,
                    stages=stages,
                    precision=self.precision,
                )
        except torch.cuda.OutOfMemoryError:
            raise StusegError(
                f"the GPU ran out of memory for the {self.size} model; close other GPU programs, "
                "use a smaller --size, or run on the CPU with --device cpu"
            ) from None
        release_free_memory(prepared.geometry.voxels)
        peak_gpu = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None
        g, h, s = prepared.geometry, prepared.header, prepared.source
        return Inferred(labels, g, h, s, stages.seconds, peak_gpu, confidence)

    def finish(self, inferred: Inferred) -> Segmentation:
        """Put the label map back on the input grid and keep only the selected structures."""
        stages = _Stages(inferred.timings)
        with stages("export"):
            full = restore(inferred.labels, inferred.geometry)
            if len(self.keep) < self.plan.num_classes - 1:
                lut = np.zeros(256, np.uint8)
                lut[self.keep] = self.keep
                full = np.asfortranarray(lut[full])
            img = label_image(full, inferred.header)
        return Segmentation(
            image=img,
            names={i: self.names[i] for i in self.keep},
            timings=stages.seconds,
            peak_rss_bytes=peak_rss_bytes(),
            peak_gpu_bytes=inferred.peak_gpu_bytes,
            device=str(self.device),
            size=self.size,
            source=inferred.source,
            precision=self.precision,
            confidence=inferred.confidence,
        )


def _check_options(
    step_size: float,
    roi_subset: Sequence[str] | None,
    device: str,
    threads: int | None,
    plan: Plan = PLAN,
    names: Mapping[int, str] | None = None,
) -> tuple[list[int], torch.device, int]:
    """The selected label values, the device and the thread count; raise on a bad option.

    ``names`` is the model's own label table (value -> name, e.g. from its dataset.json; value 0
    may be given and is ignored); None means the published table for a plan of 105 classes and
    ``class_<value>`` otherwise. ``roi_subset`` selects from the names the outputs will carry
    (see ``_class_name``): with the published ones as ``stuseg.structures.labels.select`` does (groups too),
    otherwise with ``stuseg.structures.labels.select_from``.
    """
    if not 0 < step_size <= 1:
        raise InputError(f"--step-size must be in (0, 1], got {step_size}")
    if not 2 <= plan.num_classes <= 256:  # label maps are uint8, background included
        raise InputError(f"a plan needs 2 to 256 classes (background included), got {plan.num_classes}")
    if names is not None:
        given = sorted(int(v) for v in names if int(v) != 0)
        if given != list(range(1, plan.num_classes)):
            shown = ", ".join(str(v) for v in given[:10]) + (", ..." if len(given) > 10 else "")
            raise InputError(
                f"the label table names {len(given)} values ({shown or 'none'}) but the model has "
                f"{plan.num_classes - 1} classes, 1 to {plan.num_classes - 1}; give the model's own table"
            )
    table = {v: _class_name(v, plan, names) for v in range(1, plan.num_classes)}
    if not roi_subset:
        keep = list(table)
    elif table == dict(enumerate(label_table.STRUCTURES, start=1)):
        keep = label_table.select(roi_subset)
    else:
        keep = label_table.select_from(table, roi_subset)
    return keep, resolve_device(device), thread_count(threads)


def _class_name(value: int, plan: Plan, names: Mapping[int, str] | None = None) -> str:
    """The structure name of a label value, as every output names it.

    ``names`` given: the model's own name, made safe and unique by ``stuseg.structures.labels.model_names``
    (published names come back unchanged). None: the published table's name for a plan of 105
    classes, else ``class_<value>``.
    """
    if names is not None:
        return label_table.model_names(names)[value]
    return label_table.LABELS[value] if plan.num_classes == PLAN.num_classes else f"class_{value}"


def prepare(
    image: Image | Sequence[Image],
    *,
    series: str | None = None,
    threads: int | None = None,
    plan: Plan = PLAN,
    channel_names: Sequence[str] | None = None,
) -> Prepared:
    """Read (unless given ``Volume``s), check and preprocess one image: ``Segmenter.prepare``.

    ``image`` is one image, or one per input channel of a multi-channel model, in the model's
    channel order, all on one voxel grid. The CT check warns about the channels named ``CT`` in
    ``channel_names`` (every channel of the published models).

    Raises:
        InputError: an image cannot be read or is empty, or the channels are not on one grid.
    """
    images = [image] if isinstance(image, (str, Path, Volume)) else list(image)
    stages = _Stages()
    with stages("read"):
        volumes = [_read(i, series) for i in images]
        _check_channels(images, volumes, channel_names, plan)
    with stages("preprocess"):
        x, geometry, had_nan = preprocess(
            [v.data for v in volumes], volumes[0].affine, plan, thread_count(threads)
        )
        header = volumes[0].header
        del volumes  # volumes we read ourselves are no longer needed
        release_free_memory(geometry.voxels)
    if had_nan:
        warnings.warn(
            "the image contains NaN voxels; they were set to 0 as nnU-Net does", StusegWarning, stacklevel=3
        )
    source = images[0] if isinstance(images[0], Volume) else None
    return Prepared(x, geometry, header, source, stages.seconds)


def _read(image: Image, series: str | None) -> Volume:
    if isinstance(image, Volume):
        check_finite(Path("the image"), image.data)  # read_image checks what it reads
        return image
    return read_image(Path(image), series=series)


def _check_channels(
    images: Sequence[Image], volumes: Sequence[Volume], names: Sequence[str] | None, plan: Plan = PLAN
) -> None:
    """The channels share one grid; the CT channels look like CT; the grid suits the model."""
    first = volumes[0]
    for image, volume in zip(images[1:], volumes[1:]):
        if not same_grid(first.data.shape[:3], first.affine, volume.data.shape[:3], volume.affine):
            raise InputError(
                f"{_label(image)} is not on the voxel grid of {_label(images[0])}: the channels of a case "
                f"must share one grid (shape {volume.data.shape[:3]} vs {first.data.shape[:3]})"
            )
    for c, volume in enumerate(volumes):
        if names is None or (c < len(names) and names[c].strip().lower() == "ct"):
            norm = plan.channels[c] if c < len(plan.channels) else Normalization()
            check_ct(volume, norm, what=_label(images[c]))
    # One grid for all channels: its geometry is checked once.
    check_slice_thickness(first.affine, plan)
    check_field_of_view(first.data.shape, first.affine, plan)


def _label(image: Image) -> str:
    return "the image" if isinstance(image, Volume) else str(image)


def _trained(model: str | Path | TrainedModel, folds: Sequence[str] | None, checkpoint: str) -> TrainedModel:
    """The trained model a ``model`` argument names: a folder, a registered name, or itself."""
    from stuseg.weights import modelstore
    from stuseg.weights.modelfolder import TrainedModel

    if isinstance(model, TrainedModel):
        return model
    return modelstore.resolve_model(model, folds=folds, checkpoint=checkpoint)


def _load_folds(trained: TrainedModel, device: torch.device) -> tuple[list[STUNet], str]:
    """One network per fold of ``trained``, with verified weights, and the sha256 naming them all."""
    import hashlib

    from stuseg.weights.modelfolder import load_fold_identified

    nets, digest = [], hashlib.sha256()
    for fold in trained.folds:
        state, sha = load_fold_identified(trained, fold)
        net = build_network(trained.arch, device="meta")
        net.load_state_dict(state, strict=True, assign=True)
        nets.append(net.to(device).eval())
        digest.update(f"{fold.name}:{sha}\n".encode())
    return nets, digest.hexdigest()


def segment(
    image: Image | Sequence[Image],
    *,
    size: str | None = None,
    fast: bool = False,
    tta: bool = False,
    step_size: float = 0.5,
    device: str = "auto",
    weights: Path | None = None,
    roi_subset: Sequence[str] | None = None,
    series: str | None = None,
    model: torch.nn.Module | str | Path | TrainedModel | None = None,
    folds: Sequence[str] | None = None,
    checkpoint: str = "final",
    plan: Plan = PLAN,
    batch_size: int | None = None,
    threads: int | None = None,
    progress: Progress | None = None,
    precision: str = "auto",
) -> Segmentation:
    """Segment a CT: a path (NIfTI, NRRD, MHA/MHD, DICOM folder) or a ``Volume``; for a model with
    several input channels, one per channel in the model's order.

    A one-shot ``Segmenter`` (see it for the options); the image is read and checked before the
    network is loaded, so a bad input fails before any download. To segment several images, make
    one ``Segmenter`` and call it for each.

    Returns:
        The label map on the input grid (values = model channel index, see
        ``stuseg.structures.labels.LABELS``) with timings (``load`` included) and peak memory.

    Raises:
        InputError, LabelError, WeightsError, StusegError: see ``Segmenter``.
    """
    trained = (
        None if model is None or isinstance(model, torch.nn.Module) else _trained(model, folds, checkpoint)
    )
    if trained is not None:
        plan, model = trained.plan, trained
    _, dev, _ = _check_options(
        step_size, roi_subset, device, threads, plan, trained.labels if trained is not None else None
    )
    precisions.resolve(precision, dev)  # a bad precision fails before the image is read
    names = trained.channel_names if trained is not None else None
    prepared = prepare(image, series=series, threads=threads, plan=plan, channel_names=names)
    segmenter = Segmenter(
        size,
        weights=weights,
        device=device,
        fast=fast,
        tta=tta,
        step_size=step_size,
        roi_subset=roi_subset,
        model=model,
        folds=folds,
        checkpoint=checkpoint,
        plan=plan,
        batch_size=batch_size,
        threads=threads,
        precision=precision,
    )
    prepared.timings["load"] = segmenter.load_seconds
    return segmenter.finish(segmenter.infer(prepared, progress=progress))
