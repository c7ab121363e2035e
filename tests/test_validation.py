"""Bad input through the Python API: one clear error, nothing else, and nothing lost.

Every case runs through all five entry points: ``backprop``, ``autodiff``, ``make_train_step``
with and without ``jit``, and ``fit``. Each must raise one exception of the expected type whose
single-line message names the thing, what it got and what it expected; the params passed in
must come back untouched and still usable.
"""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import jaxbp

NET = jaxbp.serial(jaxbp.Dense(4), jaxbp.Tanh, jaxbp.Dense(3))
_, PARAMS = NET.init(jax.random.key(0), (-1, 2))
X = jax.random.normal(jax.random.key(1), (8, 2))
Y = jax.random.normal(jax.random.key(2), (8, 3))
LABELS = jnp.array([0, 1, 2, 0, 1, 2, 0, 1], jnp.int32)
# A host copy, to prove that no failed call touched the params.
PARAMS_NP = jax.tree_util.tree_map(np.array, PARAMS)
SGD = jaxbp.sgd(0.1)

# Steps are built once per (loss, jit): the bad inputs fail while tracing, so no case compiles.
_STEPS = {}


def _step(loss, jit):
    if (loss, jit) not in _STEPS:
        _STEPS[loss, jit] = jaxbp.make_train_step(
            NET, loss, jaxbp.sgd(0.1), check="report", jit=jit
        )
    return _STEPS[loss, jit]


ROUTES = ["backprop", "autodiff", "step", "step-jit", "fit"]


def run_route(route, loss, params, x, y):
    if route == "backprop":
        return jaxbp.backprop(NET, loss, params, x, y)
    if route == "autodiff":
        return jaxbp.autodiff(NET, loss, params, x, y)
    if route in ("step", "step-jit"):
        return _step(loss, route == "step-jit")(train_state(params), x, y)
    return jaxbp.fit(NET, loss, jaxbp.sgd(0.1), train_state(params), x, y, steps=2)


def train_state(params, opt=SGD):
    # Not init_train_state: the bad params must reach the step (the optimizer state is the
    # good params' one, as a caller's would be).
    return jaxbp.TrainState(params, opt.init(PARAMS))


def _params_with(index, key, value):
    params = list(PARAMS)
    params[index] = {**params[index], key: value}
    return tuple(params)


# name: (x, y, loss, params, exception, fragments the message must contain)
CASES = {
    "input width": (
        jnp.ones((8, 5)),
        Y,
        "mse",
        PARAMS,
        ValueError,
        ["layer 0 (Dense)", "width 2", "(8, 5)"],
    ),
    "input width, one example": (
        jnp.ones((5,)),
        Y[0],
        "mse",
        PARAMS,
        ValueError,
        ["layer 0 (Dense)", "width 2", "(5,)"],
    ),
    "input scalar": (jnp.array(1.0), Y, "mse", PARAMS, ValueError, ["scalar", "(features,)"]),
    "input list": ([[0.1, 0.2]] * 8, Y, "mse", PARAMS, TypeError, ["inputs", "array", "list"]),
    # Integer inputs are token ids to check_inputs; Dense itself asks for floats.
    "input int": (
        jnp.ones((8, 2), jnp.int32),
        Y,
        "mse",
        PARAMS,
        TypeError,
        ["layer 0 (Dense)", "floating-point inputs", "int32"],
    ),
    "input bool": (
        jnp.ones((8, 2), bool),
        Y,
        "mse",
        PARAMS,
        TypeError,
        ["inputs", "floating point", "bool"],
    ),
    "empty batch": (
        jnp.ones((0, 2)),
        jnp.ones((0, 3)),
        "mse",
        PARAMS,
        ValueError,
        ["empty batch", "got shape (0, 2)", "at least one"],
    ),
    "target width": (
        X,
        jnp.zeros((8, 2)),
        "mse",
        PARAMS,
        ValueError,
        ["mse", "targets", "(8, 3)", "(8, 2)"],
    ),
    "target batch": (
        X,
        jnp.zeros((7, 3)),
        "half_sse",
        PARAMS,
        ValueError,
        ["half_sse", "targets", "(8, 3)", "(7, 3)"],
    ),
    "target list": (X, [[0.0] * 3] * 8, "mse", PARAMS, TypeError, ["mse", "targets", "list"]),
    "target int mse": (
        X,
        jnp.zeros((8, 3), jnp.int32),
        "mse",
        PARAMS,
        TypeError,
        ["mse", "floating-point targets", "int32"],
    ),
    "target int half_sse": (
        X,
        jnp.zeros((8, 3), jnp.int32),
        "half_sse",
        PARAMS,
        TypeError,
        ["half_sse", "floating-point targets", "int32"],
    ),
    "target int bce": (
        X,
        jnp.zeros((8, 3), jnp.int32),
        "sigmoid_binary_cross_entropy",
        PARAMS,
        TypeError,
        ["sigmoid_binary_cross_entropy", "int32"],
    ),
    "label too large": (
        X,
        LABELS.at[3].set(3),
        "softmax_cross_entropy",
        PARAMS,
        ValueError,
        ["softmax_cross_entropy", "labels in [0, 3)", "[3]"],
    ),
    "label negative": (
        X,
        LABELS.at[0].set(-1),
        "softmax_cross_entropy",
        PARAMS,
        ValueError,
        ["labels in [0, 3)", "[-1]"],
    ),
    "labels shape": (
        X,
        LABELS[:7],
        "softmax_cross_entropy",
        PARAMS,
        ValueError,
        ["integer labels of shape (8,)", "(7,)"],
    ),
    "one-hot width": (
        X,
        jnp.zeros((8, 4)),
        "softmax_cross_entropy",
        PARAMS,
        ValueError,
        ["one-hot targets of shape (8, 3)", "(8, 4)"],
    ),
    "one-hot int": (
        X,
        jnp.zeros((8, 3), jnp.int32),
        "softmax_cross_entropy",
        PARAMS,
        ValueError,
        ["integer labels of shape (8,)", "(8, 3)"],
    ),
    "params too few": (
        X,
        Y,
        "mse",
        PARAMS[:2],
        ValueError,
        ["params do not match the network", "got no leaves [2]['W'], [2]['b']", "net.init"],
    ),
    "params None": (
        X,
        Y,
        "mse",
        None,
        ValueError,
        ["params do not match", "got None, which holds no arrays"],
    ),
    "params missing bias": (
        X,
        Y,
        "mse",
        _params_with(2, "b", None),
        ValueError,
        ["params do not match", "got no leaf [2]['b']"],
    ),
    "params leaf shape": (
        X,
        Y,
        "mse",
        _params_with(2, "W", jnp.ones((4, 2))),
        ValueError,
        ["leaf [2]['W']", "expected shape (4, 3), got shape (4, 2)"],
    ),
    "params inner width": (
        X,
        Y,
        "mse",
        _params_with(0, "W", jnp.ones((2, 5))),
        ValueError,
        ["leaf [0]['W']", "expected shape (2, 4), got shape (2, 5)"],
    ),
    "params bias shape": (
        X,
        Y,
        "mse",
        _params_with(0, "b", jnp.ones((3,))),
        ValueError,
        ["leaf [0]['b']", "expected shape (4,), got shape (3,)"],
    ),
    "params int": (
        X,
        Y,
        "mse",
        _params_with(2, "W", jnp.ones((4, 3), jnp.int32)),
        TypeError,
        ["params", "floating point", "[2]['W']", "int32"],
    ),
}


# fit checks the number of targets itself, before any loss sees them.
FIT_FRAGMENTS = {
    "target batch": ["fit: targets", "one entry per example (8 examples)", "(7, 3)"],
    "labels shape": ["fit: targets", "one entry per example (8 examples)", "(7,)"],
}


def _assert_untouched(params):
    jax.tree_util.tree_map(np.testing.assert_array_equal, PARAMS, PARAMS_NP)
    if params is not None:
        assert all(
            not getattr(leaf, "is_deleted", lambda: False)()
            for leaf in jax.tree_util.tree_leaves(params)
        )


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_gives_one_clear_error(case, route):
    x, y, loss, params, exc, fragments = CASES[case]
    if route == "step-jit" and case.startswith("label "):
        pytest.skip("labels are values: under jit they cannot raise (test_labels_under_jit)")
    if route == "fit" and case == "input width, one example":
        pytest.skip("fit's batch axis: covered by the batched case")
    with pytest.raises(exc) as info:
        run_route(route, loss, params, x, y)
    message = str(info.value)
    assert "\n" not in message, message
    if route == "fit":
        fragments = FIT_FRAGMENTS.get(case, fragments)
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    assert "got" in message and ("expect" in message or "must" in message), message
    _assert_untouched(params)


def test_bad_input_message_float32():
    """The same message in float32 as in float64, under jit."""
    params32 = jax.tree_util.tree_map(lambda p: p.astype(jnp.float32), PARAMS)
    step = jaxbp.make_train_step(NET, "mse", jaxbp.sgd(0.1), check="skip")
    with pytest.raises(
        jaxbp.InputShapeError,
        match=r"layer 0 \(Dense\): Dense expects inputs "
        r"of width 2, got shape \(8, 5\)",
    ):
        step(
            jaxbp.init_train_state(NET, jaxbp.sgd(0.1), params32),
            jnp.ones((8, 5), jnp.float32),
            Y.astype(jnp.float32),
        )


def test_first_layer_without_params_still_names_the_input():
    net = jaxbp.serial(jaxbp.Tanh, jaxbp.Dense(3))
    _, params = net.init(jax.random.key(0), (-1, 2))
    with pytest.raises(
        ValueError,
        match=r"layer 1 \(Dense\): Dense expects inputs of width 2, "
        r"got shape \(8, 5\)",
    ):
        jaxbp.backprop(net, "mse", params, jnp.ones((8, 5)), Y)


def test_labels_under_jit_turn_the_loss_nan_and_skip_the_step():
    """A value cannot raise inside jit: the bad example poisons the loss, the guard refuses."""
    opt = jaxbp.sgd(0.1)
    ts = jaxbp.init_train_state(NET, opt, PARAMS)
    for mode in ("off", "skip"):
        step = jaxbp.make_train_step(NET, "softmax_cross_entropy", opt, check=mode)
        new_ts, m = step(ts, X, LABELS.at[3].set(7))
        assert math.isnan(float(m.loss))
        assert not bool(m.applied) and not bool(m.ok)
        assert int(m.reason) == jaxbp.REASON_NONFINITE
        jax.tree_util.tree_map(np.testing.assert_array_equal, new_ts.params, PARAMS_NP)
        assert int(new_ts.opt_state.count) == 0
        # The good labels train as usual with the same compiled step.
        _, m = step(ts, X, LABELS)
        assert bool(m.applied) and math.isfinite(float(m.loss))


def test_fit_checks_labels_before_compiling():
    with pytest.raises(ValueError, match=r"labels in \[0, 3\), got values \[5\]"):
        jaxbp.fit(
            NET,
            "softmax_cross_entropy",
            jaxbp.sgd(0.1),
            train_state(PARAMS),
            X,
            LABELS.at[1].set(5),
            steps=3,
            batch_size=4,
        )


@pytest.mark.parametrize(
    "kwargs, exc, fragments",
    [
        (dict(steps=0), ValueError, ["steps", "positive integer", "0"]),
        (dict(steps=2.5), ValueError, ["steps", "2.5"]),
        (dict(steps=2, batch_size=0), ValueError, ["batch_size", "[1, 8]", "got 0"]),
        (dict(steps=2, batch_size=9), ValueError, ["batch_size", "[1, 8]", "got 9"]),
        (dict(steps=2, check="sometimes"), ValueError, ["check mode", "'sometimes'", "skip"]),
    ],
)
def test_fit_arguments(kwargs, exc, fragments):
    with pytest.raises(exc) as info:
        jaxbp.fit(NET, "mse", jaxbp.sgd(0.1), train_state(PARAMS), X, Y, **kwargs)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_fit_rejects_targets_of_another_length():
    """Batched fit gathers x[idx] and y[idx]; a short y would be clamped silently by JAX."""
    with pytest.raises(
        ValueError,
        match=r"one entry per example \(8 examples\), got shape "
        r"\(5, 3\)",
    ):
        jaxbp.fit(NET, "mse", jaxbp.sgd(0.1), train_state(PARAMS), X, Y[:5], steps=2, batch_size=2)


@pytest.mark.parametrize(
    "lr, exc",
    [
        (0, ValueError),
        (0.0, ValueError),
        (-0.1, ValueError),
        (float("nan"), ValueError),
        (float("inf"), ValueError),
        (-float("inf"), ValueError),
        ("fast", TypeError),
        (None, TypeError),
        (True, TypeError),
        (jnp.array([0.1, 0.2]), TypeError),
    ],
)
def test_sgd_rejects_bad_learning_rates(lr, exc):
    with pytest.raises(exc, match="sgd: learning_rate must be") as info:
        jaxbp.sgd(lr)
    assert "got" in str(info.value)


def test_sgd_accepts_good_learning_rates():
    for lr in (1e-6, 0.5, 3, jnp.array(0.1), optax.constant_schedule(0.1)):
        jaxbp.sgd(lr)


@pytest.mark.parametrize("lr", [float("nan"), float("inf")])
def test_optax_nonfinite_learning_rate_is_refused_by_the_guard(lr):
    """jaxbp cannot look inside optax; a non-finite rate still never reaches the params."""
    opt = optax.adam(lr)
    ts = jaxbp.init_train_state(NET, opt, PARAMS)
    step = jaxbp.make_train_step(NET, "mse", opt, check="off")
    new_ts, m = step(ts, X, Y)
    assert not bool(m.applied) and int(m.reason) == jaxbp.REASON_NONFINITE
    jax.tree_util.tree_map(np.testing.assert_array_equal, new_ts.params, PARAMS_NP)
    jax.tree_util.tree_map(np.testing.assert_array_equal, new_ts.opt_state, ts.opt_state)


def test_optax_negative_learning_rate_is_not_detected():
    """Documented limit: a negative optax rate is gradient ascent, a legal transformation."""
    opt = optax.sgd(-0.1)
    step = jaxbp.make_train_step(NET, "mse", opt, check="skip")
    new_ts, m = step(jaxbp.init_train_state(NET, opt, PARAMS), X, Y)
    assert bool(m.applied) and bool(m.ok)
    after = jaxbp.mse(jaxbp.forward(NET, new_ts.params, X), Y)
    assert float(after) > float(m.loss)  # the loss went up, as asked


@pytest.mark.parametrize("name", ["Relu", "bogus", "", None, 3])
def test_unknown_activation(name):
    with pytest.raises(ValueError) as info:
        jaxbp.activation(name)
    assert f"unknown activation {name!r}" in str(info.value)
    assert "relu" in str(info.value) and "tanh" in str(info.value)


@pytest.mark.parametrize("name", ["MSE", "cross_entropy", "", None, 3])
def test_unknown_loss(name):
    with pytest.raises(ValueError) as info:
        jaxbp.get_loss(name)
    assert f"unknown loss {name!r}" in str(info.value)
    assert "half_sse" in str(info.value) and "softmax_cross_entropy" in str(info.value)
    with pytest.raises(ValueError, match="unknown loss"):
        jaxbp.make_train_step(NET, name, jaxbp.sgd(0.1))


def test_make_train_step_arguments():
    with pytest.raises(ValueError, match="unknown check mode 'always'; expected one of"):
        jaxbp.make_train_step(NET, "mse", jaxbp.sgd(0.1), check="always")
    with pytest.raises(
        TypeError, match="optimizer must be an optax GradientTransformation.*got None"
    ):
        jaxbp.make_train_step(NET, "mse", None)
    with pytest.raises(TypeError, match="optimizer must be.*got 0.1"):
        jaxbp.make_train_step(NET, "mse", 0.1)


def test_net_that_is_not_a_layer():
    with pytest.raises(TypeError, match="net must be a jaxbp Layer.*got 'net'"):
        jaxbp.backprop("net", "mse", PARAMS, X, Y)
    with pytest.raises(TypeError, match="serial: argument 1 is not a Layer.*Dense\\(10\\)"):
        jaxbp.serial(jaxbp.Dense(3), jaxbp.Dense)


@pytest.mark.slow
def test_failed_step_loses_nothing_even_with_donation(check="off"):
    """A step that raises (while tracing) has not run: the donated buffers are still alive.

    ``check="off"``: the one mode whose jitted step donates the train state.
    """
    opt = jaxbp.sgd(0.1)
    params = jax.tree_util.tree_map(jnp.array, PARAMS)  # own copies: donation would eat them
    ts = jaxbp.init_train_state(NET, opt, params)
    step = jaxbp.make_train_step(NET, "mse", opt, check=check, donate=True)
    for bad_x, bad_y in (
        (jnp.ones((8, 5)), Y),
        (X, jnp.ones((8, 4))),
        (jnp.ones((8, 2), jnp.int32), Y),
    ):
        with pytest.raises((ValueError, TypeError)):
            step(ts, bad_x, bad_y)
        jax.tree_util.tree_map(np.testing.assert_array_equal, ts.params, PARAMS_NP)
    # Still usable: the very same arrays train, and give the reference step's numbers.
    ref_ts, ref_m = jaxbp.make_train_step(NET, "mse", opt, check=check, jit=False)(
        jaxbp.init_train_state(NET, opt, PARAMS), X, Y
    )
    new_ts, m = step(ts, X, Y)
    assert bool(m.applied)
    assert all(leaf.is_deleted() for leaf in jax.tree_util.tree_leaves(ts))  # now donated
    np.testing.assert_allclose(float(m.loss), float(ref_m.loss), rtol=1e-12)
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14),
        new_ts.params,
        ref_ts.params,
    )


@settings(max_examples=25, deadline=None, derandomize=True)
@given(
    widths=st.lists(st.integers(1, 4), min_size=2, max_size=4),
    batch=st.integers(1, 3),
    wrong=st.integers(1, 6),
    where=st.sampled_from(["input", "target", "leaf"]),
)
def test_random_networks_name_the_mismatch(widths, batch, wrong, where):
    """Over random architectures: the message names the right layer, leaf and widths.

    Traced abstractly (``jax.eval_shape``, as under ``jit``): nothing is computed or compiled.
    """
    layers = []
    for w in widths[1:]:
        layers += [jaxbp.Dense(w), jaxbp.Tanh]
    net = jaxbp.serial(*layers)
    _, params = jax.eval_shape(lambda: net.init(jax.random.key(0), (-1, widths[0])))
    x = jax.ShapeDtypeStruct((batch, widths[0]), jnp.float64)
    y = jax.ShapeDtypeStruct((batch, widths[-1]), jnp.float64)

    def bp(p, xx, yy, how=jaxbp.backprop):
        return jax.eval_shape(lambda p, xx, yy: how(net, "mse", p, xx, yy), p, xx, yy)

    if where == "input":
        assume(wrong != widths[0])
        with pytest.raises(
            jaxbp.InputShapeError,
            match=re.escape(
                f"layer 0 (Dense): Dense expects inputs of width {widths[0]}, got shape "
                f"({batch}, {wrong})"
            ),
        ):
            bp(params, jax.ShapeDtypeStruct((batch, wrong), jnp.float64), y)
    elif where == "target":
        assume(wrong != widths[-1])
        with pytest.raises(
            ValueError,
            match=re.escape(
                f"mse expects targets of the output's shape ({batch}, {widths[-1]}), got shape "
                f"({batch}, {wrong})"
            ),
        ):
            bp(params, x, jax.ShapeDtypeStruct((batch, wrong), jnp.float64), jaxbp.autodiff)
    else:
        last = 2 * (len(widths) - 2)  # the last Dense
        assume(wrong != widths[-1])
        params = list(params)
        params[last] = {**params[last], "b": jax.ShapeDtypeStruct((wrong,), jnp.float64)}
        with pytest.raises(
            ValueError,
            match=re.escape(
                f"leaf [{last}]['b'] expected shape ({widths[-1]},), got shape ({wrong},)"
            ),
        ):
            bp(tuple(params), x, y)
