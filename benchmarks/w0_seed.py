"""W0 seed: the seed's 2-2-2 sigmoid network, batch 1, half-SSE, 10,000 SGD steps.

One "step" of this workload is the whole 10,000-step job: tiny steps are all overhead, so the
question is how much of it each approach removes (jaxbp's fused loop compiles all 10,000 steps
into one ``lax.scan``; the numpy and PyTorch loops pay Python per step).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxbp

from .harness import compile_timed, measure
from .mlp import copy_tree, fused_loop
from .reference import NumpyMLP, TorchMLP, torch_available


def run(*, quick: bool = False, tiny: bool = False) -> dict:
    steps = 200 if tiny else 10_000
    sp = jaxbp.seed_problem(jnp.float32)
    net, params, x, y, lr = sp.net, sp.params, sp.x, sp.y, sp.learning_rate
    opt = jaxbp.sgd(lr)
    variants, compile_s, skipped = {}, {}, {}

    # jaxbp.fit's loop (the unjitted verified step inside one lax.scan), compiled once here so
    # that rounds time the run, not fit's per-call tracing (measured separately below).
    for check in ("off", "report"):
        many = fused_loop(net, "half_sse", opt, x, y, check=check, steps=steps)
        name = f"jaxbp fused loop check={check}"
        fused, compile_s[name] = compile_timed(many, jaxbp.init_train_state(net, opt, params))

        def run_fused(n, fused=fused):
            # A fresh train state per call: the compiled loop donates the one it is given.
            ts, _ = fused(jaxbp.init_train_state(net, opt, copy_tree(params)))
            jax.block_until_ready(ts.params)

        variants[name] = run_fused

    step = jaxbp.make_train_step(net, "half_sse", opt, check="off")
    compiled, compile_s["jaxbp step loop check=off"] = compile_timed(
        step, jaxbp.init_train_state(net, opt, params), x, y
    )

    def run_steps(n):
        ts = jaxbp.init_train_state(net, opt, params)
        for _ in range(steps):
            ts, _ = compiled(ts, x, y)
        jax.block_until_ready(ts.params)

    variants["jaxbp step loop check=off"] = run_steps

    xn, yn = np.asarray(x)[None], np.asarray(y)[None]

    def run_numpy(n):
        model = NumpyMLP(net, params, "half_sse", lr)
        for _ in range(steps):
            model.step(xn, yn)

    variants["numpy loop (seed style)"] = run_numpy

    why = torch_available()
    if why:
        skipped["PyTorch eager loop"] = why
    else:
        import torch

        xt, yt = torch.from_numpy(xn.copy()), torch.from_numpy(yn.copy())

        def run_torch(n):
            model = TorchMLP(net, params, "half_sse", lr)
            for _ in range(steps):
                model.step(xt, yt)

        variants["PyTorch eager loop"] = run_torch

    # jaxbp.fit as a user calls it: tracing and compiling are part of every call.
    start = time.perf_counter()
    ts = jaxbp.init_train_state(net, opt, params)
    jax.block_until_ready(jaxbp.fit(net, "half_sse", opt, ts, x, y, steps=steps).state.params)
    fit_first_s = time.perf_counter() - start

    rounds = 2 if tiny else (2 if quick else 5)
    times = measure(variants, steps=1, rounds=rounds, warmup=0 if not tiny else 1)
    for k in times:
        times[k]["compile_s"] = compile_s.get(k)
        times[k]["gflops"] = None
    return {
        "name": "W0",
        "description": f"seed 2-2-2 sigmoid, batch 1, half-SSE, {steps} SGD steps",
        "steps": steps,
        "unit": f"{steps} steps",
        "variants": times,
        "skipped": skipped,
        "fit_call_with_compile_s": fit_first_s,
    }
