"""The ``stuseg`` command line: parse, call the library, render.

``commands`` (the table of commands and the entry point ``main``), ``base`` (the Typer app
and what wraps every command), ``options`` (the options predict and batch share), ``render``
(what commands print), ``predict``, ``batch``, ``tools``, ``models`` (one group of commands
each), ``helptext`` (plain ``--help`` text). A bug becomes one line and a report file
through ``stuseg.crash``.
"""

from __future__ import annotations

from stuseg._moved import forwarding

__all__ = ["app", "main"]


# ``app`` and ``main`` of ``stuseg.cli.commands``, imported on first use, so that a command module
# (``stuseg.cli.finetune``) can import ``stuseg.cli.base`` without the table of every command.
__getattr__ = forwarding(__name__, "stuseg.cli.commands", __all__)
