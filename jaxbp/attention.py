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
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from . import arguments
from .errors import ArgumentError
from .layers import InputShapeError, Layer, bound, check_float, default_float, glorot_uniform
from .registry import register_layer

__all__ = ["Embedding", "LayerNorm", "MultiHeadAttention", "PositionalEmbedding"]


_check_positive_int = arguments.positive_int


def _dtype_config(dtype):
    # Only a dtype that was asked for is described: None (the x64-dependent default) stays out
    # of descriptions, and a named dtype survives JSON as its name.
    return () if dtype is None else (("dtype", np.dtype(dtype).name),)


def _sum_to_last(a):
    """Sum over every axis but the last: the gradient of a parameter broadcast over them."""
    return a.reshape(-1, a.shape[-1]).sum(axis=0)


def _check_sequence(layer, x, dim):
    """Activations of shape ``(batch, time, dim)`` or ``(time, dim)`` with ``dim`` features."""
    check_float(x, layer)
    if x.ndim not in (2, 3) or x.shape[-1] != dim:
        raise InputShapeError(
            f"{layer} expects inputs of shape (batch, time, dim) or "
            f"(time, dim) with dim {dim}, got shape {tuple(x.shape)}"
        )


def _check_sequence_shape(layer, input_shape):
    if len(input_shape) not in (2, 3):
        raise InputShapeError(
            f"{layer} expects inputs of shape (batch, time, dim) or (time, dim), "
            f"got shape {tuple(input_shape)}"
        )


# --------------------------------------------------------------------------------------------
# Embedding: llm.c's encoder (token part)
# --------------------------------------------------------------------------------------------


def _check_token_ids(vocab_size, ids):
    if not jnp.issubdtype(jnp.result_type(ids), jnp.integer):
        raise ArgumentError(
            f"Embedding expects integer token ids, got dtype {jnp.result_type(ids)}"
        )
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
    dtype = arguments.float_dtype("Embedding", dtype)

    def init(key, input_shape):
        if len(input_shape) not in (1, 2):
            raise InputShapeError(
                f"Embedding expects token ids of shape (batch, time) or (time,), "
                f"got shape {tuple(input_shape)}"
            )
        dt = dtype or default_float()
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
    dtype = arguments.float_dtype("PositionalEmbedding", dtype)

    def check_length(time):
        if time > max_len:
            raise InputShapeError(
                f"PositionalEmbedding expects sequences of at most max_len "
                f"{max_len} positions, got {time}"
            )

    def init(key, input_shape):
        _check_sequence_shape("PositionalEmbedding", input_shape)
        if input_shape[-1] != dim:
            raise InputShapeError(
                f"PositionalEmbedding expects inputs with dim {dim} features, "
                f"got shape {tuple(input_shape)}"
            )
        check_length(input_shape[-2])
        dt = dtype or default_float()
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
    eps = arguments.number("LayerNorm", "eps", eps, check=lambda v: v > 0, expect="> 0")
    dtype = arguments.float_dtype("LayerNorm", dtype)

    def init(key, input_shape):
        if len(input_shape) < 1 or input_shape[-1] < 1:
            raise InputShapeError(
                f"LayerNorm expects inputs of shape (..., features), got shape {tuple(input_shape)}"
            )
        dt = dtype or default_float()
        features = input_shape[-1]
        params = {"scale": jnp.ones(features, dt), "bias": jnp.zeros(features, dt)}
        return tuple(input_shape), params

    def forward(params, x):
        check_float(x, "LayerNorm")
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
# MultiHeadAttention: llm.c's attention_forward / attention_backward, plus the projections;
# grouped key/value heads, rotary positions, and FlashAttention-2's blocked form
# --------------------------------------------------------------------------------------------

_PROJECTIONS = ("q", "k", "v", "o")


class _AttentionSpec(NamedTuple):
    """The checked arguments of one ``MultiHeadAttention``."""

    num_heads: int
    num_kv_heads: int
    causal: bool
    rope: bool
    rope_theta: float
    bias: bool
    block_size: int | None
    dtype: Any


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


def _group(q, num_kv_heads):
    """Query heads ``(..., time, heads, d) -> (..., time, kv_heads, group, d)``: query head
    ``i`` lands in key/value head ``i // group``, as Hugging Face's ``repeat_kv`` pairs them."""
    return q.reshape(*q.shape[:-2], num_kv_heads, q.shape[-2] // num_kv_heads, q.shape[-1])


def _check_heads(spec: _AttentionSpec, dim: int) -> int:
    """The head dimension ``dim / num_heads``, after checking it exists (and is even for rope)."""
    if dim % spec.num_heads:
        raise ValueError(
            f"MultiHeadAttention: num_heads {spec.num_heads} does not divide dim {dim}; "
            f"expected a dim that is a multiple of num_heads"
        )
    head_dim = dim // spec.num_heads
    if spec.rope and head_dim % 2:
        raise ValueError(
            f"MultiHeadAttention: rope=True needs an even head dimension, got head dimension "
            f"{head_dim} (dim {dim} / num_heads {spec.num_heads})"
        )
    return head_dim


def _check_block(spec: _AttentionSpec, time: int) -> None:
    if spec.block_size is not None and time % spec.block_size:
        raise InputShapeError(
            f"MultiHeadAttention: block_size {spec.block_size} does not divide the sequence "
            f"length {time}; expected a block_size that divides it"
        )


def _check_attention_arguments(
    num_heads, causal, num_kv_heads, rope, rope_theta, bias, block_size
) -> None:
    _check_positive_int("MultiHeadAttention", "num_heads", num_heads)
    for name, value in (("causal", causal), ("rope", rope), ("bias", bias)):
        arguments.flag("MultiHeadAttention", name, value)
    if num_kv_heads is not None:
        _check_positive_int("MultiHeadAttention", "num_kv_heads", num_kv_heads)
        if num_heads % num_kv_heads:
            raise ArgumentError(
                f"MultiHeadAttention: num_kv_heads {num_kv_heads} does not divide num_heads "
                f"{num_heads}; expected a divisor of num_heads"
            )
    arguments.number(
        "MultiHeadAttention", "rope_theta", rope_theta, check=lambda v: v > 0, expect="> 0"
    )
    if block_size is not None:
        _check_positive_int("MultiHeadAttention", "block_size", block_size)


def _attention_init(spec: _AttentionSpec, key, input_shape):
    _check_sequence_shape("MultiHeadAttention", input_shape)
    dim = int(input_shape[-1])
    head_dim = _check_heads(spec, dim)
    _check_block(spec, int(input_shape[-2]))
    dt = spec.dtype or default_float()
    kv_dim = spec.num_kv_heads * head_dim
    widths = {"q": dim, "k": kv_dim, "v": kv_dim}
    keys = jax.random.split(key, len(_PROJECTIONS))
    params = {}
    for name, k in zip(_PROJECTIONS, keys, strict=True):
        fan_in, fan_out = (dim, dim) if name == "o" else (dim, widths[name])
        params["W" + name] = glorot_uniform(k, (fan_in, fan_out), dt)
        if spec.bias:
            params["b" + name] = jnp.zeros(fan_out, dt)
    return tuple(input_shape), params


# Rotary position embedding, Hugging Face Llama's half-split convention: the pairs rotated
# together are (i, i + d/2), not (2i, 2i + 1) as in the RoPE paper.


def _rope_tables(time: int, head_dim: int, theta: float, dtype):
    """``cos`` and ``sin`` of shape ``(time, 1, head_dim)``: position ``t`` turns pair ``i``
    by ``t * theta^(-2i / head_dim)``, the same angle for both halves."""
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim)
    angles = np.outer(np.arange(time), inv_freq)
    angles = np.concatenate([angles, angles], axis=-1)[:, None, :]
    return jnp.asarray(np.cos(angles), dtype), jnp.asarray(np.sin(angles), dtype)


def _rotate_half(a):
    """``[a1, a2] -> [-a2, a1]`` over the last axis."""
    half = a.shape[-1] // 2
    return jnp.concatenate([-a[..., half:], a[..., :half]], axis=-1)


def _rope(a, cos, sin):
    """``a * cos + rotate_half(a) * sin`` on ``(..., time, heads, d)``."""
    return a * cos + _rotate_half(a) * sin


def _rope_backward(da, cos, sin):
    """The inverse rotation: ``rotate_half`` transposed is ``-rotate_half`` and each pair shares
    one angle, so ``dE/da = da * cos - rotate_half(da) * sin`` (the same turn, backwards)."""
    return da * cos - _rotate_half(da) * sin


# The plain layer: every score of a head at once.


def _attention_probs(q, k, causal):
    """``P = softmax(Q K^T / sqrt(d))`` per head, -inf above the diagonal when causal.

    ``q`` is grouped ``(..., time, kv_heads, group, d)``, ``k`` is ``(..., time, kv_heads, d)``;
    ``P`` is ``(..., kv_heads, group, time, time)``.
    """
    scores = jnp.einsum("...qjgd,...kjd->...jgqk", q, k) * (1 / math.sqrt(q.shape[-1]))
    if causal:
        time = q.shape[-4]
        scores = jnp.where(jnp.tril(jnp.ones((time, time), bool)), scores, -jnp.inf)
    # Softmax over keys, shifted by the row max (a constant for differentiation).
    exps = jnp.exp(scores - jax.lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True)))
    return exps / jnp.sum(exps, axis=-1, keepdims=True)


def _softmax_attention_backward(q, k, v, probs, d_out):
    """``dP = dO V^T``, ``dV = P^T dO``, ``dS = P * (dP - sum_k(dP * P)) / sqrt(d)``,
    ``dQ = dS K``, ``dK = dS^T Q``; on grouped ``q``/``d_out``, so ``dK`` and ``dV`` sum over
    each key/value head's group of query heads."""
    dprobs = jnp.einsum("...qjgd,...kjd->...jgqk", d_out, v)
    dv = jnp.einsum("...jgqk,...qjgd->...kjd", probs, d_out)
    dscores = probs * (dprobs - jnp.sum(dprobs * probs, axis=-1, keepdims=True))
    dscores = dscores * (1 / math.sqrt(q.shape[-1]))
    dq = jnp.einsum("...jgqk,...kjd->...qjgd", dscores, k)
    dk = jnp.einsum("...jgqk,...qjgd->...kjd", dscores, q)
    return dq, dk, dv


# The blocked layer (FlashAttention-2): queries and keys in blocks of B positions; a block of
# scores is (B, B) and lives only inside one loop step.


def _query_blocks(q, block):
    """Grouped ``(..., T, kv, g, d) -> (T / B, N, kv, g, B, d)``, ``N`` the flattened batch."""
    *_, time, kv, group, d = q.shape
    q = q.reshape(-1, time // block, block, kv, group, d)
    return q.transpose(1, 0, 3, 4, 2, 5)


def _from_query_blocks(b, shape):
    return b.transpose(1, 0, 4, 2, 3, 5).reshape(shape)


def _key_blocks(k, block):
    """``(..., T, kv, d) -> (T / B, N, kv, B, d)``."""
    *_, time, kv, d = k.shape
    return k.reshape(-1, time // block, block, kv, d).transpose(1, 0, 3, 2, 4)


def _from_key_blocks(b, shape):
    return b.transpose(1, 0, 3, 2, 4).reshape(shape)


def _block_scores(qi, kj, i, j, causal):
    """One ``(B, B)`` block of ``S = Q K^T / sqrt(d)`` per head, -inf above the diagonal."""
    s = jnp.einsum("njgqd,njkd->njgqk", qi, kj) * (1 / math.sqrt(qi.shape[-1]))
    if not causal:
        return s
    block = qi.shape[-2]
    rows = i * block + jnp.arange(block)[:, None]
    cols = j * block + jnp.arange(block)[None, :]
    return jnp.where(rows >= cols, s, -jnp.inf)


def _visit(causal, needed, update, carry):
    # A block wholly above the diagonal holds only masked scores: skip it (lax.cond, so the
    # work is saved and jax.grad of the forward still differentiates through it).
    return jax.lax.cond(needed, update, lambda c: c, carry) if causal else update(carry)


def _flash_forward(q, k, v, causal, block):
    """FlashAttention-2's forward (Algorithm 1) on blocks: ``(O, L)``, ``L = log sum exp`` of
    each row's scores. For each query block, over the key blocks, an online softmax::

        m' = max(m, rowmax(S_ij)),  P~ = exp(S_ij - m'),  l' = exp(m - m') l + rowsum(P~)
        acc' = exp(m - m') acc + P~ V_j;   at the end O_i = acc / l,  L_i = m + log(l)
    """
    qb, kb, vb = _query_blocks(q, block), _key_blocks(k, block), _key_blocks(v, block)
    count = qb.shape[0]

    def query_block(_, inputs):
        i, qi = inputs

        def key_block(carry, inputs):
            j, kj, vj = inputs

            def update(carry):
                m, l, acc = carry
                s = _block_scores(qi, kj, i, j, causal)
                # The running max is a shift: the result does not depend on it.
                m_new = jax.lax.stop_gradient(jnp.maximum(m, jnp.max(s, axis=-1)))
                p = jnp.exp(s - m_new[..., None])
                alpha = jnp.exp(m - m_new)
                acc = alpha[..., None] * acc + jnp.einsum("njgqk,njkd->njgqd", p, vj)
                return m_new, alpha * l + jnp.sum(p, axis=-1), acc

            return _visit(causal, j <= i, update, carry), None

        rows = qi.shape[:-1]
        start = (jnp.full(rows, -jnp.inf, qi.dtype), jnp.zeros(rows, qi.dtype), jnp.zeros_like(qi))
        (m, l, acc), _ = jax.lax.scan(key_block, start, (jnp.arange(count), kb, vb))
        return None, (acc / l[..., None], m + jnp.log(l))

    _, (out, lse) = jax.lax.scan(query_block, None, (jnp.arange(count), qb))
    return _from_query_blocks(out, q.shape), lse


def _flash_backward(q, k, v, out, lse, d_out, causal, block):
    """FlashAttention-2's backward (Algorithm 2): each block's probabilities recomputed from
    the saved log-sum-exp, ``P_ij = exp(S_ij - L_i)``; with ``D_i = rowsum(dO_i * O_i)``
    (which equals ``sum_k(dP * P)`` of the plain backward)::

        dV_j += P_ij^T dO_i,   dP_ij = dO_i V_j^T,   dS_ij = P_ij * (dP_ij - D_i) / sqrt(d)
        dQ_i += dS_ij K_j,     dK_j += dS_ij^T Q_i

    The outer loop runs over key blocks (``dK_j``, ``dV_j`` stay in the carry), the inner over
    query blocks (``dQ`` is one array the inner steps add into).
    """
    qb, kb, vb = _query_blocks(q, block), _key_blocks(k, block), _key_blocks(v, block)
    dob = _query_blocks(d_out, block)
    delta = jnp.sum(dob * _query_blocks(out, block), axis=-1)
    count = qb.shape[0]

    def key_block(dq, inputs):
        j, kj, vj = inputs

        def query_block(carry, i):
            def update(carry):
                dq, dk, dv = carry
                qi, doi = qb[i], dob[i]
                p = jnp.exp(_block_scores(qi, kj, i, j, causal) - lse[i][..., None])
                dv = dv + jnp.einsum("njgqk,njgqd->njkd", p, doi)
                dp = jnp.einsum("njgqd,njkd->njgqk", doi, vj)
                ds = p * (dp - delta[i][..., None]) * (1 / math.sqrt(qi.shape[-1]))
                dq = dq.at[i].add(jnp.einsum("njgqk,njkd->njgqd", ds, kj))
                dk = dk + jnp.einsum("njgqk,njgqd->njkd", ds, qi)
                return dq, dk, dv

            return _visit(causal, i >= j, update, carry), None

        start = (dq, jnp.zeros_like(kj), jnp.zeros_like(vj))
        (dq, dk, dv), _ = jax.lax.scan(query_block, start, jnp.arange(count))
        return dq, (dk, dv)

    dq, (dk, dv) = jax.lax.scan(key_block, jnp.zeros_like(qb), (jnp.arange(count), kb, vb))
    return (
        _from_query_blocks(dq, q.shape),
        _from_key_blocks(dk, k.shape),
        _from_key_blocks(dv, v.shape),
    )


def _project(params, name, x, bias):
    y = x @ params["W" + name]
    return y + params["b" + name] if bias else y


def _attention_forward(spec: _AttentionSpec, params, x):
    dim = params["Wq"].shape[0]
    _check_sequence("MultiHeadAttention", x, dim)
    head_dim = _check_heads(spec, dim)
    time = x.shape[-2]
    _check_block(spec, time)
    q = _split_heads(_project(params, "q", x, spec.bias), spec.num_heads)
    k, v = (_split_heads(_project(params, n, x, spec.bias), spec.num_kv_heads) for n in "kv")
    if spec.rope:
        cos, sin = _rope_tables(time, head_dim, spec.rope_theta, q.dtype)
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
    grouped = _group(q, spec.num_kv_heads)
    if spec.block_size is None:
        # Keeps P, (time, time) per head, for the backward; cached as (..., heads, time, time).
        probs = _attention_probs(grouped, k, spec.causal)
        out = jnp.einsum("...jgqk,...kjd->...qjgd", probs, v)
        extra = probs.reshape(*probs.shape[:-4], spec.num_heads, time, time)
    else:
        # Keeps only each row's log-sum-exp; the backward recomputes P block by block.
        out, extra = _flash_forward(grouped, k, v, spec.causal, spec.block_size)
    heads = out.reshape(*x.shape[:-1], dim)
    y = _project(params, "o", heads, spec.bias)
    return y, (x, q, k, v, extra, heads)


def _attention_backward(spec: _AttentionSpec, params, cache, dy):
    """llm.c's ``attention_backward`` between the four projections' ``matmul_backward``::

        dWo = heads^T dy,  dbo = sum dy,  dO = dy Wo^T            (split into heads)
        dP = dO V^T,       dV = P^T dO
        dS = P * (dP - sum_k(dP * P)) / sqrt(d)                   (softmax, then the scale)
        dQ = dS K,         dK = dS^T Q
        dWq = x^T dQ, dbq = sum dQ (likewise k, v),  dx = dQ Wq^T + dK Wk^T + dV Wv^T

    The causal mask needs no step of its own: masked entries have ``P = 0`` exactly, so
    their ``dS`` is 0, which is the gradient of the constant -inf they were set to.
    Grouped key/value heads: ``dK`` and ``dV`` of a key/value head are the sums over the query
    heads that share it. Rotary positions: ``dQ`` and ``dK`` are turned back by the inverse
    rotation, ``dq = dQ * cos - rotate_half(dQ) * sin``, before the projections' backward.
    With ``block_size``, ``dQ``, ``dK``, ``dV`` come block by block from FlashAttention-2's
    backward (``_flash_backward``), ``P`` recomputed from each row's log-sum-exp.
    """
    x, q, k, v, extra, heads = cache
    dwo, dbo, dheads = _linear_backward(heads, params["Wo"], dy)
    d_out = _group(_split_heads(dheads, spec.num_heads), spec.num_kv_heads)
    grouped = _group(q, spec.num_kv_heads)
    if spec.block_size is None:
        probs = extra.reshape(*extra.shape[:-3], spec.num_kv_heads, -1, *extra.shape[-2:])
        dq, dk, dv = _softmax_attention_backward(grouped, k, v, probs, d_out)
    else:
        out = _group(_split_heads(heads, spec.num_heads), spec.num_kv_heads)
        dq, dk, dv = _flash_backward(grouped, k, v, out, extra, d_out, spec.causal, spec.block_size)
    dq = dq.reshape(q.shape)
    if spec.rope:
        cos, sin = _rope_tables(x.shape[-2], q.shape[-1], spec.rope_theta, q.dtype)
        dq, dk = _rope_backward(dq, cos, sin), _rope_backward(dk, cos, sin)
    grads = {"Wo": dwo, "bo": dbo}
    dx_parts = []
    for name, d_proj in zip("qkv", (dq, dk, dv), strict=True):
        grads["W" + name], grads["b" + name], dx_part = _linear_backward(
            x, params["W" + name], _merge_heads(d_proj)
        )
        dx_parts.append(dx_part)
    return {key: grads[key] for key in params}, sum(dx_parts[1:], dx_parts[0])


def MultiHeadAttention(
    num_heads: int,
    causal: bool = False,
    dtype=None,
    num_kv_heads: int | None = None,
    rope: bool = False,
    rope_theta: float = 10000.0,
    bias: bool = True,
    block_size: int | None = None,
) -> Layer:
    """Multi-head self-attention on ``(batch, time, dim)`` or ``(time, dim)``::

        Q = x @ Wq + bq,  K = x @ Wk + bk,  V = x @ Wv + bv       (split into heads of d = dim/H)
        S = Q K^T / sqrt(d)  (-inf above the diagonal when causal),  P = softmax(S),  O = P V
        y = concat_heads(O) @ Wo + bo

    Params ``Wq, Wk, Wv, Wo`` are ``(dim, dim)`` (Glorot), ``bq, bk, bv, bo`` are ``(dim,)``
    (zeros). The mask uses -inf: the diagonal is never masked, so each row's maximum is finite,
    ``exp(-inf - max) = 0`` exactly, and masked entries have probability exactly 0 in both
    passes (no NaN, and the manual gradient is jax.grad's to rounding).

    Options (the defaults are the layer above):

    - ``num_kv_heads``: grouped-query attention. ``Wk``, ``Wv`` are ``(dim, num_kv_heads * d)``
      and query head ``i`` uses key/value head ``i // (num_heads / num_kv_heads)``, as Hugging
      Face's ``repeat_kv`` does; it must divide ``num_heads``.
    - ``rope``: rotary position embedding of each head's queries and keys after the projection,
      Hugging Face Llama's half-split form ``q * cos + rotate_half(q) * sin`` with frequencies
      ``rope_theta^(-2i/d)`` at positions ``0 .. time-1`` (``d`` must be even).
    - ``bias=False``: no ``bq, bk, bv, bo``.
    - ``block_size``: FlashAttention-2. The forward runs over blocks of ``block_size`` queries
      and keys with an online softmax and keeps only the output and each row's log-sum-exp;
      the backward recomputes each block's probabilities. Same outputs and gradients, memory
      ``O(time)`` instead of ``O(time^2)`` per head. It must divide the sequence length.
    """
    _check_attention_arguments(num_heads, causal, num_kv_heads, rope, rope_theta, bias, block_size)
    dtype = arguments.float_dtype("MultiHeadAttention", dtype)
    spec = _AttentionSpec(
        num_heads,
        num_heads if num_kv_heads is None else num_kv_heads,
        causal,
        rope,
        float(rope_theta),
        bias,
        block_size,
        dtype,
    )
    # Only arguments away from their defaults are described, so descriptions (and checkpoints)
    # of the plain layer read as they always have.
    options = (
        ("num_kv_heads", num_kv_heads, None),
        ("rope", rope, False),
        ("rope_theta", float(rope_theta), 10000.0),
        ("bias", bias, True),
        ("block_size", block_size, None),
    )
    config = (
        ("num_heads", num_heads),
        ("causal", causal),
        *_dtype_config(dtype),
        *((name, value) for name, value, default in options if value != default),
    )
    return bound(
        spec, _attention_init, _attention_forward, _attention_backward, "MultiHeadAttention", config
    )


register_layer("Embedding", Embedding)
register_layer("PositionalEmbedding", PositionalEmbedding)
register_layer("LayerNorm", LayerNorm)
register_layer("MultiHeadAttention", MultiHeadAttention)
