"""Where results go: unsafe outputs are refused before any work, and results appear whole or not at all.

Every command that writes follows the same three steps, so a new command gets the same guarantees
by calling these functions rather than by copying them:

1. ``check_output(output, inputs=..., kind=...)`` before any work: an output that would replace,
   lie inside or contain an input is refused, and so is a folder of the user's own files (stuseg
   never deletes or overwrites what it did not write, unless asked to with ``overwrite``).
2. ``staged_folder(output)`` (or ``staged_files(paths)``) around the writing: the results are
   written into a hidden sibling and moved into place only when every file is complete. A
   failure, Ctrl-C or SIGTERM leaves ``output`` as it was; a SIGKILL leaves a hidden sibling that
   the next run writing into the same folder removes.
3. The ownership marker ``.stuseg-run.json`` in every folder stuseg writes lists the run (command,
   options, inputs, version, time) and the files it wrote. It is how step 1 tells "a folder
   stuseg wrote" (replaced as a whole by the next run, so a folder always describes exactly one
   run) from "a folder of the user's files" (refused).

Staged names are ``.stuseg-staging-<host>-<pid>-<hex>`` (folders) and
``.stuseg-staging-<host>-<pid>-<hex>-<name>`` (files); a previous result being swapped out is
``.stuseg-replaced-<host>-<pid>-<hex>``. A leftover whose process is gone (same host, pid not
running) is deleted by the next ``staged_folder``/``staged_files`` in that folder.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime
import errno
import json
import os
import re
import secrets
import shutil
import socket
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from stuseg.errors import OutputError

__all__ = [
    "KINDS",
    "MARKER",
    "MARKER_FORMAT",
    "check_output",
    "clean_leftovers",
    "document_kind",
    "foreign_entries",
    "record_option",
    "recording",
    "staged_files",
    "staged_folder",
    "written_by_stuseg",
]

MARKER = ".stuseg-run.json"
MARKER_FORMAT = "stuseg-run/1"
_STAGING = ".stuseg-staging"
_REPLACED = ".stuseg-replaced"
_LEFTOVER = re.compile(r"\.stuseg-(?:staging|replaced)-(?P<host>[^-]+)-(?P<pid>\d+)-[0-9a-f]{8}(?:-.*)?")
# Files stuseg writes say so within their first bytes: JSON documents (sidecars, statistics, the
# label table in a multilabel NIfTI's header extension) carry "format": "stuseg-...", viewer label
# files a "written by stuseg" comment. Only that much of a file is read to recognise it.
_SIGNATURES = (b'"format": "stuseg-', b"written by stuseg")
_SNIFF_BYTES = 1 << 16
_FORMAT = re.compile(rb'"format": "(stuseg-[a-z-]+)/[0-9]+"')
# What each kind of stuseg document is, for messages (the part of "format" before the version).
KINDS = {
    "stuseg-labels": "label table",
    "stuseg-statistics": "statistics file",
    "stuseg-run": "run marker",
}

# The run being recorded in markers: set by the command line for the duration of a command.
_RUN: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("stuseg_run", default=None)


@contextlib.contextmanager
def recording(command: str, options: Mapping[str, Any]) -> Iterator[None]:
    """Record ``command`` and its ``options`` in the marker of every folder written inside the block.

    Args:
        command: the command's name, e.g. ``"predict"``.
        options: its arguments and options; values are stored as JSON (paths and other objects as
            strings).

    Yields:
        Nothing; the record applies until the block ends.
    """
    token = _RUN.set({"command": command, "options": {k: _jsonable(v) for k, v in options.items()}})
    try:
        yield
    finally:
        _RUN.reset(token)


def record_option(name: str, value: Any) -> None:
    """Set one option of the current recording to what it resolved to (e.g. ``precision``: the
    type ``auto`` chose), for the markers written after this in the block; outside one, nothing."""
    run = _RUN.get()
    if run is not None:
        _RUN.set({**run, "options": {**run.get("options", {}), name: _jsonable(value)}})


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return str(getattr(value, "value", value))  # enums by value, paths and the rest as text


# ---------------------------------------------------------------------------------------------
# Checks before any work


def _real(path: Path) -> Path:
    """Absolute, with every symlink followed (also for paths that do not exist yet)."""
    return Path(os.path.realpath(os.path.abspath(path)))


def _within(path: Path, folder: Path) -> bool:
    """Whether ``path`` lies strictly inside ``folder`` (both real, absolute paths)."""
    return path != folder and folder in path.parents


def check_output(
    output: str | os.PathLike[str],
    *,
    inputs: Sequence[str | os.PathLike[str]],
    kind: Literal["folder", "file"],
    overwrite: bool = False,
    hint: str = "",
    document: str | None = None,
) -> None:
    """Refuse an output that cannot be written safely, before any work is done.

    Refused, with a one-line :class:`OutputError`: an empty path; an output equal to, inside, or
    containing one of ``inputs`` (symlinks followed; never allowed, whatever ``overwrite`` says);
    the current folder or one holding it, the home folder or a filesystem root as a folder output;
    an existing path of the other kind; an existing folder that holds files stuseg did not write
    (its ``.stuseg-run.json`` marker lists what a run wrote) or an existing file that stuseg did
    not write, unless ``overwrite``; a parent folder that does not exist or cannot be written.

    Args:
        output: the folder or file the command will write (as the user typed it).
        inputs: every file or folder the command reads (image, segmentation, weights file...).
        kind: ``"folder"`` for a folder of results, ``"file"`` for one file.
        overwrite: allow replacing an existing folder or file that stuseg did not write.
        hint: appended to the message for a path of the wrong kind, e.g. ", or add --ml ...".
        document: the kind of stuseg document written to a file output (``stuseg-labels``,
            ``stuseg-statistics``; see ``KINDS``): an existing stuseg document of another kind
            is refused too unless ``overwrite`` (a label table is never silently replaced by
            statistics, or the reverse).

    Raises:
        OutputError: the output is unsafe or impossible; the message says what to do instead.
    """
    raw = os.fspath(output)
    noun = "folder" if kind == "folder" else "file"
    if not raw.strip():
        raise OutputError(f"the output path is empty; give the name of a new {noun}")
    out = _real(Path(raw))
    run = _RUN.get()
    for item in inputs:
        source = _real(Path(item))
        if run is not None:
            run.setdefault("inputs", [])
            if str(source) not in run["inputs"]:
                run["inputs"].append(str(source))
        if out == source:
            raise OutputError(
                f"the output {raw} is the input {item}; writing it would destroy the input, "
                f"so give a new {noun} name"
            )
        if _within(out, source):
            raise OutputError(
                f"the output {raw} lies inside the input folder {item}; give a {noun} outside it"
            )
        if _within(source, out):
            raise OutputError(
                f"the output {raw} contains the input {item}; replacing it would delete the input, "
                f"so give a new {noun} name"
            )
    if kind == "folder":
        _check_folder(raw, out, overwrite, hint)
    else:
        _check_file(raw, out, overwrite, hint, document)
    parent = out.parent
    if not parent.is_dir():
        raise OutputError(f"the folder {parent} does not exist; create it first (mkdir -p '{parent}')")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(
            f"cannot write into {parent} (permission denied or read-only); choose another place"
        )


def _check_folder(raw: str, out: Path, overwrite: bool, hint: str) -> None:
    cwd = _real(Path.cwd())
    if out == cwd or _within(cwd, out):
        raise OutputError(
            f"the output {raw} is the current folder or holds it; give the name of a new folder such as out"
        )
    if out == _real(Path.home()) or out.parent == out:
        raise OutputError(
            f"the output {raw} is your home folder or a filesystem root; give a new folder name"
        )
    if not os.path.lexists(out):
        return
    if not out.is_dir():
        raise OutputError(
            f"the output {raw} is a file, but a folder is written here; give a folder name{hint}"
        )
    try:
        foreign = [] if overwrite else foreign_entries(out, limit=1000)
    except OSError as exc:  # what cannot be looked at cannot be known to be stuseg's
        raise OutputError(
            f"cannot look into the folder {raw} ({_reason(exc)}); give a new folder, or add --overwrite "
            "to replace the folder and everything in it"
        ) from None
    if foreign:
        more = len(foreign) - 1
        shown = foreign[0] + (f" and {more}{'+' if len(foreign) == 1000 else ''} more" if more else "")
        raise OutputError(
            f"the folder {raw} holds files stuseg did not write ({shown}); give a new folder, "
            "or add --overwrite to replace the folder and everything in it"
        )


def _check_file(raw: str, out: Path, overwrite: bool, hint: str, document: str | None) -> None:
    if out.is_dir():
        raise OutputError(f"the output {raw} is a folder, but a file is written here; give a file name{hint}")
    if not os.path.lexists(out) or overwrite:
        return
    if not written_by_stuseg(out):
        raise OutputError(
            f"the file {raw} exists and was not written by stuseg; give a new file name, "
            "or add --overwrite to replace it"
        )
    found = document_kind(out)
    if document is not None and found is not None and found != document:
        raise OutputError(
            f"the file {raw} is a {KINDS.get(found, found)} that stuseg wrote for another result, "
            f"not a {KINDS.get(document, document)}; give a new file name, or add --overwrite to replace it"
        )


def document_kind(path: Path) -> str | None:
    """The kind of stuseg document ``path`` is (``stuseg-labels``, ``stuseg-statistics``, ...,
    from its ``"format"``; gzip is looked into), or None for another file or one without a kind."""
    match = _FORMAT.search(_head(path))
    return match[1].decode() if match else None


def foreign_entries(folder: Path, limit: int | None = None) -> list[str]:
    """What ``folder`` holds that no stuseg run wrote: paths relative to it, sorted.

    Everything counts as foreign when the folder has no valid ``.stuseg-run.json`` marker.

    Args:
        folder: an existing folder.
        limit: stop looking after this many (a user's big data folder need not be walked whole).

    Returns:
        Relative paths (``/``-separated) of files, links and empty folders not in the marker.

    Raises:
        OSError: a folder inside cannot be listed.
    """
    owned = _owned(folder)
    found = []

    def unreadable(exc: OSError) -> None:
        raise exc

    for root, dirs, files in os.walk(folder, onerror=unreadable):
        rel_root = Path(root).relative_to(folder)
        for name in files:
            rel = (rel_root / name).as_posix()
            if rel != MARKER and rel not in owned:
                found.append(rel)
        for name in dirs:
            path = Path(root) / name
            rel = (rel_root / name).as_posix()
            if path.is_symlink() or (not any(path.iterdir()) and rel not in owned):
                found.append(rel)
        dirs[:] = sorted(d for d in dirs if not (Path(root) / d).is_symlink())
        if limit is not None and len(found) >= limit:
            break
    return sorted(found)[:limit]


def _owned(folder: Path) -> set[str]:
    """The files a stuseg run wrote into ``folder``, from its marker; empty if there is none."""
    try:
        doc = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return set()
    if (
        not isinstance(doc, dict)
        or doc.get("format") != MARKER_FORMAT
        or not isinstance(doc.get("files"), list)
    ):
        return set()
    return {f for f in doc["files"] if isinstance(f, str)}


def written_by_stuseg(path: Path) -> bool:
    """Whether file ``path`` says it was written by stuseg (see ``_SIGNATURES``); gzip is looked into.

    Args:
        path: an existing file.

    Returns:
        True if its first 64 KiB (decompressed for ``.gz``) carry a stuseg signature.
    """
    head = _head(path)
    return any(sig in head for sig in _SIGNATURES)


def _head(path: Path) -> bytes:
    """The first 64 KiB of a file (decompressed for ``.gz``); empty if it cannot be read."""
    try:
        if path.name.lower().endswith(".gz"):
            from isal import igzip
            from isal.igzip_lib import IsalError

            try:
                with igzip.open(path, "rb") as fh:
                    return fh.read(_SNIFF_BYTES)
            except IsalError:  # damaged compressed data
                return b""
        with open(path, "rb") as fh:
            return fh.read(_SNIFF_BYTES)
    except (OSError, EOFError, ValueError):  # unreadable or damaged gzip: not recognisably ours
        return b""


# ---------------------------------------------------------------------------------------------
# Staged writing


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"


def _tag() -> str:
    return f"{_host()}-{os.getpid()}-{secrets.token_hex(4)}"


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def clean_leftovers(folder: Path) -> list[Path]:
    """Delete the staged folders and files that killed stuseg processes left in ``folder``.

    Only leftovers of this host whose process no longer runs are touched. On systems without
    POSIX signals (where a liveness check by pid is not available) nothing is removed.

    Args:
        folder: the folder to tidy (the parent of an output).

    Returns:
        The paths removed.
    """
    if os.name != "posix":
        return []
    removed = []
    host = _host()
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return []
    for entry in entries:
        match = _LEFTOVER.fullmatch(entry.name)
        if match is None or match["host"] != host or _alive(int(match["pid"])):
            continue
        with contextlib.suppress(OSError):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            removed.append(entry)
    return removed


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def _write_marker(folder: Path, run: Mapping[str, Any] | None) -> None:
    from stuseg import __version__

    files = sorted(
        (Path(root) / name).relative_to(folder).as_posix()
        for root, _, names in os.walk(folder)
        for name in names
        if not (root == str(folder) and name == MARKER)
    )
    record = dict(run if run is not None else (_RUN.get() or {}))
    doc = {
        "format": MARKER_FORMAT,
        "stuseg_version": __version__,
        "command": record.pop("command", None),
        "options": record.pop("options", {}),
        "inputs": record.pop("inputs", []),
        **record,
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "files": files,
    }
    (folder / MARKER).write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):  # glibc < 2.28, other C libraries
        return False
    at_fdcwd, rename_exchange = -100, 2  # from <fcntl.h> and <linux/fs.h>
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # filesystem or kernel without it
        return False
    raise OSError(code, os.strerror(code), str(b))


def _move_into_place(stage: Path, out: Path) -> None:
    """Make folder ``stage`` be ``out``; a previous ``out`` is replaced as a whole."""
    if not os.path.lexists(out):
        os.rename(stage, out)
        return
    try:
        out.rmdir()  # an empty folder: nothing to keep
    except OSError:
        pass
    else:
        os.rename(stage, out)
        return
    if _exchange(stage, out):  # `stage` now holds the previous result
        shutil.rmtree(stage, ignore_errors=True)
        return
    # Two renames: for a moment `out` is missing; a kill in between leaves both as leftovers.
    aside = out.parent / f"{_REPLACED}-{_tag()}"
    os.rename(out, aside)
    try:
        os.rename(stage, out)
    except BaseException:
        os.rename(aside, out)
        raise
    shutil.rmtree(aside, ignore_errors=True)


@contextlib.contextmanager
def staged_folder(output: str | os.PathLike[str], *, run: Mapping[str, Any] | None = None) -> Iterator[Path]:
    """Write a folder of results that appears complete or not at all.

    Yields a new, empty, hidden sibling folder of ``output`` (same filesystem). When the block
    succeeds, the marker ``.stuseg-run.json`` is written into it and it becomes ``output`` in one
    rename (a previous ``output`` is replaced as a whole; call :func:`check_output` first, which
    refuses folders stuseg did not write). When the block fails or is interrupted (an exception,
    Ctrl-C, SIGTERM turned into an exception by the command line), the staged folder is deleted
    and ``output`` is untouched. Leftovers of killed processes beside ``output`` are removed first.

    Args:
        output: the folder to create or replace (symlinks are followed: the folder they point to
            is replaced).
        run: what to record in the marker (``command``, ``options``, ``inputs``, anything else);
            default: the command recorded by :func:`recording`, if any.

    Yields:
        The staged folder to write into.

    Raises:
        OutputError: the staged folder cannot be created, or an OSError (disk full, permission)
            happened while writing or moving it into place; nothing was written then.
    """
    out = _real(Path(output))
    clean_leftovers(out.parent)
    stage = out.parent / f"{_STAGING}-{_tag()}"
    try:
        stage.mkdir()
    except OSError as exc:
        raise OutputError(f"cannot create a folder in {out.parent}: {_reason(exc)}") from None
    try:
        yield stage
        _write_marker(stage, run)
        _move_into_place(stage, out)
    except OSError as exc:
        _remove(stage)
        raise OutputError(f"cannot write {os.fspath(output)}: {_reason(exc)}; nothing was written") from None
    except BaseException:
        _remove(stage)
        raise


def _statistics_twins(finals: Sequence[Path]) -> list[Path]:
    """The CSV twins of the stuseg statistics files among ``finals`` that this write replaces
    without writing their twin: they would be left describing a file that is gone."""
    wanted = set(finals)
    return [
        f.with_suffix(".csv")
        for f in finals
        if f.suffix.lower() == ".json"
        and f.with_suffix(".csv") not in wanted
        and f.with_suffix(".csv").is_file()
        and f.is_file()
        and document_kind(f) == "stuseg-statistics"
    ]


@contextlib.contextmanager
def staged_files(paths: Sequence[str | os.PathLike[str]]) -> Iterator[list[Path]]:
    """Write several files that belong together (a ``--ml`` file and its sidecars) all or none.

    Yields one hidden temporary sibling per path, whose name ends like the final name (so writers
    that choose a format by suffix, such as ``.nii.gz``, choose the same). When the block
    succeeds, each is renamed to its final path (replacing what was there; call
    :func:`check_output` first); when it fails or is interrupted, they are deleted.

    A result's sidecars go with it: a stuseg statistics file ``X.json`` replaced by something
    else (a label table, under ``--overwrite``) takes its twin ``X.csv`` with it, unless ``X.csv``
    is among ``paths`` (statistics written again). (The reverse keeps what it finds: a label
    table replaced by statistics leaves the segmentation ``X.nii.gz`` and its viewer tables, which
    still describe it; stuseg never deletes a segmentation it was not asked to write.)

    Args:
        paths: the final files.

    Yields:
        The temporary paths, in the order of ``paths``; the block must create every one.

    Raises:
        OutputError: an OSError (disk full, permission) happened while writing or renaming;
            none of the files was written then.
    """
    finals = [_real(Path(p)) for p in paths]
    for parent in {f.parent for f in finals}:
        clean_leftovers(parent)
    orphans = _statistics_twins(finals)
    tag = _tag()
    temps = [f.parent / f"{_STAGING}-{tag}-{f.name}" for f in finals]
    current = os.fspath(paths[0]) if paths else ""
    moved = 0
    try:
        yield temps
        for temp, final, shown in zip(temps, finals, paths):
            current = os.fspath(shown)
            os.replace(temp, final)
            moved += 1
        for twin in orphans:
            current = os.fspath(twin)
            twin.unlink(missing_ok=True)
    except OSError as exc:
        for temp in temps:
            _remove(temp)
        done = "nothing was written" if moved == 0 else f"only {moved} of {len(temps)} files were replaced"
        raise OutputError(f"cannot write {current}: {_reason(exc)}; {done}") from None
    except BaseException:
        for temp in temps:
            _remove(temp)
        raise
