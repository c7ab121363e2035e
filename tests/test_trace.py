"""jaxbp.trace: the worked example's numbers, for the seed and for any small config.

Every number is checked against something independent: the values the seed tutorial gets
right, the seed's own numpy program, a NumPy re-implementation of the chain rule, jax.grad.
"""

import copy
import json

import jax
import numpy as np
import pytest

from jaxbp import seed
from jaxbp.trace import ConfigError, load_config, parse_config, seed_config, trace

# Correct seed numbers (float64), to 4 places.
SEED_CORRECT = {
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


def _sigmoid(z):
    return 1 / (1 + np.exp(-z))


def seed_numpy_program(steps=1, update_biases=False):
    """The seed tutorial's numpy program (weights updated, biases not), optionally with the
    bias updates it leaves out and for several steps."""
    inputs = np.array([[0.1, 0.05]])
    targets = np.array([[0.02, 0.98]])
    w_ih = np.array([[0.25, 0.2], [0.5, 0.15]])
    w_ho = np.array([[0.7, 0.4], [0.6, 0.35]])
    b_h, b_o, lr = 0.3, 0.9, 0.5
    losses = []
    for _ in range(steps + 1):
        hidden = _sigmoid(inputs @ w_ih + b_h)
        output = _sigmoid(hidden @ w_ho + b_o)
        losses.append(float(np.sum(0.5 * (targets - output) ** 2)))
        if len(losses) == steps + 1:
            break
        output_delta = (targets - output) * output * (1 - output)
        hidden_delta = (output_delta @ w_ho.T) * hidden * (1 - hidden)
        w_ho = w_ho + lr * hidden.T @ output_delta
        w_ih = w_ih + lr * inputs.T @ hidden_delta
        if update_biases:
            b_o = b_o + lr * output_delta.sum()
            b_h = b_h + lr * hidden_delta.sum()
    return w_ih, w_ho, b_h, b_o, losses


@pytest.fixture(scope="module")
def seed_trace():
    return trace()


@pytest.fixture(scope="module")
def seed_trace_frozen():
    return trace(freeze_bias=True)


# --------------------------------------------------------------------------------------------
# The seed's example
# --------------------------------------------------------------------------------------------


def test_seed_numbers_to_four_places(seed_trace):
    values = seed_trace.seed_values()
    for key, expected in SEED_CORRECT.items():
        assert values[key] == pytest.approx(expected, abs=5e-5), key


def test_seed_json_numbers(seed_trace):
    out = seed_trace.to_json()
    assert set(out) == {"layers", "errors", "loss", "gradients", "updated", "autodiff_max_abs_diff"}
    np.testing.assert_allclose(out["layers"][0]["net"], [0.35, 0.3275], atol=5e-5)
    np.testing.assert_allclose(out["layers"][0]["out"], [0.5866, 0.5812], atol=5e-5)
    np.testing.assert_allclose(out["layers"][1]["net"], [1.6593, 1.3380], atol=5e-5)
    np.testing.assert_allclose(out["layers"][1]["out"], [0.8401, 0.7922], atol=5e-5)
    np.testing.assert_allclose(out["errors"], [0.3363, 0.0176], atol=5e-5)
    assert out["loss"] == pytest.approx(0.3540, abs=5e-5)
    # W7 is weights[1][0] of the second layer: hidden 2 -> output 1.
    assert out["gradients"][1]["weights"][1][0] == pytest.approx(0.0640, abs=5e-5)
    assert out["updated"][1]["weights"][1][0] == pytest.approx(0.5680, abs=5e-5)
    # shaped as in the config: shared biases stay scalars
    assert isinstance(out["gradients"][0]["bias"], float)
    assert isinstance(out["updated"][1]["bias"], float)
    assert out["autodiff_max_abs_diff"] < 1e-15
    json.dumps(out)  # plain JSON values only


def test_errata_flags(seed_trace):
    errata = {e["quantity"]: e for e in seed_trace.errata()}
    assert list(errata) == list(seed.SEED_STATED)
    right = {"in_h1", "in_h2", "out_h1", "out_h2"}
    for key, row in errata.items():
        assert row["matches"] == (key in right), key
        assert row["seed_states"] == seed.SEED_STATED[key]
        assert row["correct"] == pytest.approx(SEED_CORRECT[key], abs=5e-5)


def test_errata_only_for_the_seed():
    config = seed_config()
    config["learning_rate"] = 0.25
    assert trace(config).errata() is None
    config = seed_config()
    config["layers"][0]["bias"] = [0.3, 0.3]  # same numbers, but per-neuron biases
    assert trace(config).errata() is None


def test_seed_text_in_the_seeds_notation(seed_trace):
    text = seed_trace.to_text()
    for line in [
        "in_h1 = W1*i1 + W3*i2 + b1*1 = 0.25*0.1 + 0.5*0.05 + 0.3*1 = 0.3500",
        "in_h2 = W2*i1 + W4*i2 + b1*1 = 0.2*0.1 + 0.15*0.05 + 0.3*1 = 0.3275",
        "out_h1 = 1/(1+e^-in_h1) = 1/(1+e^-0.3500) = 0.5866",
        "in_o1 = W5*out_h1 + W7*out_h2 + b2*1 = 0.7*0.5866 + 0.6*0.5812 + 0.9*1 = 1.6593",
        "E_o1 = 1/2 (target_o1 - out_o1)^2 = 1/2 (0.02 - 0.8401)^2 = 0.3363",
        "E_total = E_o1 + E_o2 = 0.3363 + 0.0176 = 0.3540",
        "dE/dout_o1 = out_o1 - target_o1 = 0.8401 - 0.02 = 0.8201",
        "dout_o1/din_o1 = out_o1*(1-out_o1) = 0.8401*(1-0.8401) = 0.1343",
        "dE/dW7 = dE/dout_o1 * dout_o1/din_o1 * din_o1/dW7 = 0.8201 * 0.1343 * 0.5812 = 0.0640",
        "dE/dout_h1 = dE/din_o1*W5 + dE/din_o2*W6 = 0.1101*0.7 + (-0.0309)*0.4 = 0.0647",
        "dE/db2 = dE/din_o1 + dE/din_o2 = 0.1101 + (-0.0309) = 0.0792",
        "W7_new = W7 - lr * dE/dW7 = 0.6 - 0.5 * 0.0640 = 0.5680",
        "in_o1     1.3450       1.6593   NO",
        "in_h1     0.3500       0.3500   yes",
    ]:
        assert line in text, line
    assert "in_h2 line also writes W2*i1 as 0.25*0.1 where W2 is 0.2" in text
    assert "max |manual - jax.grad| =" in text


def test_chain_rule_factors_multiply_to_the_gradients(seed_trace):
    h, o = seed_trace.layers
    # dE/dW7 = dE/dout_o1 * dout_o1/din_o1 * out_h2
    assert o.dE_dout[0, 0] * o.dout_dnet[0, 0] * h.out[0, 1] == pytest.approx(
        o.grad_weights[1, 0], rel=1e-14
    )
    # the hidden layer's dE/dout is the sum over outputs of dE/din_o * weight
    w_ho = np.asarray(seed.SEED_W_HIDDEN_OUTPUT)
    np.testing.assert_allclose(h.dE_dout[0], w_ho @ o.delta[0], rtol=1e-14)
    np.testing.assert_allclose(h.dout_dnet, h.out * (1 - h.out), rtol=1e-14)


def test_freeze_bias_one_step_is_the_seeds_numpy_program(seed_trace_frozen):
    w_ih, w_ho, _, _, _ = seed_numpy_program(steps=1)
    h, o = seed_trace_frozen.layers
    np.testing.assert_allclose(h.final_weights, w_ih, rtol=0, atol=1e-14)
    np.testing.assert_allclose(o.final_weights, w_ho, rtol=0, atol=1e-14)
    # the numbers printed in the brief, to their 8 places
    np.testing.assert_allclose(
        h.final_weights, [[0.24921513, 0.1993274], [0.49960756, 0.1496637]], atol=1e-8
    )
    np.testing.assert_allclose(
        o.final_weights, [[0.66769329, 0.40907027], [0.56799435, 0.35898575]], atol=1e-8
    )
    assert float(h.final_bias) == 0.3 and float(o.final_bias) == 0.9
    assert "b1 stays 0.3 (--freeze-bias" in seed_trace_frozen.to_text()


def test_steps_history_matches_numpy_and_decreases():
    t = trace(steps=5)
    w_ih, w_ho, b_h, b_o, losses = seed_numpy_program(steps=5, update_biases=True)
    np.testing.assert_allclose(t.history, losses, rtol=1e-12)
    assert np.all(np.diff(t.history) < 0)
    np.testing.assert_allclose(t.layers[0].final_weights, w_ih, rtol=1e-12)
    np.testing.assert_allclose(t.layers[1].final_weights, w_ho, rtol=1e-12)
    assert float(t.layers[0].final_bias) == pytest.approx(b_h, rel=1e-12)
    assert float(t.layers[1].final_bias) == pytest.approx(b_o, rel=1e-12)
    out = t.to_json()
    assert len(out["history"]) == 6 and out["history"][0] == pytest.approx(0.3539608534)
    assert out["updated"][1]["weights"] == t.layers[1].final_weights.tolist()
    assert np.all(t.step_rel_errors < 1e-10)  # every fit step checked against jax.grad


def test_float64_whatever_the_global_setting():
    with jax.enable_x64(False):
        t = trace()
    assert t.layers[0].net.dtype == np.float64
    # float32 would leave differences around 1e-8; float64 agrees to rounding
    assert t.autodiff_max_abs_diff < 1e-15
    assert t.seed_values()["in_h2"] == pytest.approx(0.3275, abs=1e-15)


# --------------------------------------------------------------------------------------------
# Any small network
# --------------------------------------------------------------------------------------------

ACT_NP = {
    "sigmoid": _sigmoid,
    "tanh": np.tanh,
    "relu": lambda z: np.maximum(z, 0),
    "identity": lambda z: z,
    "softplus": lambda z: np.logaddexp(z, 0),
}


def _numpy_forward(config):
    cfg = parse_config(config)
    a = cfg.inputs
    nets, outs = [], []
    for layer in cfg.layers:
        z = a @ layer.weights + layer.bias
        a = ACT_NP[layer.activation](z)
        nets.append(z)
        outs.append(a)
    return nets, outs


DEEP = {
    "inputs": [[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]],
    "targets": [[0.0], [1.0], [1.0], [0.0]],
    "layers": [
        {
            "weights": [[0.5, -0.3, 0.2], [0.4, 0.6, -0.1]],
            "bias": [0.1, -0.1, 0.0],
            "activation": "tanh",
        },
        {"weights": [[0.3, 0.1], [-0.2, 0.4], [0.5, -0.5]], "bias": 0.05, "activation": "relu"},
        {"weights": [[0.7], [-0.6]], "activation": "sigmoid"},
    ],
    "loss": "mse",
    "learning_rate": 1.0,
}


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["half_sse", "mse", "sigmoid_binary_cross_entropy"])
def test_general_config_against_numpy_and_jax_grad(loss):
    config = copy.deepcopy(DEEP)
    config["loss"] = loss
    t = trace(config)
    nets, outs = _numpy_forward(config)
    for lt, z, a in zip(t.layers, nets, outs):
        np.testing.assert_allclose(lt.net, z, rtol=1e-14, atol=1e-15)
        np.testing.assert_allclose(lt.out, a, rtol=1e-14, atol=1e-15)
    assert t.autodiff_max_abs_diff < 1e-14
    assert t.errors.sum() == pytest.approx(t.loss, rel=1e-14)
    # every weight gradient is the sum over examples of its chain-rule factors
    cfg = parse_config(config)
    for k, lt in enumerate(t.layers):
        src = cfg.inputs if k == 0 else t.layers[k - 1].out
        np.testing.assert_allclose(
            lt.grad_weights, src.T @ (lt.dE_dout * lt.dout_dnet), rtol=1e-12, atol=1e-15
        )
    # the shared bias of layer 1 sums dE/dnet over examples and neurons
    assert float(t.layers[1].grad_bias) == pytest.approx(t.layers[1].delta.sum(), rel=1e-12)
    # the update is plain SGD with the config's learning rate
    np.testing.assert_allclose(
        t.layers[0].step1_weights,
        cfg.layers[0].weights - 1.0 * t.layers[0].grad_weights,
        rtol=1e-14,
    )


@pytest.mark.slow
def test_general_config_json_is_shaped_as_the_config():
    out = trace(DEEP, steps=3).to_json()
    assert set(out) == {
        "layers",
        "errors",
        "loss",
        "gradients",
        "updated",
        "autodiff_max_abs_diff",
        "history",
    }
    assert np.shape(out["layers"][0]["net"]) == (4, 3)  # a list of examples stays a list
    assert np.shape(out["gradients"][0]["weights"]) == (2, 3)
    assert np.shape(out["gradients"][0]["bias"]) == (3,)  # per-neuron list
    assert isinstance(out["gradients"][1]["bias"], float)  # shared scalar
    assert isinstance(out["updated"][2]["bias"], float)  # default bias 0, shared
    assert len(out["errors"]) == 1 and len(out["history"]) == 4


@pytest.mark.slow
def test_softmax_cross_entropy_config():
    config = {
        "inputs": [[0.5, -0.2], [0.1, 0.4]],
        "targets": [[1, 0, 0], [0, 0, 1]],
        "layers": [
            {
                "weights": [[0.2, -0.1, 0.4], [0.3, 0.5, -0.2]],
                "bias": [0, 0.1, 0],
                "activation": "identity",
            }
        ],
        "loss": "softmax_cross_entropy",
        "learning_rate": 0.1,
    }
    t = trace(config)
    logits = np.asarray(config["inputs"]) @ np.asarray(config["layers"][0]["weights"]) + np.asarray(
        [0, 0.1, 0]
    )
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    expected = -np.mean(np.log(p[[0, 1], [0, 2]]))
    assert t.loss == pytest.approx(expected, rel=1e-13)
    assert t.errors.sum() == pytest.approx(expected, rel=1e-13)
    assert t.autodiff_max_abs_diff < 1e-15


@pytest.mark.slow
def test_generic_names_unless_two_two_two():
    text = trace(DEEP).to_text()
    assert "in_h1.1 = w[0][0][0]*i1 + w[0][1][0]*i2 + b[0][0]*1 = 0.5*0 + 0.4*0 + 0.1*1" in text
    assert "in_o1 = w[2][0][0]*out_h2.1 + w[2][1][0]*out_h2.2 + b[2]*1" in text
    assert "W1" not in text and "Errata" not in text
    one_hidden = {
        "inputs": [1.0, 2.0, 3.0],
        "targets": [0.5],
        "layers": [
            {"weights": [[0.1, 0.2]] * 3, "activation": "sigmoid"},
            {"weights": [[0.3], [0.4]], "activation": "sigmoid"},
        ],
    }
    text = trace(one_hidden).to_text()
    assert "in_h1 = w[0][0][0]*i1 + w[0][1][0]*i2 + w[0][2][0]*i3 + b[0]*1" in text


def test_markdown_rendering(seed_trace):
    md = seed_trace.to_markdown()
    assert md.startswith("# The seed's 2-2-2 example")
    assert "## Step 1: forward pass" in md and "## Step 4: update" in md
    assert "| in_o1 | 1.3450 | 1.6593 | NO |" in md
    assert "```text\nin_h1 = W1*i1" in md
    # every table row has as many cells as its header: |diff| is escaped, not a separator
    header = "| parameter | manual (chain rule) | jax.grad | \\|diff\\| |"
    assert header in md
    lines = md.splitlines()
    at = lines.index(header)
    rows = lines[at : lines.index("", at)]
    cells = {len(row.replace("\\|", "").strip("|").split("|")) for row in rows}
    assert cells == {4}, rows[:3]


# --------------------------------------------------------------------------------------------
# Config validation: every message names the key, what it got and what it expected
# --------------------------------------------------------------------------------------------


def _seed_with(path, value):
    config = seed_config()
    target = config
    for key in path[:-1]:
        target = target[key]
    if value is _DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return config


_DELETE = object()


@pytest.mark.parametrize(
    "path, value, fragments",
    [
        (("inputs",), _DELETE, ["missing key 'inputs'"]),
        (("layers", 1, "weights"), _DELETE, ["layers[1] is missing key 'weights'"]),
        (
            ("layers", 0, "weights"),
            [[0.25, 0.2], [0.5]],
            ["layers[0].weights is ragged", "row 1 has 1 entries but row 0 has 2"],
        ),
        (
            ("layers", 1, "weights"),
            [[0.7, 0.4], [0.6, 0.35], [0.1, 0.1]],
            ["layers[1].weights has 3 rows", "layer 0 has width 2", "expected 2 rows"],
        ),
        (
            ("layers", 0, "weights"),
            [[0.25, 0.2]],
            ["layers[0].weights has 1 rows", "the inputs have width 2"],
        ),
        (
            ("layers", 0, "activation"),
            "sigmoyd",
            ['layers[0].activation is "sigmoyd"', "expected one of", "sigmoid"],
        ),
        (("loss",), "cross_entropy", ['loss is "cross_entropy"', "half_sse"]),
        (("learning_rate",), 0, ["learning_rate is 0", "positive finite number"]),
        (("learning_rate",), -0.5, ["learning_rate is -0.5"]),
        (("learning_rate",), float("nan"), ["learning_rate is NaN"]),
        (("learning_rate",), "0.5", ['learning_rate is "0.5"']),
        (
            ("targets",),
            [0.02, 0.98, 0.5],
            ["targets have 3 numbers per example", "layers[1]) has 2 neurons", "expected 2"],
        ),
        (("targets",), [[0.02, 0.98]], ["inputs give 1 example(s)", "targets give 1"]),
        (
            ("layers", 0, "bias"),
            [0.3, 0.3, 0.3],
            ["layers[0].bias has 3 entries", "the layer has 2 neurons"],
        ),
        (("layers", 0, "bias"), "0.3", ['layers[0].bias must be a number, got "0.3"']),
        (
            ("layers", 0, "weights"),
            [[0.25, True], [0.5, 0.15]],
            ["layers[0].weights[0][1] must be a number, got true"],
        ),
        (("inputs",), [0.1, float("inf")], ["inputs[1] must be a finite number"]),
        (("layers",), [], ["layers must be a non-empty list"]),
        (("learning_rat",), 0.5, ["unknown key 'learning_rat'"]),
        (("layers", 0, "activaton"), "tanh", ["unknown key 'activaton' in layers[0]"]),
    ],
)
def test_config_errors(path, value, fragments):
    with pytest.raises(ConfigError) as info:
        parse_config(_seed_with(path, value))
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_config_not_an_object():
    with pytest.raises(ConfigError, match="expected a JSON object"):
        parse_config([1, 2])


def test_load_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"inputs": [0.1, 0.05],\n "targets": [0.02 0.98]}')
    with pytest.raises(ConfigError, match=r"not valid JSON: .* line 2 column"):
        load_config(bad)
    good = tmp_path / "seed.json"
    good.write_text(json.dumps(seed_config()))
    assert load_config(good).is_seed


def test_trace_rejects_bad_steps():
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        trace(steps=0)
