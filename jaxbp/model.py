"""One model description: a network as JSON-able data, and back.

A description is a dict ``{"name": LAYER, **arguments}``; arguments that are layers are
descriptions themselves (``{"name": "serial", "layers": [...]}``), so networks nest::

    {"name": "serial", "layers": [{"name": "Dense", "out_dim": 64}, {"name": "Relu"},
                                  {"name": "Dense", "out_dim": 10}]}

:func:`build` turns a description into a :class:`~jaxbp.Layer`; :func:`describe` is its inverse
(``build(describe(layer))`` describes the same). A layer's ``name`` is its registered name and
its ``config`` the ``(argument, value)`` pairs its factory was called with, so every layer
registered with :func:`register_layer` is buildable everywhere (``jaxbp train --model``,
checkpoints, ``trace``, ``check``) the moment it is registered.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import layers as _layers
from .layers import Layer

__all__ = ["register_layer", "layer_names", "factory", "build", "describe", "load_description"]

# name -> factory; a factory is called with the description's arguments as keywords, except
# "layers", which is passed positionally (serial(*layers), residual(*layers), ...).
_FACTORIES: dict[str, Callable[..., Layer]] = {}


def register_layer(name: str, factory: Callable[..., Layer] | Layer) -> None:
    """Make ``name`` buildable from a description.

    ``factory`` is a function whose keyword arguments are the layer's ``config`` keys, or a
    ready layer (a parameter-free activation such as ``Tanh``), which is then built as itself.
    """
    if isinstance(factory, Layer):
        layer = factory
        factory = lambda: layer  # a constant layer takes no arguments
    _FACTORIES[name] = factory


def layer_names() -> list[str]:
    """Every registered layer name, sorted."""
    _load_layer_modules()
    return sorted(_FACTORIES)


def factory(name: str) -> Callable[..., Layer]:
    """The registered factory of layer ``name``."""
    _load_layer_modules()
    if name not in _FACTORIES:
        raise ValueError(
            f"unknown layer {name!r}; expected one of: {', '.join(sorted(_FACTORIES))}"
        )
    return _FACTORIES[name]


# The modules whose layers register themselves when imported (after this module exists).
_LAYER_MODULES = ("norm", "conv", "recurrent", "attention", "interop", "faults", "rules")


def _load_layer_modules() -> None:
    import importlib

    for module in _LAYER_MODULES:
        try:
            importlib.import_module(f"{__package__}.{module}")
        except ModuleNotFoundError as e:
            if e.name != f"{__package__}.{module}":
                raise


_CORE_LAYERS: dict[str, Callable[..., Layer] | Layer] = {
    "Dense": _layers.Dense,
    "LeakyRelu": _layers.LeakyRelu,
    "serial": _layers.serial,
    "residual": _layers.residual,
    "concat": _layers.concat,
    **{
        layer.name: layer
        for layer in (
            _layers.Sigmoid,
            _layers.Tanh,
            _layers.Relu,
            _layers.Gelu,
            _layers.Softplus,
            _layers.Identity,
        )
    },
}
for _name, _factory in _CORE_LAYERS.items():
    register_layer(_name, _factory)


def _encode(value: Any) -> Any:
    if isinstance(value, Layer):
        return describe(value)
    if isinstance(value, (tuple, list)):
        return [_encode(v) for v in value]
    if callable(value):  # a custom initialiser: its name (a description cannot hold code)
        return getattr(value, "__name__", "custom")
    return value


def describe(layer: Layer) -> dict:
    """The JSON-able description of ``layer`` (a whole network nests)."""
    if not isinstance(layer, Layer):
        raise TypeError(f"describe expects a jaxbp Layer, got {type(layer).__name__}")
    return {"name": layer.name, **{k: _encode(v) for k, v in layer.config}}


def _is_description(value: Any) -> bool:
    return isinstance(value, dict) and "name" in value


def _decode(value: Any, where: str) -> Any:
    if _is_description(value):
        return build(value, where=where)
    if isinstance(value, list):
        if any(_is_description(v) for v in value):
            return [_decode(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(value)
    return value


def build(description: dict, *, where: str = "model") -> Layer:
    """The layer (or network) that ``description`` describes.

    Errors name the place in the description, what it got and what was expected:
    ``model.layers[2]: unknown layer 'Conv3D'; expected one of: ...``.
    """
    _load_layer_modules()
    if not _is_description(description):
        raise ValueError(
            f"{where}: expected a layer description, a dict with a 'name' key, got {description!r}"
        )
    name = description["name"]
    if name not in _FACTORIES:
        raise ValueError(
            f"{where}: unknown layer {name!r}; expected one of: {', '.join(sorted(_FACTORIES))}"
        )
    kwargs = {k: _decode(v, f"{where}.{k}") for k, v in description.items() if k != "name"}
    args = kwargs.pop("layers", ())
    if not isinstance(args, (list, tuple)):
        raise ValueError(f"{where}.layers: expected a list of layer descriptions, got {args!r}")
    try:
        return _FACTORIES[name](*args, **kwargs)
    except TypeError as e:  # a wrong or missing argument name
        raise ValueError(f"{where}: {name} {_argument_message(e)}") from None
    except ValueError as e:
        message = str(e)
        raise ValueError(message if message.startswith(where) else f"{where}: {message}") from None


def _argument_message(error: TypeError) -> str:
    text = str(error)
    # "Dense() got an unexpected keyword argument 'width'" -> "got an unexpected argument ..."
    return text.split(") ", 1)[1] if ") " in text else text


def load_description(source: str | Path | dict) -> dict:
    """A description from a dict, a JSON string, or a path to a ``.json`` file."""
    if isinstance(source, dict):
        return source
    text = str(source)
    if text.lstrip().startswith("{"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"model description is not valid JSON: {e}") from None
    path = Path(text)
    if not path.is_file():
        raise ValueError(
            f"model file {text!r} does not exist; expected a JSON file holding a layer description"
        )
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"model file {text!r} is not valid JSON: {e}") from None
