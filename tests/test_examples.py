"""Every example under examples/ (the ones a reader runs first) runs to completion and prints
what its docstring promises. Each runs in its own interpreter, as a reader would run it."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(name: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
    env["JAX_PLATFORMS"] = "cpu"
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / name)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=EXAMPLES.parent,
    )
    assert result.returncode == 0, f"{name} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def test_seed_example():
    out = run_example("seed_example.py")
    assert "out_h1, out_h2 = [0.5866 0.5812]" in out
    assert "out_o1, out_o2 = [0.8401 0.7922]" in out
    assert "E_total = 0.354" in out
    assert "dE/dW7 = 0.064" in out
    assert "W7_new = 0.568" in out
    assert "all leaves agree" in out
    assert "[[0.66769329 0.40907027]\n [0.56799435 0.35898575]]" in out


def test_xor():
    out = run_example("xor.py")
    assert "XOR learned; every step's gradients agreed with jax.grad." in out
    assert "[1 1] -> 0.0" in out


@pytest.mark.slow
def test_per_example_grads():
    out = run_example("per_example_grads.py")
    assert "{'W': (8, 5, 16), 'b': (8, 16)}" in out
    assert "mean of the per-example gradients == the batch gradient" in out
    assert "clipped mean gradient norm:" in out


@pytest.mark.slow
def test_custom_layer():
    out = run_example("custom_layer.py")
    assert "Swish alone vs jax.vjp:" in out
    assert "[1]['beta']" in out  # the new layer's parameter, checked in a network
    assert "training accuracy 1.00" in out
    assert "caught: the input gradient ['x'] is wrong" in out
    # registered, the layer is part of the model description
    assert "the network as a description: {'name': 'serial', 'layers': [{'name': 'Dense'" in out
    assert "{'name': 'Swish', 'beta_init': 1.0, 'wrong': False}" in out


@pytest.mark.parametrize(
    "name", ["seed_example.py", "xor.py", "per_example_grads.py", "custom_layer.py"]
)
def test_examples_have_a_docstring_that_says_how_to_run_them(name):
    text = (EXAMPLES / name).read_text()
    assert text.startswith('"""') and f"python examples/{name}" in text


# --------------------------------------------------------------------------------------------
# docs/tutorial.md: its code runs, and prints exactly the output shown under it
# --------------------------------------------------------------------------------------------

_RUNNER = r"""
import contextlib, io, json, sys
blocks = json.load(open(sys.argv[1]))
namespace, outputs = {"__name__": "__tutorial__"}, []
for code in blocks:
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        exec(compile(code, "<tutorial>", "exec"), namespace)
    outputs.append(buffer.getvalue())
print(json.dumps(outputs))
"""


def _tutorial_blocks():
    """``[(python code, expected output or None), ...]`` in page order: a ```text block right
    after a ```python block is that block's output."""
    import re

    text = (EXAMPLES.parent / "docs" / "tutorial.md").read_text()
    fences = re.findall(r"^```(\w*)\n(.*?)^```$", text, flags=re.S | re.M)
    pairs = []
    for kind, body in fences:
        if kind == "python":
            pairs.append([body, None])
        elif kind == "text" and pairs and pairs[-1][1] is None and not body.startswith("$"):
            pairs[-1][1] = body
    return pairs


@pytest.mark.slow
def test_tutorial_code_prints_what_the_page_shows(tmp_path):
    import json

    pairs = _tutorial_blocks()
    assert len(pairs) >= 8
    blocks = tmp_path / "blocks.json"
    blocks.write_text(json.dumps([code for code, _ in pairs]))
    runner = tmp_path / "runner.py"
    runner.write_text(_RUNNER)
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
    env["JAX_PLATFORMS"] = "cpu"
    result = subprocess.run(
        [sys.executable, str(runner), str(blocks)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=EXAMPLES.parent,
    )
    assert result.returncode == 0, result.stderr
    outputs = json.loads(result.stdout.strip().splitlines()[-1])
    for (code, expected), got in zip(pairs, outputs):
        if expected is None:
            assert got == "", f"block prints but the page shows no output:\n{code}"
        else:
            assert got == expected, f"block:\n{code}\nprinted:\n{got}\npage shows:\n{expected}"
