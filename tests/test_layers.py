"""Every layer's hand-written backward against ``jax.vjp`` of its forward.

Random inputs and random cotangents, parameter gradients and input gradients, float64 (to
~1e-12) and float32 (dtype tolerances), batches and single examples, with and without ``jit``;
both through ``jaxbp.check_layer`` and through a direct ``jax.vjp`` comparison written here.
Also: init/forward shape agreement, initialisers, and the errors a user meets.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbp

pytestmark = pytest.mark.filterwarnings("error")

LAYERS = {
    "Dense": jaxbp.Dense(3),
    "Dense_shared_bias": jaxbp.Dense(3, shared_bias=True),
    "Dense_he_bias": jaxbp.Dense(5, w_init="he", b_init=0.1),
    "Sigmoid": jaxbp.Sigmoid,
    "Tanh": jaxbp.Tanh,
    "Relu": jaxbp.Relu,
    "LeakyRelu": jaxbp.LeakyRelu(0.1),
    "Gelu": jaxbp.Gelu,
    "Softplus": jaxbp.Softplus,
    "Identity": jaxbp.Identity,
    "serial": jaxbp.serial(
        jaxbp.Dense(6),
        jaxbp.Tanh,
        jaxbp.Dense(4, shared_bias=True),
        jaxbp.Gelu,
        jaxbp.Dense(2),
        jaxbp.Sigmoid,
    ),
}
SHAPES = {"batch": (7, 4), "single": (4,)}
# (rtol, atol) for the direct comparison: float64 to ~1e-12, float32 to its rounding error.
TOL = {jnp.float64: (1e-12, 1e-12), jnp.float32: (1e-5, 1e-5)}


def draw(layer, key, shape, dtype):
    """Random params, input and cotangent for ``layer``; inputs scaled to cover the kinks."""
    k_init, k_x, k_dy = jax.random.split(key, 3)
    _, params = layer.init(k_init, shape)
    params = jax.tree_util.tree_map(lambda p: jnp.asarray(p, dtype), params)
    x = 2.0 * jax.random.normal(k_x, shape, dtype)
    y, _ = layer.forward(params, x)
    dy = jax.random.normal(k_dy, y.shape, dtype)
    return params, x, dy


def manual_and_vjp(layer, params, x, dy):
    """``layer.backward`` and ``jax.vjp`` of ``layer.forward`` for the same cotangent."""
    y, cache = layer.forward(params, x)
    dparams, dx = layer.backward(params, cache, dy)
    y_ref, vjp = jax.vjp(lambda p, xx: layer.forward(p, xx)[0], params, x)
    ref_params, ref_x = vjp(dy)
    return y, y_ref, dparams, dx, ref_params, ref_x


def all_manual_and_vjp(key, shape, dtype):
    """:func:`manual_and_vjp` for every layer of ``LAYERS`` on fresh random draws."""
    results = {}
    for i, (name, layer) in enumerate(LAYERS.items()):
        params, x, dy = draw(layer, jax.random.fold_in(key, i), shape, dtype)
        results[name] = (params, x, manual_and_vjp(layer, params, x, dy))
    return results


def all_check_layer(key, shape, dtype, names=tuple(LAYERS)):
    """``jaxbp.check_layer`` for the layers of ``LAYERS`` called ``names``."""
    return {
        name: jaxbp.check_layer(layer, jax.random.fold_in(key, i), shape, dtype=dtype)
        for i, (name, layer) in enumerate(LAYERS.items())
        if name in names
    }


# All layers in one compiled program per (shape, dtype): one compilation instead of eleven.
_all_manual_and_vjp_jit = jax.jit(all_manual_and_vjp, static_argnums=(1, 2))
_all_check_layer_jit = jax.jit(all_check_layer, static_argnums=(1, 2, 3))
# Under jit, the serial network (Dense, Tanh, shared-bias Dense, Gelu, Dense, Sigmoid) and the
# kinked activations: compiling one report per layer costs seconds on a small machine.
JIT_CHECKED = ("serial", "Relu", "LeakyRelu")


@pytest.mark.slow
@pytest.mark.parametrize("jit", [False, True], ids=["nojit", "jit"])
@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_backward_equals_vjp(shape, dtype, jit):
    """Direct comparison, every layer, params and input gradients, three random draws."""
    rtol, atol = TOL[dtype]
    fn = _all_manual_and_vjp_jit if jit else all_manual_and_vjp
    for seed in range(3):
        for name, (params, x, out) in fn(jax.random.key(seed), shape, dtype).items():
            y, y_ref, dparams, dx, ref_params, ref_x = out
            assert y.dtype == dtype and dx.dtype == dtype and dx.shape == x.shape, name
            np.testing.assert_array_equal(y, y_ref, err_msg=name)
            assert jax.tree_util.tree_structure(dparams) == jax.tree_util.tree_structure(params), (
                name
            )
            for got, want, p in zip(
                jax.tree_util.tree_leaves(dparams),
                jax.tree_util.tree_leaves(ref_params),
                jax.tree_util.tree_leaves(params),
            ):
                assert got.shape == p.shape and got.dtype == dtype, name
                np.testing.assert_allclose(
                    got,
                    want,
                    rtol=rtol,
                    atol=atol * max(1.0, float(jnp.max(jnp.abs(want)))),
                    err_msg=name,
                )
            np.testing.assert_allclose(
                dx,
                ref_x,
                rtol=rtol,
                atol=atol * max(1.0, float(jnp.max(jnp.abs(ref_x)))),
                err_msg=name,
            )


# Each layer meets both dtypes, both shapes, jit and no jit (a Latin square: the full cross
# product is covered by test_backward_equals_vjp; compiling check_layer's report is costly).
@pytest.mark.slow
@pytest.mark.parametrize(
    "shape, dtype, jit",
    [
        (SHAPES["batch"], jnp.float64, False),
        (SHAPES["single"], jnp.float32, False),
        (SHAPES["batch"], jnp.float32, True),
        (SHAPES["single"], jnp.float64, True),
    ],
    ids=["batch-f64-nojit", "single-f32-nojit", "batch-f32-jit", "single-f64-jit"],
)
def test_check_layer(shape, dtype, jit):
    names = JIT_CHECKED if jit else tuple(LAYERS)
    fn = _all_check_layer_jit if jit else all_check_layer
    # float32: a few roundings of eps = 1.2e-7 through the six-layer serial network.
    limit = 1e-12 if dtype == jnp.float64 else 1e-4
    reports = fn(jax.random.key(11), shape, dtype, names)
    assert set(reports) == set(names)
    for name, report in reports.items():
        assert bool(report.ok), (name, report.table())
        assert report.paths[-1] == "['x']", name
        assert float(report.worst_rel_error) < limit, (name, report.table())
        assert np.all(np.asarray(report.cosine) > 1 - 10 * limit), name


@pytest.mark.slow
@pytest.mark.parametrize("name", list(LAYERS))
def test_init_shape_agrees_with_forward(name):
    """The stax test: ``init``'s output shape is what ``forward`` produces, batch dim -1 kept."""
    layer = LAYERS[name]
    out_shape, params = layer.init(jax.random.key(0), (-1, 4))
    assert out_shape[0] == -1
    y, _ = layer.forward(params, jnp.ones((5, 4)))
    assert y.shape == (5, *out_shape[1:])
    single_shape, _ = layer.init(jax.random.key(0), (4,))
    y1, _ = layer.forward(params, jnp.ones((4,)))
    assert y1.shape == tuple(single_shape)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(LAYERS))
def test_vmap_over_single_examples_matches_batch(name):
    layer = LAYERS[name]
    params, x, dy = draw(layer, jax.random.key(3), (6, 4), jnp.float64)
    y, cache = layer.forward(params, x)
    dparams, dx = layer.backward(params, cache, dy)

    def one(xi, dyi):
        yi, ci = layer.forward(params, xi)
        return (yi, *layer.backward(params, ci, dyi))

    ys, dps, dxs = jax.vmap(one)(x, dy)
    np.testing.assert_allclose(ys, y, rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(dxs, dx, rtol=1e-13, atol=1e-14)
    # Parameter gradients of a batch are the sums of the per-example ones.
    for per, whole in zip(jax.tree_util.tree_leaves(dps), jax.tree_util.tree_leaves(dparams)):
        np.testing.assert_allclose(per.sum(axis=0), whole, rtol=1e-12, atol=1e-13)


def test_dense_formulas():
    """``y = x @ W + b``, ``dW = x.T @ dy``, ``db = sum dy``, ``dx = dy @ W.T``, written out."""
    layer = jaxbp.Dense(3)
    params, x, dy = draw(layer, jax.random.key(5), (4, 2), jnp.float64)
    w, b = np.asarray(params["W"]), np.asarray(params["b"])
    y, cache = layer.forward(params, x)
    np.testing.assert_allclose(y, np.asarray(x) @ w + b, rtol=1e-15)
    dparams, dx = layer.backward(params, cache, dy)
    np.testing.assert_allclose(dparams["W"], np.asarray(x).T @ np.asarray(dy), rtol=1e-14)
    np.testing.assert_allclose(dparams["b"], np.asarray(dy).sum(0), rtol=1e-14)
    np.testing.assert_allclose(dx, np.asarray(dy) @ w.T, rtol=1e-14)
    shared = jaxbp.Dense(3, shared_bias=True)
    _, sp = shared.init(jax.random.key(0), (4, 2))
    assert sp["b"].shape == ()
    dps, _ = shared.backward(sp, x, dy)
    assert float(dps["b"]) == pytest.approx(float(np.asarray(dy).sum()), rel=1e-14)


def test_activation_formulas():
    x = jnp.linspace(-4.0, 4.0, 41, dtype=jnp.float64)
    dy = jnp.ones_like(x)
    xs = np.asarray(x)
    expected = {
        "Sigmoid": 1 / (1 + np.exp(-xs)),
        "Tanh": np.tanh(xs),
        "Relu": np.maximum(xs, 0),
        "LeakyRelu": np.where(xs > 0, xs, 0.1 * xs),
        "Gelu": 0.5 * xs * (1 + np.tanh(np.sqrt(2 / np.pi) * (xs + 0.044715 * xs**3))),
        "Softplus": np.log1p(np.exp(xs)),
        "Identity": xs,
    }
    for name, want in expected.items():
        layer = LAYERS[name]
        y, cache = layer.forward((), x)
        np.testing.assert_allclose(y, want, rtol=1e-14, atol=1e-15, err_msg=name)
        # Derivative against jax.grad of the independent numpy-style formula.
        _, dx = layer.backward((), cache, dy)
        assert dx.shape == x.shape
    # Sigmoid's derivative is computed from its output, as the seed does: y * (1 - y).
    y, cache = jaxbp.Sigmoid.forward((), x)
    np.testing.assert_array_equal(cache, y)
    np.testing.assert_allclose(jaxbp.Sigmoid.backward((), cache, dy)[1], y * (1 - y), rtol=1e-15)


@pytest.mark.parametrize("name", ["Relu", "LeakyRelu"])
def test_kink_subgradient_matches_autodiff(name):
    """At exactly ``x == 0`` the backward takes the same subgradient as ``jax.vjp``."""
    layer = LAYERS[name]
    x = jnp.array([-1.0, 0.0, 1.0], jnp.float64)
    report = jaxbp.check_layer(layer, jax.random.key(0), (3,), x=x)
    assert bool(report.ok) and float(report.worst_rel_error) == 0.0


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("name", ["Sigmoid", "Tanh", "Gelu", "Softplus", "LeakyRelu"])
def test_extreme_inputs_stay_finite(name, dtype):
    layer = LAYERS[name]
    x = jnp.array([-1e4, -100.0, -30.0, 0.0, 30.0, 100.0, 1e4], dtype)
    y, cache = layer.forward((), x)
    _, dx = layer.backward((), cache, jnp.ones_like(x))
    assert bool(jnp.all(jnp.isfinite(y))) and bool(jnp.all(jnp.isfinite(dx))), (y, dx)
    assert y.dtype == dtype and dx.dtype == dtype


def test_layers_under_strict_dtype_promotion():
    """Layer code mixes no dtypes by accident: it runs under JAX's strict promotion."""
    # Promotion errors fire while tracing, so tracing (eval_shape) is enough: no compilation.
    with jax.numpy_dtype_promotion("strict"):
        for dtype in (jnp.float32, jnp.float64):
            for shape in SHAPES.values():
                out = jax.eval_shape(
                    lambda k: all_manual_and_vjp(k, shape, dtype), jax.random.key(1)
                )
                for name, (_, _, results) in out.items():
                    assert all(r.dtype == dtype for r in jax.tree_util.tree_leaves(results)), name


# --------------------------------------------------------------------------------------------
# Initialisation
# --------------------------------------------------------------------------------------------


def test_default_init_is_he_before_relu_like_and_glorot_otherwise():
    key = jax.random.key(7)
    k0 = jax.random.split(key, 2)[0]
    for act in (jaxbp.Relu, jaxbp.LeakyRelu(), jaxbp.Gelu):
        _, params = jaxbp.serial(jaxbp.Dense(5), act).init(key, (-1, 3))
        np.testing.assert_array_equal(params[0]["W"], jaxbp.he_normal(k0, (3, 5), jnp.float64))
    for act in (jaxbp.Tanh, jaxbp.Sigmoid, jaxbp.Identity):
        _, params = jaxbp.serial(jaxbp.Dense(5), act).init(key, (-1, 3))
        np.testing.assert_array_equal(params[0]["W"], jaxbp.glorot_uniform(k0, (3, 5), jnp.float64))
    # An explicit choice wins over the automatic one.
    _, params = jaxbp.serial(jaxbp.Dense(5, w_init="glorot"), jaxbp.Relu).init(key, (-1, 3))
    np.testing.assert_array_equal(params[0]["W"], jaxbp.glorot_uniform(k0, (3, 5), jnp.float64))
    custom = lambda k, shape, dtype: jnp.full(shape, 0.5, dtype)
    _, p = jaxbp.Dense(2, w_init=custom, b_init=custom).init(key, (3,))
    np.testing.assert_array_equal(p["W"], np.full((3, 2), 0.5))
    np.testing.assert_array_equal(p["b"], np.full((2,), 0.5))


def test_initialiser_statistics():
    w = jaxbp.glorot_uniform(jax.random.key(0), (200, 300), jnp.float64)
    limit = np.sqrt(6 / 500)
    assert float(jnp.max(jnp.abs(w))) <= limit and float(jnp.max(jnp.abs(w))) > 0.95 * limit
    w = jaxbp.he_normal(jax.random.key(0), (400, 300), jnp.float64)
    assert float(jnp.std(w)) == pytest.approx(np.sqrt(2 / 400), rel=0.02)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_init_dtype(dtype):
    _, p = jaxbp.Dense(3, dtype=dtype).init(jax.random.key(0), (-1, 2))
    assert p["W"].dtype == dtype and p["b"].dtype == dtype
    # Without an explicit dtype: JAX's default float (float64 here, under jax_enable_x64).
    _, p = jaxbp.Dense(3).init(jax.random.key(0), (-1, 2))
    assert p["W"].dtype == jnp.float64


def test_describe():
    net = jaxbp.serial(jaxbp.Dense(4, shared_bias=True), jaxbp.LeakyRelu(0.2), jaxbp.Dense(1))
    d = jaxbp.describe(net)
    assert d["name"] == "serial" and len(d["layers"]) == 3
    assert d["layers"][0] == {
        "name": "Dense",
        "out_dim": 4,
        "shared_bias": True,
        "w_init": "auto",
        "b_init": 0.0,
        "dtype": None,
    }
    assert d["layers"][1] == {"name": "LeakyRelu", "slope": 0.2}
    assert jaxbp.describe(jaxbp.build(d)) == d  # the description builds the same network
    assert jaxbp.describe(jaxbp.Dense(2, dtype=jnp.float32))["dtype"] == "float32"


def test_activation_by_name():
    for name in jaxbp.ACTIVATIONS:
        assert isinstance(jaxbp.activation(name), jaxbp.Layer)
    assert jaxbp.activation("tanh") is jaxbp.Tanh
    with pytest.raises(ValueError, match=r"unknown activation 'swish'.*relu.*tanh"):
        jaxbp.activation("swish")


# --------------------------------------------------------------------------------------------
# Errors a user can act on
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("jit", [False, True], ids=["nojit", "jit"])
def test_wrong_input_width_names_layer_and_shapes(jit):
    net = jaxbp.serial(jaxbp.Dense(4), jaxbp.Tanh, jaxbp.Dense(2))
    _, params = net.init(jax.random.key(0), (-1, 2))
    fwd = jax.jit(net.forward) if jit else net.forward
    with pytest.raises(ValueError, match=r"layer 0 \(Dense\).*width 2.*\(5, 3\)"):
        fwd(params, jnp.ones((5, 3)))
    with pytest.raises(ValueError, match=r"Dense expects inputs of width 2, got shape \(3,\)"):
        jaxbp.Dense(4).forward(params[0], jnp.ones((3,)))


@pytest.mark.parametrize("jit", [False, True], ids=["nojit", "jit"])
def test_integer_inputs_rejected(jit):
    net = jaxbp.serial(jaxbp.Dense(4), jaxbp.Relu)
    _, params = net.init(jax.random.key(0), (-1, 2))
    fwd = jax.jit(net.forward) if jit else net.forward
    with pytest.raises(TypeError, match=r"layer 0 \(Dense\).*floating-point.*int"):
        fwd(params, jnp.ones((5, 2), jnp.int32))
    with pytest.raises(TypeError, match=r"Relu expects floating-point inputs"):
        jaxbp.Relu.forward((), jnp.ones(3, jnp.int32))


def test_params_of_wrong_length():
    net = jaxbp.serial(jaxbp.Dense(4), jaxbp.Tanh, jaxbp.Dense(2))
    _, params = net.init(jax.random.key(0), (-1, 2))
    with pytest.raises(ValueError, match="3 layers expects a tuple of 3 parameter entries, got 2"):
        net.forward(params[:2], jnp.ones((1, 2)))
    with pytest.raises(ValueError, match="got dict"):
        net.forward(params[0], jnp.ones((1, 2)))


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "8"])
def test_dense_rejects_bad_out_dim(bad):
    with pytest.raises(ValueError, match="positive integer out_dim"):
        jaxbp.Dense(bad)


def test_dense_rejects_bad_w_init_and_input_shapes():
    with pytest.raises(ValueError, match="w_init must be"):
        jaxbp.Dense(3, w_init="xavier")
    with pytest.raises(ValueError, match=r"layer 0 \(Dense\).*shape \(\.\.\., features\)"):
        jaxbp.serial(jaxbp.Dense(3)).init(jax.random.key(0), ())
    with pytest.raises(ValueError, match="at least one input feature"):
        jaxbp.Dense(3).init(jax.random.key(0), (5, 0))


def test_serial_rejects_bad_layers():
    with pytest.raises(ValueError, match="at least one layer"):
        jaxbp.serial()
    with pytest.raises(TypeError, match=r"argument 0 is not a Layer.*did you forget to call it"):
        jaxbp.serial(jaxbp.Dense, jaxbp.Tanh)
    with pytest.raises(TypeError, match="argument 1 is not a Layer"):
        jaxbp.serial(jaxbp.Dense(2), 3)
