"""The worked example of a 1-D convolution: ``jaxbp trace --example conv``.

One example of length ``n`` slides a kernel of ``k`` taps with stride ``s`` (and padding,
dilation ``d``): output ``y_o = b + sum_j w_j * x_(o s + j d - lo)``. The trace prints which
input positions each kernel weight touched, the forward sums, then the chain rule:
``dE/dw_j = sum_o dE/dy_o * x_(o s + j d - lo)`` (the weight's gradient is one term per
position it touched), ``dE/db = sum_o dE/dy_o``, and the input gradient as the transposed
convolution ``dE/dx_i = sum over (o, j) that read x_i of dE/dy_o * w_j``. Every total is
:func:`jaxbp.Conv1D`'s own forward / backward; the terms are re-added and checked against it.

Names: ``x1..xn``, ``w1..wk``, ``y1..ym``, ``b``; with several channels ``x3.2`` is position 3
of channel 2, ``w1.2.1`` tap 1 from input channel 2 to output channel 1, ``y2.1`` output 2 of
channel 1.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .config import ConfigError
from .layer_traces import (
    TracedLayer,
    as_columns,
    check_section,
    checked_total,
    dict_of_lists,
    float64,
    layer_step,
    spec_layer,
    sum_line,
    traced_layer,
)
from .notation import computed, factor, given, given_factor
from .render import Lines, Paragraph, Section, Table

__all__ = ["EXAMPLE", "ConvGeometry", "conv_geometry", "trace_conv"]

# One input of length 5, one channel, kernel 3, stride 2: two outputs that share x3.
EXAMPLE = {
    "model": {"name": "Conv1D", "out_channels": 1, "kernel_size": 3, "stride": 2},
    "params": {"W": [[[0.5]], [[-1.0]], [[0.25]]], "b": [0.1]},
    "inputs": [1.0, 2.0, -1.0, 0.5, 3.0],
    "targets": [0.0, 1.0],
}
MAX_POSITIONS, MAX_CHANNELS = 32, 4  # beyond this the text is no longer a worked example


class ConvGeometry(NamedTuple):
    """Where the kernel reads: tap ``j`` of output ``o`` reads input ``o s + j d - lo``."""

    length: int
    in_channels: int
    out_channels: int
    taps: int
    stride: int
    dilation: int
    lo: int
    outputs: int

    def position(self, o: int, j: int) -> int:
        """The input position tap ``j`` of output ``o`` reads (outside ``0..n-1``: padding)."""
        return o * self.stride + j * self.dilation - self.lo

    def reads(self, o: int, j: int) -> bool:
        return 0 <= self.position(o, j) < self.length


def _pad_lo(padding, length: int, span: int, stride: int) -> int:
    """The zeros before the input, as :func:`jaxbp.Conv1D` pads (SAME: the odd one at the end)."""
    if isinstance(padding, str):
        if padding.upper() == "VALID":
            return 0
        total = max((-(-length // stride) - 1) * stride + span - length, 0)
        return total // 2
    if isinstance(padding, int):
        return padding
    first = padding[0]
    return first[0] if isinstance(first, (list, tuple)) else first


def conv_geometry(layer, x_shape, y_shape) -> ConvGeometry:
    """The geometry of ``layer`` (a Conv1D) on one example ``x_shape`` giving ``y_shape``."""
    config = dict(layer.config)
    taps, stride, dilation = config["kernel_size"], config["stride"], config["dilation"]
    first = lambda v: v[0] if isinstance(v, (list, tuple)) else v
    taps, stride, dilation = first(taps), first(stride), first(dilation)
    lo = _pad_lo(config["padding"], x_shape[0], (taps - 1) * dilation + 1, stride)
    return ConvGeometry(x_shape[0], x_shape[1], y_shape[1], taps, stride, dilation, lo, y_shape[0])


class _Names:
    def __init__(self, g: ConvGeometry):
        self.g = g

    def x(self, i: int, c: int) -> str:
        return f"x{i + 1}" if self.g.in_channels == 1 else f"x{i + 1}.{c + 1}"

    def w(self, j: int, ci: int, co: int) -> str:
        one = self.g.in_channels == 1 and self.g.out_channels == 1
        return f"w{j + 1}" if one else f"w{j + 1}.{ci + 1}.{co + 1}"

    def y(self, o: int, co: int) -> str:
        return f"y{o + 1}" if self.g.out_channels == 1 else f"y{o + 1}.{co + 1}"

    def t(self, o: int, co: int) -> str:
        return "t" + self.y(o, co)[1:]

    def b(self, co: int) -> str:
        return "b" if self.g.out_channels == 1 else f"b{co + 1}"


class _Page(NamedTuple):
    """What every section reads: geometry, names and the numbers (numpy, float64)."""

    g: ConvGeometry
    names: _Names
    x: np.ndarray
    w: np.ndarray
    b: np.ndarray
    t: np.ndarray
    y: np.ndarray
    dy: np.ndarray
    grads: dict  # the layer's backward: W, b, x
    autodiff: dict  # jax.grad: W, b, x
    loss: float


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


def _setup_section(page: _Page, layer) -> Section:
    g, n = page.g, page.names
    config = dict(layer.config)
    inputs = ", ".join(
        f"{n.x(i, c)} = {given(page.x[i, c])}"
        for i in range(g.length)
        for c in range(g.in_channels)
    )
    kernel = ", ".join(
        f"{n.w(j, ci, co)} = {given(page.w[j, ci, co])}" for j, ci, co in np.ndindex(page.w.shape)
    )
    bias = ", ".join(f"{n.b(co)} = {given(page.b[co])}" for co in range(g.out_channels))
    targets = ", ".join(
        f"{n.t(o, co)} = {given(page.t[o, co])}"
        for o in range(g.outputs)
        for co in range(g.out_channels)
    )
    where = (
        f"kernel {g.taps}, stride {g.stride}, padding {config['padding']!s}, "
        f"dilation {g.dilation}: output y_o reads x_(o-1)*{g.stride}+j*{g.dilation}"
        f"{f'-{g.lo}' if g.lo else ''} with weight w_j (positions 1-based; a position "
        f"outside 1..{g.length} is a padding zero)"
    )
    return Section(
        f"A Conv1D layer: {g.length} inputs, {g.outputs} outputs",
        [
            Lines(
                [
                    f"inputs: {inputs}",
                    f"kernel: {kernel}; {bias}",
                    f"targets: {targets}",
                    "loss E = 1/2 sum_o (y_o - t_o)^2",
                ]
            ),
            Paragraph(where),
        ],
    )


def _touch_rows(page: _Page) -> list:
    g, n = page.g, page.names
    rows = []
    for j in range(g.taps):
        outputs = [o for o in range(g.outputs) if g.reads(o, j)]
        padded = [o for o in range(g.outputs) if not g.reads(o, j)]
        weight = n.w(j, 0, 0) if g.in_channels == g.out_channels == 1 else f"w{j + 1}.*.*"
        touched = ", ".join(f"x{g.position(o, j) + 1}" for o in outputs) or "-"
        at = ", ".join(f"y{o + 1}" for o in outputs) or "-"
        if padded:
            at += f" (padding at {', '.join(f'y{o + 1}' for o in padded)})"
        rows.append([weight, touched, at])
    return rows


def touch_section(page: _Page) -> Section:
    return Section(
        "Which inputs each kernel weight touches",
        [
            Table(["weight", "input positions it touches", "for outputs"], _touch_rows(page)),
            Paragraph(
                "Every weight is shared by all outputs: its gradient adds one term per "
                "position it touched."
            ),
        ],
    )


def _read(page: _Page, o: int, j: int, ci: int) -> tuple[str, str, float]:
    """(symbol, number, value) of what tap ``j`` of output ``o`` reads from channel ``ci``."""
    if not page.g.reads(o, j):
        return "0", "0", 0.0
    i = page.g.position(o, j)
    return page.names.x(i, ci), given_factor(page.x[i, ci]), float(page.x[i, ci])


def _forward_line(page: _Page, o: int, co: int) -> str:
    g, n = page.g, page.names
    symbols, numbers, terms = [], [], []
    for j, ci in np.ndindex(g.taps, g.in_channels):
        symbol, number, value = _read(page, o, j, ci)
        symbols.append(f"{n.w(j, ci, co)}*{symbol}")
        numbers.append(f"{given_factor(page.w[j, ci, co])}*{number}")
        terms.append(page.w[j, ci, co] * value)
    total = checked_total([*terms, page.b[co]], page.y[o, co], f"forward {n.y(o, co)}")
    return (
        f"{n.y(o, co)} = {' + '.join(symbols)} + {n.b(co)} = {' + '.join(numbers)} + "
        f"{given_factor(page.b[co])} = {computed(total)}"
    )


def forward_section(page: _Page) -> Section:
    g = page.g
    lines = [_forward_line(page, o, co) for o in range(g.outputs) for co in range(g.out_channels)]
    return Section("Step 1: forward pass (Conv1D.forward)", [Lines(lines)])


def error_section(page: _Page) -> Section:
    g, n = page.g, page.names
    pairs = [(o, co) for o in range(g.outputs) for co in range(g.out_channels)]
    symbols = [f"1/2 ({n.y(o, co)} - {n.t(o, co)})^2" for o, co in pairs]
    numbers = [
        f"1/2 ({factor(page.y[o, co])} - {given_factor(page.t[o, co])})^2" for o, co in pairs
    ]
    terms = [0.5 * (page.y[o, co] - page.t[o, co]) ** 2 for o, co in pairs]
    line = sum_line("E", symbols, numbers, terms, page.loss, "the loss")
    return Section("Step 2: the error", [Lines([line])])


# --------------------------------------------------------------------------------------------
# Step 3: backward (Conv1D.backward)
# --------------------------------------------------------------------------------------------


def _output_gradient_lines(page: _Page) -> list[str]:
    g, n = page.g, page.names
    return [
        f"dE/d{n.y(o, co)} = {n.y(o, co)} - {n.t(o, co)} = {factor(page.y[o, co])} - "
        f"{given_factor(page.t[o, co])} = {computed(page.dy[o, co])}"
        for o in range(g.outputs)
        for co in range(g.out_channels)
    ]


def _weight_gradient_line(page: _Page, j: int, ci: int, co: int) -> str:
    g, n = page.g, page.names
    outputs = [o for o in range(g.outputs) if g.reads(o, j)]
    name = n.w(j, ci, co)
    total = checked_total(
        [page.dy[o, co] * page.x[g.position(o, j), ci] for o in outputs],
        page.grads["W"][j, ci, co],
        f"dE/d{name}",
    )
    if not outputs:
        return f"dE/d{name} = 0   ({name} only ever multiplied padding zeros)"
    symbols = " + ".join(f"dE/d{n.y(o, co)}*{n.x(g.position(o, j), ci)}" for o in outputs)
    numbers = " + ".join(
        f"{factor(page.dy[o, co])}*{given_factor(page.x[g.position(o, j), ci])}" for o in outputs
    )
    return f"dE/d{name} = {symbols} = {numbers} = {computed(total)}"


def _bias_gradient_line(page: _Page, co: int) -> str:
    g, n = page.g, page.names
    total = checked_total(page.dy[:, co], page.grads["b"][co], f"dE/d{n.b(co)}")
    symbols = " + ".join(f"dE/d{n.y(o, co)}" for o in range(g.outputs))
    numbers = " + ".join(factor(page.dy[o, co]) for o in range(g.outputs))
    return (
        f"dE/d{n.b(co)} = {symbols} = {numbers} = {computed(total)}   (b is added to every output)"
    )


def _readers(g: ConvGeometry, i: int) -> list[tuple[int, int]]:
    """The (output, tap) pairs that read input position ``i``."""
    return [(o, j) for o in range(g.outputs) for j in range(g.taps) if g.position(o, j) == i]


def _input_gradient_line(page: _Page, i: int, ci: int) -> str:
    g, n = page.g, page.names
    readers = [(o, j, co) for o, j in _readers(g, i) for co in range(g.out_channels)]
    name = n.x(i, ci)
    total = checked_total(
        [page.dy[o, co] * page.w[j, ci, co] for o, j, co in readers],
        page.grads["x"][i, ci],
        f"dE/d{name}",
    )
    if not readers:
        return f"dE/d{name} = 0   (no window reads {name}: the stride steps over it)"
    symbols = " + ".join(f"dE/d{n.y(o, co)}*{n.w(j, ci, co)}" for o, j, co in readers)
    numbers = " + ".join(
        f"{factor(page.dy[o, co])}*{given_factor(page.w[j, ci, co])}" for o, j, co in readers
    )
    return f"dE/d{name} = {symbols} = {numbers} = {computed(total)}"


def _transposed_paragraph(page: _Page) -> Paragraph:
    g = page.g
    text = (
        "dE/dx is the transposed convolution: each dE/dy_o flows back to the inputs its "
        "window read, times the weight that read them; an input read by two windows sums "
        "both."
    )
    front = g.taps - 1 - g.lo
    if g.in_channels == g.out_channels == 1 and g.dilation == 1 and front >= 0:
        spread = []
        for o in range(g.outputs):
            spread += [computed(page.dy[o, 0])] + ["0"] * (g.stride - 1 if o < g.outputs - 1 else 0)
        back = g.length + g.taps - 1 - len(spread) - front
        flipped = ", ".join(f"w{j + 1}" for j in reversed(range(g.taps)))
        text += (
            f" Written as a convolution: dE/dy with {g.stride - 1} zeros between entries "
            f"[{', '.join(spread)}], padded by {front} zeros in front and {back} behind, "
            f"slid under the flipped kernel [{flipped}]: one dE/dx per position."
        )
    return Paragraph(text)


def backward_section(page: _Page) -> Section:
    g = page.g
    weights = [
        _weight_gradient_line(page, j, ci, co)
        for j, ci, co in np.ndindex(g.taps, g.in_channels, g.out_channels)
    ]
    inputs = [_input_gradient_line(page, i, ci) for i, ci in np.ndindex(g.length, g.in_channels)]
    return Section(
        "Step 3: backward pass (Conv1D.backward)",
        [
            Paragraph(
                "The loss's gradient at each output, then the chain rule into each shared "
                "weight: dE/dw_j = sum over outputs o of dE/dy_o * (the input w_j read for "
                "y_o)."
            ),
            Lines(
                _output_gradient_lines(page)
                + weights
                + [_bias_gradient_line(page, co) for co in range(g.out_channels)]
            ),
            _transposed_paragraph(page),
            Lines(inputs),
        ],
    )


# --------------------------------------------------------------------------------------------
# The trace
# --------------------------------------------------------------------------------------------


def _check_rows(page: _Page) -> list:
    g, n = page.g, page.names
    rows = [
        (f"dE/d{n.w(j, ci, co)}", page.grads["W"][j, ci, co], page.autodiff["W"][j, ci, co])
        for j, ci, co in np.ndindex(page.w.shape)
    ]
    rows += [
        (f"dE/d{n.b(co)}", page.grads["b"][co], page.autodiff["b"][co])
        for co in range(g.out_channels)
    ]
    return rows + [
        (f"dE/d{n.x(i, ci)}", page.grads["x"][i, ci], page.autodiff["x"][i, ci])
        for i, ci in np.ndindex(page.x.shape)
    ]


def _inputs_layout(value: np.ndarray) -> np.ndarray:
    """A plain list is one channel: ``(length,) -> (length, 1)``."""
    return as_columns(
        value, "Conv1D traces one example: inputs of shape (length,) or (length, channels)"
    )


def _checked_size(layer, x: np.ndarray) -> None:
    out_channels = dict(layer.config)["out_channels"]
    if x.shape[0] > MAX_POSITIONS or max(x.shape[1], out_channels) > MAX_CHANNELS:
        raise ConfigError(
            f"trace file: a Conv1D trace prints every number; expected at most "
            f"{MAX_POSITIONS} positions and {MAX_CHANNELS} channels, got inputs "
            f"of shape {x.shape} and {out_channels} output channels"
        )


def _page(spec: dict, example: dict):
    layer, x, params = spec_layer(spec, example, _inputs_layout, _checked_size)
    step = layer_step(layer, params, x, spec, example, _inputs_layout)
    g = conv_geometry(layer, x.shape, step.y.shape)
    w, b = float64(params["W"]), float64(params["b"])
    page = _Page(
        g, _Names(g), x, w, b, step.t, step.y, step.dy, step.grads, step.autodiff, step.loss
    )
    return layer, page


def _numbers(page: _Page) -> dict:
    g = page.g
    touches = {
        f"w{j + 1}": [g.position(o, j) + 1 for o in range(g.outputs) if g.reads(o, j)]
        for j in range(g.taps)
    }
    windows = [
        [[j + 1, g.position(o, j) + 1] for j in range(g.taps) if g.reads(o, j)]
        for o in range(g.outputs)
    ]
    return {
        "forward": {"y": page.y.tolist()},
        "loss": page.loss,
        "gradients": {"y": page.dy.tolist(), **dict_of_lists(page.grads)},
        "touches": touches,
        "windows": windows,
    }


def trace_conv(spec: dict, example: dict = EXAMPLE) -> TracedLayer:
    """Trace one step of the Conv1D a trace file describes (see :mod:`jaxbp.trace.layer_traces`)."""
    import jax

    with jax.enable_x64(True):
        layer, page = _page(spec, example)
    sections = [
        _setup_section(page, layer),
        touch_section(page),
        forward_section(page),
        error_section(page),
        backward_section(page),
        check_section(_check_rows(page)),
    ]
    params = {"W": page.w, "b": page.b}
    return traced_layer("conv", layer, page, params, sections, _numbers(page))
