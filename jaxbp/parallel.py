"""Data parallelism with JAX's own sharding: the verified train step on many devices and hosts.

jaxbp adds no distribution layer of its own. A :class:`jax.sharding.Mesh` names the devices;
a :class:`~jax.sharding.NamedSharding` with ``PartitionSpec("batch")`` splits the batch along
its first axis, one slice per device; ``PartitionSpec()`` replicates params and optimizer
state (``shard_params=True`` splits each of their leaves over the devices instead,
:func:`param_spec`); and the step is :func:`jaxbp.make_train_step`'s own (manual backward,
``jax.grad`` comparison, update, guard), called on inputs placed on the mesh. ``jax.jit``
follows its inputs' shardings, and XLA's SPMD partitioner runs it on every device and inserts
the collectives itself::

    mesh = jaxbp.parallel.data_parallel_mesh()            # all devices, axis "batch"
    step = jaxbp.parallel.make_parallel_train_step(net, loss, optax.adam(1e-3), mesh=mesh)
    ts = jaxbp.parallel.replicate(mesh, jaxbp.init_train_state(net, optimizer, params))
    ts, metrics = step(ts, x, y)                          # x: the *global* batch

Why this is the same computation as on one device: every jaxbp loss is a mean over the
examples of the batch, so the loss, its ``dE/dout`` and therefore every parameter gradient
``dW = x.T @ dy`` are sums over the *global* batch; the partitioner computes each device's
partial sum and all-reduces them. Nothing about the step is per-device: the gradient
comparison sees the global manual and ``jax.grad`` gradients, so its worst leaf is the worst
over all devices, and the skip / raise decision is one replicated scalar, identical on every
device and every host. Results match a one-device run up to the order of floating-point
additions (float64: ~1e-15 relative; see docs/scaling.md for float32).

Batch sizes: the batch must split evenly, ``batch % num_devices == 0``; anything else is a
``ValueError`` saying so. jaxbp does not pad, because padded examples would change the mean
loss and its gradient.

Several hosts: call ``jax.distributed.initialize(...)`` on every host before anything else
touches JAX; ``data_parallel_mesh()`` then spans every device of every host, and each host runs
the same program. :func:`shard_batch` takes the global batch (the same on every host, each host
keeps its own slices); :func:`shard_local_batch` takes each host's own part of it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from .layers import Layer
from .train import gather_batch, make_loop, make_train_step

__all__ = [
    "data_parallel_mesh",
    "batch_sharding",
    "replicated_sharding",
    "shard_batch",
    "shard_local_batch",
    "replicate",
    "make_parallel_train_step",
    "check_batch_size",
    "constrain_batch",
    "jit_replicated",
    "sharded_batch_fn",
    "make_parallel_loop",
    "param_spec",
    "param_sharding",
    "shard_params",
    "check_shardable",
    "place_train_state",
    "constrain_train_state",
    "bytes_per_device",
]

BATCH_AXIS = "batch"


# --------------------------------------------------------------------------------------------
# The mesh and its two shardings
# --------------------------------------------------------------------------------------------


def data_parallel_mesh(
    num_devices: int | None = None, *, devices=None, axis_name: str = BATCH_AXIS
) -> Mesh:
    """A one-axis mesh over ``num_devices`` devices (default: all of them, on every host).

    ``devices`` defaults to ``jax.devices()``: with ``jax.distributed`` that is every device of
    every process. The mesh's axis is ``Auto`` (XLA's partitioner places the collectives).
    """
    pool = list(jax.devices() if devices is None else devices)
    if not pool:
        raise ValueError("data_parallel_mesh: no devices to build a mesh from")
    if num_devices is None:
        num_devices = len(pool)
    if (
        not isinstance(num_devices, (int, np.integer))
        or isinstance(num_devices, bool)
        or num_devices < 1
    ):
        raise ValueError(
            f"data_parallel_mesh: num_devices must be a positive integer, got {num_devices!r}"
        )
    num_devices = int(num_devices)
    if num_devices > len(pool):
        platform = pool[0].platform
        hint = (
            f"; on the CPU, start Python with "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={num_devices} to simulate "
            f"{num_devices} devices"
            if platform == "cpu"
            else ""
        )
        raise ValueError(
            f"data_parallel_mesh: asked for {num_devices} devices, but JAX sees "
            f"only {len(pool)} ({platform}){hint}"
        )
    if devices is None and jax.process_count() > 1 and num_devices != len(pool):
        raise ValueError(
            f"data_parallel_mesh: with {jax.process_count()} processes the mesh "
            f"must span all {len(pool)} devices (every process runs the same "
            f"program on its own devices), got num_devices={num_devices}"
        )
    return jax.make_mesh(
        (num_devices,), (axis_name,), axis_types=(AxisType.Auto,), devices=pool[:num_devices]
    )


def _check_mesh(mesh) -> Mesh:
    if not isinstance(mesh, Mesh):
        raise TypeError(
            f"mesh must be a jax.sharding.Mesh (see "
            f"jaxbp.parallel.data_parallel_mesh), got {type(mesh).__name__}"
        )
    return mesh


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """First axis split over *all* axes of ``mesh`` (one slice per device); the rest whole."""
    _check_mesh(mesh)
    names = tuple(mesh.axis_names)
    return NamedSharding(mesh, PartitionSpec(names[0] if len(names) == 1 else names))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
    """A full copy on every device of ``mesh``: for params, optimizer state and metrics."""
    return NamedSharding(_check_mesh(mesh), PartitionSpec())


# --------------------------------------------------------------------------------------------
# Putting data on the mesh
# --------------------------------------------------------------------------------------------


def _place(value, sharding: NamedSharding):
    """``value`` on ``sharding``: unchanged if already there, else copied (on any host count)."""
    if isinstance(value, jax.Array):
        if value.sharding.is_equivalent_to(sharding, value.ndim):
            return value
        if sharding.is_fully_addressable or not value.is_fully_addressable:
            return jax.device_put(value, sharding)
    elif sharding.is_fully_addressable:
        return jax.device_put(value, sharding)
    # Several processes, and this one holds the whole value: each process fills in the slices
    # that live on its own devices (device_put would need a cross-host consistency check).
    host = np.asarray(value)
    host = host.astype(jax.dtypes.canonicalize_dtype(host.dtype), copy=False)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def _check_split(what: str, value, parts: int, scope: str) -> None:
    shape = np.shape(value)
    if len(shape) == 0:
        raise ValueError(
            f"data parallel: {what} is a scalar; it needs a leading batch axis "
            f"(shape (batch, ...)) to split across devices"
        )
    n = shape[0]
    if n % parts:
        lower, upper = (n // parts) * parts, -(-n // parts) * parts
        suggestion = f"{lower} or {upper}" if lower else f"{upper}"
        raise ValueError(
            f"data parallel over {parts} {scope}: a batch of {n} examples "
            f"({what} shape {tuple(shape)}) cannot be split evenly; use a batch "
            f"size that is a multiple of {parts}, such as {suggestion} (jaxbp does "
            f"not pad: padded examples would change the mean loss)"
        )


def shard_batch(mesh: Mesh, x, y):
    """``(x, y)`` of the *global* batch, split along their first axis over ``mesh``.

    Raises ``ValueError`` if the device count does not divide the batch. With several processes
    every process passes the same global arrays and keeps only its own devices' slices.
    """
    sharding = batch_sharding(mesh)
    for what, value in (("x", x), ("y", y)):
        _check_split(what, value, mesh.size, "devices")
    return _place(x, sharding), _place(y, sharding)


def shard_local_batch(mesh: Mesh, x_local, y_local):
    """Each process's *own* part of the batch, assembled into one global batch.

    For multi-host input pipelines where every host loads different examples: the global batch
    is the processes' local batches concatenated in process order
    (``jax.make_array_from_process_local_data``). In a single process this is
    :func:`shard_batch`.
    """
    sharding = batch_sharding(mesh)
    local_devices = len(sharding.addressable_devices)
    if local_devices == 0:
        raise ValueError("shard_local_batch: this process has no device in the mesh")
    out = []
    for what, value in (("x", x_local), ("y", y_local)):
        _check_split(what, value, local_devices, "local devices")
        value = np.asarray(value)
        value = value.astype(jax.dtypes.canonicalize_dtype(value.dtype), copy=False)
        out.append(jax.make_array_from_process_local_data(sharding, value))
    return tuple(out)


def replicate(mesh: Mesh, tree):
    """Every leaf of ``tree`` (params, optimizer state) copied onto every device of ``mesh``."""
    sharding = replicated_sharding(mesh)
    return jax.tree_util.tree_map(lambda leaf: _place(leaf, sharding), tree)


# --------------------------------------------------------------------------------------------
# Sharded parameters: every leaf split along one axis the device count divides
# --------------------------------------------------------------------------------------------


def param_spec(shape, parts: int, axis_name: str = BATCH_AXIS) -> PartitionSpec:
    """Where a leaf of ``shape`` is split over ``parts`` devices: along its largest axis that
    ``parts`` divides (the first of equal ones), ``PartitionSpec()`` (replicated) where none does.

    A function of the shape alone, so a parameter and its optimizer moments (Adam's ``mu`` and
    ``nu``, shaped like it) are split alike, and the rule works on tracers inside a compiled loop.
    """
    best = None
    for axis, size in enumerate(shape):
        if size % parts == 0 and size >= parts and (best is None or size > shape[best]):
            best = axis
    if best is None or parts == 1:
        return PartitionSpec()
    return PartitionSpec(*([None] * best), axis_name)


def param_sharding(mesh: Mesh, tree):
    """:func:`param_spec`'s :class:`NamedSharding` for every leaf of ``tree`` (any pytree of
    arrays or shape-dtype structs), over all axes of ``mesh`` as one."""
    names = tuple(_check_mesh(mesh).axis_names)
    axis = names[0] if len(names) == 1 else names

    def sharding(leaf):
        return NamedSharding(mesh, param_spec(np.shape(leaf), mesh.size, axis))

    return jax.tree_util.tree_map(sharding, tree)


def shard_params(mesh: Mesh, tree):
    """Every leaf of ``tree`` (params, optimizer state) split over ``mesh`` by
    :func:`param_spec`: each device holds one slice of each splittable leaf."""
    return jax.tree_util.tree_map(_place, tree, param_sharding(mesh, tree))


def check_shardable(mesh: Mesh, params) -> None:
    """``ValueError`` naming ``shard_params`` unless sharding over ``mesh`` splits something:
    a mesh of two or more devices and at least one parameter with an axis its size divides."""
    n = _check_mesh(mesh).size
    if n < 2:
        raise ValueError(
            "shard_params needs two or more devices to split the parameters over, got 1"
        )
    shapes = [tuple(np.shape(leaf)) for leaf in jax.tree_util.tree_leaves(params)]
    if not any(param_spec(shape, n) != PartitionSpec() for shape in shapes):
        raise ValueError(
            f"shard_params: no parameter of the model has an axis that {n} devices divide "
            f"(shapes {sorted(set(shapes))}); replicate them instead (leave shard_params off) "
            f"or use a device count that divides a parameter axis"
        )


def place_train_state(mesh: Mesh, ts, shard: bool = False):
    """A :class:`jaxbp.TrainState` on ``mesh``: params and optimizer state split
    (:func:`shard_params`) when ``shard``, replicated otherwise; layer state, key and the
    verification schedule's memory always replicated (small, and read whole)."""
    if not shard:
        return replicate(mesh, ts)
    # Only the rest is replicated: a round trip of the params through a full copy would cost
    # an all-gather each step.
    rest = replicate(mesh, ts._replace(params=None, opt_state=None))
    return rest._replace(
        params=shard_params(mesh, ts.params), opt_state=shard_params(mesh, ts.opt_state)
    )


def constrain_train_state(mesh: Mesh, ts, shard: bool = False):
    """Inside a jitted function: :func:`place_train_state`'s placement as sharding constraints
    (``jax.lax.with_sharding_constraint``), so a compiled loop keeps its carry split."""
    rep = replicated_sharding(mesh)
    shardings = jax.tree_util.tree_map(lambda _: rep, ts)
    if shard:
        shardings = shardings._replace(
            params=param_sharding(mesh, ts.params), opt_state=param_sharding(mesh, ts.opt_state)
        )
    return jax.lax.with_sharding_constraint(ts, shardings)


def bytes_per_device(tree) -> dict:
    """``{device: bytes}`` that ``tree``'s arrays occupy on each device, summed from their
    addressable shards (what this process's devices actually hold)."""
    held: dict = {}
    for leaf in jax.tree_util.tree_leaves(tree):
        for shard in leaf.addressable_shards:
            held[shard.device] = held.get(shard.device, 0) + shard.data.nbytes
    return held


# --------------------------------------------------------------------------------------------
# The data-parallel verified train step
# --------------------------------------------------------------------------------------------


def make_parallel_train_step(
    net: Layer,
    loss,
    optimizer: optax.GradientTransformation,
    check: str = "report",
    *,
    mesh: Mesh | None = None,
    shard_params: bool = False,
    **options,
) -> Callable:
    """:func:`jaxbp.make_train_step` on ``mesh``: ``step(train_state, x, y) -> (train_state,
    metrics)`` with the batch split over the devices.

    The step *is* ``make_train_step(net, loss, optimizer, check, **options)`` (same options:
    ``rtol``, ``atol``, ``guard``, ``donate``, ``probe``, ``full_every``, ``check_every``; same
    :class:`jaxbp.StepMetrics`, check modes and guard); this adds only where its inputs live.
    ``x`` and ``y`` are the *global* batch, split along the first axis (a batch the device
    count does not divide raises ``ValueError``). The train state is replicated, or with
    ``shard_params=True`` its params and optimizer state are split (:func:`param_spec`; each
    device holds about ``1/N`` of them) and XLA gathers each parameter where it is used. jit
    follows its inputs' shardings, so the manual backward is unchanged. Arrays already placed
    are not copied (place them once with :func:`shard_batch` / :func:`place_train_state`).
    ``mesh`` defaults to :func:`data_parallel_mesh()` (every device).

    The returned function carries ``step.mesh`` and ``step.jitted``: the jitted step when it is
    one jitted call (not ``"raise"``, no schedule; e.g. for
    ``step.jitted.lower(...).compile().cost_analysis()``: per-device FLOPs), else ``None``.
    """
    mesh = data_parallel_mesh() if mesh is None else _check_mesh(mesh)
    inner = make_train_step(net, loss, optimizer, check, **options)

    def step(ts, x, y):
        x, y = shard_batch(mesh, x, y)
        if shard_params:
            check_shardable(mesh, ts.params)
        return inner(place_train_state(mesh, ts, shard_params), x, y)

    step.__doc__ = make_parallel_train_step.__doc__
    # Attributes on a function: fine at runtime, not modelled by mypy.
    step.mesh = mesh  # type: ignore[attr-defined]
    step.jitted = inner if hasattr(inner, "lower") else None  # type: ignore[attr-defined]
    return step


# --------------------------------------------------------------------------------------------
# Whole compiled loops (the trainer's epochs): jaxbp.train.make_loop on a mesh
# --------------------------------------------------------------------------------------------


def check_batch_size(mesh: Mesh, batch_size: int) -> None:
    """``ValueError`` unless ``batch_size`` splits evenly over the devices of ``mesh``."""
    _check_split("the batch", np.empty((batch_size, 0)), _check_mesh(mesh).size, "devices")


def constrain_batch(mesh: Mesh, *arrays):
    """Inside a jitted function: ask for ``arrays`` split along their first axis over ``mesh``.

    ``jax.lax.with_sharding_constraint`` with :func:`batch_sharding`: a batch gathered inside a
    compiled loop (``x[idx]``) is then computed on, one slice per device, and everything that
    reduces over it (loss, gradients) is all-reduced by XLA.
    """
    sharding = batch_sharding(mesh)
    for value in arrays:
        _check_split("the batch", value, mesh.size, "devices")
    out = tuple(jax.lax.with_sharding_constraint(a, sharding) for a in arrays)
    return out[0] if len(out) == 1 else out


def jit_replicated(fn: Callable, mesh: Mesh, **jit_kwargs) -> Callable:
    """``jax.jit(fn)`` with every argument and result replicated over ``mesh``.

    For a loop whose batches are split inside by :func:`constrain_batch`: params, optimizer
    state and the (small) dataset are copied to every device, each device works on its slice of
    each batch.
    """
    rep = replicated_sharding(mesh)
    return jax.jit(fn, in_shardings=rep, out_shardings=rep, **jit_kwargs)


def sharded_batch_fn(mesh: Mesh, batch_fn: Callable = gather_batch) -> Callable:
    """A ``make_loop`` batch function: ``batch_fn``'s batch, then split over ``mesh``
    (:func:`constrain_batch`)."""

    def batch(data, idx):
        return constrain_batch(mesh, *batch_fn(data, idx))

    return batch


def make_parallel_loop(
    step: Callable,
    mesh: Mesh | int | None = None,
    *,
    fused: bool = True,
    stop_on_mismatch: bool = False,
    batch_fn: Callable = gather_batch,
    shard_params: bool = False,
) -> Callable:
    """:func:`jaxbp.train.make_loop` on ``mesh`` (or a mesh over that many devices):
    ``run(train_state, data, order) -> (train_state, stacked metrics)``.

    The train state and the (small) dataset are replicated on every device; each batch that
    ``batch_fn`` makes is split over the devices (:func:`sharded_batch_fn`), so every loss and
    gradient is all-reduced by XLA. ``fused`` as in ``make_loop``. ``shard_params=True``
    splits params and optimizer state instead (:func:`place_train_state`), and every step's
    train state is constrained to stay split (:func:`constrain_train_state`).
    """
    if not isinstance(mesh, Mesh):
        mesh = data_parallel_mesh(mesh)
    options: dict[str, Any] = dict(
        fused=fused, stop_on_mismatch=stop_on_mismatch, batch_fn=sharded_batch_fn(mesh, batch_fn)
    )
    if shard_params:
        return _sharded_loop(step, mesh, jit_each_step=not fused, **options)
    if fused:
        return jit_replicated(make_loop(step, jit=False, **options), mesh)
    run = make_loop(step, jit=True, **options)

    def run_replicated(ts, data, order):
        return run(replicate(mesh, ts), replicate(mesh, data), order)

    return run_replicated


def _sharded_loop(step: Callable, mesh: Mesh, *, jit_each_step: bool, **options) -> Callable:
    """``make_loop`` of ``step`` with params and optimizer state split over ``mesh``."""

    def split_step(ts, x, y):
        # Without the constraints XLA's propagation would be free to gather the carry of a
        # lax.scan back onto every device.
        new_ts, metrics = step(constrain_train_state(mesh, ts, True), x, y)
        return constrain_train_state(mesh, new_ts, True), metrics

    loop = make_loop(split_step, jit=jit_each_step, **options)
    run = loop if jit_each_step else jax.jit(loop)

    def run_sharded(ts, data, order):
        check_shardable(mesh, ts.params)
        return run(place_train_state(mesh, ts, True), replicate(mesh, data), order)

    return run_sharded
