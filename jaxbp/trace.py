"""The worked example behind ``jaxbp trace``: every number of one backprop step, for any small net.

A *trace config* describes a small fully connected network and its data, as plain JSON::

    {
      "inputs": [0.1, 0.05],
      "targets": [0.02, 0.98],
      "layers": [
        {"weights": [[0.25, 0.2], [0.5, 0.15]], "bias": 0.3, "activation": "sigmoid"},
        {"weights": [[0.7, 0.4], [0.6, 0.35]], "bias": 0.9, "activation": "sigmoid"}
      ],
      "loss": "half_sse",
      "learning_rate": 0.5
    }

``weights[i][j]`` joins input ``i`` to neuron ``j`` (the layout of :class:`jaxbp.Dense`);
``bias`` is one number shared by the layer (as in the seed) or a list, one per neuron (default
0); ``inputs``/``targets`` are one example or a list of examples; ``activation`` is a name from
:data:`jaxbp.ACTIVATIONS`, ``loss`` one from :data:`jaxbp.LOSSES` (default ``half_sse``),
``learning_rate`` a positive number (default 0.5).

:func:`trace` runs the network through jaxbp's own layers: the forward pass, the loss, the manual
backward pass (each layer's hand-written ``backward``, with the factors of the chain rule kept),
``jax.grad`` of the same loss as the check, and the SGD update. It computes in float64 whatever
the global ``jax_enable_x64`` setting, and returns a :class:`Trace` that renders itself as text,
Markdown or JSON. With no config it traces the seed tutorial's 2-2-2 example and can list where
the seed's stated numbers are wrong (:meth:`Trace.errata`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import numpy as np

__all__ = [
    "TraceConfig",
    "TraceLayer",
    "Trace",
    "LayerTrace",
    "ConfigError",
    "seed_config",
    "parse_config",
    "load_config",
    "build_network",
    "trace",
    "FORMATS",
]

FORMATS = ("text", "markdown", "json")

_TOP_KEYS = ("inputs", "targets", "layers", "loss", "learning_rate")
_LAYER_KEYS = ("weights", "bias", "activation")
_DEFAULT_LOSS = "half_sse"
_DEFAULT_LEARNING_RATE = 0.5


class ConfigError(ValueError):
    """A trace config that cannot describe a network: names the key, what it got, what it expected."""


# --------------------------------------------------------------------------------------------
# The config
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TraceLayer:
    """One validated layer: ``weights`` ``(in, out)``, ``bias`` ``()`` (shared) or ``(out,)``."""

    weights: np.ndarray
    bias: np.ndarray
    activation: str

    @property
    def shared_bias(self) -> bool:
        return self.bias.ndim == 0

    @property
    def width(self) -> int:
        return self.weights.shape[1]


@dataclasses.dataclass(frozen=True)
class TraceConfig:
    """A validated trace config. ``inputs``/``targets`` are always ``(examples, features)``;
    ``single`` records that the config gave one example (its outputs are then unbatched)."""

    inputs: np.ndarray
    targets: np.ndarray
    layers: tuple
    loss: str
    learning_rate: float
    single: bool

    @property
    def widths(self) -> tuple:
        """``(inputs, layer 0 width, layer 1 width, ...)``."""
        return (self.inputs.shape[1],) + tuple(layer.width for layer in self.layers)

    @property
    def is_seed_shape(self) -> bool:
        """A 2-2-2 network: it is named as the seed names it (W1..W8, b1, b2, h1, o1, ...)."""
        return self.widths == (2, 2, 2)

    @property
    def is_seed(self) -> bool:
        """Exactly the seed tutorial's example (so its stated numbers can be checked)."""
        seed = parse_config(seed_config())
        return (self.is_seed_shape and self.single and self.loss == seed.loss
                and self.learning_rate == seed.learning_rate
                and np.array_equal(self.inputs, seed.inputs)
                and np.array_equal(self.targets, seed.targets)
                and all(a.activation == b.activation and np.array_equal(a.weights, b.weights)
                        and a.bias.shape == b.bias.shape and np.array_equal(a.bias, b.bias)
                        for a, b in zip(self.layers, seed.layers)))

    def to_dict(self) -> dict:
        """The config as JSON-ready Python values (shaped as a config file would give them)."""
        unbatch = (lambda a: a[0].tolist()) if self.single else (lambda a: a.tolist())
        return {
            "inputs": unbatch(self.inputs),
            "targets": unbatch(self.targets),
            "layers": [{"weights": layer.weights.tolist(), "bias": layer.bias.tolist(),
                        "activation": layer.activation} for layer in self.layers],
            "loss": self.loss,
            "learning_rate": self.learning_rate,
        }


def seed_config() -> dict:
    """The seed tutorial's example as a trace config (a fresh dict)."""
    from . import seed

    return {
        "inputs": list(seed.SEED_INPUTS),
        "targets": list(seed.SEED_TARGETS),
        "layers": [
            {"weights": [list(r) for r in seed.SEED_W_INPUT_HIDDEN], "bias": seed.SEED_BIASES[0],
             "activation": "sigmoid"},
            {"weights": [list(r) for r in seed.SEED_W_HIDDEN_OUTPUT],
             "bias": seed.SEED_BIASES[1], "activation": "sigmoid"},
        ],
        "loss": "half_sse",
        "learning_rate": seed.SEED_LEARNING_RATE,
    }


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _describe(v) -> str:
    text = json.dumps(v) if isinstance(v, (list, dict, str, int, float, bool, type(None))) \
        else repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _number(v, where: str) -> float:
    if not _is_number(v):
        raise ConfigError(f"config: {where} must be a number, got {_describe(v)}")
    if not _is_finite(v):
        raise ConfigError(f"config: {where} must be a finite number, got {_describe(v)}")
    return float(v)


def _is_finite(v) -> bool:
    try:
        return math.isfinite(v)
    except OverflowError:  # a JSON integer beyond float range, such as 1e400 written out
        return False


def _vector(v, where: str) -> list:
    if not isinstance(v, list) or not v:
        raise ConfigError(f"config: {where} must be a non-empty list of numbers, got "
                          f"{_describe(v)}")
    return [_number(e, f"{where}[{i}]") for i, e in enumerate(v)]


def _examples(v, where: str) -> tuple[np.ndarray, bool]:
    """One example (a list of numbers) or several (a list of equally long lists)."""
    if isinstance(v, list) and v and all(isinstance(e, list) for e in v):
        rows = [_vector(e, f"{where}[{i}]") for i, e in enumerate(v)]
        for i, row in enumerate(rows):
            if len(row) != len(rows[0]):
                raise ConfigError(
                    f"config: {where}[{i}] has {len(row)} numbers but {where}[0] has "
                    f"{len(rows[0])}; expected every example to have the same length")
        return np.asarray(rows, np.float64), False
    if isinstance(v, list) and any(isinstance(e, list) for e in v):
        raise ConfigError(f"config: {where} mixes numbers and lists; expected one example "
                          f"(a list of numbers) or a list of examples (a list of lists)")
    return np.asarray([_vector(v, where)], np.float64), True


def _matrix(v, where: str) -> np.ndarray:
    if not isinstance(v, list) or not v or not all(isinstance(r, list) for r in v):
        raise ConfigError(f"config: {where} must be a non-empty list of rows (weights[i][j] "
                          f"joins input i to neuron j), got {_describe(v)}")
    rows = [_vector(r, f"{where}[{i}]") for i, r in enumerate(v)]
    for i, row in enumerate(rows):
        if len(row) != len(rows[0]):
            raise ConfigError(
                f"config: {where} is ragged: row {i} has {len(row)} entries but row 0 has "
                f"{len(rows[0])}; expected every row to have one entry per neuron")
    return np.asarray(rows, np.float64)


def _check_keys(obj: dict, allowed, where: str) -> None:
    unknown = [k for k in obj if k not in allowed]
    if unknown:
        raise ConfigError(f"config: unknown key {unknown[0]!r} in {where}; expected keys: "
                          f"{', '.join(allowed)}")


def parse_config(obj: Any) -> TraceConfig:
    """Validate a trace config (a dict, as read from JSON) and return a :class:`TraceConfig`.

    Raises :class:`ConfigError` (a ``ValueError``) naming the key or layer that is wrong, what
    it holds and what was expected.
    """
    from .layers import ACTIVATIONS
    from .losses import LOSSES

    if not isinstance(obj, dict):
        raise ConfigError(f"config: expected a JSON object with keys {', '.join(_TOP_KEYS)}, "
                          f"got {_describe(obj)}")
    _check_keys(obj, _TOP_KEYS, "the top level")
    for key in ("inputs", "targets", "layers"):
        if key not in obj:
            raise ConfigError(f"config: missing key {key!r}; expected keys: inputs, targets, "
                              f"layers (and optionally loss, learning_rate)")
    inputs, single = _examples(obj["inputs"], "inputs")
    targets, single_t = _examples(obj["targets"], "targets")
    if single != single_t or len(inputs) != len(targets):
        raise ConfigError(
            f"config: inputs give {len(inputs)} example(s) "
            f"{'(one list of numbers)' if single else '(a list of lists)'} but targets give "
            f"{len(targets)} {'(one list of numbers)' if single_t else '(a list of lists)'}; "
            f"expected one target per example, written the same way")

    raw_layers = obj["layers"]
    if not isinstance(raw_layers, list) or not raw_layers:
        raise ConfigError(f"config: layers must be a non-empty list of layer objects, got "
                          f"{_describe(raw_layers)}")
    layers = []
    width = inputs.shape[1]
    for index, raw in enumerate(raw_layers):
        where = f"layers[{index}]"
        if not isinstance(raw, dict):
            raise ConfigError(f"config: {where} must be an object with keys "
                              f"{', '.join(_LAYER_KEYS)}, got {_describe(raw)}")
        _check_keys(raw, _LAYER_KEYS, where)
        for key in ("weights", "activation"):
            if key not in raw:
                raise ConfigError(f"config: {where} is missing key {key!r}; expected keys: "
                                  f"weights, activation (and optionally bias)")
        weights = _matrix(raw["weights"], f"{where}.weights")
        previous = "the inputs" if index == 0 else f"layer {index - 1}"
        if weights.shape[0] != width:
            raise ConfigError(
                f"config: {where}.weights has {weights.shape[0]} rows but {previous} "
                f"{'have' if index == 0 else 'has'} width {width}; expected {width} rows "
                f"(weights[i][j] joins input i to neuron j)")
        bias_raw = raw.get("bias", 0.0)
        if isinstance(bias_raw, list):
            bias = np.asarray(_vector(bias_raw, f"{where}.bias"), np.float64)
            if bias.shape[0] != weights.shape[1]:
                raise ConfigError(
                    f"config: {where}.bias has {bias.shape[0]} entries but the layer has "
                    f"{weights.shape[1]} neurons; expected one number (shared) or "
                    f"{weights.shape[1]} (one per neuron)")
        else:
            bias = np.asarray(_number(bias_raw, f"{where}.bias"), np.float64)
        act = raw["activation"]
        if not isinstance(act, str) or act not in ACTIVATIONS:
            raise ConfigError(f"config: {where}.activation is {_describe(act)}; expected one "
                              f"of: {', '.join(sorted(ACTIVATIONS))}")
        layers.append(TraceLayer(weights, bias, act))
        width = weights.shape[1]

    if targets.shape[1] != width:
        raise ConfigError(
            f"config: targets have {targets.shape[1]} numbers per example but the last layer "
            f"(layers[{len(layers) - 1}]) has {width} neurons; expected {width}")
    loss = obj.get("loss", _DEFAULT_LOSS)
    if not isinstance(loss, str) or loss not in LOSSES:
        raise ConfigError(f"config: loss is {_describe(loss)}; expected one of: "
                          f"{', '.join(sorted(LOSSES))}")
    lr = obj.get("learning_rate", _DEFAULT_LEARNING_RATE)
    if not _is_number(lr) or not _is_finite(lr) or lr <= 0:
        raise ConfigError(f"config: learning_rate is {_describe(lr)}; expected a positive "
                          f"finite number")
    return TraceConfig(inputs, targets, tuple(layers), loss, float(lr), single)


def load_config(path: str | os.PathLike) -> TraceConfig:
    """Read and validate a JSON trace config file (see the module docstring for the format)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise ConfigError(f"config file {os.fspath(path)!r} not found") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {os.fspath(path)!r} is a directory; expected a JSON "
                          f"file") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {os.fspath(path)!r} is not UTF-8 text: {e}") from None
    try:
        obj = json.loads(text)
    except RecursionError:  # json recurses per nesting level
        raise ConfigError(f"config file {os.fspath(path)!r} is nested too deeply; expected a "
                          f"JSON object of inputs, targets and layers") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"config file {os.fspath(path)!r} is not valid JSON: {e.msg} at "
                          f"line {e.lineno} column {e.colno}") from None
    return parse_config(obj)


def build_network(config: TraceConfig):
    """``(net, params)``: ``serial(Dense, activation, Dense, activation, ...)`` with the config's
    weights, as float64 jax arrays (call inside ``jax.enable_x64(True)``)."""
    import jax.numpy as jnp

    from .layers import Dense, activation, serial

    layers, params = [], []
    for layer in config.layers:
        layers += [Dense(layer.width, shared_bias=layer.shared_bias), activation(layer.activation)]
        params += [{"W": jnp.asarray(layer.weights, jnp.float64),
                    "b": jnp.asarray(layer.bias, jnp.float64)}, ()]
    return serial(*layers), tuple(params)


# --------------------------------------------------------------------------------------------
# The trace
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LayerTrace:
    """Every number of one layer, for the first step. Per-neuron arrays are ``(examples, width)``.

    ``net`` (the weighted sum, ``in_``), ``out`` (after the activation), ``dE_dout``,
    ``dout_dnet`` (the activation's derivative, from its own ``backward``) and
    ``delta = dE/dnet = dE_dout * dout_dnet``; the manual gradients ``grad_weights``,
    ``grad_bias``, ``jax.grad``'s (``autodiff_weights``, ``autodiff_bias``), and the parameters
    after the first update (``step1_weights``, ``step1_bias``) and after the last
    (``final_weights``, ``final_bias``).
    """

    net: np.ndarray
    out: np.ndarray
    dE_dout: np.ndarray
    dout_dnet: np.ndarray
    delta: np.ndarray
    grad_weights: np.ndarray
    grad_bias: np.ndarray
    autodiff_weights: np.ndarray
    autodiff_bias: np.ndarray
    step1_weights: np.ndarray
    step1_bias: np.ndarray
    final_weights: np.ndarray
    final_bias: np.ndarray


@dataclasses.dataclass(frozen=True)
class Trace:
    """The result of :func:`trace`. Render with :meth:`to_text`, :meth:`to_markdown`,
    :meth:`to_json` (or :meth:`render`)."""

    config: TraceConfig
    layers: tuple
    errors_per_example: np.ndarray  # (examples, outputs); summed over examples = errors
    loss: float
    autodiff_max_abs_diff: float
    freeze_bias: bool
    steps: int | None
    history: np.ndarray | None      # loss before each step, then after the last
    step_rel_errors: np.ndarray | None  # per step, worst leaf rel. error manual vs jax.grad

    @property
    def errors(self) -> np.ndarray:
        """Each output's share of the loss (they add up to :attr:`loss`)."""
        return self.errors_per_example.sum(axis=0)

    @property
    def names(self) -> "_Names":
        return _Names(self.config)

    def seed_values(self) -> dict:
        """The correct value of every quantity the seed states (keys of ``SEED_STATED``).

        Only meaningful for the seed's 2-2-2 example (see :meth:`errata`).
        """
        h, o = self.layers
        g7 = float(o.grad_weights[1, 0])
        return {
            "in_h1": float(h.net[0, 0]), "in_h2": float(h.net[0, 1]),
            "out_h1": float(h.out[0, 0]), "out_h2": float(h.out[0, 1]),
            "in_o1": float(o.net[0, 0]), "in_o2": float(o.net[0, 1]),
            "out_o1": float(o.out[0, 0]), "out_o2": float(o.out[0, 1]),
            "E_o1": float(self.errors[0]), "E_o2": float(self.errors[1]),
            "E_total": float(self.loss), "dE/dW7": g7,
            "W7_new": float(self.config.layers[1].weights[1, 0]
                            - self.config.learning_rate * g7),
        }

    def errata(self) -> list[dict] | None:
        """For the seed's example: each number the seed states, the correct value, and whether
        they agree to the 4 places the seed prints. ``None`` for any other config."""
        if not self.config.is_seed:
            return None
        from .seed import SEED_STATED

        correct = self.seed_values()
        return [{"quantity": k, "seed_states": v, "correct": correct[k],
                 "matches": abs(v - correct[k]) <= 0.5e-4 + 1e-12}
                for k, v in SEED_STATED.items()]

    # -- renderings ---------------------------------------------------------------------------

    def to_json(self) -> dict:
        """Exactly the keys ``layers`` (``net``, ``out``), ``errors``, ``loss``, ``gradients``,
        ``updated`` (``weights``, ``bias``, shaped as in the config), ``autodiff_max_abs_diff``
        and, after ``steps``, ``history``. Numbers are floats, arrays nested lists."""
        per_example = (lambda a: a[0].tolist()) if self.config.single else (lambda a: a.tolist())
        result = {
            "layers": [{"net": per_example(t.net), "out": per_example(t.out)}
                       for t in self.layers],
            "errors": self.errors.tolist(),
            "loss": float(self.loss),
            "gradients": [{"weights": t.grad_weights.tolist(), "bias": t.grad_bias.tolist()}
                          for t in self.layers],
            "updated": [{"weights": t.final_weights.tolist(), "bias": t.final_bias.tolist()}
                        for t in self.layers],
            "autodiff_max_abs_diff": float(self.autodiff_max_abs_diff),
        }
        if self.history is not None:
            result["history"] = [float(v) for v in self.history]
        return result

    def to_text(self) -> str:
        return _render_text(_document(self))

    def to_markdown(self) -> str:
        return _render_markdown(_document(self))

    def render(self, fmt: str = "text") -> str:
        """The trace as ``"text"``, ``"markdown"`` or ``"json"``."""
        if fmt == "json":
            return json.dumps(self.to_json(), indent=2)
        if fmt == "markdown":
            return self.to_markdown()
        if fmt == "text":
            return self.to_text()
        raise ValueError(f"unknown format {fmt!r}; expected one of: {', '.join(FORMATS)}")


def _per_output_errors(loss: str, out: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Each (example, output) entry's share of the loss, normalised as the loss normalises."""
    n, k = out.shape
    if loss == "half_sse":
        return 0.5 * (target - out) ** 2 / n
    if loss == "mse":
        return (out - target) ** 2 / (n * k)
    if loss == "sigmoid_binary_cross_entropy":
        per = np.maximum(out, 0) - out * target + np.log1p(np.exp(-np.abs(out)))
        return per / (n * k)
    if loss == "softmax_cross_entropy":
        z = out - out.max(axis=1, keepdims=True)
        log_softmax = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        return -target * log_softmax / n
    raise ValueError(f"no per-output breakdown for loss {loss!r}")


def trace(config: TraceConfig | dict | None = None, *, steps: int | None = None,
          freeze_bias: bool = False) -> Trace:
    """Trace one backprop step of ``config`` (default: the seed's example) in float64.

    The gradients are jaxbp's manual chain rule (each layer's ``backward``), compared with
    ``jax.grad``. The update is ``jaxbp.sgd(learning_rate)`` (with ``freeze_bias``, wrapped in
    ``jaxbp.freeze(..., jaxbp.biases)`` so biases stay, as in the seed's code). With ``steps``,
    trains that many full-batch steps with :func:`jaxbp.fit` (each step checked against
    ``jax.grad``) and records the loss before each step and after the last.
    """
    import jax

    if config is None:
        config = seed_config()
    if not isinstance(config, TraceConfig):
        config = parse_config(config)
    if steps is not None and (not isinstance(steps, int) or isinstance(steps, bool)
                              or steps < 1):
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    # The worked numbers are float64 whatever the caller's global setting.
    with jax.enable_x64(True):
        return _trace64(config, steps, freeze_bias)


def _trace64(config: TraceConfig, steps, freeze_bias) -> Trace:
    import jax
    import jax.numpy as jnp
    import optax

    from .backprop import autodiff, backprop, loss_fn
    from .losses import get_loss
    from .train import biases, fit, freeze, sgd

    net, params = build_network(config)
    loss = get_loss(config.loss)
    x = jnp.asarray(config.inputs, jnp.float64)
    y = jnp.asarray(config.targets, jnp.float64)

    value, grads = backprop(net, loss, params, x, y)
    _, grads_ad = autodiff(net, loss, params, x, y)
    diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in
               zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(grads_ad)))

    # The same chain rule, walked layer by layer to keep its factors: serial's backward does
    # exactly this walk, so these are the numbers behind `grads`.
    children = net.config
    acts, caches, h = [], [], x
    for layer, p in zip(children, params):
        h, cache = layer.forward(p, h)
        acts.append(h)
        caches.append(cache)
    dy = loss.grad(h, y)
    cotangents = [None] * len(children)  # dE/d(output of each child)
    for i in reversed(range(len(children))):
        cotangents[i] = dy
        _, dy = children[i].backward(params[i], caches[i], dy)

    optimizer = sgd(config.learning_rate)
    if freeze_bias:
        optimizer = freeze(optimizer, biases)
    updates, _ = optimizer.update(grads, optimizer.init(params), params)
    step1 = optax.apply_updates(params, updates)

    history = rel_errors = None
    final = step1
    if steps is not None:
        result = fit(net, loss, optimizer, params, x, y, steps=steps, check="report")
        final = result.params
        after = loss_fn(net, loss)(final, x, y)
        history = np.append(np.asarray(result.history["loss"]), float(after))
        rel_errors = np.asarray(result.history["rel_error"])

    as_np = lambda a: np.asarray(a, np.float64)
    layers = []
    for k in range(len(config.layers)):
        d, a = 2 * k, 2 * k + 1
        deriv = children[a].backward((), caches[a], jnp.ones_like(acts[a]))[1]
        layers.append(LayerTrace(
            net=as_np(acts[d]), out=as_np(acts[a]), dE_dout=as_np(cotangents[a]),
            dout_dnet=as_np(deriv), delta=as_np(cotangents[d]),
            grad_weights=as_np(grads[d]["W"]), grad_bias=as_np(grads[d]["b"]),
            autodiff_weights=as_np(grads_ad[d]["W"]), autodiff_bias=as_np(grads_ad[d]["b"]),
            step1_weights=as_np(step1[d]["W"]), step1_bias=as_np(step1[d]["b"]),
            final_weights=as_np(final[d]["W"]), final_bias=as_np(final[d]["b"]),
        ))
    errors = _per_output_errors(config.loss, layers[-1].out, config.targets)
    return Trace(config, tuple(layers), errors, float(value), diff, bool(freeze_bias), steps,
                 history, rel_errors)


# --------------------------------------------------------------------------------------------
# Names: the seed's for a 2-2-2 net, generic otherwise
# --------------------------------------------------------------------------------------------


class _Names:
    """How the trace names inputs, neurons, weights and biases."""

    def __init__(self, config: TraceConfig):
        self.config = config
        self.seed = config.is_seed_shape
        self.hidden = len(config.layers) - 1

    def input(self, i: int) -> str:
        return f"i{i + 1}"

    def neuron(self, layer: int, j: int) -> str:
        if layer == len(self.config.layers) - 1:
            return f"o{j + 1}"
        if self.hidden == 1:
            return f"h{j + 1}"
        return f"h{layer + 1}.{j + 1}"

    def source(self, layer: int, i: int) -> str:
        """The name of input ``i`` of ``layer``'s weighted sum (an input or an ``out_``)."""
        return self.input(i) if layer == 0 else f"out_{self.neuron(layer - 1, i)}"

    def weight(self, layer: int, i: int, j: int) -> str:
        if self.seed:
            from .seed import SEED_WEIGHT_NAMES

            return SEED_WEIGHT_NAMES[(layer, i, j)]
        return f"w[{layer}][{i}][{j}]"

    def bias(self, layer: int, j: int | None = None) -> str:
        """``j`` is None for a shared bias."""
        if self.seed:
            return f"b{layer + 1}" if j is None else f"b_{self.neuron(layer, j)}"
        return f"b[{layer}]" if j is None else f"b[{layer}][{j}]"

    def bias_of(self, layer: int, j: int) -> str:
        shared = self.config.layers[layer].shared_bias
        return self.bias(layer, None if shared else j)


# --------------------------------------------------------------------------------------------
# Rendering: a small document model, written out as text or Markdown
# --------------------------------------------------------------------------------------------


def _g(v: float) -> str:
    """A number the user gave (a weight, an input): as short as it is exact."""
    return f"{float(v):.10g}"


def _f(v: float) -> str:
    """A computed number: 4 places, as the seed prints them; 4 significant digits below 0.01
    (so small gradients keep their precision), scientific below 1e-4."""
    v = float(v)
    if not math.isfinite(v):
        return str(v)
    if v != 0 and abs(v) < 1e-4 or abs(v) >= 1e6:
        return f"{v:.3e}"
    if v != 0 and abs(v) < 1e-2:
        return f"{v:.{3 - math.floor(math.log10(abs(v)))}f}"
    return f"{v:.4f}"


def _p(v: float) -> str:
    """A factor inside a product: parenthesised when negative."""
    s = _f(v)
    return f"({s})" if s.startswith("-") else s


def _pg(v: float) -> str:
    s = _g(v)
    return f"({s})" if s.startswith("-") else s


# activation name -> (out in terms of {x} = in ({xp}: the same, parenthesised when negative),
# its derivative in terms of {o} = out and {i} = in, whether to fill the derivative's numbers in)
_ACT_FORMULA = {
    "sigmoid": ("1/(1+e^-{xp})", "{o}*(1-{o})", True),
    "tanh": ("tanh({x})", "1-{o}^2", True),
    "relu": ("max(0, {x})", "1 if {i} > 0 else 0", False),
    "leaky_relu": ("{xp} if {xp} > 0 else 0.01*{xp}", "1 if {i} > 0 else 0.01", False),
    "gelu": ("gelu({x})", "gelu'({i})", False),
    "softplus": ("log(1+e^{xp})", "1/(1+e^-{i})", False),
    "identity": ("{x}", "1", False),
}


def _loss_terms(loss: str, n: int, k: int):
    """``(error of output {o} with target {t}, dE/dout, a footnote)`` for ``n`` examples of
    ``k`` outputs, normalised as jaxbp's loss normalises (so the errors add up to E_total)."""
    per_ex = f" / {n}" if n > 1 else ""
    m = n * k
    if loss == "half_sse":
        return "1/2 ({t} - {o})^2" + per_ex, "{o} - {t}" if n == 1 else "({o} - {t})" + per_ex, ""
    if loss == "mse":
        return f"({{o}} - {{t}})^2 / {m}", f"2 ({{o}} - {{t}}) / {m}", ""
    if loss == "sigmoid_binary_cross_entropy":
        return (f"BCE({{o}}, {{t}}) / {m}", f"(s({{o}}) - {{t}}) / {m}",
                "BCE(z, t) = -(t log s(z) + (1-t) log(1-s(z))), s = sigmoid: the output is a logit.")
    if loss == "softmax_cross_entropy":
        return ("-{t} * log softmax(out)_{j}" + per_ex, "(softmax(out)_{j} - {t})" + per_ex,
                "softmax(out)_j = e^out_j / sum_m e^out_m over the outputs: they are logits.")
    raise ValueError(f"no formula for loss {loss!r}")


_MAX_EXAMPLES_SHOWN = 8
_MAX_TABLE_PARAMS = 64


def _document(t: Trace) -> list:
    """``[(title, [block, ...]), ...]``; a block is ``("lines", [str])``, ``("para", str)`` or
    ``("table", headers, rows)``."""
    cfg, names = t.config, t.names
    n_examples = cfg.inputs.shape[0]
    shown = range(min(n_examples, _MAX_EXAMPLES_SHOWN))
    batch = n_examples > 1
    doc = []

    def ex_prefix(n):
        return f"[example {n + 1}] " if batch else ""

    # -- the network ------------------------------------------------------------------------
    arch = "-".join(str(w) for w in cfg.widths)
    title = "The seed's 2-2-2 example" if cfg.is_seed else f"A {arch} network"
    lines = []
    for n in shown:
        ins = ", ".join(f"{names.input(i)} = {_g(v)}" for i, v in enumerate(cfg.inputs[n]))
        outs = ", ".join(f"target_{names.neuron(len(cfg.layers) - 1, j)} = {_g(v)}"
                         for j, v in enumerate(cfg.targets[n]))
        lines.append(f"{ex_prefix(n)}{ins};  {outs}")
    for k, layer in enumerate(cfg.layers):
        ws = ", ".join(f"{names.weight(k, i, j)} = {_g(layer.weights[i, j])}"
                       for i, j in np.ndindex(layer.weights.shape))
        if layer.shared_bias:
            bs = f"{names.bias(k)} = {_g(layer.bias)} (shared)"
        else:
            bs = ", ".join(f"{names.bias(k, j)} = {_g(b)}" for j, b in enumerate(layer.bias))
        lines.append(f"layer {k} ({layer.activation}): {ws}; {bs}")
    lines.append(f"loss {cfg.loss}, learning rate {_g(cfg.learning_rate)}"
                 + (", biases frozen (--freeze-bias)" if t.freeze_bias else ""))
    blocks = [("lines", lines)]
    if not names.seed:
        blocks.append(("para", "w[l][i][j] is layers[l].weights[i][j] of the config: it joins "
                               "input i of layer l to its neuron j; in_ is a neuron's weighted "
                               "sum, out_ its activation."))
    if n_examples > len(shown):
        blocks.append(("para", f"Showing the first {len(shown)} of {n_examples} examples; "
                               f"--format json has them all."))
    doc.append((title, blocks))

    # -- step 1: forward ----------------------------------------------------------------------
    lines = []
    for n in shown:
        for k, (layer, lt) in enumerate(zip(cfg.layers, t.layers)):
            for j in range(layer.width):
                nm = names.neuron(k, j)
                rows = range(layer.weights.shape[0])
                sym = " + ".join(f"{names.weight(k, i, j)}*{names.source(k, i)}" for i in rows)
                src = cfg.inputs[n] if k == 0 else t.layers[k - 1].out[n]
                fmt_src = _pg if k == 0 else _p
                num = " + ".join(f"{_pg(layer.weights[i, j])}*{fmt_src(src[i])}" for i in rows)
                b = layer.bias if layer.shared_bias else layer.bias[j]
                lines.append(f"{ex_prefix(n)}in_{nm} = {sym} + {names.bias_of(k, j)}*1 = "
                             f"{num} + {_pg(b)}*1 = {_f(lt.net[n, j])}")
            for j in range(layer.width):
                nm = names.neuron(k, j)
                formula = _ACT_FORMULA[layer.activation][0]
                sym = formula.format(x=f"in_{nm}", xp=f"in_{nm}")
                num = formula.format(x=_f(lt.net[n, j]), xp=_p(lt.net[n, j]))
                lines.append(f"{ex_prefix(n)}out_{nm} = {sym} = {num} = {_f(lt.out[n, j])}")
    doc.append(("Step 1: forward pass", [("lines", lines)]))

    # -- step 2: error ------------------------------------------------------------------------
    out_layer, last = t.layers[-1], len(cfg.layers) - 1
    lines = []
    err_t, grad_t, footnote = _loss_terms(cfg.loss, n_examples, cfg.widths[-1])
    simple = cfg.loss in ("half_sse", "mse")  # numbers fill in element by element
    for j in range(cfg.widths[-1]):
        nm = names.neuron(last, j)
        sym = err_t.format(t=f"target_{nm}", o=f"out_{nm}", j=j + 1)
        if batch:
            lines.append(f"E_{nm} = sum over examples of {sym} = "
                         + " + ".join(_p(e) for e in t.errors_per_example[shown, j])
                         + (" + ..." if n_examples > len(shown) else "")
                         + f" = {_f(t.errors[j])}")
        else:
            num = (" = " + err_t.format(t=_g(cfg.targets[0, j]), o=_p(out_layer.out[0, j]),
                                        j=j + 1)) if simple else ""
            lines.append(f"E_{nm} = {sym}{num} = {_f(t.errors[j])}")
    if cfg.widths[-1] > 1:
        total_sym = " + ".join(f"E_{names.neuron(last, j)}" for j in range(cfg.widths[-1]))
        total_num = " + ".join(_p(e) for e in t.errors)
        lines.append(f"E_total = {total_sym} = {total_num} = {_f(t.loss)}")
    else:
        lines.append(f"E_total = E_{names.neuron(last, 0)} = {_f(t.loss)}")
    blocks = [("lines", lines)]
    if footnote:
        blocks.append(("para", footnote))
    doc.append(("Step 2: the error", blocks))

    # -- step 3: backward ---------------------------------------------------------------------
    blocks = []
    intro = ("The chain rule, output layer first. For a weight w into neuron n: "
             "dE/dw = dE/dout_n * dout_n/din_n * din_n/dw, and din_n/dw is the input the "
             "weight multiplies.")
    if batch:
        intro += " With several examples each gradient is the sum of one such product per example."
    blocks.append(("para", intro))
    for k in reversed(range(len(cfg.layers))):
        layer, lt = cfg.layers[k], t.layers[k]
        lines = []
        act = _ACT_FORMULA[layer.activation]
        for n in shown:
            for j in range(layer.width):
                nm = names.neuron(k, j)
                if k == last:
                    sym = grad_t.format(t=f"target_{nm}", o=f"out_{nm}", j=j + 1)
                    num = (" = " + grad_t.format(t=_g(cfg.targets[n, j]), o=_p(lt.out[n, j]),
                                                 j=j + 1)) if cfg.loss != "softmax_cross_entropy" else ""
                    if cfg.loss == "sigmoid_binary_cross_entropy":
                        num = num.replace("s(" + _p(lt.out[n, j]) + ")",
                                          _f(1 / (1 + math.exp(-lt.out[n, j]))))
                    lines.append(f"{ex_prefix(n)}dE/dout_{nm} = {sym}{num} = "
                                 f"{_f(lt.dE_dout[n, j])}")
                else:
                    nxt, nlt = cfg.layers[k + 1], t.layers[k + 1]
                    terms = range(nxt.width)
                    sym = " + ".join(f"dE/din_{names.neuron(k + 1, m)}*{names.weight(k + 1, j, m)}"
                                     for m in terms)
                    num = " + ".join(f"{_p(nlt.delta[n, m])}*{_pg(nxt.weights[j, m])}"
                                     for m in terms)
                    lines.append(f"{ex_prefix(n)}dE/dout_{nm} = {sym} = {num} = "
                                 f"{_f(lt.dE_dout[n, j])}")
                symbolic = act[1].format(o=f"out_{nm}", i=f"in_{nm}")
                filled = act[1].format(o=_p(lt.out[n, j]), i="") + " = " if act[2] else ""
                lines.append(f"{ex_prefix(n)}dout_{nm}/din_{nm} = {symbolic} = {filled}"
                             f"{_f(lt.dout_dnet[n, j])}")
                lines.append(f"{ex_prefix(n)}dE/din_{nm} = dE/dout_{nm} * dout_{nm}/din_{nm} = "
                             f"{_p(lt.dE_dout[n, j])} * {_p(lt.dout_dnet[n, j])} = "
                             f"{_f(lt.delta[n, j])}")
        for j in range(layer.width):
            nm = names.neuron(k, j)
            for i in range(layer.weights.shape[0]):
                w = names.weight(k, i, j)
                src_name = names.source(k, i)
                src = cfg.inputs if k == 0 else t.layers[k - 1].out
                fmt_src = _pg if k == 0 else _p
                factors = " + ".join(
                    f"{_p(lt.dE_dout[n, j])} * {_p(lt.dout_dnet[n, j])} * {fmt_src(src[n, i])}"
                    for n in shown)
                if n_examples > len(shown):
                    factors += " + ..."
                sigma = "sum over examples of " if batch else ""
                lines.append(f"dE/d{w} = {sigma}dE/dout_{nm} * dout_{nm}/din_{nm} * "
                             f"din_{nm}/d{w} = {factors} = {_f(lt.grad_weights[i, j])}"
                             f"   (din_{nm}/d{w} = {src_name})")
        if layer.shared_bias:
            bname = names.bias(k)
            sym = " + ".join(f"dE/din_{names.neuron(k, j)}" for j in range(layer.width))
            over = " (summed over examples)" if batch else ""
            num = (" + ".join(_p(v) for v in lt.delta.sum(axis=0)) + " = "
                   if layer.width > 1 else "")
            lines.append(f"dE/d{bname} = {sym}{over} = {num}{_f(lt.grad_bias)}"
                         f"   (a shared bias feeds every neuron of the layer, times 1)")
        else:
            for j in range(layer.width):
                nm = names.neuron(k, j)
                over = " summed over examples" if batch else " * 1"
                lines.append(f"dE/d{names.bias(k, j)} = dE/din_{nm}{over} = "
                             f"{_f(lt.grad_bias[j])}")
        role = "output" if k == last else "hidden"
        blocks.append(("subtitle", f"Layer {k} ({role}, {layer.activation})"))
        blocks.append(("lines", lines))
    doc.append(("Step 3: backward pass", blocks))

    # -- step 4: update -----------------------------------------------------------------------
    lr = cfg.learning_rate
    lines = []
    for k, (layer, lt) in enumerate(zip(cfg.layers, t.layers)):
        for i, j in np.ndindex(layer.weights.shape):
            w = names.weight(k, i, j)
            lines.append(f"{w}_new = {w} - lr * dE/d{w} = {_g(layer.weights[i, j])} - "
                         f"{_g(lr)} * {_p(lt.grad_weights[i, j])} = "
                         f"{_f(lt.step1_weights[i, j])}")
        bias_items = ([(names.bias(k), layer.bias, lt.grad_bias, lt.step1_bias)]
                      if layer.shared_bias else
                      [(names.bias(k, j), layer.bias[j], lt.grad_bias[j], lt.step1_bias[j])
                       for j in range(layer.width)])
        for bname, b, g, new in bias_items:
            if t.freeze_bias:
                lines.append(f"{bname} stays {_g(b)} (--freeze-bias: weights only, as the seed's "
                             f"code)")
            else:
                lines.append(f"{bname}_new = {bname} - lr * dE/d{bname} = {_g(b)} - {_g(lr)} * "
                             f"{_p(g)} = {_f(new)}")
    doc.append(("Step 4: update (one step of gradient descent)", [("lines", lines)]))

    # -- more steps ---------------------------------------------------------------------------
    if t.history is not None:
        rows = [[str(s), _f(v)] for s, v in enumerate(t.history)]
        if len(rows) > 22:  # keep the table readable: the first and last steps
            rows = rows[:11] + [["...", "..."]] + rows[-10:]
        worst = float(np.nanmax(t.step_rel_errors)) if t.step_rel_errors.size else 0.0
        blocks = [
            ("para", f"Loss after each of {t.steps} full-batch steps (step 0 = before "
                     f"training); every step's manual gradients were checked against jax.grad "
                     f"(worst leaf relative error {worst:.2e})."),
            ("table", ["step", "E_total"], rows),
        ]
        lines = []
        for k, (layer, lt) in enumerate(zip(cfg.layers, t.layers)):
            for i, j in np.ndindex(layer.weights.shape):
                lines.append(f"{names.weight(k, i, j)} = {_f(lt.final_weights[i, j])}")
            if layer.shared_bias:
                lines.append(f"{names.bias(k)} = {_f(lt.final_bias)}")
            else:
                lines += [f"{names.bias(k, j)} = {_f(b)}" for j, b in enumerate(lt.final_bias)]
        blocks += [("subtitle", f"Parameters after {t.steps} steps"), ("lines", lines)]
        doc.append((f"Training for {t.steps} steps", blocks))

    # -- jax.grad agrees ----------------------------------------------------------------------
    blocks = [("para", f"jax.grad of the same loss gives the same gradients: "
                       f"max |manual - jax.grad| = {t.autodiff_max_abs_diff:.3e} over all "
                       f"parameters (float64).")]
    total = sum(l.weights.size + l.bias.size for l in cfg.layers)
    if total <= _MAX_TABLE_PARAMS:
        rows = []
        for k, (layer, lt) in enumerate(zip(cfg.layers, t.layers)):
            for i, j in np.ndindex(layer.weights.shape):
                a, b = lt.grad_weights[i, j], lt.autodiff_weights[i, j]
                rows.append([names.weight(k, i, j), f"{a:.10f}", f"{b:.10f}",
                             f"{abs(a - b):.1e}"])
            bias_pairs = ([(names.bias(k), lt.grad_bias, lt.autodiff_bias)] if layer.shared_bias
                          else [(names.bias(k, j), lt.grad_bias[j], lt.autodiff_bias[j])
                                for j in range(layer.width)])
            rows += [[nm, f"{float(a):.10f}", f"{float(b):.10f}", f"{abs(a - b):.1e}"]
                     for nm, a, b in bias_pairs]
        blocks.append(("table", ["parameter", "manual (chain rule)", "jax.grad", "|diff|"], rows))
    doc.append(("Check: jax.grad agrees", blocks))

    # -- errata -------------------------------------------------------------------------------
    errata = t.errata()
    if errata is not None:
        rows = [[e["quantity"], f"{e['seed_states']:.4f}", f"{e['correct']:.4f}",
                 "yes" if e["matches"] else "NO"] for e in errata]
        wrong = sum(not e["matches"] for e in errata)
        doc.append(("Errata: the seed's stated numbers", [
            ("table", ["quantity", "seed states", "correct", "matches"], rows),
            ("para", f"{wrong} of the {len(errata)} numbers the seed states are wrong: its "
                     f"hidden-layer values are right, everything from in_o1 on is not. Its "
                     f"in_h2 line also writes W2*i1 as 0.25*0.1 where W2 is 0.2 (the result it "
                     f"states, 0.3275 = 0.2*0.1 + 0.15*0.05 + 0.3, is right)."),
        ]))
    return doc


def _table_text(headers, rows) -> list[str]:
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows)]
    fmt = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()
    return [fmt(headers), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows]


def _render_text(doc) -> str:
    out = []
    for title, blocks in doc:
        out += [title, "=" * len(title)]
        for block in blocks:
            if block[0] == "lines":
                out += ["  " + line for line in block[1]]
            elif block[0] == "para":
                out.append(block[1])
            elif block[0] == "subtitle":
                out.append(f"-- {block[1]} --")
            elif block[0] == "table":
                out += ["  " + line for line in _table_text(block[1], block[2])]
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def _render_markdown(doc) -> str:
    out = []
    for index, (title, blocks) in enumerate(doc):
        out += [f"{'#' if index == 0 else '##'} {title}", ""]
        for block in blocks:
            if block[0] == "lines":
                out += ["```text", *block[1], "```", ""]
            elif block[0] == "para":
                out += [block[1], ""]
            elif block[0] == "subtitle":
                out += [f"### {block[1]}", ""]
            elif block[0] == "table":
                out.append("| " + " | ".join(block[1]) + " |")
                out.append("|" + "|".join("---" for _ in block[1]) + "|")
                out += ["| " + " | ".join(str(c) for c in row) + " |" for row in block[2]]
                out.append("")
    return "\n".join(out).rstrip() + "\n"
