"""``python -m benchmarks.verify_cost``: what verification costs, per mode, against its floor.

For each workload, side by side in one process with interleaved rounds (float32, the defaults a
user gets: ``donate=False``, the finite guard on, SGD), the median time of one training step:

- ``off``: ``make_train_step(..., check="off")``, the unchecked step every ratio is against;
- ``full``: ``check="report"``, manual vs ``jax.grad`` every step;
- ``probe=1``: the per-layer adjoint test of one node per step, the full check every 100 steps;
- ``check_every=10``: the full check every tenth step, nothing between;
- ``jax.grad step``: ``jax.value_and_grad`` and SGD, nothing else (``off`` against it: what
  the manual backward and the finite guard cost);
- ``value_and_grad`` and ``forward``: ``jax.value_and_grad`` of the loss, and the loss alone,
  for the floor of any check that runs ``jax.grad``'s backward beside the manual one:
  ``floor = 1 + (t(value_and_grad) - t(forward)) / t(off)``.

The scheduled modes are timed over whole cycles of the schedule (a multiple of the node count),
so a step that probes the whole network and one that probes an activation both count.
"""

from __future__ import annotations

import argparse

import jax
import optax

import jaxbp
from jaxbp.commands.args import positive_int

from .harness import measure
from .networks import build, plain_step
from .one_forward import LOSS
from .one_forward import workloads as network_workloads


def workloads(tiny: bool) -> dict[str, dict]:
    """W1/W2's MLPs and W4-W7's networks, as :func:`benchmarks.networks.build` arguments."""
    mlp = {
        "name": "serial",
        "layers": [
            {"name": "Dense", "out_dim": 256},
            {"name": "Relu"},
            {"name": "Dense", "out_dim": 256},
            {"name": "Relu"},
            {"name": "Dense", "out_dim": 10},
        ],
    }
    wide = {
        "name": "serial",
        "layers": [
            {"name": "Dense", "out_dim": 2048},
            {"name": "Relu"},
            {"name": "Dense", "out_dim": 2048},
            {"name": "Relu"},
            {"name": "Dense", "out_dim": 10},
        ],
    }
    out = {}
    if tiny:
        out["W1 MLP 784-256-256-10, batch 32"] = dict(args=(mlp, (784,), 32, LOSS, 10))
    else:
        out["W1 MLP 784-256-256-10, batch 128"] = dict(args=(mlp, (784,), 128, LOSS, 10))
        out["W2 MLP 2048 wide, batch 256"] = dict(args=(wide, (784,), 256, LOSS, 10))
    out.update(network_workloads(tiny))
    return out


def _stepper(step, ts0, x, y):
    box = [ts0]

    def call(n):
        ts = box[0]
        for _ in range(n):
            ts, m = step(ts, x, y)
        jax.block_until_ready(m.loss)
        box[0] = ts

    return call


def run(*, tiny: bool = False, rounds: int = 5) -> dict[str, dict[str, float]]:
    """``{workload: {variant: median seconds per step}}``, printed as a table as it goes."""
    results = {}
    print(
        "| workload | off (ms) | off vs jax.grad step | floor | full | probe=1 | check_every=10 |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, spec in workloads(tiny).items():
        with jax.enable_x64(False):
            net, params, state, x, y = build(*spec["args"], **spec.get("kwargs", {}))
            opt = optax.sgd(0.01)
            n_nodes = len(jaxbp.layer_paths(net))
            ts0 = jaxbp.init_train_state(net, opt, params, state=state)
            steps = {
                "off": jaxbp.make_train_step(net, LOSS, opt, check="off"),
                "full": jaxbp.make_train_step(net, LOSS, opt, check="report"),
                "probe=1": jaxbp.make_train_step(net, LOSS, opt, check="report", probe=1),
                "check_every=10": jaxbp.make_train_step(
                    net, LOSS, opt, check="report", check_every=10
                ),
            }
            timed = {}
            for label, step in steps.items():
                ts = jaxbp.with_verify(net, ts0) if label not in ("off", "full") else ts0
                ts, _ = step(ts, x, y)  # compile, and step 0's full check out of the way
                timed[label] = _stepper(step, ts, x, y)
            lossf = jaxbp.get_loss(LOSS)

            def value(p):
                return lossf.value(jaxbp.forward(net, p, x, state=state), y)

            plain = jax.jit(plain_step(net, LOSS, 0.01))
            jax.block_until_ready(plain(params, state, x, y))

            def call_plain(k):
                p, st = params, state
                for _ in range(k):
                    p, st, v = plain(p, st, x, y)
                jax.block_until_ready(v)

            timed["jax.grad step"] = call_plain
            vg = jax.jit(jax.value_and_grad(value))
            fwd = jax.jit(value)
            for label, fn in (("value_and_grad", vg), ("forward", fwd)):
                jax.block_until_ready(fn(params))

                def call(k, fn=fn):
                    for _ in range(k):
                        out = fn(params)
                    jax.block_until_ready(out)

                timed[label] = call
            cycle = n_nodes * (1 if tiny else max(1, 20 // n_nodes))
            per = {
                label: cycle if label in ("probe=1", "check_every=10") else max(2, cycle // 2)
                for label in timed
            }
            per["check_every=10"] = 10 * max(1, cycle // 10)
            medians = measure(timed, steps=per, rounds=rounds, settle=0 if tiny else None)
        t = {label: m["median_s"] for label, m in medians.items()}
        t["floor"] = 1 + (t["value_and_grad"] - t["forward"]) / t["off"]
        t["nodes"] = n_nodes
        results[name] = t
        off = t["off"]
        print(
            f"| {name} ({n_nodes} nodes) | {off * 1e3:.2f} | {off / t['jax.grad step']:.2f}x | "
            f"{t['floor']:.2f}x | "
            f"{t['full'] / off:.2f}x | {t['probe=1'] / off:.2f}x | "
            f"{t['check_every=10'] / off:.2f}x |",
            flush=True,
        )
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.verify_cost", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny models: a smoke test")
    parser.add_argument(
        "--rounds", type=positive_int, default=5, help="interleaved rounds (default 5)"
    )
    args = parser.parse_args(argv)
    run(tiny=args.quick, rounds=2 if args.quick else args.rounds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
