"""The worked example of one attention head: ``jaxbp trace --example attention``.

Three tokens of dimension 2 through :func:`jaxbp.MultiHeadAttention` with one head (causal by
default, so the mask shows): the projections ``q, k, v``, the scores ``s_tu = q_t . k_u /
sqrt(d)``, the softmax ``p_tu``, the weighted values ``h_t = sum_u p_tu v_u`` and the output
``y_t = h_t Wo + bo``; then the chain rule back through each, the softmax's Jacobian
``dp_tu/ds_tu' = p_tu (1[u = u'] - p_tu')`` and the mask included.

The layer's own forward gives ``q, k, v, p, h, y`` (its cache) and its own backward the
parameter and input gradients; the intermediate gradients (``dh, dp, ds, dq, dk, dv``), which
the layer's backward keeps to itself, are worked here from its docstring's formulas and must add
up to the layer's totals (checked, as every printed sum is).

Names: ``x2.1`` is component 1 of token 2 (likewise ``q, k, v, h, y``); ``s1.2`` and ``p1.2``
are query 1's score and weight for key 2; ``Wq[c][a]`` joins input component ``c`` to ``q``'s
component ``a``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from .config import ConfigError
from .layer_traces import (
    TracedLayer,
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
from .render import Lines, Paragraph, Section, Subtitle

__all__ = ["EXAMPLE", "trace_attention"]

EXAMPLE = {
    "model": {"name": "MultiHeadAttention", "num_heads": 1, "causal": True},
    "params": {
        "Wq": [[0.5, -0.2], [0.1, 0.4]],
        "bq": [0.0, 0.0],
        "Wk": [[0.3, 0.2], [-0.1, 0.6]],
        "bk": [0.0, 0.0],
        "Wv": [[1.0, 0.5], [-0.5, 1.0]],
        "bv": [0.0, 0.0],
        "Wo": [[0.8, 0.1], [-0.2, 0.9]],
        "bo": [0.1, -0.1],
    },
    "inputs": [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]],
    "targets": [[0.5, 0.0], [0.0, 0.5], [1.0, 1.0]],
}
MAX_TOKENS, MAX_DIM = 6, 4


class _Page(NamedTuple):
    """The numbers (numpy float64): the layer's forward (``q k v p h y``), the loss's gradient,
    the worked intermediates (``dh dp ds dq dk dv``) and the layer's / jax.grad's gradients."""

    params: dict
    x: np.ndarray
    t: np.ndarray
    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    p: np.ndarray
    h: np.ndarray
    y: np.ndarray
    mask: np.ndarray  # True where key u may be seen by query t
    scale: float  # 1 / sqrt(d)
    dy: np.ndarray
    dh: np.ndarray
    dp: np.ndarray
    ds: np.ndarray  # dE/ds for s = q.k / sqrt(d)
    dq: np.ndarray
    dk: np.ndarray
    dv: np.ndarray
    grads: dict  # the layer's backward (params and "x")
    autodiff: dict
    loss: float

    @property
    def tokens(self) -> int:
        return self.x.shape[0]

    @property
    def dim(self) -> int:
        return self.x.shape[1]


def _n(symbol: str, t: int, a: int) -> str:
    return f"{symbol}{t + 1}.{a + 1}"


# --------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------


def _projection_lines(page: _Page, name: str, out: np.ndarray) -> list[str]:
    """``q_t.a = sum_c x_t.c Wq[c][a] + bq[a]`` for every token and component."""
    w, b = page.params["W" + name], page.params["b" + name]
    lines = []
    for t, a in np.ndindex(out.shape):
        cs = range(page.dim)
        lines.append(
            sum_line(
                _n(name, t, a),
                [f"{_n('x', t, c)}*W{name}[{c + 1}][{a + 1}]" for c in cs] + [f"b{name}[{a + 1}]"],
                [f"{given_factor(page.x[t, c])}*{given_factor(w[c, a])}" for c in cs]
                + [given_factor(b[a])],
                [page.x[t, c] * w[c, a] for c in cs] + [b[a]],
                out[t, a],
                _n(name, t, a),
            )
        )
    return lines


def _score_line(page: _Page, t: int, u: int) -> str:
    if not page.mask[t, u]:
        return f"s{t + 1}.{u + 1} = -inf   (mask: token {u + 1} comes after token {t + 1})"
    a_range = range(page.dim)
    symbols = " + ".join(f"{_n('q', t, a)}*{_n('k', u, a)}" for a in a_range)
    numbers = " + ".join(f"{factor(page.q[t, a])}*{factor(page.k[u, a])}" for a in a_range)
    value = float(page.q[t] @ page.k[u]) * page.scale
    return (
        f"s{t + 1}.{u + 1} = ({symbols}) / sqrt({page.dim}) = ({numbers}) / "
        f"{1 / page.scale:.4f} = {computed(value)}"
    )


def _softmax_lines(page: _Page, t: int) -> list[str]:
    seen = [u for u in range(page.tokens) if page.mask[t, u]]
    s = np.array([float(page.q[t] @ page.k[u]) * page.scale for u in seen])
    top, exps = s.max(), np.exp(s - s.max())
    z = f"Z{t + 1}"
    lines = [
        sum_line(
            z,
            [f"e^(s{t + 1}.{u + 1} - {computed(top)})" for u in seen],
            [computed(e) for e in exps],
            exps,
            exps.sum(),
            z,
        )
    ]
    for u in range(page.tokens):
        name = f"p{t + 1}.{u + 1}"
        if not page.mask[t, u]:
            lines.append(f"{name} = e^-inf / {z} = 0   (masked)")
            continue
        e = exps[seen.index(u)]
        checked_total([e / exps.sum()], page.p[t, u], name)
        lines.append(
            f"{name} = e^(s{t + 1}.{u + 1} - {computed(top)}) / {z} = {computed(e)} / "
            f"{computed(exps.sum())} = {computed(page.p[t, u])}"
        )
    return lines


def _weighted_value_lines(page: _Page) -> list[str]:
    us = range(page.tokens)
    return [
        sum_line(
            _n("h", t, a),
            [f"p{t + 1}.{u + 1}*{_n('v', u, a)}" for u in us],
            [f"{factor(page.p[t, u])}*{factor(page.v[u, a])}" for u in us],
            [page.p[t, u] * page.v[u, a] for u in us],
            page.h[t, a],
            _n("h", t, a),
        )
        for t, a in np.ndindex(page.h.shape)
    ]


def _output_lines(page: _Page) -> list[str]:
    w, b, cs = page.params["Wo"], page.params["bo"], range(page.dim)
    return [
        sum_line(
            _n("y", t, a),
            [f"{_n('h', t, c)}*Wo[{c + 1}][{a + 1}]" for c in cs] + [f"bo[{a + 1}]"],
            [f"{factor(page.h[t, c])}*{given_factor(w[c, a])}" for c in cs] + [given_factor(b[a])],
            [page.h[t, c] * w[c, a] for c in cs] + [b[a]],
            page.y[t, a],
            _n("y", t, a),
        )
        for t, a in np.ndindex(page.y.shape)
    ]


def forward_section(page: _Page) -> Section:
    scores = [_score_line(page, t, u) for t, u in np.ndindex(page.tokens, page.tokens)]
    softmax = [line for t in range(page.tokens) for line in _softmax_lines(page, t)]
    return Section(
        "Step 1: forward pass (MultiHeadAttention.forward)",
        [
            Subtitle("Projections: q = x Wq + bq, k = x Wk + bk, v = x Wv + bv"),
            Lines(
                _projection_lines(page, "q", page.q)
                + _projection_lines(page, "k", page.k)
                + _projection_lines(page, "v", page.v)
            ),
            Subtitle(f"Scores: s_tu = q_t . k_u / sqrt({page.dim})"),
            Lines(scores),
            Subtitle(
                "Softmax over each row: p_tu = e^(s_tu - max_u s_tu) / Z_t (shifted by the "
                "row's largest score, as the layer does)"
            ),
            Lines(softmax),
            Subtitle("Weighted values: h_t = sum_u p_tu v_u"),
            Lines(_weighted_value_lines(page)),
            Subtitle("Output projection: y = h Wo + bo"),
            Lines(_output_lines(page)),
        ],
    )


def error_section(page: _Page) -> Section:
    lines = []
    for t in range(page.tokens):
        terms = 0.5 * (page.y[t] - page.t[t]) ** 2
        lines.append(
            sum_line(
                f"E{t + 1}",
                [f"1/2 ({_n('y', t, a)} - {_n('t', t, a)})^2" for a in range(page.dim)],
                [
                    f"1/2 ({factor(page.y[t, a])} - {given_factor(page.t[t, a])})^2"
                    for a in range(page.dim)
                ],
                terms,
                terms.sum(),
                f"E{t + 1}",
            )
        )
    per_token = 0.5 * ((page.y - page.t) ** 2).sum(axis=1)
    lines.append(
        sum_line(
            "E",
            [f"E{t + 1}" for t in range(page.tokens)],
            [factor(e) for e in per_token],
            per_token,
            page.loss,
            "E",
        )
    )
    return Section("Step 2: the error (E = 1/2 sum (y - target)^2)", [Lines(lines)])


# --------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------


def _output_projection_lines(page: _Page) -> list[str]:
    ts, cs, w = range(page.tokens), range(page.dim), page.params["Wo"]
    lines = [
        f"dE/d{_n('y', t, a)} = {_n('y', t, a)} - {_n('t', t, a)} = {factor(page.y[t, a])}"
        f" - {given_factor(page.t[t, a])} = {computed(page.dy[t, a])}"
        for t, a in np.ndindex(page.y.shape)
    ]
    lines += [
        sum_line(
            f"dE/dWo[{c + 1}][{a + 1}]",
            [f"{_n('h', t, c)}*dE/d{_n('y', t, a)}" for t in ts],
            [f"{factor(page.h[t, c])}*{factor(page.dy[t, a])}" for t in ts],
            [page.h[t, c] * page.dy[t, a] for t in ts],
            page.grads["Wo"][c, a],
            "dWo",
        )
        for c, a in np.ndindex(w.shape)
    ]
    lines += [
        sum_line(
            f"dE/dbo[{a + 1}]",
            [f"dE/d{_n('y', t, a)}" for t in ts],
            [factor(page.dy[t, a]) for t in ts],
            page.dy[:, a],
            page.grads["bo"][a],
            "dbo",
        )
        for a in cs
    ]
    lines += [
        sum_line(
            f"dE/d{_n('h', t, c)}",
            [f"dE/d{_n('y', t, a)}*Wo[{c + 1}][{a + 1}]" for a in cs],
            [f"{factor(page.dy[t, a])}*{given_factor(w[c, a])}" for a in cs],
            [page.dy[t, a] * w[c, a] for a in cs],
            page.dh[t, c],
            "dh",
        )
        for t, c in np.ndindex(page.h.shape)
    ]
    return lines


def _weighted_value_backward_lines(page: _Page) -> list[str]:
    ts, a_range = range(page.tokens), range(page.dim)
    lines = [
        sum_line(
            f"dE/dp{t + 1}.{u + 1}",
            [f"dE/d{_n('h', t, a)}*{_n('v', u, a)}" for a in a_range],
            [f"{factor(page.dh[t, a])}*{factor(page.v[u, a])}" for a in a_range],
            [page.dh[t, a] * page.v[u, a] for a in a_range],
            page.dp[t, u],
            "dp",
        )
        for t, u in np.ndindex(page.p.shape)
    ]
    lines += [
        sum_line(
            f"dE/d{_n('v', u, a)}",
            [f"p{t + 1}.{u + 1}*dE/d{_n('h', t, a)}" for t in ts],
            [f"{factor(page.p[t, u])}*{factor(page.dh[t, a])}" for t in ts],
            [page.p[t, u] * page.dh[t, a] for t in ts],
            page.dv[u, a],
            "dv",
        )
        for u, a in np.ndindex(page.v.shape)
    ]
    return lines


def _exact(value: float) -> str:
    """A computed number, written ``0`` when it is exactly zero (a masked entry)."""
    return "0" if value == 0 else factor(value)


def _jacobian_line(page: _Page, t: int) -> str:
    p = page.p[t]
    rows = [
        "[" + ", ".join(_exact(p[u] * ((u == w) - p[w])) for w in range(page.tokens)) + "]"
        for u in range(page.tokens)
    ]
    return f"dp{t + 1}/ds{t + 1} = diag(p{t + 1}) - p{t + 1} p{t + 1}^T = [{', '.join(rows)}]"


def _softmax_backward_lines(page: _Page, t: int) -> list[str]:
    us, row = range(page.tokens), f"r{t + 1}"
    p, dp = page.p[t], page.dp[t]
    lines = [
        _jacobian_line(page, t),
        sum_line(
            row,
            [f"p{t + 1}.{u + 1}*dE/dp{t + 1}.{u + 1}" for u in us],
            [f"{factor(p[u])}*{factor(dp[u])}" for u in us],
            p * dp,
            float(p @ dp),
            row,
        ),
    ]
    for u in us:
        name = f"dE/ds{t + 1}.{u + 1}"
        checked_total([p[u] * (dp[u] - float(p @ dp))], page.ds[t, u], name)
        masked = (
            "   (masked: p = 0 exactly, so nothing reaches the -inf score)"
            if not page.mask[t, u]
            else ""
        )
        lines.append(
            f"{name} = p{t + 1}.{u + 1} * (dE/dp{t + 1}.{u + 1} - {row}) = "
            f"{_exact(p[u])} * ({factor(dp[u])} - {factor(p @ dp)}) = "
            f"{_exact(page.ds[t, u]).strip('()')}{masked}"
        )
    return lines


def _score_backward_lines(page: _Page) -> list[str]:
    us, root = range(page.tokens), f"sqrt({page.dim})"
    lines = []
    for name, other, grad, query in (("q", page.k, page.dq, True), ("k", page.q, page.dk, False)):
        for t, a in np.ndindex(grad.shape):
            pairs = [(t, u) if query else (u, t) for u in us]
            partner = "k" if query else "q"
            symbols = " + ".join(
                f"dE/ds{i + 1}.{j + 1}*{_n(partner, j if query else i, a)}" for i, j in pairs
            )
            numbers = " + ".join(
                f"{factor(page.ds[i, j])}*{factor(other[j if query else i, a])}" for i, j in pairs
            )
            terms = [page.ds[i, j] * other[j if query else i, a] * page.scale for i, j in pairs]
            value = checked_total(terms, grad[t, a], f"d{name}")
            lines.append(
                f"dE/d{_n(name, t, a)} = ({symbols}) / {root} = ({numbers}) / "
                f"{1 / page.scale:.4f} = {computed(value)}"
            )
    return lines


def _projection_backward_lines(page: _Page, name: str, grad: np.ndarray) -> list[str]:
    ts, w = range(page.tokens), page.params["W" + name]
    lines = [
        sum_line(
            f"dE/dW{name}[{c + 1}][{a + 1}]",
            [f"{_n('x', t, c)}*dE/d{_n(name, t, a)}" for t in ts],
            [f"{given_factor(page.x[t, c])}*{factor(grad[t, a])}" for t in ts],
            [page.x[t, c] * grad[t, a] for t in ts],
            page.grads["W" + name][c, a],
            f"dW{name}",
        )
        for c, a in np.ndindex(w.shape)
    ]
    return lines + [
        sum_line(
            f"dE/db{name}[{a + 1}]",
            [f"dE/d{_n(name, t, a)}" for t in ts],
            [factor(grad[t, a]) for t in ts],
            grad[:, a],
            page.grads["b" + name][a],
            f"db{name}",
        )
        for a in range(page.dim)
    ]


def _input_lines(page: _Page) -> list[str]:
    lines, parts = [], (("q", page.dq), ("k", page.dk), ("v", page.dv))
    for t, c in np.ndindex(page.x.shape):
        triples = [(n, g, a) for n, g in parts for a in range(page.dim)]
        w = page.params
        lines.append(
            sum_line(
                f"dE/d{_n('x', t, c)}",
                [f"dE/d{_n(n, t, a)}*W{n}[{c + 1}][{a + 1}]" for n, _, a in triples],
                [f"{factor(g[t, a])}*{given_factor(w['W' + n][c, a])}" for n, g, a in triples],
                [g[t, a] * w["W" + n][c, a] for n, g, a in triples],
                page.grads["x"][t, c],
                "dx",
            )
        )
    return lines


def backward_section(page: _Page) -> Section:
    softmax = [line for t in range(page.tokens) for line in _softmax_backward_lines(page, t)]
    projections = [
        line
        for name, grad in (("q", page.dq), ("k", page.dk), ("v", page.dv))
        for line in _projection_backward_lines(page, name, grad)
    ]
    return Section(
        "Step 3: backward pass (MultiHeadAttention.backward)",
        [
            Subtitle("Output projection: dWo = h^T dE/dy, dbo = sum dE/dy, dE/dh = dE/dy Wo^T"),
            Lines(_output_projection_lines(page)),
            Subtitle("Weighted values: dE/dp_tu = dE/dh_t . v_u, dE/dv_u = sum_t p_tu dE/dh_t"),
            Lines(_weighted_value_backward_lines(page)),
            Subtitle("Softmax: dE/ds_t = dE/dp_t (diag(p_t) - p_t p_t^T) = p_t * (dE/dp_t - r_t)"),
            Paragraph(
                "r_t = sum_u p_tu dE/dp_tu. Each row's Jacobian is symmetric; its rows and "
                "columns for masked keys are 0, so the mask needs no step of its own."
            ),
            Lines(softmax),
            Subtitle(
                "Scores: dE/dq_t = sum_u dE/ds_tu k_u / sqrt(d), "
                "dE/dk_u = sum_t dE/ds_tu q_t / sqrt(d)"
            ),
            Lines(_score_backward_lines(page)),
            Subtitle("Projections: dW = x^T dE/d(q, k, v), db = sum over tokens"),
            Lines(projections),
            Paragraph(
                "dE/dbk is 0 up to rounding, always: adding bk to every key adds q_t . bk to "
                "a whole row of scores, and the softmax ignores a row's common shift."
            ),
            Subtitle("Input: dE/dx = dE/dq Wq^T + dE/dk Wk^T + dE/dv Wv^T"),
            Lines(_input_lines(page)),
        ],
    )


# --------------------------------------------------------------------------------------------
# The trace
# --------------------------------------------------------------------------------------------


def _setup_section(page: _Page, causal: bool) -> Section:
    inputs = "; ".join(
        ", ".join(f"{_n('x', t, c)} = {given(page.x[t, c])}" for c in range(page.dim))
        for t in range(page.tokens)
    )
    targets = "; ".join(
        ", ".join(f"{_n('t', t, c)} = {given(page.t[t, c])}" for c in range(page.dim))
        for t in range(page.tokens)
    )
    lines = [f"inputs: {inputs}", f"targets: {targets}"]
    for name, value in page.params.items():
        entries = (
            (f"{name}[{i + 1}][{j + 1}] = {given(value[i, j])}" for i, j in np.ndindex(value.shape))
            if value.ndim == 2
            else (f"{name}[{i + 1}] = {given(value[i])}" for i in range(value.shape[0]))
        )
        lines.append(", ".join(entries))
    mask = (
        "causal: token t sees tokens 1..t (s_tu = -inf for u > t)"
        if causal
        else "no mask: every token sees every token"
    )
    return Section(
        f"One attention head: {page.tokens} tokens of dimension {page.dim}",
        [Lines([*lines, f"mask: {mask}", "loss E = 1/2 sum (y - target)^2"])],
    )


def _check_rows(page: _Page) -> list:
    rows = []
    for name, grad in page.grads.items():
        label = "x" if name == "x" else name
        for index in np.ndindex(grad.shape):
            written = (
                "".join(f"[{i + 1}]" for i in index)
                if name != "x"
                else f"{index[0] + 1}.{index[1] + 1}"
            )
            rows.append((f"dE/d{label}{written}", grad[index], page.autodiff[name][index]))
    return rows


def _worked_gradients(page_numbers: dict) -> dict:
    """dh, dp, ds, dq, dk, dv from the layer's cache, by its backward's docstring formulas."""
    n = page_numbers
    dh = n["dy"] @ n["params"]["Wo"].T
    dp = dh @ n["v"].T
    ds = n["p"] * (dp - np.sum(dp * n["p"], axis=-1, keepdims=True))
    return {
        "dh": dh,
        "dp": dp,
        "ds": ds,
        "dq": ds @ n["k"] * n["scale"],
        "dk": ds.T @ n["q"] * n["scale"],
        "dv": n["p"].T @ dh,
    }


def _checked_inputs(layer, x: np.ndarray) -> None:
    config = dict(layer.config)
    if config["num_heads"] != 1:
        raise ConfigError(
            f"trace file: the attention trace follows one head; expected "
            f"num_heads 1, got {config['num_heads']}"
        )
    if x.ndim != 2 or x.shape[0] > MAX_TOKENS or x.shape[1] > MAX_DIM:
        raise ConfigError(
            f"trace file: the attention trace prints every number of one "
            f"sequence; expected inputs of shape (tokens, dim) with at most "
            f"{MAX_TOKENS} tokens of dimension {MAX_DIM}, got shape {x.shape}"
        )


def _page(spec: dict, example: dict) -> tuple:
    layer, x, params = spec_layer(spec, example, check=_checked_inputs)
    step = layer_step(layer, params, x, spec, example)
    _, q, k, v, probs, heads = (float64(a) for a in step.cache)
    numbers = {
        "params": {key: float64(value) for key, value in params.items()},
        "x": x,
        "t": step.t,
        "q": q[:, 0],
        "k": k[:, 0],
        "v": v[:, 0],
        "p": probs[0],
        "h": heads,
        "y": step.y,
        "dy": step.dy,
        "scale": 1 / math.sqrt(x.shape[1]),
    }
    causal = dict(layer.config)["causal"]
    mask = np.tril(np.ones((x.shape[0],) * 2, bool)) if causal else np.ones((x.shape[0],) * 2, bool)
    page = _Page(
        **numbers,
        mask=mask,
        **_worked_gradients(numbers),
        grads=step.grads,
        autodiff=step.autodiff,
        loss=step.loss,
    )
    return layer, page


def _numbers(page: _Page) -> dict:
    scores = [
        [
            float(page.q[t] @ page.k[u]) * page.scale if page.mask[t, u] else None
            for u in range(page.tokens)
        ]
        for t in range(page.tokens)
    ]
    forward = {"q": page.q, "k": page.k, "v": page.v, "p": page.p, "h": page.h, "y": page.y}
    worked = {
        "y": page.dy,
        "h": page.dh,
        "p": page.dp,
        "s": page.ds,
        "q": page.dq,
        "k": page.dk,
        "v": page.dv,
    }
    return {
        "forward": {"s": scores, **dict_of_lists(forward)},
        "loss": page.loss,
        "gradients": {**dict_of_lists(page.grads), "intermediate": dict_of_lists(worked)},
    }


def trace_attention(spec: dict, example: dict = EXAMPLE) -> TracedLayer:
    """Trace one step of the one-head MultiHeadAttention a trace file describes."""
    import jax

    with jax.enable_x64(True):
        layer, page = _page(spec, example)
    sections = [
        _setup_section(page, dict(layer.config)["causal"]),
        forward_section(page),
        error_section(page),
        backward_section(page),
        check_section(_check_rows(page)),
    ]
    return traced_layer("attention", layer, page, page.params, sections, _numbers(page))
