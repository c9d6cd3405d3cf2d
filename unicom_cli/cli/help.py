"""How every command's --help reads: examples at the end, plain usage line, no type noise.

Typer shows ``{input}`` for a required argument in the usage line and ``<bool>`` beside every
flag; ``UnicomCommand`` prints ``INPUT`` and nothing beside flags. ``command_settings`` puts a
command's examples (two or three ``unicom …`` lines) at the end of its help.
"""

from __future__ import annotations

from typing import Any

from typer.core import TyperArgument, TyperCommand, TyperGroup, TyperOption


def _hide_flag_types(params: list[Any]) -> None:
    """A flag takes no value: show no ``<bool>`` beside it."""
    for param in params:
        if isinstance(param, TyperOption) and param.is_flag and param.metavar is None:
            param.metavar = ""


class UnicomCommand(TyperCommand):
    """A Typer command whose help has a plain usage line and no ``<bool>`` beside flags."""

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if isinstance(param, TyperArgument):
                name = (param.metavar or param.name or "").upper()
                name = name if param.required else f"[{name}]"
                pieces.append(name + ("..." if param.nargs != 1 else ""))
        return pieces

    def format_help(self, ctx: Any, formatter: Any) -> None:
        _hide_flag_types(self.get_params(ctx))
        return super().format_help(ctx, formatter)


class UnicomGroup(TyperGroup):
    """The top-level ``unicom --help`` in the same style: no ``<bool>`` beside --version/--help."""

    def format_help(self, ctx: Any, formatter: Any) -> None:
        _hide_flag_types(self.get_params(ctx))
        return super().format_help(ctx, formatter)


def command_settings(examples: list[str]) -> dict[str, Any]:
    """``app.command`` keyword arguments: the Unicom help style and the examples as epilog."""
    lines = "\n\n".join(f"  [cyan]{line}[/]" for line in examples)
    return {"cls": UnicomCommand, "epilog": f"[bold]Examples[/]\n\n{lines}"}
