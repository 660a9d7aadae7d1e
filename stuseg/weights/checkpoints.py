"""Checkpoint files: recognise, read, validate and write them, and check they are an STU-Net.

Two formats are read. The published checkpoints are nnU-Net v1 containers (a pickled dict whose
``state_dict`` holds the network, next to SGD momentum buffers, loss curves as numpy scalars, ...),
read with ``torch.load(weights_only=True)``, an explicit allow-list of numpy types, and memory-mapped
(torch zip format). stuseg's own cache, and any ``.safetensors`` a user gives, are read with the
``safetensors`` library (memory-mapped), after this module has validated the whole header itself:
the library's errors are not one readable line, and a cache check must not need torch.

Files are recognised by their first bytes, not their names, so a CT or an archive given as weights
is named for what it is. Every problem is a one-line ``WeightsError``.

torch and the network are imported only inside the functions that need them: reading a header
(``validate_safetensors``) is pure Python, which keeps ``stuseg weights`` free of torch.
"""

from __future__ import annotations

import errno
import functools
import json
import math
import os
import pickle
import re
import shutil
import struct
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from stuseg.errors import WeightsError
from stuseg.model.sizes import SIZE_NAMES

if TYPE_CHECKING:
    import torch

__all__ = [
    "DamagedFile",
    "check_architecture",
    "describe",
    "disk_full",
    "identify_size",
    "load_container",
    "ndarray_reconstruct",
    "read_checkpoint",
    "require_space",
    "shapes_of",
    "sniff",
    "strip_wrappers",
    "validate_safetensors",
    "write_safetensors",
]

Format = Literal["torch-zip", "torch-legacy", "safetensors"]

# The safetensors dtypes stuseg reads (those torch has), with their item size in bytes.
ST_DTYPES: dict[str, int] = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}
# A header is a JSON table of names, dtypes, shapes and offsets: under 32 kB for STU-Net huge (306
# tensors, computed from the network's state dict). 100 MB leaves room for any model; a length
# beyond it is damage, refused before reading it into memory.
_MAX_HEADER = 100_000_000


# --------------------------------------------------------------------------------------------
# Disk space and write errors (shared by conversion here and downloads in stuseg.weights.cache)


def _free_bytes(folder: Path) -> int:
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def require_space(folder: Path, needed: int, what: str) -> None:
    """Refuse before writing when ``folder``'s disk has less than ``needed`` bytes free.

    Args:
        folder: where the bytes will go (need not exist yet).
        needed: bytes about to be written.
        what: what is being done, for the message.

    Raises:
        WeightsError: not enough free space.
    """
    free = _free_bytes(folder)
    if free < needed:
        raise WeightsError(
            f"disk full: {what} needs about {_gb(needed)} in {folder} but only {_gb(free)} is free; "
            "free some space or set STUSEG_HOME / HF_HOME to a larger disk"
        )


def disk_full(exc: OSError | str, folder: Path) -> WeightsError:
    """The error for running out of space while writing into ``folder``.

    Args:
        exc: the write error (or its text), whose reason ends the message.
        folder: where the write went.

    Returns:
        The error to raise.
    """
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return WeightsError(
        f"disk full while writing to {folder}; nothing was kept. Free some space or set STUSEG_HOME / "
        f"HF_HOME to a larger disk ({reason})"
    )


# --------------------------------------------------------------------------------------------
# Recognising a file


def _first_line(detail: object, limit: int = 120) -> str:
    """One short line out of an exception (third-party messages can be paragraphs)."""
    text = str(detail).strip()
    line = text.splitlines()[0] if text else type(detail).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _corrupt(path: Path, detail: object) -> WeightsError:
    return WeightsError(
        f"{path} is truncated or corrupted and cannot be read as a checkpoint ({_first_line(detail)})"
    )


_WHAT_IT_IS = (
    (0, b"\x1f\x8b", "gzip-compressed data, such as a .nii.gz image"),
    (344, b"n+1\x00", "a NIfTI image"),
    (344, b"ni1\x00", "a NIfTI image"),
    (128, b"DICM", "a DICOM file"),
    (0, b"NRRD", "an NRRD image"),
    (0, b"ObjectType", "a MetaImage header"),
    (0, b"\x89HDF", "an HDF5 file"),
    (0, b"\x93NUMPY", "a numpy .npy array"),
)


def _not_a_checkpoint(path: Path, head: bytes) -> WeightsError:
    what = next((name for at, magic, name in _WHAT_IT_IS if head[at : at + len(magic)] == magic), None)
    return WeightsError(
        f"{path} is not a checkpoint: it holds {what or 'no format stuseg knows'}; stuseg reads "
        "nnU-Net v1 .model files (PyTorch zip) and .safetensors files"
    )


def sniff(path: Path) -> Format:
    """Recognise a checkpoint file by its first bytes.

    Args:
        path: the file.

    Returns:
        ``"torch-zip"`` (torch.save since 1.6, the published .model files), ``"torch-legacy"`` (an
        older torch.save pickle) or ``"safetensors"``.

    Raises:
        WeightsError: the path does not exist, is a folder, is empty, or holds something else.
    """
    path = Path(path)
    if path.is_dir():
        raise WeightsError(
            f"{path} is a folder, not a weights file; give the checkpoint file itself "
            "(.model or .safetensors)"
        )
    try:
        with path.open("rb") as f:
            head = f.read(348)
    except FileNotFoundError:
        raise WeightsError(f"weights file {path} does not exist") from None
    except OSError as exc:
        raise WeightsError(f"weights file {path} cannot be read ({exc.strerror or exc})") from None
    if not head:
        raise WeightsError(f"{path} is empty, not a checkpoint")
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "torch-zip"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "torch-legacy"  # a pickle stream (protocol 2-5), as torch.save wrote before 1.6
    if head[8:9] == b"{":
        return "safetensors"  # 8-byte header length, then a JSON object
    if path.suffix == ".safetensors" and not any(
        head[at : at + len(magic)] == magic for at, magic, _ in _WHAT_IT_IS
    ):
        return "safetensors"  # named so and nothing else: its header check says what is wrong
    raise _not_a_checkpoint(path, head)


# --------------------------------------------------------------------------------------------
# nnU-Net v1 .model files


def ndarray_reconstruct(subtype: Any, shape: Any, dtype: Any) -> Any:
    """numpy's ``_reconstruct`` (how pickles rebuild an array), for plain ``numpy.ndarray`` only.

    Unpicklers that allow arrays map both spellings of ``_reconstruct`` here: the pickle names the
    class to build, and only ndarray itself is plain data.
    """
    import numpy as np

    if subtype is not np.ndarray:
        raise pickle.UnpicklingError(f"refusing to rebuild an array of class {subtype!r}")
    core = getattr(np, "_core", None) or np.core
    return core.multiarray._reconstruct(subtype, shape, dtype)


def _numpy_allow_list() -> list[Any]:
    """The numpy types nnU-Net checkpoints pickle, and nothing else.

    nnU-Net v1 ``plot_stuff``/``best_stuff`` and nnU-Net v2 ``logging``/``_best_ema`` hold numpy
    scalars, pickled as ``numpy.core.multiarray.scalar`` (numpy 1) or
    ``numpy._core.multiarray.scalar`` (numpy 2) with a dtype argument; both spellings map to the
    same function here. Plain arrays (``ndarray_reconstruct``) are allowed too: plans and logs
    copied into a checkpoint may hold them.
    """
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    scalar = core.multiarray.scalar
    dtype_classes = {
        type(np.dtype(name))
        for name in ("float64", "float32", "float16", "int64", "int32", "int16", "int8", "uint8", "bool")
    }
    return [
        np.dtype,
        np.ndarray,
        *sorted(dtype_classes, key=str),
        (scalar, "numpy.core.multiarray.scalar"),
        (scalar, "numpy._core.multiarray.scalar"),
        (ndarray_reconstruct, "numpy.core.multiarray._reconstruct"),
        (ndarray_reconstruct, "numpy._core.multiarray._reconstruct"),
    ]


def strip_wrappers(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Network parameter names without the prefixes that wrappers add.

    ``module.`` comes from DataParallel / DistributedDataParallel, ``_orig_mod.`` from
    ``torch.compile``; nnU-Net strips both (in any order, one of each at most).

    Args:
        state: name -> tensor.

    Returns:
        The same tensors under the bare names.
    """
    out = {}
    for key, value in state.items():
        for _ in range(2):
            key = key.removeprefix("module.").removeprefix("_orig_mod.")
        out[key] = value
    return out


def load_container(path: Path) -> Any:
    """Unpickle a ``torch.save`` file without running code from it.

    ``torch.load(weights_only=True)`` with ``_numpy_allow_list`` added to torch's own allow-list
    (tensors, plain containers, ``torch.device``). Memory-mapped when the file is a torch zip.

    Args:
        path: the file.

    Returns:
        Whatever the file holds (for nnU-Net: a dict).

    Raises:
        WeightsError: missing, a folder, not a torch file, truncated or corrupted, or holding a
            Python object an nnU-Net checkpoint does not contain (named, and never built).
    """
    path = Path(path)
    fmt = sniff(path)
    if fmt == "safetensors":
        raise WeightsError(f"{path} is a safetensors file, not an nnU-Net checkpoint")
    return _load_torch(path, fmt)


def _load_torch(path: Path, fmt: Format) -> Any:
    import torch

    if fmt == "torch-zip" and not zipfile.is_zipfile(path):
        # The zip's directory is at its end: a cut-off download loses it first.
        raise _corrupt(path, "its zip directory is missing, as in an incomplete download")
    try:
        with torch.serialization.safe_globals(_numpy_allow_list()):
            # mmap keeps the 11.7 GB huge file out of RAM; it needs the zip container.
            return torch.load(str(path), map_location="cpu", weights_only=True, mmap=fmt == "torch-zip")
    except pickle.UnpicklingError as exc:
        # torch names the refused global in one of two phrasings: an unknown one, or one from a
        # module it blocks outright (os, posix, subprocess, ...).
        unsafe = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) (\S+)", str(exc))
        if unsafe:
            raise WeightsError(
                f"{path} holds a Python object ({unsafe[1]}) that an nnU-Net checkpoint does not contain; "
                "refusing to unpickle it"
            ) from None
        raise _corrupt(path, exc.__context__ or exc) from None
    except Exception as exc:
        # Damage makes torch.load fail in arbitrary ways (RuntimeError from the zip reader,
        # IndexError, KeyError, UnicodeDecodeError, struct.error from the weights-only unpickler,
        # which never runs code): all of them mean the file is damaged.
        raise _corrupt(path, exc) from None


def _read_torch(path: Path, fmt: Format) -> dict[str, torch.Tensor]:
    """Load an nnU-Net v1 ``.model`` (or a bare state dict) safely; return the network parameters."""
    import torch

    obj = _load_torch(path, fmt)
    if isinstance(obj, dict) and "state_dict" in obj:
        state = obj["state_dict"]
    elif isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        state = obj
    else:
        raise WeightsError(f"{path} is not an nnU-Net checkpoint: it has no 'state_dict'")
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise WeightsError(
            f"{path} is not an nnU-Net checkpoint: its 'state_dict' is not a mapping of tensors"
        )
    return strip_wrappers(state)


# --------------------------------------------------------------------------------------------
# safetensors


class DamagedFile(WeightsError):
    """A file that is not a valid safetensors file; ``detail`` says why, without the path."""

    def __init__(
        self, path: Path, detail: str, *, truncated: bool = False, metadata: dict[str, str] | None = None
    ) -> None:
        self.detail = detail
        self.metadata = metadata  # the header's __metadata__, when it could be read before the damage
        what = "is truncated" if truncated else "is not a valid safetensors file"
        super().__init__(f"{path} {what}: {detail}")


def validate_safetensors(path: Path) -> dict[str, str]:
    """Validate the whole header of a safetensors file against the file (pure Python, no torch).

    Every tensor entry must be an object with exactly ``dtype`` (one of ``ST_DTYPES``), ``shape``
    (non-negative integers) and ``data_offsets`` (``[begin, end]`` whose length is the shape's
    byte size); together the entries must tile the data section from 0 without gaps or overlaps,
    and the file must end exactly where the last tensor does.

    Args:
        path: the file.

    Returns:
        The header's ``__metadata__`` table (empty if it has none).

    Raises:
        DamagedFile: any violation, as one line naming the first problem found.
        WeightsError: the file cannot be opened.
    """
    path = Path(path)

    metadata: dict[str, str] | None = None

    def bad(detail: str, truncated: bool = False) -> DamagedFile:
        return DamagedFile(path, detail, truncated=truncated, metadata=metadata)

    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise bad(f"it has {size} bytes, fewer than the 8 of a header length", truncated=True)
            (n,) = struct.unpack("<Q", prefix)
            if n > _MAX_HEADER:
                raise bad(f"its header length ({n} bytes) is implausible")
            if n > size - 8:
                raise bad(f"its header needs {n} bytes but only {size - 8} follow", truncated=True)
            raw = f.read(n)
    except OSError as exc:
        raise WeightsError(f"weights file {path} cannot be read ({exc.strerror or exc})") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise bad(f"its header is not JSON ({_first_line(exc)})") from None
    if not isinstance(header, dict):
        raise bad("its header is not a JSON object")

    recorded = header.pop("__metadata__", None) or {}
    if not isinstance(recorded, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in recorded.items()
    ):
        raise bad("its __metadata__ is not a table of strings")
    metadata = recorded
    spans = []
    for name, info in header.items():
        if not isinstance(info, dict):
            raise bad(f"entry {name!r} of its header is not a tensor (dtype, shape, data_offsets)")
        for key in ("dtype", "shape", "data_offsets"):
            if key not in info:
                raise bad(f"tensor {name!r} has no {key}")
        if set(info) - {"dtype", "shape", "data_offsets"}:
            extra = sorted(set(info) - {"dtype", "shape", "data_offsets"})
            raise bad(f"tensor {name!r} has unknown keys {extra}")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in ST_DTYPES:
            known = ", ".join(ST_DTYPES)
            raise bad(f"tensor {name!r} has dtype {dtype!r}, which stuseg does not read ({known})")
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
            raise bad(f"tensor {name!r} has shape {shape!r}, not a list of non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
            raise bad(f"tensor {name!r} has data_offsets {offsets!r}, not [begin, end]")
        begin, end = offsets
        nbytes = math.prod(shape) * ST_DTYPES[dtype]
        if end - begin != nbytes:
            raise bad(
                f"tensor {name!r} has shape {shape} ({nbytes} bytes of {dtype}) "
                f"but data_offsets {offsets} ({end - begin} bytes)"
            )
        spans.append((begin, end, name))
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            raise bad(f"tensor {name!r} starts at byte {begin} of the data, expected {position}")
        position = end
    available = size - 8 - n
    if position > available:
        raise bad(
            f"its header describes {position} bytes of tensors but only {available} follow", truncated=True
        )
    if position < available:
        raise bad(f"{available - position} bytes follow the last tensor")
    return metadata


def _is_count(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Validate, then memory-map a safetensors file (tensors are private copy-on-write views)."""
    metadata = validate_safetensors(path)
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise _corrupt(path, exc) from None
    return tensors, metadata


def write_safetensors(tensors: Mapping[str, torch.Tensor], dest: Path, metadata: dict[str, str]) -> None:
    """Write ``tensors`` as a safetensors file, atomically: a hidden temporary sibling, fsync, rename.

    The ``safetensors`` library writes straight from the tensors' memory, so converting a
    memory-mapped multi-GB checkpoint does not first copy it into RAM.

    Args:
        tensors: name -> tensor (any strides; made contiguous for writing).
        dest: the file to create or replace; its folder must exist.
        metadata: strings stored in the header's ``__metadata__``.

    Raises:
        WeightsError: not enough space (before writing), disk full or any other write error
            (nothing is left behind: neither a partial ``dest`` nor the temporary file).
    """
    from safetensors.torch import save_file

    total = sum(t.numel() * t.element_size() for t in tensors.values())
    # The header (names, shapes, offsets) is tens of kB; 1 MB covers it.
    require_space(dest.parent, total + (1 << 20), f"converting to {dest.name}")
    tmp: Path | None = None
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(tmp), metadata)
        with tmp.open("rb+") as f:
            os.fsync(f.fileno())
        # mkstemp made it private (0600); published weights are no secret. A fixed 0644 rather than
        # reading the umask, which can only be read by setting it (racy with other threads).
        tmp.chmod(0o644)
        os.replace(tmp, dest)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise disk_full(exc, dest.parent) from None
        raise WeightsError(f"cannot write {dest} ({exc.strerror or exc})") from None
    except Exception as exc:  # the library's SafetensorError (I/O inside Rust), or refused tensors
        if "No space left" in str(exc) or "code: 28" in str(exc):
            raise disk_full(_first_line(exc), dest.parent) from None
        raise WeightsError(f"cannot write {dest} ({_first_line(exc)})") from None
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read the network parameters of a checkpoint, whatever its format.

    Args:
        path: an nnU-Net v1 ``.model``, a bare ``torch.save`` state dict, or a ``.safetensors``.

    Returns:
        (name -> tensor, the safetensors metadata or an empty dict). Tensors are memory-mapped
        where the format allows (torch zip, safetensors).

    Raises:
        WeightsError: missing, a folder, not a checkpoint (says what it looks like), truncated or
            corrupted, or holding Python objects an nnU-Net checkpoint does not contain.
    """
    path = Path(path)
    fmt = sniff(path)
    if fmt == "safetensors":
        return _read_safetensors(path)
    return _read_torch(path, fmt), {}


# --------------------------------------------------------------------------------------------
# Architecture checks


@functools.cache
def _expected_shapes(size: str) -> dict[str, tuple[int, ...]]:
    from stuseg.model.network import build_network

    net = build_network(size, device="meta")
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


def shapes_of(tensors: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """The shapes of a state dict.

    Args:
        tensors: name -> tensor.

    Returns:
        name -> shape.
    """
    return {k: tuple(v.shape) for k, v in tensors.items()}


def identify_size(shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    """The STU-Net size whose state dict has exactly these keys and shapes.

    Args:
        shapes: name -> shape of a state dict.

    Returns:
        The size, or None when no size matches exactly.
    """
    for size in SIZE_NAMES:
        if dict(shapes) == _expected_shapes(size):
            return size
    return None


def describe(shapes: Mapping[str, tuple[int, ...]]) -> str:
    """What a state dict looks like, for error messages.

    Args:
        shapes: name -> shape of a state dict.

    Returns:
        "STU-Net SIZE", or how many tensors and classes it has and which size it is closest to.
    """
    size = identify_size(shapes)
    if size is not None:
        return f"STU-Net {size}"
    scores = {}
    for name in SIZE_NAMES:
        ref = _expected_shapes(name)
        scores[name] = sum(1 for k, s in shapes.items() if ref.get(k) == s) / max(len(ref), len(shapes))
    closest = max(scores, key=scores.__getitem__)
    # The full-resolution head is the last seg_outputs entry: its first dimension is the classes.
    heads = [k for k in _expected_shapes(closest) if k.startswith("seg_outputs.") and k.endswith(".weight")]
    head = shapes.get(max(heads, key=lambda k: int(k.split(".")[1]))) if heads else None
    classes = f", {head[0]} output classes" if head else ""
    return (
        f"no STU-Net size ({len(shapes)} tensors{classes}; closest is {closest} with "
        f"{scores[closest]:.0%} of keys and shapes matching)"
    )


def check_architecture(path: Path, shapes: Mapping[str, tuple[int, ...]], size: str | None) -> str:
    """The size a state dict belongs to.

    Args:
        path: the file the shapes come from, for messages.
        shapes: name -> shape.
        size: the size it must be, or None to accept any.

    Returns:
        The size whose keys and shapes match exactly.

    Raises:
        WeightsError: no size matches (says what it looks like), or another size than ``size``.
    """
    found = identify_size(shapes)
    if found is None:
        raise WeightsError(f"{path} is not a checkpoint stuseg can use: it looks like {describe(shapes)}")
    if size is not None and found != size:
        raise WeightsError(
            f"{path} is a checkpoint of STU-Net {found}, not {size}; use --size {found} (or leave --size out)"
        )
    return found
