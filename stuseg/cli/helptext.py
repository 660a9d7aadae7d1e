"""Plain ``--help`` text for the command line: argument names as the user types them.

Typer (0.2x) writes a required argument as ``{INPUT}`` in the usage line and adds a Python type to
every argument and to options without a metavar (``INPUT <str>``, ``SOURCE <list[Path]>``,
``--size <str>``). ``App`` is a ``typer.Typer`` whose commands use ``PlainHelpCommand``, which
writes the usage line the way Click does (``INPUT``, ``[NAME]``, ``SOURCE...``), an argument's
name without its type, and an option without a metavar with its name in capitals. Choices stay as
Typer writes them (``<final|best>``): they tell the user what to type.
"""

from __future__ import annotations

import re
from typing import Any

import typer
from typer.core import TyperCommand

__all__ = ["App", "PlainHelpCommand"]

_TYPE_SUFFIX = re.compile(r" <[^>|]*>$")  # " <str>", " <float range>"; not " <final|best>"


def _argument_name(param: Any) -> str:
    name = param.metavar or (param.name or "").upper()
    return f"{name}..." if param.nargs != 1 else name


class PlainHelpCommand(TyperCommand):
    """A Typer command whose help names arguments and options as the user types them."""

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if param.param_type_name == "argument":
                name = _argument_name(param)
                pieces.append(name if param.required else f"[{name}]")
        return pieces

    def format_options(self, ctx: Any, formatter: Any) -> None:
        # ctx, formatter: the Click objects Typer passes (Typer 0.2x vendors Click as typer._click)
        arguments, options = [], []
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is None:
                continue
            name, text = record
            if param.param_type_name == "argument":
                arguments.append((_argument_name(param), text))
            else:
                if param.metavar is None and _TYPE_SUFFIX.search(name):
                    name = _TYPE_SUFFIX.sub(f" {(param.name or '').upper()}", name)
                options.append((name, text))
        if arguments:
            with formatter.section("Arguments"):
                formatter.write_dl(arguments)
        if options:
            with formatter.section("Options"):
                formatter.write_dl(options)


class App(typer.Typer):
    """``typer.Typer`` whose commands are ``PlainHelpCommand`` unless a command asks for another,
    with stuseg's settings: help when called bare, no shell completion, no rich tracebacks or
    markup (errors are one line, ``stuseg.cli.base.user_errors``)."""

    def __init__(self, name: str, help: str) -> None:
        super().__init__(
            name=name,
            help=help,
            no_args_is_help=True,
            add_completion=False,
            pretty_exceptions_enable=False,
            rich_markup_mode=None,
        )

    def command(self, *args: Any, cls: type[TyperCommand] | None = None, **kwargs: Any) -> Any:
        return super().command(*args, cls=cls or PlainHelpCommand, **kwargs)
