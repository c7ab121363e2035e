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

Every layer works on a batch ``(batch, ...)`` and on a single example, so ``jax.vmap`` over
examples works. Shape problems raise ``ValueError`` (an input that does not fit a layer:
:class:`~jaxbp.errors.InputShapeError`) while ``jit`` traces, so they surface under ``jit`` too.
A bad constructor argument is one :class:`~jaxbp.errors.ArgumentError` in every layer, raised by
the shared checkers of :mod:`jaxbp.arguments`.

State and randomness
--------------------

A layer with state (BatchNorm's running statistics) or randomness (Dropout's mask) has two
more functions; every other layer leaves them ``None`` and stays as short as above::

    init_state(input_shape)          -> state
    apply(params, state, x, context) -> (y, cache, new_state)

``context`` is a :class:`Context` ``(train, key)``: ``train`` a Python bool (training or
evaluation: batch or running statistics, a random mask or none), ``key`` a PRNG key or
``None``. State is a pytree beside params, returned, never mutated; keys are passed in, never
stored. ``backward`` is unchanged: it reads what the forward used (the batch statistics, the
mask) from the cache, so the manual gradient and ``jax.grad`` of one call are gradients of the
same function. ``forward(params, x)`` of such a layer is ``apply`` in training mode from the
initial state without a key (a layer that needs a key then says so).

:func:`apply` and :func:`init_state` work on any layer: for a stateless layer the state is
``()`` and ``apply`` is ``forward``. Combinators thread both: each child gets its own entry of
the state (a tuple, like params) and its own key ``fold_in(key, i)``.

Composition
-----------

``serial(*layers)``, ``residual(*layers)`` (``y = x + f(x)``) and ``concat(*layers)``
(``y = [f_1(x), f_2(x), ...]`` joined on the last axis) are themselves layers: their forward
keeps each child's cache, their backward walks them in reverse.

Description
-----------

``name`` is the layer's registered name and ``config`` the ``(argument, value)`` pairs its
factory was called with, so :func:`jaxbp.model.build` rebuilds it from
:func:`jaxbp.model.describe`'s JSON. Neither plays a part in the computation. Every layer
family registers its layers in :mod:`jaxbp.registry` the same way: ``register_layer`` imported
at the top of its module, called at the bottom (this module's are the last lines below).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from . import arguments
from .errors import ArgumentError, InputShapeError
from .registry import factory, register_layer

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
    "Context",
    "init_state",
    "apply",
    "output_shape",
    "stateful",
    "bound",
    "residual",
    "concat",
    "glorot_uniform",
    "explicit_init",
    "he_normal",
    "fans",
    "INITIALISERS",
    "default_float",
    "check_float",
]


class Context(NamedTuple):
    """What a layer with state or randomness is told about one call (module docstring)."""

    train: bool = True
    key: Any = None


class Layer(NamedTuple):
    """A layer: three pure functions plus a description; see the module docstring.

    ``init_state`` and ``apply`` are ``None`` unless the layer has state or randomness.
    """

    init: Callable[[Any, tuple], tuple[tuple, Any]]
    forward: Callable[[Any, jax.Array], tuple[jax.Array, Any]]
    backward: Callable[[Any, Any, jax.Array], tuple[Any, jax.Array]]
    name: str = "layer"
    config: tuple = ()
    init_state: Callable[[tuple], Any] | None = None
    apply: Callable[[Any, Any, jax.Array, Context], tuple[jax.Array, Any, Any]] | None = None

    @property
    def children(self) -> tuple:
        """The layers a combinator holds (``serial``, ``residual``, ``concat``), else ``()``."""
        return tuple(dict(self.config or ()).get("layers", ()))

    @property
    def has_state(self) -> bool:
        """Does the layer (or any layer inside it) have state or randomness?"""
        return self.apply is not None


def init_state(layer: Layer, input_shape) -> Any:
    """The initial state of ``layer`` for inputs of ``input_shape`` (``()`` if it has none)."""
    return layer.init_state(tuple(input_shape)) if layer.init_state is not None else ()


def apply(layer: Layer, params, state, x, *, key=None, train: bool = True):
    """Run ``layer`` with explicit state and randomness: ``(y, cache, new_state)``.

    For a stateless layer this is ``forward``, and the state passes through unchanged.
    """
    if layer.apply is None:
        y, cache = layer.forward(params, x)
        return y, cache, state
    return layer.apply(params, state, x, Context(bool(train), key))


def output_shape(layer: Layer, input_shape) -> tuple:
    """The output shape ``layer.init`` reports for ``input_shape`` (no arrays are made)."""
    found = []

    def shapes_only():
        shape, params = layer.init(jax.random.key(0), tuple(input_shape))
        found.append(tuple(shape))
        return params

    jax.eval_shape(shapes_only)
    return found[0]


def stateful(init, apply_fn, backward, init_state_fn, name: str, config: tuple = ()) -> Layer:
    """A :class:`Layer` with state or randomness, from its four functions.

    Its ``forward`` is ``apply`` in training mode, from the initial state, without a key.
    """

    def forward(params, x):
        state = init_state_fn(tuple(jnp.shape(x)))
        y, cache, _ = apply_fn(params, state, x, Context(True, None))
        return y, cache

    return Layer(init, forward, backward, name, config, init_state_fn, apply_fn)


def bound(spec, init, forward, backward, name: str, config: tuple = ()) -> Layer:
    """A :class:`Layer` from three functions written once for every instance, each taking
    ``spec`` (the instance's checked arguments) first: ``init(spec, key, input_shape)``,
    ``forward(spec, params, x)``, ``backward(spec, params, cache, dy)``. The layer's backward
    keeps ``backward``'s docstring (its formula)."""

    def layer_init(key, input_shape):
        return init(spec, key, input_shape)

    def layer_forward(params, x):
        return forward(spec, params, x)

    def layer_backward(params, cache, dy):
        return backward(spec, params, cache, dy)

    layer_backward.__doc__ = backward.__doc__
    return Layer(layer_init, layer_forward, layer_backward, name, config)


# --------------------------------------------------------------------------------------------
# Initialisers: (key, shape, dtype) -> array
# --------------------------------------------------------------------------------------------


def fans(shape) -> tuple[int, int]:
    """``(fan_in, fan_out)`` of a weight of ``shape``: a matrix ``(in, out)``, or a kernel
    ``(*spatial, in, out)`` whose every output sums over the kernel volume times ``in``."""
    receptive = math.prod(shape[:-2])
    return receptive * shape[-2], receptive * shape[-1]


def glorot_uniform(key, shape, dtype):
    """Glorot/Xavier uniform, ``limit = sqrt(6 / (fan_in + fan_out))``: keeps activation
    variance through sigmoid/tanh layers (matrices and convolution kernels alike)."""
    fan_in, fan_out = fans(shape)
    limit = math.sqrt(6.0 / (fan_in + fan_out))
    return jax.random.uniform(key, shape, dtype, -limit, limit)


def he_normal(key, shape, dtype):
    """He/Kaiming normal, ``std = sqrt(2 / fan_in)``: compensates for ReLU-like units zeroing
    half their inputs (matrices and convolution kernels alike)."""
    fan_in, _ = fans(shape)
    return jax.random.normal(key, shape, dtype) * math.sqrt(2.0 / fan_in)


# The initialisers a layer's ``w_init`` may name.
INITIALISERS = {"glorot": glorot_uniform, "he": he_normal}


def default_float():
    """float64 when the user enabled ``jax_enable_x64``, else float32: JAX's own default."""
    return jax.dtypes.canonicalize_dtype(jnp.float64)


def check_float(x, where: str) -> None:
    """:class:`ArgumentError` (a ``TypeError``) naming the layer ``where`` unless ``x`` is
    floating point."""
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
        raise ArgumentError(
            f"{where} expects floating-point inputs, got dtype {jnp.result_type(x)}"
        )


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
    out_dim = arguments.positive_int("Dense", "out_dim", out_dim)
    shared_bias = arguments.flag("Dense", "shared_bias", shared_bias)
    w_init = arguments.initialiser("Dense", "w_init", w_init, ("auto", *INITIALISERS))
    b_init = arguments.init_value("Dense", "b_init", b_init)
    dtype = arguments.float_dtype("Dense", dtype)

    def init(key, input_shape):
        if len(input_shape) < 1:
            raise InputShapeError(
                f"Dense expects inputs of shape (..., features), got {tuple(input_shape)}"
            )
        in_dim = int(input_shape[-1])
        if in_dim < 1:
            raise InputShapeError(
                f"Dense expects at least one input feature, got shape {tuple(input_shape)}"
            )
        dt = jnp.dtype(dtype) if dtype is not None else default_float()
        wi = INITIALISERS.get(w_init if w_init != "auto" else "glorot", w_init)
        w = jnp.asarray(wi(key, (in_dim, out_dim), dt), dt)
        b_shape = () if shared_bias else (out_dim,)
        b = (
            jnp.asarray(b_init(key, b_shape, dt), dt)
            if callable(b_init)
            else jnp.full(b_shape, b_init, dt)
        )
        return (*input_shape[:-1], out_dim), {"W": w, "b": b}

    def forward(params, x):
        w = params["W"]
        check_float(x, "Dense")
        if x.ndim < 1 or x.shape[-1] != w.shape[0]:
            raise InputShapeError(
                f"Dense expects inputs of width {w.shape[0]}, got shape {tuple(x.shape)}"
            )
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

    # The arguments as checked (a function stays a function; describe() refuses it), so
    # that Dense(**dict(config)) rebuilds this very layer: serial() does, to resolve "auto".
    config = (
        ("out_dim", out_dim),
        ("shared_bias", shared_bias),
        ("w_init", w_init),
        ("b_init", b_init),
        ("dtype", dtype),
    )
    return Layer(init, forward, backward, "Dense", config)


# --------------------------------------------------------------------------------------------
# Element-wise activations
# --------------------------------------------------------------------------------------------


def elementwise(
    name: str, fn: Callable, backward: Callable, *, cache_output: bool, config: tuple = ()
) -> Layer:
    """Build a parameter-free element-wise layer.

    ``backward(cache, dy) -> dx`` receives the output ``y`` when ``cache_output`` is true
    (sigmoid, tanh: their derivatives are cheapest from the output), else the input ``x``.
    """

    def init(key, input_shape):
        return tuple(input_shape), ()

    def forward(params, x):
        check_float(x, name)
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
Softplus = elementwise(
    "Softplus", lambda x: jnp.logaddexp(x, 0), _softplus_backward, cache_output=False
)
Identity = elementwise("Identity", lambda x: x, _identity_backward, cache_output=False)


def LeakyRelu(slope: float = 0.01) -> Layer:
    """``y = x`` for ``x > 0``, else ``slope * x``."""
    slope = arguments.number("LeakyRelu", "slope", slope)

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
        raise ArgumentError(
            f"unknown activation {name!r}; expected one of: {', '.join(sorted(ACTIVATIONS))}"
        ) from None


# --------------------------------------------------------------------------------------------
# Composition
# --------------------------------------------------------------------------------------------


def explicit_init(layers) -> list:
    """``layers`` (a chain, as ``serial`` runs it) with every ``w_init="auto"`` made explicit:
    He initialisation when a ReLU-like activation follows the layer, Glorot otherwise; each
    such layer rebuilt through its registered factory with that choice in its config."""
    resolved = list(layers)
    for i, layer in enumerate(layers):
        config = dict(layer.config or ())
        if config.get("w_init") != "auto":
            continue
        following = layers[i + 1].name if i + 1 < len(layers) else None
        config["w_init"] = "he" if following in _RELU_LIKE else "glorot"
        resolved[i] = factory(layer.name)(**config)
    return resolved


def _resolve_auto_init(layers: tuple) -> list:
    """:func:`explicit_init`'s initialisers, taken into the layers as they are: a layer whose
    forward or backward was replaced (a fault, a custom rule) keeps them, and its config
    still says ``"auto"``."""
    return [
        layer if new is layer else layer._replace(init=new.init)
        for layer, new in zip(layers, explicit_init(layers))
    ]


def _check_children(who: str, layers: tuple) -> None:
    if not layers:
        raise ArgumentError(f"{who} expects at least one layer, got none")
    for i, layer in enumerate(layers):
        if not isinstance(layer, Layer):
            hint = " (did you forget to call it, e.g. Dense(10)?)" if callable(layer) else ""
            raise ArgumentError(f"{who}: argument {i} is not a Layer, got {layer!r}{hint}")


def _check_entries(who: str, what: str, entries, count: int) -> None:
    if not isinstance(entries, (tuple, list)) or len(entries) != count:
        got = len(entries) if isinstance(entries, (tuple, list)) else type(entries).__name__
        raise ValueError(
            f"{who} of {count} layers expects a tuple of {count} {what} entries, got {got}"
        )


def _child_key(key, i: int):
    return None if key is None else jax.random.fold_in(key, i)


def _apply_child(who: str, i: int, layer: Layer, params, state, x, context: Context):
    """:func:`apply` of child ``i`` with its own key; its errors name where it sits."""
    try:
        return apply(layer, params, state, x, key=_child_key(context.key, i), train=context.train)
    except (ValueError, TypeError) as e:
        # One prefix per level: "layer 2 (residual): layer 0 (Dense): Dense expects ..."
        raise type(e)(f"{who} {i} ({layer.name}): {e}") from None


def _chain_apply(layers, params, state, x, context: Context):
    """Run ``layers`` one after the other: ``(y, caches, new_states)``."""
    caches, states = [], []
    for i, (layer, p, s) in enumerate(zip(layers, params, state)):
        x, c, s = _apply_child("layer", i, layer, p, s, x, context)
        caches.append(c)
        states.append(s)
    return x, tuple(caches), tuple(states)


def _chain_backward(layers, params, caches, dy):
    """The reverse walk: each layer maps ``dE/d(its output)`` to ``dE/d(its input)``."""
    grads = [None] * len(layers)
    for i in reversed(range(len(layers))):
        grads[i], dy = layers[i].backward(params[i], caches[i], dy)
    return tuple(grads), dy


def _chain_init(who: str, layers, key, input_shape):
    params, shape = [], tuple(input_shape)
    for i, (layer, k) in enumerate(zip(layers, jax.random.split(key, len(layers)))):
        try:
            shape, p = layer.init(k, shape)
        except ValueError as e:
            # The user's mistakes keep their class (InputShapeError stays one); others read as
            # the ValueError they were.
            kind = type(e) if isinstance(e, (ArgumentError, InputShapeError)) else ValueError
            raise kind(f"{who} {i} ({layer.name}): {e}") from None
        params.append(p)
    return shape, tuple(params)


def _chain_init_state(layers, input_shape) -> tuple:
    states, shape = [], tuple(input_shape)
    for layer in layers:
        states.append(init_state(layer, shape))
        shape = output_shape(layer, shape)
    return tuple(states)


def _combinator(name: str, layers: tuple, init, run, backward, init_state_fn) -> Layer:
    """A layer built from children: with ``apply`` and ``init_state`` only if a child has state.

    ``run(params, state, x, context) -> (y, cache, new_state)`` is the one forward.
    """
    config = (("layers", tuple(layers)),)
    if any(layer.has_state for layer in layers):
        return Layer(
            init,
            lambda p, x: _stateless_forward(run, layers, p, x),
            backward,
            name,
            config,
            init_state_fn,
            run,
        )

    def forward(params, x):
        y, cache, _ = run(params, tuple(() for _ in layers), x, Context())
        return y, cache

    return Layer(init, forward, backward, name, config)


def _stateless_forward(run, layers, params, x):
    y, cache, _ = run(params, _chain_init_state(layers, jnp.shape(x)), x, Context())
    return y, cache


def serial(*layers: Layer) -> Layer:
    """Compose layers in sequence; the result is itself a layer.

    Its params (and state) are a tuple, one entry per layer (``()`` for parameter-free
    layers). A layer left at ``w_init="auto"`` gets He initialisation when a ReLU-like
    activation follows it, Glorot otherwise.
    """
    _check_children("serial", layers)
    init_layers = _resolve_auto_init(layers)

    def init(key, input_shape):
        return _chain_init("layer", init_layers, key, input_shape)

    def run(params, state, x, context):
        _check_entries("serial network", "parameter", params, len(layers))
        _check_entries("serial network", "state", state, len(layers))
        return _chain_apply(layers, params, state, x, context)

    def backward(params, caches, dy):
        """Walk the layers in reverse: each maps ``dE/d(its output)`` to ``dE/d(its input)``."""
        return _chain_backward(layers, params, caches, dy)

    return _combinator(
        "serial", layers, init, run, backward, lambda shape: _chain_init_state(layers, shape)
    )


def residual(*layers: Layer) -> Layer:
    """``y = x + f(x)``, with ``f = serial(*layers)``; the output must have the input's shape.

    Backward: ``dE/dx = dy + (dE/dx through f)``, the sum of both paths (the skip connection
    passes ``dy`` through unchanged); ``dE/dparams`` are ``f``'s.
    """
    _check_children("residual", layers)
    body = serial(*layers)

    def init(key, input_shape):
        shape, params = body.init(key, input_shape)
        if tuple(shape) != tuple(input_shape):
            raise ValueError(
                f"residual: the branch maps shape {tuple(input_shape)} to "
                f"{tuple(shape)}; y = x + f(x) needs f to keep the shape"
            )
        return shape, params

    def run(params, state, x, context):
        y, cache, new_state = apply(body, params, state, x, key=context.key, train=context.train)
        if jnp.shape(y) != jnp.shape(x):
            raise ValueError(
                f"residual: the branch maps shape {tuple(jnp.shape(x))} to "
                f"{tuple(jnp.shape(y))}; y = x + f(x) needs f to keep the shape"
            )
        return x + y, cache, new_state

    def backward(params, cache, dy):
        """``dE/dx = dy + f.backward(dy)``: the skip path and the branch path, summed."""
        grads, dx = body.backward(params, cache, dy)
        return grads, dy + dx

    return _combinator(
        "residual", layers, init, run, backward, lambda shape: init_state(body, shape)
    )


def concat(*layers: Layer) -> Layer:
    """Branches on the same input, joined on the last axis: ``y = [f_1(x), f_2(x), ...]``.

    Params (and state) are a tuple, one entry per branch. Backward: ``dy`` is split along the
    last axis into each branch's part; ``dE/dx`` is the sum of the branches' input gradients
    (``x`` feeds every branch).
    """
    _check_children("concat", layers)

    def init(key, input_shape):
        keys = jax.random.split(key, len(layers))
        shapes, params = [], []
        for layer, k in zip(layers, keys):
            shape, p = _chain_init("branch", (layer,), k, input_shape)
            shapes.append(shape)
            params.append(p[0])
        if len({s[:-1] for s in shapes}) > 1:
            raise ValueError(
                f"concat: the branches' outputs differ before the last axis: "
                f"{', '.join(map(str, shapes))}"
            )
        return (*shapes[0][:-1], sum(s[-1] for s in shapes)), tuple(params)

    def run(params, state, x, context):
        _check_entries("concat", "parameter", params, len(layers))
        outs, caches, states = [], [], []
        for i, (layer, p, s) in enumerate(zip(layers, params, state)):
            y, c, s = _apply_child("branch", i, layer, p, s, x, context)
            outs.append(y)
            caches.append((c, y.shape[-1]))
            states.append(s)
        return jnp.concatenate(outs, axis=-1), tuple(caches), tuple(states)

    def backward(params, caches, dy):
        """``dy_i = dy[..., offset_i : offset_i + width_i]``; ``dE/dx = sum_i dx_i``."""
        grads, dx, offset = [], None, 0
        for layer, p, (c, width) in zip(layers, params, caches):
            g, d = layer.backward(p, c, dy[..., offset : offset + width])
            grads.append(g)
            dx = d if dx is None else dx + d
            offset += width
        return tuple(grads), dx

    def init_state_fn(shape):
        return tuple(init_state(layer, shape) for layer in layers)

    return _combinator("concat", layers, init, run, backward, init_state_fn)


# --------------------------------------------------------------------------------------------
# Registration: the names descriptions use (jaxbp.model.build)
# --------------------------------------------------------------------------------------------

for _layer in (Sigmoid, Tanh, Relu, Gelu, Softplus, Identity):
    register_layer(_layer.name, _layer)
register_layer("Dense", Dense)
register_layer("LeakyRelu", LeakyRelu)
register_layer("serial", serial)
register_layer("residual", residual)
register_layer("concat", concat)
