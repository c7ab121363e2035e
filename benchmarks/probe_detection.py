"""``python -m benchmarks.probe_detection``: does the per-layer probe find every fault, fast,
at the right node, and never cry wolf?

Detection. For every fault (a kind x a layer family, :mod:`jaxbp.faults`), over ``--seeds``
seeded runs (initialisation, data, the probe's directions and where in the schedule the fault
appears all vary with the seed), ``probe=1`` with no full check in the window: the step that
first flags it, whether the flagged node is the faulty one, and the fraction caught within
``3 x N`` steps (N nodes). Then the full check's culprit (:func:`jaxbp.locate`) and its
diagnosis, once per fault.

False alarms. ``--steps`` probed steps (``probe=1``, ``full_every=100``) of each preset's
network on random data of its shape, in float32 and float64: every failed step is a false
alarm (the networks are correct).

Each run is one fused ``lax.scan`` (``jaxbp.fit``), so a network compiles once for all seeds.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxbp
from jaxbp import faults
from jaxbp.commands.args import positive_int

LOSS = "softmax_cross_entropy"


def _families():
    """``{family: (layers, input shape, integer inputs?, [(index, kind, node), ...])}``."""
    mlp = (jaxbp.Dense(8), jaxbp.Tanh, jaxbp.Dense(8), jaxbp.Relu, jaxbp.Dense(3))
    dense_kinds = ("sign", "transpose", "missing_term", "factor2", "one_entry", "batch")
    return {
        "Dense": (mlp, (6,), False, [(2, k, 3) for k in dense_kinds]),
        "activation": (mlp, (6,), False, [(1, k, 2) for k in ("sign", "missing_term", "factor2")]),
        "residual": (
            (jaxbp.Dense(8), jaxbp.residual(jaxbp.Dense(8), jaxbp.Tanh), jaxbp.Dense(3)),
            (6,),
            False,
            [(1, "no_skip", 2)],
        ),
        "Conv1D": (
            (
                jaxbp.Conv1D(4, 3, padding="SAME"),
                jaxbp.Relu,
                jaxbp.Conv1D(4, 3, padding="SAME"),
                jaxbp.Flatten(),
                jaxbp.Dense(3),
            ),
            (10, 2),
            False,
            [(2, "unflipped", 3), (2, "sign", 3)],
        ),
        "GRU": (
            (jaxbp.Dense(4), jaxbp.GRU(6, return_sequences=False), jaxbp.Dense(3)),
            (5, 3),
            False,
            [(1, "sign", 2), (1, "factor2", 2)],
        ),
        "attention": (
            (jaxbp.Embedding(11, 8), jaxbp.MultiHeadAttention(2, causal=True), jaxbp.Dense(11)),
            (6,),
            True,
            [(1, "sign", 2), (1, "factor2", 2)],
        ),
    }


def _data(shape, integer, seed, batch=8, classes=3):
    k_x, k_y = jax.random.split(jax.random.key(1000 + seed))
    if integer:
        x = jax.random.randint(k_x, (batch, *shape), 0, 11)
        y = jax.random.randint(k_y, (batch, *shape), 0, 11)
    else:
        x = jax.random.normal(k_x, (batch, *shape))
        y = jax.random.randint(k_y, (batch,), 0, classes)
    return x, y


def detection(seeds: int) -> list[dict]:
    """One row per fault: caught within 3N, first step, node named, culprit, diagnosis."""
    rows = []
    opt = optax.sgd(0.01)
    for family, (layers, shape, integer, cases) in _families().items():
        for index, kind, node in cases:
            net = faults.inject(jaxbp.serial(*layers), index, kind)
            n = len(jaxbp.layer_paths(net))
            window = 3 * n
            firsts, named = [], []
            for seed in range(seeds):
                x, y = _data(shape, integer, seed)
                _, params = net.init(jax.random.key(seed), (-1, *shape))
                ts = jaxbp.init_train_state(net, opt, params, verify=True)
                # The fault appears at a random point of the schedule, past step 0's check.
                start = 1 + seed % n
                ts = ts._replace(
                    verify=ts.verify._replace(
                        step=jnp.array(start, jnp.int32), recheck=jnp.array(False)
                    )
                )
                hist = jaxbp.fit(
                    net, LOSS, opt, ts, x, y, steps=window, check="skip", probe=1, full_every=10**9
                ).history
                probe_steps = ~np.asarray(hist.full)
                bad = np.flatnonzero(~np.asarray(hist.ok) & probe_steps)
                if bad.size:
                    firsts.append(int(bad[0]) + 1)
                    named.append(int(np.asarray(hist.layer)[bad[0]]) == node)
            x, y = _data(shape, integer, 0)
            _, params = net.init(jax.random.key(0), (-1, *shape))
            culprit = jaxbp.locate(net, LOSS, params, x, y)
            rows.append(
                {
                    "family": family,
                    "kind": kind,
                    "node": jaxbp.layer_paths(net, LOSS)[node],
                    "nodes": n,
                    "caught_within_3N": len(firsts) / seeds,
                    "first_step_median": statistics.median(firsts) if firsts else None,
                    "first_step_max": max(firsts) if firsts else None,
                    "named_right": (sum(named) / len(named)) if named else None,
                    "culprit_right": culprit is not None and culprit.index == node,
                    "diagnosis": None
                    if culprit is None
                    else f"{culprit.leaf}: {culprit.diagnosis}",
                }
            )
            print(_row_text(rows[-1], seeds), flush=True)
    return rows


def _row_text(r, seeds):
    return (
        f"| {r['family']} | {r['kind']} | {r['node']} | {r['caught_within_3N'] * seeds:.0f}/"
        f"{seeds} | {r['first_step_median']} (max {r['first_step_max']}) | "
        f"{'all' if r['named_right'] == 1 else r['named_right']} | "
        f"{'yes' if r['culprit_right'] else 'NO'} | {r['diagnosis']} |"
    )


def _presets():
    from jaxbp.presets import gpt_description, mnist1d_cnn, mnist1d_resnet, mnist1d_rnn

    mlp = {
        "name": "serial",
        "layers": [
            {"name": "Dense", "out_dim": 256},
            {"name": "Relu"},
            {"name": "Dense", "out_dim": 10},
        ],
    }
    return {
        "mlp": (mlp, (64,), 32, False),
        "cnn": (mnist1d_cnn(10), (40, 1), 32, False),
        "resnet": (mnist1d_resnet(10), (40, 1), 32, False),
        "gru": (mnist1d_rnn(10, kind="GRU"), (40, 1), 32, False),
        "lstm": (mnist1d_rnn(10, kind="LSTM"), (40, 1), 32, False),
        "gpt": (gpt_description(65, layers=2, heads=4, width=64, context=32), (32,), 8, True),
    }


def false_alarms(steps: int, dtypes=("float32", "float64")) -> list[dict]:
    """Failed steps out of ``steps`` probed steps of each (correct) preset network."""
    rows = []
    for name, (description, shape, batch, integer) in _presets().items():
        for dtype in dtypes:
            with jax.enable_x64(dtype == "float64"):
                net = jaxbp.build(description)
                k_x, k_y, k_p = jax.random.split(jax.random.key(7), 3)
                if integer:
                    x = jax.random.randint(k_x, (batch, *shape), 0, 65)
                    y = jax.random.randint(k_y, (batch, *shape), 0, 65)
                else:
                    x = jax.random.normal(k_x, (batch, *shape), dtype)
                    y = jax.random.randint(k_y, (batch,), 0, 10)
                _, params = net.init(k_p, (batch, *shape))
                params = jax.tree_util.tree_map(lambda a: a.astype(dtype), params)
                opt = optax.adam(1e-3)
                ts = jaxbp.init_train_state(
                    net,
                    opt,
                    params,
                    input_shape=(batch, *shape),
                    verify=True,
                    key=jax.random.key(3) if net.has_state else None,
                )
                start = time.perf_counter()
                hist = jaxbp.fit(
                    net,
                    LOSS,
                    opt,
                    ts,
                    x,
                    y,
                    steps=steps,
                    check="report",
                    probe=1,
                    full_every=100,
                    fused=not any(k in name for k in ("cnn", "resnet")),
                ).history
                seconds = time.perf_counter() - start
                failed = int(np.sum(~np.asarray(hist.ok)))
                probed = int(np.sum(~np.asarray(hist.full)))
            rows.append(
                {
                    "preset": name,
                    "dtype": dtype,
                    "steps": steps,
                    "probed": probed,
                    "false_alarms": failed,
                    "seconds": round(seconds, 1),
                }
            )
            print(f"| {name} | {dtype} | {probed} | {failed} | {seconds:.0f} s |", flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.probe_detection", description=__doc__
    )
    parser.add_argument(
        "--seeds", type=positive_int, default=100, help="seeded runs per fault (default 100)"
    )
    parser.add_argument(
        "--steps",
        type=positive_int,
        default=1000,
        help="probed steps per preset and dtype for false alarms (default 1000)",
    )
    parser.add_argument("--only", choices=("detection", "false-alarms"), help="run one half only")
    args = parser.parse_args(argv)
    if args.only != "false-alarms":
        print(
            "| family | fault | node | caught within 3N | first step, median | "
            "probe named the node | culprit (full check) | diagnosis |"
        )
        print("|---|---|---|---|---|---|---|---|")
        detection(args.seeds)
    if args.only != "detection":
        print("\n| preset | dtype | probed steps | false alarms | time |")
        print("|---|---|---|---|---|")
        false_alarms(args.steps)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
