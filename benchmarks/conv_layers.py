"""Manual conv/pool backward vs ``jax.vjp`` of the same forward: seconds per call, and ratios.

``python -m benchmarks.conv_layers [--rounds N] [--json PATH]``. Not part of the suite: a check
that the hand-written backward passes cost what ``jax.grad``'s do (XLA, float32). Both sides
are jitted, run on the same params, inputs and cotangent, and timed in interleaved rounds
(``benchmarks.harness.measure``); "manual / vjp" near 1 is the goal.
"""

from __future__ import annotations

import argparse
import json
import re
import sys

import jax
import jax.numpy as jnp

from jaxbp.conv import Conv1D, Conv2D, MaxPool2D

from .harness import measure

# (name, layer, input shape): a ResNet-like Conv1D and Conv2D, and the pool that follows them.
CASES = [
    ("Conv1D b128 L40 C32 k3 SAME", Conv1D(32, 3, padding="SAME", dtype="float32"), (128, 40, 32)),
    (
        "Conv1D b128 L40 C32 k3 s2",
        Conv1D(32, 3, stride=2, padding="SAME", dtype="float32"),
        (128, 40, 32),
    ),
    (
        "Conv2D b32 32x32 C32 k3 SAME",
        Conv2D(32, 3, padding="SAME", dtype="float32"),
        (32, 32, 32, 32),
    ),
    (
        "Conv2D b32 32x32 C32 k3 s2",
        Conv2D(32, 3, stride=2, padding="SAME", dtype="float32"),
        (32, 32, 32, 32),
    ),
    ("MaxPool2D 2 b32 32x32 C32", MaxPool2D(2), (32, 32, 32, 32)),
]


def _reduce_window_max(x):
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")


def _variants(layer, shape, key):
    """``{manual, vjp}``: callables ``run(n)`` computing (dparams, dx) ``n`` times."""
    k_init, k_x, k_dy = jax.random.split(key, 3)
    _, params = layer.init(k_init, shape)
    x = jax.random.normal(k_x, shape, jnp.float32)
    y, _ = layer.forward(params, x)
    dy = jax.random.normal(k_dy, y.shape, jnp.float32)

    manual = jax.jit(lambda p, xx, g: layer.backward(p, layer.forward(p, xx)[1], g))
    vjp = jax.jit(lambda p, xx, g: jax.vjp(lambda a, b: layer.forward(a, b)[0], p, xx)[1](g))
    fns = {"manual": manual, "vjp": vjp}
    if layer.name == "MaxPool2D":  # also XLA's own pool: reduce_window's select-and-scatter
        fns["reduce_window vjp"] = jax.jit(lambda p, xx, g: jax.vjp(_reduce_window_max, xx)[1](g))

    def program(fn):  # the optimised HLO, without names and source locations
        text = fn.lower(params, x, dy).compile().as_text()
        text = re.sub(r", metadata=\{[^}]*\}", "", text)
        return re.sub(r"(main|jit_[\w<>]+)[.\d]*", "", text.split("ENTRY", 1)[-1])

    same_program = program(manual) == program(vjp)

    def runner(fn):
        def run(n):
            for _ in range(n):
                out = fn(params, x, dy)
            jax.block_until_ready(out)

        return run

    return {name: runner(fn) for name, fn in fns.items()}, same_program


def run(rounds: int = 7, steps: int = 5) -> dict:
    results = {}
    for i, (name, layer, shape) in enumerate(CASES):
        variants, same_program = _variants(layer, shape, jax.random.key(i))
        timings = measure(variants, steps=steps, rounds=rounds, settle=0.05)
        ms = {v: t["median_s"] * 1e3 for v, t in timings.items()}
        results[name] = {
            "ms": ms,
            "manual / vjp": ms["manual"] / ms["vjp"],
            "same compiled program": same_program,
        }
        extra = "".join(f", {v} {t:.2f} ms" for v, t in ms.items() if v not in ("manual", "vjp"))
        print(
            f"{name:32s} manual {ms['manual']:7.2f} ms  vjp {ms['vjp']:7.2f} ms  "
            f"ratio {ms['manual'] / ms['vjp']:.3f}  same HLO {same_program}{extra}",
            flush=True,
        )
    return {"backend": jax.default_backend(), "devices": str(jax.devices()), "cases": results}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.conv_layers", description=__doc__)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    results = run(args.rounds, args.steps)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
