"""The ``jaxbp`` command line: a thin dispatcher over one module per command.

Each command lives in ``jaxbp/commands/<name>.py`` (its one-line help in :data:`COMMANDS`) and
exposes

- ``add_arguments(parser)``: its flags, on an ``argparse`` parser,
- ``run(args) -> int``: the work; returns the exit code.

Command modules are imported only when their command runs, so ``jaxbp --help`` stays fast and
heavy extras (matplotlib, scikit-learn) load only where they are used.

A missing optional extra (scikit-learn, mnist1d, matplotlib, rich) is one line too, naming the
package and the extra that installs it: ``jaxbp train --dataset digits needs scikit-learn: pip
install 'jaxbp[data]'``, exit code 2.

Errors a user can fix (a bad flag, a bad config file, a wrong shape) are a
:class:`~jaxbp.errors.UserError` (:class:`UsageError` here, ``ArgumentError`` and
``InputShapeError`` from the library), a ``ValueError`` from the library, an ``OSError`` (a file
that is not there) or a file that is not JSON. They are printed as one line, ``jaxbp <command>:
error: ...``, with exit code 2: never a traceback (set ``JAXBP_DEBUG=1`` to see one).

Anything else (a ``KeyError``, a ``TypeError`` that is not an ``ArgumentError``, ...) is a bug in
jaxbp, not the user's mistake, and says so: one line asking for a report, exit code 1.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

from .errors import UserError

__all__ = ["main", "UsageError", "COMMANDS"]

# name -> (module, one-line help). Help text lives here so `jaxbp --help` imports nothing heavy.
COMMANDS = {
    "trace": ("jaxbp.commands.trace", "the worked example: every number of the chain rule"),
    "train": ("jaxbp.commands.train", "train a network on real data, every step checked"),
    "check": ("jaxbp.commands.check", "manual vs jax.grad vs finite differences, per parameter"),
    "lr-sweep": ("jaxbp.commands.lr_sweep", "one network at several learning rates, one plot"),
    "bench": ("jaxbp.commands.bench", "speed: manual vs autodiff vs numpy, as ratios"),
    "generate": ("jaxbp.commands.generate", "sample text from a trained character-level GPT"),
}


# top-level module -> (package to install, the jaxbp extra that brings it)
EXTRAS = {
    "sklearn": ("scikit-learn", "data"),
    "mnist1d": ("mnist1d", "data"),
    "matplotlib": ("matplotlib", "plot"),
    "rich": ("rich", "cli"),
}


class UsageError(UserError):
    """A mistake in what the user asked for on the command line: one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    command_prog = None  # "jaxbp <command>" once the command is known (set by main)

    def error(self, message):  # argparse's own errors: one line, exit 2, as everywhere else
        # Unrecognised arguments are reported by the top-level parser: name the command all
        # the same; and a stray argument holding a newline must not make a second line.
        self.exit(2, f"{self.command_prog or self.prog}: error: {_one_line(message)}\n")


def _build_parser(command: str | None):
    parser = _Parser(prog="jaxbp", description="Explicit, verified backpropagation in JAX.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            importlib.import_module(module).add_arguments(p)
    return parser


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return " ".join(text.split())


def _missing_extra(error: BaseException | None) -> str | None:
    """``"scikit-learn: pip install 'jaxbp[data]'"`` if ``error`` is a missing optional extra."""
    seen = set()
    while error is not None and id(error) not in seen:  # MissingDependencyError wraps it
        seen.add(id(error))
        name = (getattr(error, "name", None) or "").split(".")[0]
        if name in EXTRAS:
            package, extra = EXTRAS[name]
            return f"{package}: pip install 'jaxbp[{extra}]'"
        error = error.__cause__ or error.__context__
    return None


def _what(argv: list[str], command: str) -> str:
    """``"jaxbp train --dataset digits"``: the command and the flag that chose the extra."""
    flags = [a for a in argv if a.startswith("--dataset") or a.startswith("--plot")]
    if flags and "=" not in flags[0] and argv.index(flags[0]) + 1 < len(argv):
        flags = [flags[0], argv[argv.index(flags[0]) + 1]]
    return " ".join(["jaxbp", command, *flags[:2]])


def _import_user_modules(names) -> None:
    """``--import MODULE``: the user's modules, imported before the command reads any model,
    so that their ``register_layer`` calls have run (a model file or checkpoint never imports
    anything by itself)."""
    if not names:
        return
    from .model import import_modules

    for name in names:
        try:
            import_modules([name])
        except ValueError as e:
            raise UsageError(f"--import {name}: {e}") from None


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``jaxbp`` console script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    if command is not None and command not in COMMANDS:
        command = None  # let argparse report the unknown command
    parser = _build_parser(command)
    parser.command_prog = f"jaxbp {command}" if command else None
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    if args.command is None:
        parser.print_help()
        return 0
    module = importlib.import_module(COMMANDS[args.command][0])
    try:
        _import_user_modules(getattr(args, "imports", None) or ())
        return int(module.run(args) or 0)
    except (UserError, ValueError, OSError, json.JSONDecodeError) as e:
        # ValueError: most of the library's checks on what it was given still raise it plainly
        # (jaxbp.errors.UserError is the class they move to).
        if os.environ.get("JAXBP_DEBUG"):  # developers: the full traceback
            raise
        print(f"jaxbp {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except ImportError as e:
        missing = _missing_extra(e)
        if missing is None or os.environ.get("JAXBP_DEBUG"):
            raise
        print(f"{_what(argv, args.command)} needs {missing}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"jaxbp {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        # Not a mistake the user can fix: a bug, reported as one, never as "error: 'name'".
        if os.environ.get("JAXBP_DEBUG"):
            raise
        print(
            f"jaxbp {args.command}: internal error (a bug in jaxbp, please report it): "
            f"{type(e).__name__}: {_one_line(e)} (run with JAXBP_DEBUG=1 for the traceback)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
