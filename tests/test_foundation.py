"""The foundation: model descriptions, BatchNorm and Dropout, residual and concat, the verified
step with layer state and randomness, and compare_grads's rounding floor.

Gradients are checked against ``jax.vjp`` of ``jaxbp.apply`` (the function that ran, with the
same state and key) in float64 to 1e-10 and in float32 to 1e-5, with and without ``jit``.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxbp
from jaxbp import faults
from jaxbp.model import build, describe, factory, layer_names, load_description

pytestmark = pytest.mark.filterwarnings("error")

TOL = {jnp.float64: 1e-10, jnp.float32: 1e-5}


def assert_close(a, b, tol):
    """max |a - b| <= tol * max |b|, leaf by leaf (relative to the leaf, as compare_grads),
    or below compare_grads's rounding floor: ROUNDING_FLOOR * eps * the tree's largest entry
    (a gradient that is 0 in exact arithmetic, a bias before a BatchNorm, is rounding)."""
    pairs = list(zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True))
    tree_scale = max([float(np.max(np.abs(v), initial=0.0)) for _, v in pairs] + [0.0])
    for u, v in pairs:
        eps = np.finfo(np.asarray(u).dtype).eps
        u, v = np.asarray(u, np.float64), np.asarray(v, np.float64)
        scale = max(np.max(np.abs(v)), np.finfo(np.float64).tiny) if v.size else 1.0
        allowed = max(tol * scale, jaxbp.gradcheck.ROUNDING_FLOOR * eps * tree_scale)
        assert np.max(np.abs(u - v), initial=0.0) <= allowed, (np.max(np.abs(u - v)), scale)


def same(a, b) -> bool:
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    return len(la) == len(lb) and all(
        np.array_equal(np.asarray(u), np.asarray(v)) for u, v in zip(la, lb)
    )


def cast(tree, dtype):
    return jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), tree)


# --------------------------------------------------------------------------------------------
# (a) Model descriptions: every registered layer round-trips
# --------------------------------------------------------------------------------------------

SAMPLES = {  # a description per registered name that needs arguments (or has some to vary)
    "Dense": {
        "name": "Dense",
        "out_dim": 3,
        "shared_bias": True,
        "w_init": "he",
        "b_init": 0.5,
        "dtype": "float32",
    },
    "LeakyRelu": {"name": "LeakyRelu", "slope": 0.2},
    "BatchNorm": {"name": "BatchNorm", "momentum": 0.8, "eps": 1e-3, "dtype": None},
    "Dropout": {"name": "Dropout", "rate": 0.25},
    "serial": {"name": "serial", "layers": [{"name": "Dense", "out_dim": 4}, {"name": "Relu"}]},
    "residual": {
        "name": "residual",
        "layers": [{"name": "Dense", "out_dim": 4}, {"name": "BatchNorm"}],
    },
    "concat": {
        "name": "concat",
        "layers": [{"name": "Dense", "out_dim": 2}, {"name": "Dropout", "rate": 0.5}],
    },
    "Conv1D": {"name": "Conv1D", "out_channels": 4, "kernel_size": 3, "stride": 2},
    "Conv2D": {"name": "Conv2D", "out_channels": 4, "kernel_size": [3, 3]},
    "AvgPool1D": {"name": "AvgPool1D", "window": 2},
    "AvgPool2D": {"name": "AvgPool2D", "window": [2, 2]},
    "MaxPool1D": {"name": "MaxPool1D", "window": 2, "stride": 1},
    "MaxPool2D": {"name": "MaxPool2D", "window": [2, 2]},
    "Embedding": {"name": "Embedding", "vocab_size": 11, "dim": 4},
    "PositionalEmbedding": {"name": "PositionalEmbedding", "max_len": 16, "dim": 4},
    "GRU": {"name": "GRU", "hidden": 5, "return_sequences": False},
    "LSTM": {"name": "LSTM", "hidden": 5, "reverse": True},
    "SwiGLU": {"name": "SwiGLU", "hidden": 6},
    "tied": {
        "name": "tied",
        "layers": [
            {"name": "Dense", "out_dim": 3},
            {"name": "Tanh"},
            {"name": "Dense", "out_dim": 4},
        ],
        "source": "0.W",
        "target": "2.W",
        "transpose": True,
    },
    "MultiHeadAttention": {"name": "MultiHeadAttention", "num_heads": 2, "causal": True},
    "bidirectional": {"name": "bidirectional", "layer": {"name": "GRU", "hidden": 3}},
    "Fault": {"name": "Fault", "kind": "sign", "layer": {"name": "Dense", "out_dim": 2}},
}

NESTED = {
    "name": "serial",
    "layers": [
        {"name": "Dense", "out_dim": 6},
        {
            "name": "residual",
            "layers": [
                {"name": "Dense", "out_dim": 6},
                {"name": "BatchNorm"},
                {"name": "Tanh"},
                {"name": "Dropout", "rate": 0.1},
            ],
        },
        {
            "name": "concat",
            "layers": [
                {"name": "serial", "layers": [{"name": "Dense", "out_dim": 2}, {"name": "Relu"}]},
                {"name": "residual", "layers": [{"name": "Dense", "out_dim": 6}]},
                {"name": "Identity"},
            ],
        },
        {"name": "Dense", "out_dim": 3},
    ],
}


def _is_subset(small, big) -> bool:
    """Every key of ``small`` is in ``big`` with the same value (nested descriptions too)."""
    if isinstance(small, dict):
        return isinstance(big, dict) and all(
            k in big and _is_subset(v, big[k]) for k, v in small.items()
        )
    if isinstance(small, list):
        return (
            isinstance(big, list)
            and len(small) == len(big)
            and all(_is_subset(u, v) for u, v in zip(small, big))
        )
    return small == big


def _round_trip(description):
    first = describe(build(description))
    assert _is_subset(description, first), (description, first)
    assert describe(build(first)) == first
    assert json.loads(json.dumps(first)) == first  # JSON-able
    assert describe(build(load_description(json.dumps(first)))) == first
    return first


@pytest.mark.parametrize("name", layer_names())
def test_every_registered_layer_round_trips(name):
    if name in SAMPLES:
        description = SAMPLES[name]
    else:
        try:
            description = describe(factory(name)())
        except TypeError:
            pytest.skip(f"{name} needs arguments: add a description of it to SAMPLES")
    assert _round_trip(description)["name"] == name


@pytest.mark.slow
def test_nested_network_round_trips_and_builds_the_same_network():
    first = _round_trip(NESTED)
    a, b = build(NESTED), build(first)
    assert a.has_state and b.has_state
    _, pa = a.init(jax.random.key(0), (-1, 5))
    _, pb = b.init(jax.random.key(0), (-1, 5))
    assert same(pa, pb)
    x = jax.random.normal(jax.random.key(1), (4, 5))
    state = jaxbp.init_state(a, x.shape)
    ya = jaxbp.apply(a, pa, state, x, key=jax.random.key(2))[0]
    yb = jaxbp.apply(b, pb, state, x, key=jax.random.key(2))[0]
    np.testing.assert_array_equal(ya, yb)
    assert ya.shape == (4, 3)  # the concat joins 2 + 6 + 6 features, the Dense maps them to 3


def test_a_layer_built_in_python_describes_as_it_was_called():
    net = jaxbp.serial(
        jaxbp.Dense(4, w_init="glorot"),
        jaxbp.BatchNorm(momentum=0.5),
        jaxbp.residual(jaxbp.Dense(4), jaxbp.Dropout(0.2)),
        jaxbp.concat(jaxbp.Tanh, jaxbp.LeakyRelu(0.3)),
    )
    d = describe(net)
    assert [layer["name"] for layer in d["layers"]] == ["Dense", "BatchNorm", "residual", "concat"]
    assert d["layers"][1]["momentum"] == 0.5 and d["layers"][2]["layers"][1]["rate"] == 0.2
    assert d["layers"][3]["layers"][1] == {"name": "LeakyRelu", "slope": 0.3}
    assert describe(build(d)) == d
    assert [child.name for child in net.children] == ["Dense", "BatchNorm", "residual", "concat"]


UNKNOWN = {
    "name": "serial",
    "layers": [{"name": "Dense", "out_dim": 3}, {"name": "Relu"}, {"name": "Conv3D"}],
}


@pytest.mark.parametrize(
    "description, fragments",
    [
        (
            UNKNOWN,
            [
                "model.layers[2]: unknown layer 'Conv3D'; expected one of: ",
                "Dense",
                "BatchNorm",
                "Dropout",
                "residual",
            ],
        ),
        (
            {"name": "Dense", "width": 3},
            ["model: Dense got an unexpected keyword argument 'width'"],
        ),
        (
            {"name": "serial", "layers": [{"name": "Relu"}, {"name": "Dense"}]},
            ["model.layers[1]: Dense", "missing 1 required positional argument: 'out_dim'"],
        ),
        (
            {"name": "serial", "layers": [{"name": "Dense", "out_dim": -2}]},
            ["model.layers[0]: Dense expects a positive integer out_dim, got -2"],
        ),
        (
            {"name": "residual", "layers": [{"name": "Tanh"}, {"name": "Dropout", "rate": 1.5}]},
            ["model.layers[1]: Dropout expects rate in [0, 1), got 1.5"],
        ),
        (
            {"name": "serial", "layers": [{"name": "BatchNorm", "momentum": 2}]},
            ["model.layers[0]: BatchNorm expects momentum in [0, 1], got 2"],
        ),
        ({"name": "serial", "layers": 3}, ["model.layers: expected a list of layer descriptions"]),
        ({"layers": []}, ["model: expected a layer description, a dict with a 'name' key"]),
        (
            {
                "name": "concat",
                "layers": [
                    {
                        "name": "serial",
                        "layers": [{"name": "Dense", "out_dim": 2}, {"name": "Pool"}],
                    }
                ],
            },
            ["model.layers[0].layers[1]: unknown layer 'Pool'"],
        ),
    ],
)
def test_build_errors_name_the_place(description, fragments):
    with pytest.raises(ValueError) as info:
        build(description)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_load_description_errors(tmp_path):
    assert load_description('{"name": "Tanh"}') == {"name": "Tanh"}
    path = tmp_path / "net.json"
    path.write_text(json.dumps(NESTED))
    assert load_description(str(path)) == NESTED
    with pytest.raises(ValueError, match="model description is not valid JSON"):
        load_description('{"name": ')
    with pytest.raises(ValueError, match=r"model file '.*nowhere.json' does not exist"):
        load_description(str(tmp_path / "nowhere.json"))
    with pytest.raises(TypeError, match="describe expects a jaxbp Layer, got str"):
        describe("Dense")


# --------------------------------------------------------------------------------------------
# (b) BatchNorm and Dropout: manual backward vs jax.vjp of apply
# --------------------------------------------------------------------------------------------


def vjp_pair(layer, params, state, x, train, key):
    """``((manual dparams, dx), (vjp dparams, dx), y, new_state)`` of one call."""
    y, cache, new_state = jaxbp.apply(layer, params, state, x, key=key, train=train)
    dy = jax.random.normal(jax.random.key(99), y.shape, y.dtype)
    manual = layer.backward(params, cache, dy)
    _, vjp = jax.vjp(
        lambda p, xx: jaxbp.apply(layer, p, state, xx, key=key, train=train)[0], params, x
    )
    return manual, vjp(dy), y, new_state


_vjp_pair_jit = jax.jit(vjp_pair, static_argnums=(0, 4))


VJP_KEY = jax.random.key(3)  # the forward's key in every vjp comparison


def check_against_vjp(layer, shape, dtype, train, jit, key=VJP_KEY, state=None):
    _, params = layer.init(jax.random.key(0), shape)
    # Non-trivial scale and bias, so that their gradients and dx's every term matter.
    params = jax.tree_util.tree_map(
        lambda p: p + 0.3 * jax.random.normal(jax.random.key(5), p.shape, p.dtype), params
    )
    params = cast(params, dtype)
    x = 1.5 + 2.0 * jax.random.normal(jax.random.key(1), shape, dtype)
    state = cast(jaxbp.init_state(layer, shape) if state is None else state, dtype)
    manual, ref, y, new_state = (_vjp_pair_jit if jit else vjp_pair)(
        layer, params, state, x, train, key
    )
    assert y.dtype == dtype and dx_dtype(manual) == dtype
    assert_close(manual, ref, TOL[dtype])
    return manual, y, new_state, params, state, x


def dx_dtype(manual):
    return manual[1].dtype


BN = jaxbp.BatchNorm(momentum=0.7)


@pytest.mark.slow
@pytest.mark.parametrize("jit", [False, True], ids=["nojit", "jit"])
@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", [(6, 4), (3, 5, 4)], ids=["batch", "spatial"])
def test_batchnorm_backward_matches_vjp(shape, train, dtype, jit):
    # Eval from a non-trivial running state: the fixed statistics are not 0 and 1.
    state = {"mean": jnp.array([0.5, -1.0, 2.0, 0.0]), "var": jnp.array([0.3, 2.0, 1.0, 4.0])}
    manual, *_ = check_against_vjp(BN, shape, dtype, train, jit, state=state)
    if train:  # the batch statistics: dx sums to zero over the normalised axes
        dx = np.asarray(manual[1], np.float64)
        total = np.abs(dx.reshape(-1, 4).sum(axis=0))
        assert np.all(total <= 1e2 * TOL[dtype] * np.abs(dx).max() * dx.size), total


@pytest.mark.slow  # ~30 s of CPU: one eager check per example
@settings(max_examples=10, deadline=None, derandomize=True)
@given(
    batch=st.integers(2, 7),
    length=st.integers(1, 4),
    features=st.integers(1, 5),
    momentum=st.floats(0.0, 1.0),
    spatial=st.booleans(),
)
def test_batchnorm_property(batch, length, features, momentum, spatial):
    shape = (batch, length, features) if spatial else (batch, features)
    layer = jaxbp.BatchNorm(momentum=momentum)
    check_against_vjp(layer, shape, jnp.float64, True, False)
    check_against_vjp(layer, shape, jnp.float64, False, False)


def batchnorm_reference(x, state, momentum):
    """numpy: the batch statistics and the new running statistics (unbiased variance)."""
    x = np.asarray(x, np.float64)
    axes = tuple(range(x.ndim - 1))
    mean, var = x.mean(axis=axes), x.var(axis=axes)
    n = x.size // x.shape[-1]
    new = {
        "mean": momentum * np.asarray(state["mean"]) + (1 - momentum) * mean,
        "var": momentum * np.asarray(state["var"]) + (1 - momentum) * var * n / (n - 1),
    }
    return mean, var, new


@pytest.mark.parametrize("shape", [(8, 3), (2, 5, 3)], ids=["batch", "spatial"])
def test_batchnorm_running_statistics_and_eval(shape):
    momentum, eps = 0.8, 1e-3
    layer = jaxbp.BatchNorm(momentum=momentum, eps=eps)
    _, params = layer.init(jax.random.key(0), shape)
    params = {"scale": jnp.array([1.0, 2.0, 0.5]), "bias": jnp.array([0.0, -1.0, 3.0])}
    state = jaxbp.init_state(layer, shape)
    assert same(state, {"mean": np.zeros(3), "var": np.ones(3)})
    ref_state = jax.tree_util.tree_map(np.asarray, state)
    apply = jax.jit(lambda s, x: jaxbp.apply(layer, params, s, x, train=True))
    for i in range(3):  # three batches: the update compounds
        x = 2.0 + 3.0 * jax.random.normal(jax.random.key(10 + i), shape)
        y, _, state = apply(state, x)
        mean, var, ref_state = batchnorm_reference(x, ref_state, momentum)
        np.testing.assert_allclose(state["mean"], ref_state["mean"], rtol=1e-13)
        np.testing.assert_allclose(state["var"], ref_state["var"], rtol=1e-13)
        expect = (np.asarray(x) - mean) / np.sqrt(var + eps) * [1.0, 2.0, 0.5] + [0.0, -1.0, 3.0]
        np.testing.assert_allclose(y, expect, rtol=1e-12, atol=1e-12)
    # Evaluation: the running statistics, and the state comes back unchanged.
    x = jax.random.normal(jax.random.key(20), shape)
    for jit in (False, True):
        run = (
            jax.jit(jaxbp.apply, static_argnums=0, static_argnames="train") if jit else jaxbp.apply
        )
        y, _, after = run(layer, params, state, x, train=False)
        assert same(after, state)
        expect = (np.asarray(x) - np.asarray(state["mean"])) / np.sqrt(state["var"] + eps) * [
            1.0,
            2.0,
            0.5,
        ] + [0.0, -1.0, 3.0]
        np.testing.assert_allclose(y, expect, rtol=1e-12, atol=1e-12)


def test_batchnorm_errors():
    with pytest.raises(ValueError, match="BatchNorm expects momentum in \\[0, 1\\], got 1.5"):
        jaxbp.BatchNorm(momentum=1.5)
    with pytest.raises(ValueError, match="BatchNorm expects eps > 0, got 0"):
        jaxbp.BatchNorm(eps=0)
    _, params = BN.init(jax.random.key(0), (-1, 4))
    state = jaxbp.init_state(BN, (2, 4))
    for run in (jaxbp.apply, jax.jit(jaxbp.apply, static_argnums=0)):
        with pytest.raises(
            ValueError,
            match=r"BatchNorm expects inputs with 4 features on the "
            r"last axis, got shape \(2, 3\)",
        ):
            run(BN, params, state, jnp.ones((2, 3)))


DROP = jaxbp.Dropout(0.4)


@pytest.mark.slow
@pytest.mark.parametrize("jit", [False, True], ids=["nojit", "jit"])
@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", [(6, 5), (7,), (2, 3, 4)], ids=["batch", "example", "spatial"])
def test_dropout_backward_matches_vjp(shape, train, dtype, jit):
    manual, y, new_state, _, _, x = check_against_vjp(DROP, shape, dtype, train, jit)
    assert new_state == ()
    if train:  # kept entries are scaled by 1 / (1 - rate), the others are 0
        kept = np.asarray(y) != 0
        np.testing.assert_allclose(np.asarray(y)[kept], np.asarray(x)[kept] / 0.6, rtol=1e-6)
    else:
        np.testing.assert_array_equal(y, x)


def test_dropout_mask_statistics():
    x = jnp.ones((200, 50))
    apply = jax.jit(
        lambda key, train=True: jaxbp.apply(DROP, (), (), x, key=key, train=train)[0],
        static_argnums=1,
    )
    y = np.asarray(apply(jax.random.key(0)))
    assert set(np.unique(y)) == {0.0, 1 / 0.6}
    assert abs((y != 0).mean() - 0.6) < 0.02  # 10,000 draws: about 4 standard deviations
    assert abs(y.mean() - 1.0) < 0.035  # inverted dropout keeps the expectation
    np.testing.assert_array_equal(apply(jax.random.key(0)), y)  # same key, same mask
    assert not np.array_equal(apply(jax.random.key(1)), y)
    np.testing.assert_array_equal(apply(jax.random.key(0), False), x)  # eval: identity
    # rate 0 is the identity, with or without a key
    np.testing.assert_array_equal(jaxbp.apply(jaxbp.Dropout(0.0), (), (), x)[0], x)


def test_dropout_needs_a_key_in_training():
    for run in (jaxbp.apply, jax.jit(jaxbp.apply, static_argnums=0)):
        with pytest.raises(ValueError, match="Dropout needs a random key in training: pass key="):
            run(DROP, (), (), jnp.ones((2, 3)))
    net = jaxbp.serial(jaxbp.Dense(3), DROP)
    _, params = net.init(jax.random.key(0), (-1, 2))
    with pytest.raises(ValueError, match=r"layer 1 \(Dropout\): Dropout needs a random key"):
        jaxbp.backprop(
            net,
            "mse",
            params,
            jnp.ones((4, 2)),
            jnp.ones((4, 3)),
            state=jaxbp.init_state(net, (4, 2)),
        )
    for rate in (1.0, -0.1, "half", True):
        with pytest.raises(ValueError, match="Dropout expects rate in \\[0, 1\\)"):
            jaxbp.Dropout(rate)


# --------------------------------------------------------------------------------------------
# (c) residual and concat, with stateful children
# --------------------------------------------------------------------------------------------

RES = jaxbp.residual(jaxbp.Dense(4), jaxbp.BatchNorm(), jaxbp.Tanh, jaxbp.Dropout(0.3))
CAT = jaxbp.concat(jaxbp.Dense(3), jaxbp.serial(jaxbp.BatchNorm(), jaxbp.Dropout(0.5)), jaxbp.Tanh)


@pytest.mark.slow
@pytest.mark.parametrize("jit", [False, True], ids=["nojit", "jit"])
@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layer", [RES, CAT], ids=["residual", "concat"])
def test_combinator_backward_matches_vjp(layer, train, dtype, jit):
    _, y, new_state, *_ = check_against_vjp(layer, (6, 4), dtype, train, jit)
    assert y.shape == (6, 4 if layer is RES else 3 + 4 + 4)
    state0 = jaxbp.init_state(layer, (6, 4))
    assert jax.tree_util.tree_structure(new_state) == jax.tree_util.tree_structure(state0)
    assert same(new_state, cast(state0, dtype)) != train  # the running statistics move


def test_residual_is_dy_plus_the_branch():
    key = jax.random.key(4)
    x = jax.random.normal(jax.random.key(1), (6, 4))
    _, params = RES.init(jax.random.key(0), x.shape)
    state = jaxbp.init_state(RES, x.shape)
    y, cache, _ = jaxbp.apply(RES, params, state, x, key=key)
    branch = jaxbp.serial(*RES.children)  # the branch alone, same key: the same mask
    fy, fcache, _ = jaxbp.apply(branch, params, state, x, key=key)
    np.testing.assert_allclose(y, x + fy, rtol=1e-15)
    dy = jax.random.normal(jax.random.key(2), y.shape)
    grads, dx = RES.backward(params, cache, dy)
    fgrads, fdx = branch.backward(params, fcache, dy)
    np.testing.assert_allclose(dx, dy + fdx, rtol=1e-14, atol=1e-15)
    assert same(grads, fgrads)


def test_concat_splits_dy_and_sums_dx():
    key = jax.random.key(4)
    x = jax.random.normal(jax.random.key(1), (6, 4))
    _, params = CAT.init(jax.random.key(0), x.shape)
    state = jaxbp.init_state(CAT, x.shape)
    y, cache, _ = jaxbp.apply(CAT, params, state, x, key=key)
    dy = jax.random.normal(jax.random.key(2), y.shape)
    grads, dx = CAT.backward(params, cache, dy)
    offset, total = 0, jnp.zeros_like(x)
    for i, (branch, p, s) in enumerate(zip(CAT.children, params, state)):
        # branch i sees the key fold_in(key, i) and its own slice of dy
        yi, ci, _ = jaxbp.apply(branch, p, s, x, key=jax.random.fold_in(key, i))
        width = yi.shape[-1]
        np.testing.assert_array_equal(y[:, offset : offset + width], yi)
        gi, dxi = branch.backward(p, ci, dy[:, offset : offset + width])
        assert same(grads[i], gi)
        total = total + dxi
        offset += width
    np.testing.assert_allclose(dx, total, rtol=1e-14, atol=1e-15)


def test_combinator_errors():
    with pytest.raises(
        ValueError,
        match=r"residual: the branch maps shape \(-1, 4\) to "
        r"\(-1, 3\); y = x \+ f\(x\) needs f to keep the shape",
    ):
        jaxbp.residual(jaxbp.Dense(3)).init(jax.random.key(0), (-1, 4))
    with pytest.raises(ValueError, match="residual expects at least one layer, got none"):
        jaxbp.residual()
    with pytest.raises(TypeError, match="concat: argument 1 is not a Layer"):
        jaxbp.concat(jaxbp.Tanh, jaxbp.Dense)


# --------------------------------------------------------------------------------------------
# (d) The verified step on a network with BatchNorm and Dropout
# --------------------------------------------------------------------------------------------

NET = jaxbp.serial(
    jaxbp.Dense(8), jaxbp.BatchNorm(), jaxbp.Relu, jaxbp.Dropout(0.25), jaxbp.Dense(3)
)
X = jax.random.normal(jax.random.key(1), (16, 5))
Y = jax.random.normal(jax.random.key(2), (16, 3))
_, PARAMS = NET.init(jax.random.key(0), (-1, 5))
OPT = optax.adam(1e-2)
TRAIN_KEY = jax.random.key(7)


def train_state(net=NET, dtype=jnp.float64, key=TRAIN_KEY):
    params = cast(PARAMS, dtype)
    state = cast(jaxbp.init_state(net, X.shape), dtype)
    return jaxbp.init_train_state(net, OPT, params, state=state, key=key)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32], ids=["f64", "f32"])
def test_manual_and_autodiff_agree_with_state_and_key(dtype):
    ts = train_state(dtype=dtype)
    x, y = X.astype(dtype), Y.astype(dtype)
    for jit in (False, True):
        bp = jax.jit(jaxbp.backprop, static_argnums=(0, 1)) if jit else jaxbp.backprop
        ad = jax.jit(jaxbp.autodiff, static_argnums=(0, 1)) if jit else jaxbp.autodiff
        v1, g1, s1 = bp(NET, "mse", ts.params, x, y, state=ts.state, key=ts.key)
        v2, g2, s2 = ad(NET, "mse", ts.params, x, y, state=ts.state, key=ts.key)
        np.testing.assert_allclose(v1, v2, rtol=TOL[dtype])
        # Every leaf but the bias in front of BatchNorm, whose gradient is 0 in exact
        # arithmetic (its rounding is (e)'s subject).
        assert_close((g1[0]["W"], g1[1], g1[4]), (g2[0]["W"], g2[1], g2[4]), TOL[dtype])
        assert_close(s1, s2, 1e-13 if dtype == jnp.float64 else 1e-6)  # same batch statistics
    # A different key, a different mask: a different loss.
    v3, _, _ = jaxbp.backprop(NET, "mse", ts.params, x, y, state=ts.state, key=jax.random.key(8))
    assert float(v3) != float(v1)


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("jit", [True, False], ids=["jit", "nojit"])
def test_one_forward_for_both_gradients_equals_the_two_passes(dtype, jit):
    """``backprop_and_autodiff`` (the verified step's pair) is ``backprop`` and ``autodiff``:
    same loss, gradients and new state, with BatchNorm's statistics and Dropout's masks."""
    ts = train_state(dtype=dtype)
    x, y = X.astype(dtype), Y.astype(dtype)
    both = jaxbp.backprop_and_autodiff
    both = jax.jit(both, static_argnums=(0, 1)) if jit else both
    value, manual, auto, state = both(NET, "mse", ts.params, x, y, state=ts.state, key=ts.key)
    v1, g1, s1 = jaxbp.backprop(NET, "mse", ts.params, x, y, state=ts.state, key=ts.key)
    _, g2, _ = jaxbp.autodiff(NET, "mse", ts.params, x, y, state=ts.state, key=ts.key)
    np.testing.assert_allclose(value, v1, rtol=TOL[dtype])
    assert value.dtype == dtype and all(g.dtype == dtype for g in jax.tree.leaves(auto))
    assert_close(manual, g1, TOL[dtype])
    assert_close(state, s1, 1e-13 if dtype == jnp.float64 else 1e-6)
    # The bias in front of BatchNorm has gradient 0 in exact arithmetic: (e) compares its noise.
    assert_close((auto[0]["W"], auto[1], auto[4]), (g2[0]["W"], g2[1], g2[4]), TOL[dtype])
    # Without layer state: (value, manual, autodiff) of a stateless network.
    plain = jaxbp.serial(jaxbp.Dense(4), jaxbp.Tanh, jaxbp.Dense(3))
    _, p = plain.init(jax.random.key(3), (-1, 5))
    p = cast(p, dtype)
    value, manual, auto = jaxbp.backprop_and_autodiff(plain, "mse", p, x, y)
    assert_close(manual, jaxbp.backprop(plain, "mse", p, x, y)[1], TOL[dtype])
    assert_close(auto, jaxbp.autodiff(plain, "mse", p, x, y)[1], TOL[dtype])


@pytest.mark.slow
@pytest.mark.parametrize("jit", [True, False], ids=["jit", "nojit"])
def test_checked_step_with_state_and_key(jit):
    ts = train_state()
    step = jaxbp.make_train_step(NET, "mse", OPT, check="report", jit=jit)
    new, m = step(ts, X, Y)
    assert isinstance(m, jaxbp.StepMetrics)
    assert bool(m.ok) and bool(m.applied) and int(m.reason) == jaxbp.REASON_APPLIED
    assert float(m.rel_error) <= 1e-10 and m.report.paths[int(m.worst_leaf)] == m.report.worst_path
    assert not same(new.params, ts.params) and not same(new.state, ts.state)
    # The state moved by exactly one BatchNorm update, with the forward's batch statistics.
    h = jaxbp.apply(jaxbp.serial(*NET.children[:1]), ts.params[:1], ((),), X)[0]
    _, _, ref = batchnorm_reference(h, ts.state[1], 0.9)
    np.testing.assert_allclose(new.state[1]["mean"], ref["mean"], rtol=1e-12)
    np.testing.assert_allclose(new.state[1]["var"], ref["var"], rtol=1e-12)
    # The key advances: the next step draws new masks.
    assert not same(jax.random.key_data(new.key), jax.random.key_data(ts.key))


BAD = faults.inject(NET, 4, "sign")  # the last Dense's dE/dW has the wrong sign


@pytest.mark.slow
@pytest.mark.parametrize("jit", [True, False], ids=["jit", "nojit"])
def test_skip_leaves_params_opt_and_layer_state_bit_identical(jit):
    ts = train_state(BAD)
    keep = jax.tree_util.tree_map(np.array, (ts.params, ts.opt_state, ts.state))
    new, m = jaxbp.make_train_step(BAD, "mse", OPT, check="skip", jit=jit)(ts, X, Y)
    assert not bool(m.applied) and not bool(m.ok) and int(m.reason) == jaxbp.REASON_MISMATCH
    assert m.report.worst_path == "[4]['W']"
    assert float(m.rel_error) == pytest.approx(2.0, rel=1e-9)
    assert same((new.params, new.opt_state, new.state), keep)
    # ... while the key still advances: a skipped step does not replay its masks.
    assert same(jax.random.key_data(new.key), jax.random.key_data(jax.random.split(ts.key)[1]))
    # The same step under "report" applies it, and the running statistics move.
    new, m = jaxbp.make_train_step(BAD, "mse", OPT, check="report", jit=jit)(ts, X, Y)
    assert bool(m.applied) and not same(new.state, ts.state)


@pytest.mark.slow
def test_raise_carries_the_report():
    ts = train_state(BAD)
    step = jaxbp.make_train_step(BAD, "mse", OPT, check="raise")
    with pytest.raises(jaxbp.GradientMismatchError) as info:
        step(ts, X, Y)
    report = info.value.report
    assert report.worst_path == "[4]['W']" and not bool(report.ok)
    assert float(report.worst_rel_error) == pytest.approx(2.0, rel=1e-9)
    failing = {p for p, ok in zip(report.paths, np.asarray(report.leaf_ok)) if not ok}
    assert failing == {"[4]['W']"}
    # The culprit and the diagnosis first, then the comparison (jaxbp.locate, jaxbp.diagnose).
    first, second = str(info.value).splitlines()[:2]
    assert first.startswith("layer serial[4] (Fault): dW disagrees with jax.vjp of its forward")
    assert second == (
        "manual gradient disagrees with jax.grad: worst leaf "
        "[4]['W'], relative error 2.000e+00; nothing was updated"
    )
    with pytest.raises(jaxbp.GradientMismatchError) as info:
        jaxbp.fit(BAD, "mse", OPT, ts, X, Y, steps=3, check="raise")
    assert info.value.step == 0 and info.value.report.worst_path == "[4]['W']"


@pytest.mark.slow
def test_step_metrics_have_the_same_fields_in_every_mode():
    ts = train_state()
    shapes = {}
    for mode in jaxbp.CHECK_MODES:
        new, m = jaxbp.make_train_step(NET, "mse", OPT, check=mode)(ts, X, Y)
        assert type(m) is jaxbp.StepMetrics and bool(m.applied)
        probe = m  # same tree, shapes and dtypes, report.worst's int32 included
        shapes[mode] = (
            jax.tree_util.tree_structure(m),
            [(np.shape(a), np.asarray(a).dtype) for a in jax.tree_util.tree_leaves(probe)],
        )
        assert m.report.paths == (
            "[0]['W']",
            "[0]['b']",
            "[1]['bias']",
            "[1]['scale']",
            "[4]['W']",
            "[4]['b']",
        )
        if mode == "off":
            assert int(m.worst_leaf) == -1 and np.isnan(float(m.rel_error))
            assert np.isnan(np.asarray(m.leaf_rel_error)).all()
        else:
            assert float(m.rel_error) == float(np.max(m.leaf_rel_error)) <= 1e-10
    assert all(shapes[mode] == shapes["off"] for mode in jaxbp.CHECK_MODES)


@pytest.mark.slow
def test_report_worst_has_one_dtype_in_every_mode():
    ts = train_state()
    dtypes = {
        mode: jaxbp.train_step(NET, "mse", OPT, ts, X, Y, check=mode)[1].report.worst.dtype
        for mode in ("off", "report")
    }
    assert dtypes["off"] == dtypes["report"]


@pytest.mark.slow
def test_train_step_is_pure_and_needs_a_train_state():
    ts = train_state()
    a = jaxbp.train_step(NET, "mse", OPT, ts, X, Y, check="report")
    b = jax.jit(lambda t: jaxbp.train_step(NET, "mse", OPT, t, X, Y, check="report"))(ts)
    # atol: the bias before the BatchNorm has a gradient of rounding noise, which Adam turns
    # into updates of ~lr * noise / eps ~ 1e-11 that differ between the two compilations.
    jax.tree_util.tree_map(
        lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-12, atol=1e-9),
        (a[0].params, a[0].state),
        (b[0].params, b[0].state),
    )
    assert a[1]._fields == b[1]._fields == jaxbp.StepMetrics._fields
    with pytest.raises(ValueError, match="the network \\(serial\\) has state; pass input_shape="):
        jaxbp.init_train_state(NET, OPT, PARAMS)
    ts2 = jaxbp.init_train_state(NET, OPT, PARAMS, input_shape=X.shape, key=jax.random.key(7))
    assert same(ts2.state, ts.state)


@pytest.mark.slow
def test_fit_fused_and_stepwise_give_identical_results():
    ts = train_state()
    kwargs = dict(steps=5, batch_size=8, key=jax.random.key(3), check="report")
    fused = jaxbp.fit(NET, "mse", OPT, ts, X, Y, fused=True, **kwargs)
    stepwise = jaxbp.fit(NET, "mse", OPT, ts, X, Y, fused=False, **kwargs)
    assert bool(np.all(fused.history.applied)) and bool(np.all(fused.history.ok))
    assert float(np.max(fused.history.rel_error)) <= 1e-10
    for name in ("applied", "reason", "worst_leaf", "ok"):
        np.testing.assert_array_equal(getattr(fused.history, name), getattr(stepwise.history, name))
    np.testing.assert_allclose(fused.history.loss, stepwise.history.loss, rtol=1e-13)
    jax.tree_util.tree_map(
        lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-12, atol=1e-14),
        (fused.state.params, fused.state.opt_state, fused.state.state),
        (stepwise.state.params, stepwise.state.opt_state, stepwise.state.state),
    )
    assert same(jax.random.key_data(fused.state.key), jax.random.key_data(stepwise.state.key))
    # Five steps advanced the key five times.
    key = ts.key
    for _ in range(5):
        key = jax.random.split(key)[1]
    assert same(jax.random.key_data(fused.state.key), jax.random.key_data(key))


# --------------------------------------------------------------------------------------------
# (e) compare_grads's rounding floor
# --------------------------------------------------------------------------------------------


def test_rounding_floor_accepts_cancellation_noise():
    # A leaf that is 0 in exact arithmetic comes out as a few eps of the tree's scale: its own
    # relative error is 400%, but it is rounding, and agrees.
    a = {"big": jnp.array([1.0, -2.0]), "small": jnp.array([1e-17, 0.0])}
    b = {"big": jnp.array([1.0, -2.0]), "small": jnp.array([-3e-17, 0.0])}
    for compare in (jaxbp.compare_grads, jax.jit(jaxbp.compare_grads)):
        report = compare(a, b)
        assert bool(report.ok) and report.paths == ("['big']", "['small']")
        # relative to the tree's largest entry, not the leaf's own
        assert float(report.rel_error[1]) == pytest.approx(4e-17 / 2.0, rel=1e-9)
    floor = jaxbp.gradcheck.ROUNDING_FLOOR * np.finfo(np.float64).eps * 2.0
    assert 4e-17 < floor < 1e-11


def test_rounding_floor_still_catches_a_real_error_in_a_small_leaf():
    a = {"big": jnp.array([1.0, -2.0]), "small": jnp.array([1e-6, 0.0])}
    b = {"big": jnp.array([1.0, -2.0]), "small": jnp.array([0.0, 0.0])}
    for compare in (jaxbp.compare_grads, jax.jit(jaxbp.compare_grads)):
        report = compare(a, b)
        assert not bool(report.ok) and report.worst_path == "['small']"
        assert float(report.worst_rel_error) == 1.0
    # Just above the floor is an error too.
    floor = jaxbp.gradcheck.ROUNDING_FLOOR * np.finfo(np.float64).eps * 2.0
    c = {"big": a["big"], "small": jnp.array([2 * floor, 0.0])}
    assert not bool(jaxbp.compare_grads(c, b).ok)
    c = {"big": a["big"], "small": jnp.array([0.5 * floor, 0.0])}
    assert bool(jaxbp.compare_grads(c, b).ok)


@pytest.mark.slow
def test_bias_before_batchnorm_agrees_and_a_wrong_one_is_caught():
    ts = train_state()
    _, manual, _ = jaxbp.backprop(NET, "mse", ts.params, X, Y, state=ts.state, key=ts.key)
    _, auto, _ = jaxbp.autodiff(NET, "mse", ts.params, X, Y, state=ts.state, key=ts.key)
    tree_scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree_util.tree_leaves(auto))
    # BatchNorm removes the mean, so dE/db of the Dense before it is 0 up to rounding.
    assert float(jnp.max(jnp.abs(manual[0]["b"]))) < 1e-12 * tree_scale
    report = jaxbp.compare_grads(manual, auto)
    assert bool(report.ok) and float(report.rel_error[1]) < 1e-12
    # A wrong gradient in that small leaf, far above rounding, is still caught in float64.
    wrong = (dict(manual[0], b=manual[0]["b"] + 1e-6 * tree_scale), *manual[1:])
    report = jaxbp.compare_grads(wrong, auto)
    assert not bool(report.ok) and report.worst_path == "[0]['b']"
