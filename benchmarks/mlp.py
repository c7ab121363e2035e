"""The shared body of the MLP workloads (W1, W2): one network, every way of training it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import jaxbp

from .harness import compile_timed, measure
from .reference import NumpyMLP, TorchMLP, jax_grad_step, torch_available

LEARNING_RATE = 0.01


def mlp_description(sizes, act: str, dtype: str = "float32") -> dict:
    """The model description of an MLP: Dense layers of ``sizes[1:]`` with ``act`` between."""
    activation = jaxbp.describe(jaxbp.activation(act))
    layers = []
    for width in sizes[1:-1]:
        layers += [{"name": "Dense", "out_dim": width, "dtype": dtype}, activation]
    layers.append({"name": "Dense", "out_dim": sizes[-1], "dtype": dtype})
    return {"name": "serial", "layers": layers}


def build(sizes, act: str, loss: str, batch: int, seed: int = 0):
    """``(net, params, x, y)`` in float32: Dense layers of ``sizes`` with ``act`` between."""
    net = jaxbp.model.build(mlp_description(sizes, act))
    k_init, k_x, k_y = jax.random.split(jax.random.key(seed), 3)
    _, params = net.init(k_init, (-1, sizes[0]))
    x = jax.random.normal(k_x, (batch, sizes[0]), jnp.float32)
    if loss == "softmax_cross_entropy":
        y = jax.random.randint(k_y, (batch,), 0, sizes[-1])
    else:
        y = jax.random.normal(k_y, (batch, sizes[-1]), jnp.float32)
    return net, params, x, y


def matmul_flops(sizes, batch: int) -> float:
    """Matmul FLOPs of one training step: forward, dW for every layer, dx for all but the first."""
    pairs = list(zip(sizes[:-1], sizes[1:]))
    one = [2.0 * batch * i * o for i, o in pairs]
    return 3 * sum(one) - one[0]


def copy_tree(tree):
    # Fresh buffers for each variant: the donating steps consume what they are given.
    return jax.tree_util.tree_map(lambda a: jnp.array(a, copy=True), tree)


def fused_loop(net, loss, opt, x, y, *, check: str, steps: int):
    """``steps`` verified steps on ``(x, y)`` in one compiled ``lax.scan`` (what ``jaxbp.fit``
    runs: :func:`jaxbp.train.make_loop` over :func:`jaxbp.train_step`), donating the train
    state: ``run(ts) -> (ts, stacked metrics)``, not yet compiled."""

    def step(ts, xb, yb):
        return jaxbp.train_step(net, loss, opt, ts, xb, yb, check=check)

    loop = jaxbp.make_loop(step, fused=True, batch_fn=lambda data, idx: data, jit=False)
    order = jnp.zeros((steps, 0), jnp.int32)  # every step the whole batch
    return jax.jit(lambda ts: loop(ts, (x, y), order), donate_argnums=0)


def jax_step_variants(net, params, x, y, loss: str, *, fused_steps: int):
    """The JAX variants: ``{name: (run, compile_s)}``; each ``run(n)`` does ``n`` steps."""
    opt = jaxbp.sgd(LEARNING_RATE)
    variants = {}
    # The default step (with its non-finite guard) for both check modes, then the unchecked
    # step without the guard: the same work as the plain jax.grad step, like for like.
    for check, guard in (("off", True), ("report", True), ("off", False)):
        step = jaxbp.make_train_step(net, loss, opt, check=check, donate=True, guard=guard)
        compiled, secs = compile_timed(step, jaxbp.init_train_state(net, opt, params), x, y)
        state = [jaxbp.init_train_state(net, opt, copy_tree(params))]

        def run(n, compiled=compiled, state=state):
            ts = state[0]
            for _ in range(n):
                ts, _ = compiled(ts, x, y)
            jax.block_until_ready(ts.params)
            state[0] = ts

        name = f"jaxbp step check={check}" if guard else f"jaxbp unguarded step check={check}"
        variants[name] = (run, secs)

    plain = jax.jit(jax_grad_step(net, loss, LEARNING_RATE), donate_argnums=0)
    compiled, secs = compile_timed(plain, params, x, y)
    pstate = [copy_tree(params)]

    def run_plain(n):
        p = pstate[0]
        for _ in range(n):
            p, _ = compiled(p, x, y)
        jax.block_until_ready(p)
        pstate[0] = p

    variants["jax.value_and_grad step"] = (run_plain, secs)

    # jaxbp's fused loop: the unjitted verified step inside one compiled lax.scan (what
    # jaxbp.fit does), compiled once and reused across rounds.
    many = fused_loop(net, loss, opt, x, y, check="off", steps=fused_steps)
    fused, secs = compile_timed(many, jaxbp.init_train_state(net, opt, params))
    fstate = [jaxbp.init_train_state(net, opt, copy_tree(params))]

    def run_fused(n):
        assert n == fused_steps
        ts, _ = fused(fstate[0])
        jax.block_until_ready(ts.params)
        fstate[0] = ts

    variants[f"jaxbp fused loop ({fused_steps} steps/call)"] = (run_fused, secs)
    return variants


def baseline_variants(net, params, x, y, loss: str) -> tuple[dict, dict]:
    """numpy and (if importable) PyTorch: ``({name: (run, None)}, {name: skip reason})``."""
    xn, yn = np.asarray(x), np.asarray(y)
    model = NumpyMLP(net, params, loss, LEARNING_RATE)

    def run_numpy(n):
        for _ in range(n):
            model.step(xn, yn)

    variants = {"numpy (seed style)": (run_numpy, None)}
    skipped = {}
    why = torch_available()
    if why:
        skipped["PyTorch eager"] = why
    else:
        import torch

        tmodel = TorchMLP(net, params, loss, LEARNING_RATE)
        xt = torch.from_numpy(xn.copy())
        yt = torch.from_numpy(yn.astype(np.int64) if loss == "softmax_cross_entropy" else yn.copy())

        def run_torch(n):
            for _ in range(n):
                tmodel.step(xt, yt)

        variants["PyTorch eager"] = (run_torch, None)
    return variants, skipped


def run_mlp(name, description, sizes, act, loss, batch, *, steps, rounds) -> dict:
    """Time every variant of one MLP workload; returns its JSON section."""
    net, params, x, y = build(sizes, act, loss, batch)
    variants = jax_step_variants(net, params, x, y, loss, fused_steps=steps)
    base, skipped = baseline_variants(net, params, x, y, loss)
    variants.update(base)
    times = measure({k: v[0] for k, v in variants.items()}, steps=steps, rounds=rounds)
    flops = matmul_flops(sizes, batch)
    for k, (_, secs) in variants.items():
        times[k]["compile_s"] = secs
        times[k]["gflops"] = flops / times[k]["median_s"] / 1e9
    return {
        "name": name,
        "description": description,
        "sizes": list(sizes),
        "batch": batch,
        "loss": loss,
        "flops_per_step": flops,
        "unit": "step",
        "variants": times,
        "skipped": skipped,
    }
