"""The argument checkers every layer uses, so that one mistake reads the same in every layer.

Each checker takes ``who`` (the layer, ``"Dense"``), the argument's ``name`` and its value, and
returns the value in the form the layer stores (a Python ``int``, ``bool``, ``float``, a dtype
name), or raises one :class:`~jaxbp.errors.ArgumentError` saying what was given and what was
expected: ``Dense expects a positive integer out_dim, got 2.5``.

They run in plain Python when a layer is constructed, so a model file's ``"shared_bias":
"yes"`` or ``"b_init": NaN`` fails when the model is built, not silently or deep inside JAX.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any

import numpy as np

from .errors import ArgumentError

__all__ = [
    "positive_int",
    "non_negative_int",
    "flag",
    "number",
    "float_dtype",
    "initialiser",
    "init_value",
]


def _is_int(value) -> bool:
    # bool is an int to Python, never a size to a user: True as out_dim is a mistake.
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def positive_int(who: str, name: str, value) -> int:
    """``value`` as an ``int`` if it is an integer >= 1."""
    if not _is_int(value) or value < 1:
        raise ArgumentError(f"{who} expects a positive integer {name}, got {value!r}")
    return int(value)


def non_negative_int(who: str, name: str, value) -> int:
    """``value`` as an ``int`` if it is an integer >= 0."""
    if not _is_int(value) or value < 0:
        raise ArgumentError(f"{who} expects a non-negative integer {name}, got {value!r}")
    return int(value)


def flag(who: str, name: str, value) -> bool:
    """``value`` if it is a bool: ``"yes"``, ``2`` or ``[True]`` are mistakes, not truthy."""
    if not isinstance(value, (bool, np.bool_)):
        raise ArgumentError(f"{who} expects {name} to be True or False, got {value!r}")
    return bool(value)


def number(
    who: str,
    name: str,
    value,
    *,
    check: Callable[[float], bool] | None = None,
    expect: str = "a finite number",
) -> float:
    """``value`` as a ``float`` if it is a finite real number for which ``check`` holds.

    ``expect`` says what a valid value is, for the message: ``"in [0, 1)"``.
    """
    ok = (
        isinstance(value, numbers.Real)
        and not isinstance(value, (bool, np.bool_))
        and math.isfinite(value)
        and (check is None or check(float(value)))
    )
    if not ok:
        raise ArgumentError(f"{who} expects {name} {expect}, got {value!r}")
    return float(value)


def float_dtype(who: str, dtype) -> str | None:
    """The name of a floating dtype (``"float32"``), or ``None`` for JAX's default float."""
    if dtype is None:
        return None
    try:
        dt = np.dtype(dtype)
    except TypeError:
        dt = None
    if dt is None or not np.issubdtype(dt, np.floating):
        raise ArgumentError(
            f"{who} expects dtype to be None or a floating dtype such as 'float32', got {dtype!r}"
        )
    return dt.name


def initialiser(who: str, name: str, value, names) -> Any:
    """``value`` if it is one of ``names`` (``"glorot"``, ``"he"``) or a function
    ``(key, shape, dtype) -> array``."""
    if (isinstance(value, str) and value in names) or (
        callable(value) and not isinstance(value, (str, type))
    ):
        return value
    choices = ", ".join(repr(n) for n in names)
    raise ArgumentError(
        f"{who} {name} must be {choices} or a function (key, shape, dtype) -> array, got {value!r}"
    )


def init_value(who: str, name: str, value) -> Any:
    """``value`` if it is a finite number (every entry starts at it) or an initialiser
    function; a number is returned as a ``float``."""
    if callable(value) and not isinstance(value, type):
        return value
    return number(who, name, value, expect="to be a finite number or a function")
