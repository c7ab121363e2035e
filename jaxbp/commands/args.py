"""Argument types shared by every command: one parser per kind of value.

Each is an ``argparse`` ``type=``: it returns the parsed value or raises
``argparse.ArgumentTypeError`` with the one line the user sees. Nothing heavy is imported
here, so ``jaxbp <command> --help`` stays fast.
"""

from __future__ import annotations

import argparse
import math
import os
from typing import NoReturn

__all__ = [
    "positive_int",
    "positive_number",
    "nonnegative_number",
    "probability",
    "seed",
    "widths",
    "numbers",
    "model",
    "module_name",
    "add_import_argument",
]


def _fail(message: str) -> NoReturn:
    raise argparse.ArgumentTypeError(message)


def _integer(text: str, low: int, high: float, expected: str, not_int: str = "") -> int:
    """``int(text)`` when ``low <= value < high``; otherwise the error ``expected {expected}``
    (``expected {not_int}`` for text that is no integer, when given)."""
    try:
        value = int(text)
    except ValueError:
        _fail(f"expected {not_int or expected}, got {text!r}")
    if not low <= value < high:
        _fail(f"expected {expected}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1."""
    return _integer(text, 1, math.inf, "a positive integer")


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        _fail(f"expected a number, got {text!r}")


def positive_number(text: str) -> float:
    """A finite number > 0."""
    value = _number(text)
    if not math.isfinite(value) or value <= 0:
        _fail(f"expected a positive finite number, got {text!r}")
    return value


def nonnegative_number(text: str) -> float:
    """A finite number >= 0."""
    value = _number(text)
    if not math.isfinite(value) or value < 0:
        _fail(f"expected a finite number >= 0, got {text!r}")
    return value


def probability(text: str) -> float:
    """A number in [0, 1]."""
    value = _number(text)
    if not 0.0 <= value <= 1.0:
        _fail(f"expected a probability in [0, 1], got {text!r}")
    return value


def seed(text: str) -> int:
    """A seed: an integer in [0, 2**32), the range of :func:`jaxbp.training.check_seed` (which
    this does not call: it would import JAX)."""
    return _integer(text, 0, 2**32, "a seed in [0, 2**32)", not_int="an integer seed")


def widths(
    minimum: int = 1, example: str = "128,128", what: str = "comma-separated positive layer widths"
):
    """Comma-separated positive integers, at least ``minimum`` of them; ``what`` names them
    in the error."""

    def parse(text: str) -> tuple:
        try:
            values = tuple(int(p.strip()) for p in text.split(","))
        except ValueError:
            values = ()
        if len(values) < minimum or any(v < 1 for v in values):
            _fail(f"expected {what} such as {example}, got {text!r}")
        return values

    return parse


def numbers(text: str) -> tuple:
    """Comma-separated positive finite numbers (learning rates)."""
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        _fail(f"expected comma-separated learning rates such as 0.05,0.5,5, got {text!r}")
    if not values:
        _fail(f"expected at least one learning rate, got {text!r}")
    bad = [v for v in values if not math.isfinite(v) or v <= 0]
    if bad:
        _fail(f"learning rates must be positive finite numbers, got {bad[0]!r} in {text!r}")
    return values


def model(text: str) -> str:
    """A model: a preset name, a JSON file (checked to exist) or a JSON string. Built later,
    where the description's errors name the place in it."""
    text = text.strip()
    if not text:
        _fail("expected a preset name or a JSON model file, got ''")
    if text.endswith(".json") and not os.path.isfile(text):
        _fail(f"model file {text!r} does not exist")
    return text


def module_name(text: str) -> str:
    """A Python module name (``mypkg.layers``): dotted identifiers, not a file path."""
    text = text.strip()
    if not text or not all(part.isidentifier() for part in text.split(".")):
        _fail(f"expected a Python module name such as mypkg.layers, got {text!r}")
    return text


def add_import_argument(parser: argparse.ArgumentParser) -> None:
    """``--import MODULE`` (repeatable): the one way code reaches a command besides jaxbp's
    own. The command line imports each module before the command runs (``jaxbp.cli``), so its
    ``register_layer`` calls have run; a model's ``"module:name"`` references may name code in
    these modules and in no other: reading a model file or a checkpoint imports nothing."""
    parser.add_argument(
        "--import",
        dest="imports",
        action="append",
        default=[],
        type=module_name,
        metavar="MODULE",
        help="import MODULE first (repeatable; it must be on PYTHONPATH): the layers it "
        'registers become usable in --model, and the model\'s "module:name" references may '
        "name code in it (a model file or checkpoint never imports anything by itself)",
    )
