"""The layer registry: a layer's registered name -> the factory that makes it.

Every layer family registers its layers here when its module is imported (a top import of
:func:`register_layer`, the calls at the bottom of the module, after the factories exist);
:func:`jaxbp.model.build` looks them up. This module imports nothing of jaxbp, so any module can
register without an import loop.

A factory argument may hold code: ``CustomVJP``'s ``fn`` and ``init`` are ``"module:name"``
references. Its registration names those arguments (``references=("fn", "init")``), and
:func:`jaxbp.model.build` resolves them itself, only inside the modules its caller allowed,
before the factory sees them: reading a description never imports a module.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from .errors import ArgumentError

__all__ = ["register_layer", "layer_names", "factory", "references", "Registered"]


class Registered(NamedTuple):
    """A registered layer: its factory, and which of its arguments are code references."""

    factory: Callable[..., Any]
    references: tuple[str, ...] = ()


_REGISTRY: dict[str, Registered] = {}


def register_layer(name: str, factory: Callable[..., Any] | Any, *, references=()) -> None:
    """Make ``name`` buildable from a description.

    ``factory`` is a function whose keyword arguments are the layer's ``config`` keys, or a
    ready layer (a parameter-free activation such as ``Tanh``), which is then built as itself.
    ``references`` names the arguments that hold ``"module:name"`` references to code.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"register_layer expects a non-empty layer name, got {name!r}")
    if not callable(factory):
        if not all(hasattr(factory, f) for f in ("init", "forward", "backward")):
            raise ArgumentError(
                f"register_layer({name!r}, ...) expects a factory function or a jaxbp Layer, "
                f"got {type(factory).__name__}"
            )
        layer = factory
        factory = lambda: layer  # a constant layer takes no arguments
    if isinstance(references, str):
        references = (references,)
    _REGISTRY[name] = Registered(factory, tuple(references))


def layer_names() -> list[str]:
    """Every registered layer name, sorted."""
    return sorted(_REGISTRY)


def _registered(name: str) -> Registered:
    if name not in _REGISTRY:
        raise ValueError(f"unknown layer {name!r}; expected one of: {', '.join(layer_names())}")
    return _REGISTRY[name]


def factory(name: str) -> Callable[..., Any]:
    """The registered factory of layer ``name``."""
    return _registered(name).factory


def references(name: str) -> tuple[str, ...]:
    """The arguments of layer ``name`` that hold ``"module:name"`` references to code."""
    return _registered(name).references
