"""Llama's layers with hand-written backward passes: ``RMSNorm``, ``SwiGLU``, and weight tying.

``RMSNorm`` and ``SwiGLU`` follow the layer contract of :mod:`jaxbp.layers`. ``tied`` is a
combinator, like ``serial``: a network in which one parameter is used twice (GPT-2's and
llm.c's output projection is the token embedding transposed). It holds the shared matrix once;
its backward adds the gradients of both uses. Grouped-query attention and rotary positions are
options of :func:`jaxbp.MultiHeadAttention` (``num_kv_heads``, ``rope``, ``bias=False``).

Shapes: any leading axes, features last: ``(batch, time, dim)``, ``(time, dim)``, ``(batch, dim)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from . import arguments
from .layers import (
    InputShapeError,
    Layer,
    apply,
    check_float,
    default_float,
    glorot_uniform,
    init_state,
    serial,
)
from .registry import register_layer

__all__ = ["RMSNorm", "SwiGLU", "tied"]


def _dtype_name(dtype):
    return None if dtype is None else jnp.dtype(dtype).name


def _sum_to_last(a):
    """Sum over every axis but the last: the gradient of a parameter broadcast over them."""
    return a.reshape(-1, a.shape[-1]).sum(axis=0)


def _check_features(layer: str, x, features: int) -> None:
    check_float(x, layer)
    if x.ndim < 1 or x.shape[-1] != features:
        raise InputShapeError(
            f"{layer} expects inputs of shape (..., features) with {features} features, "
            f"got shape {tuple(x.shape)}"
        )


def _features(layer: str, input_shape) -> int:
    if len(input_shape) < 1 or int(input_shape[-1]) < 1:
        raise ValueError(
            f"{layer} expects inputs of shape (..., features), got shape {tuple(input_shape)}"
        )
    return int(input_shape[-1])


# --------------------------------------------------------------------------------------------
# RMSNorm
# --------------------------------------------------------------------------------------------


def RMSNorm(eps: float = 1e-6, dtype=None) -> Layer:
    """Root-mean-square normalisation over the last axis, then a scale (no centring, no bias)::

        rstd = 1 / sqrt(mean(x^2) + eps),  xhat = x * rstd,  y = xhat * scale

    ``scale`` has shape ``(features,)``, ones at init: PyTorch ``nn.RMSNorm``'s ``weight``.
    """
    eps = arguments.number("RMSNorm", "eps", eps, check=lambda v: v > 0, expect="> 0")
    dtype = arguments.float_dtype("RMSNorm", dtype)

    def init(key, input_shape):
        features = _features("RMSNorm", input_shape)
        return tuple(input_shape), {"scale": jnp.ones(features, dtype or default_float())}

    def forward(params, x):
        _check_features("RMSNorm", x, params["scale"].shape[0])
        rstd = jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)
        xhat = x * rstd
        return xhat * params["scale"], (xhat, rstd)

    def backward(params, cache, dy):
        """``dscale = sum over rows of dy * xhat``, ``dxhat = dy * scale``, and::

            dx = rstd * (dxhat - xhat * mean(dxhat * xhat))

        (mean over the last axis; LayerNorm's backward without the centring term, as ``xhat``
        depends on ``x`` only through the row's mean square).
        """
        xhat, rstd = cache
        dxhat = dy * params["scale"]
        dx = rstd * (dxhat - xhat * jnp.mean(dxhat * xhat, axis=-1, keepdims=True))
        return {"scale": _sum_to_last(dy * xhat)}, dx

    config = (("eps", eps), *((("dtype", _dtype_name(dtype)),) if dtype else ()))
    return Layer(init, forward, backward, "RMSNorm", config)


# --------------------------------------------------------------------------------------------
# SwiGLU
# --------------------------------------------------------------------------------------------


def _silu_and_slope(a):
    """``silu(a) = a * sigmoid(a)`` and its slope ``sig(a) * (1 + a * (1 - sig(a)))``."""
    sig = jax.nn.sigmoid(a)
    return a * sig, sig * (1 + a * (1 - sig))


def SwiGLU(hidden: int, dtype=None) -> Layer:
    """Llama's feed-forward block, a gated linear unit with SiLU, no biases::

        a = x @ W1 (gate),  b = x @ W3 (up),  h = silu(a) * b,  y = h @ W2 (down)

    ``W1``, ``W3`` are ``(dim, hidden)`` and ``W2`` is ``(hidden, dim)`` (Glorot): Llama's
    ``w1``, ``w3``, ``w2``; a PyTorch ``Linear``'s ``weight`` is their transpose.
    """
    hidden = arguments.positive_int("SwiGLU", "hidden", hidden)
    dtype = arguments.float_dtype("SwiGLU", dtype)

    def init(key, input_shape):
        dim, dt = _features("SwiGLU", input_shape), dtype or default_float()
        k1, k3, k2 = jax.random.split(key, 3)
        params = {
            "W1": glorot_uniform(k1, (dim, hidden), dt),
            "W3": glorot_uniform(k3, (dim, hidden), dt),
            "W2": glorot_uniform(k2, (hidden, dim), dt),
        }
        return tuple(input_shape), params

    def forward(params, x):
        _check_features("SwiGLU", x, params["W1"].shape[0])
        a, b = x @ params["W1"], x @ params["W3"]
        s, slope = _silu_and_slope(a)
        h = s * b
        return h @ params["W2"], (x, b, s, slope, h)

    def backward(params, cache, dy):
        """Three ``matmul_backward``s around the gate::

        dW2 = h^T dy,  dh = dy W2^T
        db = dh * silu(a),  da = dh * b * sigmoid(a) * (1 + a * (1 - sigmoid(a)))
        dW1 = x^T da,  dW3 = x^T db,  dx = da W1^T + db W3^T
        """
        x, b, s, slope, h = cache
        dh = dy @ params["W2"].T
        da, db = dh * b * slope, dh * s
        x2 = x.reshape(-1, x.shape[-1])

        def rows(a):
            return a.reshape(-1, a.shape[-1])

        grads = {"W1": x2.T @ rows(da), "W3": x2.T @ rows(db), "W2": rows(h).T @ rows(dy)}
        return grads, da @ params["W1"].T + db @ params["W3"].T

    config = (("hidden", hidden), *((("dtype", _dtype_name(dtype)),) if dtype else ()))
    return Layer(init, forward, backward, "SwiGLU", config)


# --------------------------------------------------------------------------------------------
# tied: one parameter, two uses
# --------------------------------------------------------------------------------------------


def _parse_path(name: str, path) -> tuple:
    """``"0.W"`` -> ``(0, "W")``: integers index a tuple of params, names a dict."""
    if not isinstance(path, str) or not path or any(not p for p in path.split(".")):
        raise ValueError(
            f"tied expects {name} to be a parameter path such as '0.W' (layer 0's W), got {path!r}"
        )
    return tuple(int(p) if p.isdigit() else p for p in path.split("."))


def _lookup(params, parts: tuple, name: str, path: str):
    node = params
    for part in parts:
        if isinstance(part, int) and isinstance(node, (tuple, list)) and part < len(node):
            node = node[part]
        elif isinstance(part, str) and isinstance(node, dict) and part in node:
            node = node[part]
        else:
            node = None
            break
    if node is None or not hasattr(node, "shape"):
        raise ValueError(
            f"tied: {name} {path!r} names no parameter of the network; expected a path to "
            f"one array, such as '0.W'"
        )
    return node


def _replace(params, parts: tuple, value, *, remove: bool = False):
    """``params`` with the leaf at ``parts`` set to ``value``, or without it (``remove``)."""
    head, rest = parts[0], parts[1:]
    if isinstance(params, dict):
        inner = {k: v for k, v in params.items() if not (remove and not rest and k == head)}
        if rest:
            inner[head] = _replace(params[head], rest, value, remove=remove)
        elif not remove:
            inner[head] = value
        return inner
    entries = list(params)
    entries[head] = _replace(entries[head], rest, value, remove=remove) if rest else value
    return type(params)(entries)


def tied(*layers: Layer, source: str, target: str, transpose: bool = False) -> Layer:
    """``serial(*layers)`` with parameter ``target`` not a parameter of its own but ``source``
    (transposed when ``transpose``), as GPT-2 ties its output projection to the embedding::

        tied(Embedding(V, D), ..., Dense(V), source="0.W", target="5.W", transpose=True)

    Paths index the serial network's params: ``"0.W"`` is layer 0's ``W``. The params are
    ``serial``'s without the ``target`` entry; both shapes are checked at ``init``.
    """
    transpose = arguments.flag("tied", "transpose", transpose)
    source_parts, target_parts = _parse_path("source", source), _parse_path("target", target)
    if source_parts == target_parts:
        raise ValueError(f"tied expects a target other than the source, got both {source!r}")
    if not isinstance(target_parts[-1], str):
        raise ValueError(
            f"tied expects a target that names a parameter such as '5.W', got {target!r}"
        )
    body = serial(*layers)

    def shared(source_value):
        return source_value.T if transpose else source_value

    def full(params):
        """The serial network's params: ``target`` filled in from ``source``."""
        return _replace(
            params, target_parts, shared(_lookup(params, source_parts, "source", source))
        )

    def init(key, input_shape):
        shape, params = body.init(key, input_shape)
        source_value = _lookup(params, source_parts, "source", source)
        target_value = _lookup(params, target_parts, "target", target)
        expected = shared(source_value).shape
        if target_value.shape != expected:
            of = "the transpose of" if transpose else "the shape of"
            raise ValueError(
                f"tied: target {target!r} has shape {tuple(target_value.shape)}, expected "
                f"{tuple(expected)}, {of} source {source!r} {tuple(source_value.shape)}"
            )
        return shape, _replace(params, target_parts, None, remove=True)

    def forward(params, x):
        return body.forward(full(params), x)

    def backward(params, cache, dy):
        """The shared matrix gets both uses' gradients, added::

        dE/dsource = (dE/dsource through its own layer) + (dE/dtarget)^T   (transpose)
        dE/dsource = (dE/dsource through its own layer) + dE/dtarget        (otherwise)
        """
        grads, dx = body.backward(full(params), cache, dy)
        through_target = shared(_lookup(grads, target_parts, "target", target))
        through_source = _lookup(grads, source_parts, "source", source)
        grads = _replace(grads, source_parts, through_source + through_target)
        return _replace(grads, target_parts, None, remove=True), dx

    config = (
        ("layers", tuple(layers)),
        ("source", source),
        ("target", target),
        ("transpose", transpose),
    )
    if not body.has_state:
        return Layer(init, forward, backward, "tied", config)

    def run(params, state, x, context):
        return apply(body, full(params), state, x, key=context.key, train=context.train)

    def state_of(input_shape):
        return init_state(body, input_shape)

    return Layer(init, forward, backward, "tied", config, state_of, run)


register_layer("RMSNorm", RMSNorm)
register_layer("SwiGLU", SwiGLU)
register_layer("tied", tied)
