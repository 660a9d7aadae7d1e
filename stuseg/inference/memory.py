"""The process's memory: how glibc's malloc serves stuseg's large blocks, trims, and peak RSS.

Every tile of the sliding window allocates and frees gigabytes of activations. By default
glibc serves blocks this large with fresh ``mmap()``s, so the kernel page-faults and zeroes
each one again; on a few CPU cores that makes every tile far slower (a 122 x 101 x 30 CT, small
model, 2 cores: 18.7 s in the network against 11.4 s with the blocks kept in the heap;
benchmarks/RESULTS.md). Serving them from the heap and never trimming it on its own keeps the
pages; ``release_free_memory`` then trims between stages.

Two ways to get that:

- ``tune_process``: for a process that exists to run stuseg (the command line, a batch, a Ray
  worker), for good. glibc has no way to read its settings back, so this cannot be undone.
- ``tuned``: what ``stuseg.Segmenter`` (and so ``stuseg.segment``) does around its work on the
  CPU when the process has not chosen for good: the same settings while a call runs, then
  glibc's defaults back (``M_MMAP_MAX`` 65536, ``M_TRIM_THRESHOLD`` 128 KiB) and the free pages
  returned. Two things differ for the host afterwards: glibc's dynamic growth of its mmap
  threshold stays off (at the value it had), and a later large block of the host's may be
  carved from the heap space the call left free (no more memory than before, but handed back to
  the system at the next trim rather than when it is freed). A host application that tunes
  malloc itself, or wants neither, sets ``STUSEG_TUNE_MALLOC=0`` and stuseg leaves malloc alone.

Only glibc (Linux) is tuned; elsewhere these are no-ops. Importing this module imports nothing
heavy.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Iterator
from typing import Any

__all__ = [
    "HOLD_VOXELS",
    "OPT_OUT",
    "peak_rss_bytes",
    "release_free_memory",
    "tune_process",
    "tuned",
]

OPT_OUT = "STUSEG_TUNE_MALLOC"  # set to 0 and library calls leave malloc alone

# From glibc's malloc.h, and the defaults its malloc.c starts with.
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
DEFAULT_TRIM_THRESHOLD, DEFAULT_MMAP_MAX = 128 * 1024, 65536

# 256^3 input voxels. Below it, a batch keeps the pages between images and skips 1-2 s of page
# faults an image; above it, they are given back: untrimmed, a batch of four 512x512x300 CTs
# grew to 1.51x the single-image peak RSS, against 1.08x trimmed, and for images that large the
# faults cost little beside the network (benchmarks/RESULTS.md, 2026-12-03).
HOLD_VOXELS = 256**3

# Set by tune_process(many_images=True): release_free_memory then keeps the pages of images up
# to HOLD_VOXELS.
_hold_free_pages = False
# Whether the process chose the settings for good (then ``tuned`` has nothing to do).
_process_tuned = False
# Library calls in progress inside ``tuned``, over all threads; the settings hold while > 0.
_depth = 0
_lock = threading.Lock()


def _heap_settings(libc: Any) -> bool:
    """Large blocks from the heap (no mmap), and no trimming by malloc itself."""
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def tune_process(*, many_images: bool = False) -> bool:
    """Serve large blocks from the heap and keep freed pages, for the rest of the process.

    Args:
        many_images: the process segments image after image (``stuseg batch``, a Ray worker):
            ``release_free_memory`` then keeps the pages after images of up to ``HOLD_VOXELS``,
            so the next image reuses them instead of faulting them in again (1-2 s an image on a
            2-core VM). Larger images are trimmed after every stage: for them the faults cost
            little and the trims bound the batch's RSS.

    Returns:
        Whether the setting took effect (glibc on Linux).
    """
    global _hold_free_pages, _process_tuned
    libc = _glibc()
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    kept = _heap_settings(libc)
    _process_tuned = _process_tuned or kept
    _hold_free_pages = kept and many_images
    return kept


@contextlib.contextmanager
def tuned() -> Iterator[None]:
    """The settings of ``tune_process`` while the block runs, then glibc's defaults and a trim.

    Nested and concurrent blocks (a batch's stages in several threads) share one tuning, set
    by the first to enter and undone by the last to leave. Does nothing where the process chose
    for good (``tune_process``), where ``STUSEG_TUNE_MALLOC=0``, or without glibc.
    """
    global _depth
    libc = None if os.environ.get(OPT_OUT, "").strip() == "0" else _glibc()
    if libc is None or not hasattr(libc, "mallopt"):
        yield
        return
    with _lock:
        if not _process_tuned and _depth == 0:
            _heap_settings(libc)
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if not _process_tuned and _depth == 0:
                libc.mallopt(M_MMAP_MAX, DEFAULT_MMAP_MAX)
                libc.mallopt(M_TRIM_THRESHOLD, DEFAULT_TRIM_THRESHOLD)
                with contextlib.suppress(AttributeError):
                    libc.malloc_trim(0)


def release_free_memory(voxels: int | None = None) -> None:
    """Return free heap pages to the kernel (glibc ``malloc_trim``) between stages.

    With the heap kept (``tune_process``, ``tuned``), memory freed by one stage (the float64
    spline coefficients of preprocessing) would still count in RSS while the next (the row
    accumulator) grows the heap elsewhere.

    Args:
        voxels: the input voxels of the image the stage worked on. In a process that asked
            ``tune_process(many_images=True)``, an image of at most ``HOLD_VOXELS`` keeps the
            pages for the next one (nothing is done).
    """
    if _hold_free_pages and voxels is not None and voxels <= HOLD_VOXELS:
        return
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


def peak_rss_bytes() -> int | None:
    """The process's peak resident memory so far in bytes; None where the OS does not say.

    ``resource`` is Unix-only (imported here, not at module level, so that stuseg imports
    everywhere); Linux reports kilobytes, macOS bytes.
    """
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if sys.platform.startswith("linux"):
        return peak * 1024
    if sys.platform == "darwin":
        return peak
    return None
