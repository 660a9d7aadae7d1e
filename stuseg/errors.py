"""Errors that stuseg raises for problems a user can fix, and reading a user's text file into one.

Library code raises these; only the command line turns them into one line on stderr and a
non-zero exit status. Messages are complete sentences without a trailing period, written so
that the user knows what to do next.
"""

from __future__ import annotations

from pathlib import Path

__all__ = [
    "InputError",
    "LabelError",
    "OutputError",
    "StusegError",
    "StusegWarning",
    "WeightsError",
    "read_user_text",
]


class StusegError(Exception):
    """Base class: the message is meant for the user, as is."""


class InputError(StusegError):
    """The input image, folder or segmentation cannot be used."""


class LabelError(StusegError):
    """An unknown structure or group name, or an invalid label map."""


class WeightsError(StusegError):
    """Weights cannot be found, downloaded, verified or loaded."""


class OutputError(StusegError):
    """The output path cannot be written as asked."""


class StusegWarning(UserWarning):
    """Something in the input is unusual but usable; the result may need a second look."""


def read_user_text(path: Path, what: str, error: type[StusegError] = InputError) -> str:
    """The text of a file the user named (a list, codes or label table), a byte-order mark dropped.

    Raises:
        ``error`` (InputError unless given): one line, "cannot read the ``what`` ``path``: why".
    """
    try:
        return Path(path).read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"cannot read the {what} {path}: {getattr(exc, 'strerror', None) or exc}") from None
