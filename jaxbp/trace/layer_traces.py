"""Worked examples for single layers beyond Dense: ``jaxbp trace --example`` / ``--model``.

A *layer trace file* is JSON naming one layer and its numbers::

    {"model": {"name": "Conv1D", "out_channels": 1, "kernel_size": 3, "stride": 2},
     "params": {"W": [[[0.5]], [[-1.0]], [[0.25]]], "b": [0.1]},
     "inputs": [1.0, 2.0, -1.0, 0.5, 3.0],
     "targets": [0.0, 1.0]}

``model`` is a model description (:mod:`jaxbp.model`); a file that is only a description
(``{"name": "Conv1D", ...}``) is read as ``{"model": ...}``. Missing ``inputs``/``targets``
take the built-in example's of the same layer kind (when their shapes fit), missing ``params``
the layer's own ``init`` with key 0, rounded to two places so the arithmetic stays readable.
Conv1D inputs/targets with one channel may be plain lists.

The traced layer runs forward and its own hand-written ``backward`` in float64; the loss is
half the squared error against ``targets`` (``E = 1/2 sum (y - t)^2``, so ``dE/dy = y - t``).
Every printed total is the layer's number, re-added from the printed terms (a mismatch is a
bug and raises), and compared with ``jax.grad`` of the same loss.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, NamedTuple

import numpy as np

from .config import ConfigError
from .notation import computed
from .render import FORMATS, Paragraph, Section, Table, render_markdown, render_text

__all__ = [
    "EXAMPLES",
    "TRACEABLE_LAYERS",
    "LayerStep",
    "TracedLayer",
    "as_columns",
    "autodiff_gradients",
    "check_section",
    "checked_total",
    "example_spec",
    "float64",
    "half_sse",
    "layer_step",
    "load_trace_file",
    "nested_array",
    "parse_trace_spec",
    "spec_layer",
    "sum_line",
    "trace_example",
    "trace_file",
    "trace_layer",
    "traced_layer",
]

_TOP_KEYS = ("model", "params", "inputs", "targets")
# kind -> the layer name it traces; kinds are the --example names
TRACEABLE_LAYERS = {
    "conv": "Conv1D",
    "attention": "MultiHeadAttention",
    "gru": "GRU",
    "tied": "tied",
    "llama": "tied",  # a tied network that starts with an Embedding (_starts_with_embedding)
}
SUM_TOLERANCE = 1e-10  # printed terms re-added vs the layer's own total (float64)


@dataclasses.dataclass(frozen=True)
class TracedLayer:
    """One traced step of one layer: the trace file it came from (``spec``, JSON values), every
    number (``numbers``, JSON values), the document, and the manual / jax.grad gradients
    (``manual``, ``autodiff``: dicts of numpy arrays keyed by parameter name and ``"x"``)."""

    kind: str
    spec: dict
    numbers: dict
    sections: list
    manual: dict
    autodiff: dict

    @property
    def autodiff_max_abs_diff(self) -> float:
        return max(float(np.max(np.abs(self.manual[k] - self.autodiff[k]))) for k in self.manual)

    def to_json(self) -> dict:
        """``kind``, ``input`` (a trace file that reproduces this trace), the numbers,
        ``autodiff`` gradients and ``autodiff_max_abs_diff``."""
        return {
            "kind": self.kind,
            "input": self.spec,
            **self.numbers,
            "autodiff": {k: v.tolist() for k, v in self.autodiff.items()},
            "autodiff_max_abs_diff": self.autodiff_max_abs_diff,
        }

    def render(self, fmt: str = "text") -> str:
        if fmt == "json":
            return json.dumps(self.to_json(), indent=2)
        if fmt == "markdown":
            return render_markdown(self.sections)
        if fmt == "text":
            return render_text(self.sections)
        raise ValueError(f"unknown format {fmt!r}; expected one of: {', '.join(FORMATS)}")


# --------------------------------------------------------------------------------------------
# Shared arithmetic: the loss, jax.grad, checked sums, the check table
# --------------------------------------------------------------------------------------------


def half_sse(y, targets):
    """``E = 1/2 sum (y - t)^2`` (works on numpy and jax arrays)."""
    return 0.5 * ((y - targets) ** 2).sum()


def autodiff_gradients(layer, params, x, targets) -> dict:
    """``jax.grad`` of :func:`half_sse` of ``layer``'s forward, by params and by ``x``."""
    import jax

    def loss(p, inputs):
        return half_sse(layer.forward(p, inputs)[0], targets)

    dparams, dx = jax.grad(loss, argnums=(0, 1))(params, x)
    return {
        **{k: np.asarray(v, np.float64) for k, v in dparams.items()},
        "x": np.asarray(dx, np.float64),
    }


def checked_total(terms, total, what: str) -> float:
    """``total`` (the layer's number) after checking it equals the sum of the printed
    ``terms``: the text's arithmetic is the layer's arithmetic."""
    again = float(np.sum(np.asarray(terms, np.float64))) if len(terms) else 0.0
    total = float(total)
    if abs(again - total) > SUM_TOLERANCE * max(1.0, abs(total)):
        raise RuntimeError(
            f"trace bug: {what}: the printed terms add up to {again!r}, the layer "
            f"computed {total!r}"
        )
    return total


def sum_line(lhs: str, symbols, numbers, terms, total, what: str, tail: str = "") -> str:
    """``lhs = a*b + c*d = 1*2 + 3*4 = total``, the total checked against the terms."""
    value = checked_total(terms, total, what)
    filled = f"{' + '.join(numbers)}{tail}"
    if filled == computed(value):  # one term already equal to the total: say it once
        return f"{lhs} = {' + '.join(symbols)} = {filled}"
    return f"{lhs} = {' + '.join(symbols)} = {filled} = {computed(value)}"


def _fixed(value) -> str:
    # 10 places; a value that rounds to zero is written without a sign (-1e-17 is 0.0000000000)
    text = f"{float(value):.10f}"
    return text[1:] if text.startswith("-") and float(text) == 0 else text


def check_section(rows: list) -> Section:
    """``rows`` of ``(name, manual, jax.grad)``: the closing table, as the seed trace's."""
    table = [[name, _fixed(m), _fixed(a), f"{abs(float(m) - float(a)):.1e}"] for name, m, a in rows]
    worst = max(abs(float(m) - float(a)) for _, m, a in rows)
    return Section(
        "Check: jax.grad agrees",
        [
            Paragraph(
                f"jax.grad of the same loss gives the same gradients: max |manual - jax.grad| "
                f"= {worst:.3e} over all parameters and inputs (float64)."
            ),
            Table(["quantity", "manual (chain rule)", "jax.grad", "|diff|"], table),
        ],
    )


def nested_array(value, where: str) -> np.ndarray:
    """A JSON number or nested list of finite numbers as a float64 array; a
    :class:`~jaxbp.trace.ConfigError` naming ``where`` otherwise."""

    def bad(value):
        return isinstance(value, bool) or not isinstance(value, (int, float, list))

    stack = [value]
    while stack:
        item = stack.pop()
        if bad(item):
            raise ConfigError(f"trace file: {where} must hold numbers, got {json.dumps(item)[:60]}")
        if isinstance(item, list):
            stack.extend(item)
    try:
        array = np.asarray(value, np.float64)
    except (ValueError, OverflowError):
        raise ConfigError(f"trace file: {where} is ragged; expected equally long rows") from None
    if array.size == 0 or not np.all(np.isfinite(array)):
        raise ConfigError(
            f"trace file: {where} must be non-empty and finite, got {json.dumps(value)[:60]}"
        )
    return array


# --------------------------------------------------------------------------------------------
# Trace files and the built-in examples
# --------------------------------------------------------------------------------------------


_TRACE_MODULES = {
    "conv": ("conv_trace", "trace_conv"),
    "attention": ("attention_trace", "trace_attention"),
    "gru": ("gru_trace", "trace_gru"),
    "tied": ("tied_trace", "trace_tied"),
    "llama": ("llama_trace", "trace_llama"),
}


def _tracers() -> dict[str, tuple]:
    """kind -> (its built-in example, its tracer), for the kinds whose modules import (the GRU
    trace needs jaxbp.recurrent)."""
    import importlib

    tracers = {}
    for kind, (module_name, function) in _TRACE_MODULES.items():
        try:
            module = importlib.import_module(f"{__package__}.{module_name}")
        except ModuleNotFoundError as e:
            if e.name not in (f"{__package__}.{module_name}", "jaxbp.recurrent"):
                raise
            continue
        tracers[kind] = (module.EXAMPLE, getattr(module, function))
    return tracers


def _examples() -> dict:
    return {kind: example for kind, (example, _) in _tracers().items()}


# --example choices (gru once jaxbp.recurrent has one)
EXAMPLES = ("conv", "attention", "gru", "tied", "llama")


def example_spec(kind: str) -> dict:
    """The built-in example ``kind`` as a trace file (a fresh dict)."""
    examples = _examples()
    if kind not in examples:
        raise ValueError(
            f"no built-in trace example {kind!r}; expected one of: {', '.join(examples)}"
        )
    return json.loads(json.dumps(examples[kind]))


def parse_trace_spec(obj: Any) -> tuple[str, dict]:
    """``(kind, spec)``: a trace file's JSON checked for its keys and a traceable layer."""
    if isinstance(obj, dict) and "name" in obj and "model" not in obj:
        obj = {"model": obj}
    if not isinstance(obj, dict) or "model" not in obj:
        raise ConfigError(
            f"trace file: expected a JSON object with keys {', '.join(_TOP_KEYS)} "
            f"(model required), got {json.dumps(obj)[:60]}"
        )
    unknown = [key for key in obj if key not in _TOP_KEYS]
    if unknown:
        raise ConfigError(
            f"trace file: unknown key {unknown[0]!r}; expected keys: {', '.join(_TOP_KEYS)}"
        )
    name = obj["model"].get("name") if isinstance(obj["model"], dict) else None
    tracers = _tracers()
    kinds = {layer: kind for kind, layer in TRACEABLE_LAYERS.items() if kind in tracers}
    kinds["tied"] = "tied"  # the llama block is a tied network too: told apart below
    if name not in kinds:
        raise ConfigError(
            f"trace cannot trace a model whose layer is {name!r}; expected one "
            f"layer: {', '.join(kinds)} (networks of Dense layers: --config)"
        )
    if name == "tied" and "llama" in tracers and _starts_with_embedding(obj["model"]):
        return "llama", obj
    return kinds[name], obj


def _starts_with_embedding(model) -> bool:
    """A tied network whose first layer is an Embedding: the llama block (llama_trace), not the
    tied autoencoder (tied_trace)."""
    layers = model.get("layers")
    first = layers[0] if isinstance(layers, list) and layers else None
    return isinstance(first, dict) and first.get("name") == "Embedding"


def trace_layer(obj: Any) -> TracedLayer:
    """Trace the layer a trace file (a dict, as read from JSON) describes."""
    kind, spec = parse_trace_spec(obj)
    example, tracer = _tracers()[kind]
    return tracer(spec, example)


def trace_example(kind: str) -> TracedLayer:
    """Trace the built-in example ``kind`` (``conv``, ``attention``, ``gru``)."""
    return trace_layer(example_spec(kind))


def load_trace_file(path) -> dict:
    """Read a trace file (JSON) from ``path``."""
    from ..model import load_description

    obj = load_description(str(path))
    if not isinstance(obj, dict):
        raise ConfigError(
            f"trace file {str(path)!r}: expected a JSON object, got {json.dumps(obj)[:60]}"
        )
    return obj


def trace_file(path) -> TracedLayer:
    """Trace the layer of the trace file at ``path``."""
    return trace_layer(load_trace_file(path))


# --------------------------------------------------------------------------------------------
# Building the layer and its numbers from a spec (used by each tracer)
# --------------------------------------------------------------------------------------------


def build_layer(spec: dict):
    """The spec's layer, built from its description."""
    from ..model import build

    return build(spec["model"], where="trace file: model")


def spec_layer(spec: dict, example: dict, shape_fix=None, check=None) -> tuple:
    """``(layer, inputs, params)`` of a trace file: the layer, its inputs (:func:`spec_data`,
    then ``check(layer, inputs)``, the tracer's limits) and params (:func:`spec_params`)."""
    layer = build_layer(spec)
    x = spec_data(spec, example, "inputs", shape_fix)
    if check is not None:
        check(layer, x)
    return layer, x, spec_params(spec, layer, x.shape)


def spec_params(spec: dict, layer, input_shape: tuple) -> dict:
    """The spec's params as float64 jax arrays, shapes checked against ``layer.init``; without
    params, ``init`` with key 0 rounded to two places (call inside ``jax.enable_x64``)."""
    import jax
    import jax.numpy as jnp

    if "params" not in spec:
        _, initial = layer.init(jax.random.PRNGKey(0), input_shape)
        return {k: jnp.asarray(np.round(np.asarray(v, np.float64), 2)) for k, v in initial.items()}
    # Only the shapes: eval_shape traces init without running (compiling) it; the keys are
    # noted while it traces, since eval_shape returns a dict in sorted order, not init's.
    order = []

    def init_params(key):
        _, params = layer.init(key, input_shape)
        order.extend(params)
        return params

    shapes = jax.eval_shape(init_params, jax.random.PRNGKey(0))
    expected = {k: shapes[k] for k in order}
    given = spec["params"]
    if not isinstance(given, dict) or set(given) != set(expected):
        raise ConfigError(
            f"trace file: params must be an object with keys "
            f"{', '.join(expected)} for {layer.name}, got {json.dumps(given)[:60]}"
        )
    params = {}
    for key, like in expected.items():
        value = nested_array(given[key], f"params.{key}")
        if value.shape != tuple(like.shape):
            raise ConfigError(
                f"trace file: params.{key} has shape {value.shape}; {layer.name} "
                f"on inputs of shape {tuple(input_shape)} expects "
                f"{tuple(like.shape)}"
            )
        params[key] = jnp.asarray(value)
    return params


def spec_data(spec: dict, example: dict, key: str, shape_fix=None, expected=None) -> np.ndarray:
    """``inputs`` or ``targets`` from the spec, else from ``example`` (zeros of ``expected``
    when the example's do not fit); ``shape_fix`` turns a plain list into the layer's layout
    (Conv1D's one channel); a given array of another shape than ``expected`` is an error."""
    value = nested_array(spec[key] if key in spec else example[key], key)
    value = shape_fix(value) if shape_fix else value
    if expected is None or value.shape == tuple(expected):
        return value
    if key not in spec:
        return np.zeros(expected)
    raise ConfigError(f"trace file: {key} has shape {value.shape}; expected {tuple(expected)}")


def as_columns(value: np.ndarray, expected: str) -> np.ndarray:
    """A plain list as one column, ``(n,) -> (n, 1)``; a 2-D array as given; any other shape
    a :class:`~jaxbp.trace.ConfigError` saying ``expected``."""
    if value.ndim == 1:
        return value[:, None]
    if value.ndim != 2:
        raise ConfigError(f"trace file: {expected}, got shape {value.shape}")
    return value


def float64(value) -> np.ndarray:
    return np.asarray(value, np.float64)


def dict_of_lists(tree: dict) -> dict:
    return {k: float64(v).tolist() for k, v in tree.items()}


class LayerStep(NamedTuple):
    """One step of a traced layer on ``E = 1/2 sum (y - t)^2`` (numpy float64 but ``cache``,
    as the layer's forward returned it): ``grads`` from its own backward and ``autodiff`` from
    ``jax.grad``, each keyed by parameter name and ``"x"``."""

    y: np.ndarray
    cache: Any
    t: np.ndarray
    dy: np.ndarray
    grads: dict
    autodiff: dict
    loss: float


def layer_step(layer, params, x: np.ndarray, spec: dict, example: dict, shape_fix=None):
    """The layer's forward on ``x``, the spec's targets (:func:`spec_data`, shaped as ``y``),
    ``dE/dy = y - t``, the layer's backward and ``jax.grad`` (call inside ``jax.enable_x64``)."""
    import jax.numpy as jnp

    y, cache = layer.forward(params, jnp.asarray(x))
    t = spec_data(spec, example, "targets", shape_fix, expected=y.shape)
    dy = y - jnp.asarray(t)
    dparams, dx = layer.backward(params, cache, dy)
    grads = {**{key: float64(value) for key, value in dparams.items()}, "x": float64(dx)}
    autodiff = autodiff_gradients(layer, params, jnp.asarray(x), jnp.asarray(t))
    y = float64(y)
    return LayerStep(y, cache, t, float64(dy), grads, autodiff, float(half_sse(y, t)))


def traced_layer(kind: str, layer, page, params: dict, sections: list, numbers: dict):
    """The :class:`TracedLayer` of ``page`` (its ``x``, ``t``, ``grads``, ``autodiff``): its
    ``spec`` is the trace file of what was used, the layer's description and ``params``."""
    from ..model import describe

    used = {
        "model": describe(layer),
        "params": dict_of_lists(params),
        "inputs": page.x.tolist(),
        "targets": page.t.tolist(),
    }
    return TracedLayer(kind, used, numbers, sections, page.grads, page.autodiff)
