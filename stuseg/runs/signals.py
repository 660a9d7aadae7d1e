"""Ctrl-C and SIGTERM during a batch: the first unwinds it cleanly, the second ends it at once."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from typing import Any

__all__ = [
    "Interrupted",
    "signals_interrupt",
]


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM during a batch; ``signum`` says which."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def signals_interrupt() -> Iterator[None]:
    """Turn the first SIGINT or SIGTERM into ``Interrupted`` in the main thread; exit at the second.

    The first signal unwinds the batch cleanly (the case in flight is dropped and its staged
    output deleted); a second one, while that happens, ends the process at once with status
    128 + signal number (staged leftovers are then removed by the next run). For programs that
    exist to run a batch (the command line): it replaces the handlers while the block runs.
    """
    import signal

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    seen: list[int] = []

    def handler(signum: int, frame: Any) -> None:
        if seen:
            os._exit(128 + signum)
        seen.append(signum)
        raise Interrupted(signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
