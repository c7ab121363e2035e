"""How a trace writes things down: names in the seed's style, numbers, formulas.

Names: inputs ``i1, i2``; neurons ``h1, h2`` (hidden) and ``o1, o2`` (output), or ``h2.1`` with
several hidden layers; ``in_h1`` is a neuron's weighted sum and ``out_h1`` its activation. A
2-2-2 network takes the seed's weight and bias names (``W1..W8``, ``b1, b2``); any other uses
``w[layer][i][j]`` and ``b[layer]`` (shared) or ``b[layer][j]``.
"""

from __future__ import annotations

import math
from typing import NamedTuple, SupportsFloat

from .config import TraceConfig

__all__ = [
    "TraceNames",
    "given",
    "computed",
    "factor",
    "given_factor",
    "ActivationFormula",
    "ACTIVATION_FORMULAS",
    "LossFormulas",
    "loss_formulas",
    "logistic",
]


class TraceNames:
    """How the trace names inputs, neurons, weights and biases."""

    def __init__(self, config: TraceConfig):
        self.config = config
        self.seed = config.is_seed_shape  # the seed's own names, W1..W8 and b1, b2
        self.hidden = len(config.layers) - 1

    def input(self, i: int) -> str:
        return f"i{i + 1}"

    def neuron(self, layer: int, j: int) -> str:
        if layer == len(self.config.layers) - 1:
            return f"o{j + 1}"
        if self.hidden == 1:
            return f"h{j + 1}"
        return f"h{layer + 1}.{j + 1}"

    def source(self, layer: int, i: int) -> str:
        """The name of input ``i`` of ``layer``'s weighted sum (an input or an ``out_``)."""
        return self.input(i) if layer == 0 else f"out_{self.neuron(layer - 1, i)}"

    def weight(self, layer: int, i: int, j: int) -> str:
        if self.seed:
            from ..seed import SEED_WEIGHT_NAMES

            return SEED_WEIGHT_NAMES[(layer, i, j)]
        return f"w[{layer}][{i}][{j}]"

    def bias(self, layer: int, j: int | None = None) -> str:
        """``j`` is None for a shared bias."""
        if self.seed:
            return f"b{layer + 1}" if j is None else f"b_{self.neuron(layer, j)}"
        return f"b[{layer}]" if j is None else f"b[{layer}][{j}]"

    def bias_of(self, layer: int, j: int) -> str:
        """The bias that neuron ``j`` of ``layer`` adds (its own, or the layer's shared one)."""
        shared = self.config.layers[layer].shared_bias
        return self.bias(layer, None if shared else j)


# --------------------------------------------------------------------------------------------
# Numbers
# --------------------------------------------------------------------------------------------


def given(value: SupportsFloat) -> str:
    """A number the user gave (a weight, an input): as short as it is exact."""
    return f"{float(value):.10g}"


def computed(value: SupportsFloat) -> str:
    """A computed number: 4 places, as the seed prints them; 4 significant digits below 0.01
    (so small gradients keep their precision), scientific below 1e-4."""
    value = float(value)
    if not math.isfinite(value):
        return str(value)
    if value == 0:
        return f"{0.0:.4f}"  # -0.0 too: "(-0.0000)" in a product reads as a sign that matters
    if (value != 0 and abs(value) < 1e-4) or abs(value) >= 1e6:
        return f"{value:.3e}"
    if value != 0 and abs(value) < 1e-2:
        return f"{value:.{3 - math.floor(math.log10(abs(value)))}f}"
    return f"{value:.4f}"


def _parenthesised(text: str) -> str:
    return f"({text})" if text.startswith("-") else text


def factor(value: SupportsFloat) -> str:
    """A computed number inside a product: parenthesised when negative."""
    return _parenthesised(computed(value))


def given_factor(value: SupportsFloat) -> str:
    """A given number inside a product: parenthesised when negative."""
    return _parenthesised(given(value))


def logistic(value: float) -> float:
    """``1 / (1 + e^-value)`` in Python floats, for a number written into a formula."""
    if value < -700:  # e^-value would overflow; the result is e^value to double precision
        return math.exp(value)
    return 1 / (1 + math.exp(-value))


# --------------------------------------------------------------------------------------------
# Formulas
# --------------------------------------------------------------------------------------------


class ActivationFormula(NamedTuple):
    """``output`` in terms of ``{x}`` = in (``{xp}``: the same, parenthesised when negative);
    ``derivative`` in terms of ``{o}`` = out and ``{i}`` = in; ``fill_derivative``: whether the
    derivative is shown with its numbers filled in."""

    output: str
    derivative: str
    fill_derivative: bool


ACTIVATION_FORMULAS = {
    "sigmoid": ActivationFormula("1/(1+e^-{xp})", "{o}*(1-{o})", True),
    "tanh": ActivationFormula("tanh({x})", "1-{o}^2", True),
    "relu": ActivationFormula("max(0, {x})", "1 if {i} > 0 else 0", False),
    "leaky_relu": ActivationFormula(
        "{xp} if {xp} > 0 else 0.01*{xp}", "1 if {i} > 0 else 0.01", False
    ),
    "gelu": ActivationFormula("gelu({x})", "gelu'({i})", False),
    "softplus": ActivationFormula("log(1+e^{xp})", "1/(1+e^-{i})", False),
    "identity": ActivationFormula("{x}", "1", False),
}


class LossFormulas(NamedTuple):
    """The error of one output and its ``dE/dout``, in terms of ``{o}`` (the output), ``{t}``
    (its target) and ``{j}`` (its number); a footnote defining what they use, or ``""``."""

    error: str
    gradient: str
    footnote: str


def loss_formulas(loss: str, examples: int, outputs: int) -> LossFormulas:
    """The formulas of ``loss`` for ``examples`` examples of ``outputs`` outputs, normalised as
    jaxbp's loss normalises (so the errors add up to E_total)."""
    per_example = f" / {examples}" if examples > 1 else ""
    elements = examples * outputs
    if loss == "half_sse":
        gradient = "{o} - {t}" if examples == 1 else "({o} - {t})" + per_example
        return LossFormulas("1/2 ({t} - {o})^2" + per_example, gradient, "")
    if loss == "mse":
        return LossFormulas(
            f"({{o}} - {{t}})^2 / {elements}", f"2 ({{o}} - {{t}}) / {elements}", ""
        )
    if loss == "sigmoid_binary_cross_entropy":
        return LossFormulas(
            f"BCE({{o}}, {{t}}) / {elements}",
            f"(s({{o}}) - {{t}}) / {elements}",
            "BCE(z, t) = -(t log s(z) + (1-t) log(1-s(z))), s = sigmoid: the output is a logit.",
        )
    if loss == "softmax_cross_entropy":
        return LossFormulas(
            "-{t} * log softmax(out)_{j}" + per_example,
            "(softmax(out)_{j} - {t})" + per_example,
            "softmax(out)_j = e^out_j / sum_m e^out_m over the outputs: they are logits.",
        )
    raise ValueError(f"no formula for loss {loss!r}")
