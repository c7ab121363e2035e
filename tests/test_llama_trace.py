"""``jaxbp trace --example llama``: every number of a tiny Llama block, and the HTML pictures of
the ``tied`` and ``llama`` examples.

The llama trace compiles its block's forward, backward and jax.grad once per process (about
5 s), so the tests that need it are marked slow."""

from __future__ import annotations

import json

import numpy as np
import pytest

from jaxbp import cli
from jaxbp.trace import html
from jaxbp.trace.layer_traces import trace_example, trace_layer
from jaxbp.trace.llama_trace import EXAMPLE


@pytest.fixture(scope="module")
def llama():
    return trace_example("llama")


@pytest.mark.slow
def test_llama_numbers_follow_from_the_formulas(llama):
    n = llama.numbers
    assert llama.kind == "llama"
    # Every gradient: the printed arithmetic is the network's own backward (checked inside the
    # trace at 1e-10) and jax.grad agrees to float64 rounding.
    assert set(llama.manual) == {"Wt", "g1", "Wq", "Wk", "Wv", "Wo", "g2", "W1", "W2", "W3"} | {
        "g3",
        "b",
    }
    assert llama.autodiff_max_abs_diff < 1e-12
    # The tied matrix: its gradient is the embedding's scatter-add plus the logits' use.
    np.testing.assert_allclose(
        np.add(n["dE_in"], n["dE_out"]), llama.manual["Wt"], rtol=0, atol=1e-14
    )
    assert np.count_nonzero(np.abs(n["dE_in"]).sum(1)) == 3  # tokens 1, 3, 0 picked 3 rows
    # Rope: position 1 is not turned, and a rotation keeps each pair's length.
    q, qr = np.asarray(n["q"]).reshape(3, 2, 2), np.asarray(n["qr"])
    np.testing.assert_allclose(qr[0], q[0], atol=1e-15)
    np.testing.assert_allclose(np.linalg.norm(qr, axis=-1), np.linalg.norm(q, axis=-1), rtol=1e-13)
    assert not np.allclose(qr[1:], q[1:])
    # RMSNorm with scale 1: each row's mean square is ms / (ms + eps), ms the input's.
    ms = np.mean(np.square(n["x0"]), -1)
    np.testing.assert_allclose(np.mean(np.square(n["n1"]), -1), ms / (ms + 1e-6), rtol=1e-13)
    # Causal softmax: each row sums to 1, nothing after the diagonal.
    p = np.asarray(n["p"])
    np.testing.assert_allclose(p.sum(-1), 1, atol=1e-15)
    assert np.all(p[:, 0, 1:] == 0) and p[0, 1, 2] == 0
    # The loss: softmax cross-entropy of the logits against the next tokens.
    logits = np.asarray(n["logits"])
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    assert n["loss"] == pytest.approx(-logp[[0, 1, 2], EXAMPLE["targets"]].mean(), abs=1e-14)


@pytest.mark.slow
def test_llama_text_shows_each_idea(llama):
    text = llama.render("text")
    for fragment in (
        "rstd1[1] = 1/sqrt(mean(x0[1]^2) + eps)",  # RMSNorm forward
        "dx2[1] = rstd * (dn3 * g3 - x2 * rstd^2 * mean)",  # RMSNorm backward
        "qr1[2] = (q1 cos - q2 sin, q2 cos + q1 sin)",  # the rotation
        "dq1[2] = (dqr1 cos + dqr2 sin, dqr2 cos - dqr1 sin)",  # and its inverse
        "silu(a) = a*sigmoid(a)",  # SwiGLU's gate
        "silu'(a[1]) = sig (1 + a (1 - sig))",
        "dE/dkr[1][1] = head 1 + head 2",  # grouped heads summing
        "dE/dWt[0][1] = dE_in[0][1] + dE_out[0][1]",  # the tied matrix's two uses
        "jax.grad of the same loss gives the same gradients",
    ):
        assert fragment in text, fragment
    # The JSON's input reproduces the trace.
    again = trace_layer(json.loads(llama.render("json"))["input"])
    assert again.numbers["loss"] == llama.numbers["loss"]


@pytest.mark.slow
def test_llama_trace_file_changes_the_tokens_only():
    spec = {**EXAMPLE, "inputs": [4, 4, 2], "targets": [0, 1, 2]}
    traced = trace_layer(spec)
    assert traced.numbers["loss"] != trace_example("llama").numbers["loss"]
    assert traced.autodiff_max_abs_diff < 1e-12
    with pytest.raises(ValueError, match="inputs must be 3 token ids in \\[0, 5\\)"):
        trace_layer({**EXAMPLE, "inputs": [1, 5, 0]})
    with pytest.raises(ValueError, match="leave params out"):
        trace_layer({**EXAMPLE, "params": []})


@pytest.mark.parametrize("kind", ["tied", pytest.param("llama", marks=pytest.mark.slow)])
def test_html_pictures(kind, tmp_path, capsys):
    out = tmp_path / f"{kind}.html"
    assert cli.main(["trace", "--example", kind, "--format", "html", "--out", str(out)]) == 0
    page = out.read_text()
    assert page.startswith("<!DOCTYPE html>") or "<html" in page[:200]
    traced = trace_example(kind)
    svg, nodes = html._LAYER_PICTURES[kind](traced.to_json())
    steps = html._layer_page(traced)["steps"]
    # Nearly every step lights a node of the picture.
    assert sum(bool(step["focus"]) for step in steps) >= 0.75 * len(steps)
    if kind == "tied":
        # Each W[i][j] labels two edges: its two uses.
        assert svg.count('data-node="W[1][2]"') == 2
    else:
        assert {"x0[1]", "dqr1[2]", "Wt[0][1]", "E"} <= nodes


def test_trace_model_file_with_bad_llama_tokens(tmp_path, capsys):
    path = tmp_path / "llama.json"
    path.write_text(json.dumps({**EXAMPLE, "targets": [0, 1]}))
    assert cli.main(["trace", "--model", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "targets must be 3 token ids" in err
