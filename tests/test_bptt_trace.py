"""`jaxbp trace --example gru` / `--model FILE.json` with a GRU: backpropagation through time.

Every total in the trace is the GRU layer's own number; here each is checked against jax.grad of
the same loss (float64), against a NumPy GRU written out below (forward, BPTT and central finite
differences), and the per-step gradients dE/dh_t against jax.grad of the loss with respect to a
perturbation added to each state.
"""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxbp.trace import gru_trace
from jaxbp.trace.layer_traces import example_spec, trace_example, trace_file, trace_layer


@pytest.fixture(scope="module")
def gru():
    return trace_example("gru")


def _spec_arrays(spec):
    params = {k: np.asarray(v, np.float64) for k, v in spec["params"].items()}
    x = np.asarray(spec["inputs"], np.float64)
    return params, x.reshape(len(x), -1), np.asarray(spec["targets"], np.float64)


# --------------------------------------------------------------------------------------------
# A NumPy GRU: the reference
# --------------------------------------------------------------------------------------------


def numpy_gru(params, x, bump=None):
    """PyTorch's GRU equations, one sequence; ``bump[t]`` is added to h_t (for dE/dh_t)."""
    hidden = params["Wh"].shape[0]
    h = np.zeros(hidden)
    states, gates = [], []
    for t in range(len(x)):
        ax = x[t] @ params["Wi"] + params["bi"]
        ah = h @ params["Wh"] + params["bh"]
        r = 1 / (1 + np.exp(-(ax[:hidden] + ah[:hidden])))
        z = 1 / (1 + np.exp(-(ax[hidden : 2 * hidden] + ah[hidden : 2 * hidden])))
        n = np.tanh(ax[2 * hidden :] + r * ah[2 * hidden :])
        h_new = (1 - z) * n + z * h
        if bump is not None:
            h_new = h_new + bump[t]
        gates.append((h, r, z, n, ah[2 * hidden :]))
        states.append(h_new)
        h = h_new
    return np.array(states), gates


def numpy_loss(params, x, targets, sequences):
    states, _ = numpy_gru(params, x)
    y = states if sequences else states[-1]
    return 0.5 * np.sum((y - targets) ** 2)


def numpy_bptt(params, x, targets, sequences):
    """The chain rule unrolled by hand, in NumPy: (grads, dE/dh per step)."""
    states, gates = numpy_gru(params, x)
    steps, hidden = states.shape
    dy = states - targets if sequences else None
    grads = {k: np.zeros_like(v) for k, v in params.items()}
    dx, dhs = np.zeros_like(x), np.zeros((steps, hidden))
    carry = np.zeros(hidden)
    for t in reversed(range(steps)):
        h_prev, r, z, n, ahn = gates[t]
        dh = carry + (dy[t] if sequences else (states[-1] - targets if t == steps - 1 else 0))
        dhs[t] = dh
        dn = dh * (1 - z)
        dan = dn * (1 - n**2)
        dz_pre = dh * (h_prev - n) * z * (1 - z)
        dr_pre = dan * ahn * r * (1 - r)
        dax = np.concatenate([dr_pre, dz_pre, dan])
        dah = np.concatenate([dr_pre, dz_pre, dan * r])
        grads["Wi"] += np.outer(x[t], dax)
        grads["bi"] += dax
        grads["Wh"] += np.outer(h_prev, dah)
        grads["bh"] += dah
        dx[t] = params["Wi"] @ dax
        carry = dh * z + params["Wh"] @ dah
    return grads, dx, dhs


def finite_differences(params, x, targets, sequences, eps=1e-6):
    def central(array):
        grad = np.zeros_like(array)
        for index in np.ndindex(array.shape):
            saved = array[index]
            array[index] = saved + eps
            up = numpy_loss(params, x, targets, sequences)
            array[index] = saved - eps
            down = numpy_loss(params, x, targets, sequences)
            array[index] = saved
            grad[index] = (up - down) / (2 * eps)
        return grad

    return {**{k: central(v) for k, v in params.items()}, "x": central(x)}


def jax_state_gradients(params, x, targets, sequences):
    """jax.grad of the loss by a bump added to each h_t: dE/dh_t, all it reaches."""

    def loss(bump):
        hidden = params["Wh"].shape[0]
        h, states = jnp.zeros(hidden), []
        for t in range(len(x)):
            ax = x[t] @ params["Wi"] + params["bi"]
            ah = h @ params["Wh"] + params["bh"]
            r = jax.nn.sigmoid(ax[:hidden] + ah[:hidden])
            z = jax.nn.sigmoid(ax[hidden : 2 * hidden] + ah[hidden : 2 * hidden])
            n = jnp.tanh(ax[2 * hidden :] + r * ah[2 * hidden :])
            h = (1 - z) * n + z * h + bump[t]
            states.append(h)
        y = jnp.stack(states) if sequences else states[-1]
        return 0.5 * jnp.sum((y - targets) ** 2)

    return np.asarray(jax.grad(loss)(jnp.zeros((len(x), params["Wh"].shape[0]))))


def _assert_matches_references(traced, sequences):
    params, x, t = _spec_arrays(traced.spec)
    grads, dx, dhs = numpy_bptt(params, x, t, sequences)
    for key in ("Wi", "Wh", "bi", "bh"):
        np.testing.assert_allclose(traced.manual[key], traced.autodiff[key], rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(traced.manual[key], grads[key], rtol=1e-11, atol=1e-14)
    np.testing.assert_allclose(traced.manual["x"], traced.autodiff["x"], rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(traced.manual["x"], dx, rtol=1e-11, atol=1e-14)
    worked = traced.numbers["gradients"]["intermediate"]
    np.testing.assert_allclose(worked["h"], dhs, rtol=1e-11, atol=1e-14)
    np.testing.assert_allclose(
        worked["h"], jax_state_gradients(params, x, t, sequences), rtol=1e-11, atol=1e-14
    )
    per_step = traced.numbers["gradients"]["per_step"]
    for key, terms in per_step.items():
        np.testing.assert_allclose(
            np.sum(terms, axis=0), traced.manual[key], rtol=1e-12, atol=1e-15
        )


# --------------------------------------------------------------------------------------------
# The built-in example
# --------------------------------------------------------------------------------------------


def test_example_is_the_issues_network(gru):
    assert gru.spec["model"]["name"] == "GRU" and gru.spec["model"]["hidden"] == 2
    assert gru.spec["model"]["return_sequences"] is False
    assert np.shape(gru.spec["inputs"]) == (3, 1)  # 3 time steps of one input


def test_example_totals_equal_jax_grad_numpy_and_finite_differences(gru):
    _assert_matches_references(gru, sequences=False)
    assert gru.autodiff_max_abs_diff < 1e-12
    params, x, t = _spec_arrays(gru.spec)
    fd = finite_differences(params, x, t, False)
    for key, value in fd.items():
        np.testing.assert_allclose(gru.manual[key], value, rtol=1e-6, atol=1e-9)
    states, _ = numpy_gru(params, x)
    forward = gru.numbers["forward"]
    np.testing.assert_allclose(forward["h"], states, rtol=1e-12)
    np.testing.assert_allclose(forward["y"], states[-1], rtol=1e-12)
    assert gru.numbers["loss"] == pytest.approx(numpy_loss(params, x, t, False), rel=1e-12)


def test_per_step_terms_are_real_and_distinct(gru):
    """The shared weights get a nonzero term from every step (the sum is not one step's)."""
    per_step = np.asarray(gru.numbers["gradients"]["per_step"]["bh"])
    assert per_step.shape == (3, 6)
    assert np.all(np.abs(per_step) > 1e-5)
    assert not np.allclose(per_step[0], per_step[2])


def test_text_shows_states_dh_flow_and_sums(gru):
    text = gru.render("text")
    assert "r1.1 = sigmoid(ar1.1) = 1/(1+e^-0.6000) = 0.6457" in text
    assert (
        "h1.1 = (1 - z1.1)*n1.1 + z1.1*h0.1 = (1 - 0.5744)*0.5856 + 0.5744*0.0000 = 0.2492" in text
    )
    # the last step's dh comes from the loss, the earlier ones flow back through time
    assert "dE/dh3.1 = (h3.1 - t1) = (0.2740 - 0.5) = -0.2260" in text
    assert "-- Time step 2: dE/dh2 flows back from step 3 --" in text
    assert re.search(
        r"dE/dh2\.1 = dE/dh3\.1\*z3\.1 \+ dE/dar3\.1\*Whr\[1\]\[1\] \+ .* "
        r"dE/dahn3\.2\*Whn\[1\]\[2\] = \(-0\.2260\)\*0\.6314 \+ .* = -0\.1243",
        text,
    )
    assert (
        "dE/dan3.1 = dE/dh3.1*(1 - z3.1)*(1 - n3.1^2) = (-0.2260)*(1 - 0.6314)*"
        "(1 - 0.8910^2) = -0.0172"
    ) in text
    # each shared weight: one term per step, summing to the layer's total
    assert (
        "dE/dbhn[1] = dE/dahn1.1 + dE/dahn2.1 + dE/dahn3.1 = (-0.0211) + (-0.0241) + "
        "(-0.0130) = -0.0581"
    ) in text
    assert (
        "dE/dWir[1][1] = x1.1*dE/dar1.1 + x2.1*dE/dar2.1 + x3.1*dE/dar3.1 = "
        "1*0.001498 + (-0.5)*0.001176 + 2*0.0007292 = 0.002368"
    ) in text
    order = [text.index(f"-- Time step {s}: dE/dh{s}") for s in (3, 2, 1)]
    assert order == sorted(order)  # reverse time


def test_printed_arithmetic_is_right(gru):
    """Every 'a*b + c = total' line with plain numbers: the printed total is the sum."""
    checked = 0
    for line in gru.render("text").splitlines():
        parts = [p.strip() for p in line.split(" = ")]
        if len(parts) < 3:
            continue
        numbers, total = parts[-2], parts[-1].split()[0]
        if re.fullmatch(r"[-()0-9.*+ e]+", numbers) and ("*" in numbers or "+" in numbers):
            assert eval(numbers) == pytest.approx(float(total), abs=6e-4, rel=2e-3), line
            checked += 1
    assert checked >= 60


def test_a_wrong_per_step_term_is_caught(monkeypatch):
    """The trace re-adds its terms against the layer's totals: a wrong intermediate raises."""
    real = gru_trace._worked_gradients

    def off_by_a_bit(numbers, sequences):
        worked = real(numbers, sequences)
        worked["dar"][1, 0] += 1e-6
        return worked

    monkeypatch.setattr(gru_trace, "_worked_gradients", off_by_a_bit)
    with pytest.raises(RuntimeError, match="trace bug"):
        trace_example("gru")


# --------------------------------------------------------------------------------------------
# Other GRUs from trace files
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_return_sequences_two_features_default_params():
    spec = {
        "model": {"name": "GRU", "hidden": 3},
        "inputs": [[0.5, -1.0], [1.0, 0.25], [0.0, 2.0], [-0.7, 0.3]],
        "targets": [[0.1, 0.0, -0.2], [0.3, 0.3, 0.3], [0.0, -0.5, 0.5], [1.0, 0.0, 0.0]],
    }
    traced = trace_layer(spec)
    assert all(round(v, 2) == v for row in traced.spec["params"]["Wh"] for v in row)
    _assert_matches_references(traced, sequences=True)
    text = traced.render("text")
    assert "dE/dh2.1 = (h2.1 - t2.1) + dE/dh3.1*z3.1 + " in text
    assert "dE/dx4.2 = " in text and "dE/dWiz[2][3] = " in text


@pytest.mark.slow
@settings(max_examples=10, deadline=None, derandomize=True)
@given(
    steps=st.sampled_from([1, 3]),
    features=st.sampled_from([1, 2]),
    hidden=st.sampled_from([1, 3]),
    sequences=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_random_grus_match_every_reference(steps, features, hidden, sequences, seed):
    """Random weights and data; shapes from a small set (each new shape is a compilation)."""
    rng = np.random.default_rng(seed)
    out = (steps, hidden) if sequences else (hidden,)
    spec = {
        "model": {"name": "GRU", "hidden": hidden, "return_sequences": sequences},
        "params": {
            "Wi": rng.normal(size=(features, 3 * hidden)).tolist(),
            "Wh": rng.normal(size=(hidden, 3 * hidden)).tolist(),
            "bi": rng.normal(size=3 * hidden).tolist(),
            "bh": rng.normal(size=3 * hidden).tolist(),
        },
        "inputs": rng.normal(size=(steps, features)).tolist(),
        "targets": rng.normal(size=out).tolist(),
    }
    traced = trace_layer(spec)
    _assert_matches_references(traced, sequences)
    assert traced.render("text").count("-- Time step") == 2 * steps


# --------------------------------------------------------------------------------------------
# Formats, files, the command
# --------------------------------------------------------------------------------------------


def test_json_round_trips(tmp_path, run_cli):
    code, out, _ = run_cli("trace", "--example", "gru", "--format", "json")
    assert code == 0
    first = json.loads(out)
    assert first["kind"] == "gru" and first["autodiff_max_abs_diff"] < 1e-12
    assert set(first["gradients"]) >= {"Wi", "Wh", "bi", "bh", "x", "intermediate", "per_step"}
    path = tmp_path / "gru.json"
    path.write_text(json.dumps(first["input"]))
    code, out, _ = run_cli("trace", "--model", str(path), "--format", "json")
    assert code == 0 and json.loads(out) == first
    assert trace_file(path).to_json() == first


def test_markdown(run_cli):
    code, out, _ = run_cli("trace", "--example", "gru", "--format", "markdown")
    assert code == 0
    assert out.startswith("# A GRU unrolled over 3 time steps")
    assert "## Step 3: backward pass through time" in out and "### Time step 1:" in out
    assert "## Step 4: the shared weights" in out and "```text" in out


def test_plot_is_a_png(tmp_path, run_cli):
    pytest.importorskip("matplotlib")
    path = tmp_path / "gru.png"
    code, _, err = run_cli("trace", "--example", "gru", "--plot", str(path))
    assert code == 0 and "gru diagram written" in err
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bare_description_uses_the_examples_numbers(tmp_path, run_cli):
    path = tmp_path / "gru.json"
    path.write_text(json.dumps({"name": "GRU", "hidden": 2, "return_sequences": False}))
    code, out, _ = run_cli("trace", "--model", str(path), "--format", "json")
    assert code == 0
    assert json.loads(out)["input"]["inputs"] == [[v] for v in example_spec("gru")["inputs"]]


@pytest.mark.parametrize(
    "content, fragment",
    [
        ({"name": "GRU", "hidden": 2, "reverse": True}, "expected reverse false"),
        (
            {"model": {"name": "GRU", "hidden": 2}, "inputs": [[[1.0]]]},
            "inputs of shape (time,) or (time, features), got shape (1, 1, 1)",
        ),
        ({"model": {"name": "GRU", "hidden": 2}, "inputs": [0.1] * 7}, "at most 6 steps"),
        ({"model": {"name": "GRU", "hidden": 4}}, "hidden 3"),
        (
            {
                "model": {"name": "GRU", "hidden": 2},
                "params": {"Wi": [[1.0]], "Wh": [[1.0]], "bi": [0.0], "bh": [0.0]},
            },
            "params.Wi has shape (1, 1)",
        ),
        (
            {"model": {"name": "GRU", "hidden": 2, "return_sequences": False}, "targets": [1.0]},
            "targets has shape (1,); expected (2,)",
        ),
        ({"model": {"name": "GRU", "hidden": 0}}, "GRU expects a positive integer hidden size"),
    ],
)
def test_bad_gru_file_is_one_line_exit_2(tmp_path, run_cli, content, fragment):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(content))
    code, out, err = run_cli("trace", "--model", str(path))
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("jaxbp trace: error:"), err
    assert fragment in lines[0], lines[0]
