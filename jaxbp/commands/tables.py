"""How commands print tables: a ``rich`` console, and the pieces the gradient checks share.

``rich`` is imported when a table is printed, not when the command starts.
"""

from __future__ import annotations

import sys

__all__ = ["console", "shape_text", "ok_text", "print_check_verdict"]


def console():
    """A ``rich`` console on stdout: the terminal's width, or 110 columns for a pipe or a file,
    so the table reads the same in a log."""
    from rich.console import Console

    return Console(file=sys.stdout, width=None if sys.stdout.isatty() else 110)


def shape_text(shape) -> str:
    """``3x4``, or ``scalar`` for ``()``."""
    return "x".join(map(str, shape)) or "scalar"


def ok_text(ok: bool) -> str:
    return "[green]yes[/]" if ok else "[red bold]NO[/]"


def print_check_verdict(out, dtype: str, pair: str, ok: bool, verdict: str) -> None:
    """The closing lines of a three-way gradient check on console ``out``: the tolerances for
    ``dtype`` (``pair`` names the manual-vs-autodiff comparison) and the verdict."""
    from ..gradcheck import default_tolerance, fd_tolerance

    rtol, _ = default_tolerance(dtype)
    fd_rtol, _ = fd_tolerance(dtype)
    out.print(
        f"tolerances ({dtype}): {pair} {rtol:g}, against finite differences {fd_rtol:g}",
        highlight=False,
    )
    out.print(("[green]" if ok else "[red bold]") + verdict + "[/]", highlight=False)
