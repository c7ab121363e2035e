"""The shared body of the network workloads (convolutional, recurrent, attention).

One model description, timed every way jaxbp can train it, side by side:

- ``jaxbp step check=off`` / ``check=report``: the verified step (with its non-finite guard),
  one jitted call per step;
- ``jaxbp unguarded step check=off``: the same work as the plain step, like for like;
- ``jax.value_and_grad step``: ``jax.grad`` of the same loss through the same forward, plain
  SGD, no check (the baseline every ratio is against);
- ``jaxbp fused loop``: the off step inside one compiled ``lax.scan`` (the trap the training
  loop avoids for convolutions: on XLA CPU such a scan runs many times slower).

A workload may add baselines of its own, timed in the same interleaved rounds: the PyTorch
eager twin (``TORCH_VARIANT``: :mod:`benchmarks.torch_nets` for W4-W6,
:mod:`benchmarks.torch_gpt` for W7); otherwise the section says PyTorch eager has no twin for
the network.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import jax
import jax.numpy as jnp

import jaxbp

from .harness import compile_timed, measure
from .mlp import copy_tree

LEARNING_RATE = 0.01
TORCH_VARIANT = "PyTorch eager step"


def torch_threads() -> int:
    """The cores this process may run on (PyTorch's own default counts physical cores)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def build(
    description: dict,
    input_shape,
    batch: int,
    loss: str,
    num_outputs: int,
    *,
    integer_inputs: int | None = None,
    seed: int = 0,
):
    """``(net, params, state, x, y)``: float32 params and inputs (or token ids below
    ``integer_inputs``), integer class labels shaped like the output without its last axis."""
    net = jaxbp.build(description)
    k_init, k_x, k_y = jax.random.split(jax.random.key(seed), 3)
    shape = (batch, *input_shape)
    with jax.enable_x64(False):
        _, params = net.init(k_init, shape)
        if integer_inputs:
            x = jax.random.randint(k_x, shape, 0, integer_inputs)
        else:
            x = jax.random.normal(k_x, shape, jnp.float32)
        out = jaxbp.output_shape(net, shape)
        y = jax.random.randint(k_y, out[:-1], 0, num_outputs)
        state = jaxbp.init_state(net, shape)
    return net, params, state, x, y


def plain_step(net, loss, learning_rate: float):
    """``jax.value_and_grad`` through ``jaxbp.apply`` (same forward, same state), then SGD."""
    loss = jaxbp.get_loss(loss)

    def step(params, state, x, y):
        def value(p):
            out, _, new_state = jaxbp.apply(net, p, state, x)
            return loss.value(out, y), new_state

        (v, new_state), grads = jax.value_and_grad(value, has_aux=True)(params)
        params = jax.tree_util.tree_map(lambda p, g: p - learning_rate * g, params, grads)
        return params, new_state, v

    return step


def _stepper(compiled, ts0):
    holder = [ts0]

    def run(n):
        ts = holder[0]
        for _ in range(n):
            ts, _ = compiled(ts, *run.batch)
        jax.block_until_ready(ts.params)
        holder[0] = ts

    return run


def network_variants(net, params, state, x, y, loss: str, *, fused_steps: int) -> dict:
    """``{name: (run, compile_s)}``; each ``run(n)`` performs ``n`` training steps."""
    opt = jaxbp.sgd(LEARNING_RATE)
    variants = {}
    for check, guard in (("off", True), ("report", True), ("off", False)):
        step = jaxbp.make_train_step(net, loss, opt, check=check, donate=True, guard=guard)
        ts = jaxbp.init_train_state(net, opt, params, state=state)
        compiled, secs = compile_timed(step, ts, x, y)
        run = _stepper(
            compiled, jaxbp.init_train_state(net, opt, copy_tree(params), state=copy_tree(state))
        )
        run.batch = (x, y)
        name = f"jaxbp step check={check}" if guard else f"jaxbp unguarded step check={check}"
        variants[name] = (run, secs)

    plain = jax.jit(plain_step(net, loss, LEARNING_RATE), donate_argnums=(0, 1))
    compiled, secs = compile_timed(plain, params, state, x, y)
    holder = [(copy_tree(params), copy_tree(state))]

    def run_plain(n):
        p, s = holder[0]
        for _ in range(n):
            p, s, _ = compiled(p, s, x, y)
        jax.block_until_ready(p)
        holder[0] = (p, s)

    variants["jax.value_and_grad step"] = (run_plain, secs)
    variants.update(_fused_variant(net, loss, opt, params, state, x, y, fused_steps))
    return variants


def _fused_variant(net, loss, opt, params, state, x, y, steps: int) -> dict:
    def step(ts, xb, yb):
        return jaxbp.train_step(net, loss, opt, ts, xb, yb, check="off")

    loop = jaxbp.make_loop(step, fused=True, batch_fn=lambda data, idx: data, jit=False)
    order = jnp.zeros((steps, 0), jnp.int32)
    many = jax.jit(lambda ts: loop(ts, (x, y), order), donate_argnums=0)
    fused, secs = compile_timed(many, jaxbp.init_train_state(net, opt, params, state=state))
    holder = [jaxbp.init_train_state(net, opt, copy_tree(params), state=copy_tree(state))]

    def run_fused(n):
        assert n == steps
        ts, _ = fused(holder[0])
        jax.block_until_ready(ts.params)
        holder[0] = ts

    return {f"jaxbp fused loop ({steps} steps/call)": (run_fused, secs)}


def run_network(
    name: str,
    description_text: str,
    model: dict,
    input_shape,
    batch: int,
    loss: str,
    num_outputs: int,
    *,
    steps: int,
    rounds: int,
    integer_inputs: int | None = None,
    examples_per_step: int | None = None,
    tokens_per_step: int | None = None,
    baselines: Callable | None = None,
) -> dict:
    """Time every variant of one network workload; returns its JSON section.

    ``baselines(net, params, state, x, y) -> ({name: (run, compile_s)}, {name: why skipped})``
    adds variants outside jaxbp (timed in the same rounds). ``tokens_per_step``: each variant
    also reports ``tokens_per_s`` (a sequence model: batch * context).
    """
    net, params, state, x, y = build(
        model, input_shape, batch, loss, num_outputs, integer_inputs=integer_inputs
    )
    skipped = {"PyTorch eager": "no PyTorch twin of this network in the suite yet"}
    with jax.enable_x64(False):
        variants = network_variants(net, params, state, x, y, loss, fused_steps=steps)
        if baselines is not None:
            extra, skipped = baselines(net, params, state, x, y)
            variants.update(extra)
        times = measure({k: v[0] for k, v in variants.items()}, steps=steps, rounds=rounds)
    per_step = examples_per_step or batch
    for k, (_, secs) in variants.items():
        times[k]["compile_s"] = secs
        times[k]["examples_per_s"] = per_step / times[k]["median_s"]
        if tokens_per_step:
            times[k]["tokens_per_s"] = tokens_per_step / times[k]["median_s"]
    num_params = sum(int(a.size) for a in jax.tree_util.tree_leaves(params))
    section = {
        "name": name,
        "description": description_text,
        "model": model,
        "batch": batch,
        "input_shape": list(input_shape),
        "loss": loss,
        "num_params": num_params,
        "unit": "step",
        "variants": times,
        "skipped": skipped,
    }
    if TORCH_VARIANT in times:
        section["torch_threads"] = torch_threads()
    return section
