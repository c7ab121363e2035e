"""``python -m benchmarks.one_forward``: what the checked step saves by running the forward once.

The verified step needs the manual gradients and ``jax.grad``'s. Computed apart
(:func:`jaxbp.backprop`, then :func:`jaxbp.autodiff`), the network runs forward twice; the
step instead calls :func:`jaxbp.backprop_and_autodiff`, ``jax.vjp`` of one forward with the
manual caches carried out beside the loss. This times, side by side in one process with
interleaved rounds, on the network workloads (W4-W7's models, float32):

- ``manual only``: :func:`jaxbp.backprop` (the gradient of ``check="off"``);
- ``two forwards``: :func:`jaxbp.backprop` and :func:`jaxbp.autodiff`, compared;
- ``one forward``: :func:`jaxbp.backprop_and_autodiff`, compared;

and prints the two checked variants as multiples of ``manual only``. Every variant returns the
gradients, so XLA cannot drop any of them.
"""

from __future__ import annotations

import argparse

import jax

import jaxbp
from jaxbp.commands.args import positive_int

from .harness import compile_timed, measure
from .networks import build
from .w5_conv2d import conv2d_stack
from .w6_gru import gru_last_state

LOSS = "softmax_cross_entropy"


def workloads(tiny: bool) -> dict[str, dict]:
    """``{name: build(...) arguments and steps per round}`` for W4-W7's models."""
    from jaxbp.presets import gpt_description, mnist1d_resnet, mnist1d_rnn

    if tiny:
        return {
            "W4 ResNet": dict(
                args=(mnist1d_resnet(10, channels=4, blocks=1), (40, 1), 8, LOSS, 10), steps=2
            ),
            "W6 GRU(8)": dict(args=(gru_last_state(8, 10), (4, 8), 4, LOSS, 10), steps=2),
        }
    gpt = gpt_description(96, layers=4, heads=4, width=128, context=128)
    return {
        "W4 ResNet, batch 128": dict(args=(mnist1d_resnet(10), (40, 1), 128, LOSS, 10), steps=10),
        "W5 Conv2D stack, batch 32": dict(
            args=(conv2d_stack(32, 10), (32, 32, 32), 32, LOSS, 10), steps=4
        ),
        "W6 biGRU(6), batch 100": dict(
            args=(mnist1d_rnn(10, hidden=6), (40, 1), 100, LOSS, 10), steps=10
        ),
        "W6 GRU(256) T=64, batch 64": dict(
            args=(gru_last_state(256, 10), (64, 256), 64, LOSS, 10), steps=3
        ),
        "W7 GPT 4x128, T=128, batch 32": dict(
            args=(gpt, (128,), 32, LOSS, 96), kwargs=dict(integer_inputs=96), steps=2
        ),
    }


def variants(net, params, state, x, y):
    """``{name: jitted (params, state, x, y) -> gradients}``."""

    def manual_only(params, state, x, y):
        return jaxbp.backprop(net, LOSS, params, x, y, state=state, validate=False)[1]

    def two_forwards(params, state, x, y):
        grads = manual_only(params, state, x, y)
        auto = jaxbp.autodiff(net, LOSS, params, x, y, state=state, validate=False)[1]
        return grads, auto, jaxbp.compare_grads(grads, auto).ok

    def one_forward(params, state, x, y):
        _, grads, auto, _ = jaxbp.backprop_and_autodiff(
            net, LOSS, params, x, y, state=state, validate=False
        )
        return grads, auto, jaxbp.compare_grads(grads, auto).ok

    return {
        "manual only": jax.jit(manual_only),
        "two forwards": jax.jit(two_forwards),
        "one forward": jax.jit(one_forward),
    }


def run(*, tiny: bool = False, rounds: int = 7) -> dict[str, dict[str, float]]:
    """``{workload: {variant: median seconds per call}}``, printed as it goes."""
    results = {}
    for name, spec in workloads(tiny).items():
        with jax.enable_x64(False):
            net, params, state, x, y = build(*spec["args"], **spec.get("kwargs", {}))
            timed = {}
            for label, fn in variants(net, params, state, x, y).items():
                compiled, _ = compile_timed(fn, params, state, x, y)

                def call(n, compiled=compiled):
                    for _ in range(n):
                        out = compiled(params, state, x, y)
                    jax.block_until_ready(out)

                timed[label] = call
            medians = measure(timed, steps=spec["steps"], rounds=rounds, settle=0 if tiny else None)
        results[name] = {label: m["median_s"] for label, m in medians.items()}
        base = results[name]["manual only"]
        print(
            f"{name}: manual only {base * 1e3:.1f} ms; checked, two forwards "
            f"{results[name]['two forwards'] / base:.2f}x, one forward "
            f"{results[name]['one forward'] / base:.2f}x",
            flush=True,
        )
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.one_forward", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny models: a smoke test")
    parser.add_argument(
        "--rounds", type=positive_int, default=7, help="interleaved rounds (default 7)"
    )
    args = parser.parse_args(argv)
    run(tiny=args.quick, rounds=2 if args.quick else args.rounds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
