"""The verified train step, plain SGD, and a fused multi-step training loop.

``make_train_step(net, loss, optimizer, check=...)`` returns a jitted
``step(params, opt_state, x, y) -> (params, opt_state, metrics)``. Each step computes the manual
chain-rule gradients and, unless ``check="off"``, ``jax.grad``'s, compares them leaf by leaf on
device and only then applies the update through ``optimizer`` (``jaxbp.sgd`` or any optax
``GradientTransformation``).

Check modes:

- ``"off"``: manual gradients only, the fastest.
- ``"report"``: both gradients; the comparison lands in ``metrics``; the update is applied.
- ``"skip"``: the update is applied only when the gradients agree and are finite; otherwise
  params and optimizer state come back bit-for-bit unchanged and ``metrics["reason"]`` says why.
- ``"raise"``: as ``"skip"``, then a disagreement raises :class:`GradientMismatchError` naming
  the worst leaf (this reads one flag back to the host each step).

In every mode a step whose loss, gradients or updated parameters are not finite is not applied
(``metrics["applied"]`` is false, ``metrics["reason"]`` is ``REASON_NONFINITE``): a NaN in the
data or a learning rate that blows up never corrupts the parameters.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import math
import numpy as np
import optax

from .backprop import autodiff, backprop, check_inputs, check_params
from .gradcheck import GradientMismatchError, _compare
from .layers import Layer
from .losses import get_loss

__all__ = [
    "sgd",
    "SgdState",
    "freeze",
    "biases",
    "make_train_step",
    "fit",
    "FitResult",
    "CHECK_MODES",
    "REASON_APPLIED",
    "REASON_NONFINITE",
    "REASON_MISMATCH",
    "REASONS",
]

CHECK_MODES = ("off", "report", "skip", "raise")
REASON_APPLIED, REASON_NONFINITE, REASON_MISMATCH = 0, 1, 2
REASONS = {REASON_APPLIED: "applied", REASON_NONFINITE: "non-finite loss, gradient or update",
           REASON_MISMATCH: "manual gradient disagrees with jax.grad"}


# --------------------------------------------------------------------------------------------
# Plain SGD, with optax's (init, update) signatures
# --------------------------------------------------------------------------------------------


class SgdState(NamedTuple):
    """Step count: read by a learning-rate schedule, if any."""

    count: jax.Array


def _check_learning_rate(learning_rate, who):
    if callable(learning_rate):
        return
    if isinstance(learning_rate, bool):  # float(True) == 1.0 would pass silently
        raise TypeError(f"{who}: learning_rate must be a number or a schedule, "
                        f"got {learning_rate!r}")
    try:
        value = float(learning_rate)
    except (TypeError, ValueError):
        raise TypeError(f"{who}: learning_rate must be a number or a schedule, "
                        f"got {learning_rate!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{who}: learning_rate must be a positive finite number, got {value!r}")


def sgd(learning_rate) -> optax.GradientTransformation:
    """Plain gradient descent, ``W <- W - lr * dE/dW``, written out.

    ``learning_rate`` is a positive number or an optax schedule ``count -> lr``. The result is
    an ``optax.GradientTransformation``: ``update`` returns ``-lr * grads``, which
    ``optax.apply_updates`` adds to the params.
    """
    _check_learning_rate(learning_rate, "sgd")

    def init(params):
        del params
        return SgdState(count=jnp.zeros([], jnp.int32))

    def update(updates, state, params=None):
        del params
        lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
        updates = jax.tree_util.tree_map(lambda g: (-lr * g).astype(g.dtype), updates)
        return updates, SgdState(count=optax.safe_int32_increment(state.count))

    return optax.GradientTransformation(init, update)


def biases(params):
    """A mask pytree: ``True`` for every bias leaf (a leaf whose key is ``'b'``)."""
    def is_bias(path, _):
        last = path[-1] if path else None
        return isinstance(last, jax.tree_util.DictKey) and last.key == "b"

    return jax.tree_util.tree_map_with_path(is_bias, params)


def freeze(optimizer: optax.GradientTransformation, frozen) -> optax.GradientTransformation:
    """Wrap ``optimizer`` so that the leaves marked in ``frozen`` never change.

    ``frozen`` is a pytree of bools shaped like params, or a function ``params -> mask`` such
    as :func:`biases` (``freeze(sgd(0.5), biases)`` trains weights only, like the seed's code).
    """
    def labels(params):
        mask = frozen(params) if callable(frozen) else frozen
        return jax.tree_util.tree_map(lambda f: "frozen" if f else "train", mask)

    return optax.multi_transform({"train": optimizer, "frozen": optax.set_to_zero()}, labels)


# --------------------------------------------------------------------------------------------
# The verified train step
# --------------------------------------------------------------------------------------------


def _all_finite(tree) -> jax.Array:
    leaves = jax.tree_util.tree_leaves(tree)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in leaves])) if leaves \
        else jnp.array(True)


def _guard_finite(value, grads, new_params, grads_finite=None) -> jax.Array:
    """Are the loss, the gradients and the updated params all finite? (one scalar bool)

    ``grads_finite`` is the comparison's verdict on the gradients when a check ran; without
    one, each gradient leaf is tested in the same pass as its updated parameter leaf (one
    reduction per leaf: on CPU every reduction is a pass over memory and a kernel launch).
    """
    if grads_finite is not None:
        return jnp.isfinite(value) & grads_finite & _all_finite(new_params)
    g_leaves, p_leaves = jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(new_params)
    if len(g_leaves) != len(p_leaves) or any(jnp.shape(g) != jnp.shape(p)
                                             for g, p in zip(g_leaves, p_leaves)):
        return jnp.isfinite(value) & _all_finite(grads) & _all_finite(new_params)
    oks = [jnp.all(jnp.isfinite(g) & jnp.isfinite(p)) for g, p in zip(g_leaves, p_leaves)]
    return jnp.isfinite(value) & jnp.all(jnp.stack(oks)) if oks else jnp.isfinite(value)


def _select(pred, new, old):
    return jax.tree_util.tree_map(lambda n, o: jnp.where(pred, n, o), new, old)


def _check_mode(check):
    if check not in CHECK_MODES:
        raise ValueError(f"unknown check mode {check!r}; expected one of: "
                         f"{', '.join(CHECK_MODES)}")


def _check_optimizer(optimizer):
    if not (hasattr(optimizer, "init") and hasattr(optimizer, "update")):
        raise TypeError(f"optimizer must be an optax GradientTransformation (such as "
                        f"jaxbp.sgd(0.1) or optax.adam(1e-3)), got {optimizer!r}")


def _raw_step(net: Layer, loss, optimizer, check: str, rtol, atol, guard: bool):
    """The un-jitted step: ``(params, opt_state, x, y) -> (params, opt_state, metrics)``."""
    loss = get_loss(loss)

    def step(params, opt_state, x, y):
        check_inputs(x)
        check_params(net, params, jnp.shape(x))
        value, grads = backprop(net, loss, params, x, y, validate=False)
        metrics: dict[str, Any] = {"loss": value}
        grads_finite = None  # unknown yet: the guard makes its own pass
        if check == "off":
            agree = jnp.array(True)
            metrics["rel_error"] = jnp.array(jnp.nan, jnp.result_type(float))
            metrics["worst_leaf"] = jnp.array(-1, jnp.int32)
        else:
            _, grads_ad = autodiff(net, loss, params, x, y, validate=False)
            report, grads_finite = _compare(grads, grads_ad, rtol=rtol, atol=atol)
            agree = report.ok
            metrics["rel_error"] = report.worst_rel_error
            metrics["worst_leaf"] = report.worst.astype(jnp.int32)
            metrics["report"] = report
        updates, new_state = optimizer.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        if guard:
            finite = _guard_finite(value, grads, new_params, grads_finite)
        else:
            finite = jnp.array(True)
        mismatch = finite & ~agree
        applied = finite & ~mismatch if check in ("skip", "raise") else finite
        metrics["ok"] = finite & agree
        metrics["applied"] = applied
        metrics["reason"] = jnp.where(~finite, REASON_NONFINITE,
                                      jnp.where(mismatch, REASON_MISMATCH, REASON_APPLIED)
                                      ).astype(jnp.int32)
        if guard or check in ("skip", "raise"):
            new_params = _select(applied, new_params, params)
            new_state = _select(applied, new_state, opt_state)
        return new_params, new_state, metrics

    return step


def _donate_argnums(donate: bool, check: str) -> tuple:
    """Which of ``(params, opt_state, x, y)`` a jitted step donates (see make_train_step).

    A checked step's second gradient reads the params after the update could be written, so
    XLA copies donated params first: measured slower than not donating them (W2 of the
    benchmarks: 1.27x vs 1.03x the plain step). The optimizer state is donated either way.
    """
    if not donate or check == "raise":
        return ()
    return (0, 1) if check == "off" else (1,)


def _mismatch_error(metrics, step_index=None) -> GradientMismatchError:
    report = metrics["report"]
    where = f" at step {step_index}" if step_index is not None else ""
    return GradientMismatchError(
        f"manual gradient disagrees with jax.grad{where}: worst leaf {report.worst_path}, "
        f"relative error {float(report.worst_rel_error):.3e}; nothing was updated\n"
        f"{report.table()}")


def make_train_step(net: Layer, loss, optimizer: optax.GradientTransformation,
                    check: str = "report", *, rtol: float | None = None,
                    atol: float | None = None, jit: bool = True, guard: bool = True,
                    donate: bool = False) -> Callable:
    """A verified train step ``step(params, opt_state, x, y) -> (params, opt_state, metrics)``.

    ``check`` is ``"off"``, ``"report"``, ``"skip"`` or ``"raise"`` (module docstring).
    ``rtol``/``atol`` override the per-dtype tolerances of :func:`compare_grads`. ``guard``
    (default on) refuses non-finite updates. ``jit=False`` returns the plain Python function
    (same numbers, for debugging). ``donate=True`` lets XLA reuse buffers in place (the arrays
    donated are invalid after the call): the optimizer state always, the params with
    ``check="off"`` only (a checked step's second gradient reads them again after the update
    could be written, so XLA would copy them first, which is slower than not donating them);
    ignored with ``check="raise"``, whose callers must keep their params.

    ``metrics``: ``loss``; ``rel_error`` (worst leaf relative error, NaN with ``"off"``);
    ``worst_leaf`` (its index, -1 with ``"off"``); ``ok`` (finite and agreeing); ``applied``;
    ``reason`` (``REASON_APPLIED``, ``REASON_NONFINITE`` or ``REASON_MISMATCH``); and with a
    check, ``report``, the full :class:`~jaxbp.GradReport`.
    """
    _check_mode(check)
    _check_optimizer(optimizer)
    raw = _raw_step(net, loss, optimizer, check, rtol, atol, guard)
    fn = raw
    if jit:
        donate_argnums = _donate_argnums(donate, check)
        fn = jax.jit(raw, donate_argnums=donate_argnums)
    if check != "raise":
        return fn

    def step(params, opt_state, x, y):
        new_params, new_state, metrics = fn(params, opt_state, x, y)
        if int(metrics["reason"]) == REASON_MISMATCH:
            raise _mismatch_error(metrics)
        return new_params, new_state, metrics

    step.__doc__ = make_train_step.__doc__
    return step


# --------------------------------------------------------------------------------------------
# The fused loop: many steps inside one compiled lax.scan
# --------------------------------------------------------------------------------------------


class FitResult(NamedTuple):
    """What :func:`fit` returns: final params and optimizer state, and per-step metrics."""

    params: Any
    opt_state: Any
    history: dict


def _batch_indices(key, n, batch_size, steps):
    """(steps, batch_size) indices: epoch after epoch of shuffled batches, ragged tail dropped."""
    per_epoch = n // batch_size
    epochs = -(-steps // per_epoch)
    keys = jax.random.split(key, epochs)
    perms = jax.vmap(lambda k: jax.random.permutation(k, n)[: per_epoch * batch_size])(keys)
    return perms.reshape(-1, batch_size)[:steps]


def _check_labels_now(net, loss, params, x, y):
    """Integer labels are checked against the classes while they are still concrete.

    Inside the compiled loop a label out of range can only turn the loss NaN (so every step
    would be skipped); before it, the loss can raise a ValueError naming the bad labels.
    """
    if (isinstance(y, jax.core.Tracer) or not hasattr(y, "dtype")  # a list: the loss says so
            or not jnp.issubdtype(jnp.result_type(y), jnp.integer)):
        return
    check_params(net, params, jnp.shape(x))
    out = jax.eval_shape(lambda p, xx: net.forward(p, xx)[0], params, x)
    get_loss(loss).value(jnp.zeros(out.shape, out.dtype), jnp.asarray(y))


def fit(net: Layer, loss, optimizer: optax.GradientTransformation, params, x, y, *,
        steps: int, batch_size: int | None = None, key=None, check: str = "off",
        opt_state=None, rtol: float | None = None, atol: float | None = None,
        guard: bool = True) -> FitResult:
    """Train for ``steps`` steps inside one compiled ``lax.scan``: no Python in the loop.

    Full-batch by default; with ``batch_size``, each step takes a batch of shuffled examples,
    epoch after epoch (``key`` seeds the shuffling). ``history`` holds each step's metrics
    stacked along a leading axis (``history["loss"][t]`` is the loss *before* step ``t``'s
    update). With ``check="raise"`` a disagreement stops the updates at that step and raises
    :class:`GradientMismatchError` naming the step and the leaf.

    The compiled loop is cached: calling ``fit`` again with the same ``net``, ``loss`` and
    ``optimizer`` objects and settings reuses it (the 32 most recent). As with ``jax.jit``,
    values those objects close over are read when the loop is first compiled; a changed
    learning rate needs a new optimizer object.
    """
    _check_mode(check)
    _check_optimizer(optimizer)
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"fit: steps must be a positive integer, got {steps!r}")
    check_inputs(x)
    n = jnp.shape(x)[0] if jnp.ndim(x) >= 2 else None
    if batch_size is not None:
        if n is None:
            raise ValueError("fit: batch_size needs inputs of shape (examples, features)")
        if not isinstance(batch_size, int) or not 1 <= batch_size <= n:
            raise ValueError(f"fit: batch_size must be an integer in [1, {n}], "
                             f"got {batch_size!r}")
    if n is not None and (np.ndim(y) < 1 or np.shape(y)[0] != n):  # np: y may be a list
        # Batches index x and y alike; JAX clamps out-of-range gathers, so a short y would
        # silently pair examples with the wrong targets.
        raise ValueError(f"fit: targets must have one entry per example ({n} examples), "
                         f"got shape {tuple(np.shape(y))}")
    _check_labels_now(net, loss, params, x, y)
    if opt_state is None:
        opt_state = optimizer.init(params)
    key = jax.random.key(0) if key is None else key
    spec = (net, get_loss(loss), optimizer, check, rtol, atol, guard, steps, batch_size, n)
    try:
        run = _fit_loop_cached(*spec)
    except TypeError:  # something in the spec is unhashable (a custom layer's config, say)
        run = _fit_loop(*spec)
    params_out, state_out, history = run(params, opt_state, x, y, key)
    if check == "raise":
        bad = jnp.nonzero(history["reason"] == REASON_MISMATCH, size=1, fill_value=-1)[0]
        first = int(bad[0])
        if first >= 0:
            at = jax.tree_util.tree_map(lambda h: h[first], history)
            raise _mismatch_error(at, step_index=first)
    return FitResult(params_out, state_out, history)


def _fit_loop(net, loss, optimizer, check, rtol, atol, guard, steps, batch_size, n):
    """The jitted ``run(params, opt_state, x, y, key)`` of :func:`fit` for one configuration."""
    inner_check = "skip" if check == "raise" else check
    raw = _raw_step(net, loss, optimizer, inner_check, rtol, atol, guard)

    def _stop_after_mismatch(p, s, stopped, new_p, new_s, m):
        if check != "raise":
            return new_p, new_s, stopped
        stopped = stopped | (m["reason"] == REASON_MISMATCH)
        return _select(stopped, p, new_p), _select(stopped, s, new_s), stopped

    @jax.jit
    def run(params, opt_state, x, y, key):
        if batch_size is None:
            def body(carry, _):
                p, s, stopped = carry
                new_p, new_s, m = raw(p, s, x, y)
                return _stop_after_mismatch(p, s, stopped, new_p, new_s, m), m
            xs = None
        else:
            def body(carry, idx):
                p, s, stopped = carry
                new_p, new_s, m = raw(p, s, x[idx], y[idx])
                return _stop_after_mismatch(p, s, stopped, new_p, new_s, m), m
            xs = _batch_indices(key, n, batch_size, steps)
        (p, s, _), history = jax.lax.scan(body, (params, opt_state, jnp.array(False)), xs,
                                          length=steps)
        return p, s, history

    return run


# Calling fit again with the same network, loss, optimizer and settings reuses the compiled
# loop instead of tracing and compiling it anew (jit caches per function object, and each
# _fit_loop call makes a new one).
_fit_loop_cached = functools.lru_cache(maxsize=32)(_fit_loop)
