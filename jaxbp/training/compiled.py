"""The compiled pieces of a training run, built once per process and shared.

``jax.jit`` caches compiled code per function object, so a second run in one process (a sweep,
a resume, a test) compiles nothing new only if it gets the *same* network, optimizer and loop
objects. Each builder here is an ``functools.lru_cache`` keyed on a hashable spec (a
description's JSON, the optimizer's settings, the network object and the step's settings):
networks and optimizers are immutable pairs of pure functions, so sharing them is safe.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable

import jax
import jax.numpy as jnp

from .. import batch_order
from ..backprop import forward
from ..layers import Layer
from ..losses import get_loss
from ..model import build
from ..train import gather_batch, make_loop, train_step
from .config import TrainConfig, build_optimizer

__all__ = [
    "network",
    "optimizer",
    "epoch_loop",
    "evaluator",
    "epoch_order",
    "shift_batch_fn",
    "window_batch_fn",
    "sequence_evaluator",
]

_CACHE_SIZE = 32


def network(description: dict, modules: tuple[str, ...] = ()) -> Layer:
    """The network ``description`` describes, its references to code resolved only inside
    ``modules`` (:func:`jaxbp.model.build`): the same object for the same arguments."""
    return _network(json.dumps(description, sort_keys=True), tuple(modules))


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _network(description_json: str, modules: tuple[str, ...]) -> Layer:
    return build(json.loads(description_json), modules=modules)


def optimizer(cfg: TrainConfig, total_steps: int):
    """:func:`build_optimizer` for ``cfg``: the same object for the same settings."""
    steps = None if cfg.schedule == "constant" else total_steps  # only a schedule reads it
    return _optimizer(cfg.optimizer, cfg.lr, cfg.schedule, cfg.weight_decay, steps)


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _optimizer(name, lr, schedule, weight_decay, total_steps):
    cfg = TrainConfig(optimizer=name, lr=lr, schedule=schedule, weight_decay=weight_decay)
    return build_optimizer(cfg, total_steps or 1)


def shift_batch_fn(max_shift: int) -> Callable:
    """A ``make_loop`` batch function that gathers the batch, then rolls each example by a
    random ``-max_shift..max_shift`` positions along its first (length) axis.

    ``data`` is ``(x, t, key)`` and each row of the order ends with the global step number:
    the shifts of step ``s`` are drawn from ``fold_in(key, s)``, a pure function of
    ``(seed, epoch, step)``, so a resumed run sees exactly the uninterrupted run's batches.
    """

    def batch(data, row):
        x, t, key = data
        xb, tb = gather_batch((x, t), row[:-1])
        shifts = jax.random.randint(
            jax.random.fold_in(key, row[-1]), (xb.shape[0],), -max_shift, max_shift + 1
        )
        return jax.vmap(lambda xi, s: jnp.roll(xi, s, axis=0))(xb, shifts), tb

    return batch


def window_batch_fn(context: int) -> Callable:
    """A ``make_loop`` batch function for a sequence task: ``data`` is ``(x, y, key)``, the
    whole train split's ids and next ids; row ``[w_1 .. w_B, step]`` asks for windows
    ``w_i`` (of ``len // context`` non-overlapping ones), each moved by a random
    ``0..context-1`` ids drawn from ``fold_in(key, step)`` (kept inside the split): every epoch
    sees the text once, cut at new places."""

    def batch(data, row):
        x, y, key = data
        windows = row[:-1]
        offsets = jax.random.randint(jax.random.fold_in(key, row[-1]), windows.shape, 0, context)
        starts = jnp.minimum(windows * context + offsets, x.shape[0] - context)
        idx = starts[:, None] + jnp.arange(context)
        return x[idx], y[idx]

    return batch


@functools.lru_cache(maxsize=_CACHE_SIZE)
def epoch_loop(
    net: Layer,
    loss: str,
    opt,
    check: str,
    fused: bool,
    shift: int,
    devices: int,
    jit: bool,
    window: int = 0,
    probe: int = 0,
    full_every: int | None = None,
    shard_params: bool = False,
) -> Callable:
    """``run(train_state, data, order) -> (train_state, stacked StepMetrics)``: the verified
    step (:func:`jaxbp.train_step`) through :func:`jaxbp.train.make_loop`, fused or per step.

    ``devices > 1`` asks :func:`jaxbp.parallel.make_parallel_loop` for the same loop with
    each batch split over a mesh (``shard_params``: params and optimizer state split over it
    too). ``check="raise"`` runs as ``"skip"`` and freezes the train
    state from the first disagreement on (the caller raises naming that step). ``window > 0``:
    a sequence task, batches cut by :func:`window_batch_fn`. ``probe``/``full_every``: the
    verification schedule (:func:`jaxbp.train_step`; the train state must carry ``verify``).
    """
    loss_fn = get_loss(loss)

    def step(ts, x, y):
        return train_step(
            net, loss_fn, opt, ts, x, y, check=check, probe=probe, full_every=full_every
        )

    batch_fn = (
        window_batch_fn(window) if window else shift_batch_fn(shift) if shift else gather_batch
    )
    stop_on_mismatch = check == "raise"
    if devices > 1:
        from ..parallel import make_parallel_loop

        if not jit:
            raise ValueError(f"devices={devices} needs the compiled loop (jit=True)")
        return make_parallel_loop(
            step,
            devices,
            fused=fused,
            stop_on_mismatch=stop_on_mismatch,
            batch_fn=batch_fn,
            shard_params=shard_params,
        )
    run = make_loop(
        step, jit=jit, fused=fused, stop_on_mismatch=stop_on_mismatch, batch_fn=batch_fn
    )
    return run if jit else _eager(run)


def _eager(fn):
    """``fn`` run op by op: ``lax.scan`` becomes a Python loop, nothing is compiled whole."""

    def run(*args):
        with jax.disable_jit():
            return fn(*args)

    return run


@functools.lru_cache(maxsize=_CACHE_SIZE)
def evaluator(net: Layer, loss: str, jit: bool = True) -> Callable:
    """``evaluate(params, state, x, t, y) -> (loss, accuracy)`` in evaluation mode (running
    statistics, no dropout); accuracy is NaN when ``y`` is ``None`` (regression)."""
    loss_fn = get_loss(loss)

    def evaluate(params, state, x, t, y):
        out = forward(net, params, x, state=state, train=False)
        value = loss_fn.value(out, t)
        if y is None:
            return value, jnp.array(jnp.nan, out.dtype)
        return value, jnp.mean((jnp.argmax(out, axis=-1) == y).astype(out.dtype))

    return jax.jit(evaluate) if jit else evaluate


@functools.lru_cache(maxsize=_CACHE_SIZE)
def sequence_evaluator(net: Layer, jit: bool = True, chunk: int = 32) -> Callable:
    """``evaluate(params, state, x, t, y) -> (loss, accuracy)`` of a sequence model: nats per
    token and next-token accuracy over every position whose label ``t`` is >= 0 (-1 marks
    padding), ``chunk`` windows at a time so memory stays small. ``y`` is ignored (= ``t``)."""

    def totals(params, state, x, t):
        logits = forward(net, params, x, state=state, train=False)
        logp = jax.nn.log_softmax(logits, axis=-1)
        valid = t >= 0
        picked = jnp.take_along_axis(logp, jnp.maximum(t, 0)[..., None], axis=-1)[..., 0]
        correct = valid & (jnp.argmax(logits, axis=-1) == t)
        return (
            jnp.sum(jnp.where(valid, -picked, 0)),
            jnp.sum(correct, dtype=logits.dtype),
            jnp.sum(valid, dtype=logits.dtype),
        )

    def evaluate(params, state, x, t, y=None):
        pad = -x.shape[0] % chunk
        x = jnp.pad(x, ((0, pad), (0, 0))).reshape(-1, chunk, x.shape[1])
        t = jnp.pad(t, ((0, pad), (0, 0)), constant_values=-1).reshape(x.shape)
        nll, correct, count = jax.lax.map(lambda xt: totals(params, state, *xt), (x, t))
        return jnp.sum(nll) / jnp.sum(count), jnp.sum(correct) / jnp.sum(count)

    return jax.jit(evaluate) if jit else evaluate


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def epoch_order(data_key, epoch, n: int, batch_size: int, with_step: bool):
    """Epoch ``epoch``'s batches, ``(steps, batch_size)`` example indices
    (:func:`jaxbp.batch_order.epoch_order`, the order of every loop); ``with_step`` appends
    each row's global step number (for augmentation)."""
    order = batch_order.epoch_order(data_key, epoch, n, batch_size)
    steps = order.shape[0]
    if not with_step:
        return order
    step = epoch * steps + jnp.arange(steps, dtype=order.dtype)
    return jnp.concatenate([order, step[:, None]], axis=1)
