"""The ``stuseg`` command line: parse, call the library, render.

``app`` (the Typer app, its error handling and the entry point ``main``), ``helptext`` (plain
``--help`` text), ``crash`` (what a bug becomes: one line and a report file).
"""

from stuseg.cli.app import app, main

__all__ = ["app", "main"]
