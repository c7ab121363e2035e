"""The verified train step, SGD, freezing, the fused loop, and the errors a user meets."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxbp

pytestmark = pytest.mark.filterwarnings("error")

XOR_X = jnp.array([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
XOR_Y = jnp.array([[0.0], [1.0], [1.0], [0.0]])
NET = jaxbp.serial(jaxbp.Dense(8), jaxbp.Tanh, jaxbp.Dense(1), jaxbp.Sigmoid)
LOSS = jaxbp.half_sse


def init(dtype=jnp.float64, net=NET, seed=0):
    _, params = net.init(jax.random.key(seed), (-1, 2))
    return jax.tree_util.tree_map(lambda p: p.astype(dtype), params)


def wrong_dense(out_dim):
    """A Dense whose backward flips the sign of dE/dW."""
    layer = jaxbp.Dense(out_dim)

    def backward(params, x, dy):
        dp, dx = layer.backward(params, x, dy)
        return {"W": -dp["W"], "b": dp["b"]}, dx

    return layer._replace(backward=backward)


BAD_NET = jaxbp.serial(jaxbp.Dense(8), jaxbp.Tanh, wrong_dense(1), jaxbp.Sigmoid)


def leaves_equal(a, b):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    return len(la) == len(lb) and all(np.array_equal(x, y) for x, y in zip(la, lb))


# --------------------------------------------------------------------------------------------
# SGD and freeze
# --------------------------------------------------------------------------------------------


def test_sgd_is_plain_gradient_descent():
    params = init()
    grads = jax.tree_util.tree_map(jnp.ones_like, params)
    opt = jaxbp.sgd(0.1)
    state = opt.init(params)
    updates, state = opt.update(grads, state, params)
    ref, _ = optax.sgd(0.1).update(grads, optax.sgd(0.1).init(params), params)
    assert leaves_equal(updates, ref)
    new = optax.apply_updates(params, updates)
    for n, p in zip(jax.tree_util.tree_leaves(new), jax.tree_util.tree_leaves(params)):
        np.testing.assert_array_equal(n, p - 0.1)
    assert int(state.count) == 1
    sched = jaxbp.sgd(lambda count: 1.0 / (count + 1))
    s = sched.init(params)
    u1, s = sched.update(grads, s)
    u2, s = sched.update(grads, s)
    assert float(u1[0]["b"][0]) == -1.0 and float(u2[0]["b"][0]) == -0.5


@pytest.mark.parametrize("lr", [0, -1, float("nan"), float("inf")])
def test_bad_learning_rate(lr):
    with pytest.raises(ValueError, match="learning_rate must be a positive finite number"):
        jaxbp.sgd(lr)


def test_learning_rate_of_wrong_type():
    with pytest.raises(TypeError, match="learning_rate must be a number or a schedule"):
        jaxbp.sgd("fast")


def test_freeze_biases():
    params = init()
    mask = jaxbp.biases(params)
    assert mask[0] == {"W": False, "b": True} and mask[1] == ()
    opt = jaxbp.freeze(optax.adam(0.1), jaxbp.biases)
    step = jaxbp.make_train_step(NET, LOSS, opt)
    ts, m = step(jaxbp.init_train_state(NET, opt, params), XOR_X, XOR_Y)
    new = ts.params
    assert bool(m.applied)
    np.testing.assert_array_equal(new[0]["b"], params[0]["b"])
    np.testing.assert_array_equal(new[2]["b"], params[2]["b"])
    assert not np.array_equal(new[0]["W"], params[0]["W"])


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    "opt, steps", [(jaxbp.sgd(2.0), 3000), (optax.adam(0.05), 1000)], ids=["sgd", "adam"]
)
def test_xor_trains_to_near_zero(opt, steps):
    params = init()
    result = jaxbp.fit(
        NET,
        LOSS,
        opt,
        jaxbp.init_train_state(NET, opt, params),
        XOR_X,
        XOR_Y,
        steps=steps,
        check="report",
    )
    loss = np.asarray(result.history.loss)
    assert loss[0] > 0.1 and loss[-1] < 1e-3, (loss[0], loss[-1])
    assert bool(np.all(result.history.ok))
    out = jaxbp.forward(NET, result.state.params, XOR_X)
    np.testing.assert_allclose(out, XOR_Y, atol=0.06)


@pytest.mark.slow
@pytest.mark.parametrize("opt", [jaxbp.sgd(0.5), optax.adam(0.01)], ids=["sgd", "adam"])
def test_jit_and_nojit_steps_agree(opt):
    fast = jaxbp.make_train_step(NET, LOSS, opt, check="report")
    slow = jaxbp.make_train_step(NET, LOSS, opt, check="report", jit=False)
    ta = tb = jaxbp.init_train_state(NET, opt, init())
    for _ in range(3):
        ta, ma = fast(ta, XOR_X, XOR_Y)
        tb, mb = slow(tb, XOR_X, XOR_Y)
        assert float(ma.loss) == pytest.approx(float(mb.loss), rel=1e-12)
    for a, b in zip(jax.tree_util.tree_leaves(ta), jax.tree_util.tree_leaves(tb)):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.slow
@pytest.mark.parametrize("loss", list(jaxbp.LOSSES))
def test_vmap_per_example_gradients_average_to_batch(loss):
    net = jaxbp.serial(jaxbp.Dense(5), jaxbp.Gelu, jaxbp.Dense(3))
    params = init(net=net)
    x = jax.random.normal(jax.random.key(1), (6, 2))
    if loss == "softmax_cross_entropy":
        y = jnp.array([0, 1, 2, 2, 1, 0])
    else:
        y = jax.random.uniform(jax.random.key(2), (6, 3))
    per = jax.vmap(lambda xi, yi: jaxbp.backprop(net, loss, params, xi, yi)[1])(x, y)
    per_ad = jax.vmap(lambda xi, yi: jaxbp.autodiff(net, loss, params, xi, yi)[1])(x, y)
    _, batch = jaxbp.backprop(net, loss, params, x, y)
    for p, pa, b in zip(*(jax.tree_util.tree_leaves(t) for t in (per, per_ad, batch))):
        np.testing.assert_allclose(p.mean(axis=0), b, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(p, pa, rtol=1e-12, atol=1e-14)


@pytest.mark.slow
def test_fit_history_matches_a_python_loop():
    opt = optax.adam(0.05)
    params = init()
    ts0 = jaxbp.init_train_state(NET, opt, params)
    result = jaxbp.fit(NET, LOSS, opt, ts0, XOR_X, XOR_Y, steps=10, check="report")
    step = jaxbp.make_train_step(NET, LOSS, opt, check="report")
    ts = ts0
    for t in range(10):
        ts, m = step(ts, XOR_X, XOR_Y)
        assert float(result.history.loss[t]) == pytest.approx(float(m.loss), rel=1e-12)
        assert float(result.history.rel_error[t]) < 1e-10
    for a, b in zip(jax.tree_util.tree_leaves(ts), jax.tree_util.tree_leaves(result.state)):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)


def test_fit_minibatches_of_the_whole_set_equal_full_batch():
    opt = jaxbp.sgd(0.5)
    params = init()
    ts = jaxbp.init_train_state(NET, opt, params)
    full = jaxbp.fit(NET, LOSS, opt, ts, XOR_X, XOR_Y, steps=5)
    shuffled = jaxbp.fit(
        NET, LOSS, opt, ts, XOR_X, XOR_Y, steps=5, batch_size=4, key=jax.random.key(3)
    )
    np.testing.assert_allclose(full.history.loss, shuffled.history.loss, rtol=1e-12)


# --------------------------------------------------------------------------------------------
# A deliberately wrong backward in each check mode
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("opt", [jaxbp.sgd(0.5), optax.adam(0.01)], ids=["sgd", "adam"])
def test_skip_leaves_params_and_state_bit_for_bit(opt):
    ts = jaxbp.init_train_state(BAD_NET, opt, init())
    step = jaxbp.make_train_step(BAD_NET, LOSS, opt, check="skip")
    new, m = step(ts, XOR_X, XOR_Y)
    assert not bool(m.applied) and not bool(m.ok)
    assert int(m.reason) == jaxbp.REASON_MISMATCH
    assert m.report.worst_path == "[2]['W']"
    assert leaves_equal(new.params, ts.params) and leaves_equal(new.opt_state, ts.opt_state)


@pytest.mark.slow
@pytest.mark.parametrize("jit", [True, False], ids=["jit", "nojit"])
def test_raise_names_the_leaf(jit):
    opt = jaxbp.sgd(0.5)
    params = init()
    ts = jaxbp.init_train_state(BAD_NET, opt, params)
    step = jaxbp.make_train_step(BAD_NET, LOSS, opt, check="raise", jit=jit)
    with pytest.raises(jaxbp.GradientMismatchError, match=r"worst leaf \[2\]\['W'\]") as e:
        step(ts, XOR_X, XOR_Y)
    assert e.value.report.worst_path == "[2]['W']" and e.value.step is None
    at_step_0 = r"at step 0: worst leaf \[2\]\['W'\]"
    with pytest.raises(jaxbp.GradientMismatchError, match=at_step_0) as e:
        jaxbp.fit(BAD_NET, LOSS, opt, ts, XOR_X, XOR_Y, steps=3, check="raise")
    assert e.value.step == 0 and e.value.report.worst_path == "[2]['W']"
    assert float(e.value.report.worst_rel_error) > 1.0


def test_report_applies_the_update_and_says_not_ok():
    opt = jaxbp.sgd(0.5)
    params = init()
    ts, m = jaxbp.make_train_step(BAD_NET, LOSS, opt, check="report")(
        jaxbp.init_train_state(BAD_NET, opt, params), XOR_X, XOR_Y
    )
    new = ts.params
    assert bool(m.applied) and not bool(m.ok)
    assert int(m.worst_leaf) == 2 and float(m.rel_error) > 1.0
    assert float(m.leaf_rel_error[2]) == float(m.rel_error)
    _, wrong = jaxbp.backprop(BAD_NET, LOSS, params, XOR_X, XOR_Y)
    np.testing.assert_allclose(new[2]["W"], params[2]["W"] - 0.5 * wrong[2]["W"], rtol=1e-15)


@pytest.mark.slow
@pytest.mark.parametrize("check", jaxbp.CHECK_MODES)
def test_nonfinite_data_is_never_applied(check):
    opt = optax.adam(0.01)
    ts = jaxbp.init_train_state(NET, opt, init())
    x = XOR_X.at[1, 0].set(jnp.nan)
    new, m = jaxbp.make_train_step(NET, LOSS, opt, check=check)(ts, x, XOR_Y)
    assert not bool(m.applied) and int(m.reason) == jaxbp.REASON_NONFINITE
    assert leaves_equal(new.params, ts.params) and leaves_equal(new.opt_state, ts.opt_state)


def _constant_update(value):
    """An optax transformation whose update is ``value`` everywhere, whatever the gradient."""
    return optax.GradientTransformation(
        lambda params: optax.EmptyState(),
        lambda updates, state, params=None: (
            jax.tree_util.tree_map(lambda u: jnp.full_like(u, value), updates),
            state,
        ),
    )


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("jit", [True, False])
def test_an_update_that_overflows_the_params_is_not_applied(dtype, jit):
    # Loss, gradients and update all finite, but p + u overflows: the guard decides before the
    # update is formed (|u| <= max - |p|), and must still refuse it.
    big = float(jnp.finfo(dtype).max)
    params = init(dtype)
    params[0]["W"] = jnp.full_like(params[0]["W"], big / 2)  # x = 0 below: W is never used
    x = jnp.zeros_like(XOR_X, dtype)
    for update, applied in ((0.75 * big, False), (0.25 * big, True)):
        opt = _constant_update(update)
        ts = jaxbp.init_train_state(NET, opt, params)
        new, m = jaxbp.make_train_step(NET, LOSS, opt, check="off", jit=jit)(ts, x, XOR_Y)
        assert np.isfinite(float(m.loss)) and bool(m.applied) == applied
        if applied:
            assert np.all(np.isfinite(np.asarray(new.params[0]["W"])))
            np.testing.assert_array_equal(new.params[0]["W"], params[0]["W"] + update)
        else:
            assert int(m.reason) == jaxbp.REASON_NONFINITE and leaves_equal(new.params, params)


def test_check_off_skips_the_comparison():
    opt = jaxbp.sgd(0.5)
    params = init()
    _, m = jaxbp.make_train_step(BAD_NET, LOSS, opt, check="off")(
        jaxbp.init_train_state(BAD_NET, opt, params), XOR_X, XOR_Y
    )
    assert bool(m.applied) and np.isnan(float(m.rel_error)) and int(m.worst_leaf) == -1
    # The report is there (one metrics shape in every mode), with nothing compared in it.
    assert np.all(np.isnan(m.report.rel_error)) and np.all(np.isnan(m.leaf_rel_error))


# --------------------------------------------------------------------------------------------
# Dtypes end to end
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64], ids=["f32", "f64"])
def test_dtype_kept_end_to_end(dtype):
    opt = optax.adam(0.01)
    params = init(dtype)
    ts, m = jaxbp.make_train_step(NET, LOSS, opt)(
        jaxbp.init_train_state(NET, opt, params), XOR_X.astype(dtype), XOR_Y.astype(dtype)
    )
    assert bool(m.ok) and m.loss.dtype == dtype
    floats = [
        leaf
        for leaf in jax.tree_util.tree_leaves((ts.params, ts.opt_state))
        if jnp.issubdtype(leaf.dtype, jnp.floating)
    ]
    assert floats and all(leaf.dtype == dtype for leaf in floats)


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------


def test_bad_inputs():
    opt = jaxbp.sgd(0.1)
    params = init()
    ts = jaxbp.init_train_state(NET, opt, params)
    step = jaxbp.make_train_step(NET, LOSS, opt)
    with pytest.raises(ValueError, match=r"layer 0 \(Dense\).*width 2, got shape \(4, 3\)"):
        step(ts, jnp.ones((4, 3)), XOR_Y)
    with pytest.raises(ValueError, match="params do not match the network"):
        step(ts._replace(params=params[:3]), XOR_X, XOR_Y)
    # Integer inputs pass check_inputs (token ids); Dense itself asks for floats.
    with pytest.raises(
        TypeError,
        match=r"layer 0 \(Dense\): Dense expects floating-point "
        r"inputs, got dtype int32",
    ):
        step(ts, XOR_X.astype(jnp.int32), XOR_Y)
    with pytest.raises(TypeError, match="inputs must be floating point .*got dtype bool"):
        step(ts, XOR_X > 0, XOR_Y)
    with pytest.raises(TypeError, match="takes a jaxbp.TrainState"):
        step((params, opt.init(params)), XOR_X, XOR_Y)
    with pytest.raises(ValueError, match=r"empty batch.*got shape \(0, 2\)"):
        step(ts, jnp.zeros((0, 2)), jnp.zeros((0, 1)))
    with pytest.raises(ValueError, match="unknown check mode 'strict'; expected one of: off"):
        jaxbp.make_train_step(NET, LOSS, opt, check="strict")
    with pytest.raises(TypeError, match="optimizer must be an optax GradientTransformation"):
        jaxbp.make_train_step(NET, LOSS, 0.1)
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        jaxbp.fit(NET, LOSS, opt, ts, XOR_X, XOR_Y, steps=0)
    with pytest.raises(ValueError, match=r"batch_size must be an integer in \[1, 4\]"):
        jaxbp.fit(NET, LOSS, opt, ts, XOR_X, XOR_Y, steps=2, batch_size=5)
    with pytest.raises(TypeError, match="takes a jaxbp.TrainState"):
        jaxbp.fit(NET, LOSS, opt, params, XOR_X, XOR_Y, steps=2)


# --------------------------------------------------------------------------------------------
# Speed by construction: what XLA can share, and what is donated (no timings here: benchmarks/)
# --------------------------------------------------------------------------------------------


def _compiled_dots(net, loss, check, x, y):
    params = init(jnp.float32, net=net) if net is NET else None
    if params is None:
        _, params = net.init(jax.random.key(0), (-1, x.shape[-1]))
        params = jax.tree_util.tree_map(lambda p: p.astype(jnp.float32), params)
    opt = jaxbp.sgd(0.1)
    step = jaxbp.make_train_step(net, loss, opt, check=check)
    ts = jaxbp.init_train_state(net, opt, params)
    return step.lower(ts, x, y).compile().as_text().count(" dot(")


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["mse", "half_sse", "softmax_cross_entropy"])
def test_checked_step_computes_the_backward_once(loss):
    # The manual backward is written in the operations jax.grad emits, so XLA merges the two
    # gradients' matmuls: a checked step has exactly the matmuls of an unchecked one (a forward
    # and a backward), not a second backward.
    net = jaxbp.serial(jaxbp.Dense(16), jaxbp.Relu, jaxbp.Dense(16), jaxbp.Relu, jaxbp.Dense(5))
    x = jax.random.normal(jax.random.key(1), (8, 12), jnp.float32)
    y = (
        jnp.arange(8) % 5
        if loss == "softmax_cross_entropy"
        else jax.random.normal(jax.random.key(2), (8, 5), jnp.float32)
    )
    off = _compiled_dots(net, loss, "off", x, y)
    assert off == 8  # 3 forward, 3 dW, 2 dx
    assert _compiled_dots(net, loss, "report", x, y) == off


def _abs_layer():
    """|x| written as sqrt(x^2): jax.grad gives NaN at 0 (0 * 1/0), the manual sign(x) gives 0."""

    def forward(params, x):
        return jnp.sqrt(x * x), x

    def backward(params, x, dy):
        return (), jnp.sign(x) * dy

    return jaxbp.Layer(lambda key, shape: (shape, ()), forward, backward, "Abs", ())


@pytest.mark.slow
@pytest.mark.parametrize("check", ["report", "skip"])
def test_nan_only_in_autodiff_is_a_mismatch_not_a_nonfinite_step(check):
    # The guard reads the manual gradients' finiteness off the comparison: a NaN in jax.grad's
    # gradient alone must still read as a disagreement, applied under "report" as before.
    net = jaxbp.serial(jaxbp.Dense(3), _abs_layer(), jaxbp.Dense(1))
    _, params = net.init(jax.random.key(0), (-1, 2))
    params[0]["W"] = jnp.zeros_like(params[0]["W"])  # the Abs layer sees exact zeros
    params[0]["b"] = jnp.zeros_like(params[0]["b"])
    x, y = XOR_X, XOR_Y
    opt = jaxbp.sgd(0.5)
    for jit in (True, False):
        ts, m = jaxbp.make_train_step(net, LOSS, opt, check=check, jit=jit)(
            jaxbp.init_train_state(net, opt, params), x, y
        )
        new = ts.params
        assert int(m.reason) == jaxbp.REASON_MISMATCH and not bool(m.ok)
        assert np.isinf(float(m.rel_error)) and m.report.worst_path == "[0]['W']"
        _, manual = jaxbp.backprop(net, LOSS, params, x, y)
        if check == "report":
            assert bool(m.applied)
            np.testing.assert_allclose(
                new[2]["W"], params[2]["W"] - 0.5 * manual[2]["W"], rtol=1e-15
            )
        else:
            assert not bool(m.applied) and leaves_equal(new, params)


@pytest.mark.slow
@pytest.mark.parametrize("check", ["off", "report", "skip"])
def test_donation_only_when_unchecked(check):
    opt = optax.adam(0.01)
    ts = jaxbp.init_train_state(NET, opt, init())
    step = jaxbp.make_train_step(NET, LOSS, opt, check=check, donate=True)
    new, m = step(ts, XOR_X, XOR_Y)
    assert bool(m.applied)
    # A checked step would make XLA copy donated params (slower than not donating): only an
    # unchecked step donates its train state, all of it.
    assert all(leaf.is_deleted() == (check == "off") for leaf in jax.tree_util.tree_leaves(ts))
    ref_new, _ = jaxbp.make_train_step(NET, LOSS, opt, check=check)(
        jaxbp.init_train_state(NET, opt, init()), XOR_X, XOR_Y
    )
    assert leaves_equal(new, ref_new)


def test_fit_reuses_its_compiled_loop():
    opt = jaxbp.sgd(0.5)
    ts = jaxbp.init_train_state(NET, opt, init())
    first = jaxbp.fit(NET, LOSS, opt, ts, XOR_X, XOR_Y, steps=5)
    hits = jaxbp.train._fit_loop_cached.cache_info().hits
    again = jaxbp.fit(NET, LOSS, opt, ts, XOR_X, XOR_Y, steps=5)
    assert jaxbp.train._fit_loop_cached.cache_info().hits == hits + 1
    assert leaves_equal(first.state, again.state)
    # A layer whose config cannot be hashed still trains (compiled afresh each call).
    odd = NET._replace(config=(("layers", NET.children), ("unhashable", [1])))
    third = jaxbp.fit(odd, LOSS, opt, ts, XOR_X, XOR_Y, steps=5)
    assert leaves_equal(first.state, third.state)
