"""`jaxbp trace --example conv|attention` / `--model FILE.json`: worked single-layer examples.

Every total in the text is the layer's own number; here each is checked against jax.grad of
the same loss (float64) and against a small NumPy reference written out below.
"""

import json
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbp.trace.layer_traces import (
    example_spec,
    load_trace_file,
    trace_example,
    trace_file,
    trace_layer,
)


@pytest.fixture(scope="module")
def conv():
    return trace_example("conv")


@pytest.fixture(scope="module")
def attention():
    return trace_example("attention")


def _jax_grads(layer_spec):
    """jax.grad of 1/2 sum (y - t)^2 through the layer built here (float64)."""
    from jaxbp.model import build

    layer = build(layer_spec["model"])
    params = {k: jnp.asarray(v, jnp.float64) for k, v in layer_spec["params"].items()}
    x = jnp.asarray(layer_spec["inputs"], jnp.float64)
    t = jnp.asarray(layer_spec["targets"], jnp.float64)

    def loss(p, x):
        return 0.5 * jnp.sum((layer.forward(p, x)[0] - t) ** 2)

    return jax.grad(loss, argnums=(0, 1))(params, x)


# --------------------------------------------------------------------------------------------
# Conv1D
# --------------------------------------------------------------------------------------------


def conv_reference(x, w, b, t, stride):
    """VALID 1-D convolution, one channel, and its gradients by the per-position sums."""
    k, n = len(w), len(x)
    m = (n - k) // stride + 1
    y = np.array([sum(w[j] * x[o * stride + j] for j in range(k)) + b for o in range(m)])
    dy = y - t
    dw = np.array([sum(dy[o] * x[o * stride + j] for o in range(m)) for j in range(k)])
    dx = np.zeros(n)
    for o in range(m):
        for j in range(k):
            dx[o * stride + j] += dy[o] * w[j]
    return y, dy, dw, dy.sum(), dx


@pytest.mark.slow
def test_conv_numbers_equal_jax_grad_and_numpy(conv):
    spec = conv.spec
    dparams, dx = _jax_grads(spec)
    np.testing.assert_allclose(conv.manual["W"], dparams["W"], rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(conv.manual["b"], dparams["b"], rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(conv.manual["x"], dx, rtol=1e-12, atol=1e-14)
    x = np.asarray(spec["inputs"])[:, 0]
    w = np.asarray(spec["params"]["W"])[:, 0, 0]
    y, _dy, dw, db, dxr = conv_reference(
        x, w, spec["params"]["b"][0], np.asarray(spec["targets"])[:, 0], 2
    )
    numbers = conv.numbers
    np.testing.assert_allclose(np.asarray(numbers["forward"]["y"])[:, 0], y, rtol=1e-12)
    np.testing.assert_allclose(np.asarray(numbers["gradients"]["W"])[:, 0, 0], dw, rtol=1e-12)
    np.testing.assert_allclose(numbers["gradients"]["b"][0], db, rtol=1e-12)
    np.testing.assert_allclose(np.asarray(numbers["gradients"]["x"])[:, 0], dxr, rtol=1e-12)
    assert conv.autodiff_max_abs_diff < 1e-12
    assert numbers["loss"] == pytest.approx(0.5 * np.sum((y - np.array([0.0, 1.0])) ** 2))


def test_conv_text_shows_the_per_position_sums(conv):
    text = conv.render("text")
    # w1 touched x1 (for y1) and x3 (for y2): its gradient is the sum of those two terms
    assert "w1      x1, x3" in text
    assert "dE/dw1 = dE/dy1*x1 + dE/dy2*x3 = (-1.6500)*1 + (-1.1500)*(-1) = -0.5000" in text
    assert "dE/dw2 = dE/dy1*x2 + dE/dy2*x4 = (-1.6500)*2 + (-1.1500)*0.5 = -3.8750" in text
    assert "dE/db = dE/dy1 + dE/dy2 = (-1.6500) + (-1.1500) = -2.8000" in text
    # x3 is read by both windows: the transposed convolution adds both paths
    assert "dE/dx3 = dE/dy1*w3 + dE/dy2*w1 = (-1.6500)*0.25 + (-1.1500)*0.5 = -0.9875" in text
    assert "y1 = w1*x1 + w2*x2 + w3*x3 + b = 0.5*1 + (-1)*2 + 0.25*(-1) + 0.1 = -1.6500" in text
    assert "transposed convolution" in text and "flipped kernel [w3, w2, w1]" in text


def _printed_sums_add_up(text):
    """Every 'a*b + c*d = total' line with plain numbers: the printed total is the sum."""
    checked = 0
    for line in text.splitlines():
        parts = [p.strip() for p in line.split(" = ")]
        if len(parts) < 3:
            continue
        numbers, total = parts[-2], parts[-1].split()[0]
        if re.fullmatch(r"[-()0-9.*+ e]+", numbers) and "*" in numbers:
            value = eval(numbers)
            assert value == pytest.approx(float(total), abs=6e-4, rel=2e-3), line
            checked += 1
    return checked


def test_conv_printed_arithmetic_is_right(conv):
    assert _printed_sums_add_up(conv.render("text")) >= 10


@pytest.mark.slow
def test_conv_with_padding_dilation_and_channels_matches_jax_grad():
    spec = {
        "model": {
            "name": "Conv1D",
            "out_channels": 2,
            "kernel_size": 2,
            "stride": 2,
            "padding": "SAME",
            "dilation": 2,
        },
        "inputs": [[1.0, -0.5], [2.0, 0.25], [0.5, 1.0], [-1.0, 3.0], [0.3, 0.2]],
    }
    traced = trace_layer(spec)
    dparams, dx = _jax_grads(traced.spec)
    np.testing.assert_allclose(traced.manual["W"], dparams["W"], rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(traced.manual["x"], dx, rtol=1e-12, atol=1e-14)
    text = traced.render("text")
    assert "dE/dw1.2.1 = " in text and "dE/dx3.2 = " in text
    assert _printed_sums_add_up(text) > 0


def test_conv_unread_input_has_zero_gradient_in_words():
    spec = example_spec("conv")
    spec["inputs"] = [1.0, 2.0, -1.0, 0.5, 3.0, 4.0]  # x6: the stride steps over it
    traced = trace_layer(spec)
    assert "dE/dx6 = 0   (no window reads x6" in traced.render("text")
    assert traced.manual["x"][5, 0] == 0.0


# --------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------


def attention_reference(spec):
    """One causal head in NumPy, forward and backward, written independently."""
    p_ = {k: np.asarray(v) for k, v in spec["params"].items()}
    x, t = np.asarray(spec["inputs"]), np.asarray(spec["targets"])
    q, k, v = (x @ p_["W" + n] + p_["b" + n] for n in "qkv")
    d = x.shape[1]
    s = q @ k.T / math.sqrt(d) + np.triu(np.full((3, 3), -np.inf), 1)
    p = np.exp(s - s.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    h = p @ v
    y = h @ p_["Wo"] + p_["bo"]
    dy = y - t
    dh = dy @ p_["Wo"].T
    dp = dh @ v.T
    jac = [np.diag(p[r]) - np.outer(p[r], p[r]) for r in range(3)]  # the softmax Jacobian
    ds = np.stack([jac[r] @ dp[r] for r in range(3)])
    return {
        "p": p,
        "y": y,
        "dp": dp,
        "ds": ds,
        "dWo": h.T @ dy,
        "dWq": x.T @ (ds @ k / math.sqrt(d)),
        "dWv": x.T @ (p.T @ dh),
    }


@pytest.mark.slow
def test_attention_numbers_equal_jax_grad_and_numpy(attention):
    dparams, dx = _jax_grads(attention.spec)
    for key, value in dparams.items():
        np.testing.assert_allclose(attention.manual[key], value, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(attention.manual["x"], dx, rtol=1e-12, atol=1e-14)
    ref = attention_reference(attention.spec)
    numbers = attention.numbers
    np.testing.assert_allclose(numbers["forward"]["p"], ref["p"], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(numbers["forward"]["y"], ref["y"], rtol=1e-12)
    worked = numbers["gradients"]["intermediate"]
    np.testing.assert_allclose(worked["p"], ref["dp"], rtol=1e-12)
    np.testing.assert_allclose(worked["s"], ref["ds"], rtol=1e-12, atol=1e-15)
    for key in ("Wo", "Wq", "Wv"):
        np.testing.assert_allclose(numbers["gradients"][key], ref["d" + key], rtol=1e-11)
    assert attention.autodiff_max_abs_diff < 1e-12


@pytest.mark.slow
def test_attention_text_shows_softmax_jacobian_and_mask(attention):
    text = attention.render("text")
    assert "s1.2 = -inf   (mask: token 2 comes after token 1)" in text
    assert "p1.2 = e^-inf / Z1 = 0   (masked)" in text
    assert "dp3/ds3 = diag(p3) - p3 p3^T = [[0.2246, (-0.1036), (-0.1210)]" in text
    assert "dE/ds1.2 = p1.2 * (dE/dp1.2 - r1) = 0 * " in text
    assert "nothing reaches the -inf score" in text
    assert (
        "r3 = p3.1*dE/dp3.1 + p3.2*dE/dp3.2 + p3.3*dE/dp3.3 = "
        "0.3406*(-0.6522) + 0.3041*0.3519 + 0.3553*(-0.3003) = -0.2218"
    ) in text
    assert re.search(
        r"dE/dWo\[1\]\[1\] = h1\.1\*dE/dy1\.1 \+ h2\.1\*dE/dy2\.1 \+ "
        r"h3\.1\*dE/dy3\.1 = ",
        text,
    )
    assert _printed_sums_add_up(text) >= 40


def test_attention_without_mask_and_default_params():
    spec = {
        "model": {"name": "MultiHeadAttention", "num_heads": 1},
        "inputs": [[0.5, -1.0], [1.0, 0.25], [0.0, 2.0]],
    }
    traced = trace_layer(spec)
    assert traced.spec["params"]["Wq"]  # init with key 0, rounded to two places
    assert all(round(v, 2) == v for row in traced.spec["params"]["Wq"] for v in row)
    dparams, _dx = _jax_grads(traced.spec)
    for key, value in dparams.items():
        np.testing.assert_allclose(traced.manual[key], value, rtol=1e-12, atol=1e-14)
    assert "-inf" not in traced.render("text")


# --------------------------------------------------------------------------------------------
# Formats, files, the command
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["conv", "attention"])
def test_json_round_trips(tmp_path, run_cli, kind):
    code, out, _ = run_cli("trace", "--example", kind, "--format", "json")
    assert code == 0
    first = json.loads(out)
    assert first["kind"] == kind and first["autodiff_max_abs_diff"] < 1e-12
    path = tmp_path / "trace.json"
    path.write_text(json.dumps(first["input"]))
    code, out, _ = run_cli("trace", "--model", str(path), "--format", "json")
    assert code == 0
    assert json.loads(out) == first
    assert trace_file(path).to_json() == first
    assert load_trace_file(path) == first["input"]


@pytest.mark.parametrize("kind", ["conv", "attention"])
def test_markdown(run_cli, kind):
    code, out, _ = run_cli("trace", "--example", kind, "--format", "markdown")
    assert code == 0
    assert out.startswith("# ") and "## Step 3: backward pass" in out and "```text" in out


@pytest.mark.parametrize("kind", ["conv", "attention"])
def test_plot_is_a_png(tmp_path, run_cli, kind):
    pytest.importorskip("matplotlib")
    path = tmp_path / f"{kind}.png"
    code, _, err = run_cli("trace", "--example", kind, "--plot", str(path))
    assert code == 0 and "diagram written" in err
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bare_description_uses_the_examples_numbers(tmp_path, run_cli):
    path = tmp_path / "conv.json"
    path.write_text(
        json.dumps({"name": "Conv1D", "out_channels": 1, "kernel_size": 3, "stride": 2})
    )
    code, out, _ = run_cli("trace", "--model", str(path), "--format", "json")
    assert code == 0
    assert json.loads(out)["input"]["inputs"] == [[1.0], [2.0], [-1.0], [0.5], [3.0]]


@pytest.mark.parametrize(
    "content, fragment",
    [
        ({"name": "Dense", "out_dim": 2}, "cannot trace a model whose layer is 'Dense'"),
        ({"model": {"name": "serial", "layers": []}}, "cannot trace"),
        (
            {"model": {"name": "Conv1D", "out_channels": 1, "kernel_size": 3}, "params": {"W": 1}},
            "params must be an object with keys W, b",
        ),
        (
            {
                "model": {"name": "Conv1D", "out_channels": 1, "kernel_size": 3},
                "params": {"W": [[[1.0]]], "b": [0.0]},
            },
            "params.W has shape (1, 1, 1)",
        ),
        (
            {"model": {"name": "Conv1D", "out_channels": 1, "kernel_size": 3}, "inputs": [1, "a"]},
            "inputs must hold numbers",
        ),
        (
            {"model": {"name": "Conv1D", "out_channels": 1, "kernel_size": 3}, "targets": [1.0]},
            "targets has shape (1, 1); expected (3, 1)",
        ),
        ({"model": {"name": "MultiHeadAttention", "num_heads": 2}}, "expected num_heads 1"),
        ({"model": {"name": "Conv1D", "out_channels": 1, "kernel_size": 9}}, "Conv1D"),
        ({"model": {"name": "Conv1D"}, "extra": 1}, "unknown key 'extra'"),
    ],
)
def test_bad_model_file_is_one_line_exit_2(tmp_path, run_cli, content, fragment):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(content))
    code, out, err = run_cli("trace", "--model", str(path))
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("jaxbp trace: error:"), err
    assert fragment in lines[0], lines[0]


def test_layer_flags_do_not_mix_with_network_flags(run_cli):
    code, _, err = run_cli("trace", "--example", "conv", "--steps", "2")
    assert code == 2 and "cannot be combined" in err


def test_help_lists_the_new_flags(run_cli):
    code, out, _ = run_cli("trace", "--help")
    assert code == 0 and "--example" in out and "--model" in out


def test_numbers_read_cleanly():
    from jaxbp.trace.layer_traces import check_section, sum_line
    from jaxbp.trace.notation import computed, factor

    assert computed(-0.0) == "0.0000" and factor(-0.0) == "0.0000"  # never "(-0.0000)"
    assert computed(-1e-5) == "-1.000e-05"  # a real small negative keeps its sign
    # one term equal to its total is said once, not "= 1.0000 = 1.0000"
    assert sum_line("Z1", ["e^(s1.1 - 0.1)"], ["1.0000"], [1.0], 1.0, "Z1") == (
        "Z1 = e^(s1.1 - 0.1) = 1.0000"
    )
    assert sum_line("y", ["a", "b"], ["1.0000", "2.0000"], [1.0, 2.0], 3.0, "y") == (
        "y = a + b = 1.0000 + 2.0000 = 3.0000"
    )
    table = check_section([("dE/dbk[1]", -1.2e-17, -3e-18)]).blocks[1]
    assert table.rows[0][1:3] == ["0.0000000000", "0.0000000000"]
