"""Errors that stuseg raises for problems a user can fix.

Library code raises these; only the command line turns them into one line on stderr and a
non-zero exit status. Messages are complete sentences without a trailing period, written so
that the user knows what to do next.
"""

__all__ = ["InputError", "LabelError", "OutputError", "StusegError", "StusegWarning", "WeightsError"]


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
