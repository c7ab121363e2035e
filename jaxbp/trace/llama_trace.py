"""The worked example of a Llama block: ``jaxbp trace --example llama``.

The ``llama`` preset at its smallest: 3 tokens, width 4, 2 query heads of width 2 sharing 1
key/value head, a SwiGLU of 3 hidden units, logits through the embedding matrix transposed
(``tied``). The loss is the language model's: softmax cross-entropy of each position's logits
against its next token, averaged over the 3 positions.

Every number is worked out here in numpy from the printed formulas: RMSNorm and its backward,
the rotary rotation of queries and keys and its inverse in the backward, the scores, softmax
and causal mask of both heads, the two heads' key and value gradients summed into the one
shared head, SwiGLU's gate ``silu(a) * b`` and its slope, and the embedding matrix's gradient
as the sum of its two uses (the rows the tokens picked, and the logits). Each gradient is then
checked against the network's own hand-written ``backward`` (a disagreement above 1e-10 is a
trace bug and raises) and, in the closing table, against ``jax.grad``.

Names: ``t`` a position (1-3), ``x0`` the embedded tokens, ``n1``/``n2``/``n3`` the three
RMSNorms' outputs, ``q``/``k``/``v`` the projections, ``qr``/``kr`` after the rotation, head
``h`` sees query columns ``2h-1, 2h`` and the shared key/value head, ``x1``/``x2`` the residual
stream after attention and after SwiGLU; a quantity's gradient is ``d`` before its name.
"""

from __future__ import annotations

import functools
import json

import numpy as np

from .config import ConfigError
from .layer_traces import TracedLayer, build_layer, check_section, float64, nested_array
from .notation import computed, factor
from .render import Lines, Paragraph, Section

__all__ = ["EXAMPLE", "trace_llama"]

VOCAB, WIDTH, HEADS, HIDDEN, TOKENS = 5, 4, 2, 3, 3
EXAMPLE = {
    "model": {
        "name": "tied",
        "layers": [
            {"name": "Embedding", "vocab_size": VOCAB, "dim": WIDTH},
            {
                "name": "residual",
                "layers": [
                    {"name": "RMSNorm"},
                    {
                        "name": "MultiHeadAttention",
                        "num_heads": HEADS,
                        "causal": True,
                        "num_kv_heads": 1,
                        "rope": True,
                        "bias": False,
                    },
                ],
            },
            {
                "name": "residual",
                "layers": [{"name": "RMSNorm"}, {"name": "SwiGLU", "hidden": HIDDEN}],
            },
            {"name": "RMSNorm"},
            {"name": "Dense", "out_dim": VOCAB},
        ],
        "source": "0.W",
        "target": "4.W",
        "transpose": True,
    },
    "inputs": [1, 3, 0],
    "targets": [3, 0, 2],
}
AGREE = 1e-10  # the printed numbers vs the network's own backward (float64)


def _checked_model(spec: dict):
    from ..model import describe

    layer = build_layer(spec)

    if describe(layer) != describe(build_layer(EXAMPLE)):
        raise ConfigError(
            "trace file: the llama trace traces its built-in block only (vocabulary 5, width 4, "
            "2 heads, 1 key/value head, SwiGLU hidden 3); change inputs and targets instead"
        )
    if "params" in spec:
        raise ConfigError(
            "trace file: the llama trace takes its params from init (key 0, rounded to two "
            "places); leave params out"
        )
    return layer


def _tokens(spec: dict, key: str) -> np.ndarray:
    value = nested_array(spec.get(key, EXAMPLE[key]), key)
    if value.shape != (TOKENS,) or np.any(value != np.round(value)) or np.any(value < 0):
        raise ConfigError(f"trace file: {key} must be {TOKENS} token ids in [0, {VOCAB})")
    if np.any(value >= VOCAB):
        raise ConfigError(f"trace file: {key} must be {TOKENS} token ids in [0, {VOCAB})")
    return value.astype(int)


def _vec(values) -> str:
    return "[" + ", ".join(computed(v) for v in np.ravel(values)) + "]"


def _agree(mine, theirs, what: str) -> None:
    if np.max(np.abs(np.asarray(mine) - float64(theirs))) > AGREE:
        raise RuntimeError(f"trace bug: {what}: the printed numbers are not the layer's")


def _rms(x, scale, eps):
    rstd = 1 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
    return x * rstd * scale, rstd


def _rms_backward(x, rstd, scale, dy):
    """``dscale = sum_t dy * x * rstd``; ``dx = rstd * (g - x * rstd^2 * mean(g * x))`` with
    ``g = dy * scale``: the direct path, less the path through ``rstd``."""
    g = dy * scale
    inner = np.mean(g * x, axis=-1, keepdims=True)
    return np.sum(dy * x * rstd, axis=0), rstd * (g - x * rstd**2 * inner), inner


def _rotate(a, cos, sin):
    """``a * cos + rotate_half(a) * sin``; with width 2 the pair ``(a1, a2)`` turned by angle
    ``t - 1`` (position ``t``, counted from 1)."""
    return a * cos + np.concatenate([-a[..., 1:], a[..., :1]], axis=-1) * sin


def _numbers(spec: dict) -> dict:
    import jax
    import jax.numpy as jnp

    from ..model import describe

    net = _checked_model(spec)
    tokens, targets = _tokens(spec, "inputs"), _tokens(spec, "targets")
    _, initial = net.init(jax.random.PRNGKey(0), (TOKENS,))
    params = jax.tree_util.tree_map(lambda v: jnp.asarray(np.round(float64(v), 2)), initial)
    (emb, (norm1, attn), (norm2, mlp), norm3, head) = params
    eps = dict(net.children[3].config)["eps"]
    E = float64(emb["W"])
    g1, g2, g3 = (float64(p["scale"]) for p in (norm1, norm2, norm3))
    Wq, Wk, Wv, Wo = (float64(attn[k]) for k in ("Wq", "Wk", "Wv", "Wo"))
    W1, W2, W3 = (float64(mlp[k]) for k in ("W1", "W2", "W3"))
    bias = float64(head["b"])
    n: dict = {"tokens": tokens, "targets": targets, "eps": eps, "E": E, "bias": bias}
    n.update(g1=g1, g2=g2, g3=g3, Wq=Wq, Wk=Wk, Wv=Wv, Wo=Wo, W1=W1, W2=W2, W3=W3)

    # Forward.
    x0 = E[tokens]
    n1, r1 = _rms(x0, g1, eps)
    q, k, v = n1 @ Wq, n1 @ Wk, n1 @ Wv
    angle = np.arange(TOKENS, dtype=np.float64)[:, None]  # head width 2: one pair, frequency 1
    cos, sin = np.cos(angle), np.sin(angle)
    qh = q.reshape(TOKENS, HEADS, 2)
    qr = _rotate(qh, cos[:, None], sin[:, None])
    kr = _rotate(k, cos, sin)
    mask = np.triu(np.ones((TOKENS, TOKENS), bool), 1)
    s = np.einsum("thd,ud->htu", qr, kr) / np.sqrt(2.0)
    s = np.where(mask, -np.inf, s)
    p = np.exp(s - s.max(-1, keepdims=True))
    p = p / p.sum(-1, keepdims=True)
    o = np.einsum("htu,ud->thd", p, v).reshape(TOKENS, WIDTH)
    ya = o @ Wo
    x1 = x0 + ya
    n2, r2 = _rms(x1, g2, eps)
    a, b = n2 @ W1, n2 @ W3
    sig = 1 / (1 + np.exp(-a))
    silu = a * sig
    m = silu * b
    ym = m @ W2
    x2 = x1 + ym
    n3, r3 = _rms(x2, g3, eps)
    logits = n3 @ E.T + bias
    prob = np.exp(logits - logits.max(-1, keepdims=True))
    prob /= prob.sum(-1, keepdims=True)
    loss = float(-np.mean(np.log(prob[np.arange(TOKENS), targets])))
    n.update(x0=x0, n1=n1, r1=r1, q=q, k=k, v=v, cos=cos, sin=sin, qr=qr, kr=kr, s=s, p=p)
    n.update(o=o, ya=ya, x1=x1, n2=n2, r2=r2, a=a, b=b, sig=sig, silu=silu, m=m, ym=ym)
    n.update(x2=x2, n3=n3, r3=r3, logits=logits, prob=prob, loss=loss)

    # Backward.
    dlogits = (prob - np.eye(VOCAB)[targets]) / TOKENS
    dE_out = dlogits.T @ n3  # the logits' use of E, in E's layout [v][d]
    dbias = dlogits.sum(0)
    dn3 = dlogits @ E
    dg3, dx2, in3 = _rms_backward(x2, r3, g3, dn3)
    dm = dx2 @ W2.T
    dW2 = m.T @ dx2
    slope = sig * (1 + a * (1 - sig))
    da, db = dm * b * slope, dm * silu
    dW1, dW3 = n2.T @ da, n2.T @ db
    dn2 = da @ W1.T + db @ W3.T
    dg2, dx1_mlp, in2 = _rms_backward(x1, r2, g2, dn2)
    dx1 = dx2 + dx1_mlp
    do = (dx1 @ Wo.T).reshape(TOKENS, HEADS, 2)
    dWo = o.T @ dx1
    dp = np.einsum("thd,ud->htu", do, v)
    dv_heads = np.einsum("htu,thd->hud", p, do)
    ds = p * (dp - np.sum(dp * p, -1, keepdims=True))
    dqr = np.einsum("htu,ud->thd", ds, kr) / np.sqrt(2.0)
    dkr_heads = np.einsum("htu,thd->hud", ds, qr) / np.sqrt(2.0)
    dkr, dv = dkr_heads.sum(0), dv_heads.sum(0)
    dq = _rotate(dqr, cos[:, None], -sin[:, None]).reshape(TOKENS, WIDTH)
    dk = _rotate(dkr, cos, -sin)
    dWq, dWk, dWv = n1.T @ dq, n1.T @ dk, n1.T @ dv
    dn1 = dq @ Wq.T + dk @ Wk.T + dv @ Wv.T
    dg1, dx0_attn, in1 = _rms_backward(x0, r1, g1, dn1)
    dx0 = dx1 + dx0_attn
    dE_in = np.zeros_like(E)
    np.add.at(dE_in, tokens, dx0)
    dE = dE_in + dE_out
    n.update(dlogits=dlogits, dE_out=dE_out, dbias=dbias, dn3=dn3, dg3=dg3, dx2=dx2, in3=in3)
    n.update(dm=dm, dW2=dW2, slope=slope, da=da, db=db, dW1=dW1, dW3=dW3, dn2=dn2, dg2=dg2)
    n.update(dx1_mlp=dx1_mlp, dx1=dx1, in2=in2, do=do, dWo=dWo, dp=dp, dv_heads=dv_heads)
    n.update(ds=ds, dqr=dqr, dkr_heads=dkr_heads, dkr=dkr, dv=dv, dq=dq, dk=dk)
    n.update(dWq=dWq, dWk=dWk, dWv=dWv, dn1=dn1, dg1=dg1, dx0_attn=dx0_attn, dx0=dx0, in1=in1)
    n.update(dE_in=dE_in, dE=dE)

    # The network's own forward and backward, and jax.grad, on the same params and tokens.
    out, value, grads, auto = _network(json.dumps(describe(net)))(
        params, jnp.asarray(tokens), jnp.asarray(targets)
    )
    _agree(logits, out, "logits")
    _agree(loss, value, "loss")
    manual, autodiff = {}, {}
    for name, mine, path in _PARAMS:
        manual[name], autodiff[name] = float64(path(grads)), float64(path(auto))
        _agree(n[mine], manual[name], f"dE/d{name}")
    n.update(manual=manual, autodiff=autodiff, net=net, params=params)
    return n


@functools.cache
def _network(description: str):
    """``(params, tokens, targets) -> (logits, loss, backward's grads, jax.grad's)``, jitted
    once per model: op by op, the first trace took 11 s (each operation compiled alone)."""
    import jax

    from ..losses import softmax_cross_entropy
    from ..model import build

    net = build(json.loads(description))

    @jax.jit
    def network(params, x_in, t_in):
        def value(p_):
            return softmax_cross_entropy.value(net.forward(p_, x_in)[0], t_in)

        out, cache = net.forward(params, x_in)
        grads, _ = net.backward(params, cache, softmax_cross_entropy.grad(out, t_in))
        return out, softmax_cross_entropy.value(out, t_in), grads, jax.grad(value)(params)

    return network


# (name in the check table, key of the printed gradient, where the network keeps it)
_PARAMS = [
    ("Wt", "dE", lambda g: g[0]["W"]),
    ("g1", "dg1", lambda g: g[1][0]["scale"]),
    ("Wq", "dWq", lambda g: g[1][1]["Wq"]),
    ("Wk", "dWk", lambda g: g[1][1]["Wk"]),
    ("Wv", "dWv", lambda g: g[1][1]["Wv"]),
    ("Wo", "dWo", lambda g: g[1][1]["Wo"]),
    ("g2", "dg2", lambda g: g[2][0]["scale"]),
    ("W1", "dW1", lambda g: g[2][1]["W1"]),
    ("W2", "dW2", lambda g: g[2][1]["W2"]),
    ("W3", "dW3", lambda g: g[2][1]["W3"]),
    ("g3", "dg3", lambda g: g[3]["scale"]),
    ("b", "dbias", lambda g: g[4]["b"]),
]


def _rows(label: str, matrix, start: int = 1) -> list[str]:
    """One line per row: ``label`` ``"x1 = x0 + o Wo"`` gives ``x1[t] = (x0 + o Wo)[t] = [...]``.
    Rows count from 1 (positions), Wt's from 0 (the token ids that pick them)."""
    symbol, _, formula = label.partition(" = ")
    lines = []
    for t, row in enumerate(np.asarray(matrix), start):
        middle = f" = ({formula})[{t}]" if formula else ""
        lines.append(f"{symbol}[{t}]{middle} = {_vec(row)}")
    return lines


def _setup_section(n: dict) -> Section:
    lines = [
        f"tokens = {[int(t) for t in n['tokens']]}, next tokens (targets) = "
        f"{[int(t) for t in n['targets']]}",
        *_rows("Wt", n["E"], start=0),
        f"g1 = {_vec(n['g1'])}, g2 = {_vec(n['g2'])}, g3 = {_vec(n['g3'])}",
        f"b = {_vec(n['bias'])}",
        *(
            line
            for key in ("Wq", "Wk", "Wv", "Wo", "W1", "W3", "W2")
            for line in _rows(key, n[key])
        ),
    ]
    return Section(
        "A Llama block: 3 tokens, width 4, 2 heads sharing 1 key/value head",
        [
            Paragraph(
                "Embedding Wt (5 tokens x width 4), x + attention(RMSNorm(x)) with rope, "
                "x + SwiGLU(RMSNorm(x)), a final RMSNorm and logits = n3 Wt^T + b: Wt is used "
                "twice. Params: init with key 0, rounded to two places (rows of each matrix "
                f"below); RMSNorm's eps = {n['eps']:g}."
            ),
            Lines(lines),
        ],
    )


def _rms_lines(tag: str, x_name: str, x, rstd, g, out) -> list[str]:
    lines = []
    for t in range(TOKENS):
        ms = float(np.mean(x[t] ** 2))
        lines.append(
            f"rstd{tag}[{t + 1}] = 1/sqrt(mean({x_name}[{t + 1}]^2) + eps) = "
            f"1/sqrt({computed(ms)}) = {computed(rstd[t, 0])}; "
            f"n{tag}[{t + 1}] = {x_name}[{t + 1}] * rstd * g{tag} = {_vec(out[t])}"
        )
    return lines


def _forward_section(n: dict) -> Section:
    lines = [
        f"x0[{t + 1}] = Wt[{int(tok)}] = {_vec(n['x0'][t])}" for t, tok in enumerate(n["tokens"])
    ]
    lines += _rms_lines("1", "x0", n["x0"], n["r1"], n["g1"], n["n1"])
    lines += _rows("q = n1 Wq", n["q"]) + _rows("k = n1 Wk", n["k"]) + _rows("v = n1 Wv", n["v"])
    rope = []
    for t in range(TOKENS):
        c, s = n["cos"][t, 0], n["sin"][t, 0]
        for h in range(HEADS):
            a1, a2 = n["q"][t, 2 * h : 2 * h + 2]
            rope.append(
                f"qr{h + 1}[{t + 1}] = (q1 cos - q2 sin, q2 cos + q1 sin) = "
                f"({factor(a1)}*{factor(c)} - {factor(a2)}*{factor(s)}, "
                f"{factor(a2)}*{factor(c)} + {factor(a1)}*{factor(s)}) = {_vec(n['qr'][t, h])}"
            )
        k1, k2 = n["k"][t]
        rope.append(
            f"kr[{t + 1}] = ({factor(k1)}*{factor(c)} - {factor(k2)}*{factor(s)}, "
            f"{factor(k2)}*{factor(c)} + {factor(k1)}*{factor(s)}) = {_vec(n['kr'][t])}"
        )
    attention = []
    for h in range(HEADS):
        for t in range(TOKENS):
            scores = ", ".join(
                "masked" if u > t else computed(n["s"][h, t, u]) for u in range(TOKENS)
            )
            attention.append(
                f"s{h + 1}[{t + 1}] = qr{h + 1}[{t + 1}] . kr[u] / sqrt(2) = [{scores}]; "
                f"p{h + 1}[{t + 1}] = softmax = {_vec(n['p'][h, t])}"
            )
    attention += _rows("o = (p1 v | p2 v)", n["o"]) + _rows("x1 = x0 + o Wo", n["x1"])
    mlp = _rms_lines("2", "x1", n["x1"], n["r2"], n["g2"], n["n2"])
    for t in range(TOKENS):
        mlp.append(
            f"a[{t + 1}] = n2 W1 = {_vec(n['a'][t])}, b[{t + 1}] = n2 W3 = {_vec(n['b'][t])}, "
            f"silu(a) = a*sigmoid(a) = {_vec(n['silu'][t])}, m = silu(a)*b = {_vec(n['m'][t])}"
        )
    mlp += _rows("x2 = x1 + m W2", n["x2"])
    out = _rms_lines("3", "x2", n["x2"], n["r3"], n["g3"], n["n3"])
    out += _rows("logits = n3 Wt^T + b", n["logits"])
    out += [
        "E = -1/3 sum_t log softmax(logits[t])[target_t] = -1/3 ("
        + " + ".join(f"log {computed(n['prob'][t, tgt])}" for t, tgt in enumerate(n["targets"]))
        + f") = {computed(n['loss'])}"
    ]
    return Section(
        "Forward pass",
        [
            Paragraph("Embedding and the first RMSNorm:"),
            Lines(lines),
            Paragraph(
                "Rotary positions: position t turns each head's (q1, q2) and the key's "
                "(k1, k2) by the angle t - 1 (cos and sin of 0, 1, 2):"
            ),
            Lines(rope),
            Paragraph("Both query heads score against the one shared key/value head (causal):"),
            Lines(attention),
            Paragraph("SwiGLU: a gate silu(a) times an up projection b, then W2:"),
            Lines(mlp),
            Paragraph("The final RMSNorm and the logits through Wt transposed:"),
            Lines(out),
        ],
    )


def _sum_entries(name: str, first: str, second: str, a, b, total) -> list[str]:
    return [
        f"dE/d{name}[{i}][{j + 1}] = {first}[{i}][{j + 1}] + {second}[{i}][{j + 1}] = "
        f"{factor(a[i, j])} + {factor(b[i, j])} = {computed(total[i, j])}"
        for i, j in np.ndindex(total.shape)
    ]


def _backward_section(n: dict) -> Section:
    head = _rows("dlogits = (softmax - onehot(target)) / 3", n["dlogits"])
    head += [f"dE/db = sum_t dlogits[t] = {_vec(n['dbias'])}"]
    head += _rows("dn3 = dlogits Wt", n["dn3"])

    def rms(tag, x_name, inner, dg, dx, what):
        return [
            f"mean(dn{tag} * g{tag} * {x_name})[{t + 1}] = {computed(inner[t, 0])}; "
            f"{what}[{t + 1}] = rstd * (dn{tag} * g{tag} - {x_name} * rstd^2 * mean) = "
            f"{_vec(dx[t])}"
            for t in range(TOKENS)
        ] + [f"dE/dg{tag} = sum_t dn{tag} * {x_name} * rstd = {_vec(dg)}"]

    norm3 = rms("3", "x2", n["in3"], n["dg3"], n["dx2"], "dx2")
    mlp = _rows("dm = dx2 W2^T", n["dm"])
    for t in range(TOKENS):
        mlp.append(
            f"silu'(a[{t + 1}]) = sig (1 + a (1 - sig)) = {_vec(n['slope'][t])}; "
            f"da = dm * b * silu'(a) = {_vec(n['da'][t])}; db = dm * silu(a) = "
            f"{_vec(n['db'][t])}"
        )
    mlp += _rows("dE/dW2 = m^T dx2", n["dW2"]) + _rows("dE/dW1 = n2^T da", n["dW1"])
    mlp += _rows("dE/dW3 = n2^T db", n["dW3"]) + _rows("dn2 = da W1^T + db W3^T", n["dn2"])
    mlp += rms("2", "x1", n["in2"], n["dg2"], n["dx1_mlp"], "dx1 (through SwiGLU)")
    mlp += _rows("dx1 = dx2 + dx1 (through SwiGLU)", n["dx1"])
    attention = _rows("dE/dWo = o^T dx1", n["dWo"])
    for h in range(HEADS):
        for t in range(TOKENS):
            attention.append(
                f"dp{h + 1}[{t + 1}] = do{h + 1}[{t + 1}] . v[u] = {_vec(n['dp'][h, t])}; "
                f"ds{h + 1}[{t + 1}] = p * (dp - sum(dp * p)) = {_vec(n['ds'][h, t])}"
            )
    grouped = []
    for u in range(TOKENS):
        for what, key, heads in (("kr", "dkr", "dkr_heads"), ("v", "dv", "dv_heads")):
            for d in range(2):
                parts = n[heads][:, u, d]
                grouped.append(
                    f"dE/d{what}[{u + 1}][{d + 1}] = head 1 + head 2 = "
                    f"{factor(parts[0])} + {factor(parts[1])} = {computed(n[key][u, d])}"
                )
    inverse = []
    for t in range(TOKENS):
        c, s = n["cos"][t, 0], n["sin"][t, 0]
        for h in range(HEADS):
            g1, g2 = n["dqr"][t, h]
            inverse.append(
                f"dq{h + 1}[{t + 1}] = (dqr1 cos + dqr2 sin, dqr2 cos - dqr1 sin) = "
                f"({factor(g1)}*{factor(c)} + {factor(g2)}*{factor(s)}, "
                f"{factor(g2)}*{factor(c)} - {factor(g1)}*{factor(s)}) = "
                f"{_vec(n['dq'][t, 2 * h : 2 * h + 2])}"
            )
        k1, k2 = n["dkr"][t]
        inverse.append(
            f"dk[{t + 1}] = ({factor(k1)}*{factor(c)} + {factor(k2)}*{factor(s)}, "
            f"{factor(k2)}*{factor(c)} - {factor(k1)}*{factor(s)}) = {_vec(n['dk'][t])}"
        )
    projections = _rows("dE/dWq = n1^T dq", n["dWq"]) + _rows("dE/dWk = n1^T dk", n["dWk"])
    projections += _rows("dE/dWv = n1^T dv", n["dWv"])
    projections += _rows("dn1 = dq Wq^T + dk Wk^T + dv Wv^T", n["dn1"])
    projections += rms("1", "x0", n["in1"], n["dg1"], n["dx0_attn"], "dx0 (through attention)")
    projections += _rows("dx0 = dx1 + dx0 (through attention)", n["dx0"])
    tied = [
        f"embedding use: dE_in[{int(tok)}] += dx0[{t + 1}]" for t, tok in enumerate(n["tokens"])
    ]
    tied += _rows("dE_in", n["dE_in"], start=0)
    tied += _rows("dE_out = dlogits^T n3", n["dE_out"], start=0)
    tied += _sum_entries("Wt", "dE_in", "dE_out", n["dE_in"], n["dE_out"], n["dE"])
    return Section(
        "Backward pass",
        [
            Paragraph("The logits, their bias and the final RMSNorm's backward:"),
            Lines(head + norm3),
            Paragraph("SwiGLU's backward (the gate's slope silu') and the second RMSNorm:"),
            Lines(mlp),
            Paragraph("Attention's backward, head by head (do = dx1 Wo^T, split by head):"),
            Lines(attention),
            Paragraph(
                "The two query heads share one key/value head, so its gradients are the "
                "heads' sums (dkr[u] = ds^T qr / sqrt(2), dv[u] = p^T do, per head):"
            ),
            Lines(grouped),
            Paragraph(
                "The inverse rotation: each gradient turned back by the angle t - 1 "
                "(the rotation's transpose is its inverse):"
            ),
            Lines(inverse),
            Paragraph("The projections and the first RMSNorm:"),
            Lines(projections),
            Paragraph(
                "Wt is used twice, so its gradient is the sum of both uses: the rows the tokens "
                "picked (scatter-add of dx0) and the logits (dlogits^T n3):"
            ),
            Lines(tied),
        ],
    )


def _check_rows(n: dict) -> list:
    rows = []
    for name, _, _ in _PARAMS:
        manual, auto = n["manual"][name], n["autodiff"][name]
        for index in np.ndindex(manual.shape):
            # Wt's first axis is the token id (from 0), every other index counts from 1.
            shift = [0 if name == "Wt" and axis == 0 else 1 for axis in range(len(index))]
            label = f"dE/d{name}" + "".join(f"[{k + s}]" for k, s in zip(index, shift))
            rows.append((label, manual[index], auto[index]))
    return rows


def trace_llama(spec: dict, example: dict = EXAMPLE) -> TracedLayer:
    """Trace one step of the built-in Llama block (``spec`` may change its tokens)."""
    import jax

    from ..model import describe

    with jax.enable_x64(True):
        n = _numbers(spec)
    sections = [_setup_section(n), _forward_section(n), _backward_section(n)]
    sections.append(check_section(_check_rows(n)))
    used = {
        "model": describe(n["net"]),
        "inputs": n["tokens"].tolist(),
        "targets": n["targets"].tolist(),
    }
    keys = ("x0", "n1", "q", "k", "v", "qr", "kr", "o", "x1", "n2", "a", "b", "m", "x2", "n3")
    numbers = {key: n[key].tolist() for key in (*keys, "logits", "dlogits", "dE_in", "dE_out")}
    numbers["p"] = n["p"].tolist()
    numbers["loss"] = n["loss"]
    numbers["params"] = jax.tree_util.tree_map(lambda a: float64(a).tolist(), n["params"])
    numbers["grads"] = {k: v.tolist() for k, v in n["manual"].items()}
    return TracedLayer("llama", used, numbers, sections, n["manual"], n["autodiff"])
