"""Weights: the manifest, download, verification, conversion to safetensors, and loading.

This is the only reader of ``weights_manifest.json``. The published checkpoints are nnU-Net v1
containers (a pickled dict whose ``state_dict`` holds the network, next to SGD momentum buffers,
loss curves as numpy scalars, ...). They are read once with ``torch.load(weights_only=True)`` and
an explicit allow-list of numpy types, checked, reduced to the network parameters, and written
atomically as ``<STUSEG_HOME>/weights/<size>.safetensors``. Later loads memory-map that file.

Downloads go through huggingface_hub (so HF_ENDPOINT, HF_HOME and HF_HUB_OFFLINE behave as usual);
the downloaded bytes are then checked here for size and sha256, which huggingface_hub does not do.

Library code: raises ``WeightsError`` with a one-line message, never prints. Progress is reported
through an optional ``progress(phase, done, total)`` callback.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import importlib.resources
import json
import mmap
import os
import pickle
import re
import shutil
import struct
import sys
import tempfile
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stuseg.errors import WeightsError
from stuseg.network import SIZES, Arch, build_network, canonical_size

if TYPE_CHECKING:
    import torch

__all__ = [
    "Installed",
    "LoadedWeights",
    "Manifest",
    "WeightsEntry",
    "WeightsStatus",
    "cached_path",
    "download_weights",
    "import_weights",
    "load_manifest",
    "load_weights",
    "sha256_file",
    "stuseg_home",
    "weights_status",
]

MANIFEST_SCHEMA = 1
MANIFEST_NAME = "weights_manifest.json"

# How a cached file was verified (stored in the safetensors metadata).
BY_MANIFEST = "sha256 (manifest)"
BY_HUB = "sha256 (hub-reported)"
BY_ARCH = "architecture (keys and shapes)"

Progress = Callable[[str, int, "int | None"], None]
"""``progress(phase, done, total)``: ``phase`` is a short label, ``total`` may be None."""

_HEX40 = re.compile(r"[0-9a-f]{40}")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_CHUNK = 8 << 20  # 8 MiB reads for hashing and copying


def _no_progress(phase: str, done: int, total: int | None) -> None:
    pass


# --------------------------------------------------------------------------------------------
# Locations


def stuseg_home() -> Path:
    """stuseg's cache folder: ``$STUSEG_HOME``, else the per-user cache dir (``~/.cache/stuseg``)."""
    env = os.environ.get("STUSEG_HOME")
    if env:
        return Path(env).expanduser()
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Caches"
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "stuseg"


def cached_path(size: str) -> Path:
    """Where the converted, verified weights of ``size`` live (whether or not they exist)."""
    return stuseg_home() / "weights" / f"{_canonical(size)}.safetensors"


# --------------------------------------------------------------------------------------------
# Manifest


@dataclass(frozen=True)
class WeightsEntry:
    """One published checkpoint and the plan facts the predictor needs."""

    size: str
    repo: str
    filename: str
    revision: str
    pin: str  # "commit": revision is a full commit, sha256 known here; "branch": weaker, see note
    size_bytes: int | None
    approx_size_bytes: int
    sha256: str | None
    parameters: int
    target_spacing: tuple[float, float, float]  # mm, array axis order (isotropic here)
    patch_size: tuple[int, int, int]
    normalization: str  # "zscore": per image, (x - mean) / (std + 1e-8), no clipping (plans: nonCT)
    num_classes: int  # network outputs, background included
    note: str

    @property
    def converted_bytes(self) -> int:
        """Approximate size of the converted fp32 safetensors file."""
        return 4 * self.parameters


@dataclass(frozen=True)
class Manifest:
    path: Path
    entries: Mapping[str, WeightsEntry]

    def entry(self, size: str) -> WeightsEntry:
        key = _canonical(size)
        if key not in self.entries:
            have = ", ".join(self.entries) or "none"
            raise WeightsError(f"manifest {self.path} has no entry for size {key!r}; it has: {have}")
        return self.entries[key]


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _triple(kind: type) -> Callable[[object], bool]:
    def check(v: object) -> bool:
        ok = _is_int if kind is int else (lambda x: _is_int(x) or isinstance(x, float))
        return isinstance(v, list) and len(v) == 3 and all(ok(x) and x > 0 for x in v)

    return check


# field -> (description for errors, validator)
_ENTRY_FIELDS: dict[str, tuple[str, Callable[[object], bool]]] = {
    "repo": ("a 'owner/name' string", lambda v: isinstance(v, str) and v.count("/") == 1),
    "filename": ("a non-empty string", lambda v: isinstance(v, str) and bool(v)),
    "revision": ("a non-empty string", lambda v: isinstance(v, str) and bool(v)),
    "pin": ("'commit' or 'branch'", lambda v: v in ("commit", "branch")),
    "size_bytes": ("a positive integer or null", lambda v: v is None or (_is_int(v) and v > 0)),
    "approx_size_bytes": ("a positive integer", lambda v: _is_int(v) and v > 0),
    "sha256": ("64 lowercase hex digits or null", lambda v: v is None or bool(_HEX64.fullmatch(str(v)))),
    "parameters": ("a positive integer", lambda v: _is_int(v) and v > 0),
    "target_spacing": ("a list of 3 positive numbers", _triple(float)),
    "patch_size": ("a list of 3 positive integers", _triple(int)),
    "normalization": ("'zscore'", lambda v: v == "zscore"),
    "num_classes": ("a positive integer", lambda v: _is_int(v) and v > 0),
    "note": ("a string", lambda v: isinstance(v, str)),
}


def _parse_entry(size: str, raw: object, where: str) -> WeightsEntry:
    if not isinstance(raw, dict):
        raise WeightsError(f"{where}: entry {size!r} must be an object")
    unknown = sorted(set(raw) - set(_ENTRY_FIELDS))
    missing = sorted(set(_ENTRY_FIELDS) - set(raw))
    if unknown or missing:
        parts = ([f"unknown keys {unknown}"] if unknown else []) + (
            [f"missing keys {missing}"] if missing else []
        )
        raise WeightsError(f"{where}: entry {size!r} has {' and '.join(parts)}")
    for key, (want, ok) in _ENTRY_FIELDS.items():
        if not ok(raw[key]):
            raise WeightsError(f"{where}: {size}.{key} must be {want}, got {raw[key]!r}")
    if raw["pin"] == "commit" and not (
        _HEX40.fullmatch(raw["revision"]) and raw["sha256"] and raw["size_bytes"]
    ):
        raise WeightsError(
            f"{where}: {size} is pinned to a commit, so it needs a 40-hex revision, sha256 and size_bytes"
        )
    return WeightsEntry(
        size=size,
        target_spacing=tuple(float(x) for x in raw["target_spacing"]),  # type: ignore[arg-type]
        patch_size=tuple(raw["patch_size"]),
        **{k: raw[k] for k in _ENTRY_FIELDS if k not in ("target_spacing", "patch_size")},
    )


def default_manifest_path() -> Path:
    return Path(str(importlib.resources.files("stuseg") / MANIFEST_NAME))


def load_manifest(path: Path | None = None) -> Manifest:
    """Read and validate a weights manifest (default: the one shipped with stuseg)."""
    path = Path(path) if path is not None else default_manifest_path()
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise WeightsError(f"weights manifest {path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WeightsError(f"weights manifest {path} cannot be read: {exc}") from None
    where = f"weights manifest {path}"
    if not isinstance(raw, dict) or set(raw) - {"schema", "comment", "models"} or "models" not in raw:
        raise WeightsError(f"{where}: expected an object with keys 'schema', 'models' and optional 'comment'")
    if raw.get("schema") != MANIFEST_SCHEMA:
        raise WeightsError(
            f"{where}: schema {raw.get('schema')!r} is not supported (expected {MANIFEST_SCHEMA})"
        )
    models = raw["models"]
    if not isinstance(models, dict) or not models:
        raise WeightsError(f"{where}: 'models' must be a non-empty object")
    entries = {}
    for size, entry in models.items():
        if size not in SIZES:
            raise WeightsError(f"{where}: unknown size {size!r}; valid sizes: {', '.join(SIZES)}")
        entries[size] = _parse_entry(size, entry, where)
    return Manifest(path=path, entries=entries)


def _canonical(size: str) -> str:
    try:
        return canonical_size(size)
    except ValueError as exc:
        raise WeightsError(str(exc)) from None


# --------------------------------------------------------------------------------------------
# Hashing and file helpers


def sha256_file(path: Path, progress: Progress | None = None, phase: str = "verify") -> str:
    """Streaming sha256 of a file, reporting progress."""
    progress = progress or _no_progress
    total = path.stat().st_size
    digest = hashlib.sha256()
    done = 0
    progress(phase, 0, total)
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            done += len(chunk)
            progress(phase, done, total)
    return digest.hexdigest()


def _free_bytes(folder: Path) -> int:
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free


def _require_space(folder: Path, needed: int, what: str) -> None:
    free = _free_bytes(folder)
    if free < needed:
        raise WeightsError(
            f"disk full: {what} needs about {_gb(needed)} in {folder} but only {_gb(free)} is free; "
            "free some space or set STUSEG_HOME / HF_HOME to a larger disk"
        )


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def _disk_full(exc: OSError, folder: Path) -> WeightsError:
    return WeightsError(
        f"disk full while writing to {folder}; nothing was kept. Free some space or set STUSEG_HOME / "
        f"HF_HOME to a larger disk ({exc.strerror or exc})"
    )


# --------------------------------------------------------------------------------------------
# Reading checkpoints


def _numpy_allow_list() -> list[Any]:
    """The numpy types nnU-Net v1 checkpoints pickle in ``plot_stuff``/``best_stuff`` (and nothing else).

    Scalars pickle as ``numpy.core.multiarray.scalar`` (numpy 1) or ``numpy._core.multiarray.scalar``
    (numpy 2) with a dtype argument; both spellings map to the same function here.
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
        *sorted(dtype_classes, key=str),
        (scalar, "numpy.core.multiarray.scalar"),
        (scalar, "numpy._core.multiarray.scalar"),
    ]


def _corrupt(path: Path, detail: object) -> WeightsError:
    first = str(detail).strip().splitlines()[0] if str(detail).strip() else type(detail).__name__
    return WeightsError(f"{path} is truncated or corrupted and cannot be read as a checkpoint ({first})")


def _read_original(path: Path) -> dict[str, torch.Tensor]:
    """Load an nnU-Net v1 ``.model`` (or a bare state dict) safely; return the network parameters."""
    import torch

    # mmap keeps the 11.7 GB huge file out of RAM; it needs the zip container (torch >= 1.6).
    is_zip = zipfile.is_zipfile(path)
    try:
        with torch.serialization.safe_globals(_numpy_allow_list()):
            obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as exc:
        unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        if unsafe:
            raise WeightsError(
                f"{path} holds a Python object ({unsafe[1]}) that an nnU-Net checkpoint does not contain; "
                "refusing to unpickle it"
            ) from None
        raise _corrupt(path, exc.__context__ or exc) from None
    except OSError:
        raise
    except Exception as exc:
        # Garbage makes the weights-only unpickler fail in arbitrary ways (IndexError, KeyError,
        # UnicodeDecodeError, struct.error, ...); it never runs code, so any failure here means
        # the file is damaged.
        raise _corrupt(path, exc) from None
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
    # Checkpoints saved from DataParallel carry a 'module.' prefix; nnU-Net strips it too.
    return {k.removeprefix("module."): v for k, v in state.items()}


_ST_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}


def _read_safetensors_header(path: Path) -> tuple[dict[str, Any], int]:
    """Return (header, data start offset); raises WeightsError on a malformed file."""
    try:
        with path.open("rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > 100_000_000:
                raise ValueError("header length is implausible")
            header = json.loads(f.read(n))
    except (struct.error, ValueError, UnicodeDecodeError) as exc:
        raise _corrupt(path, exc) from None
    if not isinstance(header, dict):
        raise _corrupt(path, "header is not an object")
    size = path.stat().st_size
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        if info["dtype"] not in _ST_DTYPES or end > size - 8 - n or begin > end:
            raise _corrupt(path, f"tensor {name} lies outside the file")
    return header, 8 + n


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Memory-map a safetensors file: tensors are views of a private (copy-on-write) mapping."""
    import torch

    header, start = _read_safetensors_header(path)
    metadata = header.pop("__metadata__", None) or {}
    with path.open("rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if path.stat().st_size else None
    tensors = {}
    for name, info in header.items():
        dtype = getattr(torch, _ST_DTYPES[info["dtype"]])
        shape = info["shape"]
        begin, end = info["data_offsets"]
        itemsize = torch.empty((), dtype=dtype).element_size()
        count = (end - begin) // itemsize
        if count == 0:
            tensors[name] = torch.empty(shape, dtype=dtype)
        elif (start + begin) % itemsize == 0 and mapped is not None:
            tensors[name] = torch.frombuffer(mapped, dtype=dtype, count=count, offset=start + begin).view(
                shape
            )
        else:  # misaligned for this dtype: copy instead of viewing
            with path.open("rb") as f:
                f.seek(start + begin)
                buf = bytearray(f.read(end - begin))
            tensors[name] = torch.frombuffer(buf, dtype=dtype).view(shape)
    return tensors, dict(metadata)


def _write_safetensors(tensors: Mapping[str, torch.Tensor], dest: Path, metadata: dict[str, str]) -> None:
    """Write the safetensors format, streaming tensor by tensor, atomically (temp name + rename).

    Streaming keeps memory bounded: the source tensors may be memory-mapped from a multi-GB file.
    """
    import torch

    names = {v: k for k, v in _ST_DTYPES.items()}
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        header[name] = {
            "dtype": names[str(t.dtype).removeprefix("torch.")],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # pad so the data starts 8-byte aligned (mmap views need it)
    dest.parent.mkdir(parents=True, exist_ok=True)
    _require_space(dest.parent, offset + len(blob) + 8, f"converting to {dest.name}")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for t in tensors.values():
                flat = t.detach().contiguous().reshape(-1)
                if flat.numel():
                    f.write(memoryview(flat.view(torch.uint8).numpy()))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise _disk_full(exc, dest.parent) from None
        raise WeightsError(f"cannot write {dest}: {exc}") from None
    finally:
        tmp.unlink(missing_ok=True)


def _read_any(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist")
    with path.open("rb") as f:
        head = f.read(9)
    # safetensors: 8-byte little-endian header length, then JSON starting with '{'
    if path.suffix == ".safetensors" or head[8:9] == b"{":
        return _read_safetensors(path)
    return _read_original(path), {}


# --------------------------------------------------------------------------------------------
# Architecture checks


@functools.cache
def _expected_shapes(arch: str | Arch) -> dict[str, tuple[int, ...]]:
    net = build_network(arch, device="meta")
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


def _shapes(tensors: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in tensors.items()}


def identify_size(shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    """The STU-Net size whose state dict has exactly these keys and shapes, or None."""
    for size in SIZES:
        if dict(shapes) == _expected_shapes(size):
            return size
    return None


def describe(shapes: Mapping[str, tuple[int, ...]]) -> str:
    """What a state dict looks like, for error messages."""
    size = identify_size(shapes)
    if size is not None:
        return f"STU-Net {size}"
    scores = {}
    for name in SIZES:
        ref = _expected_shapes(name)
        scores[name] = sum(1 for k, s in shapes.items() if ref.get(k) == s) / max(len(ref), len(shapes))
    closest = max(scores, key=scores.__getitem__)
    head = shapes.get(f"seg_outputs.{len(SIZES[closest].strides) - 1}.weight")
    classes = f", {head[0]} output classes" if head else ""
    return (
        f"no STU-Net size ({len(shapes)} tensors{classes}; closest is {closest} with "
        f"{scores[closest]:.0%} of keys and shapes matching)"
    )


def _check_architecture(path: Path, shapes: Mapping[str, tuple[int, ...]], size: str | None) -> str:
    """Return the size the shapes belong to; raise if none, or if it is not ``size``."""
    found = identify_size(shapes)
    if found is None:
        raise WeightsError(f"{path} is not a checkpoint stuseg can use: it looks like {describe(shapes)}")
    if size is not None and found != size:
        raise WeightsError(
            f"{path} is a checkpoint of STU-Net {found}, not {size}; use --size {found} (or leave --size out)"
        )
    return found


# --------------------------------------------------------------------------------------------
# Conversion into the cache


@dataclass(frozen=True)
class Installed:
    """Result of ``download_weights`` / ``import_weights``: verified weights in the cache."""

    size: str
    path: Path  # the converted safetensors file
    source: str  # where the original came from
    sha256: str  # of the original file
    verified_by: str
    fetched: bool  # False when the cache already held verified weights and nothing was done
    note: str = ""


def _install(
    tensors: dict[str, torch.Tensor], size: str, source: str, sha: str, verified_by: str, progress: Progress
) -> Path:
    dest = cached_path(size)
    metadata = {
        "format": "pt",
        "stuseg_size": size,
        "source": source,
        "source_sha256": sha,
        "verified_by": verified_by,
    }
    progress("convert", 0, 1)
    _write_safetensors(tensors, dest, metadata)
    progress("convert", 1, 1)
    return dest


def _cached_metadata(size: str) -> dict[str, str] | None:
    """Metadata of the cached weights of ``size`` if the file is there and readable."""
    path = cached_path(size)
    if not path.is_file():
        return None
    try:
        header, _ = _read_safetensors_header(path)
    except (WeightsError, OSError, KeyError, TypeError, ValueError):
        return None
    meta = header.get("__metadata__") or {}
    return meta if meta.get("stuseg_size") == size else None


def _is_published(meta: dict[str, str] | None, entry: WeightsEntry) -> bool:
    """Do the cached weights come from the published file of this entry?"""
    if meta is None or meta.get("verified_by") not in (BY_MANIFEST, BY_HUB):
        return False
    return entry.sha256 is None or meta.get("source_sha256") == entry.sha256


def import_weights(
    file: Path,
    size: str | None = None,
    *,
    manifest: Path | None = None,
    progress: Progress | None = None,
) -> Installed:
    """Verify a checkpoint the user got elsewhere and convert it into the cache.

    The file (original ``.model`` or a safetensors file) is accepted when its keys and shapes are
    exactly those of an STU-Net size (inferred; ``size`` must agree if given). If the manifest knows
    the published sha256 for that size, a match is recorded as such; a different hash is accepted on
    the architecture check alone and said so in ``note``.
    """
    progress = progress or _no_progress
    file = Path(file)
    want = _canonical(size) if size is not None else None
    if not file.is_file():
        raise WeightsError(f"weights file {file} does not exist")
    sha = sha256_file(file, progress, "verify")
    tensors, _ = _read_any(file)
    found = _check_architecture(file, _shapes(tensors), want)
    entry = load_manifest(manifest).entry(found)
    note = ""
    if entry.sha256 == sha:
        verified_by = BY_MANIFEST
    else:
        verified_by = BY_ARCH
        if entry.sha256 is not None:
            note = (
                f"{file.name} is not byte-identical to the published {entry.filename}; "
                "it was accepted because its keys and shapes match"
            )
    dest = _install(tensors, found, str(file.resolve()), sha, verified_by, progress)
    return Installed(found, dest, str(file), sha, verified_by, fetched=True, note=note)


# --------------------------------------------------------------------------------------------
# Download


def _tqdm_adapter(progress: Progress, phase: str) -> type:
    """A minimal tqdm stand-in for huggingface_hub that forwards to ``progress``."""

    class Bar:
        def __init__(self, *args: Any, total: int | None = None, initial: int = 0, **kwargs: Any) -> None:
            self.n = initial
            self.total = total
            progress(phase, self.n, total)

        def update(self, n: int | float | None = 1) -> None:
            self.n += int(n or 0)
            progress(phase, self.n, self.total)

        def close(self) -> None:
            pass

        def __enter__(self) -> Bar:
            return self

        def __exit__(self, *exc: object) -> None:
            self.close()

    return Bar


def _hub_error(exc: BaseException, entry: WeightsEntry, endpoint: str) -> WeightsError:
    from huggingface_hub import errors as hf

    what = f"{entry.filename} from {entry.repo}@{entry.revision[:12]}"
    if isinstance(exc, (hf.LocalEntryNotFoundError, hf.OfflineModeIsEnabled)):
        return WeightsError(
            f"cannot get {entry.filename}: offline mode is on (HF_HUB_OFFLINE) and it is not in the cache; "
            f"run `stuseg download --size {entry.size}` with network access, or `stuseg import-weights FILE`"
        )
    if isinstance(exc, hf.RevisionNotFoundError):
        return WeightsError(f"revision {entry.revision} of {entry.repo} was not found on {endpoint}")
    if isinstance(exc, hf.RepositoryNotFoundError):
        return WeightsError(f"repository {entry.repo} was not found on {endpoint} (or it needs a login)")
    if isinstance(exc, hf.EntryNotFoundError):
        return WeightsError(
            f"{entry.filename} was not found in {entry.repo} at {entry.revision} on {endpoint}"
        )
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return _disk_full(exc, Path(os.environ.get("HF_HOME", "~/.cache/huggingface")))
    if isinstance(exc, hf.HfHubHTTPError):
        status = exc.response.status_code if exc.response is not None else "?"
        return WeightsError(f"the hub at {endpoint} refused {what} (HTTP {status})")
    if type(exc).__name__ == "RemoteProtocolError" or "consistency check failed" in str(exc).lower():
        return WeightsError(
            f"the download of {entry.filename} was cut short (truncated body); nothing was kept, run it again"
        )
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return WeightsError(
        f"cannot download {what} from {endpoint} ({reason}); check the connection or HF_ENDPOINT, "
        f"or get {entry.filename} elsewhere (e.g. the STU-Net Google Drive) and run "
        "`stuseg import-weights FILE`"
    )


def _delete_download(path: Path) -> None:
    """Remove a bad download from the huggingface_hub cache: the blob and the snapshot link."""
    blob = Path(os.path.realpath(path))
    for p in (path, blob):
        p.unlink(missing_ok=True)


def download_weights(
    size: str,
    *,
    manifest: Path | None = None,
    force: bool = False,
    endpoint: str | None = None,
    hf_cache_dir: Path | None = None,
    progress: Progress | None = None,
) -> Installed:
    """Make sure verified weights of ``size`` are in the cache: download, verify, convert.

    Nothing touches the network when the cache already holds weights converted from the published
    file (unless ``force``). ``endpoint``/``hf_cache_dir`` default to huggingface_hub's settings
    (HF_ENDPOINT, HF_HOME), read by huggingface_hub when it is first imported.
    """
    progress = progress or _no_progress
    entry = load_manifest(manifest).entry(size)
    meta = _cached_metadata(entry.size)
    if not force and _is_published(meta, entry):
        assert meta is not None
        return Installed(
            entry.size,
            cached_path(entry.size),
            meta["source"],
            meta["source_sha256"],
            meta["verified_by"],
            False,
        )

    import huggingface_hub
    from huggingface_hub import constants

    endpoint = (endpoint or constants.ENDPOINT).rstrip("/")
    kwargs = dict(
        repo_id=entry.repo,
        filename=entry.filename,
        revision=entry.revision,
        endpoint=endpoint,
        cache_dir=str(hf_cache_dir) if hf_cache_dir is not None else None,
    )
    expected_sha, expected_size = entry.sha256, entry.size_bytes
    if not constants.HF_HUB_OFFLINE:
        # One HEAD first: fails fast when the hub is unreachable (huggingface_hub would otherwise
        # retry with backoff for ~20 s), and gives the hub's sha256 (LFS ETag) for weak pins.
        url = huggingface_hub.hf_hub_url(
            entry.repo, entry.filename, revision=entry.revision, endpoint=endpoint
        )
        try:
            info = huggingface_hub.get_hf_file_metadata(url)
        except Exception as exc:
            raise _hub_error(exc, entry, endpoint) from None
        hub_sha = (info.etag or "").strip('"').lower()
        if expected_sha is None:
            if not _HEX64.fullmatch(hub_sha):
                raise WeightsError(
                    f"the hub did not report a sha256 for {entry.filename} (ETag {info.etag!r}), "
                    "so the download cannot be verified"
                )
            expected_sha = hub_sha
        elif _HEX64.fullmatch(hub_sha) and hub_sha != expected_sha:
            raise WeightsError(
                f"the hub serves a different {entry.filename} (sha256 {hub_sha}) than the pinned one "
                f"({expected_sha}); refusing to download it"
            )
        expected_size = expected_size or info.size
        if expected_size:
            hf_dir = Path(kwargs["cache_dir"] or constants.HF_HUB_CACHE)
            _require_space(hf_dir, expected_size, f"downloading {entry.filename}")
        _require_space(stuseg_home(), entry.converted_bytes, f"converting {entry.filename}")

    try:
        local = Path(
            huggingface_hub.hf_hub_download(**kwargs, tqdm_class=_tqdm_adapter(progress, "download"))  # type: ignore[arg-type]
        )
    except Exception as exc:
        raise _hub_error(exc, entry, endpoint) from None

    if expected_sha is None:
        # Offline with a weak pin: huggingface_hub names LFS blobs by their sha256 (the ETag).
        blob_name = Path(os.path.realpath(local)).name
        if not _HEX64.fullmatch(blob_name):
            raise WeightsError(
                f"cannot verify the cached {entry.filename}: its hub sha256 is unknown offline"
            )
        expected_sha = blob_name
    actual_size = local.stat().st_size
    if expected_size is not None and actual_size != expected_size:
        _delete_download(local)
        raise WeightsError(
            f"downloaded {entry.filename} has {actual_size} bytes, expected {expected_size}; "
            "the file was deleted, run the download again"
        )
    sha = sha256_file(local, progress, "verify")
    if sha != expected_sha:
        _delete_download(local)
        raise WeightsError(
            f"downloaded {entry.filename} has sha256 {sha}, expected {expected_sha}; "
            "the file was deleted, run the download again"
        )
    tensors, _ = _read_any(local)
    _check_architecture(local, _shapes(tensors), entry.size)
    verified_by = BY_MANIFEST if entry.sha256 else BY_HUB
    source = f"{endpoint}/{entry.repo}/{entry.revision}/{entry.filename}"
    dest = _install(tensors, entry.size, source, sha, verified_by, progress)
    return Installed(entry.size, dest, source, sha, verified_by, fetched=True)


# --------------------------------------------------------------------------------------------
# Loading


@dataclass(frozen=True)
class LoadedWeights:
    size: str
    state_dict: dict[str, torch.Tensor]
    source: str  # the file the tensors come from, and how it was verified
    verified_by: str
    path: Path


def load_weights(
    size: str | None = None,
    path: Path | None = None,
    *,
    download: bool = True,
    manifest: Path | None = None,
) -> LoadedWeights:
    """Return a verified STU-Net state dict.

    With ``path``: an original ``.model`` checkpoint or a safetensors file, checked by the
    manifest's sha256 where it matches, otherwise by keys and shapes; the size is inferred and
    must agree with ``size`` if given. Without ``path``: the cached weights of ``size``, downloaded
    and converted first if needed and ``download`` is true. Safetensors tensors are memory-mapped.
    """
    want = _canonical(size) if size is not None else None
    if path is not None:
        path = Path(path)
        tensors, meta = _read_any(path)
        found = _check_architecture(path, _shapes(tensors), want)
        if meta.get("verified_by"):
            verified_by = f"{meta['verified_by']}, as recorded in the file"
        else:
            entry = load_manifest(manifest).entry(found)
            known = entry.sha256 is not None and path.stat().st_size == entry.size_bytes
            verified_by = BY_MANIFEST if known and sha256_file(path) == entry.sha256 else BY_ARCH
        return LoadedWeights(found, tensors, f"{path} ({verified_by})", verified_by, path)

    if want is None:
        raise WeightsError("give a model size (small, base, large, huge) or a weights file")
    cache = cached_path(want)
    meta = _cached_metadata(want)
    if meta is None:
        if not download:
            raise WeightsError(
                f"weights for {want} are not in the cache ({cache}); run `stuseg download --size {want}` "
                "or `stuseg import-weights FILE`"
            )
        download_weights(want, manifest=manifest)
        meta = _cached_metadata(want)
        if meta is None:
            raise WeightsError(f"weights for {want} were downloaded but {cache} cannot be read")
    tensors, _ = _read_safetensors(cache)
    _check_architecture(cache, _shapes(tensors), want)
    return LoadedWeights(want, tensors, f"{cache} ({meta['verified_by']})", meta["verified_by"], cache)


# --------------------------------------------------------------------------------------------
# Status


@dataclass(frozen=True)
class WeightsStatus:
    size: str
    parameters: int
    filename: str
    file_bytes: int | None  # exact size of the published file, if known
    approx_file_bytes: int
    pin: str
    path: Path
    present: bool
    verified_by: str | None


def weights_status(manifest: Path | None = None) -> list[WeightsStatus]:
    """One row per manifest entry: what it is and whether verified weights are cached."""
    rows = []
    for size, entry in load_manifest(manifest).entries.items():
        meta = _cached_metadata(size)
        rows.append(
            WeightsStatus(
                size=size,
                parameters=entry.parameters,
                filename=entry.filename,
                file_bytes=entry.size_bytes,
                approx_file_bytes=entry.approx_size_bytes,
                pin=entry.pin,
                path=cached_path(size),
                present=meta is not None,
                verified_by=meta.get("verified_by") if meta else None,
            )
        )
    return rows
