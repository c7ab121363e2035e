"""Layers with hand-derived backward passes.

The layer contract
==================

A layer is a :class:`Layer`, a NamedTuple of three pure functions::

    init(key, input_shape)      -> (output_shape, params)
    forward(params, x)          -> (y, cache)
    backward(params, cache, dy) -> (dparams, dx)

``init`` builds parameters for an input of ``input_shape`` (the leading batch dimension may be
``-1``). ``forward`` computes the output and keeps in ``cache`` whatever the backward pass needs
(the residuals of ``jax.custom_vjp``). ``backward`` maps the cotangent ``dy = dE/dy`` to
``dparams = dE/dparams`` (a pytree shaped exactly like ``params``) and ``dx = dE/dx``: the chain
rule, written out. Layers without parameters use ``()``.

Every layer works on a batch ``(batch, features)`` and on a single example ``(features,)``, so
``jax.vmap`` over examples works. Shape problems raise ``ValueError`` while ``jit`` traces, so
they surface under ``jit`` too.

``serial(*layers)`` is itself a layer: its forward keeps each layer's cache, its backward walks
them in reverse.

The two remaining fields, ``name`` and ``config``, describe the layer (for error messages,
checkpoints and the command line); they play no part in the computation.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

__all__ = [
    "Layer",
    "InputShapeError",
    "serial",
    "Dense",
    "Sigmoid",
    "Tanh",
    "Relu",
    "LeakyRelu",
    "Gelu",
    "Softplus",
    "Identity",
    "elementwise",
    "ACTIVATIONS",
    "activation",
    "describe",
    "glorot_uniform",
    "he_normal",
]


class Layer(NamedTuple):
    """A layer: three pure functions plus a description. See the module docstring."""

    init: Callable[[Any, tuple], tuple[tuple, Any]]
    forward: Callable[[Any, jax.Array], tuple[jax.Array, Any]]
    backward: Callable[[Any, Any, jax.Array], tuple[Any, jax.Array]]
    name: str = "layer"
    config: tuple = ()


def describe(layer: Layer) -> dict:
    """A JSON-friendly description of a layer (or a whole network)."""
    if layer.name == "serial":
        return {"name": "serial", "layers": [describe(child) for child in layer.config]}
    return {"name": layer.name, **dict(layer.config)}


# --------------------------------------------------------------------------------------------
# Initialisers: (key, shape, dtype) -> array
# --------------------------------------------------------------------------------------------


def glorot_uniform(key, shape, dtype):
    """Glorot/Xavier uniform: keeps activation variance through sigmoid/tanh layers."""
    fan_in, fan_out = shape
    limit = math.sqrt(6.0 / (fan_in + fan_out))
    return jax.random.uniform(key, shape, dtype, -limit, limit)


def he_normal(key, shape, dtype):
    """He/Kaiming normal: compensates for ReLU-like units zeroing half their inputs."""
    fan_in, _ = shape
    return jax.random.normal(key, shape, dtype) * math.sqrt(2.0 / fan_in)


_INITIALISERS = {"glorot": glorot_uniform, "he": he_normal}


def _default_float():
    # float64 when the user enabled jax_enable_x64, else float32: JAX's own default.
    return jax.dtypes.canonicalize_dtype(jnp.float64)


class InputShapeError(ValueError):
    """A layer's own check on the shape of its input failed (``Dense`` of the wrong width).

    A ``ValueError``; its own type lets ``check_params`` tell "the inputs do not fit the first
    layer" from any other shape error.
    """


def _check_float(x, where):
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
        raise TypeError(f"{where} expects floating-point inputs, got dtype {jnp.result_type(x)}")


# --------------------------------------------------------------------------------------------
# Dense
# --------------------------------------------------------------------------------------------


def Dense(out_dim: int, shared_bias: bool = False, w_init="auto", b_init=0.0, dtype=None) -> Layer:
    """Fully connected layer ``y = x @ W + b``.

    ``W`` has shape ``(in, out)``: ``W[i, j]`` joins input ``i`` to neuron ``j`` (the seed
    code's layout). ``b`` has shape ``(out,)``, or ``()`` with ``shared_bias=True``: one number
    for the whole layer, as in the seed tutorial.

    ``w_init`` is ``"auto"`` (He for ReLU-like activations, Glorot otherwise, chosen by
    ``serial`` from the activation that follows), ``"glorot"``, ``"he"`` or a function
    ``(key, shape, dtype) -> array``. ``b_init`` is a number or such a function.
    """
    if not isinstance(out_dim, (int,)) or isinstance(out_dim, bool) or out_dim < 1:
        raise ValueError(f"Dense expects a positive integer out_dim, got {out_dim!r}")
    if isinstance(w_init, str) and w_init not in ("auto", *_INITIALISERS):
        raise ValueError(f"Dense w_init must be 'auto', 'glorot', 'he' or a function, got {w_init!r}")

    def init(key, input_shape):
        if len(input_shape) < 1:
            raise ValueError(f"Dense expects inputs of shape (..., features), got {tuple(input_shape)}")
        in_dim = int(input_shape[-1])
        if in_dim < 1:
            raise ValueError(f"Dense expects at least one input feature, got shape {tuple(input_shape)}")
        dt = dtype or _default_float()
        wi = _INITIALISERS.get(w_init if w_init != "auto" else "glorot", w_init)
        w = jnp.asarray(wi(key, (in_dim, out_dim), dt), dt)
        b_shape = () if shared_bias else (out_dim,)
        b = (jnp.asarray(b_init(key, b_shape, dt), dt) if callable(b_init)
             else jnp.full(b_shape, b_init, dt))
        return (*input_shape[:-1], out_dim), {"W": w, "b": b}

    def forward(params, x):
        w = params["W"]
        _check_float(x, "Dense")
        if x.ndim < 1 or x.shape[-1] != w.shape[0]:
            raise InputShapeError(
                f"Dense expects inputs of width {w.shape[0]}, got shape {tuple(x.shape)}")
        return x @ w + params["b"], x

    def backward(params, x, dy):
        """Chain rule through ``y = x @ W + b``.

        ``dE/dW = x.T @ dy`` (summed over the batch; ``dE/dW[i, j] = sum_n x[n, i] * dy[n, j]``),
        ``dE/db = sum_n dy[n]`` (and also summed over neurons for a shared bias),
        ``dE/dx = dy @ W.T``.
        """
        w = params["W"]
        x2 = x.reshape(-1, w.shape[0])
        dy2 = dy.reshape(-1, w.shape[1])
        dw = x2.T @ dy2
        db = jnp.sum(dy2) if shared_bias else jnp.sum(dy2, axis=0)
        dx = dy @ w.T
        return {"W": dw, "b": db}, dx

    config = (("out_dim", out_dim), ("shared_bias", shared_bias),
              ("w_init", w_init if isinstance(w_init, str) else getattr(w_init, "__name__", "custom")))
    # serial() resolves w_init="auto" by rebuilding the layer: with every other argument
    # (dtype, b_init) kept, which the config alone does not record.
    init.with_w_init = lambda new_w_init: Dense(out_dim, shared_bias, new_w_init, b_init, dtype)
    return Layer(init, forward, backward, "Dense", config)


# --------------------------------------------------------------------------------------------
# Element-wise activations
# --------------------------------------------------------------------------------------------


def elementwise(name: str, fn: Callable, backward: Callable, *, cache_output: bool,
                config: tuple = ()) -> Layer:
    """Build a parameter-free element-wise layer.

    ``backward(cache, dy) -> dx`` receives the output ``y`` when ``cache_output`` is true
    (sigmoid, tanh: their derivatives are cheapest from the output), else the input ``x``.
    """

    def init(key, input_shape):
        return tuple(input_shape), ()

    def forward(params, x):
        _check_float(x, name)
        y = fn(x)
        return y, (y if cache_output else x)

    def layer_backward(params, cache, dy):
        return (), backward(cache, dy)

    layer_backward.__doc__ = backward.__doc__
    return Layer(init, forward, layer_backward, name, config)


def _sigmoid_backward(y, dy):
    """``dE/dx = dy * y * (1 - y)``, the sigmoid's derivative from its output."""
    return dy * y * (1 - y)


def _tanh_backward(y, dy):
    """``dE/dx = dy * (1 - y**2)``, the tanh derivative from its output."""
    return dy * (1 - y * y)


def _relu(x):
    # where(), not maximum(): jax.grad of maximum(x, 0) at x == 0 is 1/2, of this 0, matching
    # the backward below.
    return jnp.where(x > 0, x, jnp.zeros_like(x))


def _relu_backward(x, dy):
    """``dE/dx = dy * [x > 0]`` (the subgradient 0 at ``x == 0``)."""
    return jnp.where(x > 0, dy, jnp.zeros_like(dy))


def _identity_backward(x, dy):
    """``dE/dx = dy``."""
    return dy


def _softplus_backward(x, dy):
    """``dE/dx = dy * sigmoid(x)``, since ``d/dx log(1 + e^x) = 1 / (1 + e^-x)``."""
    return dy * jax.nn.sigmoid(x)


_GELU_C = math.sqrt(2.0 / math.pi)
_GELU_A = 0.044715


def _gelu(x):
    return 0.5 * x * (1 + jnp.tanh(_GELU_C * (x + _GELU_A * x**3)))


def _gelu_backward(x, dy):
    """Tanh-form GELU ``y = x/2 * (1 + tanh(u))``, ``u = c (x + a x^3)``, ``c = sqrt(2/pi)``.

    ``dE/dx = dy * (1/2 (1 + t) + x/2 (1 - t^2) c (1 + 3 a x^2))`` with ``t = tanh(u)``.
    """
    t = jnp.tanh(_GELU_C * (x + _GELU_A * x**3))
    d = 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * _GELU_C * (1 + 3 * _GELU_A * x * x)
    return dy * d


Sigmoid = elementwise("Sigmoid", jax.nn.sigmoid, _sigmoid_backward, cache_output=True)
Tanh = elementwise("Tanh", jnp.tanh, _tanh_backward, cache_output=True)
Relu = elementwise("Relu", _relu, _relu_backward, cache_output=False)
Gelu = elementwise("Gelu", _gelu, _gelu_backward, cache_output=False)
Softplus = elementwise("Softplus", lambda x: jnp.logaddexp(x, 0), _softplus_backward,
                       cache_output=False)
Identity = elementwise("Identity", lambda x: x, _identity_backward, cache_output=False)


def LeakyRelu(slope: float = 0.01) -> Layer:
    """``y = x`` for ``x > 0``, else ``slope * x``."""
    slope = float(slope)

    def fn(x):
        return jnp.where(x > 0, x, slope * x)

    def backward(x, dy):
        """``dE/dx = dy`` where ``x > 0``, else ``slope * dy``."""
        return jnp.where(x > 0, dy, slope * dy)

    return elementwise("LeakyRelu", fn, backward, cache_output=False, config=(("slope", slope),))


ACTIVATIONS = {
    "sigmoid": lambda: Sigmoid,
    "tanh": lambda: Tanh,
    "relu": lambda: Relu,
    "leaky_relu": lambda: LeakyRelu(),
    "gelu": lambda: Gelu,
    "softplus": lambda: Softplus,
    "identity": lambda: Identity,
}

_RELU_LIKE = {"Relu", "LeakyRelu", "Gelu"}


def activation(name: str) -> Layer:
    """The activation layer called ``name`` (``"relu"``, ``"tanh"``, ...)."""
    try:
        return ACTIVATIONS[name]()
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown activation {name!r}; expected one of: {', '.join(sorted(ACTIVATIONS))}"
        ) from None


# --------------------------------------------------------------------------------------------
# Composition
# --------------------------------------------------------------------------------------------


def _with_init(layer: Layer, w_init: str) -> Layer:
    rebuild = getattr(layer.init, "with_w_init", None)
    if rebuild is not None:
        return rebuild(w_init)._replace(forward=layer.forward, backward=layer.backward)
    cfg = dict(layer.config)
    return Dense(cfg["out_dim"], cfg["shared_bias"], w_init=w_init)._replace(
        forward=layer.forward, backward=layer.backward)


def serial(*layers: Layer) -> Layer:
    """Compose layers in sequence; the result is itself a layer.

    Its params are a tuple, one entry per layer (``()`` for parameter-free layers).
    A ``Dense`` left at ``w_init="auto"`` gets He initialisation when a ReLU-like activation
    follows it, Glorot otherwise.
    """
    if not layers:
        raise ValueError("serial expects at least one layer, got none")
    for i, layer in enumerate(layers):
        if not isinstance(layer, Layer):
            hint = " (did you forget to call it, e.g. Dense(10)?)" if callable(layer) else ""
            raise TypeError(f"serial: argument {i} is not a Layer, got {layer!r}{hint}")
    init_layers = list(layers)
    for i, layer in enumerate(layers):
        if layer.name == "Dense" and dict(layer.config).get("w_init") == "auto":
            nxt = layers[i + 1].name if i + 1 < len(layers) else None
            init_layers[i] = _with_init(layer, "he" if nxt in _RELU_LIKE else "glorot")

    def where(i):
        return f"layer {i} ({layers[i].name})"

    def init(key, input_shape):
        keys = jax.random.split(key, len(layers))
        params = []
        shape = tuple(input_shape)
        for i, (layer, k) in enumerate(zip(init_layers, keys)):
            try:
                shape, p = layer.init(k, shape)
            except ValueError as e:
                raise ValueError(f"{where(i)}: {e}") from None
            params.append(p)
        return shape, tuple(params)

    def forward(params, x):
        if not isinstance(params, (tuple, list)) or len(params) != len(layers):
            got = len(params) if isinstance(params, (tuple, list)) else type(params).__name__
            raise ValueError(f"serial network of {len(layers)} layers expects a tuple of "
                             f"{len(layers)} parameter entries, got {got}")
        caches = []
        for i, (layer, p) in enumerate(zip(layers, params)):
            try:
                x, c = layer.forward(p, x)
            except (ValueError, TypeError) as e:
                raise type(e)(f"{where(i)}: {e}") from None
            caches.append(c)
        return x, tuple(caches)

    def backward(params, caches, dy):
        """Walk the layers in reverse: each maps ``dE/d(its output)`` to ``dE/d(its input)``."""
        grads = [None] * len(layers)
        for i in reversed(range(len(layers))):
            grads[i], dy = layers[i].backward(params[i], caches[i], dy)
        return tuple(grads), dy

    return Layer(init, forward, backward, "serial", tuple(layers))
