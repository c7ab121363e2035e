"""Every example under examples/ (the ones a reader runs first) runs to completion and prints
what its docstring promises. Each runs in its own interpreter, as a reader would run it."""

from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

# What each example promises to print (its docstring says so): fragments of its output.
PRINTS = {
    "seed_example.py": [
        "out_h1, out_h2 = [0.5866 0.5812]",
        "out_o1, out_o2 = [0.8401 0.7922]",
        "E_total = 0.354",
        "dE/dW7 = 0.064",
        "W7_new = 0.568",
        "all leaves agree",
        "[[0.66769329 0.40907027]\n [0.56799435 0.35898575]]",
    ],
    "xor.py": ["XOR learned; every step's gradients agreed with jax.grad.", "[1 1] -> 0.0"],
    "per_example_grads.py": [
        "{'W': (8, 5, 16), 'b': (8, 16)}",
        "mean of the per-example gradients == the batch gradient",
        "clipped mean gradient norm:",
    ],
    "custom_layer.py": [
        "Swish alone vs jax.vjp:",
        "[1]['beta']",  # the new layer's parameter, checked in a network
        "training accuracy 1.00",
        "caught: the input gradient ['x'] is wrong",
        # registered, the layer is part of the model description
        "the network as a description: {'name': 'serial', 'layers': [{'name': 'Dense'",
        "{'name': 'Swish', 'beta_init': 1.0, 'wrong': False}",
    ],
}
# seed_example keeps the fast loop's subprocess path covered.
SLOW = {"per_example_grads.py", "custom_layer.py", "xor.py"}


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=[pytest.mark.slow] if n in SLOW else []) for n in PRINTS]
)
def test_example_prints_what_it_promises(run_python, name):
    out = run_python(EXAMPLES / name)
    for fragment in PRINTS[name]:
        assert fragment in out, (fragment, out)


@pytest.mark.parametrize("name", list(PRINTS))
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
def test_tutorial_code_prints_what_the_page_shows(run_python, tmp_path):
    import json

    pairs = _tutorial_blocks()
    assert len(pairs) >= 8
    blocks = tmp_path / "blocks.json"
    blocks.write_text(json.dumps([code for code, _ in pairs]))
    runner = tmp_path / "runner.py"
    runner.write_text(_RUNNER)
    stdout = run_python(runner, blocks)
    outputs = json.loads(stdout.strip().splitlines()[-1])
    for (code, expected), got in zip(pairs, outputs):
        if expected is None:
            assert got == "", f"block prints but the page shows no output:\n{code}"
        else:
            assert got == expected, f"block:\n{code}\nprinted:\n{got}\npage shows:\n{expected}"
