"""The weights manifest: which published checkpoint each STU-Net size is, pinned where, with what hash.

This module is the only reader of ``weights_manifest.json`` (shipped inside the package; the
repository's top-level file of the same name is a byte-identical copy kept for readers). The file
is parsed into frozen dataclasses by one strict reader: a missing or unknown key, a wrong type or
an unknown size fails at load with a one-line ``WeightsError``. The models' plan facts (spacing,
patch, classes, normalization) are not in the manifest: ``stuseg.model.plan`` holds them.

Pure data: importing this module imports neither torch nor numpy, so ``stuseg weights`` stays fast.
"""

from __future__ import annotations

import importlib.resources
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from stuseg.errors import WeightsError
from stuseg.model.sizes import SIZE_NAMES, canonical_size

__all__ = [
    "MANIFEST_NAME",
    "MANIFEST_SCHEMA",
    "Manifest",
    "WeightsEntry",
    "default_manifest_path",
    "load_manifest",
]

# 2: the plan facts (target_spacing, patch_size, normalization, num_classes) left the manifest for
# stuseg/model/plan.py; a schema-1 file is refused rather than half-read.
MANIFEST_SCHEMA = 2
MANIFEST_NAME = "weights_manifest.json"

HEX40 = re.compile(r"[0-9a-f]{40}")
HEX64 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class WeightsEntry:
    """One published checkpoint of one size."""

    size: str
    repo: str  # hub repository, "owner/name"
    filename: str  # file in that repository
    revision: str  # full commit (pin "commit") or branch (pin "branch")
    pin: str  # "commit": revision, sha256 and size_bytes known here; "branch": weaker, see the note
    size_bytes: int | None  # exact byte size of the published file, if known
    approx_size_bytes: int  # for disk-space checks and the listing when size_bytes is unknown
    sha256: str | None  # of the published file, if known
    parameters: int  # network parameters (fp32 each once converted)
    note: str

    @property
    def converted_bytes(self) -> int:
        """Approximate size of the converted fp32 safetensors file (4 bytes per parameter)."""
        return 4 * self.parameters


@dataclass(frozen=True)
class Manifest:
    """A validated manifest: where it was read from and one entry per size."""

    path: Path
    entries: Mapping[str, WeightsEntry]

    def entry(self, size: str) -> WeightsEntry:
        """The entry of one size.

        Args:
            size: small, base, large or huge (or S/B/L/H).

        Returns:
            Its entry.

        Raises:
            WeightsError: unknown size, or a size this manifest has no entry for.
        """
        key = canonical_size(size)
        if key not in self.entries:
            have = ", ".join(self.entries) or "none"
            raise WeightsError(f"manifest {self.path} has no entry for size {key!r}; it has: {have}")
        return self.entries[key]


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# JSON key -> (what it must be, for the error message; validator). Exactly the fields of
# WeightsEntry except ``size`` (the key of the entry); a test checks the two agree.
_ENTRY_FIELDS: dict[str, tuple[str, Callable[[object], bool]]] = {
    "repo": ("a 'owner/name' string", lambda v: isinstance(v, str) and v.count("/") == 1),
    "filename": ("a non-empty string", lambda v: isinstance(v, str) and bool(v)),
    "revision": ("a non-empty string", lambda v: isinstance(v, str) and bool(v)),
    "pin": ("'commit' or 'branch'", lambda v: v in ("commit", "branch")),
    "size_bytes": ("a positive integer or null", lambda v: v is None or (_is_int(v) and v > 0)),  # type: ignore[operator]
    "approx_size_bytes": ("a positive integer", lambda v: _is_int(v) and v > 0),  # type: ignore[operator]
    "sha256": ("64 lowercase hex digits or null", lambda v: v is None or bool(HEX64.fullmatch(str(v)))),
    "parameters": ("a positive integer", lambda v: _is_int(v) and v > 0),  # type: ignore[operator]
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
        HEX40.fullmatch(raw["revision"]) and raw["sha256"] and raw["size_bytes"]
    ):
        raise WeightsError(
            f"{where}: {size} is pinned to a commit, so it needs a 40-hex revision, sha256 and size_bytes"
        )
    return WeightsEntry(size=size, **raw)


def default_manifest_path() -> Path:
    """The manifest shipped inside the stuseg package (a real file, in a wheel and an editable install)."""
    return Path(str(importlib.resources.files("stuseg.weights") / MANIFEST_NAME))


def load_manifest(path: Path | None = None) -> Manifest:
    """Read and validate a weights manifest.

    Args:
        path: a manifest file; default: the one shipped with stuseg.

    Returns:
        The manifest, one entry per size, in file order.

    Raises:
        WeightsError: the file is missing, unreadable, not JSON, of another schema, or any entry has
            a missing, unknown or ill-typed key, or names a size that does not exist.
    """
    path = Path(path) if path is not None else default_manifest_path()
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise WeightsError(f"weights manifest {path} does not exist") from None
    except IsADirectoryError:
        raise WeightsError(f"weights manifest {path} is a folder, not a JSON file") from None
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
        if size not in SIZE_NAMES:
            raise WeightsError(f"{where}: unknown size {size!r}; valid sizes: {', '.join(SIZE_NAMES)}")
        entries[size] = _parse_entry(size, entry, where)
    return Manifest(path=path, entries=entries)
