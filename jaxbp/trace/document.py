"""The trace as a document: one short function per section, in the seed's notation.

A document is a list of :class:`~jaxbp.trace.render.Section` s, each a title and blocks
(formula lines, paragraphs, subtitles, tables), which :mod:`jaxbp.trace.render` writes out as
text or Markdown.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import numpy as np

from .config import TraceConfig
from .notation import (
    ACTIVATION_FORMULAS,
    TraceNames,
    computed,
    factor,
    given,
    given_factor,
    logistic,
    loss_formulas,
)
from .render import Block, Lines, Paragraph, Section, Subtitle, Table

__all__ = ["trace_document", "MAX_EXAMPLES_SHOWN", "MAX_TABLE_PARAMS"]

MAX_EXAMPLES_SHOWN = 8  # more examples: the first ones, and a pointer to --format json
MAX_TABLE_PARAMS = 64  # more parameters: no table of every gradient


@dataclasses.dataclass(frozen=True)
class _Page:
    """What every section reads: the trace, its config and names, the examples shown."""

    trace: Any
    config: TraceConfig
    names: TraceNames
    shown: range

    @property
    def examples(self) -> int:
        return self.config.examples

    @property
    def batch(self) -> bool:
        return self.examples > 1

    @property
    def more(self) -> bool:
        """Are some examples left out of the formulas?"""
        return self.examples > len(self.shown)

    @property
    def last(self) -> int:
        """The output layer's index."""
        return len(self.config.layers) - 1

    def prefix(self, n: int) -> str:
        return f"[example {n + 1}] " if self.batch else ""

    def sources(self, k: int):
        """``(values, how to write one)`` of the inputs to layer ``k``'s weighted sums:
        ``(examples, width)``; given numbers for layer 0, computed ones after it."""
        if k == 0:
            return self.config.inputs, given_factor
        return self.trace.layers[k - 1].out, factor


class BiasEntry(NamedTuple):
    """One bias of a layer: its name and its position in every bias array of the layer
    (``()`` for a shared bias, ``(j,)`` for neuron ``j``'s own)."""

    name: str
    position: tuple


def _bias_entries(page: _Page, k: int) -> list[BiasEntry]:
    """The one place that tells a shared bias from per-neuron ones."""
    layer = page.config.layers[k]
    if layer.shared_bias:
        return [BiasEntry(page.names.bias(k), ())]
    return [BiasEntry(page.names.bias(k, j), (j,)) for j in range(layer.width)]


def _bias_index(page: _Page, k: int, j: int) -> tuple:
    """The index of the bias that neuron ``j`` of layer ``k`` adds."""
    return () if page.config.layers[k].shared_bias else (j,)


# --------------------------------------------------------------------------------------------
# The network
# --------------------------------------------------------------------------------------------


def _example_line(page: _Page, n: int) -> str:
    config, names = page.config, page.names
    inputs = ", ".join(f"{names.input(i)} = {given(v)}" for i, v in enumerate(config.inputs[n]))
    targets = ", ".join(
        f"target_{names.neuron(page.last, j)} = {given(v)}" for j, v in enumerate(config.targets[n])
    )
    return f"{page.prefix(n)}{inputs};  {targets}"


def _parameters_line(page: _Page, k: int) -> str:
    layer, names = page.config.layers[k], page.names
    weights = ", ".join(
        f"{names.weight(k, i, j)} = {given(layer.weights[i, j])}"
        for i, j in np.ndindex(layer.weights.shape)
    )
    shared = " (shared)" if layer.shared_bias else ""
    biases = ", ".join(
        f"{entry.name} = {given(layer.bias[entry.position])}{shared}"
        for entry in _bias_entries(page, k)
    )
    return f"layer {k} ({layer.activation}): {weights}; {biases}"


def network_section(page: _Page) -> Section:
    config = page.config
    architecture = "-".join(str(width) for width in config.widths)
    title = "The seed's 2-2-2 example" if config.is_seed else f"A {architecture} network"
    lines = [_example_line(page, n) for n in page.shown]
    lines += [_parameters_line(page, k) for k in range(len(config.layers))]
    frozen = ", biases frozen (--freeze-bias)" if page.trace.freeze_bias else ""
    lines.append(f"loss {config.loss}, learning rate {given(config.learning_rate)}{frozen}")
    blocks: list[Block] = [Lines(lines)]
    if not page.names.seed:
        blocks.append(
            Paragraph(
                "w[l][i][j] is layers[l].weights[i][j] of the config: it joins "
                "input i of layer l to its neuron j; in_ is a neuron's weighted "
                "sum, out_ its activation."
            )
        )
    if page.more:
        blocks.append(
            Paragraph(
                f"Showing the first {len(page.shown)} of {page.examples} "
                f"examples; --format json has them all."
            )
        )
    return Section(title, blocks)


# --------------------------------------------------------------------------------------------
# Step 1: forward
# --------------------------------------------------------------------------------------------


def _weighted_sum_line(page: _Page, n: int, k: int, j: int) -> str:
    layer, names = page.config.layers[k], page.names
    name = names.neuron(k, j)
    rows = range(layer.weights.shape[0])
    values, write = page.sources(k)
    symbols = " + ".join(f"{names.weight(k, i, j)}*{names.source(k, i)}" for i in rows)
    numbers = " + ".join(f"{given_factor(layer.weights[i, j])}*{write(values[n, i])}" for i in rows)
    bias = layer.bias[_bias_index(page, k, j)]
    return (
        f"{page.prefix(n)}in_{name} = {symbols} + {names.bias_of(k, j)}*1 = "
        f"{numbers} + {given_factor(bias)}*1 = {computed(page.trace.layers[k].net[n, j])}"
    )


def _activation_line(page: _Page, n: int, k: int, j: int) -> str:
    name = page.names.neuron(k, j)
    layer_trace = page.trace.layers[k]
    formula = ACTIVATION_FORMULAS[page.config.layers[k].activation].output
    symbols = formula.format(x=f"in_{name}", xp=f"in_{name}")
    numbers = formula.format(x=computed(layer_trace.net[n, j]), xp=factor(layer_trace.net[n, j]))
    return f"{page.prefix(n)}out_{name} = {symbols} = {numbers} = {computed(layer_trace.out[n, j])}"


def forward_section(page: _Page) -> Section:
    lines = []
    for n in page.shown:
        for k, layer in enumerate(page.config.layers):
            lines += [_weighted_sum_line(page, n, k, j) for j in range(layer.width)]
            lines += [_activation_line(page, n, k, j) for j in range(layer.width)]
    return Section("Step 1: forward pass", [Lines(lines)])


# --------------------------------------------------------------------------------------------
# Step 2: the error
# --------------------------------------------------------------------------------------------


def _error_line(page: _Page, formulas, j: int) -> str:
    trace, config = page.trace, page.config
    name = page.names.neuron(page.last, j)
    symbols = formulas.error.format(t=f"target_{name}", o=f"out_{name}", j=j + 1)
    if page.batch:
        terms = " + ".join(factor(e) for e in trace.errors_per_example[page.shown, j])
        more = " + ..." if page.more else ""
        return (
            f"E_{name} = sum over examples of {symbols} = {terms}{more} = "
            f"{computed(trace.errors[j])}"
        )
    numbers = ""
    if config.loss in ("half_sse", "mse"):  # their numbers fill in element by element
        numbers = " = " + formulas.error.format(
            t=given(config.targets[0, j]), o=factor(trace.layers[-1].out[0, j]), j=j + 1
        )
    return f"E_{name} = {symbols}{numbers} = {computed(trace.errors[j])}"


def _total_error_line(page: _Page) -> str:
    trace, outputs = page.trace, page.config.widths[-1]
    if outputs == 1:
        return f"E_total = E_{page.names.neuron(page.last, 0)} = {computed(trace.loss)}"
    symbols = " + ".join(f"E_{page.names.neuron(page.last, j)}" for j in range(outputs))
    numbers = " + ".join(factor(e) for e in trace.errors)
    return f"E_total = {symbols} = {numbers} = {computed(trace.loss)}"


def _loss_formulas(page: _Page):
    return loss_formulas(page.config.loss, page.examples, page.config.widths[-1])


def error_section(page: _Page) -> Section:
    formulas = _loss_formulas(page)
    lines = [_error_line(page, formulas, j) for j in range(page.config.widths[-1])]
    lines.append(_total_error_line(page))
    blocks: list[Block] = [Lines(lines)]
    if formulas.footnote:
        blocks.append(Paragraph(formulas.footnote))
    return Section("Step 2: the error", blocks)


# --------------------------------------------------------------------------------------------
# Step 3: backward
# --------------------------------------------------------------------------------------------


def _output_gradient_line(page: _Page, formulas, n: int, j: int) -> str:
    """``dE/dout`` of an output neuron: the loss's gradient."""
    config, layer_trace = page.config, page.trace.layers[page.last]
    name = page.names.neuron(page.last, j)
    out = layer_trace.out[n, j]
    symbols = formulas.gradient.format(t=f"target_{name}", o=f"out_{name}", j=j + 1)
    numbers = ""
    if config.loss != "softmax_cross_entropy":  # softmax(out)_j needs every output: no numbers
        numbers = " = " + formulas.gradient.format(
            t=given(config.targets[n, j]), o=factor(out), j=j + 1
        )
    if config.loss == "sigmoid_binary_cross_entropy":  # s(out) written as its value
        numbers = numbers.replace(f"s({factor(out)})", computed(logistic(out)))
    return (
        f"{page.prefix(n)}dE/dout_{name} = {symbols}{numbers} = "
        f"{computed(layer_trace.dE_dout[n, j])}"
    )


def _hidden_gradient_line(page: _Page, n: int, k: int, j: int) -> str:
    """``dE/dout`` of a hidden neuron: summed over the neurons of the next layer it feeds."""
    names, name = page.names, page.names.neuron(k, j)
    next_layer, next_trace = page.config.layers[k + 1], page.trace.layers[k + 1]
    fed = range(next_layer.width)
    symbols = " + ".join(
        f"dE/din_{names.neuron(k + 1, m)}*{names.weight(k + 1, j, m)}" for m in fed
    )
    numbers = " + ".join(
        f"{factor(next_trace.delta[n, m])}*{given_factor(next_layer.weights[j, m])}" for m in fed
    )
    return (
        f"{page.prefix(n)}dE/dout_{name} = {symbols} = {numbers} = "
        f"{computed(page.trace.layers[k].dE_dout[n, j])}"
    )


def _derivative_line(page: _Page, n: int, k: int, j: int) -> str:
    name, layer_trace = page.names.neuron(k, j), page.trace.layers[k]
    formula = ACTIVATION_FORMULAS[page.config.layers[k].activation]
    symbolic = formula.derivative.format(o=f"out_{name}", i=f"in_{name}")
    filled = (
        formula.derivative.format(o=factor(layer_trace.out[n, j]), i="") + " = "
        if formula.fill_derivative
        else ""
    )
    return (
        f"{page.prefix(n)}dout_{name}/din_{name} = {symbolic} = {filled}"
        f"{computed(layer_trace.dout_dnet[n, j])}"
    )


def _delta_line(page: _Page, n: int, k: int, j: int) -> str:
    name, layer_trace = page.names.neuron(k, j), page.trace.layers[k]
    return (
        f"{page.prefix(n)}dE/din_{name} = dE/dout_{name} * dout_{name}/din_{name} = "
        f"{factor(layer_trace.dE_dout[n, j])} * {factor(layer_trace.dout_dnet[n, j])} = "
        f"{computed(layer_trace.delta[n, j])}"
    )


def _neuron_lines(page: _Page, formulas, k: int) -> list[str]:
    lines = []
    for n in page.shown:
        for j in range(page.config.layers[k].width):
            lines.append(
                _output_gradient_line(page, formulas, n, j)
                if k == page.last
                else _hidden_gradient_line(page, n, k, j)
            )
            lines += [_derivative_line(page, n, k, j), _delta_line(page, n, k, j)]
    return lines


def _weight_gradient_line(page: _Page, k: int, i: int, j: int) -> str:
    names, layer_trace = page.names, page.trace.layers[k]
    name, weight = names.neuron(k, j), names.weight(k, i, j)
    values, write = page.sources(k)
    factors = " + ".join(
        f"{factor(layer_trace.dE_dout[n, j])} * "
        f"{factor(layer_trace.dout_dnet[n, j])} * {write(values[n, i])}"
        for n in page.shown
    )
    if page.more:
        factors += " + ..."
    over = "sum over examples of " if page.batch else ""
    return (
        f"dE/d{weight} = {over}dE/dout_{name} * dout_{name}/din_{name} * "
        f"din_{name}/d{weight} = {factors} = {computed(layer_trace.grad_weights[i, j])}"
        f"   (din_{name}/d{weight} = {names.source(k, i)})"
    )


def _bias_gradient_lines(page: _Page, k: int) -> list[str]:
    layer, layer_trace, names = page.config.layers[k], page.trace.layers[k], page.names
    if not layer.shared_bias:
        over = " summed over examples" if page.batch else " * 1"
        return [
            f"dE/d{names.bias(k, j)} = dE/din_{names.neuron(k, j)}{over} = "
            f"{computed(layer_trace.grad_bias[j])}"
            for j in range(layer.width)
        ]
    symbols = " + ".join(f"dE/din_{names.neuron(k, j)}" for j in range(layer.width))
    over = " (summed over examples)" if page.batch else ""
    numbers = (
        " + ".join(factor(v) for v in layer_trace.delta.sum(axis=0)) + " = "
        if layer.width > 1
        else ""
    )
    return [
        f"dE/d{names.bias(k)} = {symbols}{over} = {numbers}{computed(layer_trace.grad_bias)}"
        f"   (a shared bias feeds every neuron of the layer, times 1)"
    ]


def backward_section(page: _Page) -> Section:
    intro = (
        "The chain rule, output layer first. For a weight w into neuron n: "
        "dE/dw = dE/dout_n * dout_n/din_n * din_n/dw, and din_n/dw is the input the "
        "weight multiplies."
    )
    if page.batch:
        intro += " With several examples each gradient is the sum of one such product per example."
    blocks: list[Block] = [Paragraph(intro)]
    formulas = _loss_formulas(page)
    for k in reversed(range(len(page.config.layers))):
        layer = page.config.layers[k]
        lines = _neuron_lines(page, formulas, k)
        lines += [
            _weight_gradient_line(page, k, i, j)
            for j in range(layer.width)
            for i in range(layer.weights.shape[0])
        ]
        lines += _bias_gradient_lines(page, k)
        role = "output" if k == page.last else "hidden"
        blocks += [Subtitle(f"Layer {k} ({role}, {layer.activation})"), Lines(lines)]
    return Section("Step 3: backward pass", blocks)


# --------------------------------------------------------------------------------------------
# Step 4: update, and the training steps after it
# --------------------------------------------------------------------------------------------


def _bias_update_line(page: _Page, k: int, entry: BiasEntry) -> str:
    bias = page.config.layers[k].bias[entry.position]
    layer_trace, rate, name = page.trace.layers[k], page.config.learning_rate, entry.name
    if page.trace.freeze_bias:
        return f"{name} stays {given(bias)} (--freeze-bias: weights only, as the seed's code)"
    return (
        f"{name}_new = {name} - lr * dE/d{name} = {given(bias)} - {given(rate)} * "
        f"{factor(layer_trace.grad_bias[entry.position])} = "
        f"{computed(layer_trace.step1_bias[entry.position])}"
    )


def _update_lines(page: _Page, k: int) -> list[str]:
    layer, layer_trace = page.config.layers[k], page.trace.layers[k]
    rate = page.config.learning_rate
    lines = []
    for i, j in np.ndindex(layer.weights.shape):
        weight = page.names.weight(k, i, j)
        lines.append(
            f"{weight}_new = {weight} - lr * dE/d{weight} = {given(layer.weights[i, j])}"
            f" - {given(rate)} * {factor(layer_trace.grad_weights[i, j])} = "
            f"{computed(layer_trace.step1_weights[i, j])}"
        )
    return lines + [_bias_update_line(page, k, entry) for entry in _bias_entries(page, k)]


def update_section(page: _Page) -> Section:
    lines = []
    for k in range(len(page.config.layers)):
        lines += _update_lines(page, k)
    return Section("Step 4: update (one step of gradient descent)", [Lines(lines)])


def _final_parameter_lines(page: _Page, k: int) -> list[str]:
    layer, layer_trace = page.config.layers[k], page.trace.layers[k]
    lines = [
        f"{page.names.weight(k, i, j)} = {computed(layer_trace.final_weights[i, j])}"
        for i, j in np.ndindex(layer.weights.shape)
    ]
    return lines + [
        f"{entry.name} = {computed(layer_trace.final_bias[entry.position])}"
        for entry in _bias_entries(page, k)
    ]


def training_section(page: _Page) -> Section:
    trace = page.trace
    rows = [[str(step), computed(value)] for step, value in enumerate(trace.history)]
    if len(rows) > 22:  # keep the table readable: the first and last steps
        rows = rows[:11] + [["...", "..."]] + rows[-10:]
    worst = float(np.nanmax(trace.step_rel_errors)) if trace.step_rel_errors.size else 0.0
    lines = []
    for k in range(len(page.config.layers)):
        lines += _final_parameter_lines(page, k)
    return Section(
        f"Training for {trace.steps} steps",
        [
            Paragraph(
                f"Loss after each of {trace.steps} full-batch steps (step 0 = before "
                f"training); every step's manual gradients were checked against jax.grad "
                f"(worst leaf relative error {worst:.2e})."
            ),
            Table(["step", "E_total"], rows),
            Subtitle(f"Parameters after {trace.steps} steps"),
            Lines(lines),
        ],
    )


# --------------------------------------------------------------------------------------------
# The check, the errata
# --------------------------------------------------------------------------------------------


def _gradient_row(name: str, manual, autodiff) -> list[str]:
    return [
        name,
        f"{float(manual):.10f}",
        f"{float(autodiff):.10f}",
        f"{abs(manual - autodiff):.1e}",
    ]


def _gradient_rows(page: _Page, k: int) -> list[list[str]]:
    layer, layer_trace = page.config.layers[k], page.trace.layers[k]
    rows = [
        _gradient_row(
            page.names.weight(k, i, j),
            layer_trace.grad_weights[i, j],
            layer_trace.autodiff_weights[i, j],
        )
        for i, j in np.ndindex(layer.weights.shape)
    ]
    return rows + [
        _gradient_row(
            entry.name,
            layer_trace.grad_bias[entry.position],
            layer_trace.autodiff_bias[entry.position],
        )
        for entry in _bias_entries(page, k)
    ]


def autodiff_section(page: _Page) -> Section:
    blocks: list[Block] = [
        Paragraph(
            f"jax.grad of the same loss gives the same gradients: "
            f"max |manual - jax.grad| = {page.trace.autodiff_max_abs_diff:.3e} over "
            f"all parameters (float64)."
        )
    ]
    parameters = sum(layer.weights.size + layer.bias.size for layer in page.config.layers)
    if parameters <= MAX_TABLE_PARAMS:
        rows = []
        for k in range(len(page.config.layers)):
            rows += _gradient_rows(page, k)
        blocks.append(Table(["parameter", "manual (chain rule)", "jax.grad", "|diff|"], rows))
    return Section("Check: jax.grad agrees", blocks)


def errata_section(errata: list[dict]) -> Section:
    rows = [
        [
            entry["quantity"],
            f"{entry['seed_states']:.4f}",
            f"{entry['correct']:.4f}",
            "yes" if entry["matches"] else "NO",
        ]
        for entry in errata
    ]
    wrong = sum(not entry["matches"] for entry in errata)
    return Section(
        "Errata: the seed's stated numbers",
        [
            Table(["quantity", "seed states", "correct", "matches"], rows),
            Paragraph(
                f"{wrong} of the {len(errata)} numbers the seed states are wrong: its "
                f"hidden-layer values are right, everything from in_o1 on is not. Its "
                f"in_h2 line also writes W2*i1 as 0.25*0.1 where W2 is 0.2 (the result it "
                f"states, 0.3275 = 0.2*0.1 + 0.15*0.05 + 0.3, is right)."
            ),
        ],
    )


def trace_document(trace) -> list[Section]:
    """Every section of ``trace`` (a :class:`~jaxbp.trace.Trace`), in order."""
    config = trace.config
    page = _Page(trace, config, trace.names, range(min(config.examples, MAX_EXAMPLES_SHOWN)))
    sections = [
        network_section(page),
        forward_section(page),
        error_section(page),
        backward_section(page),
        update_section(page),
    ]
    if trace.history is not None:
        sections.append(training_section(page))
    sections.append(autodiff_section(page))
    errata = trace.errata()
    if errata is not None:
        sections.append(errata_section(errata))
    return sections
