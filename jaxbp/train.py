"""The verified train step, plain SGD, and the training loop.

``make_train_step(net, loss, optimizer, check=...)`` returns a jitted
``step(train_state, x, y) -> (train_state, metrics)`` (a :class:`TrainState` in, a
:class:`StepMetrics` out; :func:`init_train_state` makes the first state). Each step computes
the manual chain-rule gradients and, unless ``check="off"``, ``jax.grad``'s of the same
function (same layer state, same dropout key), compares them leaf by leaf on device and only
then applies the update through ``optimizer`` (``jaxbp.sgd`` or any optax
``GradientTransformation``). :func:`train_step` is the same step as a pure function.

Check modes:

- ``"off"``: manual gradients only, the fastest.
- ``"report"``: both gradients; the comparison lands in ``metrics``; the update is applied.
- ``"skip"``: the update is applied only when the gradients agree and are finite; otherwise
  params, optimizer state and layer state come back bit-for-bit unchanged and
  ``metrics.reason`` says why.
- ``"raise"``: as ``"skip"``, then a disagreement raises :class:`GradientMismatchError`, which
  carries the report and names the worst leaf (this reads one flag back to the host each step).

In every mode a step whose loss, gradients or updated parameters are not finite is not applied
(``metrics.applied`` is false, ``metrics.reason`` is ``REASON_NONFINITE``): a NaN in the data
or a learning rate that blows up never corrupts the parameters.

:func:`make_loop` runs many steps, fused in one ``lax.scan`` or as one jitted call per step;
:func:`fit`, the trainer and the data-parallel path all train through it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ._trees import all_finite
from .backprop import backprop, backprop_and_autodiff, check_inputs, check_params, forward
from .batch_order import run_order
from .gradcheck import GradientMismatchError, GradReport, compare_with_finiteness, unchecked_report
from .layers import Layer, init_state
from .losses import get_loss
from .probe import (
    check_schedule,
    host_plan,
    init_verify_state,
    leaf_owners,
    nodes,
    verified_gradients,
)

__all__ = [
    "sgd",
    "SgdState",
    "freeze",
    "biases",
    "TrainState",
    "StepMetrics",
    "init_train_state",
    "train_step",
    "make_train_step",
    "make_loop",
    "gather_batch",
    "raise_first_mismatch",
    "mismatch_error",
    "with_verify",
    "select_tree",
    "check_mode",
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
REASONS = {
    REASON_APPLIED: "applied",
    REASON_NONFINITE: "non-finite loss, gradient or update",
    REASON_MISMATCH: "manual gradient disagrees with jax.grad",
}


# --------------------------------------------------------------------------------------------
# Plain SGD, with optax's (init, update) signatures
# --------------------------------------------------------------------------------------------


class SgdState(NamedTuple):
    """Step count: read by a learning-rate schedule, if any."""

    # The field is named as optax's states name theirs; it shadows tuple.count on purpose.
    count: jax.Array  # type: ignore[assignment]


def _check_learning_rate(learning_rate, who):
    if callable(learning_rate):
        return
    if isinstance(learning_rate, bool):  # float(True) == 1.0 would pass silently
        raise TypeError(
            f"{who}: learning_rate must be a number or a schedule, got {learning_rate!r}"
        )
    try:
        value = float(learning_rate)
    except (TypeError, ValueError):
        raise TypeError(
            f"{who}: learning_rate must be a number or a schedule, got {learning_rate!r}"
        ) from None
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


class TrainState(NamedTuple):
    """Everything a step changes: params, optimizer state, layer state (BatchNorm's running
    statistics; ``()`` for a network without), and the PRNG key of the randomness (Dropout's
    masks; ``None`` for a network without). Make one with :func:`init_train_state`."""

    params: Any
    opt_state: Any
    state: Any = ()
    key: Any = None
    # The verification schedule's memory (a jaxbp.probe.VerifyState) when the step probes or
    # amortises its checks (probe=, full_every=, check_every=); None otherwise.
    verify: Any = None


class StepMetrics(NamedTuple):
    """What one step reports; the same fields whatever the check mode.

    ``loss`` (before the update); ``rel_error`` (the worst leaf's relative error, NaN with
    ``check="off"``); ``worst_leaf`` (its index, -1 with ``"off"``); ``leaf_rel_error`` (one per
    leaf, NaN with ``"off"``); ``ok`` (finite, and agreeing when checked); ``applied``;
    ``reason`` (``REASON_APPLIED``, ``REASON_NONFINITE`` or ``REASON_MISMATCH``); ``report``,
    the full :class:`~jaxbp.GradReport` (NaN statistics with ``"off"`` and on probed steps);
    ``layer``: the failing node's index in :func:`jaxbp.layer_paths` (the probed node whose
    adjoint test failed, or the node holding the worst disagreeing leaf of a full check), -1
    when nothing failed; ``probed``: which nodes this step probed (one bool per node);
    ``full``: whether this step ran the full comparison with ``jax.grad``.
    """

    loss: jax.Array
    rel_error: jax.Array
    worst_leaf: jax.Array
    leaf_rel_error: jax.Array
    ok: jax.Array
    applied: jax.Array
    reason: jax.Array
    report: GradReport
    layer: jax.Array
    probed: jax.Array
    full: jax.Array


def init_train_state(
    net: Layer,
    optimizer: optax.GradientTransformation,
    params,
    *,
    input_shape=None,
    state=None,
    key=None,
    verify: bool = False,
) -> TrainState:
    """The first :class:`TrainState`: ``optimizer.init(params)``, and the network's initial
    layer state (``init_state(net, input_shape)``) unless ``state`` is given.

    ``key`` (a PRNG key) is needed for networks with randomness (Dropout). ``verify=True``
    adds the schedule's memory (:class:`jaxbp.probe.VerifyState`) that ``probe=``,
    ``full_every=`` and ``check_every=`` steps need.
    """
    _check_optimizer(optimizer)
    if state is None:
        if net.has_state and input_shape is None:
            raise ValueError(
                f"init_train_state: the network ({net.name}) has state; pass "
                f"input_shape= (the batch's shape) or state="
            )
        state = init_state(net, input_shape) if net.has_state else ()
    verify_state = init_verify_state(net, params) if verify else None
    return TrainState(params, optimizer.init(params), state, key, verify_state)


def with_verify(net: Layer, ts: TrainState) -> TrainState:
    """``ts`` with the schedule's memory added if it has none (a fresh schedule: the next
    step runs the full check)."""
    if ts.verify is not None:
        return ts
    return ts._replace(verify=init_verify_state(net, ts.params))


def _lands_finite(param, update) -> jax.Array:
    """Is ``param + update`` certainly finite? ``|u| <= max - |p|`` (false for NaN or inf in
    either) rules out overflow without forming ``p + u``."""
    big = jnp.finfo(jnp.result_type(param)).max
    return jnp.abs(update) <= big - jnp.abs(param)


def _guard_finite(value, grads, params, updates, grads_finite=None) -> jax.Array:
    """Are the loss, the gradients and the updated params all finite? (one scalar bool)

    Decided from the params and updates *before* the update is formed, so that XLA folds
    ``where(ok, p + u, p)`` into the update's own pass: one extra read of ``p`` and ``g``
    instead of writing ``p + u``, reading it back and selecting in a second pass (measured by
    XLA's cost analysis on the benchmarks' W2 step: 250 MB per step against 287 MB for a
    check of the finished params, and 235 MB for no guard). ``grads_finite`` is the
    comparison's verdict on the gradients when a check ran; without one, each gradient leaf is
    tested in the same pass as its parameter and update leaves.
    """
    p_leaves, u_leaves = jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(updates)
    g_leaves = jax.tree_util.tree_leaves(grads)
    per_leaf = grads_finite is None and [jnp.shape(g) for g in g_leaves] == [
        jnp.shape(p) for p in p_leaves
    ]
    ok = jnp.isfinite(value)
    if grads_finite is None and not per_leaf:
        grads_finite = all_finite(grads)  # a gradient tree shaped unlike the params
    if grads_finite is not None:
        ok = ok & grads_finite
    for i, (p, u) in enumerate(zip(p_leaves, u_leaves)):
        leaf_ok = _lands_finite(p, u)
        if per_leaf:
            leaf_ok = leaf_ok & jnp.isfinite(g_leaves[i])
        ok = ok & jnp.all(leaf_ok)
    return ok


def select_tree(pred, new, old):
    """``new`` where the scalar ``pred`` holds, else ``old``, leaf by leaf (jit-friendly)."""
    return jax.tree_util.tree_map(lambda n, o: jnp.where(pred, n, o), new, old)


def check_mode(check: str) -> str:
    """``check`` if it is one of :data:`CHECK_MODES`, else a ``ValueError`` naming them."""
    if check not in CHECK_MODES:
        raise ValueError(f"unknown check mode {check!r}; expected one of: {', '.join(CHECK_MODES)}")
    return check


def _check_optimizer(optimizer):
    if not (hasattr(optimizer, "init") and hasattr(optimizer, "update")):
        raise TypeError(
            f"optimizer must be an optax GradientTransformation (such as "
            f"jaxbp.sgd(0.1) or optax.adam(1e-3)), got {optimizer!r}"
        )


def _check_train_state(ts) -> None:
    if not isinstance(ts, TrainState):
        raise TypeError(
            f"a train step takes a jaxbp.TrainState (see jaxbp.init_train_state), "
            f"got {type(ts).__name__}"
        )


def _split_key(key):
    """``(this step's key, the next step's)``; ``(None, None)`` for a network without
    randomness."""
    return (None, None) if key is None else tuple(jax.random.split(key))


def _gradients(net, loss, ts: TrainState, x, y, check: str, rtol, atol):
    """Loss, manual gradients, new layer state, and (when checked) the comparison."""
    step_key, next_key = _split_key(ts.key)
    if check == "off":
        value, grads, new_state = backprop(
            net, loss, ts.params, x, y, state=ts.state, key=step_key, validate=False
        )
        return value, grads, new_state, next_key, None, None
    # One forward for both: the same batch statistics and dropout masks, computed once.
    value, grads, grads_ad, new_state = backprop_and_autodiff(
        net, loss, ts.params, x, y, state=ts.state, key=step_key, validate=False
    )
    report, grads_finite = compare_with_finiteness(grads, grads_ad, rtol=rtol, atol=atol)
    return value, grads, new_state, next_key, report, grads_finite


def _decide(check, value, grads, params, updates, report, grads_finite, guard):
    """``(applied, metrics fields)`` of one step from its numbers."""
    finite = (
        _guard_finite(value, grads, params, updates, grads_finite) if guard else jnp.array(True)
    )
    agree = jnp.array(True) if report is None else report.ok
    mismatch = finite & ~agree
    applied = finite & ~mismatch if check in ("skip", "raise") else finite
    reason = jnp.where(
        ~finite, REASON_NONFINITE, jnp.where(mismatch, REASON_MISMATCH, REASON_APPLIED)
    ).astype(jnp.int32)
    return applied, finite & agree, reason


def train_step(
    net: Layer,
    loss,
    optimizer: optax.GradientTransformation,
    ts: TrainState,
    x,
    y,
    *,
    check: str = "report",
    rtol: float | None = None,
    atol: float | None = None,
    guard: bool = True,
    probe: int = 0,
    full_every: int | None = None,
    check_every: int | None = None,
    plan: str | tuple | None = None,
) -> tuple[TrainState, StepMetrics]:
    """One verified step, as a pure function: ``(new train state, metrics)``.

    Manual gradients (and, unless ``check="off"``, ``jax.grad``'s of the same function: same
    layer state, same key), compared leaf by leaf; the update goes through ``optimizer``. With
    ``check`` ``"skip"`` or ``"raise"`` a disagreement leaves params, optimizer state and layer
    state bit for bit as they were; a non-finite loss, gradient or update does so in every mode
    (``guard=False`` turns that off). The key advances every step.

    The schedule (``docs/verification.md``): ``probe=k`` probes ``k`` nodes per step with the
    per-layer adjoint test (:mod:`jaxbp.probe`) and runs the full comparison at step 0, every
    ``full_every`` steps (default 100) and right after a failed probe; ``check_every=N`` runs
    the full comparison every N-th step and nothing between. A failed probe is a mismatch like
    a failed full check. Both need ``ts.verify`` (:func:`init_train_state` with ``verify=True``;
    ``make_train_step`` and ``fit`` set it up themselves). ``plan`` (``"full"`` or one bool per
    node) fixes this step's part of the schedule at trace time, when the caller has read it
    (``make_train_step`` does); without it both parts are compiled and ``lax.cond`` picks.
    ``make_train_step`` jits this; ``jax.jit`` it yourself to compose it.
    """
    check_mode(check)
    _check_train_state(ts)
    check_inputs(x)
    check_params(net, ts.params, jnp.shape(x))
    probe, full_every = check_schedule(probe, full_every, check_every, check)
    inner = "skip" if check == "raise" else check
    scheduled = inner != "off" and (probe > 0 or full_every is not None)
    if scheduled:
        if ts.verify is None:
            raise ValueError(
                "a scheduled check (probe=, full_every=, check_every=) keeps its schedule in "
                "the train state: make it with jaxbp.init_train_state(..., verify=True)"
            )
        step_key, next_key = _split_key(ts.key)
        v = verified_gradients(
            net,
            get_loss(loss),
            ts.params,
            ts.state,
            x,
            y,
            step_key,
            ts.verify,
            probe=probe,
            full_every=full_every,
            rtol=rtol,
            atol=atol,
            plan=plan,
        )
        value, grads, new_state, report, grads_finite = (
            v.value,
            v.grads,
            v.new_state,
            v.report,
            v.grads_finite,
        )
        layer, probed, full, new_verify = v.layer, v.probed, v.full, v.verify
    else:
        value, grads, new_state, next_key, report, grads_finite = _gradients(
            net, loss, ts, x, y, inner, rtol, atol
        )
        n = len(nodes(net))
        probed, full, new_verify = jnp.zeros((n,), bool), jnp.array(inner != "off"), ts.verify
        layer = jnp.array(-1, jnp.int32)
        if report is not None:
            owners = jnp.asarray(leaf_owners(net, ts.params) or [-1], jnp.int32)
            worst = owners[jnp.clip(report.worst, 0, owners.size - 1)]
            layer = jnp.where(report.ok, -1, worst).astype(jnp.int32)
    updates, new_opt = optimizer.update(grads, ts.opt_state, ts.params)
    new_params = optax.apply_updates(ts.params, updates)
    applied, ok, reason = _decide(
        inner, value, grads, ts.params, updates, report, grads_finite, guard
    )
    if guard or inner == "skip":
        new_params, new_opt, new_state = select_tree(
            applied, (new_params, new_opt, new_state), (ts.params, ts.opt_state, ts.state)
        )
    report = unchecked_report(grads) if report is None else report
    checked = check != "off"
    metrics = StepMetrics(
        value,
        report.worst_rel_error if checked else report.rel_error[0],
        report.worst.astype(jnp.int32) if checked else jnp.array(-1, jnp.int32),
        report.rel_error,
        ok,
        applied,
        reason,
        report,
        layer,
        probed,
        full,
    )
    return TrainState(new_params, new_opt, new_state, next_key, new_verify), metrics


def _bound_step(net, loss, optimizer, check, rtol, atol, guard, probe, full_every):
    """:func:`train_step` with everything but ``(ts, x, y)`` (and ``plan``) bound: the one
    step function of ``make_train_step`` and the loops of ``fit``."""
    return functools.partial(
        train_step,
        net,
        loss,
        optimizer,
        check=check,
        rtol=rtol,
        atol=atol,
        guard=guard,
        probe=probe,
        full_every=full_every,
    )


def _donate_argnums(donate: bool, check: str) -> tuple:
    """Whether a jitted step donates its train state (see make_train_step).

    A checked step's second gradient reads the params after the update could be written, so
    XLA copies donated params first: measured slower than not donating them (W2 of the
    benchmarks: 1.27x vs 1.03x the plain step). So only unchecked steps donate.
    """
    return (0,) if donate and check == "off" else ()


def make_train_step(
    net: Layer,
    loss,
    optimizer: optax.GradientTransformation,
    check: str = "report",
    *,
    rtol: float | None = None,
    atol: float | None = None,
    jit: bool = True,
    guard: bool = True,
    donate: bool = False,
    probe: int = 0,
    full_every: int | None = None,
    check_every: int | None = None,
) -> Callable:
    """The verified step, jitted: ``step(train_state, x, y) -> (train_state, metrics)``.

    See :func:`train_step` and :class:`StepMetrics`. ``check`` is ``"off"``, ``"report"``,
    ``"skip"`` or ``"raise"`` (module docstring); ``"raise"`` reads one flag back each step
    and raises :class:`GradientMismatchError` (carrying the report) after a disagreement,
    nothing updated. ``rtol``/``atol`` override :func:`compare_grads`'s per-dtype tolerances.
    ``jit=False`` returns the plain function (same numbers, for debugging). ``donate=True``
    with ``check="off"`` lets XLA update the train state in place (the one passed in is then
    invalid).

    ``probe=k`` (with ``full_every=M``, default 100) or ``check_every=N``: the verification
    schedule of :func:`train_step`; the step adds the schedule's memory to a train state
    that has none. A failed check with ``"raise"`` names the culprit node and the kind of
    mistake (:func:`jaxbp.locate`).
    """
    check_mode(check)
    _check_optimizer(optimizer)
    loss = get_loss(loss)
    probe, full_every = check_schedule(probe, full_every, check_every, check, len(nodes(net)))
    scheduled = probe > 0 or full_every is not None

    raw = _bound_step(net, loss, optimizer, check, rtol, atol, guard, probe, full_every)

    fn = (
        jax.jit(raw, donate_argnums=_donate_argnums(donate, check), static_argnames=("plan",))
        if jit
        else raw
    )
    if check != "raise" and not scheduled:
        return fn
    n_nodes = len(nodes(net))

    def step(ts, x, y):
        plan = None
        if scheduled:
            # The host reads the schedule (one small transfer) and runs the program compiled
            # for exactly this step's part of it: no lax.cond between the full check and the
            # probe, nor around each node (measured: those cost 13% of an MLP's step).
            ts = with_verify(net, ts)
            count, recheck = jax.device_get((ts.verify.step, ts.verify.recheck))
            plan = host_plan(int(count), bool(recheck), n_nodes, probe, full_every)
        new_ts, metrics = fn(ts, x, y, plan=plan)
        if check == "raise" and int(metrics.reason) == REASON_MISMATCH:
            raise mismatch_error(net, loss, ts, x, y, metrics)
        return new_ts, metrics

    step.__doc__ = make_train_step.__doc__
    return step


# --------------------------------------------------------------------------------------------
# The training loop: many steps, fused in one lax.scan or one jitted call per step
# --------------------------------------------------------------------------------------------


def gather_batch(data, idx):
    """The default batch function: the rows ``idx`` of every array in ``data``."""
    return tuple(a[idx] for a in data)


def _stop_after_mismatch(ts, new_ts, metrics, stopped):
    # check="raise" inside a loop: after the first disagreement nothing changes any more, so
    # the caller can raise naming that step, with the train state from just before it.
    stopped_now = stopped | (metrics.reason == REASON_MISMATCH)
    return select_tree(stopped_now, ts, new_ts), stopped_now


def make_loop(
    step: Callable,
    *,
    fused: bool = True,
    stop_on_mismatch: bool = False,
    batch_fn: Callable = gather_batch,
    jit: bool = True,
) -> Callable:
    """Many steps of ``step(ts, x, y) -> (ts, metrics)`` (a :func:`train_step`, un-jitted).

    Returns ``run(ts, data, order) -> (ts, metrics)``: step ``t`` trains on
    ``batch_fn(data, order[t])`` (``data`` a tuple of arrays, ``order`` a ``(steps, batch)``
    array of example indices); the metrics come back stacked along a leading axis.

    ``fused=True`` compiles the whole run as one ``lax.scan``: no Python between steps, the
    fastest for small dense networks. ``fused=False`` makes one jitted call per step: on XLA
    CPU a scan whose body holds convolutions ran about 23x slower than the same steps called
    one by one. ``stop_on_mismatch`` (``check="raise"``) freezes the train state from the
    first disagreement on. ``batch_fn`` is where a data-parallel run constrains the batch's
    sharding and augmentation transforms it.
    """

    def body(carry, idx, data):
        ts, stopped = carry
        new_ts, metrics = step(ts, *batch_fn(data, idx))
        if stop_on_mismatch:
            new_ts, stopped = _stop_after_mismatch(ts, new_ts, metrics, stopped)
        return (new_ts, stopped), metrics

    if fused:

        def run_fused(ts, data, order):
            (ts, _), metrics = jax.lax.scan(
                lambda c, i: body(c, i, data), (ts, jnp.array(False)), order
            )
            return ts, metrics

        return jax.jit(run_fused) if jit else run_fused

    one = jax.jit(body) if jit else body

    def run_stepwise(ts, data, order):
        carry, history = (ts, jnp.array(False)), []
        for idx in order:
            carry, metrics = one(carry, idx, data)
            history.append(metrics)
        return carry[0], jax.tree_util.tree_map(lambda *ms: jnp.stack(ms), *history)

    return run_stepwise


def mismatch_error(net, loss, ts, x, y, metrics, *, step=None, note="nothing was updated"):
    """The :class:`GradientMismatchError` of a failed step, with the culprit found: the node
    whose manual backward disagrees with ``jax.vjp`` of its own forward on this batch, and
    what its mistake looks like (:func:`jaxbp.locate`, run only now, on failure)."""
    from .diagnose import locate

    try:
        culprit = locate(net, loss, ts.params, x, y, state=ts.state, key=_split_key(ts.key)[0])
    except Exception as e:  # locating is a courtesy: never hide the mismatch behind it
        culprit = None
        note = f"{note}; the culprit could not be located ({type(e).__name__}: {e})"
    return GradientMismatchError(
        metrics.report,
        step=step,
        note=note,
        culprit=culprit,
        probed=None if bool(metrics.full) else _probed_path(net, loss, metrics),
    )


def _probed_path(net, loss, metrics) -> str:
    layer = int(metrics.layer)
    paths = nodes(net, getattr(loss, "name", "loss"))
    return paths[layer].path if 0 <= layer < len(paths) else ""


def raise_first_mismatch(
    metrics: StepMetrics, *, first_step: int = 0, note: str = "", locate_with=None
) -> None:
    """Raise :class:`GradientMismatchError` for the first disagreeing step of stacked
    ``metrics`` (a loop's), if any, naming its global index ``first_step + t``.

    ``locate_with=(net, loss, ts, x, y)``, the train state and batch of that step, adds the
    culprit node and the diagnosis."""
    bad = np.flatnonzero(np.asarray(metrics.reason) == REASON_MISMATCH)
    if bad.size:
        t = int(bad[0])
        one = jax.tree_util.tree_map(lambda h: h[t], metrics)
        if locate_with is not None:
            net, loss, ts, x, y = locate_with
            raise mismatch_error(net, loss, ts, x, y, one, step=first_step + t, note=note)
        raise GradientMismatchError(one.report, step=first_step + t, note=note)


class FitResult(NamedTuple):
    """What :func:`fit` returns: the final train state and the stacked per-step metrics."""

    state: TrainState
    history: StepMetrics


def _check_labels_now(net, loss, params, x, y):
    """Integer labels are checked against the classes while they are still concrete.

    Inside the compiled loop a label out of range can only turn the loss NaN (so every step
    would be skipped); before it, the loss can raise a ValueError naming the bad labels.
    """
    if (
        isinstance(y, jax.core.Tracer)
        or not hasattr(y, "dtype")  # a list: the loss says so
        or not jnp.issubdtype(jnp.result_type(y), jnp.integer)
    ):
        return
    check_params(net, params, jnp.shape(x))
    out = jax.eval_shape(lambda p, xx: forward(net, p, xx, train=False), params, x)
    get_loss(loss).value(jnp.zeros(out.shape, out.dtype), jnp.asarray(y))


def _check_fit_arguments(steps, batch_size, x, y) -> int | None:
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"fit: steps must be a positive integer, got {steps!r}")
    check_inputs(x)
    n = jnp.shape(x)[0] if jnp.ndim(x) >= 2 else None
    if batch_size is not None:
        if n is None:
            raise ValueError("fit: batch_size needs inputs of shape (examples, features)")
        if not isinstance(batch_size, int) or not 1 <= batch_size <= n:
            raise ValueError(f"fit: batch_size must be an integer in [1, {n}], got {batch_size!r}")
    if n is not None and (np.ndim(y) < 1 or np.shape(y)[0] != n):  # np: y may be a list
        # Batches index x and y alike; JAX clamps out-of-range gathers, so a short y would
        # silently pair examples with the wrong targets.
        raise ValueError(
            f"fit: targets must have one entry per example ({n} examples), "
            f"got shape {tuple(np.shape(y))}"
        )
    return n


def fit(
    net: Layer,
    loss,
    optimizer: optax.GradientTransformation,
    ts: TrainState,
    x,
    y,
    *,
    steps: int,
    batch_size: int | None = None,
    key=None,
    check: str = "report",
    rtol: float | None = None,
    atol: float | None = None,
    guard: bool = True,
    fused: bool = True,
    probe: int = 0,
    full_every: int | None = None,
    check_every: int | None = None,
) -> FitResult:
    """Train ``ts`` for ``steps`` steps of :func:`train_step` through :func:`make_loop`.

    Full-batch by default; with ``batch_size``, each step takes a batch of shuffled examples,
    epoch after epoch (``key`` seeds the shuffling). ``history.loss[t]`` is the loss *before*
    step ``t``'s update. With ``check="raise"`` a disagreement stops the updates at that step
    and raises :class:`GradientMismatchError` naming the step and the leaf.

    The compiled loop is cached: calling ``fit`` again with the same ``net``, ``loss`` and
    ``optimizer`` objects and settings reuses it (the 32 most recent). As with ``jax.jit``,
    values those objects close over are read when the loop is first compiled.
    """
    check_mode(check)
    _check_optimizer(optimizer)
    _check_train_state(ts)
    probe, full_every = check_schedule(probe, full_every, check_every, check, len(nodes(net)))
    n = _check_fit_arguments(steps, batch_size, x, y)
    _check_labels_now(net, loss, ts.params, x, y)
    if probe or full_every is not None:
        ts = with_verify(net, ts)
    if batch_size is None:
        order = jnp.zeros((steps, 0), jnp.int32)  # every step the whole data set
    else:
        order = run_order(jax.random.key(0) if key is None else key, n, batch_size, steps)
    spec = (
        net,
        get_loss(loss),
        optimizer,
        check,
        rtol,
        atol,
        guard,
        batch_size is None,
        fused,
        probe,
        full_every,
    )
    try:
        run = _fit_loop_cached(*spec)
    except TypeError:  # something in the spec is unhashable (a custom layer's config, say)
        run = _fit_loop(*spec)
    ts, history = run(ts, (x, y), order)
    if check == "raise":
        # The loop froze the train state at the first disagreement: ts is the state that
        # step saw, so the culprit can be located on that step's batch.
        bad = np.flatnonzero(np.asarray(history.reason) == REASON_MISMATCH)
        if bad.size:
            xb, yb = (x, y) if batch_size is None else gather_batch((x, y), order[int(bad[0])])
            raise_first_mismatch(history, locate_with=(net, loss, ts, xb, yb))
    return FitResult(ts, history)


def _whole_data(data, idx):
    return data


def _fit_loop(
    net, loss, optimizer, check, rtol, atol, guard, full_batch, fused, probe=0, full_every=None
):
    step = _bound_step(net, loss, optimizer, check, rtol, atol, guard, probe, full_every)

    return make_loop(
        step,
        fused=fused,
        stop_on_mismatch=check == "raise",
        batch_fn=_whole_data if full_batch else gather_batch,
    )


# Calling fit again with the same network, loss, optimizer and settings reuses the compiled
# loop instead of tracing and compiling it anew (jit caches per function object, and each
# _fit_loop call makes a new one).
_fit_loop_cached = functools.lru_cache(maxsize=32)(_fit_loop)
