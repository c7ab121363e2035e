"""`jaxbp trace --format html`: one self-contained page per trace, numbers from one source.

These tests read the page as text (no browser); tests/test_browser.py drives the same pages in
headless Chromium.
"""

import json
import re
import time

import numpy as np
import pytest

from jaxbp.trace import trace
from jaxbp.trace.html import trace_html
from jaxbp.trace.layer_traces import trace_example

MAX_PAGE_BYTES = 300_000


def embedded(page: str, element_id: str):
    """The JSON of the page's ``<script type="application/json" id=...>``."""
    match = re.search(rf'<script type="application/json" id="{element_id}">(.*?)</script>', page)
    assert match, f"no {element_id} in the page"
    return json.loads(match.group(1).replace("<\\/", "</"))


def node_values(page: str, node: str) -> list[float]:
    """The exact ``data-value`` of every picture element standing for ``node``."""
    pattern = rf'data-node="(?:[^"]* )?{re.escape(node)}(?: [^"]*)?" data-value="([^"]+)"'
    return [float(v) for v in re.findall(pattern, page)]


@pytest.fixture(scope="module")
def seed():
    traced = trace()
    return traced, trace_html(traced)


@pytest.fixture(scope="module", params=["conv", "attention", "gru"])
def layer_page(request):
    traced = trace_example(request.param)
    return traced, trace_html(traced)


def test_seed_page_is_self_contained_and_small(seed):
    traced, page = seed
    assert page.startswith("<!DOCTYPE html>")
    assert len(page.encode()) <= MAX_PAGE_BYTES
    # nothing to fetch: no external script, stylesheet, image or font
    assert not re.search(r'(src|href)="(?!data:|#)', page)
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "https://" not in page


def test_seed_page_embeds_the_json_and_shows_its_numbers(seed):
    traced, page = seed
    data = embedded(page, "trace-json")
    assert data == json.loads(traced.render("json"))
    for k, layer in enumerate(data["layers"]):
        names = [traced.names.neuron(k, j) for j in range(len(layer["out"]))]
        for j, name in enumerate(names):
            assert node_values(page, name) == [layer["out"][j]]
    assert node_values(page, "E") == [data["loss"]]
    assert node_values(page, "W7") == [0.6]  # the weight's forward value, on its edge
    assert "0.8401" in page and "1.6593" in page  # out_o1, in_o1 as the text prints them


def test_seed_steps_walk_the_chain_rule_with_factors_and_check(seed):
    traced, page = seed
    steps = embedded(page, "page-data")["steps"]
    text_lines = traced.to_text().splitlines()
    # every step line is a line of the text trace (the update step: several of them)
    for step in steps:
        for line in step["line"].split("\n"):
            assert any(line in text for text in text_lines), line
    w7 = next(s for s in steps if s["lhs"] == "dE/dW7")
    assert w7["focus"] == ["W7"] and "h2" in w7["touch"] and "o1" in w7["touch"]
    assert [f["symbol"] for f in w7["factors"]] == [
        "dE/dout_o1",
        "dout_o1/din_o1",
        "din_o1/dW7 = out_h2",
    ]
    product = np.prod([f["value"] for f in w7["factors"]])
    assert product == pytest.approx(traced.layers[1].grad_weights[1, 0], rel=1e-12)
    assert w7["check"]["agree"] and w7["check"]["manual_text"] == "0.0640112915"
    assert [e["seed_text"] for e in w7["errata"]] == ["0.0745"]
    # one factor at a time: dE/dout, dout/din, dE/din of o1 come before its weights
    order = [s["lhs"] for s in steps]
    assert order.index("dE/dout_o1") < order.index("dout_o1/din_o1") < order.index("dE/dW5")


def seed_loss_after_one_step(traced) -> float:
    """The seed network's loss on the updated weights, in NumPy (sigmoid, half squared error)."""
    sigmoid = lambda z: 1 / (1 + np.exp(-z))
    hidden = traced.config.inputs[0]
    for layer in traced.layers:
        hidden = sigmoid(hidden @ layer.step1_weights + layer.step1_bias)
    return float(0.5 * np.sum((traced.config.targets[0] - hidden) ** 2))


def test_seed_last_step_is_the_update_with_the_new_loss(seed):
    traced, page = seed
    last = embedded(page, "page-data")["steps"][-1]
    assert last["section"].startswith("Step 4")
    assert "W7_new = W7 - lr * dE/dW7 = 0.6 - 0.5 * 0.0640 = 0.5680" in last["line"]
    assert last["update"]["loss_before"] == traced.loss
    assert last["update"]["loss_after"] == pytest.approx(seed_loss_after_one_step(traced), 1e-12)
    assert last["update"]["loss_after"] < traced.loss
    assert node_values(page, "W7") == [0.6]


def test_seed_errata_table_holds_the_tutorials_numbers(seed):
    _, page = seed
    errata = page[page.index('id="errata"') :]
    for printed in ("1.3450", "0.7927", "0.2985", "0.3226", "0.0745", "0.5628"):
        assert f">{printed}</td>" in errata


def test_steps_page_has_the_training_curve():
    traced = trace(steps=3)
    page = trace_html(traced)
    training = embedded(page, "page-data")["training"]
    assert training["history"] == [float(v) for v in traced.history]
    assert embedded(page, "trace-json")["history"] == training["history"]
    # with training, the update's new loss is the recorded one
    assert embedded(page, "page-data")["steps"][-1]["update"]["loss_after"] == traced.history[1]


def test_layer_pages_show_the_json_numbers(layer_page):
    traced, page = layer_page
    assert len(page.encode()) <= MAX_PAGE_BYTES
    data = embedded(page, "trace-json")
    assert data == json.loads(traced.render("json"))
    forward = data["forward"]
    if traced.kind == "conv":
        assert [node_values(page, f"y{o + 1}") for o in range(2)] == [[v[0]] for v in forward["y"]]
    elif traced.kind == "attention":
        for t, row in enumerate(forward["p"]):
            for u, value in enumerate(row):
                shown = node_values(page, f"p{t + 1}.{u + 1}")
                assert shown == ([] if forward["s"][t][u] is None else [value])
        assert 'data-node="p1.2"' in page and ">masked<" in page
        assert 'data-node="dp3/ds3"' in page  # the softmax's Jacobian of row 3
    else:
        for t, h in enumerate(forward["h"]):
            assert node_values(page, f"h{t + 1}.1")[0] == h[0]
        dh = data["gradients"]["intermediate"]["h"]
        assert node_values(page, "h3.1")[1] == dh[2][0]  # dE/dh3 under h3
    steps = embedded(page, "page-data")["steps"]
    checked = [s for s in steps if "check" in s]
    assert checked and all(s["check"]["agree"] for s in checked)
    assert steps[-1]["section"] == "Check: jax.grad agrees"


def test_html_is_rendered_from_the_computed_trace_quickly(seed):
    traced, _ = seed
    trace_html(traced)  # the first call imports and runs the network once
    start = time.perf_counter()
    trace_html(traced)
    assert time.perf_counter() - start < 1.0


def test_cli_html_to_stdout_and_to_a_file(run_cli, tmp_path):
    result = run_cli("trace", "--format", "html")
    assert result.code == 0 and result.out.startswith("<!DOCTYPE html>")
    out = tmp_path / "conv.html"
    result = run_cli("trace", "--example", "conv", "--format", "html", "--out", out)
    assert result.code == 0 and result.out == ""
    assert out.read_text().startswith("<!DOCTYPE html>")
    assert f"html trace written to {out}" in result.err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--plot", "net.png"], "--plot cannot be combined with --format html"),
        (["--out", "no/such/folder/page.html"], "does not exist"),
    ],
)
def test_cli_html_bad_input_is_one_line_exit_2(run_cli, tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    result = run_cli("trace", "--format", "html", *args)
    assert result.code == 2 and result.out == ""
    assert len(result.err.strip().splitlines()) == 1 and message in result.err
    assert not list(tmp_path.iterdir())  # nothing written


def test_config_page_with_a_batch_and_two_hidden_layers():
    config = {
        "inputs": [[0.5, -1.0], [1.0, 0.25], [0.0, 2.0]],
        "targets": [[1.0], [0.0], [0.5]],
        "layers": [
            {
                "weights": [[0.1, -0.2, 0.3], [0.4, 0.5, -0.6]],
                "bias": [0.1, 0.0, -0.1],
                "activation": "relu",
            },
            {"weights": [[0.2, 0.1], [-0.3, 0.4], [0.5, 0.6]], "activation": "tanh"},
            {"weights": [[0.7], [-0.8]], "bias": 0.2, "activation": "identity"},
        ],
        "loss": "mse",
        "learning_rate": 0.1,
    }
    traced = trace(config)
    page = trace_html(traced)
    data = embedded(page, "trace-json")
    assert data == json.loads(traced.render("json"))
    # the picture shows example 1's values; JSON has every example
    assert node_values(page, "h1.3") == [data["layers"][0]["out"][0][2]]
    assert node_values(page, "o1") == [data["layers"][2]["out"][0][0]]
    assert "values shown: example 1 of 3" in page
    steps = embedded(page, "page-data")["steps"]
    weight = next(s for s in steps if s["lhs"] == "dE/dw[1][2][0]")
    assert weight["focus"] == ["w[1][2][0]"] and "factors" not in weight  # a sum over examples
    assert weight["check"]["agree"]
    # the new loss, recomputed here in NumPy from the updated parameters the trace prints
    hidden = traced.config.inputs
    for layer, activation in zip(traced.layers, (lambda z: np.maximum(z, 0), np.tanh, None)):
        hidden = hidden @ layer.step1_weights + layer.step1_bias
        hidden = activation(hidden) if activation else hidden
    expected = float(np.mean((hidden - traced.config.targets) ** 2))
    assert steps[-1]["update"]["loss_after"] == pytest.approx(expected, rel=1e-12)
