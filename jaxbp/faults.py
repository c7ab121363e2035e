"""Fault injection: layers with a deliberately wrong backward pass, and poisoned data.

A gradient checker is only worth what it catches. This module makes the classic backprop bugs
on purpose, so that researchers (and jaxbp's own tests) can watch each check mode catch them::

    net = jaxbp.serial(jaxbp.Dense(3), jaxbp.Tanh, jaxbp.Dense(3))
    bad = jaxbp.faults.inject(net, 0, "sign")      # layer 0's dE/dW has the wrong sign
    step = jaxbp.make_train_step(bad, "mse", jaxbp.sgd(0.1), check="skip")
    # every step: metrics["ok"] False, metrics["reason"] REASON_MISMATCH, params unchanged

Fault kinds (:data:`FAULT_KINDS`), and what each one means:

==================  =========================================  ==================================
kind                ``Dense`` (one parameter gradient only)     element-wise activation (``dx``)
==================  =========================================  ==================================
``"sign"``          ``dW = -(x.T @ dy)``                        ``dx = -dy * f'(x)``
``"transpose"``     ``dW`` transposed (``(in, out)`` read as    not applicable: the Jacobian of an
                    ``(out, in)``; for a non-square ``W`` the    element-wise map is diagonal, so
                    transpose is read back in ``W``'s shape,     its transpose is itself
                    the silent form of that bug)
``"missing_term"``  the bias gradient dropped: ``db = 0``       the local derivative dropped:
                                                                ``dx = dy`` (forgot ``* f'(x)``)
``"factor2"``       ``dW = 2 x.T @ dy`` (the ``1/2`` of         ``dx = 2 dy * f'(x)``
                    ``1/2 (t - o)^2`` forgotten)
==================  =========================================  ==================================

A ``Dense`` fault changes exactly one leaf (``W``, or ``b`` for ``"missing_term"``), so the
checker's worst leaf is that leaf. An activation fault changes ``dx``, which flows into every
parameter *upstream* of the activation (and none downstream): the worst leaf is one of those.
``Identity`` has derivative 1, so ``"missing_term"`` does not apply to it either.

The faulty layer keeps its name and gains ``("fault", kind)`` in its config, so
``jaxbp.describe`` shows it; ``init`` and ``forward`` are untouched, so a faulty network has
exactly the parameters and outputs of the correct one.

``python -m jaxbp.faults`` runs the fault-injection matrix (every fault x every check mode) and
prints it as a Markdown table: the table in ``docs/reliability.md`` comes from it.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp

from .layers import Layer, serial

__all__ = ["FAULT_KINDS", "wrong_backward", "inject", "poison", "fault_matrix", "format_matrix",
           "nonfinite_matrix", "format_nonfinite"]

FAULT_KINDS = ("sign", "transpose", "missing_term", "factor2")


def _check_kind(kind):
    if kind not in FAULT_KINDS:
        raise ValueError(f"unknown fault kind {kind!r}; expected one of: {', '.join(FAULT_KINDS)}")


def _transposed_like(g):
    # Square: exactly g.T. Non-square: g.T's numbers in g's shape, as a flat-buffer mix-up of
    # the (in, out) and (out, in) layouts would give; the shape still fits, the values do not.
    return g.T.reshape(g.shape)


def _wrong_dense(layer: Layer, kind: str) -> Layer:
    def backward(params, cache, dy):
        grads, dx = layer.backward(params, cache, dy)
        grads = dict(grads)
        if kind == "sign":
            grads["W"] = -grads["W"]
        elif kind == "transpose":
            grads["W"] = _transposed_like(grads["W"])
        elif kind == "missing_term":
            grads["b"] = jnp.zeros_like(grads["b"])
        else:  # factor2
            grads["W"] = 2 * grads["W"]
        return grads, dx

    return layer._replace(backward=backward)


def _wrong_elementwise(layer: Layer, kind: str) -> Layer:
    if kind == "transpose":
        raise ValueError(f"fault 'transpose' does not apply to the element-wise layer "
                         f"{layer.name}: its Jacobian is diagonal, so it is its own transpose; "
                         f"expected one of: sign, missing_term, factor2")
    if kind == "missing_term" and layer.name == "Identity":
        raise ValueError("fault 'missing_term' does not apply to Identity: its derivative is 1, "
                         "so dropping it changes nothing; expected one of: sign, factor2")

    def backward(params, cache, dy):
        grads, dx = layer.backward(params, cache, dy)
        if kind == "sign":
            dx = -dx
        elif kind == "missing_term":
            dx = dy
        else:  # factor2
            dx = 2 * dx
        return grads, dx

    return layer._replace(backward=backward)


def wrong_backward(layer: Layer, kind: str) -> Layer:
    """``layer`` with a backward pass that is wrong in the way ``kind`` names.

    ``layer`` is a ``Dense`` (the fault hits one parameter gradient) or any other single
    layer, meant for the element-wise activations (the fault hits ``dx``); ``kind`` is one of
    :data:`FAULT_KINDS` (see the module docstring for what each does to each layer).
    """
    _check_kind(kind)
    if not isinstance(layer, Layer):
        raise TypeError(f"wrong_backward expects a Layer, got {layer!r}")
    if layer.name == "Dense":
        faulty = _wrong_dense(layer, kind)
    elif layer.name == "serial":
        raise ValueError("wrong_backward expects a single layer, got a serial network; "
                         "use jaxbp.faults.inject(net, index, kind)")
    else:
        faulty = _wrong_elementwise(layer, kind)
    return faulty._replace(config=tuple(layer.config) + (("fault", kind),))


def inject(net: Layer, index: int, kind: str) -> Layer:
    """The ``serial`` network ``net`` with layer ``index`` replaced by ``wrong_backward(...)``.

    Negative indices count from the end (``-1`` is the last layer).
    """
    if not isinstance(net, Layer) or net.name != "serial":
        raise TypeError(f"inject expects a network built with jaxbp.serial, got {net!r}")
    layers = list(net.config)
    if not isinstance(index, int) or not -len(layers) <= index < len(layers):
        raise ValueError(f"inject: layer index must be an integer in "
                         f"[{-len(layers)}, {len(layers)}), got {index!r}")
    layers[index] = wrong_backward(layers[index], kind)
    return serial(*layers)


def poison(x, where=0, value=float("nan")):
    """A copy of ``x`` with ``value`` (NaN by default; ``float("inf")`` works too) at ``where``.

    ``where`` is anything ``x.at[where]`` accepts: an example index (``0``: the whole first
    example), an element ``(0, 1)``, a slice, or a boolean mask. Works under ``jit``.
    """
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.inexact):
        raise TypeError(f"poison expects floating-point data (integers cannot hold NaN or inf), "
                        f"got dtype {x.dtype}")
    return x.at[where].set(jnp.asarray(value, x.dtype))


# --------------------------------------------------------------------------------------------
# The fault-injection matrix: python -m jaxbp.faults
# --------------------------------------------------------------------------------------------

_POSITIONS = (("first Dense", 0), ("activation (Tanh)", 1), ("last Dense", 2))


def _matrix_problem(dtype):
    # Square weights (3 -> 3 -> 3) so that "transpose" is an exact transpose.
    from .layers import Dense, Tanh

    net = serial(Dense(3), Tanh, Dense(3))
    kx, ky, kp = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (16, 3), dtype)
    y = jax.random.normal(ky, (16, 3), dtype)
    _, params = net.init(kp, (-1, 3))
    params = jax.tree_util.tree_map(lambda p: p.astype(dtype), params)
    return net, params, x, y


def _same(a, b) -> bool:
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    return len(la) == len(lb) and all(
        bool(jnp.array_equal(u, v, equal_nan=True)) for u, v in zip(la, lb))


def _run_cell(net, params, x, y, check, optimizer, jit=True):
    """One step in one check mode; a dict of what happened."""
    from .gradcheck import GradientMismatchError
    from .train import make_train_step

    state = optimizer.init(params)
    step = make_train_step(net, "mse", optimizer, check=check, jit=jit)
    try:
        new_params, new_state, m = step(params, state, x, y)
    except GradientMismatchError as e:
        return {"raised": True, "message": str(e).splitlines()[0], "unchanged": True,
                "applied": False}
    report = m.get("report")
    return {
        "raised": False,
        "ok": bool(m["ok"]),
        "applied": bool(m["applied"]),
        "reason": int(m["reason"]),
        "rel_error": float(m["rel_error"]),
        "worst_leaf": report.worst_path if report is not None else None,
        "unchanged": _same(new_params, params) and _same(new_state, state),
    }


def fault_matrix(dtype=jnp.float64, *, jit: bool = True, kinds=FAULT_KINDS,
                 positions=_POSITIONS) -> list[dict]:
    """Run every fault in every position under every check mode (one step each, ``jaxbp.sgd``
    and ``optax.adam``). Returns one row per (position, kind): ``{"position", "index", "kind",
    "modes": {mode: {"sgd": cell, "adam": cell}}}``, or ``"na"`` with the reason.

    ``jit=False`` runs the steps eagerly: the same numbers, without one compilation per cell.
    ``kinds`` and ``positions`` (``(label, layer index)`` pairs) select part of the matrix.
    """
    import optax

    from .train import CHECK_MODES, sgd

    net, params, x, y = _matrix_problem(dtype)
    rows = []
    for label, index in positions:
        for kind in kinds:
            row = {"position": label, "index": index, "kind": kind}
            try:
                bad = inject(net, index, kind)
            except ValueError as e:
                row["na"] = str(e)
                rows.append(row)
                continue
            row["modes"] = {
                mode: {name: _run_cell(bad, params, x, y, mode, opt, jit)
                       for name, opt in (("sgd", sgd(0.1)), ("adam", optax.adam(1e-2)))}
                for mode in CHECK_MODES
            }
            rows.append(row)
    return rows


def _cell_text(mode, cells) -> str:
    """One cell of the matrix, short; anything unexpected is spelled out in capitals."""
    s, a = cells["sgd"], cells["adam"]
    if mode == "raise":
        if not (s["raised"] and a["raised"]):
            return "NOT RAISED"
        leaf = re.search(r"worst leaf (\S+),", s["message"])
        rel = re.search(r"relative error ([0-9.e+-]+)", s["message"])
        return (f"raised: `{leaf.group(1) if leaf else '?'}`, rel "
                f"{rel.group(1) if rel else '?'}; params unchanged")
    if mode == "off":
        return "applied; not detected" if s["applied"] and s["ok"] else \
            f"UNEXPECTED ok={s['ok']} applied={s['applied']}"
    if s["ok"] or a["ok"]:
        return "NOT DETECTED"
    detail = f"`{s['worst_leaf']}`, rel {s['rel_error']:.2e}"
    if mode == "report":
        return f"{detail}; applied" if s["applied"] and a["applied"] else \
            f"{detail}; NOT APPLIED"
    same = s["unchanged"] and a["unchanged"]
    return (f"{detail}; skipped, params+state bit-identical" if same and not s["applied"]
            else f"UNEXPECTED applied={s['applied']} unchanged={same}")


def format_matrix(rows) -> str:
    """The matrix of :func:`fault_matrix` as a Markdown table."""
    from .train import CHECK_MODES

    lines = ["| fault | where | " + " | ".join(f"`{m}`" for m in CHECK_MODES) + " |",
             "|---|---|" + "---|" * len(CHECK_MODES)]
    for row in rows:
        head = f"| {row['kind']} | {row['position']} (layer {row['index']}) |"
        if "na" in row:
            lines.append(head + " n/a: a diagonal Jacobian is its own transpose |" +
                         " |" * (len(CHECK_MODES) - 1))
            continue
        lines.append(head + "".join(f" {_cell_text(m, row['modes'][m])} |" for m in CHECK_MODES))
    return "\n".join(lines)


_POISONS = (
    ("NaN in x (one entry)", lambda x, y: (poison(x, (3, 1)), y)),
    ("+inf in x (one example)", lambda x, y: (poison(x, 0, float("inf")), y)),
    ("NaN in y (one entry)", lambda x, y: (x, poison(y, (5, 2)))),
    ("-inf in y (one example)", lambda x, y: (x, poison(y, 7, -float("inf")))),
)


def nonfinite_matrix(dtype=jnp.float64, *, jit: bool = True, blowup_lr: float = 1e12,
                     blowup_steps: int = 40) -> list[dict]:
    """Non-finite numbers under every check mode (correct network): poisoned data for one
    step (``jaxbp.sgd`` and ``optax.adam``), and ``blowup_steps`` steps of ``sgd(blowup_lr)``.
    """
    import optax

    from .train import CHECK_MODES, REASON_NONFINITE, make_train_step, sgd

    net, params, x, y = _matrix_problem(dtype)
    rows = []
    for label, fn in _POISONS:
        px, py = fn(x, y)
        modes = {}
        for mode in CHECK_MODES:
            cells = {}
            for name, opt in (("sgd", sgd(0.1)), ("adam", optax.adam(1e-2))):
                state = opt.init(params)
                new_p, new_s, m = make_train_step(net, "mse", opt, check=mode, jit=jit)(
                    params, state, px, py)
                cells[name] = {"applied": bool(m["applied"]), "reason": int(m["reason"]),
                               "unchanged": _same(new_p, params) and _same(new_s, state)}
            modes[mode] = cells
        rows.append({"what": label, "modes": modes})
    modes = {}
    for mode in CHECK_MODES:
        opt = sgd(blowup_lr)
        p, state = params, opt.init(params)
        step = make_train_step(net, "mse", opt, check=mode, jit=jit)
        applied, reasons, finite = [], [], True
        for _ in range(blowup_steps):
            p, state, m = step(p, state, x, y)
            applied.append(bool(m["applied"]))
            reasons.append(int(m["reason"]))
            finite &= all(bool(jnp.all(jnp.isfinite(leaf)))
                          for leaf in jax.tree_util.tree_leaves(p))
        first_bad = reasons.index(REASON_NONFINITE) if REASON_NONFINITE in reasons else None
        modes[mode] = {"applied": sum(applied), "first_skipped": first_bad, "finite": finite,
                       "all_skipped_after": first_bad is not None and not any(
                           applied[first_bad:])}
    rows.append({"what": f"sgd({blowup_lr:g}), {blowup_steps} steps", "blowup": True,
                 "modes": modes})
    return rows


def format_nonfinite(rows) -> str:
    """The matrix of :func:`nonfinite_matrix` as a Markdown table."""
    from .train import CHECK_MODES, REASON_NONFINITE

    lines = ["| input | " + " | ".join(f"`{m}`" for m in CHECK_MODES) + " |",
             "|---|" + "---|" * len(CHECK_MODES)]
    for row in rows:
        cells = []
        for mode in CHECK_MODES:
            c = row["modes"][mode]
            if row.get("blowup"):
                cells.append(
                    f"{c['applied']} steps applied, then every step skipped (non-finite); "
                    f"params {'finite' if c['finite'] else 'NOT FINITE'}"
                    if c["all_skipped_after"] else f"applied {c['applied']}, finite {c['finite']}")
                continue
            ok = all(not v["applied"] and v["reason"] == REASON_NONFINITE and v["unchanged"]
                     for v in c.values())
            cells.append("skipped (non-finite); params+state bit-identical" if ok
                         else f"UNEXPECTED: {c}")
        lines.append(f"| {row['what']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _main(argv=None):
    import argparse

    parser = argparse.ArgumentParser(prog="python -m jaxbp.faults",
                                     description="Print the fault-injection matrix (Markdown).")
    parser.add_argument("--eager", action="store_true",
                        help="run the steps without jit (same numbers, much faster here)")
    args = parser.parse_args(argv)
    jax.config.update("jax_enable_x64", True)
    for dtype in (jnp.float64, jnp.float32):
        print(f"\n### {jnp.dtype(dtype).name}: 3-3-3 Dense/Tanh/Dense, mse, 16 examples, one "
              f"step (jaxbp.sgd(0.1) and optax.adam(1e-2)), "
              f"{'eager' if args.eager else 'jit'}\n")
        print(format_matrix(fault_matrix(dtype, jit=not args.eager)))
        print(f"\n### {jnp.dtype(dtype).name}: non-finite numbers, correct network\n")
        print(format_nonfinite(nonfinite_matrix(dtype, jit=not args.eager)))


if __name__ == "__main__":
    _main()
