"""Fault injection: layers with a deliberately wrong backward pass, and poisoned data.

A gradient checker is only worth what it catches. This module makes the classic backprop bugs
on purpose, so that researchers (and jaxbp's own tests) can watch each check mode catch them::

    net = jaxbp.serial(jaxbp.Dense(3), jaxbp.Tanh, jaxbp.Dense(3))
    bad = jaxbp.faults.inject(net, 0, "sign")      # layer 0's dE/dW has the wrong sign
    step = jaxbp.make_train_step(bad, "mse", jaxbp.sgd(0.1), check="skip")
    ts, metrics = step(jaxbp.init_train_state(bad, jaxbp.sgd(0.1), params), x, y)
    # every step: metrics.ok False, metrics.reason REASON_MISMATCH, the train state unchanged

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

A faulty layer is a registered layer of its own, ``Fault(layer, kind)``: ``jaxbp.describe``
shows it as ``{"name": "Fault", "kind": "sign", "layer": {...the correct layer...}}`` and
``jaxbp.model.build`` rebuilds it, so a faulty network travels as a description like any
other. ``init``, ``forward`` (and ``init_state``/``apply``) are the wrapped layer's, so a
faulty network has exactly the parameters, state and outputs of the correct one.

``python -m jaxbp.faults`` runs the fault-injection matrix (every fault x every check mode) and
prints it as a Markdown table: the table in ``docs/reliability.md`` comes from it.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from .errors import ArgumentError
from .layers import Layer, init_state, serial
from .model import build
from .registry import register_layer

__all__ = [
    "FAULT_KINDS",
    "FAMILY_FAULT_KINDS",
    "MATRIX_MODEL",
    "Fault",
    "wrong_backward",
    "inject",
    "poison",
    "fault_matrix",
    "format_matrix",
    "nonfinite_matrix",
    "format_nonfinite",
]

FAULT_KINDS = ("sign", "transpose", "missing_term", "factor2")
# Faults of one family each (what the per-layer probe and the culprit search are measured on):
# one_entry (Dense: one entry of dW wrong, the sparse error gradcheck's fast mode misses),
# batch (Dense: the 1/batch of a mean forgotten in dW and db), no_skip (residual: the skip
# path's dy dropped from dx), unflipped (Conv1D/Conv2D: dx with the kernel not flipped).
FAMILY_FAULT_KINDS = ("one_entry", "batch", "no_skip", "unflipped")
_FAMILY_OF = {
    "one_entry": "Dense",
    "batch": "Dense",
    "no_skip": "residual",
    "unflipped": "Conv1D or Conv2D",
}


def _check_kind(kind):
    if kind not in FAULT_KINDS + FAMILY_FAULT_KINDS:
        raise ValueError(
            f"unknown fault kind {kind!r}; expected one of: "
            f"{', '.join(FAULT_KINDS + FAMILY_FAULT_KINDS)}"
        )


def _wrong_family(layer: Layer, kind: str) -> Layer:
    """The family faults (:data:`FAMILY_FAULT_KINDS`) of ``layer``."""
    fits = {
        "one_entry": layer.name == "Dense",
        "batch": layer.name == "Dense",
        "no_skip": layer.name == "residual",
        "unflipped": layer.name in ("Conv1D", "Conv2D"),
    }[kind]
    if not fits:
        raise ValueError(f"fault {kind!r} applies to {_FAMILY_OF[kind]} layers, got {layer.name}")

    def backward(params, cache, dy):
        grads, dx = layer.backward(params, cache, dy)
        if kind == "one_entry":
            grads = dict(grads)
            grads["W"] = grads["W"].at[(0,) * grads["W"].ndim].multiply(3.0)
        elif kind == "batch":
            n = dy.shape[0] if dy.ndim > 1 else 1
            grads = jax.tree_util.tree_map(lambda g: g * n, grads)
        elif kind == "no_skip":
            dx = dx - dy  # residual's dx is dy + f's dx: keep f's alone
        else:  # unflipped: the transposed convolution with the kernel as it is
            flipped = dict(params)
            w = params["W"]
            flipped["W"] = jnp.flip(w, axis=tuple(range(w.ndim - 2)))
            _, dx = layer.backward(flipped, cache, dy)
        return grads, dx

    return layer._replace(backward=backward)


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
        raise ValueError(
            f"fault 'transpose' does not apply to the element-wise layer "
            f"{layer.name}: its Jacobian is diagonal, so it is its own transpose; "
            f"expected one of: sign, missing_term, factor2"
        )
    if kind == "missing_term" and layer.name == "Identity":
        raise ValueError(
            "fault 'missing_term' does not apply to Identity: its derivative is 1, "
            "so dropping it changes nothing; expected one of: sign, factor2"
        )

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
    :data:`FAULT_KINDS` (see the module docstring for what each does to each layer). The
    result is named ``"Fault"`` with config ``(("layer", layer), ("kind", kind))``.
    """
    _check_kind(kind)
    if not isinstance(layer, Layer):
        raise ArgumentError(f"wrong_backward expects a Layer, got {layer!r}")
    if kind in FAMILY_FAULT_KINDS:
        faulty = _wrong_family(layer, kind)
    elif layer.name == "Dense":
        faulty = _wrong_dense(layer, kind)
    elif layer.children:
        raise ValueError(
            f"wrong_backward expects a single layer, got a {layer.name} network; "
            f"use jaxbp.faults.inject(net, index, kind)"
        )
    else:
        faulty = _wrong_elementwise(layer, kind)
    return faulty._replace(name="Fault", config=(("layer", layer), ("kind", kind)))


def Fault(layer: Layer, kind: str) -> Layer:
    """The registered factory of faulty layers: ``wrong_backward(layer, kind)``."""
    return wrong_backward(layer, kind)


def inject(net: Layer, index: int, kind: str) -> Layer:
    """The ``serial`` network ``net`` with layer ``index`` replaced by ``wrong_backward(...)``.

    Negative indices count from the end (``-1`` is the last layer). The faulty network keeps
    ``net``'s ``init``: a ``Dense`` left at ``w_init="auto"`` is initialised as ``serial``
    chose for it in ``net`` (He before a ReLU), not as a ``Fault`` alone would be.
    """
    if not isinstance(net, Layer) or net.name != "serial":
        raise ArgumentError(f"inject expects a network built with jaxbp.serial, got {net!r}")
    layers = list(net.children)
    if not isinstance(index, int) or not -len(layers) <= index < len(layers):
        raise ValueError(
            f"inject: layer index must be an integer in "
            f"[{-len(layers)}, {len(layers)}), got {index!r}"
        )
    layers[index] = wrong_backward(layers[index], kind)
    return serial(*layers)._replace(init=net.init)


def poison(x, where=0, value=float("nan")):
    """A copy of ``x`` with ``value`` (NaN by default; ``float("inf")`` works too) at ``where``.

    ``where`` is anything ``x.at[where]`` accepts: an example index (``0``: the whole first
    example), an element ``(0, 1)``, a slice, or a boolean mask. Works under ``jit``.
    """
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.inexact):
        raise ArgumentError(
            f"poison expects floating-point data (integers cannot hold NaN or inf), "
            f"got dtype {x.dtype}"
        )
    return x.at[where].set(jnp.asarray(value, x.dtype))


# --------------------------------------------------------------------------------------------
# The fault-injection matrix: python -m jaxbp.faults
# --------------------------------------------------------------------------------------------

# The matrix's network, as a model description: square weights (3 -> 3 -> 3) so that
# "transpose" is an exact transpose, and a BatchNorm, whose running statistics are layer
# state that a skipped step must leave bit for bit as it was.
MATRIX_MODEL = {
    "name": "serial",
    "layers": [
        {"name": "Dense", "out_dim": 3},
        {"name": "Tanh"},
        {"name": "BatchNorm"},
        {"name": "Dense", "out_dim": 3},
    ],
}

_POSITIONS = (("first Dense", 0), ("activation (Tanh)", 1), ("last Dense", 3))


def _matrix_problem(dtype):
    net = build(MATRIX_MODEL)
    kx, ky, kp = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (16, 3), dtype)
    y = jax.random.normal(ky, (16, 3), dtype)
    _, params = net.init(kp, (-1, 3))
    params = jax.tree_util.tree_map(lambda p: p.astype(dtype), params)
    state = jax.tree_util.tree_map(lambda s: s.astype(dtype), init_state(net, x.shape))
    return net, params, state, x, y


def _same(a, b) -> bool:
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    return len(la) == len(lb) and all(
        bool(jnp.array_equal(u, v, equal_nan=True)) for u, v in zip(la, lb)
    )


def _unchanged(new_ts, ts) -> dict:
    """Which parts of a train state came back bit for bit as they were."""
    return {
        "params": _same(new_ts.params, ts.params),
        "opt_state": _same(new_ts.opt_state, ts.opt_state),
        "state": _same(new_ts.state, ts.state),
    }


def _run_cell(net, params, state, x, y, check, optimizer, jit=True):
    """One step in one check mode; a dict of what happened."""
    from .gradcheck import GradientMismatchError
    from .train import init_train_state, make_train_step

    ts = init_train_state(net, optimizer, params, state=state)
    step = make_train_step(net, "mse", optimizer, check=check, jit=jit)
    try:
        new_ts, m = step(ts, x, y)
    except GradientMismatchError as e:  # the report travels with the error: no parsing
        return {
            "raised": True,
            "worst_leaf": e.report.worst_path,
            "applied": False,
            "rel_error": float(e.report.worst_rel_error),
            "unchanged": True,
        }
    kept = _unchanged(new_ts, ts)
    return {
        "raised": False,
        "ok": bool(m.ok),
        "applied": bool(m.applied),
        "reason": int(m.reason),
        "rel_error": float(m.rel_error),
        "worst_leaf": m.report.worst_path if check != "off" else None,
        "unchanged": all(kept.values()),
        "state_moved": not kept["state"],  # BatchNorm's running statistics, when applied
    }


def fault_matrix(
    dtype=jnp.float64, *, jit: bool = True, kinds=FAULT_KINDS, positions=_POSITIONS
) -> list[dict]:
    """Run every fault in every position under every check mode (one step each, ``jaxbp.sgd``
    and ``optax.adam``) on the network of :data:`MATRIX_MODEL`. Returns one row per
    (position, kind): ``{"position", "index", "kind", "modes": {mode: {"sgd": cell, "adam":
    cell}}}``, or ``"na"`` with the reason.

    ``jit=False`` runs the steps eagerly: the same numbers, without one compilation per cell.
    ``kinds`` and ``positions`` (``(label, layer index)`` pairs) select part of the matrix.
    """
    import optax

    from .train import CHECK_MODES, sgd

    net, params, state, x, y = _matrix_problem(dtype)
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
                mode: {
                    name: _run_cell(bad, params, state, x, y, mode, opt, jit)
                    for name, opt in (("sgd", sgd(0.1)), ("adam", optax.adam(1e-2)))
                }
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
        return f"raised: `{s['worst_leaf']}`, rel {s['rel_error']:.3e}; params unchanged"
    if mode == "off":
        return (
            "applied; not detected"
            if s["applied"] and s["ok"]
            else f"UNEXPECTED ok={s['ok']} applied={s['applied']}"
        )
    if s["ok"] or a["ok"]:
        return "NOT DETECTED"
    detail = f"`{s['worst_leaf']}`, rel {s['rel_error']:.2e}"
    if mode == "report":
        applied = s["applied"] and a["applied"] and s["state_moved"] and a["state_moved"]
        return f"{detail}; applied" if applied else f"{detail}; NOT APPLIED"
    same = s["unchanged"] and a["unchanged"]
    return (
        f"{detail}; skipped, params+opt+layer state bit-identical"
        if same and not (s["applied"] or a["applied"])
        else f"UNEXPECTED applied={s['applied']} unchanged={same}"
    )


def format_matrix(rows) -> str:
    """The matrix of :func:`fault_matrix` as a Markdown table."""
    from .train import CHECK_MODES

    lines = [
        "| fault | where | " + " | ".join(f"`{m}`" for m in CHECK_MODES) + " |",
        "|---|---|" + "---|" * len(CHECK_MODES),
    ]
    for row in rows:
        head = f"| {row['kind']} | {row['position']} (layer {row['index']}) |"
        if "na" in row:
            lines.append(
                head
                + " n/a: a diagonal Jacobian is its own transpose |"
                + " |" * (len(CHECK_MODES) - 1)
            )
            continue
        lines.append(head + "".join(f" {_cell_text(m, row['modes'][m])} |" for m in CHECK_MODES))
    return "\n".join(lines)


_POISONS = (
    ("NaN in x (one entry)", lambda x, y: (poison(x, (3, 1)), y)),
    ("+inf in x (one example)", lambda x, y: (poison(x, 0, float("inf")), y)),
    ("NaN in y (one entry)", lambda x, y: (x, poison(y, (5, 2)))),
    ("-inf in y (one example)", lambda x, y: (x, poison(y, 7, -float("inf")))),
)


def nonfinite_matrix(
    dtype=jnp.float64, *, jit: bool = True, blowup_lr: float = 1e12, blowup_steps: int = 40
) -> list[dict]:
    """Non-finite numbers under every check mode (correct network): poisoned data for one
    step (``jaxbp.sgd`` and ``optax.adam``), and ``blowup_steps`` steps of ``sgd(blowup_lr)``.
    """
    import optax

    from .train import CHECK_MODES, REASON_NONFINITE, init_train_state, make_train_step, sgd

    net, params, state, x, y = _matrix_problem(dtype)
    rows: list[dict[str, Any]] = []
    modes: dict[str, Any]
    for label, fn in _POISONS:
        px, py = fn(x, y)
        modes = {}
        for mode in CHECK_MODES:
            cells = {}
            for name, opt in (("sgd", sgd(0.1)), ("adam", optax.adam(1e-2))):
                ts = init_train_state(net, opt, params, state=state)
                new_ts, m = make_train_step(net, "mse", opt, check=mode, jit=jit)(ts, px, py)
                cells[name] = {
                    "applied": bool(m.applied),
                    "reason": int(m.reason),
                    "unchanged": all(_unchanged(new_ts, ts).values()),
                }
            modes[mode] = cells
        rows.append({"what": label, "modes": modes})
    modes = {}
    for mode in CHECK_MODES:
        opt = sgd(blowup_lr)
        ts = init_train_state(net, opt, params, state=state)
        step = make_train_step(net, "mse", opt, check=mode, jit=jit)
        applied, reasons, finite = [], [], True
        for _ in range(blowup_steps):
            ts, m = step(ts, x, y)
            applied.append(bool(m.applied))
            reasons.append(int(m.reason))
            finite &= all(
                bool(jnp.all(jnp.isfinite(leaf)))
                for leaf in jax.tree_util.tree_leaves((ts.params, ts.state))
            )
        first_bad = reasons.index(REASON_NONFINITE) if REASON_NONFINITE in reasons else None
        modes[mode] = {
            "applied": sum(applied),
            "first_skipped": first_bad,
            "finite": finite,
            "all_skipped_after": first_bad is not None and not any(applied[first_bad:]),
        }
    rows.append(
        {"what": f"sgd({blowup_lr:g}), {blowup_steps} steps", "blowup": True, "modes": modes}
    )
    return rows


def format_nonfinite(rows) -> str:
    """The matrix of :func:`nonfinite_matrix` as a Markdown table."""
    from .train import CHECK_MODES, REASON_NONFINITE

    lines = [
        "| input | " + " | ".join(f"`{m}`" for m in CHECK_MODES) + " |",
        "|---|" + "---|" * len(CHECK_MODES),
    ]
    for row in rows:
        cells = []
        for mode in CHECK_MODES:
            c = row["modes"][mode]
            if row.get("blowup"):
                cells.append(
                    f"{c['applied']} steps applied, then every step skipped (non-finite); "
                    f"params and state {'finite' if c['finite'] else 'NOT FINITE'}"
                    if c["all_skipped_after"]
                    else f"applied {c['applied']}, finite {c['finite']}"
                )
                continue
            ok = all(
                not v["applied"] and v["reason"] == REASON_NONFINITE and v["unchanged"]
                for v in c.values()
            )
            cells.append(
                "skipped (non-finite); params+opt+layer state bit-identical"
                if ok
                else f"UNEXPECTED: {c}"
            )
        lines.append(f"| {row['what']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


register_layer("Fault", Fault)


def _main(argv=None):
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m jaxbp.faults", description="Print the fault-injection matrix (Markdown)."
    )
    parser.add_argument(
        "--eager",
        action="store_true",
        help="run the steps without jit (same numbers, much faster here)",
    )
    args = parser.parse_args(argv)
    jax.config.update("jax_enable_x64", True)
    if not args.eager:  # stderr: the matrix on stdout stays clean Markdown
        import sys

        print(
            "python -m jaxbp.faults: this takes minutes (it compiles one step per fault, "
            "optimizer and dtype); --eager gives the same numbers faster",
            file=sys.stderr,
        )
    for dtype in (jnp.float64, jnp.float32):
        print(
            f"\n### {jnp.dtype(dtype).name}: 3-3-3 Dense/Tanh/BatchNorm/Dense, mse, 16 "
            f"examples, one step (jaxbp.sgd(0.1) and optax.adam(1e-2)), "
            f"{'eager' if args.eager else 'jit'}\n"
        )
        print(format_matrix(fault_matrix(dtype, jit=not args.eager)))
        print(f"\n### {jnp.dtype(dtype).name}: non-finite numbers, correct network\n")
        print(format_nonfinite(nonfinite_matrix(dtype, jit=not args.eager)))


if __name__ == "__main__":
    _main()
