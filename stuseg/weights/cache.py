"""stuseg's cache of verified weights: download, import, load, and report what is there.

Each size lives as ``<STUSEG_HOME>/weights/<size>.safetensors``, converted once from the original
checkpoint (``stuseg.weights.checkpoints``) and memory-mapped by later runs. Its metadata records where it
came from and how it was verified. A cached file whose header does not describe exactly its bytes
(truncated, overwritten, not written by stuseg) is *damaged*: listed as such, and repaired by a new
download when it came from the hub, or explained when it was imported.

Downloads go through huggingface_hub (so HF_ENDPOINT, HF_HOME and HF_HUB_OFFLINE behave as usual),
pinned as the manifest (``stuseg.weights.manifest``) says; the downloaded bytes are then checked here for
size and sha256, which huggingface_hub does not do.

Library code: raises ``WeightsError`` with a one-line message, never prints. Progress is reported
through an optional ``progress(phase, done, total)`` callback. torch is imported only by the
functions that read or write tensors: ``weights_status`` does not need it.
"""

from __future__ import annotations

import errno
import functools
import os
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stuseg.errors import WeightsError
from stuseg.model.sizes import SIZE_NAMES, canonical_size
from stuseg.weights.checkpoints import (
    DamagedFile,
    check_architecture,
    disk_full,
    read_checkpoint,
    require_space,
    shapes_of,
    validate_safetensors,
    write_safetensors,
)
from stuseg.weights.digests import Progress, no_progress, remembered_sha256, sha256_file
from stuseg.weights.manifest import HEX64, WeightsEntry, load_manifest

if TYPE_CHECKING:
    import torch

__all__ = [
    "BY_ARCH",
    "BY_HUB",
    "BY_MANIFEST",
    "Installed",
    "LoadedWeights",
    "Progress",
    "WeightsStatus",
    "cached_path",
    "download_weights",
    "import_weights",
    "load_weights",
    "sha256_file",
    "stuseg_home",
    "weights_status",
]

# How a cached file was verified (stored in the safetensors metadata).
BY_MANIFEST = "sha256 (manifest)"
BY_HUB = "sha256 (hub-reported)"
BY_ARCH = "architecture (keys and shapes)"


# --------------------------------------------------------------------------------------------
# Locations


def stuseg_home() -> Path:
    """stuseg's cache folder.

    Returns:
        ``$STUSEG_HOME`` if set, else the per-user cache folder (``~/.cache/stuseg`` on Linux,
        ``~/Library/Caches/stuseg`` on macOS, ``%LOCALAPPDATA%\\stuseg`` on Windows); it may not exist.
    """
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
    """Where the converted, verified weights of ``size`` live (whether or not they exist).

    Args:
        size: small, base, large or huge (or S/B/L/H).

    Returns:
        ``<STUSEG_HOME>/weights/<size>.safetensors``.

    Raises:
        WeightsError: unknown size.
    """
    return stuseg_home() / "weights" / f"{canonical_size(size)}.safetensors"


def _writable_cache() -> Path:
    """Create the cache folder if needed and prove it takes a file, before any long work."""
    folder = stuseg_home() / "weights"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".probe.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        blocker = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)
        if blocker is not None:
            raise WeightsError(
                f"the stuseg cache {folder} cannot be created: {blocker} is a file, not a folder; "
                "set STUSEG_HOME to a folder"
            ) from None
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise WeightsError(
                f"the stuseg cache {folder} is not writable ({exc.strerror}); "
                "set STUSEG_HOME to a writable folder"
            ) from None
        if exc.errno == errno.ENOSPC:
            raise disk_full(exc, folder) from None
        raise WeightsError(f"the stuseg cache {folder} cannot be written ({exc.strerror or exc})") from None
    return folder


# --------------------------------------------------------------------------------------------
# Hashing


# --------------------------------------------------------------------------------------------
# The cache


# Metadata keys stuseg writes into every cached file.
_META_KEYS = ("format", "stuseg_size", "source", "source_sha256", "verified_by")


@dataclass(frozen=True)
class _Cached:
    """What the cache holds for one size: nothing, sound weights, or a damaged file."""

    metadata: dict[str, str] | None  # as recorded in the header, when it could be read (even if damaged)
    damage: str | None  # why the file cannot be used; None when absent or sound

    @property
    def sound(self) -> bool:
        return self.metadata is not None and self.damage is None


def _cached(size: str) -> _Cached:
    """Check the cached file of ``size`` against its own header: exact byte size, stuseg's metadata."""
    path = cached_path(size)
    if not path.exists():
        return _Cached(None, None)
    if not path.is_file():
        return _Cached(None, f"{path} is not a file")
    try:
        meta = validate_safetensors(path)
    except DamagedFile as exc:
        return _Cached(exc.metadata, exc.detail)
    except WeightsError as exc:  # unreadable (permissions, I/O error)
        return _Cached(None, str(exc))
    if any(k not in meta for k in _META_KEYS) or meta["stuseg_size"] != size:
        return _Cached(None, f"{path.name} was not written by stuseg for {size}")
    return _Cached(meta, None)


def _is_published(cached: _Cached, entry: WeightsEntry) -> bool:
    """Were the cached weights converted from the published file of this entry?"""
    meta = cached.metadata
    if not cached.sound or meta is None or meta["verified_by"] not in (BY_MANIFEST, BY_HUB):
        return False
    return entry.sha256 is None or meta["source_sha256"] == entry.sha256


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
    write_safetensors(tensors, dest, metadata)
    progress("convert", 1, 1)
    return dest


@dataclass(frozen=True)
class Installed:
    """Result of ``download_weights`` / ``import_weights``: verified weights in the cache."""

    size: str
    path: Path  # the converted safetensors file
    sha256: str  # of the original file
    verified_by: str
    fetched: bool  # False when the cache already held verified weights and nothing was done
    note: str = ""


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

    Args:
        file: the checkpoint.
        size: the size it must be, or None to infer it.
        manifest: another manifest than the shipped one.
        progress: ``progress(phase, done, total)`` for hashing and converting.

    Returns:
        Where the weights now are, and how they were verified.

    Raises:
        WeightsError: the file is missing, a folder, not a checkpoint, damaged, of another size or
            architecture; the cache cannot be written (STUSEG_HOME a file, read-only, disk full).
            The cache is left as it was.
    """
    progress = progress or no_progress
    file = Path(file)
    want = canonical_size(size) if size is not None else None
    tensors, _ = read_checkpoint(file)
    found = check_architecture(file, shapes_of(tensors), want)
    entry = load_manifest(manifest).entry(found)
    _writable_cache()
    sha = sha256_file(file, progress, "verify")
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
    return Installed(found, dest, sha, verified_by, fetched=True, note=note)


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


# Exceptions that mean stuseg or a library under it is wrong (an API change, say), not the network:
# the HTTP stack under huggingface_hub changes (requests, httpx, httpx2), so its errors are not
# listed; whatever else goes wrong while talking to the hub is the hub's or the connection's.
_BUGS = (
    TypeError,
    AttributeError,
    NameError,
    ImportError,
    AssertionError,
    NotImplementedError,
    RecursionError,
)


def _hub_error(exc: BaseException, entry: WeightsEntry, endpoint: str) -> BaseException:
    """The one-line ``WeightsError`` for a failure to reach or use the hub; ``exc`` itself when it
    is none of those (a bug, which must surface as one)."""
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
        return disk_full(exc, Path(os.environ.get("HF_HOME", "~/.cache/huggingface")))
    if isinstance(exc, hf.HfHubHTTPError):
        status = exc.response.status_code if exc.response is not None else "?"
        return WeightsError(f"the hub at {endpoint} refused {what} (HTTP {status})")
    if type(exc).__name__ == "RemoteProtocolError" or "consistency check failed" in str(exc).lower():
        return WeightsError(
            f"the download of {entry.filename} was cut short (truncated body); nothing was kept, run it again"
        )
    if isinstance(exc, _BUGS):
        return exc  # reported as the bug it is, not as "check the connection"
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

    Nothing touches the network when the cache already holds sound weights converted from the
    published file (unless ``force``); a damaged cached file is replaced. A size pinned to a commit
    is checked against the manifest's byte size and sha256; a weaker "branch" pin against the
    sha256 the hub reports (its LFS ETag), or offline the sha256 huggingface_hub named the blob by.

    Args:
        size: small, base, large or huge (or S/B/L/H).
        manifest: another manifest than the shipped one.
        force: download and convert again even when the cache is sound.
        endpoint: the hub URL; default huggingface_hub's (HF_ENDPOINT, read when it is imported).
        hf_cache_dir: huggingface_hub's cache folder; default its own (HF_HOME).
        progress: ``progress(phase, done, total)`` for download, verify and convert.

    Returns:
        Where the weights are, how they were verified, and whether anything was fetched.

    Raises:
        WeightsError: unknown size; the cache cannot be written; the hub unreachable, offline
            without a copy, refusing, or serving other bytes than pinned (size or sha256, the bad
            download is deleted); not enough disk space.
    """
    progress = progress or no_progress
    entry = load_manifest(manifest).entry(size)
    cached = _cached(entry.size)
    if not force and _is_published(cached, entry):
        assert cached.metadata is not None
        meta = cached.metadata
        return Installed(
            entry.size, cached_path(entry.size), meta["source_sha256"], meta["verified_by"], False
        )
    _writable_cache()

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
            if not HEX64.fullmatch(hub_sha):
                raise WeightsError(
                    f"the hub did not report a sha256 for {entry.filename} (ETag {info.etag!r}), "
                    "so the download cannot be verified"
                )
            expected_sha = hub_sha
        elif HEX64.fullmatch(hub_sha) and hub_sha != expected_sha:
            raise WeightsError(
                f"the hub serves a different {entry.filename} (sha256 {hub_sha}) than the pinned one "
                f"({expected_sha}); refusing to download it"
            )
        expected_size = expected_size or info.size
        if expected_size:
            hf_dir = Path(kwargs["cache_dir"] or constants.HF_HUB_CACHE)
            require_space(hf_dir, expected_size, f"downloading {entry.filename}")
        require_space(stuseg_home(), entry.converted_bytes, f"converting {entry.filename}")

    try:
        local = Path(
            huggingface_hub.hf_hub_download(**kwargs, tqdm_class=_tqdm_adapter(progress, "download"))  # type: ignore[arg-type]
        )
    except Exception as exc:
        raise _hub_error(exc, entry, endpoint) from None

    if expected_sha is None:
        # Offline with a weak pin: huggingface_hub names LFS blobs by their sha256 (the ETag).
        blob_name = Path(os.path.realpath(local)).name
        if not HEX64.fullmatch(blob_name):
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
    tensors, _ = read_checkpoint(local)
    check_architecture(local, shapes_of(tensors), entry.size)
    verified_by = BY_MANIFEST if entry.sha256 else BY_HUB
    source = f"{endpoint}/{entry.repo}/{entry.revision}/{entry.filename}"
    dest = _install(tensors, entry.size, source, sha, verified_by, progress)
    return Installed(entry.size, dest, sha, verified_by, fetched=True)


# --------------------------------------------------------------------------------------------
# Loading


@dataclass(frozen=True)
class LoadedWeights:
    """A verified STU-Net state dict and where it came from."""

    size: str
    state_dict: dict[str, torch.Tensor]
    verified_by: str  # one of BY_MANIFEST, BY_HUB, BY_ARCH (+ ", as recorded in the file")
    path: Path  # the file the tensors are mapped from
    # The sha256 of the original checkpoint where the file records it (stuseg's safetensors) or
    # the loader computed it anyway (a manifest check); else the file's own, hashed on first use.
    known_sha256: str | None = None

    @functools.cached_property
    def sha256(self) -> str:
        """What identifies these weights wherever they are loaded from (run logs, resume): the
        original checkpoint's sha256, so the cached conversion and the file it came from agree."""
        return self.known_sha256 or remembered_sha256(self.path)


def _sizes_cached_besides(size: str) -> str:
    """A hint naming the sizes whose weights are cached (for a failed download of ``size``)."""
    others = [s for s in SIZE_NAMES if s != size and _cached(s).sound]
    if not others:
        return ""
    return f"; weights for {', '.join(others)} are in the cache: use --size {others[0]}"


def _repair(size: str, cached: _Cached, download: bool, manifest: Path | None) -> None:
    """Replace the damaged cached file of ``size`` by a new download, or say how to."""
    damaged = f"the cached weights for {size} are damaged ({cached.damage})"
    # A cut-off file keeps its header, so its record of where it came from can usually be read.
    # Weights imported from a file of the user's are never silently swapped for the published ones.
    meta = cached.metadata or {}
    if meta.get("verified_by") == BY_ARCH and meta.get("source"):
        raise WeightsError(
            f"{damaged}; they were imported from {meta['source']}: run "
            f"`stuseg import-weights {meta['source']}` again"
        )
    how = f"run `stuseg download --size {size} --force` or `stuseg import-weights FILE`"
    if not download or meta.get("verified_by") not in (BY_MANIFEST, BY_HUB):
        # Not known to be the published weights (or no download wanted): the user decides.
        raise WeightsError(f"{damaged}; {how}")
    try:
        download_weights(size, manifest=manifest, force=True)
    except WeightsError as exc:
        raise WeightsError(f"{damaged}, and downloading them again failed: {exc}") from None
    from stuseg.errors import StusegWarning

    warnings.warn(f"{damaged}; they were downloaded and verified again", StusegWarning, stacklevel=3)


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
    and converted first if needed and ``download`` is true; damaged cached weights of a published
    file are downloaded again (with a ``StusegWarning`` saying so). Safetensors tensors are
    memory-mapped.

    Args:
        size: small, base, large or huge (or S/B/L/H); required without ``path``.
        path: a checkpoint file to use instead of the cache.
        download: allow a download when the cache has no (sound) weights of ``size``.
        manifest: another manifest than the shipped one.

    Returns:
        The size, the state dict, how it was verified and the file it was read from.

    Raises:
        WeightsError: no size and no path; the file is missing, a folder, not a checkpoint,
            damaged or of another size; the cache holds no weights of ``size`` and they cannot be
            downloaded (the message names the sizes that are cached); damaged cached weights that
            cannot be repaired here (the message says how).
    """
    want = canonical_size(size) if size is not None else None
    if path is not None:
        path = Path(path)
        tensors, meta = read_checkpoint(path)
        found = check_architecture(path, shapes_of(tensors), want)
        recorded = meta.get("source_sha256") or None
        if meta.get("verified_by"):
            verified_by = f"{meta['verified_by']}, as recorded in the file"
        else:
            entry = load_manifest(manifest).entry(found)
            known = entry.sha256 is not None and path.stat().st_size == entry.size_bytes
            if known and remembered_sha256(path) == entry.sha256:
                verified_by, recorded = BY_MANIFEST, entry.sha256
            else:
                verified_by = BY_ARCH
        return LoadedWeights(found, tensors, verified_by, path, recorded)

    if want is None:
        raise WeightsError("give a model size (small, base, large, huge) or a weights file")
    cache = cached_path(want)
    cached = _cached(want)
    if cached.damage is not None:
        _repair(want, cached, download, manifest)
    elif cached.metadata is None:
        if not download:
            raise WeightsError(
                f"weights for {want} are not in the cache ({cache}); run `stuseg download --size {want}` "
                f"or `stuseg import-weights FILE`{_sizes_cached_besides(want)}"
            )
        try:
            download_weights(want, manifest=manifest)
        except WeightsError as exc:
            raise WeightsError(f"{exc}{_sizes_cached_besides(want)}") from None
    cached = _cached(want)
    if not cached.sound:
        raise WeightsError(f"weights for {want} were installed but {cache} cannot be read ({cached.damage})")
    assert cached.metadata is not None
    tensors, _ = read_checkpoint(cache)
    check_architecture(cache, shapes_of(tensors), want)
    recorded = cached.metadata.get("source_sha256") or None
    return LoadedWeights(want, tensors, cached.metadata["verified_by"], cache, recorded)


# --------------------------------------------------------------------------------------------
# Status


@dataclass(frozen=True)
class WeightsStatus:
    """One row of ``stuseg weights``."""

    size: str
    parameters: int
    filename: str
    file_bytes: int | None  # exact size of the published file, if known
    approx_file_bytes: int
    pin: str
    path: Path
    present: bool  # sound, verified weights are cached
    verified_by: str | None
    damaged: str | None  # why the cached file cannot be used, if there is one that cannot


def weights_status(manifest: Path | None = None) -> list[WeightsStatus]:
    """One row per manifest entry: what it is and whether sound, verified weights are cached.

    Reads only headers (no torch, no hashing of the cached files).

    Args:
        manifest: another manifest than the shipped one.

    Returns:
        The rows, in manifest order.

    Raises:
        WeightsError: the manifest cannot be read.
    """
    rows = []
    for size, entry in load_manifest(manifest).entries.items():
        cached = _cached(size)
        rows.append(
            WeightsStatus(
                size=size,
                parameters=entry.parameters,
                filename=entry.filename,
                file_bytes=entry.size_bytes,
                approx_file_bytes=entry.approx_size_bytes,
                pin=entry.pin,
                path=cached_path(size),
                present=cached.sound,
                verified_by=cached.metadata["verified_by"] if cached.sound and cached.metadata else None,
                damaged=cached.damage,
            )
        )
    return rows
