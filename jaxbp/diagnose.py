"""When a check fails: which layer is wrong, and what kind of mistake it looks like.

:func:`locate` replays one step with every node of the layer tree recording its input and the
cotangent it received, and compares each node's manual backward with ``jax.vjp`` of that
node's own forward at the same input and cotangent. Walking from the output (the loss first,
then each node as its backward finishes), the first node that disagrees is the culprit: a
wrong ``dx`` upstream of it never makes an earlier node look wrong, because each node is
judged on the cotangent it was actually handed. It costs a second backward and one VJP per
node, so it runs only after a check failed.

:func:`diagnose` names the pattern of a wrong gradient ``a`` against the right one ``b``:
a flipped sign, a constant factor (one over the batch, a missing 1/2), a transpose, a zero
where the gradient is not (a missing term), a few wrong entries (how many, where), or no
simple pattern.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .layers import Layer, apply
from .losses import get_loss
from .probe import descendants, is_combinator, nodes, rebuild

__all__ = ["locate", "diagnose", "Culprit"]


class Culprit(NamedTuple):
    """The node whose manual backward disagrees with ``jax.vjp`` of its own forward."""

    index: int  # type: ignore[assignment]  # in jaxbp.layer_paths(net, loss)
    path: str  # "serial[3]/residual[1] (MultiHeadAttention)"
    leaf: str  # "dW", "db", "dx", "dE/dout"
    diagnosis: str  # "a factor of 2.000 (a missing 1/2?)"
    report: Any  # the node's GradReport (manual vs jax.vjp of its forward)

    def __str__(self) -> str:
        return (
            f"layer {self.path}: {self.leaf} disagrees with jax.vjp of its forward; "
            f"looks like: {self.diagnosis}"
        )


def _recording(net: Layer, tape: list) -> Layer:
    """``net`` with every node recording ``(index, manual, reference)`` as its backward
    finishes; the forward computes exactly what ``net`` does."""
    counter = [0]

    def wrap(layer: Layer) -> Layer:
        index = counter[0]
        counter[0] += 1
        if is_combinator(layer):
            inner = rebuild(layer, [wrap(c) for c in layer.children])
        else:
            counter[0] += descendants(layer)
            inner = layer

        def run(params, state, x, context):
            y, cache, new_state = apply(
                inner, params, state, x, key=context.key, train=context.train
            )
            return y, (cache, x, state, context), new_state

        def backward(params, cache, dy):
            inner_cache, x, state, context = cache
            dp, dx = inner.backward(params, inner_cache, dy)

            def f(p, xx):
                return apply(inner, p, state, xx, key=context.key, train=context.train)[0]

            if jnp.issubdtype(jnp.result_type(x), jnp.inexact):
                _, vjp = jax.vjp(f, params, x)
                ref_p, ref_x = vjp(dy)
                tape.append((index, {"params": dp, "x": dx}, {"params": ref_p, "x": ref_x}, x, dy))
            else:  # token ids: the parameters only
                _, vjp = jax.vjp(lambda p: f(p, x), params)
                (ref_p,) = vjp(dy)
                tape.append((index, {"params": dp}, {"params": ref_p}, x, dy))
            return dp, dx

        def forward(params, x):
            from .layers import Context

            y, cache, _ = run(params, (), x, Context())
            return y, cache

        if inner.has_state:
            from .layers import Context, init_state

            def stateful_forward(params, x):
                y, cache, _ = run(params, init_state(inner, jnp.shape(x)), x, Context())
                return y, cache

            return Layer(
                layer.init,
                stateful_forward,
                backward,
                layer.name,
                layer.config,
                inner.init_state,
                run,
            )
        return Layer(layer.init, forward, backward, layer.name, layer.config)

    return wrap(net)


def _leaf_label(path: str) -> str:
    # "['params']['W']" -> "dW"; "['x']" -> "dx"; "['params'][1]['b']" -> "d[1]['b']"
    if path == "['x']":
        return "dx"
    rest = path.removeprefix("['params']")
    if rest.startswith("['") and rest.endswith("']") and rest.count("[") == 1:
        return "d" + rest[2:-2]
    return "d" + (rest or "params")


def locate(
    net: Layer,
    loss,
    params,
    x,
    y,
    *,
    state=None,
    key=None,
    train: bool = True,
    rtol: float | None = None,
    atol: float | None = None,
) -> Culprit | None:
    """The culprit of a failed check on this batch, or ``None`` if every node agrees with
    ``jax.vjp`` of its own forward (module docstring)."""
    from .gradcheck import compare_grads
    from .layers import init_state

    loss = get_loss(loss)
    all_nodes = nodes(net, loss.name)
    tape: list = []
    rec = _recording(net, tape)
    start = init_state(net, jnp.shape(x)) if state is None or state == () else state
    out, cache, _ = apply(rec, params, start, x, key=key, train=train)
    g = loss.grad(out, y)
    ref_g = jax.grad(lambda o: loss.value(o, y))(out)
    order = [(len(all_nodes) - 1, {"dE/dout": g}, {"dE/dout": ref_g}, out, None)]
    rec.backward(params, cache, g)
    order += tape
    for index, manual, reference, inp, dy in order:
        report = compare_grads(manual, reference, rtol=rtol, atol=atol)
        if bool(report.ok):
            continue
        worst = report.worst_path
        a = _pick(manual, worst)
        b = _pick(reference, worst)
        batch = int(jnp.shape(inp)[0]) if jnp.ndim(inp) >= 2 else None
        label = "dE/dout" if worst == "['dE/dout']" else _leaf_label(worst)
        incoming = dy if label == "dx" else None
        return Culprit(
            index,
            all_nodes[index].path,
            label,
            diagnose(a, b, batch=batch, incoming=incoming),
            report,
        )
    return None


def _pick(tree, path: str):
    for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if jax.tree_util.keystr(p) == path:
            return leaf
    raise KeyError(path)


# --------------------------------------------------------------------------------------------
# The kind of mistake
# --------------------------------------------------------------------------------------------


def _close(a, b, rel: float) -> bool:
    scale = max(float(np.max(np.abs(b))) if b.size else 0.0, np.finfo(np.float64).tiny)
    return bool(np.max(np.abs(a - b)) <= rel * scale) if a.size else True


_KNOWN_FACTORS = {
    2.0: "a missing 1/2?",
    0.5: "an extra 1/2?",
    -1.0: "",
}


def diagnose(
    manual, reference, *, batch: int | None = None, rel: float | None = None, incoming=None
) -> str:
    """What ``manual`` (a wrong gradient) looks like next to ``reference`` (the right one).

    One line: ``"sign flipped"``, ``"a factor of 2.000 (a missing 1/2?)"``, ``"a factor of
    0.03125 = 1/32, one over the batch"``, ``"transposed"``, ``"zero where jax.grad is not
    (a missing term): 12 of 12 entries"``, ``"3 of 640 entries wrong, at (0, 0), (0, 1),
    (0, 2) (the first row: a boundary?)"``, or ``"no simple pattern (cosine 0.41, |a|/|b|
    1.3)"``. With ``incoming`` (the cotangent ``dy`` the layer was handed, when ``manual`` is
    its ``dx``) two more: ``dx`` equal to ``dy`` (the local derivative forgotten) and ``dx``
    short of exactly ``dy`` (a skip path dropped).
    """
    a = np.asarray(manual, np.float64)
    b = np.asarray(reference, np.float64)
    if rel is None:
        eps = float(jnp.finfo(jnp.result_type(manual)).eps)
        rel = max(1e3 * eps, 1e-9)
    if a.shape != b.shape:
        return f"the wrong shape: {a.shape} where {b.shape} was expected"
    if not np.all(np.isfinite(a)):
        return "non-finite entries (NaN or inf) in the manual gradient"
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if nb == 0:
        return "nonzero where jax.grad is zero (an extra term)"
    if na == 0:
        return f"zero where jax.grad is not (a missing term): all {a.size} entries"
    cos = float(np.sum(a * b) / (na * nb))
    ratio = na / nb
    if abs(cos) > 1 - 1e-6:
        factor = ratio if cos > 0 else -ratio
        if _close(a, factor * b, rel):
            if abs(factor + 1) <= 1e-6:
                return "sign flipped (a factor of -1)"
            return _factor_text(factor, batch)
    if a.ndim == 2 and a.shape[0] == a.shape[1] and a.shape[0] > 1 and _close(a, b.T, rel):
        return "transposed (equals the transpose of the gradient)"
    if a.ndim >= 2 and _close(a, np.flip(b, axis=tuple(range(a.ndim - 2))), rel) and a.ndim > 2:
        return "a flipped kernel (the spatial axes reversed)"
    if incoming is not None and np.shape(incoming) == a.shape:
        d = np.asarray(incoming, np.float64)
        if _close(a, d, rel):
            return "dx equals the incoming dy: the local derivative is missing"
        if _close(a + d, b, rel):
            return "dx is short of exactly the incoming dy: a skip path dropped?"
    scale = max(float(np.max(np.abs(b))), float(np.max(np.abs(a))))
    wrong = np.abs(a - b) > rel * scale
    count, total = int(np.sum(wrong)), a.size
    zero_where = (a == 0) & (b != 0)
    if count and int(np.sum(zero_where & wrong)) == count:
        return f"zero where jax.grad is not (a missing term): {count} of {total} entries" + _where(
            wrong
        )
    if count and count <= max(3, total // 100):
        return f"{count} of {total} entries wrong{_where(wrong)}"
    return f"no simple pattern (cosine {cos:.3g}, |a|/|b| {ratio:.3g}, {count} of {total} wrong)"


def _factor_text(factor: float, batch: int | None) -> str:
    text = f"a factor of {factor:.4g}"
    if batch and batch > 1:
        if abs(factor * batch - 1) < 1e-6:
            return f"{text} = 1/{batch}, one over the batch (an extra 1/batch?)"
        if abs(factor / batch - 1) < 1e-6:
            return f"{text}, the batch size (a missing 1/batch?)"
    for known, hint in _KNOWN_FACTORS.items():
        if hint and abs(factor / known - 1) < 1e-6:
            return f"{text} ({hint})"
    if factor < 0:
        return f"sign flipped and {text[2:]}"
    return text


def _where(wrong: np.ndarray) -> str:
    idx = np.argwhere(wrong)
    shown = ", ".join(str(tuple(int(i) for i in row)) for row in idx[:3])
    more = ", ..." if len(idx) > 3 else ""
    text = f", at {shown}{more}" if wrong.ndim else ""
    edges = (
        [
            bool(np.all((idx[:, d] == 0) | (idx[:, d] == wrong.shape[d] - 1)))
            for d in range(wrong.ndim)
        ]
        if wrong.ndim and len(idx)
        else []
    )
    if any(edges):
        text += " (all on an edge of the array: a boundary?)"
    return text
