"""The STU-Net sizes by name: ``small``, ``base``, ``large``, ``huge`` and their first letters.

One definition for the network's table (``stuseg.model.network.SIZES``, in this order), the
weights manifest and the command line. Importing this module imports nothing heavy (no torch),
so that reading the manifest or parsing ``--size`` stays fast.
"""

from __future__ import annotations

from stuseg.errors import WeightsError

__all__ = ["SIZE_NAMES", "canonical_size"]

SIZE_NAMES = ("small", "base", "large", "huge")


def canonical_size(name: str) -> str:
    """Map ``small``/``S``/``Base``/... to one of ``SIZE_NAMES``.

    Args:
        name: a size name or its first letter, in any case, spaces around it ignored.

    Returns:
        The canonical size name.

    Raises:
        WeightsError: the name is not a size (no published weights have it); the message lists
            the valid ones.
    """
    key = name.strip().lower()
    key = {n[0]: n for n in SIZE_NAMES}.get(key, key)
    if key not in SIZE_NAMES:
        valid = ", ".join(f"{n} ({n[0].upper()})" for n in SIZE_NAMES)
        raise WeightsError(f"unknown model size {name!r}; valid sizes: {valid}")
    return key
