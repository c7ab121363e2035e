"""The seed tutorial's worked example, every number, in float64.

The seed is a 2-2-2 sigmoid network with shared biases (0.3 and 0.9), one example
(0.1, 0.05) -> (0.02, 0.98), half-SSE and learning rate 0.5. Its first four numbers are right;
its later slides are wrong (see ``jaxbp.seed.SEED_STATED``). These tests pin the correct values
to 4 places, check that the stated wrong ones really differ, and replay the seed's numpy program
(re-implemented below, line for line) against ``jaxbp``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbp
from jaxbp.seed import (
    SEED_BIASES,
    SEED_INPUTS,
    SEED_LEARNING_RATE,
    SEED_STATED,
    SEED_TARGETS,
    SEED_W_HIDDEN_OUTPUT,
    SEED_W_INPUT_HIDDEN,
    SEED_WEIGHT_NAMES,
)

pytestmark = pytest.mark.filterwarnings("error")

# The correct values (float64, rounded to 4 places) from the issue.
CORRECT = {
    "in_h1": 0.35,
    "in_h2": 0.3275,
    "out_h1": 0.5866,
    "out_h2": 0.5812,
    "in_o1": 1.6593,
    "in_o2": 1.3380,
    "out_o1": 0.8401,
    "out_o2": 0.7922,
    "E_o1": 0.3363,
    "E_o2": 0.0176,
    "E_total": 0.3540,
    "dE/dW7": 0.0640,
    "W7_new": 0.5680,
}
# The seed's stated values that follow from its own weights; every other one is wrong.
STATED_RIGHT = {"in_h1", "in_h2", "out_h1", "out_h2"}

# The seed's numpy program after one step (weights updated, biases not), from the issue.
NUMPY_W_INPUT_HIDDEN = [[0.24921513, 0.1993274], [0.49960756, 0.1496637]]
NUMPY_W_HIDDEN_OUTPUT = [[0.66769329, 0.40907027], [0.56799435, 0.35898575]]


def seed_numpy_program():
    """The seed's numpy code, re-implemented line for line (float64, one step).

    Returns ``(weights_input_hidden, weights_hidden_output, output, error)`` after the update;
    ``output`` and ``error`` are from the forward pass before it.
    """

    def sigmoid(x):
        return 1 / (1 + np.exp(-x))

    def sigmoid_derivative(x):
        return x * (1 - x)

    inputs = np.array([[0.1, 0.05]])
    targets = np.array([[0.02, 0.98]])
    weights_input_hidden = np.array([[0.25, 0.2], [0.5, 0.15]])
    weights_hidden_output = np.array([[0.7, 0.4], [0.6, 0.35]])
    bias_hidden = np.array([0.3])
    bias_output = np.array([0.9])
    hidden_input = np.dot(inputs, weights_input_hidden) + bias_hidden
    hidden_output = sigmoid(hidden_input)
    output_input = np.dot(hidden_output, weights_hidden_output) + bias_output
    output = sigmoid(output_input)
    error = 0.5 * (targets - output) ** 2
    output_error = targets - output
    output_delta = output_error * sigmoid_derivative(output)
    hidden_error = np.dot(output_delta, weights_hidden_output.T)
    hidden_delta = hidden_error * sigmoid_derivative(hidden_output)
    learning_rate = 0.5
    weights_hidden_output += learning_rate * np.dot(hidden_output.T, output_delta)
    weights_input_hidden += learning_rate * np.dot(inputs.T, hidden_delta)
    return weights_input_hidden, weights_hidden_output, output, error


def seed_values(problem):
    """Every number of the worked example, computed by jaxbp's layers one at a time."""
    net, params, x, y = problem.net, problem.params, problem.x, problem.y
    dense1, sig1, dense2, sig2 = net.children
    in_h, _ = dense1.forward(params[0], x)
    out_h, _ = sig1.forward(params[1], in_h)
    in_o, _ = dense2.forward(params[2], out_h)
    out_o, _ = sig2.forward(params[3], in_o)
    e = 0.5 * (y - out_o) ** 2
    value, grads = jaxbp.backprop(net, jaxbp.half_sse, params, x, y)
    return {
        "in_h1": in_h[0],
        "in_h2": in_h[1],
        "out_h1": out_h[0],
        "out_h2": out_h[1],
        "in_o1": in_o[0],
        "in_o2": in_o[1],
        "out_o1": out_o[0],
        "out_o2": out_o[1],
        "E_o1": e[0],
        "E_o2": e[1],
        "E_total": value,
        # W7 joins hidden 2 to output 1: row 1, column 0 of the second weight matrix.
        "dE/dW7": grads[2]["W"][1, 0],
        "W7_new": params[2]["W"][1, 0] - problem.learning_rate * grads[2]["W"][1, 0],
    }


@pytest.fixture(scope="module")
def problem():
    return jaxbp.seed_problem(jnp.float64)


@pytest.fixture(scope="module")
def values(problem):
    return {k: float(v) for k, v in seed_values(problem).items()}


def test_problem_matches_the_seed_code(problem):
    assert problem.learning_rate == 0.5
    np.testing.assert_array_equal(problem.x, [0.1, 0.05])
    np.testing.assert_array_equal(problem.y, [0.02, 0.98])
    np.testing.assert_array_equal(problem.params[0]["W"], [[0.25, 0.2], [0.5, 0.15]])
    np.testing.assert_array_equal(problem.params[2]["W"], [[0.7, 0.4], [0.6, 0.35]])
    # Shared biases: one scalar per layer, as in the seed.
    assert problem.params[0]["b"].shape == () and float(problem.params[0]["b"]) == 0.3
    assert problem.params[2]["b"].shape == () and float(problem.params[2]["b"]) == 0.9
    assert problem.params[1] == () and problem.params[3] == ()
    assert all(leaf.dtype == jnp.float64 for leaf in jax.tree_util.tree_leaves(problem.params))
    assert (SEED_INPUTS, SEED_TARGETS, SEED_BIASES, SEED_LEARNING_RATE) == (
        [0.1, 0.05],
        [0.02, 0.98],
        (0.3, 0.9),
        0.5,
    )
    assert SEED_W_INPUT_HIDDEN == [[0.25, 0.2], [0.5, 0.15]]
    assert SEED_W_HIDDEN_OUTPUT == [[0.7, 0.4], [0.6, 0.35]]
    assert SEED_WEIGHT_NAMES[(1, 1, 0)] == "W7"
    assert SEED_WEIGHT_NAMES[(0, 0, 0)] == "W1" and SEED_WEIGHT_NAMES[(0, 1, 0)] == "W3"


@pytest.mark.parametrize("name", list(CORRECT))
def test_worked_numbers_to_four_places(values, name):
    assert round(values[name], 4) == pytest.approx(CORRECT[name], abs=1e-12), (
        f"{name} = {values[name]!r}"
    )


def test_worked_numbers_by_hand(values):
    """The same numbers from the slides' own formulas, written out in plain Python floats."""
    i1, i2 = 0.1, 0.05
    w1, w2, w3, w4 = 0.25, 0.2, 0.5, 0.15
    w5, w6, w7, w8 = 0.7, 0.4, 0.6, 0.35
    b1, b2, t1, t2 = 0.3, 0.9, 0.02, 0.98
    s = lambda z: 1 / (1 + np.exp(-z))
    in_h1 = w1 * i1 + w3 * i2 + b1
    in_h2 = w2 * i1 + w4 * i2 + b1
    out_h1, out_h2 = s(in_h1), s(in_h2)
    in_o1 = w5 * out_h1 + w7 * out_h2 + b2
    in_o2 = w6 * out_h1 + w8 * out_h2 + b2
    out_o1, out_o2 = s(in_o1), s(in_o2)
    e1, e2 = 0.5 * (t1 - out_o1) ** 2, 0.5 * (t2 - out_o2) ** 2
    # The chain rule of the slides: dE/dout_o1 * dout_o1/din_o1 * din_o1/dW7.
    de_dw7 = (out_o1 - t1) * out_o1 * (1 - out_o1) * out_h2
    by_hand = {
        "in_h1": in_h1,
        "in_h2": in_h2,
        "out_h1": out_h1,
        "out_h2": out_h2,
        "in_o1": in_o1,
        "in_o2": in_o2,
        "out_o1": out_o1,
        "out_o2": out_o2,
        "E_o1": e1,
        "E_o2": e2,
        "E_total": e1 + e2,
        "dE/dW7": de_dw7,
        "W7_new": w7 - 0.5 * de_dw7,
    }
    for name, expected in by_hand.items():
        assert values[name] == pytest.approx(expected, rel=1e-13, abs=1e-15), name


def test_stated_values_wrong_where_the_issue_says(values):
    assert set(SEED_STATED) == set(CORRECT)
    for name, stated in SEED_STATED.items():
        if name in STATED_RIGHT:
            assert round(values[name], 4) == pytest.approx(stated, abs=1e-12), name
        else:
            # Wrong at the 4th decimal place or before: not a rounding difference.
            assert abs(values[name] - stated) > 4e-4, (name, values[name], stated)


def test_seed_slide_value_for_in_h2_uses_w2(values):
    # The slide writes 0.25 * 0.1 for W2 * i1 (W2 is 0.2) yet states 0.3275, the right value.
    assert values["in_h2"] == pytest.approx(0.2 * 0.1 + 0.15 * 0.05 + 0.3, abs=1e-15)
    assert 0.25 * 0.1 + 0.15 * 0.05 + 0.3 != pytest.approx(0.3275, abs=1e-4)


def test_autodiff_agrees_on_the_seed(problem):
    value, grads = jaxbp.backprop(problem.net, jaxbp.half_sse, problem.params, problem.x, problem.y)
    value_ad, grads_ad = jaxbp.autodiff(
        problem.net, jaxbp.half_sse, problem.params, problem.x, problem.y
    )
    assert float(value) == pytest.approx(float(value_ad), rel=1e-15)
    report = jaxbp.compare_grads(grads, grads_ad)
    assert bool(report.ok) and float(report.worst_rel_error) < 1e-14
    # Shared biases: the gradient is the sum over the layer's neurons.
    out_h = jax.nn.sigmoid(problem.x @ problem.params[0]["W"] + 0.3)
    out_o = jax.nn.sigmoid(out_h @ problem.params[2]["W"] + 0.9)
    delta_o = (out_o - problem.y) * out_o * (1 - out_o)
    assert float(grads[2]["b"]) == pytest.approx(float(jnp.sum(delta_o)), rel=1e-14)
    np.testing.assert_allclose(grads[2]["W"], np.outer(out_h, delta_o), rtol=1e-14)


@pytest.mark.slow
@pytest.mark.parametrize("jit", [True, False], ids=["jit", "nojit"])
def test_one_sgd_step_updates_w7_and_biases(problem, jit):
    opt = jaxbp.sgd(problem.learning_rate)
    step = jaxbp.make_train_step(problem.net, jaxbp.half_sse, opt, check="raise", jit=jit)
    ts, metrics = step(
        jaxbp.init_train_state(problem.net, opt, problem.params), problem.x, problem.y
    )
    params, state = ts.params, ts.opt_state
    assert bool(metrics.applied) and bool(metrics.ok)
    assert int(metrics.reason) == jaxbp.REASON_APPLIED
    assert float(metrics.loss) == pytest.approx(0.35396085, abs=1e-8)
    assert round(float(params[2]["W"][1, 0]), 4) == 0.5680
    _, grads = jaxbp.backprop(problem.net, jaxbp.half_sse, problem.params, problem.x, problem.y)
    # jaxbp.sgd updates every leaf, biases included: W <- W - lr * dE/dW.
    for new, old, g in zip(
        jax.tree_util.tree_leaves(params),
        jax.tree_util.tree_leaves(problem.params),
        jax.tree_util.tree_leaves(grads),
    ):
        np.testing.assert_allclose(new, old - 0.5 * g, rtol=0, atol=1e-15)
    assert float(params[0]["b"]) == pytest.approx(0.3 - 0.5 * float(grads[0]["b"]), abs=1e-15)
    assert float(params[0]["b"]) != 0.3 and float(params[2]["b"]) != 0.9
    assert float(params[2]["b"]) == pytest.approx(0.9 - 0.5 * 0.07922175, abs=1e-8)
    assert int(state.count) == 1


@pytest.mark.parametrize("jit", [True, False], ids=["jit", "nojit"])
def test_parity_with_the_seed_numpy_program(problem, jit):
    w_ih, w_ho, output, error = seed_numpy_program()
    # The program's result is the issue's listed numbers.
    np.testing.assert_allclose(w_ih, NUMPY_W_INPUT_HIDDEN, rtol=0, atol=1e-8)
    np.testing.assert_allclose(w_ho, NUMPY_W_HIDDEN_OUTPUT, rtol=0, atol=1e-8)

    opt = jaxbp.freeze(jaxbp.sgd(0.5), jaxbp.biases)
    step = jaxbp.make_train_step(problem.net, jaxbp.half_sse, opt, check="skip", jit=jit)
    ts, metrics = step(
        jaxbp.init_train_state(problem.net, opt, problem.params), problem.x, problem.y
    )
    params = ts.params
    assert bool(metrics.applied)
    assert float(metrics.loss) == pytest.approx(float(np.sum(error)), rel=1e-14)
    np.testing.assert_allclose(params[0]["W"], w_ih, rtol=0, atol=1e-8)
    np.testing.assert_allclose(params[2]["W"], w_ho, rtol=0, atol=1e-8)
    # Same arithmetic, so far closer than 1e-8 in fact.
    np.testing.assert_allclose(params[0]["W"], w_ih, rtol=0, atol=1e-15)
    np.testing.assert_allclose(params[2]["W"], w_ho, rtol=0, atol=1e-15)
    np.testing.assert_allclose(params[0]["W"], NUMPY_W_INPUT_HIDDEN, rtol=0, atol=1e-8)
    np.testing.assert_allclose(params[2]["W"], NUMPY_W_HIDDEN_OUTPUT, rtol=0, atol=1e-8)
    # Frozen biases come back exactly as they were.
    assert float(params[0]["b"]) == 0.3 and float(params[2]["b"]) == 0.9


def test_forward_output_matches_numpy_program(problem):
    _, _, output, _ = seed_numpy_program()
    out = jaxbp.forward(problem.net, problem.params, problem.x)
    np.testing.assert_allclose(out, output[0], rtol=1e-15)


def test_seed_in_float32(problem):
    p32 = jaxbp.seed_problem(jnp.float32)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(p32.params))
    assert p32.x.dtype == jnp.float32 and p32.y.dtype == jnp.float32
    v32 = seed_values(p32)
    for name, expected in CORRECT.items():
        assert v32[name].dtype == jnp.float32, name
        assert float(v32[name]) == pytest.approx(expected, abs=6e-5), name


@pytest.mark.slow
def test_seed_trains_with_the_fused_loop(problem):
    opt = jaxbp.sgd(problem.learning_rate)
    ts = jaxbp.init_train_state(problem.net, opt, problem.params)
    result = jaxbp.fit(
        problem.net, jaxbp.half_sse, opt, ts, problem.x, problem.y, steps=2000, check="report"
    )
    losses = np.asarray(result.history.loss)
    assert losses.shape == (2000,)
    assert losses[0] == pytest.approx(0.35396085, abs=1e-8)
    assert losses[-1] < 1e-3 and np.all(np.diff(losses) < 0)
    assert bool(np.all(result.history.ok)) and bool(np.all(result.history.applied))
    out = jaxbp.forward(problem.net, result.state.params, problem.x)
    np.testing.assert_allclose(out, [0.02, 0.98], atol=0.05)
