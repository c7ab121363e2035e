"""Llama's layers: RMSNorm, SwiGLU, grouped-query attention with rotary positions, the blocked
(FlashAttention-2) attention and weight tying, each against three references:

- ``jax.vjp`` of its forward (``jaxbp.check_layer``): float64 to 1e-10 and float32 to 1e-5,
  batches and single examples, with and without ``jit``; hypothesis over the attention options;
- the plain layer for the blocked one (outputs and gradients, float64 to 1e-12);
- PyTorch in float64 when it is installed: ``nn.RMSNorm``, a SwiGLU of three ``nn.Linear`` and
  attention written as Hugging Face's Llama writes it (``repeat_kv``, ``rotate_half``).

Also the shared matrix's gradient as the sum of its two uses, descriptions, a checked train
step, and bad input: one clear error naming the argument (exit 2 from the command line).
"""

from __future__ import annotations

import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxbp
from jaxbp import Dense, Embedding, MultiHeadAttention, RMSNorm, SwiGLU, tied
from jaxbp.gradcheck import compare_grads
from jaxbp.model import build, describe
from jaxbp.presets import get_preset, llama_description

pytestmark = pytest.mark.filterwarnings("error")

DIM, TIME, VOCAB = 8, 6, 11
SHAPES = {"batch": (2, TIME, DIM), "single": (TIME, DIM)}
TOL = {jnp.float64: 1e-10, jnp.float32: 1e-5}
CASES = {
    "RMSNorm": RMSNorm(),
    "SwiGLU": SwiGLU(12),
    "gqa_rope": MultiHeadAttention(4, causal=True, num_kv_heads=2, rope=True, bias=False),
    "mqa_rope_bidirectional": MultiHeadAttention(4, num_kv_heads=1, rope=True),
    "flash_gqa_rope": MultiHeadAttention(4, causal=True, num_kv_heads=2, rope=True, block_size=2),
    "flash_bidirectional": MultiHeadAttention(2, block_size=3),
}


def perturbed_params(layer, key, shape, dtype):
    """``layer``'s params moved off their special values (RMSNorm's ones), in ``dtype``."""
    _, params = layer.init(key, shape)
    return jax.tree_util.tree_map(
        lambda p: jnp.asarray(p + 0.3 * jax.random.normal(key, p.shape), dtype), params
    )


def check(layer, shape, dtype, seed=0):
    """``jaxbp.check_layer`` on perturbed params and an input of scale 2."""
    key = jax.random.key(seed)
    x = 2.0 * jax.random.normal(jax.random.fold_in(key, 1), shape, dtype)
    params = perturbed_params(layer, key, shape, dtype)
    tol = TOL[dtype]
    return jaxbp.check_layer(layer, key, shape, params=params, x=x, rtol=tol, atol=tol)


# One compiled check per (layer, shape, dtype), shared by every test that meets it.
jit_check = jax.jit(check, static_argnums=(0, 1, 2, 3))


def assert_report_ok(report):
    assert bool(report.ok), report.table()


# --------------------------------------------------------------------------------------------
# Manual backward vs jax.vjp
# --------------------------------------------------------------------------------------------


# Compiling the blocked attention's nested loops (and jax.vjp of them) takes seconds: float64
# batches of the four main cases run always, the other combinations with the slow tests.
FAST = {"RMSNorm", "SwiGLU", "gqa_rope", "flash_gqa_rope"}
JIT_CASES = [
    pytest.param(
        name,
        dtype,
        kind,
        id=f"{name}-{jnp.dtype(dtype).name}-{kind}",
        marks=()
        if (name in FAST and kind == "batch" and dtype == jnp.float64)
        else pytest.mark.slow,
    )
    for name in CASES
    for dtype, kind in ((jnp.float64, "batch"), (jnp.float64, "single"), (jnp.float32, "batch"))
]


@pytest.mark.parametrize("name, dtype, kind", JIT_CASES)
def test_check_layer_under_jit(name, dtype, kind):
    report = jit_check(CASES[name], SHAPES[kind], dtype)
    assert_report_ok(report)
    assert report.rel_error.max() <= TOL[dtype]


@pytest.mark.parametrize(
    "name",
    [
        "RMSNorm",
        *(
            pytest.param(n, marks=pytest.mark.slow)
            for n in ("SwiGLU", "gqa_rope", "flash_gqa_rope")
        ),
    ],
)
def test_check_layer_eager(name):
    assert_report_ok(check(CASES[name], SHAPES["batch"], jnp.float64))


@functools.cache
def attention(heads, kv_heads, causal, rope, bias, block_size):
    # The same Layer object for the same arguments: the jit cache then serves repeated shapes.
    return MultiHeadAttention(
        heads, causal=causal, num_kv_heads=kv_heads, rope=rope, bias=bias, block_size=block_size
    )


@pytest.mark.slow
@settings(max_examples=6, deadline=None)
@given(
    batch=st.sampled_from([None, 2]),
    time=st.sampled_from([2, 4]),
    kv_heads=st.sampled_from([1, 2]),
    group=st.sampled_from([1, 2]),
    head_dim=st.sampled_from([2, 4]),
    causal=st.booleans(),
    rope=st.booleans(),
    bias=st.booleans(),
    block_size=st.sampled_from([None, 1, 2]),
    seed=st.integers(0, 2**16),
)
def test_attention_property(
    batch, time, kv_heads, group, head_dim, causal, rope, bias, block_size, seed
):
    heads = kv_heads * group
    shape = (time, heads * head_dim) if batch is None else (batch, time, heads * head_dim)
    layer = attention(heads, kv_heads, causal, rope, bias, block_size)
    assert_report_ok(jit_check(layer, shape, jnp.float64, seed))


# --------------------------------------------------------------------------------------------
# The blocked attention computes the plain one
# --------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=(0, 1))
def outputs_and_grads(plain, blocked, params, x, dy):
    """Both layers' outputs and manual gradients on the same params and input."""
    found = []
    for layer in (plain, blocked):
        y, cache = layer.forward(params, x)
        found.append((y, layer.backward(params, cache, dy)))
    return found


@pytest.mark.parametrize(
    "causal, block_size",
    [
        (True, 2),
        pytest.param(True, 1, marks=pytest.mark.slow),
        pytest.param(True, 6, marks=pytest.mark.slow),
        (False, 3),
    ],
)
def test_blocked_attention_equals_plain(causal, block_size):
    options = dict(causal=causal, num_kv_heads=2, rope=True)
    plain = attention(4, 2, causal, True, True, None)
    blocked = attention(4, 2, causal, True, True, block_size)
    key = jax.random.key(block_size)
    params = perturbed_params(plain, key, SHAPES["batch"], jnp.float64)
    x = jax.random.normal(jax.random.fold_in(key, 1), SHAPES["batch"])
    dy = jax.random.normal(jax.random.fold_in(key, 2), SHAPES["batch"])
    (y, grads), (y_blocked, grads_blocked) = outputs_and_grads(plain, blocked, params, x, dy)
    np.testing.assert_allclose(y_blocked, y, rtol=1e-12, atol=1e-12)
    for ours, theirs in zip(jax.tree.leaves(grads_blocked), jax.tree.leaves(grads), strict=True):
        np.testing.assert_allclose(ours, theirs, rtol=1e-12, atol=1e-12)
    assert describe(blocked) == {**describe(plain), "block_size": block_size} != describe(plain)
    assert options == {k: describe(plain)[k] for k in options}


def test_blocked_attention_keeps_no_score_matrix():
    """The blocked cache holds the output and one log-sum-exp per row, nothing (time, time)."""
    layer = attention(4, 2, True, True, True, 2)
    x = jnp.ones(SHAPES["batch"])
    _, params = layer.init(jax.random.key(0), x.shape)
    _, cache = layer.forward(params, x)
    rows = 2 * 4 * TIME  # batch * heads * time
    assert sum(leaf.size for leaf in jax.tree.leaves(cache[4])) == rows
    assert all(TIME not in leaf.shape[-2:] or leaf.ndim < 4 for leaf in jax.tree.leaves(cache))


# --------------------------------------------------------------------------------------------
# Layer-specific values
# --------------------------------------------------------------------------------------------


def test_rmsnorm_and_swiglu_values():
    x = jax.random.normal(jax.random.key(0), (3, DIM))
    params = perturbed_params(RMSNorm(), jax.random.key(1), x.shape, jnp.float64)
    y, _ = RMSNorm(eps=1e-3).forward(params, x)
    xn = np.asarray(x)
    expected = xn / np.sqrt((xn**2).mean(-1, keepdims=True) + 1e-3) * np.asarray(params["scale"])
    np.testing.assert_allclose(y, expected, rtol=1e-13)
    p = perturbed_params(SwiGLU(5), jax.random.key(2), x.shape, jnp.float64)
    a, b = xn @ np.asarray(p["W1"]), xn @ np.asarray(p["W3"])
    expected = (a / (1 + np.exp(-a)) * b) @ np.asarray(p["W2"])
    np.testing.assert_allclose(SwiGLU(5).forward(p, x)[0], expected, rtol=1e-12)
    assert {k: v.shape for k, v in p.items()} == {"W1": (8, 5), "W3": (8, 5), "W2": (5, 8)}


def test_attention_parameter_shapes_and_defaults():
    _, params = MultiHeadAttention(4, num_kv_heads=2, bias=False).init(jax.random.key(0), (6, 8))
    assert {k: v.shape for k, v in params.items()} == {
        "Wq": (8, 8),
        "Wk": (8, 4),
        "Wv": (8, 4),
        "Wo": (8, 8),
    }
    # The defaults are today's layer: same description, same params, same outputs.
    assert describe(MultiHeadAttention(2)) == {
        "name": "MultiHeadAttention",
        "num_heads": 2,
        "causal": False,
    }
    same = MultiHeadAttention(2, num_kv_heads=2, rope=False, bias=True, block_size=None)
    assert describe(same)["num_kv_heads"] == 2


def test_rope_turns_each_pair_by_its_angle():
    """One head of dim 4 at position t: pair (0, 2) turns by t, pair (1, 3) by t / 100."""
    layer = MultiHeadAttention(1, rope=True, bias=False)
    eye = jnp.eye(4)
    params = {"Wq": eye, "Wk": eye, "Wv": eye, "Wo": eye}
    x = jax.random.normal(jax.random.key(0), (3, 4))
    _, (_, q, k, _, _, _) = layer.forward(params, x)
    for t in range(3):
        for pair, angle in (((0, 2), t), ((1, 3), t / 100)):
            c, s = math.cos(angle), math.sin(angle)
            a, b = (float(x[t, i]) for i in pair)
            np.testing.assert_allclose(q[t, 0, list(pair)], [a * c - b * s, b * c + a * s])
    np.testing.assert_allclose(q, k)


# --------------------------------------------------------------------------------------------
# Weight tying
# --------------------------------------------------------------------------------------------


def tiny_llama(dtype=None, **attention_options):
    """Embedding, RMSNorm, attention, SwiGLU, RMSNorm, and the embedding again as logits."""
    return tied(
        Embedding(VOCAB, DIM, dtype=dtype),
        RMSNorm(dtype=dtype),
        MultiHeadAttention(
            4, causal=True, num_kv_heads=2, rope=True, bias=False, dtype=dtype, **attention_options
        ),
        SwiGLU(12, dtype=dtype),
        RMSNorm(dtype=dtype),
        Dense(VOCAB, dtype=dtype),
        source="0.W",
        target="5.W",
        transpose=True,
    )


# The tie itself, without attention (compiled in seconds, not tens of seconds); the whole
# tiny Llama is checked in a train step among the slow tests.
TIED = tied(
    Embedding(VOCAB, DIM),
    RMSNorm(),
    SwiGLU(12),
    RMSNorm(),
    Dense(VOCAB),
    source="0.W",
    target="4.W",
    transpose=True,
)


@jax.jit
def tied_and_untied(params, ids, dy):
    """The tied network's manual gradients, and the untied network's on the same weights."""
    net = TIED
    _, cache = net.forward(params, ids)
    grads, _ = net.backward(params, cache, dy)
    untied = jaxbp.serial(*net.children)
    full = (*params[:4], {**params[4], "W": params[0]["W"].T})
    y, untied_cache = untied.forward(full, ids)
    untied_grads, _ = untied.backward(full, untied_cache, dy)
    _, vjp = jax.vjp(lambda p: net.forward(p, ids)[0], params)
    return y, grads, untied_grads, vjp(dy)[0]


def test_tied_gradient_is_the_sum_of_both_uses():
    net = TIED
    ids = jax.random.randint(jax.random.key(1), (2, TIME), 0, VOCAB)
    shape, params = net.init(jax.random.key(0), ids.shape)
    assert shape == (2, TIME, VOCAB) and set(params[4]) == {"b"}
    dy = jax.random.normal(jax.random.key(2), shape)
    y, grads, untied, reference = tied_and_untied(params, ids, dy)
    np.testing.assert_allclose(net.forward(params, ids)[0], y, rtol=1e-12, atol=1e-15)
    both = untied[0]["W"] + untied[4]["W"].T
    np.testing.assert_allclose(grads[0]["W"], both, rtol=1e-13, atol=1e-15)
    assert float(jnp.abs(untied[4]["W"]).min()) > 0  # the second use contributes everywhere
    assert_report_ok(compare_grads(grads, reference, rtol=1e-10, atol=1e-10))


def test_tied_without_transpose_and_errors():
    net = tied(Dense(4), jaxbp.Tanh, Dense(4), source="0.W", target="2.W")
    _, params = net.init(jax.random.key(0), (3, 4))
    assert [sorted(p) for p in params] == [["W", "b"], [], ["b"]]
    assert_report_ok(jaxbp.check_layer(net, jax.random.key(1), (3, 4), params=params))
    bad_paths = [
        (dict(source="0.X", target="2.W"), r"source '0.X' names no parameter"),
        (dict(source="0.W", target="7.W"), r"target '7.W' names no parameter"),
        (dict(source="0.b", target="1.W"), r"target '1.W' has shape \(4, 4\), expected \(4,\)"),
    ]
    for paths, message in bad_paths:
        with pytest.raises(ValueError, match=r"^tied: " + message):
            tied(Dense(4), Dense(4), **paths).init(jax.random.key(0), (3, 4))
    with pytest.raises(ValueError, match=r"transpose of source '0.W' \(4, 3\)"):
        tied(Dense(3), Dense(3), source="0.W", target="1.W", transpose=True).init(
            jax.random.key(0), (2, 4)
        )
    for paths in (dict(source="", target="1.W"), dict(source="0.W", target="0.W")):
        with pytest.raises(ValueError, match=r"tied expects"):
            tied(Dense(4), Dense(4), **paths)
    with pytest.raises(TypeError, match=r"tied expects transpose to be True or False"):
        tied(Dense(4), Dense(4), source="0.W", target="1.W", transpose="yes")


def test_llama_preset_builds_and_round_trips():
    description = llama_description(103)
    net = build(description)
    # Shapes only (jax.eval_shape): building the arrays would compile every initialiser.
    params = jax.eval_shape(lambda: net.init(jax.random.key(0), (-1, 128))[1])
    assert jaxbp.output_shape(net, (-1, 128)) == (-1, 128, 103) and net.name == "tied"
    assert sum(math.prod(p.shape) for p in jax.tree.leaves(params)) == 751_719
    assert params[-1].keys() == {"b"} and params[0]["W"].shape == (103, 128)
    assert describe(build(describe(net))) == describe(net)
    preset = get_preset("llama")
    assert preset.dataset == "text" and preset.input_shape == (128,)
    assert preset.description(103) == description


def test_tied_threads_state_and_keys():
    """A child with randomness (Dropout): the tied network has state and a key like serial's,
    and its backward is the gradient of the very mask the forward drew."""
    net = tied(Dense(4), jaxbp.Dropout(0.5), Dense(4), source="0.W", target="2.W")
    assert net.has_state
    x = jax.random.normal(jax.random.key(0), (3, 4))
    _, params = net.init(jax.random.key(1), x.shape)
    state, key = jaxbp.init_state(net, x.shape), jax.random.key(2)

    def run(p, xx):
        return jaxbp.apply(net, p, state, xx, key=key, train=True)[0]

    y, cache, _ = jaxbp.apply(net, params, state, x, key=key, train=True)
    dy = jax.random.normal(jax.random.key(3), y.shape)
    grads, dx = net.backward(params, cache, dy)
    _, vjp = jax.vjp(run, params, x)
    ref_grads, ref_x = vjp(dy)
    assert_report_ok(
        compare_grads({"p": grads, "x": dx}, {"p": ref_grads, "x": ref_x}, rtol=1e-12, atol=1e-12)
    )
    y_eval, _, _ = jaxbp.apply(net, params, state, x, train=False)
    full = (params[0], params[1], {**params[2], "W": params[0]["W"]})
    expected = (x @ full[0]["W"] + full[0]["b"]) @ full[2]["W"] + full[2]["b"]
    np.testing.assert_allclose(y_eval, expected, rtol=1e-13)


@pytest.mark.slow
def test_llama_in_a_checked_train_step():
    """The preset's network at toy size (blocked attention too) trains under check="raise"."""
    net = build(llama_description(VOCAB, layers=1, width=DIM, hidden=12, block_size=3))
    optimizer = optax.adam(1e-2)
    step = jaxbp.make_train_step(net, jaxbp.softmax_cross_entropy, optimizer, check="raise")
    ids = jax.random.randint(jax.random.key(1), (4, TIME), 0, VOCAB)
    _, params = net.init(jax.random.key(0), ids.shape)
    ts = jaxbp.init_train_state(net, optimizer, params)
    losses = []
    for _ in range(3):
        ts, metrics = step(ts, ids, jnp.roll(ids, -1, axis=1))
        assert bool(metrics.ok) and bool(metrics.applied) and float(metrics.rel_error) < 1e-9
        losses.append(float(metrics.loss))
    assert losses[2] < losses[0]
    assert len(jax.tree.leaves(ts.params)) == len(jax.tree.leaves(params))


# --------------------------------------------------------------------------------------------
# Descriptions, dtypes, bad input
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "layer",
    [
        RMSNorm(),
        RMSNorm(eps=1e-5, dtype="float32"),
        SwiGLU(12),
        MultiHeadAttention(4, num_kv_heads=2, rope=True, rope_theta=500.0, bias=False),
        MultiHeadAttention(2, causal=True, block_size=16),
        tiny_llama(),
    ],
    ids=lambda layer: layer.name,
)
def test_description_round_trip(layer):
    description = describe(layer)
    assert json.loads(json.dumps(description)) == description
    assert describe(build(description)) == description


def test_dtypes():
    for layer in (RMSNorm(), SwiGLU(3), MultiHeadAttention(2, num_kv_heads=1, bias=False)):
        for dtype, expected in ((None, jnp.float64), ("float32", jnp.float32)):
            rebuilt = build({**describe(layer), **({"dtype": dtype} if dtype else {})})
            _, params = rebuilt.init(jax.random.key(0), (2, 3, 4))
            assert {p.dtype for p in jax.tree.leaves(params)} == {jnp.dtype(expected)}


def test_construction_errors_name_the_argument():
    for bad, message in [
        (lambda: MultiHeadAttention(4, num_kv_heads=3), r"num_kv_heads 3 does not"),
        (lambda: MultiHeadAttention(4, num_kv_heads=0), r"positive integer num_kv_heads"),
        (lambda: MultiHeadAttention(4, block_size=0), r"positive integer block_size, got 0"),
        (lambda: MultiHeadAttention(4, block_size=2.0), r"positive integer block_size"),
        (lambda: MultiHeadAttention(4, rope="yes"), r"rope to be True or False"),
        (lambda: MultiHeadAttention(4, bias=None), r"bias to be True or False"),
        (lambda: MultiHeadAttention(4, rope_theta=0.0), r"rope_theta > 0, got 0.0"),
        (lambda: RMSNorm(eps=0), r"RMSNorm expects eps > 0, got 0"),
        (lambda: SwiGLU(0), r"SwiGLU expects a positive integer hidden, got 0"),
        (lambda: SwiGLU(2.5), r"SwiGLU expects a positive integer hidden, got 2.5"),
    ]:
        # one class for every bad argument, whether its type or its value is wrong
        with pytest.raises(jaxbp.ArgumentError, match=message):
            bad()


def raises_under_jit(error, match, fn, *args):
    with pytest.raises(error, match=match):
        fn(*args)
    with pytest.raises(error, match=match):
        jax.jit(fn)(*args)


def test_shape_errors_fire_under_jit():
    layer = MultiHeadAttention(2, rope=True, block_size=4)
    with pytest.raises(ValueError, match=r"rope=True needs an even head dimension, got head di"):
        layer.init(jax.random.key(0), (6, 6))
    with pytest.raises(ValueError, match=r"block_size 4 does not divide the sequence length 6"):
        layer.init(jax.random.key(0), (6, 8))
    _, params = layer.init(jax.random.key(0), (8, 8))
    raises_under_jit(
        ValueError,
        r"block_size 4 does not divide the sequence length 6",
        lambda x: layer.forward(params, x)[0],
        jnp.ones((6, 8)),
    )
    _, norm = RMSNorm().init(jax.random.key(0), (3, 4))
    raises_under_jit(
        ValueError,
        r"RMSNorm expects inputs of shape \(..., features\) with 4 features, got shape \(3, 5\)",
        lambda x: RMSNorm().forward(norm, x)[0],
        jnp.ones((3, 5)),
    )
    raises_under_jit(
        TypeError,
        r"SwiGLU expects floating-point inputs",
        lambda x: SwiGLU(3).forward(SwiGLU(3).init(jax.random.key(0), (4,))[1], x)[0],
        jnp.ones((2, 4), int),
    )


BAD_MODELS = [
    ({"name": "MultiHeadAttention", "num_heads": 4, "num_kv_heads": 3}, "num_kv_heads 3"),
    ({"name": "MultiHeadAttention", "num_heads": 2, "rope": True}, "rope=True needs an even"),
    ({"name": "MultiHeadAttention", "num_heads": 2, "block_size": 4}, "block_size 4 does not"),
    (
        {"name": "MultiHeadAttention", "num_heads": 2, "block_size": 0},
        "positive integer block_size",
    ),
    (
        {
            "name": "tied",
            "layers": [{"name": "Dense", "out_dim": 6}, {"name": "Dense", "out_dim": 6}],
            "source": "0.W",
            "target": "1.X",
        },
        "target '1.X' names no parameter",
    ),
    (
        {
            "name": "tied",
            "layers": [{"name": "Dense", "out_dim": 6}, {"name": "Dense", "out_dim": 6}],
            "source": "0.b",
            "target": "1.W",
        },
        "target '1.W' has shape (6, 6), expected (6,)",
    ),
]


@pytest.mark.parametrize("description, fragment", BAD_MODELS, ids=[m[1] for m in BAD_MODELS])
def test_bad_models_on_the_command_line(description, fragment, run_cli, tmp_path):
    path = tmp_path / "model.json"
    path.write_text(json.dumps(description))
    code, _, err = run_cli("check", "--model", path, "--input-shape", "6,6")
    lines = err.splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("jaxbp check: error: ") and fragment in lines[0], err


# --------------------------------------------------------------------------------------------
# PyTorch in float64 (skipped where PyTorch is not installed)
# --------------------------------------------------------------------------------------------


def assert_torch_agrees(torch, layer, params, x, reference):
    """``reference(x, **params as torch tensors) -> y``: outputs and gradients of x and params."""
    y, cache = layer.forward(params, x)
    dy = jax.random.normal(jax.random.key(9), y.shape)
    dparams, dx = layer.backward(params, cache, dy)
    tensors = {k: torch.tensor(np.asarray(v), requires_grad=True) for k, v in params.items()}
    tx = torch.tensor(np.asarray(x), requires_grad=True)
    ty = reference(tx, **tensors)
    (ty * torch.tensor(np.asarray(dy))).sum().backward()
    np.testing.assert_allclose(y, ty.detach().numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dx, tx.grad.numpy(), rtol=1e-10, atol=1e-12)
    assert set(dparams) == set(tensors)
    for name, t in tensors.items():
        np.testing.assert_allclose(dparams[name], t.grad.numpy(), rtol=1e-10, atol=1e-12)


@pytest.mark.slow
def test_rmsnorm_and_swiglu_match_pytorch():
    torch = pytest.importorskip("torch")
    x = jax.random.normal(jax.random.key(0), SHAPES["batch"])
    params = perturbed_params(RMSNorm(), jax.random.key(1), x.shape, jnp.float64)

    def torch_rmsnorm(tx, scale):
        norm = torch.nn.RMSNorm(DIM, eps=1e-6, dtype=torch.float64)
        # The module computes with our tensor itself, so the gradient lands on it.
        del norm.weight
        norm.weight = scale
        return norm(tx)

    assert_torch_agrees(torch, RMSNorm(), params, x, torch_rmsnorm)
    swiglu = SwiGLU(12)
    params = perturbed_params(swiglu, jax.random.key(2), x.shape, jnp.float64)

    def torch_swiglu(tx, W1, W2, W3):
        # nn.Linear keeps weight as (out, in): ours transposed.
        gate, up = (torch.nn.functional.linear(tx, w.T) for w in (W1, W3))
        return torch.nn.functional.linear(torch.nn.functional.silu(gate) * up, W2.T)

    assert_torch_agrees(torch, swiglu, params, x, torch_swiglu)


def hf_llama_attention(torch, heads, kv_heads, causal, rope, theta=10000.0):
    """Self-attention written as Hugging Face's ``LlamaAttention`` (eager), on our weights."""
    F = torch.nn.functional

    def rotate_half(a):
        half = a.shape[-1] // 2
        return torch.cat((-a[..., half:], a[..., :half]), dim=-1)

    def repeat_kv(hidden, n_rep):
        batch, kv, time, d = hidden.shape
        hidden = hidden[:, :, None, :, :].expand(batch, kv, n_rep, time, d)
        return hidden.reshape(batch, kv * n_rep, time, d)

    def run(x, Wq, Wk, Wv, Wo, bq=None, bk=None, bv=None, bo=None):
        batch, time, dim = x.shape
        d = dim // heads
        q = F.linear(x, Wq.T, bq).view(batch, time, heads, d).transpose(1, 2)
        k = F.linear(x, Wk.T, bk).view(batch, time, kv_heads, d).transpose(1, 2)
        v = F.linear(x, Wv.T, bv).view(batch, time, kv_heads, d).transpose(1, 2)
        if rope:
            inv_freq = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
            freqs = torch.outer(torch.arange(time, dtype=torch.float64), inv_freq)
            emb = torch.cat((freqs, freqs), dim=-1)
            cos, sin = emb.cos(), emb.sin()
            q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        k, v = repeat_kv(k, heads // kv_heads), repeat_kv(v, heads // kv_heads)
        scores = q @ k.transpose(2, 3) / math.sqrt(d)
        if causal:
            above = torch.triu(torch.ones(time, time, dtype=torch.bool), diagonal=1)
            scores = scores.masked_fill(above, float("-inf"))
        out = (torch.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(batch, time, dim)
        return F.linear(out, Wo.T, bo)

    return run


@pytest.mark.slow
@pytest.mark.parametrize(
    "kv_heads, causal, rope, bias, block_size",
    [(2, True, True, False, None), (1, False, True, True, None), (2, True, True, False, 3)],
    ids=["gqa-rope-causal", "mqa-rope-bias", "gqa-rope-blocked"],
)
def test_attention_matches_hugging_face_llama(kv_heads, causal, rope, bias, block_size):
    torch = pytest.importorskip("torch")
    layer = attention(4, kv_heads, causal, rope, bias, block_size)
    x = jax.random.normal(jax.random.key(0), SHAPES["batch"])
    params = perturbed_params(layer, jax.random.key(1), x.shape, jnp.float64)
    reference = hf_llama_attention(torch, 4, kv_heads, causal, rope)
    assert_torch_agrees(torch, layer, params, x, reference)


# --------------------------------------------------------------------------------------------
# The memory/time table (python -m benchmarks.flash_attention), at tiny sizes
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_flash_attention_benchmark_smoke(capsys):
    from benchmarks import flash_attention

    assert flash_attention.main(["--quick"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].startswith("| T | plain MiB") and len(lines) == 5
    assert lines[3].startswith("| 32 |") and lines[4].startswith("| 64 |")
    # T=64 in blocks of 16: the blocked layer needs a fraction of the plain layer's memory.
    ratio = lines[4].rstrip(" |").rsplit("1/", 1)[1]
    assert int(ratio) >= 4, lines[4]


# --------------------------------------------------------------------------------------------
# The teaching trace of a tied matrix: jaxbp trace --example tied
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_tied_trace_adds_both_uses(run_cli, tmp_path):
    code, out, err = run_cli("trace", "--example", "tied")
    assert code == 0, err
    assert "W is one parameter, so its gradient is the sum of both uses'" in out
    assert "dE/dW[1][1] = x1*dE/dz_1 + h_1*dE/dy_1 = (-0.1208) + (-0.0524) = -0.1732" in out
    code, out, _ = run_cli("trace", "--example", "tied", "--format", "json")
    traced = json.loads(out)
    both = np.add(traced["use_first"], traced["use_output"])
    np.testing.assert_allclose(traced["grads"]["W"], both, rtol=1e-15, atol=1e-17)
    np.testing.assert_allclose(traced["autodiff"]["W"], both, rtol=1e-14)
    assert traced["autodiff_max_abs_diff"] < 1e-15
    # The trace's own input file traces the same numbers again.
    path = tmp_path / "tied.json"
    path.write_text(json.dumps(traced["input"]))
    code, again, _ = run_cli("trace", "--model", path, "--format", "json")
    assert code == 0 and json.loads(again)["grads"] == traced["grads"]
    path.write_text(json.dumps({**traced["input"], "params": [{}, {}, {}]}))
    code, _, err = run_cli("trace", "--model", path)
    assert code == 2 and "params[0] must be an object with keys ['W', 'b']" in err
