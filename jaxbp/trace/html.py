"""A trace as one self-contained interactive HTML page: ``jaxbp trace --format html``.

The page holds the network (or layer) as an inline SVG picture with every forward value, and a
step-through of the trace: one line of the chain rule at a time, the quantity it explains
highlighted in the picture. Every number comes from the trace object that ``--format text`` and
``--format json`` render: the step lines are the text document's own lines, the values on the
picture and in the factor and check tables are the trace's arrays, and the page embeds
``to_json()`` verbatim (``<script id="trace-json">``), so the three formats cannot disagree.
No server, no CDN: CSS and JavaScript are inline and the page opens from ``file://``.
"""

from __future__ import annotations

import dataclasses
import html
import json
import math
import re
from typing import Any

import numpy as np

from .html_assets import PAGE_SCRIPT, PAGE_STYLE
from .notation import computed
from .render import Lines, Paragraph, Section, Subtitle, Table

__all__ = ["trace_html", "page_steps", "AGREEMENT_TOLERANCE"]

# manual and jax.grad agree when |diff| <= this * max(1, |manual|) (both float64)
AGREEMENT_TOLERANCE = 1e-9

# Sections that are the page's frame rather than steps of the computation.
_STATIC_TITLES = ("Check: jax.grad agrees", "Errata: the seed's stated numbers")


# --------------------------------------------------------------------------------------------
# Symbols in a line -> nodes of the picture
# --------------------------------------------------------------------------------------------

_TOKEN = re.compile(r"d[A-Za-z]\w*/d[\w.]+(?:\[\d+\])*|[A-Za-z_][\w.]*(?:\[\d+\])*")
_EXAMPLE_PREFIX = re.compile(r"^\[example \d+\] ")


def _node_ids(token: str, nodes: set) -> list[str]:
    """The picture's nodes a symbol of the text names: ``dE/dW7`` -> W7, ``in_h1`` -> h1,
    ``dout_o1/din_o1`` -> o1, ``W7_new`` -> W7, ``E_o1`` -> o1 and E; none if it names none."""
    token = token.rstrip(".")
    if token in nodes:
        return [token]
    if token.startswith("dE/d"):
        return _node_ids(token[4:], nodes)
    if "/" in token:  # a local derivative: dout_o1/din_o1, dp1/ds1 (a node of its own above)
        return _node_ids(token.split("/")[0][1:], nodes)
    if token.endswith("_new"):
        return _node_ids(token[: -len("_new")], nodes)
    if token == "E_total":
        return ["E"] if "E" in nodes else []
    for prefix in ("in_", "out_", "target_", "E_"):
        if token.startswith(prefix) and token[len(prefix) :] in nodes:
            found = [token[len(prefix) :]]
            return found + (["E"] if prefix == "E_" and "E" in nodes else [])
    return []


def _symbols(text: str, nodes: set) -> list[str]:
    found: list[str] = []
    for token in _TOKEN.findall(text):
        for node in _node_ids(token, nodes):
            if node not in found:
                found.append(node)
    return found


def _lhs(line: str) -> str:
    """The quantity a line computes: what stands before its first ``=``."""
    return _EXAMPLE_PREFIX.sub("", line.split(" = ")[0]).strip()


# --------------------------------------------------------------------------------------------
# Steps: the document's lines, one at a time
# --------------------------------------------------------------------------------------------


def _check_rows(sections: list[Section]) -> dict:
    """``{parameter: (manual, jax.grad)}`` from the check section's table (the same numbers the
    text prints; names without their ``dE/d``)."""
    rows: dict = {}
    for section in sections:
        if section.title != _STATIC_TITLES[0]:
            continue
        for block in section.blocks:
            if isinstance(block, Table):
                for name, manual, autodiff, _ in block.rows:
                    rows[name.removeprefix("dE/d")] = (float(manual), float(autodiff))
    return rows


def _check(name: str, manual: float, autodiff: float) -> dict:
    diff = abs(manual - autodiff)
    return {
        "name": name,
        "manual": manual,
        "autodiff": autodiff,
        "diff": diff,
        "agree": bool(diff <= AGREEMENT_TOLERANCE * max(1.0, abs(manual))),
        # written as the text's check table writes them
        "manual_text": f"{manual:.10f}",
        "autodiff_text": f"{autodiff:.10f}",
        "diff_text": f"{diff:.1e}",
    }


def page_steps(sections: list[Section], nodes: set, extra=None) -> list[dict]:
    """One step per formula line of the document's computing sections. Each step: ``section``
    (its title and subtitle), ``line``, ``note`` (a paragraph before it), ``focus`` (the nodes of
    the quantity it computes), ``touch`` (the nodes it reads) and, for a parameter's gradient,
    ``check`` (manual, jax.grad, their difference, whether they agree). ``extra(step)`` may add
    keys (the network's factors)."""
    checks = _check_rows(sections)
    steps: list[dict] = []
    for index, section in enumerate(sections):
        if index == 0 or section.title in _STATIC_TITLES:
            continue  # the set-up is the picture; the check and errata are tables
        subtitle, note = "", ""
        for block in section.blocks:
            if isinstance(block, Subtitle):
                subtitle = block.text
            elif isinstance(block, Paragraph):
                note = block.text
            elif isinstance(block, Lines):
                for line in block.lines:
                    lhs = _lhs(line)
                    step = {
                        "section": section.title + (f" / {subtitle}" if subtitle else ""),
                        "line": line,
                        "note": note,
                        "lhs": lhs,
                        "focus": _symbols(lhs, nodes),
                        "touch": _symbols(line.split(" = ", 1)[-1], nodes),
                    }
                    parameter = lhs.removeprefix("dE/d")
                    if lhs.startswith("dE/d") and parameter in checks:
                        step["check"] = _check(lhs, *checks[parameter])
                    if extra is not None:
                        extra(step)
                    steps.append(step)
                    note = ""
    return steps


# --------------------------------------------------------------------------------------------
# SVG pieces
# --------------------------------------------------------------------------------------------


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _value_attr(value: float) -> str:
    """The exact float (repr), for tests and for anyone reading the page's source."""
    return _e(repr(float(value)))


def _box(x, y, w, h, nodes, label, value, value_text=None, shape="rect") -> str:
    """A node of the picture: its name and its forward value; ``data-node`` lists the text's
    symbols it stands for (space-separated), ``data-value`` the exact value."""
    text = computed(value) if value_text is None else value_text
    exact = "" if value is None else f' data-value="{_value_attr(value)}"'
    if shape == "circle":
        body = f'<circle cx="{x}" cy="{y}" r="{w}"/>'
        tx, ty = x, y
    else:
        body = f'<rect x="{x - w / 2}" y="{y - h / 2}" width="{w}" height="{h}" rx="6"/>'
        tx, ty = x, y
    return (
        f'<g class="node" data-node="{_e(" ".join(nodes))}"{exact}>'
        f"<title>{_e(label)} = {_e(text)}</title>{body}"
        f'<text x="{tx}" y="{ty - 4}" class="name">{_e(label)}</text>'
        f'<text x="{tx}" y="{ty + 12}" class="val">{_e(text)}</text></g>'
    )


def _edge(x1, y1, x2, y2, nodes, label="", frac=0.5, exact=None) -> str:
    lx, ly = x1 + (x2 - x1) * frac, y1 + (y2 - y1) * frac
    caption = (
        f'<text x="{lx:.1f}" y="{ly - 4:.1f}" class="wlabel">{_e(label)}</text>' if label else ""
    )
    value = "" if exact is None else f' data-value="{_value_attr(exact)}"'
    return (
        f'<g class="edge" data-node="{_e(" ".join(nodes))}"{value}>'
        f'<line x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}"/>{caption}</g>'
    )


def _svg(width: float, height: float, body: list[str], label: str) -> str:
    return (
        f'<svg id="picture" viewBox="0 0 {width:.0f} {height:.0f}" role="img" '
        f'aria-label="{_e(label)}" xmlns="http://www.w3.org/2000/svg">'
        f'<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" '
        f'markerHeight="7" markerUnits="userSpaceOnUse" orient="auto-start-reverse">'
        f'<path d="M0,0 L10,5 L0,10 z"/></marker>'
        f"</defs>{''.join(body)}</svg>"
    )


# --------------------------------------------------------------------------------------------
# The network (the seed, --config)
# --------------------------------------------------------------------------------------------


def _network_picture(trace) -> tuple[str, set]:
    config, names = trace.config, trace.names
    widths = config.widths
    col, row, top = 210, 84, 56
    height = top + row * max(widths) + 70
    ys = [[top + row * (j + 0.5) + (max(widths) - w) * row / 2 for j in range(w)] for w in widths]
    xs = [70 + col * c for c in range(len(widths))]
    body: list[str] = []
    nodes: set = set()
    labelled = sum(layer.weights.size for layer in config.layers) <= 24
    for k, layer in enumerate(config.layers):
        for i, j in np.ndindex(layer.weights.shape):
            name = names.weight(k, i, j)
            nodes.add(name)
            frac = 0.3 if i <= j else 0.7  # crossing edges keep their labels apart
            label = f"{name} = {layer.weights[i, j]:.10g}" if labelled else ""
            body.append(
                _edge(xs[k], ys[k][i], xs[k + 1], ys[k + 1][j], [name], label, frac,
                      layer.weights[i, j])
            )  # fmt: skip
    for i, value in enumerate(config.inputs[0]):
        name = names.input(i)
        nodes.add(name)
        body.append(_box(xs[0], ys[0][i], 58, 40, [name], name, value, f"{value:.10g}"))
    for k, layer in enumerate(config.layers):
        layer_trace = trace.layers[k]
        for j in range(layer.width):
            name = names.neuron(k, j)
            nodes.add(name)
            value = layer_trace.out[0, j]
            body.append(_box(xs[k + 1], ys[k + 1][j], 30, 0, [name], name, value, shape="circle"))
            body.append(
                f'<text x="{xs[k + 1]}" y="{ys[k + 1][j] + 46}" class="val in" '
                f'data-value="{_value_attr(layer_trace.net[0, j])}">'
                f"in {computed(layer_trace.net[0, j])}</text>"
            )
        entries = (
            [(names.bias(k), layer.bias[()])]
            if layer.shared_bias
            else [(names.bias(k, j), layer.bias[j]) for j in range(layer.width)]
        )
        for e, (name, value) in enumerate(entries):
            nodes.add(name)
            bx = xs[k + 1] - 70 + e * 44 - (len(entries) - 1) * 22
            body.append(_box(bx, height - 26, 52, 36, [name], name, value, f"{value:.10g}"))
    nodes.add("E")
    ex = xs[-1] + 120
    for j in range(widths[-1]):
        body.append(_edge(xs[-1] + 30, ys[-1][j], ex - 34, top + row * max(widths) / 2, []))
    body.append(_box(ex, top + row * max(widths) / 2, 62, 40, ["E"], "E_total", trace.loss))
    body.append(
        f'<text x="{xs[0]}" y="22" class="caption">inputs</text>'
        + "".join(
            f'<text x="{xs[k + 1]}" y="22" class="caption">'
            f"{'output' if k == len(config.layers) - 1 else 'hidden'} ({layer.activation})</text>"
            for k, layer in enumerate(config.layers)
        )
    )
    if not config.single:
        body.append(
            f'<text x="10" y="{height - 4}" class="caption start">values shown: example 1 of '
            f"{config.examples}</text>"
        )
    width = ex + 80
    return _svg(width, height, body, "the network, its weights and forward values"), nodes


def _network_factors(trace):
    """For one example: a weight's gradient as its three factors, from the trace's arrays."""
    config, names = trace.config, trace.names
    weights = {
        names.weight(k, i, j): (k, i, j)
        for k, layer in enumerate(config.layers)
        for i, j in np.ndindex(layer.weights.shape)
    }

    def extra(step: dict) -> None:
        where = weights.get(step["lhs"].removeprefix("dE/d"))
        if where is None or not step["lhs"].startswith("dE/d") or config.examples != 1:
            return
        k, i, j = where
        layer, neuron = trace.layers[k], names.neuron(k, j)
        source = config.inputs[0, i] if k == 0 else trace.layers[k - 1].out[0, i]
        factors = [
            (f"dE/dout_{neuron}", layer.dE_dout[0, j]),
            (f"dout_{neuron}/din_{neuron}", layer.dout_dnet[0, j]),
            (f"din_{neuron}/d{names.weight(k, i, j)} = {names.source(k, i)}", source),
        ]
        step["factors"] = [
            {"symbol": symbol, "value": float(value), "text": computed(value)}
            for symbol, value in factors
        ]
        step["product"] = computed(layer.grad_weights[i, j])

    return extra


def loss_after_update(trace) -> float:
    """The loss after the first update: ``history[1]`` when the trace trained, otherwise the
    network's forward and loss on the updated parameters (the ones ``Step 4`` prints)."""
    if trace.history is not None:
        return float(trace.history[1])
    import jax
    import jax.numpy as jnp

    from ..backprop import loss_fn
    from ..losses import get_loss
    from .network import network_from_config

    config = trace.config
    layers = tuple(
        dataclasses.replace(layer, weights=lt.step1_weights, bias=lt.step1_bias)
        for layer, lt in zip(config.layers, trace.layers)
    )
    with jax.enable_x64(True):
        net, params = network_from_config(dataclasses.replace(config, layers=layers))
        x = jnp.asarray(config.inputs, jnp.float64)
        y = jnp.asarray(config.targets, jnp.float64)
        return float(loss_fn(net, get_loss(config.loss))(params, x, y))


def _network_page(trace) -> dict:
    from .document import trace_document

    sections = trace_document(trace)
    svg, nodes = _network_picture(trace)
    steps = page_steps(
        [s for s in sections if not s.title.startswith(("Step 4", "Training for"))],
        nodes,
        _network_factors(trace),
    )
    update = next(s for s in sections if s.title.startswith("Step 4"))
    lines = [line for block in update.blocks if isinstance(block, Lines) for line in block.lines]
    after = loss_after_update(trace)
    steps.append(
        {
            "section": update.title,
            "line": "\n".join(lines),
            "note": "Every parameter moves against its gradient: W <- W - lr * dE/dW.",
            "lhs": "update",
            "focus": sorted(n for n in nodes if n not in ("E",) and _is_parameter(n, trace)),
            "touch": ["E"],
            "update": {
                "loss_before": float(trace.loss),
                "loss_after": after,
                "before_text": computed(trace.loss),
                "after_text": computed(after),
            },
        }
    )
    _attach_errata(steps, trace.errata())
    config = trace.config
    architecture = "-".join(str(w) for w in config.widths)
    title = "The seed's 2-2-2 example" if config.is_seed else f"A {architecture} network"
    training = None
    if trace.history is not None:
        training = {
            "history": [float(v) for v in trace.history],
            "history_text": [computed(v) for v in trace.history],
            "steps": trace.steps,
        }
    return {
        "title": title,
        "kind": "network",
        "svg": svg,
        "setup": sections[0],
        "steps": steps,
        # the errata get a table of their own, with the wrong numbers marked
        "static": [s for s in sections if s.title == _STATIC_TITLES[0]],
        "errata": trace.errata(),
        "training": training,
        "summary": {
            "loss": float(trace.loss),
            "loss_after": after,
            "max_diff": float(trace.autodiff_max_abs_diff),
        },
    }


def _attach_errata(steps: list[dict], errata: list[dict] | None) -> None:
    """A step computing a number the tutorial printed wrong carries that number beside it."""
    if not errata:
        return
    wrong = {e["quantity"]: e for e in errata if not e["matches"]}
    for step in steps:
        computes = {_lhs(line) for line in step["line"].split("\n")}
        found = [wrong[name] for name in sorted(computes & wrong.keys())]
        if found:
            step["errata"] = [
                {
                    "quantity": e["quantity"],
                    "seed_text": f"{e['seed_states']:.4f}",
                    "correct_text": f"{e['correct']:.4f}",
                }
                for e in found
            ]


def _is_parameter(node: str, trace) -> bool:
    names, config = trace.names, trace.config
    for k, layer in enumerate(config.layers):
        if node in {names.weight(k, i, j) for i, j in np.ndindex(layer.weights.shape)}:
            return True
        if node in {names.bias(k)} | {names.bias(k, j) for j in range(layer.width)}:
            return True
    return False


# --------------------------------------------------------------------------------------------
# The layer examples: conv, attention, GRU
# --------------------------------------------------------------------------------------------


def _conv_picture(data: dict) -> tuple[str, set]:
    """Inputs on top, outputs below, one line per kernel tap: which inputs each weight touched."""
    spec = data["input"]
    x = np.asarray(spec["inputs"], np.float64)
    x = x.reshape(x.shape[0], -1)
    w = np.asarray(spec["params"]["W"], np.float64)
    y = np.asarray(data["forward"]["y"], np.float64)
    y = y.reshape(y.shape[0], -1)
    length, cin = x.shape
    outputs, cout = y.shape
    one = cin == 1 and cout == 1
    xname = lambda i, c: f"x{i + 1}" if cin == 1 else f"x{i + 1}.{c + 1}"
    yname = lambda o, c: f"y{o + 1}" if cout == 1 else f"y{o + 1}.{c + 1}"
    wname = lambda j, ci, co: f"w{j + 1}" if one else f"w{j + 1}.{ci + 1}.{co + 1}"
    step = 96
    width = max(length, outputs) * step + 140
    px = lambda i, n: 70 + (width - 140) * (i + 0.5) / n
    body, nodes = [], set()
    for o, window in enumerate(data["windows"]):
        for j, position in window:
            taps = [wname(j - 1, ci, co) for ci in range(cin) for co in range(cout)]
            label = f"{taps[0]} = {w[j - 1, 0, 0]:.10g}" if one else ""
            body.append(
                _edge(px(position - 1, length), 80, px(o, outputs), 230, taps, label,
                      0.3 + 0.12 * (j % 3))
            )  # fmt: skip
    for i in range(length):
        names = [xname(i, c) for c in range(cin)]
        nodes.update(names)
        text = ", ".join(f"{v:.10g}" for v in x[i])
        body.append(_box(px(i, length), 60, 80, 40, names, f"x{i + 1}", x[i, 0], text))
    for o in range(outputs):
        names = [yname(o, c) for c in range(cout)]
        nodes.update(names)
        text = ", ".join(computed(v) for v in y[o])
        body.append(_box(px(o, outputs), 250, 90, 40, names, f"y{o + 1}", y[o, 0], text))
    taps = w.shape[0]
    for j in range(taps):
        names = [wname(j, ci, co) for ci in range(cin) for co in range(cout)]
        nodes.update(names)
        text = ", ".join(f"{v:.10g}" for v in w[j].ravel())
        body.append(_box(70 + 100 * j, 330, 86, 40, names, f"w{j + 1}", w[j].ravel()[0], text))
    bias = np.asarray(spec["params"]["b"], np.float64)
    bnames = ["b"] if cout == 1 else [f"b{c + 1}" for c in range(cout)]
    nodes.update(bnames)
    body.append(
        _box(
            70 + 100 * taps, 330, 86, 40, bnames, "b", bias[0], ", ".join(f"{v:.10g}" for v in bias)
        )
    )
    nodes.add("E")
    body.append(_box(width - 70, 330, 96, 40, ["E"], "E", data["loss"]))
    body.append(
        f'<text x="10" y="22" class="caption start">inputs x (the kernel slides with stride '
        f"{spec['model']['stride']}; a line: a weight reads an input)</text>"
        '<text x="10" y="300" class="caption start">kernel (shared by every output)</text>'
    )
    return _svg(width, 370, body, "the convolution: inputs, kernel taps, outputs"), nodes


def _grid(x0, y0, matrix, name, symbol, cell=64, masked=None, title="") -> tuple[list, set]:
    """A matrix as a grid of nodes ``{symbol}{row}.{col}``; masked cells drawn hatched."""
    body = [f'<text x="{x0}" y="{y0 - 10}" class="caption start">{_e(title or name)}</text>']
    nodes = set()
    for r, c in np.ndindex(matrix.shape):
        node = f"{symbol}{r + 1}.{c + 1}"
        nodes.add(node)
        cx, cy = x0 + cell * (c + 0.5), y0 + 26 * 1.0 + 40 * r
        if masked is not None and masked[r, c]:
            body.append(
                f'<g class="node masked" data-node="{node}"><title>{node} = -inf (masked)</title>'
                f'<rect x="{cx - cell / 2 + 2}" y="{cy - 18}" width="{cell - 4}" height="36"/>'
                f'<text x="{cx}" y="{cy - 4}" class="name">{node}</text>'
                f'<text x="{cx}" y="{cy + 12}" class="val">masked</text></g>'
            )
        else:
            body.append(_box(cx, cy, cell - 4, 36, [node], node, matrix[r, c]))
    return body, nodes


def _attention_picture(data: dict) -> tuple[str, set]:
    spec, forward = data["input"], data["forward"]
    x = np.asarray(spec["inputs"], np.float64)
    scores = forward["s"]
    tokens = len(scores)
    masked = np.array([[v is None for v in row] for row in scores])
    s = np.array([[0.0 if v is None else v for v in row] for row in scores])
    p = np.asarray(forward["p"], np.float64)
    body, nodes = [], set()
    cell = 66
    gap = cell * max(tokens, x.shape[1]) + 36
    panels = [
        ("x", x, "x (tokens x features)", None),
        ("q", np.asarray(forward["q"]), "q = x Wq + bq", None),
        ("k", np.asarray(forward["k"]), "k = x Wk + bk", None),
        ("v", np.asarray(forward["v"]), "v = x Wv + bv", None),
        ("s", s, "scores s = q k^T / sqrt(d)", masked),
        ("p", p, "softmax p (each row sums to 1)", masked),
        ("h", np.asarray(forward["h"]), "h = p v", None),
        ("y", np.asarray(forward["y"]), "y = h Wo + bo", None),
    ]
    per_row = 4
    row_height = 40 * tokens + 70
    for index, (symbol, matrix, title, mask) in enumerate(panels):
        x0 = 20 + gap * (index % per_row)
        y0 = 30 + row_height * (index // per_row)
        part, names = _grid(x0, y0, matrix, symbol, symbol, cell, mask, title)
        body += part
        nodes |= names
    # The softmax's Jacobian of each row: dp_t/ds_t = diag(p_t) - p_t p_t^T (0 where masked).
    y_jac = 30 + row_height * 2
    for t in range(tokens):
        jacobian = np.diag(p[t]) - np.outer(p[t], p[t])
        x0 = 20 + gap * t
        node = f"dp{t + 1}/ds{t + 1}"
        nodes.add(node)
        body.append(
            f'<g class="node jac" data-node="{_e(node)}"><title>{_e(node)}</title>'
            f'<rect x="{x0 - 6}" y="{y_jac - 28}" width="{cell * tokens + 12}" '
            f'height="{40 * tokens + 40}" rx="6"/></g>'
        )
        part, _ = _grid(
            x0, y_jac, jacobian, f"J{t + 1}", f"J{t + 1}_", cell, title=f"Jacobian {node}"
        )
        body += part
    nodes.add("E")
    width = 20 + gap * per_row
    height = y_jac + 40 * tokens + 40
    body.append(_box(width - 70, height - 30, 100, 40, ["E"], "E", data["loss"]))
    return _svg(width, height, body, "attention: projections, scores, softmax, mask"), nodes


def _gru_picture(data: dict) -> tuple[str, set]:
    """The GRU unrolled: one column per time step, h flowing right, dh flowing back left."""
    spec, forward = data["input"], data["forward"]
    x = np.asarray(spec["inputs"], np.float64)
    x = x.reshape(x.shape[0], -1)
    h = np.asarray(forward["h"], np.float64)
    dh = np.asarray(data["gradients"]["intermediate"]["h"], np.float64)
    steps, hidden = h.shape
    col, box = 200, 164
    body, nodes = [], set()
    vec = lambda values: "[" + ", ".join(computed(v) for v in values) + "]"
    xs = [90 + col * t for t in range(steps + 1)]
    h0 = [f"h0.{a + 1}" for a in range(hidden)]
    nodes.update(h0)
    body.append(_box(xs[0], 280, 120, 44, h0, "h0", 0.0, vec(np.zeros(hidden))))
    for t in range(steps):
        cx = xs[t + 1]
        hn = [f"h{t + 1}.{a + 1}" for a in range(hidden)]
        body.append(
            _edge(xs[t] + 60, 280, cx - box / 2, 280, [f"h{t}.{a + 1}" for a in range(hidden)])
        )
        xn = [f"x{t + 1}.{c + 1}" for c in range(x.shape[1])]
        nodes.update(xn)
        body.append(_box(cx, 40, box, 40, xn, f"x{t + 1}", x[t, 0], vec(x[t])))
        for g, gate in enumerate(("r", "z", "n")):
            names = [f"{gate}{t + 1}.{a + 1}" for a in range(hidden)]
            names += [f"a{gate}{t + 1}.{a + 1}" for a in range(hidden)]
            if gate == "n":
                names += [f"ahn{t + 1}.{a + 1}" for a in range(hidden)]
            nodes.update(names)
            values = np.asarray(forward[gate][t], np.float64)
            body.append(_box(cx, 100 + 48 * g, box, 40, names, f"{gate}{t + 1}", values[0],
                             vec(values)))  # fmt: skip
        nodes.update(hn)
        body.append(_box(cx, 280, box, 44, hn, f"h{t + 1}", h[t, 0], vec(h[t])))
        # dE/dh_t flows back through time, drawn under the states
        body.append(
            f'<g class="edge back" data-node="{_e(" ".join(hn))}">'
            f'<line x1="{cx - box / 2:.1f}" y1="370" x2="{xs[t] + 60:.1f}" y2="370" '
            f'marker-end="url(#arrow)"/></g>'
        )
        body.append(_box(cx, 370, box, 40, hn, f"dE/dh{t + 1}", dh[t, 0], vec(dh[t])))
    nodes.add("E")
    body.append(_edge(xs[-1] + box / 2, 280, xs[-1] + 130, 280, ["E"]))
    body.append(_box(xs[-1] + 175, 280, 90, 40, ["E"], "E", data["loss"]))
    body.append(
        '<text x="10" y="420" class="caption start">top: the input x_t and the gates r, z, n of '
        "each step; middle: the state h_t; bottom: dE/dh_t flowing back through time</text>"
    )
    width = xs[-1] + 230
    return _svg(width, 436, body, "the GRU unrolled through time"), nodes


def _tied_picture(data: dict) -> tuple[str, set]:
    """The tied autoencoder: inputs, hidden neurons, outputs; each ``W[i][j]`` labels two edges
    (input i to hidden j, and hidden j to output i), so lighting it shows both uses."""
    spec = data["input"]
    x = np.asarray(spec["inputs"], np.float64)
    w = np.asarray(spec["params"][0]["W"], np.float64)
    h, y = np.asarray(data["h"], np.float64), np.asarray(data["y"], np.float64)
    inputs, hidden = w.shape
    row = lambda k, count: 60 + 90 * k + 45 * (max(inputs, hidden) - count)
    cx, ch, cy = 90, 330, 570
    body, nodes = [], set()
    for i in range(inputs):
        for j in range(hidden):
            weight = f"W[{i + 1}][{j + 1}]"
            nodes.add(weight)
            body.append(_edge(cx + 40, row(i, inputs), ch - 60, row(j, hidden), [weight],
                              weight, 0.3, w[i, j]))  # fmt: skip
            body.append(_edge(ch + 60, row(j, hidden), cy - 40, row(i, inputs), [weight],
                              weight, 0.7, w[i, j]))  # fmt: skip
    for i in range(inputs):
        nodes.update([f"x{i + 1}", f"y_{i + 1}", f"b2_{i + 1}"])
        body.append(_box(cx, row(i, inputs), 80, 40, [f"x{i + 1}"], f"x{i + 1}", x[i]))
        body.append(_box(cy, row(i, inputs), 80, 40, [f"y_{i + 1}", f"b2_{i + 1}"],
                         f"y_{i + 1}", y[i]))  # fmt: skip
    for j in range(hidden):
        names = [f"z_{j + 1}", f"h_{j + 1}", f"b0_{j + 1}"]
        nodes.update(names)
        body.append(_box(ch, row(j, hidden), 120, 40, names, f"h_{j + 1}", h[j]))
    nodes.add("E")
    height = 60 + 90 * max(inputs, hidden)
    body.append(_box(cy + 130, height / 2 - 15, 80, 40, ["E"], "E", data["loss"]))
    body.append(
        f'<text x="10" y="{height}" class="caption start">one matrix W: the first layer reads '
        "it as it is, the output layer transposed; each W[i][j] labels both of its edges</text>"
    )
    return _svg(cy + 190, height + 16, body, "a tied autoencoder: one W, two uses"), nodes


_LLAMA_STAGES = [
    ("x0", "x0 = Wt[token]", ""),
    ("n1", "RMSNorm", "rstd1"),
    ("q", "q = n1 Wq", "qr1 qr2 dq1 dq2 dqr1 dqr2"),
    ("k", "k = n1 Wk", "kr dk dkr"),
    ("v", "v = n1 Wv", ""),
    ("o", "heads: softmax(qr kr^T) v", "s1 s2 p1 p2 dp1 dp2 ds1 ds2 do1 do2"),
    ("x1", "x1 = x0 + o Wo", ""),
    ("n2", "RMSNorm", "rstd2"),
    ("m", "m = silu(n2 W1) * n2 W3", "a b da db dm"),
    ("x2", "x2 = x1 + m W2", ""),
    ("n3", "RMSNorm", "rstd3"),
    ("logits", "logits = n3 Wt^T + b", ""),
]


def _llama_picture(data: dict) -> tuple[str, set]:
    """The Llama block as a grid: one column per stage, one row per token; each box stands for
    that token's row of the stage (its value and its gradient), the parameters underneath."""
    body, nodes = [], set()
    col, box = 150, 136
    tokens = len(data["x0"])
    for c, (symbol, title, related) in enumerate(_LLAMA_STAGES):
        x = 80 + col * c
        body.append(f'<text x="{x}" y="28" class="caption">{_e(title)}</text>')
        for t in range(tokens):
            names = [f"{symbol}[{t + 1}]", f"d{symbol}[{t + 1}]"]
            names += [f"{r}[{t + 1}]" for r in related.split()]
            nodes.update(names)
            row = np.asarray(data[symbol][t], np.float64).ravel()
            text = "[" + ", ".join(f"{v:.2f}" for v in row) + "]"
            body.append(_box(x, 70 + 60 * t, box, 44, names, f"{symbol}[{t + 1}]", row[0], text))
        if c:
            body.append(_edge(x - col + box / 2, 70, x - box / 2, 70, []))
    y0 = 70 + 60 * tokens + 30
    params = data["params"]
    matrices = [
        ("Wt", params[0]["W"], 0),
        ("Wq", params[1][1]["Wq"], 1),
        ("Wk", params[1][1]["Wk"], 1),
        ("Wv", params[1][1]["Wv"], 1),
        ("Wo", params[1][1]["Wo"], 1),
        ("W1", params[2][1]["W1"], 1),
        ("W3", params[2][1]["W3"], 1),
        ("W2", params[2][1]["W2"], 1),
    ]
    for c, (name, matrix, start) in enumerate(matrices):
        matrix = np.asarray(matrix, np.float64)
        names = [f"{name}[{r + start}]" for r in range(matrix.shape[0])]
        if name == "Wt":  # its gradient is shown entry by entry: both uses added
            names += [f"Wt[{r}][{d + 1}]" for r, d in np.ndindex(matrix.shape)]
        names += ["g1", "g2", "g3"] if name == "Wt" else []
        nodes.update(names)
        text = f"{matrix.shape[0]} x {matrix.shape[1]}"
        body.append(_box(80 + col * c, y0, box, 44, names, name, matrix.flat[0], text))
    nodes.add("E")
    width = 80 + col * len(_LLAMA_STAGES)
    body.append(_box(width - 40, y0, 70, 40, ["E"], "E", data["loss"]))
    body.append(
        f'<text x="10" y="{y0 + 50}" class="caption start">top: each stage, one row per token '
        "(its value; its gradient lights it in the backward); bottom: the weight matrices, Wt "
        "used by the embedding and, transposed, by the logits</text>"
    )
    return _svg(width + 20, y0 + 62, body, "a Llama block, stage by stage"), nodes


_LAYER_PICTURES = {
    "llama": _llama_picture,
    "conv": _conv_picture,
    "attention": _attention_picture,
    "gru": _gru_picture,
    "tied": _tied_picture,
}
_LAYER_TITLES = {
    "conv": "A Conv1D layer",
    "attention": "One attention head",
    "gru": "A GRU unrolled through time",
    "tied": "A tied autoencoder",
    "llama": "A Llama block",
}


def _layer_page(traced) -> dict:
    data = traced.to_json()
    svg, nodes = _LAYER_PICTURES[traced.kind](data)
    sections = traced.sections
    steps = page_steps(sections, nodes)
    worst = traced.autodiff_max_abs_diff
    steps.append(
        {
            "section": "Check: jax.grad agrees",
            "line": (
                f"max |manual - jax.grad| = {worst:.3e} over all parameters and inputs (float64)"
            ),
            "note": "Every gradient of the layer's hand-written backward, beside jax.grad's.",
            "lhs": "check",
            "focus": [],
            "touch": ["E"],
            "check": _check("max over all parameters", worst, 0.0) | {"diff": worst},
        }
    )
    return {
        "title": sections[0].title if sections else _LAYER_TITLES[traced.kind],
        "kind": traced.kind,
        "svg": svg,
        "setup": sections[0],
        "steps": steps,
        "static": [s for s in sections[1:] if s.title in _STATIC_TITLES or not _has_lines(s)],
        "errata": None,
        "training": None,
        "summary": {"loss": float(data["loss"]), "loss_after": None, "max_diff": worst},
    }


def _has_lines(section: Section) -> bool:
    return any(isinstance(block, Lines) for block in section.blocks)


# --------------------------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------------------------


def _block_html(block) -> str:
    if isinstance(block, Lines):
        return f"<pre>{_e(chr(10).join(block.lines))}</pre>"
    if isinstance(block, Paragraph):
        return f"<p>{_e(block.text)}</p>"
    if isinstance(block, Subtitle):
        return f"<h4>{_e(block.text)}</h4>"
    head = "".join(f'<th scope="col">{_e(h)}</th>' for h in block.headers)
    rows = "".join(
        "<tr>" + "".join(f"<td>{_e(cell)}</td>" for cell in row) + "</tr>" for row in block.rows
    )
    table = f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"
    return f'<div class="scroll">{table}</div>'


def _section_html(section: Section, heading: str = "h2", attrs: str = "") -> str:
    blocks = "".join(_block_html(block) for block in section.blocks)
    return f"<section{attrs}><{heading}>{_e(section.title)}</{heading}>{blocks}</section>"


def _errata_html(errata: list[dict]) -> str:
    rows = "".join(
        f'<tr class="{"ok" if e["matches"] else "bad"}"><th scope="row">{_e(e["quantity"])}</th>'
        f'<td class="seed" data-value="{_value_attr(e["seed_states"])}">{e["seed_states"]:.4f}</td>'
        f'<td class="correct" data-value="{_value_attr(e["correct"])}">{e["correct"]:.4f}</td>'
        f"<td>{'yes' if e['matches'] else '&#x2717; wrong'}</td></tr>"
        for e in errata
    )
    wrong = sum(not e["matches"] for e in errata)
    return (
        '<section id="errata"><h2>Errata: the tutorial\'s printed numbers</h2>'
        f"<p>{wrong} of the {len(errata)} numbers the tutorial prints do not follow from its own "
        "weights. Each row: what it printed, the right value (float64, 4 places).</p>"
        '<div class="scroll"><table><thead><tr><th scope="col">quantity</th>'
        '<th scope="col">tutorial printed</th><th scope="col">correct</th>'
        f'<th scope="col">matches</th></tr></thead><tbody>{rows}</tbody></table></div></section>'
    )


def _training_html(training: dict | None) -> str:
    if training is None:
        return ""
    history = training["history"]
    n = len(history) - 1
    low, high = min(history), max(history)
    span = (high - low) or 1.0
    points = " ".join(
        f"{10 + 380 * s / max(n, 1):.1f},{10 + 100 * (high - v) / span:.1f}"
        for s, v in enumerate(history)
    )
    return (
        f'<section id="training"><h2>Training for {training["steps"]} steps</h2>'
        "<p>The loss before each full-batch step (step 0 = before training) and after the last; "
        "every step's manual gradients were checked against jax.grad.</p>"
        f'<label for="train-slider">training step</label> '
        f'<input type="range" id="train-slider" min="0" max="{n}" value="0"> '
        '<output id="train-out" aria-live="polite"></output>'
        '<svg id="curve" viewBox="0 0 400 120" role="img" aria-label="loss curve">'
        f'<polyline points="{points}" class="curve"/><circle id="curve-dot" r="5" cx="10" '
        'cy="10"/></svg></section>'
    )


def _summary_html(page: dict) -> str:
    summary = page["summary"]
    agree = summary["max_diff"] <= AGREEMENT_TOLERANCE
    verdict = "agree" if agree else "DISAGREE"
    after = (
        f' &rarr; after one update <strong id="loss-after" data-value="'
        f'{_value_attr(summary["loss_after"])}">{computed(summary["loss_after"])}</strong>'
        if summary["loss_after"] is not None
        else ""
    )
    return (
        '<p class="summary">loss E = <strong id="loss-before" data-value="'
        f'{_value_attr(summary["loss"])}">{computed(summary["loss"])}</strong>{after}; '
        f'manual chain rule and jax.grad <span class="{"ok" if agree else "bad"}">'
        f"{'&#x2713;' if agree else '&#x2717;'} {verdict}</span> "
        f'(max |diff| = <span id="max-diff">{summary["max_diff"]:.3e}</span>)</p>'
    )


def _json_script(element_id: str, value: Any) -> str:
    # "</" would end the script element early; JSON allows "<\/" for it.
    text = json.dumps(value, allow_nan=False, default=_jsonable).replace("</", "<\\/")
    return f'<script type="application/json" id="{element_id}">{text}</script>'


def _jsonable(value):
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON: {type(value).__name__}")


def _finite(value):
    """JSON has no inf/nan: the page writes them as strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _document(page: dict, data: dict) -> str:
    steps, training = _finite(page["steps"]), page["training"]
    setup = _section_html(page["setup"], "h2", ' id="setup"')
    static = "".join(_section_html(s, "h2") for s in page["static"])
    errata = _errata_html(page["errata"]) if page["errata"] else ""
    total = len(steps)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<title>{_e(page["title"])}: jaxbp trace</title>
<style>{PAGE_STYLE}</style></head>
<body data-kind="{_e(page["kind"])}">
<header><h1>{_e(page["title"])}</h1>
<p>Every number of one backprop step: the forward values, the chain rule one factor at a time,
jaxbp's hand-written backward beside <code>jax.grad</code>. Step with the buttons, the slider or
the arrow keys (Home, End: first, last).</p>{_summary_html(page)}</header>
<main>
<div class="stage">
<figure id="figure">{page["svg"]}<figcaption>Highlighted: <span class="key focus-key">the
quantity being computed</span> and <span class="key touch-key">what it reads</span>.</figcaption>
</figure>
<section id="explain" aria-labelledby="step-title">
<nav class="controls" aria-label="step through the trace">
<button type="button" id="first" aria-label="first step">&#xAB; first</button>
<button type="button" id="prev" aria-label="previous step">&#x25C0; back</button>
<button type="button" id="next" aria-label="next step">next &#x25B6;</button>
<button type="button" id="last" aria-label="last step">last &#xBB;</button>
<label class="visually-hidden" for="slider">step</label>
<input type="range" id="slider" min="0" max="{total - 1}" value="0">
<span id="counter">step 1 of {total}</span></nav>
<div id="step" aria-live="polite">
<h2 id="step-title"></h2><p id="step-note"></p><pre id="step-line"></pre>
<div id="step-factors"></div><div id="step-check"></div><div id="step-update"></div>
<p id="step-erratum"></p></div>
</section></div>
{_training_html(page["training"])}
{setup}{errata}{static}
</main>
<footer><p>Written by <code>jaxbp trace --format html</code>; the same numbers as
<code>--format json</code>, embedded below.</p></footer>
{_json_script("page-data", {"steps": steps, "errata": page["errata"], "training": training})}
{_json_script("trace-json", _finite(data))}
<script>{PAGE_SCRIPT}</script>
</body></html>
"""


def trace_html(traced) -> str:
    """``traced`` (a network's :class:`~jaxbp.trace.Trace` or a layer's
    :class:`~jaxbp.trace.layer_traces.TracedLayer`) as one self-contained HTML page."""
    if hasattr(traced, "kind"):
        page = _layer_page(traced)
    else:
        page = _network_page(traced)
    return _document(page, traced.to_json())
