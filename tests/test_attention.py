"""Transformer layers (jaxbp.attention): hand-written backward passes against three references.

- ``jax.vjp`` of each forward: float64 to 1e-12, float32 to 1e-5 (relative to the leaf), batches
  and single examples, with and without ``jit``, ``vmap`` over examples;
- central finite differences on tiny cases; hypothesis over batch/time/dim/heads/causal;
- a NumPy reference written here with loops over examples and heads, in PyTorch's parameter
  layout (``nn.MultiheadAttention``), and PyTorch itself when it is installed.

Also: repeated tokens, constant LayerNorm rows, the causal mask, a small pre-norm transformer
under ``serial`` with a (batch, time, vocab) softmax cross-entropy, errors under ``jit``, and the
model-description round trip.
"""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxbp
from jaxbp.attention import Embedding, LayerNorm, MultiHeadAttention, PositionalEmbedding
from jaxbp.gradcheck import compare_grads, fd_tolerance, finite_difference_grads
from jaxbp.model import build, describe

pytestmark = pytest.mark.filterwarnings("error")

VOCAB, DIM = 11, 6
CASES = {
    "Embedding": Embedding(VOCAB, DIM),
    "PositionalEmbedding": PositionalEmbedding(9, DIM),
    "LayerNorm": LayerNorm(),
    "MultiHeadAttention": MultiHeadAttention(2),
    "MultiHeadAttention_causal": MultiHeadAttention(3, causal=True),
}
# Activation shapes; Embedding takes the same without the feature axis.
SHAPES = {"batch": (3, 5, DIM), "single": (5, DIM)}
TOL = {jnp.float64: 1e-12, jnp.float32: 1e-5}


def is_embedding(layer):
    return layer.name == "Embedding"


def draw(layer, key, shape, dtype):
    """Random params, input (token ids for Embedding) and cotangent for ``layer``."""
    k_init, k_x, k_dy = jax.random.split(key, 3)
    if is_embedding(layer):
        shape = shape[:-1]
        x = jax.random.randint(k_x, shape, 0, VOCAB)
    else:
        x = 2.0 * jax.random.normal(k_x, shape, dtype)
    _, params = layer.init(k_init, shape)
    # Move LayerNorm's ones/zeros and the zero biases off their special values.
    params = jax.tree_util.tree_map(
        lambda p: jnp.asarray(p + 0.3 * jax.random.normal(k_init, p.shape), dtype), params
    )
    y, _ = layer.forward(params, x)
    return params, x, jax.random.normal(k_dy, y.shape, dtype)


def manual_and_vjp(layer, params, x, dy):
    """``(y, manual grads, vjp grads)``; grads are ``{"params": ..., "x": ...}``, no ``x`` for
    token ids (their cotangent is float0 on both sides, checked separately)."""
    y, cache = layer.forward(params, x)
    dparams, dx = layer.backward(params, cache, dy)
    _, vjp = jax.vjp(lambda p, xx: layer.forward(p, xx)[0], params, x)
    ref_params, ref_x = vjp(dy)
    if is_embedding(layer):
        assert dx.dtype == ref_x.dtype == jax.dtypes.float0 and dx.shape == x.shape
        return y, {"params": dparams}, {"params": ref_params}
    return y, {"params": dparams, "x": dx}, {"params": ref_params, "x": ref_x}


def assert_agree(manual, reference, tol):
    report = compare_grads(manual, reference, rtol=tol, atol=tol)
    assert bool(report.ok), report.table()


# --------------------------------------------------------------------------------------------
# Manual backward vs jax.vjp
# --------------------------------------------------------------------------------------------


# One compiled function per (layer, shapes, dtypes), shared by every test that meets it.
jit_manual_and_vjp = jax.jit(manual_and_vjp, static_argnums=0)


def check_against_vjp(layer, shape, dtype, run, seed=0):
    params, x, dy = draw(layer, jax.random.key(seed), shape, dtype)
    y, manual, reference = run(layer, params, x, dy)
    out_shape = (*x.shape, DIM) if is_embedding(layer) else tuple(shape)
    assert y.shape == out_shape and y.dtype == dtype and bool(jnp.all(jnp.isfinite(y)))
    assert_agree(manual, reference, TOL[dtype])
    leaves = zip(
        jax.tree_util.tree_leaves(manual), jax.tree_util.tree_leaves(reference), strict=True
    )
    for leaf, ref in leaves:
        assert leaf.shape == ref.shape and leaf.dtype == ref.dtype


@pytest.mark.slow
@pytest.mark.parametrize(
    "dtype, shape",
    [
        (jnp.float64, SHAPES["batch"]),
        (jnp.float64, SHAPES["single"]),
        (jnp.float32, SHAPES["batch"]),
    ],
    ids=["f64-batch", "f64-single", "f32-batch"],
)
@pytest.mark.parametrize("name", CASES)
def test_backward_matches_vjp_under_jit(name, dtype, shape):
    check_against_vjp(CASES[name], shape, dtype, jit_manual_and_vjp)


# Eager runs compile every operation on its own: the batch case for every layer, the rest slow.
EAGER = [
    pytest.param(
        name,
        shape,
        dtype,
        id=f"{name}-{kind}-{jnp.dtype(dtype).name}",
        marks=() if (kind == "batch" and dtype == jnp.float64) else pytest.mark.slow,
    )
    for name in CASES
    for kind, shape in SHAPES.items()
    for dtype in TOL
]


@pytest.mark.parametrize("name, shape, dtype", EAGER)
def test_backward_matches_vjp_eager(name, shape, dtype):
    check_against_vjp(CASES[name], shape, dtype, manual_and_vjp)


@pytest.mark.slow
@pytest.mark.parametrize("name", CASES)
def test_vmap_over_examples_equals_batch(name):
    """Per-example backward under vmap: dparams summed over examples, dx stacked."""
    layer = CASES[name]
    params, x, dy = draw(layer, jax.random.key(7), SHAPES["batch"], jnp.float64)

    def grads(p, xx, d):
        return layer.backward(p, layer.forward(p, xx)[1], d)

    batch_dparams, batch_dx = grads(params, x, dy)
    per_dparams, per_dx = jax.vmap(grads, in_axes=(None, 0, 0))(params, x, dy)
    summed = jax.tree_util.tree_map(lambda g: g.sum(axis=0), per_dparams)
    assert_agree(summed, batch_dparams, 1e-12)
    assert per_dx.shape == batch_dx.shape
    if not is_embedding(layer):
        np.testing.assert_allclose(per_dx, batch_dx, rtol=1e-12, atol=1e-12)
    y_per = jax.vmap(lambda xx: layer.forward(params, xx)[0])(x)
    np.testing.assert_allclose(y_per, layer.forward(params, x)[0], rtol=1e-12, atol=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name",
    [
        pytest.param(name, marks=pytest.mark.slow) if name == "MultiHeadAttention" else name
        for name in CASES
    ],
)  # the NumPy test below checks non-causal attention by FD as well
def test_backward_matches_finite_differences(name):
    layer = CASES[name]
    params, x, dy = draw(layer, jax.random.key(3), (2, 3, DIM), jnp.float64)
    _, cache = layer.forward(params, x)
    dparams, dx = layer.backward(params, cache, dy)
    if is_embedding(layer):
        fd = finite_difference_grads(lambda p: jnp.sum(layer.forward(p, x)[0] * dy), params)
        manual = dparams
    else:
        fd = finite_difference_grads(
            lambda px: jnp.sum(layer.forward(px["params"], px["x"])[0] * dy),
            {"params": params, "x": x},
        )
        manual = {"params": dparams, "x": dx}
    if "bk" in params:
        # Adding bk shifts a whole row of scores by q . bk, which softmax ignores: dE/dbk = 0 in
        # exact arithmetic, rounding on both sides, so a relative comparison means nothing.
        scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree_util.tree_leaves(manual))
        assert float(jnp.max(jnp.abs(manual["params"]["bk"]))) < 1e-13 * scale
        assert float(jnp.max(jnp.abs(fd["params"]["bk"]))) < 1e-8 * scale
        manual["params"], fd["params"] = (
            {k: v for k, v in g["params"].items() if k != "bk"} for g in (manual, fd)
        )
    report = compare_grads(manual, fd, tolerances=fd_tolerance)
    assert bool(report.ok), report.table()


@functools.cache
def attention_layer(heads, causal):
    # The same Layer object for the same arguments: the jit cache then serves repeated shapes.
    return MultiHeadAttention(heads, causal=causal)


@pytest.mark.slow
@settings(max_examples=15, deadline=None)
@given(
    batch=st.sampled_from([None, 1, 3]),
    time=st.sampled_from([1, 2, 5]),
    heads=st.integers(1, 3),
    head_dim=st.integers(1, 3),
    causal=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_attention_property(batch, time, heads, head_dim, causal, seed):
    dim = heads * head_dim
    shape = (time, dim) if batch is None else (batch, time, dim)
    layer = attention_layer(heads, causal)
    params, x, dy = draw(layer, jax.random.key(seed), shape, jnp.float64)
    y, manual, reference = jit_manual_and_vjp(layer, params, x, dy)
    assert y.shape == shape
    assert_agree(manual, reference, 1e-11)


@functools.cache
def embedding_layers(vocab, max_len):
    return Embedding(vocab, 3), PositionalEmbedding(max_len, 3)


@pytest.mark.slow
@settings(max_examples=10, deadline=None)
@given(
    batch=st.sampled_from([None, 1, 4]),
    time=st.sampled_from([1, 3, 6]),
    vocab=st.integers(1, 4),
    max_extra=st.sampled_from([0, 2]),
    seed=st.integers(0, 2**16),
)
def test_embeddings_property(batch, time, vocab, max_extra, seed):
    k_ids, k_dy, k_x = jax.random.split(jax.random.key(seed), 3)
    ids_shape = (time,) if batch is None else (batch, time)
    ids = jax.random.randint(k_ids, ids_shape, 0, vocab)
    embed, positions = embedding_layers(vocab, time + max_extra)
    for layer, x in ((embed, ids), (positions, jax.random.normal(k_x, (*ids_shape, 3)))):
        _, params = layer.init(jax.random.key(seed), (*ids_shape, 3)[: x.ndim])
        dy = jax.random.normal(k_dy, (*ids_shape, 3))
        _, manual, reference = jit_manual_and_vjp(layer, params, x, dy)
        assert_agree(manual, reference, 1e-12)


# --------------------------------------------------------------------------------------------
# Layer-specific behaviour
# --------------------------------------------------------------------------------------------


def test_embedding_repeated_token_row_gets_the_sum():
    layer = CASES["Embedding"]
    params, _, dy = draw(layer, jax.random.key(0), SHAPES["batch"], jnp.float64)
    ids = jnp.array([[2, 5, 2, 7, 7], [2, 0, 5, 7, 1], [7, 0, 0, 1, 2]])  # 3, 4, 6, 8-10 unused
    y, manual, _ = jit_manual_and_vjp(layer, params, ids, dy)
    np.testing.assert_array_equal(y, params["W"][ids])
    dw = np.asarray(manual["params"]["W"])
    for token in range(VOCAB):
        rows = np.asarray(ids) == token
        np.testing.assert_allclose(dw[token], np.asarray(dy)[rows].sum(axis=0), rtol=1e-14)
    assert not dw[[3, 4, 6, 8, 9, 10]].any()  # unused rows get nothing


def test_embedding_bad_ids():
    layer = Embedding(103, 4)
    _, params = layer.init(jax.random.key(0), (2, 3))
    with pytest.raises(ValueError, match=r"^Embedding: token id 130 is outside \[0, 103\)$"):
        layer.forward(params, jnp.array([[1, 130, 2], [0, 0, 0]]))
    with pytest.raises(ValueError, match=r"token id -1 is outside"):
        layer.forward(params, np.array([4, -1]))
    # Under jit ids cannot be checked by value: bad ones (either side) poison their rows only.
    y = jax.jit(lambda i: layer.forward(params, i)[0])(jnp.array([[1, 130, 2], [-1, 0, 102]]))
    assert np.isnan(y[0, 1]).all() and np.isnan(y[1, 0]).all()
    np.testing.assert_array_equal(y[1, 2], params["W"][102])
    assert np.isfinite(y[0, [0, 2]]).all()


def test_layernorm_constant_rows():
    layer = CASES["LayerNorm"]
    params, x, dy = draw(layer, jax.random.key(0), SHAPES["batch"], jnp.float64)
    x = x.at[0, 0].set(3.0).at[1, 2].set(-1e3).at[2].set(0.0)  # 7 constant rows of 15
    y, manual, reference = jit_manual_and_vjp(layer, params, x, dy)
    constant = np.asarray(jnp.all(x == x[..., :1], axis=-1))
    assert constant.sum() == 7
    bias, scale = np.asarray(params["bias"]), np.asarray(params["scale"])
    np.testing.assert_array_equal(np.asarray(y)[constant], np.broadcast_to(bias, (7, DIM)))
    assert_agree(manual, reference, 1e-12)
    # Constant rows: xhat = 0, rstd = 1/sqrt(eps), so dx = rstd * (dxhat - mean(dxhat)).
    dxhat = np.asarray(dy)[constant] * scale
    expected = (dxhat - dxhat.mean(axis=-1, keepdims=True)) / np.sqrt(1e-5)
    np.testing.assert_allclose(np.asarray(manual["x"])[constant], expected, rtol=1e-12)


def test_layernorm_matches_numpy():
    x = np.random.default_rng(0).normal(size=(2, 4, 5)) * 3 + 1
    params = {"scale": jnp.linspace(0.5, 2, 5), "bias": jnp.linspace(-1, 1, 5)}
    y, _ = LayerNorm(eps=1e-3).forward(params, jnp.asarray(x))
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    expected = (x - mean) / np.sqrt(var + 1e-3) * np.asarray(params["scale"]) + np.asarray(
        params["bias"]
    )
    np.testing.assert_allclose(y, expected, rtol=1e-12, atol=1e-12)


def test_positional_embedding_adds_the_first_positions():
    layer = PositionalEmbedding(6, 2)
    _, params = layer.init(jax.random.key(0), (3, 4, 2))
    x = jnp.ones((3, 4, 2))
    y, cache = layer.forward(params, x)
    np.testing.assert_array_equal(y, x + params["P"][:4])
    dparams, dx = layer.backward(params, cache, jnp.ones_like(y))
    np.testing.assert_array_equal(dparams["P"], jnp.array([[3.0, 3.0]] * 4 + [[0.0, 0.0]] * 2))
    np.testing.assert_array_equal(dx, jnp.ones_like(y))


def test_causal_attention_ignores_the_future():
    layer = CASES["MultiHeadAttention_causal"]  # shapes the jit tests compiled already
    params, x, dy = draw(layer, jax.random.key(4), SHAPES["batch"], jnp.float64)
    y, _, _ = jit_manual_and_vjp(layer, params, x, dy)
    changed = x.at[:, 3:].set(100.0)  # change positions 3 and 4 only, by a lot
    y_changed, _, _ = jit_manual_and_vjp(layer, params, changed, dy)
    np.testing.assert_allclose(y_changed[:, :3], y[:, :3], rtol=1e-13)
    # A cotangent on positions < 3 reaches no input at positions >= 3.
    _, manual, _ = jit_manual_and_vjp(layer, params, x, dy.at[:, 3:].set(0.0))
    assert not np.asarray(manual["x"][:, 3:]).any()
    # Large scores: the softmax stays finite in both passes. It saturates (P one-hot, dS ~ 0),
    # so dWq and dWk are rounding on both sides: compare them to the largest gradient entry.
    _, manual, reference = jit_manual_and_vjp(layer, params, 50.0 * x, dy)
    manual, reference = jax.tree_util.tree_leaves(manual), jax.tree_util.tree_leaves(reference)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in manual)
    scale = max(float(jnp.max(jnp.abs(g))) for g in reference)
    for got, want in zip(manual, reference, strict=True):
        assert float(jnp.max(jnp.abs(got - want))) <= 1e-11 * scale


def test_non_causal_attention_sees_the_future():
    layer = CASES["MultiHeadAttention"]
    params, x, dy = draw(layer, jax.random.key(4), SHAPES["batch"], jnp.float64)
    y, _, _ = jit_manual_and_vjp(layer, params, x, dy)
    y_changed, _, _ = jit_manual_and_vjp(layer, params, x.at[:, 4].set(3.0), dy)
    assert not np.allclose(y_changed[:, 0], y[:, 0])


# --------------------------------------------------------------------------------------------
# PyTorch's layout: a NumPy reference here, PyTorch itself when installed
# --------------------------------------------------------------------------------------------


def params_from_torch(in_proj_weight, in_proj_bias, out_weight, out_bias):
    """``nn.MultiheadAttention`` weights (rows q, k, v of ``in_proj``; ``y = x W^T + b``) to
    jaxbp's ``y = x @ W + b``."""
    d = out_weight.shape[0]
    params = {}
    for i, n in enumerate("qkv"):
        params["W" + n] = jnp.asarray(in_proj_weight[i * d : (i + 1) * d].T)
        params["b" + n] = jnp.asarray(in_proj_bias[i * d : (i + 1) * d])
    params["Wo"], params["bo"] = jnp.asarray(out_weight.T), jnp.asarray(out_bias)
    return params


def numpy_attention(x, in_proj_weight, in_proj_bias, out_weight, out_bias, heads, causal):
    """PyTorch's MultiheadAttention forward, one example and one head at a time."""
    batch, time, d = x.shape
    hd = d // heads
    out = np.zeros_like(x)
    for b in range(batch):
        q, k, v = np.split(x[b] @ in_proj_weight.T + in_proj_bias, 3, axis=-1)
        concat = np.zeros((time, d))
        for h in range(heads):
            cols = slice(h * hd, (h + 1) * hd)
            scores = q[:, cols] @ k[:, cols].T / np.sqrt(hd)
            if causal:
                scores[np.triu_indices(time, 1)] = -np.inf
            p = np.exp(scores - scores.max(-1, keepdims=True))
            concat[:, cols] = (p / p.sum(-1, keepdims=True)) @ v[:, cols]
        out[b] = concat @ out_weight.T + out_bias
    return out


def torch_layout_weights(d, seed):
    rng = np.random.default_rng(seed)
    return (
        rng.normal(size=(3 * d, d)) / np.sqrt(d),
        rng.normal(size=3 * d) * 0.1,
        rng.normal(size=(d, d)) / np.sqrt(d),
        rng.normal(size=d) * 0.1,
    )


def grads_in_torch_layout(dparams):
    """jaxbp gradients back to ``(in_proj_weight, in_proj_bias, out_weight, out_bias)``."""
    return (
        np.concatenate([np.asarray(dparams["W" + n]).T for n in "qkv"]),
        np.concatenate([np.asarray(dparams["b" + n]) for n in "qkv"]),
        np.asarray(dparams["Wo"]).T,
        np.asarray(dparams["bo"]),
    )


@pytest.mark.parametrize("causal", [False, True])
def test_attention_matches_numpy_in_torch_layout(causal):
    heads, d = 2, 4
    weights = torch_layout_weights(d, seed=int(causal))
    x = np.random.default_rng(5).normal(size=(2, 3, d))
    dy = np.random.default_rng(6).normal(size=x.shape)
    layer = MultiHeadAttention(heads, causal=causal)
    y, cache = layer.forward(params_from_torch(*weights), jnp.asarray(x))
    np.testing.assert_allclose(
        y, numpy_attention(x, *weights, heads, causal), rtol=1e-12, atol=1e-12
    )
    dparams, _ = layer.backward(params_from_torch(*weights), cache, jnp.asarray(dy))

    def loss(ws):
        return float(np.sum(numpy_attention(x, *ws, heads, causal) * dy))

    h = 1e-6  # central differences of the NumPy reference, in PyTorch's layout
    for i, (manual, w) in enumerate(zip(grads_in_torch_layout(dparams), weights, strict=True)):
        fd = np.zeros_like(w)
        for j in np.ndindex(w.shape):
            plus, minus = [list(weights) for _ in range(2)]
            plus[i], minus[i] = w.copy(), w.copy()
            plus[i][j] += h
            minus[i][j] -= h
            fd[j] = (loss(plus) - loss(minus)) / (2 * h)
        np.testing.assert_allclose(manual, fd, rtol=1e-6, atol=1e-7)


@pytest.mark.slow
@pytest.mark.parametrize("causal", [False, True])
def test_attention_matches_pytorch(causal):
    torch = pytest.importorskip("torch")
    heads, d = 2, 8
    mha = torch.nn.MultiheadAttention(d, heads, batch_first=True, dtype=torch.float64)
    x = torch.randn(3, 5, d, dtype=torch.float64, requires_grad=True)
    mask = torch.triu(torch.ones(5, 5, dtype=torch.bool), 1) if causal else None
    y_torch, _ = mha(x, x, x, attn_mask=mask, need_weights=False)
    dy = torch.randn_like(y_torch)
    y_torch.backward(dy)
    weights = [
        t.detach().numpy()
        for t in (mha.in_proj_weight, mha.in_proj_bias, mha.out_proj.weight, mha.out_proj.bias)
    ]
    layer = MultiHeadAttention(heads, causal=causal)
    params = params_from_torch(*weights)
    y, cache = layer.forward(params, jnp.asarray(x.detach().numpy()))
    np.testing.assert_allclose(y, y_torch.detach().numpy(), rtol=1e-10, atol=1e-12)
    dparams, dx = layer.backward(params, cache, jnp.asarray(dy.numpy()))
    torch_grads = (
        mha.in_proj_weight.grad,
        mha.in_proj_bias.grad,
        mha.out_proj.weight.grad,
        mha.out_proj.bias.grad,
    )
    for manual, ref in zip(grads_in_torch_layout(dparams), torch_grads, strict=True):
        np.testing.assert_allclose(manual, ref.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dx, x.grad.numpy(), rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------------------------
# A small pre-norm transformer under serial, with the (batch, time, vocab) cross-entropy
# --------------------------------------------------------------------------------------------


def residual_by_hand(*layers):
    """``y = x + f(x)`` with ``f = serial(*layers)``, backward ``dx = dy + f.backward(dy)``:
    written here so the block is tested whether or not ``jaxbp.residual`` exists."""
    inner = jaxbp.serial(*layers)

    def init(key, shape):
        return shape, inner.init(key, shape)[1]

    def forward(params, x):
        out, cache = inner.forward(params, x)
        return x + out, cache

    def backward(params, cache, dy):
        dparams, dx = inner.backward(params, cache, dy)
        return dparams, dx + dy

    return jaxbp.Layer(init, forward, backward, "residual_by_hand")


def tiny_gpt(vocab, dim, heads, max_len, residual=residual_by_hand):
    attention = residual(LayerNorm(), MultiHeadAttention(heads, causal=True))
    mlp = residual(LayerNorm(), jaxbp.Dense(4 * dim), jaxbp.Gelu, jaxbp.Dense(dim))
    return jaxbp.serial(
        Embedding(vocab, dim),
        PositionalEmbedding(max_len, dim),
        attention,
        mlp,
        LayerNorm(),
        jaxbp.Dense(vocab),
    )


def gpt_grads(net, params, ids, labels):
    loss = jaxbp.softmax_cross_entropy
    logits, cache = net.forward(params, ids)
    manual, _ = net.backward(params, cache, loss.grad(logits, labels))
    value, reference = jax.value_and_grad(lambda p: loss(net.forward(p, ids)[0], labels))(params)
    return value, logits, manual, reference


@pytest.mark.slow
@pytest.mark.parametrize(
    "use_jit", [pytest.param(False, marks=pytest.mark.slow), True], ids=["eager", "jit"]
)
def test_transformer_block_under_serial(use_jit):
    vocab, batch, time = 13, 2, 5
    net = tiny_gpt(
        vocab, dim=8, heads=2, max_len=7, residual=getattr(jaxbp, "residual", residual_by_hand)
    )
    _, params = net.init(jax.random.key(0), (batch, time))
    ids = jax.random.randint(jax.random.key(1), (batch, time), 0, vocab)
    labels = jax.random.randint(jax.random.key(2), (batch, time), 0, vocab)
    run = (
        jax.jit(lambda p: gpt_grads(net, p, ids, labels))
        if use_jit
        else (lambda p: gpt_grads(net, p, ids, labels))
    )
    value, logits, manual, reference = run(params)
    assert_agree(manual, reference, 1e-11)
    # The loss is the mean over every (example, position) of -log softmax at the label.
    log_probs = np.asarray(jax.nn.log_softmax(logits))
    expected = -np.take_along_axis(log_probs, np.asarray(labels)[..., None], -1).mean()
    np.testing.assert_allclose(value, expected, rtol=1e-13)


@pytest.mark.slow
def test_transformer_with_jaxbp_residual():
    ours, theirs = tiny_gpt(9, 4, 2, 5), tiny_gpt(9, 4, 2, 5, residual=jaxbp.residual)
    _, params = ours.init(jax.random.key(0), (2, 5))
    ids = labels = jax.random.randint(jax.random.key(1), (2, 5), 0, 9)
    value, _, manual, _ = jax.jit(lambda p: gpt_grads(ours, p, ids, labels))(params)
    value2, _, manual2, reference2 = jax.jit(lambda p: gpt_grads(theirs, p, ids, labels))(params)
    np.testing.assert_allclose(value2, value, rtol=1e-13)
    assert_agree(manual2, manual, 1e-12)
    assert_agree(manual2, reference2, 1e-11)


# --------------------------------------------------------------------------------------------
# Errors (under jit too), dtypes, descriptions
# --------------------------------------------------------------------------------------------


def raises_under_jit(error, match, fn, *args):
    with pytest.raises(error, match=match):
        fn(*args)
    with pytest.raises(error, match=match):
        jax.jit(fn)(*args)


def test_shape_and_type_errors_fire_under_jit():
    _, p_attn = MultiHeadAttention(2).init(jax.random.key(0), (2, 5, 8))
    raises_under_jit(
        ValueError,
        r"num_heads 3 does not divide dim 8",
        lambda x: MultiHeadAttention(3).forward(p_attn, x)[0],
        jnp.ones((5, 8)),
    )
    raises_under_jit(
        ValueError,
        r"MultiHeadAttention expects inputs of shape \(batch, time, "
        r"dim\) or \(time, dim\) with dim 8, got shape \(2, 5, 6\)",
        lambda x: MultiHeadAttention(2).forward(p_attn, x)[0],
        jnp.ones((2, 5, 6)),
    )
    raises_under_jit(
        ValueError,
        r"got shape \(8,\)",
        lambda x: MultiHeadAttention(2).forward(p_attn, x)[0],
        jnp.ones(8),
    )
    positions = PositionalEmbedding(4, 8)
    _, p_pos = positions.init(jax.random.key(0), (2, 4, 8))
    raises_under_jit(
        ValueError,
        r"at most max_len 4 positions, got 5",
        lambda x: positions.forward(p_pos, x)[0],
        jnp.ones((2, 5, 8)),
    )
    _, p_ln = LayerNorm().init(jax.random.key(0), (3, 8))
    raises_under_jit(
        ValueError,
        r"LayerNorm expects .* with 8 features, got shape \(3, 7\)",
        lambda x: LayerNorm().forward(p_ln, x)[0],
        jnp.ones((3, 7)),
    )
    embed = Embedding(5, 8)
    _, p_emb = embed.init(jax.random.key(0), (2, 3))
    raises_under_jit(
        TypeError,
        r"Embedding expects integer token ids, got dtype float",
        lambda x: embed.forward(p_emb, x)[0],
        jnp.ones((2, 3)),
    )
    raises_under_jit(
        ValueError,
        r"Embedding expects token ids of shape \(batch, time\) or "
        r"\(time,\), got shape \(2, 3, 1\)",
        lambda x: embed.forward(p_emb, x)[0],
        jnp.ones((2, 3, 1), int),
    )
    raises_under_jit(
        TypeError,
        r"MultiHeadAttention expects floating-point inputs",
        lambda x: MultiHeadAttention(2).forward(p_attn, x)[0],
        jnp.ones((5, 8), int),
    )


def test_init_and_construction_errors():
    with pytest.raises(ValueError, match=r"num_heads 3 does not divide dim 8"):
        MultiHeadAttention(3).init(jax.random.key(0), (-1, 5, 8))
    with pytest.raises(ValueError, match=r"at most max_len 4 positions, got 6"):
        PositionalEmbedding(4, 2).init(jax.random.key(0), (-1, 6, 2))
    with pytest.raises(ValueError, match=r"layer 1 \(MultiHeadAttention\): .*shape \(batch, time"):
        jaxbp.serial(LayerNorm(), MultiHeadAttention(2)).init(jax.random.key(0), (8,))
    for bad, error in [
        (lambda: MultiHeadAttention(0), ValueError),
        (lambda: MultiHeadAttention(2.0), TypeError),
        (lambda: MultiHeadAttention(2, causal="yes"), TypeError),
        (lambda: Embedding(0, 4), ValueError),
        (lambda: PositionalEmbedding(4, True), TypeError),
        (lambda: LayerNorm(eps=0.0), ValueError),
        (lambda: LayerNorm(eps="small"), TypeError),
    ]:
        with pytest.raises(error):
            bad()


def test_dtypes():
    for layer in (Embedding(5, 4), PositionalEmbedding(5, 4), LayerNorm(), MultiHeadAttention(2)):
        shape = (2, 3) if is_embedding(layer) else (2, 3, 4)
        for dtype, expected in ((None, jnp.float64), (jnp.float32, jnp.float32)):
            rebuilt = build({**describe(layer), **({"dtype": "float32"} if dtype else {})})
            _, params = rebuilt.init(jax.random.key(0), shape)
            assert {p.dtype for p in jax.tree_util.tree_leaves(params)} == {jnp.dtype(expected)}


@pytest.mark.parametrize(
    "layer",
    [
        Embedding(11, 6),
        Embedding(11, 6, dtype=jnp.float32),
        PositionalEmbedding(9, 6),
        LayerNorm(),
        LayerNorm(eps=1e-6, dtype="float32"),
        MultiHeadAttention(2),
        MultiHeadAttention(4, causal=True),
        tiny_gpt(13, 8, 2, 7, residual=jaxbp.serial),
    ],
    ids=lambda layer: layer.name,
)
def test_description_round_trip(layer):
    description = describe(layer)
    assert json.loads(json.dumps(description)) == description
    rebuilt = build(description)
    assert describe(rebuilt) == description
    assert rebuilt.config == layer.config or layer.name == "serial"
