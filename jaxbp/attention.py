"""Transformer layers with hand-written backward passes, in the manner of llm.c.

``Embedding`` (token ids -> vectors), ``PositionalEmbedding`` (learned, added), ``LayerNorm`` and
``MultiHeadAttention`` (self-attention, optionally causal). Each follows the layer contract of
:mod:`jaxbp.layers`: ``forward`` keeps what ``backward`` needs, ``backward`` is the chain rule
written out beside it, one function the size of its forward, as llm.c's ``encoder_backward``,
``layernorm_backward`` and ``attention_backward`` are.

Shapes: token ids are ``(batch, time)`` or ``(time,)``; activations ``(batch, time, dim)`` or
``(time, dim)``, so ``jax.vmap`` over examples works.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from .layers import InputShapeError, Layer, glorot_uniform

__all__ = ["Embedding", "LayerNorm", "MultiHeadAttention", "PositionalEmbedding"]


def _default_float():
    # float64 when jax_enable_x64 is on, else float32, as for Dense.
    return jax.dtypes.canonicalize_dtype(jnp.float64)


def _check_float(x, layer):
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
        raise TypeError(f"{layer} expects floating-point inputs, got dtype {jnp.result_type(x)}")


def _check_positive_int(layer, name, value):
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{layer} expects an integer {name}, got {value!r}")
    if value < 1:
        raise ValueError(f"{layer} expects a positive {name}, got {value}")


def _dtype_config(dtype):
    # Only a dtype that was asked for is described: None (the x64-dependent default) stays out
    # of descriptions, and a named dtype survives JSON as its name.
    return () if dtype is None else (("dtype", np.dtype(dtype).name),)


def _sum_to_last(a):
    """Sum over every axis but the last: the gradient of a parameter broadcast over them."""
    return a.reshape(-1, a.shape[-1]).sum(axis=0)


def _check_sequence(layer, x, dim):
    """Activations of shape ``(batch, time, dim)`` or ``(time, dim)`` with ``dim`` features."""
    _check_float(x, layer)
    if x.ndim not in (2, 3) or x.shape[-1] != dim:
        raise InputShapeError(
            f"{layer} expects inputs of shape (batch, time, dim) or "
            f"(time, dim) with dim {dim}, got shape {tuple(x.shape)}"
        )


def _check_sequence_shape(layer, input_shape):
    if len(input_shape) not in (2, 3):
        raise ValueError(
            f"{layer} expects inputs of shape (batch, time, dim) or (time, dim), "
            f"got shape {tuple(input_shape)}"
        )


# --------------------------------------------------------------------------------------------
# Embedding: llm.c's encoder (token part)
# --------------------------------------------------------------------------------------------


def _check_token_ids(vocab_size, ids):
    if not jnp.issubdtype(jnp.result_type(ids), jnp.integer):
        raise TypeError(f"Embedding expects integer token ids, got dtype {jnp.result_type(ids)}")
    if ids.ndim not in (1, 2):
        raise InputShapeError(
            f"Embedding expects token ids of shape (batch, time) or (time,), "
            f"got shape {tuple(ids.shape)}"
        )
    if not isinstance(ids, jax.core.Tracer):
        # NumPy, not jnp: concrete ids inside an outer trace would otherwise become tracers.
        values = np.asarray(ids)
        bad = values[(values < 0) | (values >= vocab_size)]
        if bad.size:
            raise ValueError(f"Embedding: token id {int(bad[0])} is outside [0, {vocab_size})")


def Embedding(vocab_size: int, dim: int, dtype=None) -> Layer:
    """Token embedding ``y[..., t, :] = W[ids[..., t]]``, ``W`` of shape ``(vocab_size, dim)``.

    Inputs are integer ids ``(batch, time)`` or ``(time,)``; outputs ``(*ids.shape, dim)``.
    Ids outside ``[0, vocab_size)`` raise ``ValueError`` when they are concrete. Under ``jit``
    they are tracers and cannot be checked by value: their rows come out as NaN instead, so the
    loss is non-finite and a checked train step does not apply the update.
    """
    _check_positive_int("Embedding", "vocab_size", vocab_size)
    _check_positive_int("Embedding", "dim", dim)

    def init(key, input_shape):
        if len(input_shape) not in (1, 2):
            raise ValueError(
                f"Embedding expects token ids of shape (batch, time) or (time,), "
                f"got shape {tuple(input_shape)}"
            )
        dt = dtype or _default_float()
        # GPT-2's token embedding initialisation (llm.c, nanoGPT): N(0, 0.02^2).
        w = 0.02 * jax.random.normal(key, (vocab_size, dim), dt)
        return (*input_shape, dim), {"W": w}

    def forward(params, ids):
        _check_token_ids(vocab_size, ids)
        y = params["W"][jnp.clip(ids, 0, vocab_size - 1)]
        if isinstance(ids, jax.core.Tracer):  # unchecked ids: bad ones poison their row
            valid = (ids >= 0) & (ids < vocab_size)
            y = jnp.where(valid[..., None], y, jnp.nan)
        return y, ids

    def backward(params, ids, dy):
        """``dE/dW[v] = sum over positions t with ids[t] == v of dy[t]`` (a scatter-add).

        A token used at several positions gets the sum of their cotangents:
        ``dW = zeros_like(W).at[ids].add(dy)``. Token ids are integers and have no gradient:
        ``dx`` is ``zeros(ids.shape, float0)``, the cotangent ``jax.vjp`` gives an integer input
        (``serial`` drops the first layer's ``dx``).
        """
        dw = jnp.zeros_like(params["W"]).at[ids].add(dy)
        return {"W": dw}, np.zeros(ids.shape, jax.dtypes.float0)

    config = (("vocab_size", vocab_size), ("dim", dim), *_dtype_config(dtype))
    return Layer(init, forward, backward, "Embedding", config)


# --------------------------------------------------------------------------------------------
# PositionalEmbedding: llm.c's encoder (position part)
# --------------------------------------------------------------------------------------------


def PositionalEmbedding(max_len: int, dim: int, dtype=None) -> Layer:
    """Learned positions, added: ``y[..., t, :] = x[..., t, :] + P[t]``, ``P`` of shape
    ``(max_len, dim)``; sequences up to ``max_len`` long."""
    _check_positive_int("PositionalEmbedding", "max_len", max_len)
    _check_positive_int("PositionalEmbedding", "dim", dim)

    def check_length(time):
        if time > max_len:
            raise InputShapeError(
                f"PositionalEmbedding expects sequences of at most max_len "
                f"{max_len} positions, got {time}"
            )

    def init(key, input_shape):
        _check_sequence_shape("PositionalEmbedding", input_shape)
        if input_shape[-1] != dim:
            raise ValueError(
                f"PositionalEmbedding expects inputs with dim {dim} features, "
                f"got shape {tuple(input_shape)}"
            )
        check_length(input_shape[-2])
        dt = dtype or _default_float()
        # GPT-2's position embedding initialisation: N(0, 0.01^2).
        return tuple(input_shape), {"P": 0.01 * jax.random.normal(key, (max_len, dim), dt)}

    def forward(params, x):
        _check_sequence("PositionalEmbedding", x, dim)
        check_length(x.shape[-2])
        return x + params["P"][: x.shape[-2]], x.shape[-2]

    def backward(params, time, dy):
        """``dE/dP[t] = sum over the batch of dy[..., t, :]`` for ``t < time`` (0 beyond);
        ``dE/dx = dy``."""
        dp_used = dy.reshape(-1, time, dim).sum(axis=0)
        dp = jnp.zeros_like(params["P"]).at[:time].set(dp_used)
        return {"P": dp}, dy

    config = (("max_len", max_len), ("dim", dim), *_dtype_config(dtype))
    return Layer(init, forward, backward, "PositionalEmbedding", config)


# --------------------------------------------------------------------------------------------
# LayerNorm
# --------------------------------------------------------------------------------------------


def LayerNorm(eps: float = 1e-5, dtype=None) -> Layer:
    """Normalise over the last axis, then scale and shift::

        mean = mean(x),  var = mean((x - mean)^2),  rstd = 1 / sqrt(var + eps)
        xhat = (x - mean) * rstd,  y = xhat * scale + bias

    ``scale`` and ``bias`` have shape ``(features,)`` (ones and zeros at init). Any leading axes.
    """
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"LayerNorm expects a number eps, got {eps!r}")
    eps = float(eps)
    if not eps > 0:
        raise ValueError(f"LayerNorm expects a positive eps, got {eps}")

    def init(key, input_shape):
        if len(input_shape) < 1 or input_shape[-1] < 1:
            raise ValueError(
                f"LayerNorm expects inputs of shape (..., features), got shape {tuple(input_shape)}"
            )
        dt = dtype or _default_float()
        features = input_shape[-1]
        params = {"scale": jnp.ones(features, dt), "bias": jnp.zeros(features, dt)}
        return tuple(input_shape), params

    def forward(params, x):
        _check_float(x, "LayerNorm")
        features = params["scale"].shape[0]
        if x.ndim < 1 or x.shape[-1] != features:
            raise InputShapeError(
                f"LayerNorm expects inputs of shape (..., features) with "
                f"{features} features, got shape {tuple(x.shape)}"
            )
        centred = x - jnp.mean(x, axis=-1, keepdims=True)
        rstd = jax.lax.rsqrt(jnp.mean(centred * centred, axis=-1, keepdims=True) + eps)
        xhat = centred * rstd
        return xhat * params["scale"] + params["bias"], (xhat, rstd)

    def backward(params, cache, dy):
        """llm.c's ``layernorm_backward``::

            dscale = sum over rows of dy * xhat,   dbias = sum over rows of dy
            dxhat  = dy * scale
            dx     = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))

        (means over the last axis: ``xhat`` depends on ``x`` through the row's mean and
        variance, which give the two subtracted terms).
        """
        xhat, rstd = cache
        dxhat = dy * params["scale"]
        dx = rstd * (
            dxhat
            - jnp.mean(dxhat, axis=-1, keepdims=True)
            - xhat * jnp.mean(dxhat * xhat, axis=-1, keepdims=True)
        )
        return {"scale": _sum_to_last(dy * xhat), "bias": _sum_to_last(dy)}, dx

    config = (("eps", eps), *_dtype_config(dtype))
    return Layer(init, forward, backward, "LayerNorm", config)


# --------------------------------------------------------------------------------------------
# MultiHeadAttention: llm.c's attention_forward / attention_backward, plus the projections
# --------------------------------------------------------------------------------------------

_PROJECTIONS = ("q", "k", "v", "o")


def _linear_backward(x, w, dy):
    """llm.c's ``matmul_backward`` for ``y = x @ W + b``: ``(dW, db, dx)``."""
    x2 = x.reshape(-1, x.shape[-1])
    dy2 = dy.reshape(-1, dy.shape[-1])
    return x2.T @ dy2, dy2.sum(axis=0), dy @ w.T


def _split_heads(a, num_heads):
    """``(..., time, dim) -> (..., time, heads, dim / heads)``."""
    return a.reshape(*a.shape[:-1], num_heads, a.shape[-1] // num_heads)


def _merge_heads(a):
    return a.reshape(*a.shape[:-2], a.shape[-2] * a.shape[-1])


def _check_heads(num_heads, dim):
    if dim % num_heads:
        raise ValueError(
            f"MultiHeadAttention: num_heads {num_heads} does not divide dim {dim}; "
            f"expected a dim that is a multiple of num_heads"
        )


def _check_attention_arguments(num_heads, causal) -> None:
    _check_positive_int("MultiHeadAttention", "num_heads", num_heads)
    if not isinstance(causal, bool):
        raise TypeError(f"MultiHeadAttention expects causal to be True or False, got {causal!r}")


def _attention_init(num_heads, dtype, key, input_shape):
    _check_sequence_shape("MultiHeadAttention", input_shape)
    dim = int(input_shape[-1])
    _check_heads(num_heads, dim)
    dt = dtype or _default_float()
    keys = jax.random.split(key, len(_PROJECTIONS))
    params = {}
    for name, k in zip(_PROJECTIONS, keys, strict=True):
        params["W" + name] = glorot_uniform(k, (dim, dim), dt)
        params["b" + name] = jnp.zeros(dim, dt)
    return tuple(input_shape), params


def _attention_probs(q, k, causal):
    """``P = softmax(Q K^T / sqrt(d))`` per head, -inf above the diagonal when causal."""
    scores = jnp.einsum("...qhd,...khd->...hqk", q, k) * (1 / math.sqrt(q.shape[-1]))
    if causal:
        time = q.shape[-3]
        scores = jnp.where(jnp.tril(jnp.ones((time, time), bool)), scores, -jnp.inf)
    # Softmax over keys, shifted by the row max (a constant for differentiation).
    exps = jnp.exp(scores - jax.lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True)))
    return exps / jnp.sum(exps, axis=-1, keepdims=True)


def _attention_forward(num_heads, causal, params, x):
    dim = params["Wq"].shape[0]
    _check_sequence("MultiHeadAttention", x, dim)
    _check_heads(num_heads, dim)
    q, k, v = (_split_heads(x @ params["W" + n] + params["b" + n], num_heads) for n in "qkv")
    probs = _attention_probs(q, k, causal)
    heads = _merge_heads(jnp.einsum("...hqk,...khd->...qhd", probs, v))
    y = heads @ params["Wo"] + params["bo"]
    return y, (x, q, k, v, probs, heads)


def _attention_backward(params, cache, dy):
    """llm.c's ``attention_backward`` between the four projections' ``matmul_backward``::

        dWo = heads^T dy,  dbo = sum dy,  dO = dy Wo^T            (split into heads)
        dP = dO V^T,       dV = P^T dO
        dS = P * (dP - sum_k(dP * P)) / sqrt(d)                   (softmax, then the scale)
        dQ = dS K,         dK = dS^T Q
        dWq = x^T dQ, dbq = sum dQ (likewise k, v),  dx = dQ Wq^T + dK Wk^T + dV Wv^T

    The causal mask needs no step of its own: masked entries have ``P = 0`` exactly, so
    their ``dS`` is 0, which is the gradient of the constant -inf they were set to.
    """
    x, q, k, v, probs, heads = cache
    num_heads = q.shape[-2]  # q is (..., time, heads, d)
    dwo, dbo, dheads = _linear_backward(heads, params["Wo"], dy)
    d_out = _split_heads(dheads, num_heads)
    dprobs = jnp.einsum("...qhd,...khd->...hqk", d_out, v)
    dv = jnp.einsum("...hqk,...qhd->...khd", probs, d_out)
    dscores = probs * (dprobs - jnp.sum(dprobs * probs, axis=-1, keepdims=True))
    dscores = dscores * (1 / math.sqrt(q.shape[-1]))
    dq = jnp.einsum("...hqk,...khd->...qhd", dscores, k)
    dk = jnp.einsum("...hqk,...qhd->...khd", dscores, q)
    grads = {"Wo": dwo, "bo": dbo}
    dx_parts = []
    for name, d_proj in zip("qkv", (dq, dk, dv), strict=True):
        grads["W" + name], grads["b" + name], dx_part = _linear_backward(
            x, params["W" + name], _merge_heads(d_proj)
        )
        dx_parts.append(dx_part)
    return {key: grads[key] for key in params}, sum(dx_parts[1:], dx_parts[0])


def MultiHeadAttention(num_heads: int, causal: bool = False, dtype=None) -> Layer:
    """Multi-head self-attention on ``(batch, time, dim)`` or ``(time, dim)``::

        Q = x @ Wq + bq,  K = x @ Wk + bk,  V = x @ Wv + bv       (split into heads of d = dim/H)
        S = Q K^T / sqrt(d)  (-inf above the diagonal when causal),  P = softmax(S),  O = P V
        y = concat_heads(O) @ Wo + bo

    Params ``Wq, Wk, Wv, Wo`` are ``(dim, dim)`` (Glorot), ``bq, bk, bv, bo`` are ``(dim,)``
    (zeros). The mask uses -inf: the diagonal is never masked, so each row's maximum is finite,
    ``exp(-inf - max) = 0`` exactly, and masked entries have probability exactly 0 in both
    passes (no NaN, and the manual gradient is jax.grad's to rounding).
    """
    _check_attention_arguments(num_heads, causal)

    def init(key, input_shape):
        return _attention_init(num_heads, dtype, key, input_shape)

    def forward(params, x):
        return _attention_forward(num_heads, causal, params, x)

    config = (("num_heads", num_heads), ("causal", causal), *_dtype_config(dtype))
    return Layer(init, forward, _attention_backward, "MultiHeadAttention", config)


def _register() -> None:
    from .model import register_layer

    for factory in (Embedding, PositionalEmbedding, LayerNorm, MultiHeadAttention):
        register_layer(factory.__name__, factory)


_register()
