"""The worked example of backpropagation through time: ``jaxbp trace --example gru``.

A tiny :func:`jaxbp.GRU` (3 time steps of one input, hidden 2, the loss on the last output)
unrolled: the forward states of every step (the gates ``r, z, n`` and ``h_t``), then ``dE/dh``
flowing back through each step with its factors (the direct path ``dh_t * z`` and the path
through the gates ``dah @ Wh^T``), and the gradient of each shared weight as the sum of its
per-step terms.

The layer's own forward gives ``h, r, z, n`` and ``ahn = h_{t-1} Whn + bhn`` (its cache) and
its own backward the totals; the per-step gradients (``dE/dh_t``, ``dE/da`` of each gate), which
the layer's backward keeps inside its reverse scan, are worked here from its docstring's formulas,
and their per-step terms must add up to the layer's totals (checked, as every printed sum is).

Names: ``x2.1`` is input feature 1 at step 2, ``h2.1`` hidden unit 1 after step 2 (``h0`` is the
zero initial state); ``ar2.1 = x_2 Wir + bir + h_1 Whr + bhr`` is the ``r`` gate's pre-activation
(likewise ``az``; ``an = x Win + bin + r * ahn``). ``Wir[c][a]`` joins input ``c`` to unit ``a``
of the ``r`` gate (PyTorch's ``W_ir``, transposed); ``Whn[b][a]`` joins ``h.b`` to ``n``'s unit
``a``. Targets: ``t1, t2`` for the last output, ``t2.1`` per step with ``return_sequences``.
"""

from __future__ import annotations

import functools
import json
import math
from typing import Any, NamedTuple

import numpy as np

from .config import ConfigError
from .layer_traces import (
    TracedLayer,
    as_columns,
    check_section,
    checked_total,
    dict_of_lists,
    float64,
    half_sse,
    spec_data,
    spec_layer,
    sum_line,
    traced_layer,
)
from .notation import computed, factor, given, given_factor, logistic
from .render import Block, Lines, Paragraph, Section, Subtitle, Table

__all__ = ["EXAMPLE", "GATES", "trace_gru"]

# Three steps of one input, hidden 2, the loss on the final state only (the example).
EXAMPLE = {
    "model": {"name": "GRU", "hidden": 2, "return_sequences": False},
    "params": {
        "Wi": [[0.5, -0.4, 0.3, 0.6, 0.8, -0.7]],
        "Wh": [[0.2, -0.1, 0.4, 0.1, 0.5, -0.3], [0.3, 0.2, -0.2, 0.5, 0.1, 0.6]],
        "bi": [0.1, 0.0, -0.1, 0.2, 0.0, 0.1],
        "bh": [0.0, 0.1, 0.1, 0.0, -0.2, 0.1],
    },
    "inputs": [1.0, -0.5, 2.0],
    "targets": [0.5, -0.5],
}
GATES = ("r", "z", "n")  # PyTorch's order: the thirds of Wi, Wh, bi, bh
MAX_STEPS, MAX_HIDDEN, MAX_FEATURES = 6, 3, 3


class _Page(NamedTuple):
    """The numbers (numpy float64), rows indexed by step (0-based: row 0 is step 1)."""

    params: dict
    x: np.ndarray  # (T, in)
    t: np.ndarray  # targets: (H,) or (T, H) with return_sequences
    h: np.ndarray  # (T + 1, H): h0 = 0, then h1..hT (the layer's states)
    r: np.ndarray  # (T, H), likewise z, n
    z: np.ndarray
    n: np.ndarray
    ahn: np.ndarray  # h_{t-1} Whn + bhn (the layer's cache)
    y: np.ndarray
    dy: np.ndarray  # dE/dy = y - t
    sequences: bool  # return_sequences: a loss term at every step
    dh: np.ndarray  # (T, H) dE/dh_t, everything that reaches h_t
    dar: np.ndarray  # (T, H) dE/d(pre-activation), per gate; dahn = dan * r
    daz: np.ndarray
    dan: np.ndarray
    dahn: np.ndarray
    grads: dict  # the layer's backward: Wi, Wh, bi, bh, x
    autodiff: dict
    loss: float

    @property
    def steps(self) -> int:
        return self.x.shape[0]

    @property
    def hidden(self) -> int:
        return self.r.shape[1]

    @property
    def features(self) -> int:
        return self.x.shape[1]

    def dax(self) -> dict:
        """The gradient of each gate's input projection ``x Wi + bi``, per step."""
        return {"r": self.dar, "z": self.daz, "n": self.dan}

    def dah(self) -> dict:
        """The gradient of each gate's hidden projection ``h Wh + bh``, per step."""
        return {"r": self.dar, "z": self.daz, "n": self.dahn}


def _n(symbol: str, step: int, a: int) -> str:
    """``h2.1``: ``symbol`` at step ``step`` (1-based; ``h0`` the initial state), unit ``a``."""
    return f"{symbol}{step}.{a + 1}"


def _w(kind: str, gate: str, row: int, a: int) -> str:
    return f"W{kind}{gate}[{row + 1}][{a + 1}]"


def _b(kind: str, gate: str, a: int) -> str:
    return f"b{kind}{gate}[{a + 1}]"


def _column(page: _Page, gate: str, a: int) -> int:
    return GATES.index(gate) * page.hidden + a


# --------------------------------------------------------------------------------------------
# Step 1: forward, one time step at a time
# --------------------------------------------------------------------------------------------


def _projection(page: _Page, gate: str, s: int, a: int, with_hidden: bool) -> tuple:
    """(symbols, numbers, terms) of ``x_s W_i + b_i`` (and ``+ h_(s-1) W_h + b_h``) for one
    unit ``a`` of ``gate``; ``s`` is the 1-based step."""
    p, col, features = page.params, _column(page, gate, a), range(page.features)
    symbols = [f"{_n('x', s, c)}*{_w('i', gate, c, a)}" for c in features] + [_b("i", gate, a)]
    numbers = [
        f"{given_factor(page.x[s - 1, c])}*{given_factor(p['Wi'][c, col])}" for c in features
    ] + [given_factor(p["bi"][col])]
    terms = [page.x[s - 1, c] * p["Wi"][c, col] for c in features] + [p["bi"][col]]
    if with_hidden:
        units = range(page.hidden)
        symbols += [f"{_n('h', s - 1, b)}*{_w('h', gate, b, a)}" for b in units]
        symbols.append(_b("h", gate, a))
        numbers += [f"{factor(page.h[s - 1, b])}*{given_factor(p['Wh'][b, col])}" for b in units]
        numbers.append(given_factor(p["bh"][col]))
        terms += [page.h[s - 1, b] * p["Wh"][b, col] for b in units] + [p["bh"][col]]
    return symbols, numbers, terms


def _sigmoid_gate_lines(page: _Page, gate: str, s: int, a: int) -> list[str]:
    symbols, numbers, terms = _projection(page, gate, s, a, with_hidden=True)
    pre = float(np.sum(terms))
    out = getattr(page, gate)[s - 1, a]
    checked_total([logistic(pre)], out, f"{_n(gate, s, a)} (sigmoid of the printed sum)")
    name = _n("a" + gate, s, a)
    return [
        f"{name} = {' + '.join(symbols)} = {' + '.join(numbers)} = {computed(pre)}",
        f"{_n(gate, s, a)} = sigmoid({name}) = 1/(1+e^-{factor(pre)}) = {computed(out)}",
    ]


def _candidate_lines(page: _Page, s: int, a: int) -> list[str]:
    p, col, units = page.params, _column(page, "n", a), range(page.hidden)
    ahn = sum_line(
        _n("ahn", s, a),
        [f"{_n('h', s - 1, b)}*{_w('h', 'n', b, a)}" for b in units] + [_b("h", "n", a)],
        [f"{factor(page.h[s - 1, b])}*{given_factor(p['Wh'][b, col])}" for b in units]
        + [given_factor(p["bh"][col])],
        [page.h[s - 1, b] * p["Wh"][b, col] for b in units] + [p["bh"][col]],
        page.ahn[s - 1, a],
        _n("ahn", s, a),
    )
    symbols, numbers, terms = _projection(page, "n", s, a, with_hidden=False)
    symbols.append(f"{_n('r', s, a)}*{_n('ahn', s, a)}")
    numbers.append(f"{factor(page.r[s - 1, a])}*{factor(page.ahn[s - 1, a])}")
    terms.append(page.r[s - 1, a] * page.ahn[s - 1, a])
    pre = float(np.sum(terms))
    checked_total([math.tanh(pre)], page.n[s - 1, a], f"{_n('n', s, a)} (tanh of the sum)")
    name = _n("an", s, a)
    return [
        ahn,
        f"{name} = {' + '.join(symbols)} = {' + '.join(numbers)} = {computed(pre)}",
        f"{_n('n', s, a)} = tanh({name}) = tanh({computed(pre)}) = {computed(page.n[s - 1, a])}",
    ]


def _state_line(page: _Page, s: int, a: int) -> str:
    z, n, h_prev = page.z[s - 1, a], page.n[s - 1, a], page.h[s - 1, a]
    checked_total([(1 - z) * n, z * h_prev], page.h[s, a], _n("h", s, a))
    return (
        f"{_n('h', s, a)} = (1 - {_n('z', s, a)})*{_n('n', s, a)} + {_n('z', s, a)}*"
        f"{_n('h', s - 1, a)} = (1 - {computed(z)})*{factor(n)} + {computed(z)}*"
        f"{factor(h_prev)} = {computed(page.h[s, a])}"
    )


def _step_forward_lines(page: _Page, s: int) -> list[str]:
    lines = []
    for gate in ("r", "z"):
        for a in range(page.hidden):
            lines += _sigmoid_gate_lines(page, gate, s, a)
    for a in range(page.hidden):
        lines += _candidate_lines(page, s, a)
    return lines + [_state_line(page, s, a) for a in range(page.hidden)]


def _vector(values) -> str:
    return "[" + ", ".join(computed(v) for v in values) + "]"


def forward_section(page: _Page) -> Section:
    blocks: list[Block] = [
        Paragraph(
            "Each step reads x_t and the previous state h_(t-1) through the same "
            "weights: r = sigmoid(ar), z = sigmoid(az), n = tanh(an) with "
            "an = x Win + bin + r * (h Whn + bhn), then h_t = (1 - z) n + z h_(t-1)."
        )
    ]
    for s in range(1, page.steps + 1):
        blocks += [
            Subtitle(f"Time step {s}: reads x{s} and h{s - 1}"),
            Lines(_step_forward_lines(page, s)),
        ]
    rows = [
        [
            f"{s}",
            _vector(page.x[s - 1]),
            _vector(page.r[s - 1]),
            _vector(page.z[s - 1]),
            _vector(page.n[s - 1]),
            _vector(page.h[s]),
        ]
        for s in range(1, page.steps + 1)
    ]
    blocks += [Subtitle("The forward states"), Table(["step", "x", "r", "z", "n", "h"], rows)]
    return Section("Step 1: forward pass through time (GRU.forward)", blocks)


# --------------------------------------------------------------------------------------------
# Step 2: the error
# --------------------------------------------------------------------------------------------


def _output_names(page: _Page) -> list[tuple]:
    """``(index into y, output symbol, target symbol)`` of every output the loss sees."""
    units = range(page.hidden)
    if page.sequences:
        return [
            ((s - 1, a), _n("h", s, a), _n("t", s, a))
            for s in range(1, page.steps + 1)
            for a in units
        ]
    return [((a,), _n("h", page.steps, a), f"t{a + 1}") for a in units]


def error_section(page: _Page) -> Section:
    outputs = _output_names(page)
    terms = [0.5 * (page.y[i] - page.t[i]) ** 2 for i, _, _ in outputs]
    line = sum_line(
        "E",
        [f"1/2 ({y} - {t})^2" for _, y, t in outputs],
        [f"1/2 ({factor(page.y[i])} - {given_factor(page.t[i])})^2" for i, _, _ in outputs],
        terms,
        page.loss,
        "E",
    )
    where = (
        "every step's output h_t"
        if page.sequences
        else f"the last output h{page.steps} only: earlier steps get their gradient through time"
    )
    return Section(
        "Step 2: the error (E = 1/2 sum (y - target)^2)",
        [Paragraph(f"The loss reads {where}."), Lines([line])],
    )


# --------------------------------------------------------------------------------------------
# Step 3: backpropagation through time
# --------------------------------------------------------------------------------------------


def _through_gates(page: _Page, s: int, b: int) -> tuple:
    """(symbols, numbers, terms) of what step ``s`` sends back to ``h_(s-1).b``: the direct path
    ``dh_s.b * z_s.b`` and the paths through the gates ``sum_a dE/dah_s.a * Wh[b][a]``."""
    p, i = page.params, s - 1
    symbols = [f"dE/d{_n('h', s, b)}*{_n('z', s, b)}"]
    numbers = [f"{factor(page.dh[i, b])}*{factor(page.z[i, b])}"]
    terms = [page.dh[i, b] * page.z[i, b]]
    for gate, grad in page.dah().items():
        for a in range(page.hidden):
            col = _column(page, gate, a)
            symbols.append(
                f"dE/d{_n('a' + gate if gate != 'n' else 'ahn', s, a)}*{_w('h', gate, b, a)}"
            )
            numbers.append(f"{factor(grad[i, a])}*{given_factor(p['Wh'][b, col])}")
            terms.append(grad[i, a] * p["Wh"][b, col])
    return symbols, numbers, terms


def _dh_line(page: _Page, s: int, b: int) -> str:
    """``dE/dh_s.b``: the loss's own term (if the loss reads h_s) plus what step s+1 sent."""
    symbols, numbers, terms = [], [], []
    if page.sequences or s == page.steps:
        index = (s - 1, b) if page.sequences else (b,)
        target = _n("t", s, b) if page.sequences else f"t{b + 1}"
        symbols.append(f"({_n('h', s, b)} - {target})")
        numbers.append(f"({factor(page.y[index])} - {given_factor(page.t[index])})")
        terms.append(page.dy[index])
    if s < page.steps:
        more = _through_gates(page, s + 1, b)
        symbols, numbers, terms = symbols + more[0], numbers + more[1], terms + more[2]
    return sum_line(
        f"dE/d{_n('h', s, b)}", symbols, numbers, terms, page.dh[s - 1, b], f"dE/d{_n('h', s, b)}"
    )


def _factor_lines(page: _Page, s: int, a: int) -> list[str]:
    i = s - 1
    dh, z, n, r = page.dh[i, a], page.z[i, a], page.n[i, a], page.r[i, a]
    h_prev, ahn = page.h[i, a], page.ahn[i, a]
    name = lambda symbol: _n(symbol, s, a)
    checks = (
        (dh * (1 - z) * (1 - n * n), page.dan[i, a]),
        (dh * (h_prev - n) * z * (1 - z), page.daz[i, a]),
        (page.dan[i, a] * ahn * r * (1 - r), page.dar[i, a]),
        (page.dan[i, a] * r, page.dahn[i, a]),
    )
    for value, worked in checks:
        checked_total([value], worked, f"a factor line at step {s}")
    return [
        f"dE/d{name('an')} = dE/d{name('h')}*(1 - {name('z')})*(1 - {name('n')}^2) = "
        f"{factor(dh)}*(1 - {computed(z)})*(1 - {factor(n)}^2) = {computed(page.dan[i, a])}",
        f"dE/d{name('az')} = dE/d{name('h')}*({_n('h', s - 1, a)} - {name('n')})*{name('z')}*"
        f"(1 - {name('z')}) = {factor(dh)}*({computed(h_prev)} - {factor(n)})*{computed(z)}*"
        f"(1 - {computed(z)}) = {computed(page.daz[i, a])}",
        f"dE/d{name('ar')} = dE/d{name('an')}*{name('ahn')}*{name('r')}*(1 - {name('r')}) = "
        f"{factor(page.dan[i, a])}*{factor(ahn)}*{computed(r)}*(1 - {computed(r)}) = "
        f"{computed(page.dar[i, a])}",
        f"dE/d{name('ahn')} = dE/d{name('an')}*{name('r')} = {factor(page.dan[i, a])}*"
        f"{computed(r)} = {computed(page.dahn[i, a])}",
    ]


def backward_section(page: _Page) -> Section:
    blocks: list[Block] = [
        Paragraph(
            "Backpropagation through time: the steps in reverse. dE/dh_t is what the loss puts on "
            "h_t plus what step t+1 sends back, along the direct path dE/dh_(t+1) * z_(t+1) and "
            "through the gates, dE/dah_(t+1) @ Wh^T with dah = [dar, daz, dahn]. Then each step's "
            "gates: dan = dh (1 - z)(1 - n^2), daz = dh (h_(t-1) - n) z (1 - z), "
            "dar = dan ahn r (1 - r), dahn = dan r."
        )
    ]
    for s in range(page.steps, 0, -1):
        title = (
            f"Time step {s}: dE/dh{s} from the loss"
            if s == page.steps
            else f"Time step {s}: dE/dh{s} flows back from step {s + 1}"
        )
        lines = [_dh_line(page, s, b) for b in range(page.hidden)]
        for a in range(page.hidden):
            lines += _factor_lines(page, s, a)
        blocks += [Subtitle(title), Lines(lines)]
    blocks.append(
        Paragraph(
            "h0 is the fixed zero state: what step 1 sends back to it is not used (dE/dh0 is "
            "nobody's gradient)."
        )
    )
    return Section("Step 3: backward pass through time (GRU.backward)", blocks)


# --------------------------------------------------------------------------------------------
# Step 4: the shared weights, each the sum of its per-step terms
# --------------------------------------------------------------------------------------------


def _grad_symbol(gate: str, kind: str, s: int, a: int) -> str:
    """The gradient a weight of ``kind`` (``i`` or ``h``) of ``gate`` multiplies at step s."""
    if gate == "n":
        return f"dE/d{_n('an' if kind == 'i' else 'ahn', s, a)}"
    return f"dE/d{_n('a' + gate, s, a)}"


def _weight_lines(page: _Page, kind: str) -> list[str]:
    """``dE/dW[row][a] = sum_s source_s.row * dE/da_s.a``, checked against the layer's total."""
    sources, rows = (page.x, page.features) if kind == "i" else (page.h[:-1], page.hidden)
    source = "x" if kind == "i" else "h"
    offset = 1 if kind == "i" else 0  # x1 is read at step 1; h0 at step 1
    grads, total = (page.dax() if kind == "i" else page.dah()), page.grads["W" + kind]
    show = given_factor if kind == "i" else factor  # x is given, h computed
    lines, steps = [], range(1, page.steps + 1)
    for gate in GATES:
        for row, a in np.ndindex(rows, page.hidden):
            col, g = _column(page, gate, a), grads[gate]
            lines.append(
                sum_line(
                    f"dE/d{_w(kind, gate, row, a)}",
                    [
                        f"{_n(source, s - 1 + offset, row)}*{_grad_symbol(gate, kind, s, a)}"
                        for s in steps
                    ],
                    [f"{show(sources[s - 1, row])}*{factor(g[s - 1, a])}" for s in steps],
                    [sources[s - 1, row] * g[s - 1, a] for s in steps],
                    total[row, col],
                    f"dE/d{_w(kind, gate, row, a)}",
                )
            )
    return lines


def _bias_lines(page: _Page, kind: str) -> list[str]:
    grads, total, steps = (
        (page.dax() if kind == "i" else page.dah()),
        page.grads["b" + kind],
        range(1, page.steps + 1),
    )
    return [
        sum_line(
            f"dE/d{_b(kind, gate, a)}",
            [_grad_symbol(gate, kind, s, a) for s in steps],
            [factor(grads[gate][s - 1, a]) for s in steps],
            grads[gate][:, a],
            total[_column(page, gate, a)],
            f"dE/d{_b(kind, gate, a)}",
        )
        for gate in GATES
        for a in range(page.hidden)
    ]


def _input_lines(page: _Page) -> list[str]:
    lines, wi = [], page.params["Wi"]
    for s, c in np.ndindex(page.steps, page.features):
        triples = [(gate, a) for gate in GATES for a in range(page.hidden)]
        lines.append(
            sum_line(
                f"dE/d{_n('x', s + 1, c)}",
                [f"{_grad_symbol(g, 'i', s + 1, a)}*{_w('i', g, c, a)}" for g, a in triples],
                [
                    f"{factor(page.dax()[g][s, a])}*{given_factor(wi[c, _column(page, g, a)])}"
                    for g, a in triples
                ],
                [page.dax()[g][s, a] * wi[c, _column(page, g, a)] for g, a in triples],
                page.grads["x"][s, c],
                f"dE/d{_n('x', s + 1, c)}",
            )
        )
    return lines


def shared_weights_section(page: _Page) -> Section:
    return Section(
        "Step 4: the shared weights, each the sum of its per-step terms",
        [
            Paragraph(
                "Every step uses the same Wi, Wh, bi, bh, so each gradient is a sum over the "
                "steps of what that step contributed (the layer's backward does each sum as "
                "one matmul after its reverse scan; every total here is the layer's)."
            ),
            Subtitle("Hidden weights: dE/dWh[b][a] = sum_t h_(t-1).b * dE/dah_t.a"),
            Lines(_weight_lines(page, "h")),
            Subtitle(
                "Input weights: dE/dWi[c][a] = sum_t x_t.c * dE/dax_t.a (dax = [dar, daz, dan])"
            ),
            Lines(_weight_lines(page, "i")),
            Subtitle("Biases: dE/dbi = sum_t dax_t, dE/dbh = sum_t dah_t"),
            Lines(_bias_lines(page, "i") + _bias_lines(page, "h")),
            Subtitle("Inputs: dE/dx_t = dax_t @ Wi^T (each step's own, nothing summed over time)"),
            Lines(_input_lines(page)),
        ],
    )


# --------------------------------------------------------------------------------------------
# The trace
# --------------------------------------------------------------------------------------------


def _setup_section(page: _Page) -> Section:
    p, h = page.params, page.hidden
    inputs = "; ".join(
        ", ".join(f"{_n('x', s + 1, c)} = {given(page.x[s, c])}" for c in range(page.features))
        for s in range(page.steps)
    )
    if page.sequences:
        targets = "; ".join(
            ", ".join(f"{_n('t', s + 1, a)} = {given(page.t[s, a])}" for a in range(h))
            for s in range(page.steps)
        )
    else:
        targets = ", ".join(f"t{a + 1} = {given(page.t[a])}" for a in range(h))
    lines = [
        f"inputs: {inputs}",
        f"targets: {targets}",
        f"initial state: {', '.join(f'h0.{a + 1} = 0' for a in range(h))}",
    ]
    for kind, rows in (("i", page.features), ("h", h)):
        for gate in GATES:
            lines.append(
                ", ".join(
                    f"{_w(kind, gate, row, a)} = "
                    f"{given(p['W' + kind][row, _column(page, gate, a)])}"
                    for row, a in np.ndindex(rows, h)
                )
            )
    for kind in ("i", "h"):
        bias = p["b" + kind]
        lines.append(
            ", ".join(
                f"{_b(kind, gate, a)} = {given(bias[_column(page, gate, a)])}"
                for gate in GATES
                for a in range(h)
            )
        )
    output = "every h_t" if page.sequences else f"h{page.steps} (return_sequences=False)"
    return Section(
        f"A GRU unrolled over {page.steps} time steps: {page.features} input(s), hidden {h}",
        [
            Lines([*lines, f"output: {output}; loss E = 1/2 sum (y - target)^2"]),
            Paragraph(
                "Wi and Wh hold the r, z, n gates side by side (PyTorch's "
                "order): Wir is Wi's first third, Wiz its second, Win its "
                "third."
            ),
        ],
    )


def _check_rows(page: _Page) -> list:
    rows = []
    for kind, count in (("i", page.features), ("h", page.hidden)):
        for gate, row, a in ((g, r, a) for g in GATES for r, a in np.ndindex(count, page.hidden)):
            col = _column(page, gate, a)
            rows.append(
                (
                    f"dE/d{_w(kind, gate, row, a)}",
                    page.grads["W" + kind][row, col],
                    page.autodiff["W" + kind][row, col],
                )
            )
    for kind in ("i", "h"):
        rows += [
            (
                f"dE/d{_b(kind, gate, a)}",
                page.grads["b" + kind][_column(page, gate, a)],
                page.autodiff["b" + kind][_column(page, gate, a)],
            )
            for gate in GATES
            for a in range(page.hidden)
        ]
    return rows + [
        (f"dE/d{_n('x', s + 1, c)}", page.grads["x"][s, c], page.autodiff["x"][s, c])
        for s, c in np.ndindex(page.x.shape)
    ]


def _worked_gradients(numbers: dict, sequences: bool) -> dict:
    """dh, dar, daz, dan, dahn per step, by GRU.backward's docstring formulas (reverse order)."""
    r, z, n, ahn, h, wh = (numbers[k] for k in ("r", "z", "n", "ahn", "h", "Wh"))
    steps, hidden = r.shape
    worked = {key: np.zeros((steps, hidden)) for key in ("dh", "dar", "daz", "dan", "dahn")}
    sent_back = np.zeros(hidden)  # dh_next: nothing comes after the last step
    for i in reversed(range(steps)):
        own = numbers["dy"][i] if sequences else (numbers["dy"] if i == steps - 1 else 0.0)
        dh = own + sent_back
        dan = dh * (1 - z[i]) * (1 - n[i] ** 2)
        daz = dh * (h[i] - n[i]) * z[i] * (1 - z[i])
        dar = dan * ahn[i] * r[i] * (1 - r[i])
        dahn = dan * r[i]
        for key, value in (("dh", dh), ("dar", dar), ("daz", daz), ("dan", dan), ("dahn", dahn)):
            worked[key][i] = value
        sent_back = dh * z[i] + np.concatenate([dar, daz, dahn]) @ wh.T
    return worked


def _inputs_layout(value: np.ndarray) -> np.ndarray:
    """A plain list is one feature per step: ``(time,) -> (time, 1)``."""
    return as_columns(
        value, "the GRU trace follows one sequence: inputs of shape (time,) or (time, features)"
    )


def _checked(layer, x: np.ndarray) -> None:
    """Check the trace can print the layer on ``x``: forwards, and small enough."""
    config = dict(layer.config)
    if config["reverse"]:
        raise ConfigError(
            "trace file: the GRU trace reads the sequence forwards; expected "
            "reverse false, got true"
        )
    if x.shape[0] > MAX_STEPS or x.shape[1] > MAX_FEATURES or config["hidden"] > MAX_HIDDEN:
        raise ConfigError(
            f"trace file: a GRU trace prints every number; expected at most "
            f"{MAX_STEPS} steps of {MAX_FEATURES} features and hidden "
            f"{MAX_HIDDEN}, got inputs of shape {x.shape} and hidden "
            f"{config['hidden']}"
        )


def _layer_numbers(layer, params, x, t) -> tuple:
    """The layer's forward, its own backward of ``E = 1/2 sum (y - t)^2`` and jax.grad of the
    same loss, in one function (jitted: one compilation instead of one per operation)."""
    import jax

    y, cache = layer.forward(params, x)
    dy = y - t  # dE/dy
    dparams, dx = layer.backward(params, cache, dy)
    loss = lambda p, inputs: half_sse(layer.forward(p, inputs)[0], t)
    autodiff = jax.grad(loss, argnums=(0, 1))(params, x)
    return y, cache[1], dy, dparams, dx, autodiff


@functools.lru_cache(maxsize=32)
def _compiled(description: str):
    """:func:`_layer_numbers` of the described layer, jitted once per description."""
    import jax

    from ..model import build

    layer = build(json.loads(description))
    return jax.jit(lambda p, inputs, targets: _layer_numbers(layer, p, inputs, targets))


def _page(spec: dict, example: dict) -> tuple:
    import jax
    import jax.numpy as jnp

    from ..model import describe

    layer, x, params = spec_layer(spec, example, _inputs_layout, _checked)
    sequences = dict(layer.config)["return_sequences"]
    out_shape = jax.eval_shape(layer.forward, params, jnp.asarray(x))[0].shape
    t = spec_data(spec, example, "targets", expected=out_shape)
    run = _compiled(json.dumps(describe(layer), sort_keys=True))
    y, steps, dy, dparams, dx, (auto_params, auto_x) = run(params, jnp.asarray(x), jnp.asarray(t))
    hs, r, z, n, ahn = steps  # the layer's cache: time-major, a batch of one
    states = float64(hs)[:, 0]
    numbers: dict[str, Any] = {
        "params": {key: float64(value) for key, value in params.items()},
        "x": x,
        "t": t,
        "h": np.concatenate([np.zeros((1, states.shape[1])), states]),
        "r": float64(r)[:, 0],
        "z": float64(z)[:, 0],
        "n": float64(n)[:, 0],
        "ahn": float64(ahn)[:, 0],
        "y": float64(y),
        "dy": float64(dy),
    }
    worked = _worked_gradients({**numbers, "Wh": numbers["params"]["Wh"]}, sequences)
    grads = {**{key: float64(value) for key, value in dparams.items()}, "x": float64(dx)}
    autodiff = {**{key: float64(value) for key, value in auto_params.items()}, "x": float64(auto_x)}
    page = _Page(
        **numbers,
        sequences=sequences,
        **worked,
        grads=grads,
        autodiff=autodiff,
        loss=float(half_sse(numbers["y"], t)),
    )
    return layer, page


def _per_step_terms(page: _Page) -> dict:
    """Each step's contribution to each shared gradient (they sum to the layer's totals)."""
    dax = np.concatenate([page.dar, page.daz, page.dan], axis=1)
    dah = np.concatenate([page.dar, page.daz, page.dahn], axis=1)
    return {
        "Wi": np.einsum("tc,tg->tcg", page.x, dax),
        "Wh": np.einsum("tb,tg->tbg", page.h[:-1], dah),
        "bi": dax,
        "bh": dah,
    }


def _numbers(page: _Page) -> dict:
    forward = {"h": page.h[1:], "r": page.r, "z": page.z, "n": page.n, "ahn": page.ahn, "y": page.y}
    worked = {"h": page.dh, "ar": page.dar, "az": page.daz, "an": page.dan, "ahn": page.dahn}
    return {
        "forward": dict_of_lists(forward),
        "loss": page.loss,
        "gradients": {
            "y": page.dy.tolist(),
            **dict_of_lists(page.grads),
            "intermediate": dict_of_lists(worked),
            "per_step": dict_of_lists(_per_step_terms(page)),
        },
    }


def trace_gru(spec: dict, example: dict = EXAMPLE) -> TracedLayer:
    """Trace one step of backpropagation through time of the GRU a trace file describes."""
    import jax

    with jax.enable_x64(True):
        layer, page = _page(spec, example)
    sections = [
        _setup_section(page),
        forward_section(page),
        error_section(page),
        backward_section(page),
        shared_weights_section(page),
        check_section(_check_rows(page)),
    ]
    return traced_layer("gru", layer, page, page.params, sections, _numbers(page))
