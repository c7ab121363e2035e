"""``python -m benchmarks.flash_attention``: the blocked attention's memory and time.

One causal ``MultiHeadAttention`` layer (batch 1, 4 heads of 32, width 128, float32), its
forward and backward compiled as one function, at sequence lengths 512 to 4,096, three ways:

- ``plain``: the layer's forward and hand-written backward, which keep the ``(heads, T, T)``
  probabilities;
- ``plain, jax.vjp``: ``jax.vjp`` of the same forward;
- ``blocked``: ``MultiHeadAttention(..., block_size=B)``, FlashAttention-2's forward and
  backward written out with ``lax`` loops, which keep only the output and each row's
  log-sum-exp and recompute each block's probabilities in the backward.

Memory is XLA's own account of the compiled function (``memory_analysis()``,
``temp_size_in_bytes``: the buffers it allocates besides arguments and outputs); time is the
median of interleaved rounds in one process. Every variant returns the parameter and input
gradients, so XLA cannot drop any part of the backward.
"""

from __future__ import annotations

import argparse
from typing import Any

import jax
import jax.numpy as jnp

from jaxbp.attention import MultiHeadAttention
from jaxbp.commands.args import positive_int

from .harness import compile_timed, measure

LENGTHS = (512, 1024, 2048, 4096)
VARIANTS = ("plain", "plain, jax.vjp", "blocked")


def gradient_functions(heads: int, block_size: int) -> dict:
    """``{variant: (params, x, dy) -> (dparams, dx)}``, each the full forward and backward."""
    plain = MultiHeadAttention(heads, causal=True)
    blocked = MultiHeadAttention(heads, causal=True, block_size=block_size)

    def manual(layer):
        def grads(params, x, dy):
            _, cache = layer.forward(params, x)
            return layer.backward(params, cache, dy)

        return grads

    def autodiff(params, x, dy):
        _, vjp = jax.vjp(lambda p, xx: plain.forward(p, xx)[0], params, x)
        return vjp(dy)

    return {"plain": manual(plain), "plain, jax.vjp": autodiff, "blocked": manual(blocked)}


def run(
    *,
    lengths=LENGTHS,
    heads: int = 4,
    head_dim: int = 32,
    block_size: int = 256,
    rounds: int = 3,
    settle: float | None = None,
) -> list[dict]:
    """One row per sequence length: each variant's temporary bytes and median seconds."""
    rows = []
    for time in lengths:
        functions = gradient_functions(heads, min(block_size, time))
        with jax.enable_x64(False):
            x = jax.random.normal(jax.random.key(0), (1, time, heads * head_dim), jnp.float32)
            dy = jax.random.normal(jax.random.key(1), x.shape, jnp.float32)
            _, params = MultiHeadAttention(heads).init(jax.random.key(2), x.shape)
            row: dict = {"time": time, "block_size": min(block_size, time)}
            timed: dict[str, Any] = {}
            for name, fn in functions.items():
                compiled, _ = compile_timed(jax.jit(fn), params, x, dy)
                row[name] = {"temp_bytes": int(compiled.memory_analysis().temp_size_in_bytes)}

                def call(n, compiled=compiled):
                    for _ in range(n):
                        out = compiled(params, x, dy)
                    jax.block_until_ready(out)

                timed[name] = call
            medians = measure(timed, steps=1, rounds=rounds, settle=settle)
        for name in functions:
            row[name]["median_s"] = medians[name]["median_s"]
        rows.append(row)
        print(format_row(row), flush=True)
    return rows


def format_row(row: dict) -> str:
    mib = 2.0**20
    cells = [f"{row['time']:,}"]
    for name in VARIANTS:
        cells += [f"{row[name]['temp_bytes'] / mib:,.1f}", f"{row[name]['median_s'] * 1e3:,.1f}"]
    ratio = row["blocked"]["temp_bytes"] / row["plain"]["temp_bytes"]
    return "| " + " | ".join([*cells, f"1/{1 / ratio:,.0f}"]) + " |"


def header(heads: int, head_dim: int, block_size: int) -> str:
    columns = ["T"]
    for name in VARIANTS:
        columns += [f"{name} MiB", f"{name} ms"]
    columns.append("blocked / plain memory")
    return (
        f"causal attention, batch 1, {heads} heads of {head_dim}, float32, forward + backward; "
        f"blocked: block_size {block_size} (or T if smaller); MiB: XLA temporaries; ms: median\n"
        + "| "
        + " | ".join(columns)
        + " |\n"
        + "|"
        + "---|" * len(columns)
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.flash_attention", description=__doc__
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
    parser.add_argument("--block-size", type=positive_int, default=256, help="default 256")
    parser.add_argument("--rounds", type=positive_int, default=3, help="interleaved rounds")
    args = parser.parse_args(argv)
    sizes: dict[str, Any]
    if args.quick:
        sizes = dict(lengths=(32, 64), heads=2, head_dim=4, block_size=16, rounds=1, settle=0)
    else:
        sizes = dict(block_size=args.block_size, rounds=args.rounds)
    print(header(sizes.get("heads", 4), sizes.get("head_dim", 32), sizes["block_size"]))
    run(**sizes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
