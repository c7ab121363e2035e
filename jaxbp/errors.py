"""The errors that mean "the caller asked for something wrong", one class per kind of mistake.

Everything jaxbp raises for a mistake its caller can fix is a :class:`UserError`; the command
line prints those as one line with exit code 2, and reports anything else as a bug in jaxbp.
Each class also derives from the built-in exception Python code expects for that mistake
(``ValueError``, ``TypeError``), so ``except ValueError`` written before these classes existed
still catches what it caught.
"""

from __future__ import annotations

__all__ = ["UserError", "ArgumentError", "InputShapeError"]


class UserError(Exception):
    """A mistake in what the caller asked for (an argument, a file, a flag): theirs to fix."""


class ArgumentError(UserError, TypeError, ValueError):
    """A layer or function argument of the wrong type or value: a size that is not a positive
    integer, a flag that is not a bool, a number that is not finite, a dtype that is not
    floating point, an initialiser jaxbp does not know.

    Both a ``TypeError`` and a ``ValueError``: layers used to raise one or the other for the
    same mistake, and callers catching either keep working; new code catches this class.
    """


class InputShapeError(UserError, ValueError):
    """A layer's own check on the shape of its input failed (``Dense`` of the wrong width).

    A ``ValueError``; its own type lets ``check_params`` tell "the inputs do not fit the first
    layer" from any other shape error.
    """
