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
    "nonnegative_int",
    "positive_number",
    "nonnegative_number",
    "probability",
    "seed",
    "widths",
    "numbers",
    "output_path",
    "model",
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


def nonnegative_int(text: str) -> int:
    """An integer >= 0."""
    return _integer(text, 0, math.inf, "an integer >= 0")


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


def output_path(text: str) -> str:
    """A path a command will write: not an existing folder, in a folder that is not a file."""
    if not text:
        _fail("expected a file path, got ''")
    if os.path.isdir(text):
        _fail(f"{text!r} is a folder; expected a file path")
    parent = os.path.dirname(text)
    if parent and os.path.exists(parent) and not os.path.isdir(parent):
        _fail(f"{parent!r} is a file, not a folder: cannot write {text!r}")
    return text


def model(text: str) -> str:
    """A model: a preset name, a JSON file (checked to exist) or a JSON string. Built later,
    where the description's errors name the place in it."""
    text = text.strip()
    if not text:
        _fail("expected a preset name or a JSON model file, got ''")
    if text.endswith(".json") and not os.path.isfile(text):
        _fail(f"model file {text!r} does not exist")
    return text
