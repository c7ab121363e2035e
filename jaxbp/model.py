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

A description is data: building one imports nothing. The few arguments that name code (a
``CustomVJP`` layer's ``fn`` and ``init``, ``"module:name"`` references) resolve only inside
the modules the reader allows: ``build(..., modules=[...])``, ``--import MODULE`` on the
command line. A model file or checkpoint someone sends you cannot make jaxbp run its code.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from types import ModuleType
from typing import Any

from .errors import ArgumentError, UserError
from .layers import Layer
from .registry import factory, layer_names, references, register_layer

__all__ = [
    "register_layer",
    "layer_names",
    "factory",
    "build",
    "describe",
    "load_description",
    "import_modules",
    "resolve_reference",
    "ReferenceNotAllowedError",
]

# The built-in layer families register themselves when imported, and jaxbp/__init__.py imports
# every one of them (fault injection's "Fault" aside: a testing tool, registered once
# jaxbp.faults is imported), so build knows them all without importing anything itself.


class ReferenceNotAllowedError(ValueError):
    """A description names code (``"module:name"``) in a module its reader did not allow."""


def import_modules(modules=()) -> dict[str, ModuleType]:
    """``{name: module}`` for ``modules`` (names, which are imported now, or module objects):
    the modules whose ``"module:name"`` references a description may use, and whose
    ``register_layer`` calls have run. A name that does not import is one ``ValueError``."""
    if isinstance(modules, (str, ModuleType)):
        modules = (modules,)
    found: dict[str, ModuleType] = {}
    for module in modules:
        if isinstance(module, ModuleType):
            found[module.__name__] = module
            continue
        if not isinstance(module, str) or not module.strip():
            raise ValueError(f"expected a module name (such as mypkg.layers), got {module!r}")
        try:
            found[module] = importlib.import_module(module)
        except ModuleNotFoundError as e:
            missing = f"module {e.name!r}" if e.name else "a module"
            raise ValueError(
                f"cannot import module {module!r}: {missing} was not found "
                f"(is it installed, or on PYTHONPATH?)"
            ) from None
        except Exception as e:  # the module's own code failed: its error is the message
            raise ValueError(
                f"cannot import module {module!r}: importing it raised {type(e).__name__}: {e}"
            ) from None
    return found


def resolve_reference(reference, modules: dict[str, ModuleType], where: str = "reference"):
    """The object a ``"module:name"`` reference names, looked up in ``modules`` only (a dotted
    name walks attributes: ``"mod:Class.method"``); never imports anything. Non-strings are
    returned as they are (a description built in Python may hold the object itself)."""
    if not isinstance(reference, str):
        return reference
    module_name, sep, name = reference.partition(":")
    if not sep or not module_name or not name:
        raise ValueError(
            f"{where}: expected a reference MODULE:NAME (such as mypkg.ops:linear), "
            f"got {reference!r}"
        )
    if module_name not in modules:
        raise ReferenceNotAllowedError(
            f"{where}: {reference!r} names code in module {module_name!r}, which was not "
            f"given; a description never imports code: allow the module with "
            f"--import {module_name} (in Python: build(..., modules=[{module_name!r}]))"
        )
    obj: Any = modules[module_name]
    for part in name.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{where}: module {module_name!r} has no {name!r} ({reference!r})")
        obj = getattr(obj, part)
    return obj


def _encode(value: Any, where: str) -> Any:
    if isinstance(value, Layer):
        return _describe(value, where)
    if isinstance(value, (tuple, list)):
        return [_encode(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if callable(value):
        # A description is data and cannot hold code; writing the function's name would give
        # a description that build() then refuses, so refuse it here, where it can be fixed.
        name = getattr(value, "__name__", repr(value))
        raise ArgumentError(
            f"{where}: cannot describe the function {name!r}: a description holds data, not "
            f"code; use a named choice (such as w_init='glorot' or 'he') to save or describe "
            f"this layer"
        )
    return value


def describe(layer: Layer) -> dict:
    """The JSON-able description of ``layer`` (a whole network nests); ``build`` of it is
    the same layer. A layer holding a function (a custom initialiser) cannot be described:
    one :class:`~jaxbp.errors.ArgumentError` naming where it sits."""
    if not isinstance(layer, Layer):
        raise ArgumentError(f"describe expects a jaxbp Layer, got {type(layer).__name__}")
    return _describe(layer, "model")


def _describe(layer: Layer, where: str) -> dict:
    described = {"name": layer.name}
    for k, v in layer.config:
        # layers of a combinator read as build's errors name them: model.layers[2]
        described[k] = _encode(v, f"{where}.{k}")
    return described


def _is_description(value: Any) -> bool:
    return isinstance(value, dict) and "name" in value


def _decode(value: Any, where: str, modules: dict[str, ModuleType]) -> Any:
    if _is_description(value):
        return _build(value, where, modules)
    if isinstance(value, list):
        if any(_is_description(v) for v in value):
            return [_decode(v, f"{where}[{i}]", modules) for i, v in enumerate(value)]
        return tuple(value)
    return value


def build(description: dict, *, where: str = "model", modules=()) -> Layer:
    """The layer (or network) that ``description`` describes.

    Building imports nothing: a layer's ``"module:name"`` references to code (``CustomVJP``'s
    ``fn`` and ``init``) resolve only inside ``modules``, the modules the caller allows (names,
    imported now, or module objects; the command line's ``--import``). Layers of your own
    are buildable once the module that registers them is imported (``modules`` does that too).

    Errors name the place in the description, what it got and what was expected:
    ``model.layers[2]: unknown layer 'Conv3D'; expected one of: ...``.
    """
    return _build(description, where, import_modules(modules))


def _build(description: dict, where: str, modules: dict[str, ModuleType]) -> Layer:
    if not _is_description(description):
        raise ValueError(
            f"{where}: expected a layer description, a dict with a 'name' key, got {description!r}"
        )
    name = description["name"]
    if name not in layer_names():
        raise ValueError(
            f"{where}: unknown layer {name!r}; expected one of: {', '.join(layer_names())} "
            f"(a layer of your own: --import the module that registers it)"
        )
    code = references(name)
    kwargs = {
        k: resolve_reference(v, modules, f"{where}.{k}")
        if k in code
        else _decode(v, f"{where}.{k}", modules)
        for k, v in description.items()
        if k != "name"
    }
    args = kwargs.pop("layers", ())
    if not isinstance(args, (list, tuple)):
        raise ValueError(f"{where}.layers: expected a list of layer descriptions, got {args!r}")
    try:
        return factory(name)(*args, **kwargs)
    except UserError as e:  # a checked argument: its own message, placed, its own class
        message = str(e)
        raise type(e)(message if message.startswith(where) else f"{where}: {message}") from None
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
