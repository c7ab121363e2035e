"""W3 per-example gradients: W1's network, the 128 per-example gradients of one batch.

Every variant returns all 128 gradients (a ``(128, ...)`` stack per parameter leaf, about
137 MB in float32): nothing is summed or skipped.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

import jaxbp

from .harness import compile_timed, measure
from .mlp import build

LOSS = "softmax_cross_entropy"


def per_example_fns(net, loss=LOSS):
    """``{name: f(params, x, y) -> per-example grads}`` (unjitted), the variants of W3."""

    def manual_one(params, x1, y1):
        return jaxbp.backprop(net, loss, params, x1, y1, validate=False)[1]

    def autodiff_one(params, x1, y1):
        return jax.grad(jaxbp.loss_fn(net, loss))(params, x1, y1)

    return {
        "vmap(jaxbp manual backward)": jax.vmap(manual_one, in_axes=(None, 0, 0)),
        "vmap(jax.grad)": jax.vmap(autodiff_one, in_axes=(None, 0, 0)),
        "_one": manual_one,
    }


def run(*, quick: bool = False, tiny: bool = False) -> dict:
    sizes, batch = ((16, 8, 8, 4), 8) if tiny else ((784, 256, 256, 10), 128)
    net, params, x, y = build(sizes, "relu", LOSS, batch)
    fns = per_example_fns(net)
    variants, compile_s = {}, {}
    for name in ("vmap(jaxbp manual backward)", "vmap(jax.grad)"):
        compiled, compile_s[name] = compile_timed(jax.jit(fns[name]), params, x, y)

        def run_v(n, compiled=compiled):
            for _ in range(n):
                out = compiled(params, x, y)
            jax.block_until_ready(out)

        variants[name] = run_v

    one, compile_s["Python loop (jitted manual, per example)"] = compile_timed(
        jax.jit(fns["_one"]), params, x[0], y[0]
    )

    def run_loop(n):
        for _ in range(n):
            grads = [one(params, x[i], y[i]) for i in range(batch)]
            out = jax.tree_util.tree_map(lambda *g: jnp.stack(g), *grads)
        jax.block_until_ready(out)

    variants["Python loop (jitted manual, per example)"] = run_loop
    reps = 2 if tiny else 5
    times = measure(
        variants,
        steps={k: (1 if "loop" in k else reps) for k in variants},
        rounds=2 if tiny else (3 if quick else 7),
    )
    n_out = sum(p.size for p in jax.tree_util.tree_leaves(params)) * batch
    for k in times:
        times[k]["compile_s"] = compile_s.get(k)
        times[k]["gflops"] = None
        times[k]["output_gb_per_s"] = 4 * n_out / times[k]["median_s"] / 1e9
    return {
        "name": "W3",
        "description": f"per-example gradients, {'-'.join(map(str, sizes))}, batch {batch}",
        "batch": batch,
        "unit": f"{batch} gradients",
        "output_floats": n_out,
        "variants": times,
        "skipped": {},
    }
