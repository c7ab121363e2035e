"""The per-layer probe: an adjoint (dot-product) test of one node's backward, every step.

For a node ``y = f(p, x)`` of the layer tree whose manual backward turned the cotangent ``dy``
into ``(dp, dx)``, the chain rule holds exactly when, for every direction ``(u_p, u_x)``::

    <dy, J_p u_p + J_x u_x>  ==  <dp, u_p> + <dx, u_x>          (the adjoint identity)

The left side is one forward-mode derivative (``jax.jvp`` of the node's own forward), the right
side costs two inner products with numbers the backward already computed. A wrong backward
(a sign, a factor, a missing term, a transpose, one wrong entry) breaks the identity for all but
a measure-zero set of random directions, so one fresh direction per step finds it; a failure
names the node. This is Claerbout's dot-product test of an adjoint operator, run on each layer
of the network actually being trained, inside the jitted step.

How it stays cheap:

- the tangent rides in the step's own forward: the probed node's forward runs as ``jax.jvp``
  (primal and tangent together), and its primal output feeds the rest of the network, so the
  node's forward is not recomputed (for a scan-bound GRU the tangent costs ~2% of the step);
- only ``probe=k`` nodes are probed per step (a ``lax.cond`` per node picks the jvp or the plain
  forward); every node is probed at least once every ``ceil(N / k)`` steps;
- the right side reuses ``dp`` and ``dx``.

Directions are Gaussian, fresh every step, and scaled per leaf by the inverse of that leaf's
gradient norm (the last one seen), so that every leaf contributes ``N(0, 1)`` to the identity:
a bias with a gradient 1e-4 times its weight's is tested as sharply as the weight. The
tolerance is derived in ``docs/verification.md`` (:func:`probe_tolerance`).

Nodes are the layers of the tree in pre-order (combinators too: a ``residual`` that drops its
skip path fails its own identity, though each child passes), then the loss
(:func:`layer_paths`).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ._trees import all_finite
from .layers import Context, Layer, apply, concat, residual, serial

__all__ = [
    "layer_paths",
    "Node",
    "nodes",
    "VerifyState",
    "init_verify_state",
    "probe_tolerance",
    "PROBE_KAPPA",
    "leaf_owners",
    "is_combinator",
    "descendants",
    "rebuild",
]

# The combinators whose children are probed as nodes of their own: rebuilt around probed
# children by their own constructors (their params are a tuple, child i's entry i).
_COMBINATORS = {"serial": serial, "residual": residual, "concat": concat}


class Node(NamedTuple):
    """One node of the layer tree: its pre-order index, readable path, and layer."""

    # The field is named as the layer paths' index; it shadows tuple.index on purpose.
    index: int  # type: ignore[assignment]
    path: str
    layer: Layer | None  # None for the loss node
    children: tuple[int, ...] = ()


_CODES: dict[str, tuple] = {}


def _codes(name: str) -> tuple:
    # The code objects of the library's own combinator: a layer that carries the name but
    # whose functions were replaced (a deliberately broken residual, a custom rule) is not
    # rebuilt from the library's code, which would test something else; it is probed whole.
    if name not in _CODES:
        from .layers import Identity

        layer = _COMBINATORS[name](Identity)
        _CODES[name] = (layer.backward.__code__,)
    return _CODES[name]


def rebuild(layer: Layer, children) -> Layer:
    """The combinator ``layer`` (``is_combinator``) built again around ``children``."""
    return _COMBINATORS[layer.name](*children)


def is_combinator(layer: Layer) -> bool:
    """Is ``layer`` the library's ``serial``, ``residual`` or ``concat`` (its children are
    nodes of their own)?"""
    if layer.name not in _COMBINATORS or not layer.children:
        return False
    (backward,) = _codes(layer.name)
    return getattr(layer.backward, "__code__", None) is backward


def nodes(net: Layer, loss_name: str = "loss") -> list[Node]:
    """The nodes of ``net`` in pre-order, then the loss node (see :func:`layer_paths`)."""
    out: list[Node] = []

    def walk(layer: Layer, prefix: str) -> int:
        index = len(out)
        label = f"{prefix} ({layer.name})" if prefix else f"net ({layer.name})"
        out.append(Node(index, label, layer))
        if is_combinator(layer):
            kids = []
            for i, child in enumerate(layer.children):
                seg = f"{layer.name}[{i}]"
                kids.append(walk(child, f"{prefix}/{seg}" if prefix else seg))
            out[index] = out[index]._replace(children=tuple(kids))
        return index

    walk(net, "")
    out.append(Node(len(out), f"loss ({loss_name})", None))
    return out


def layer_paths(net: Layer, loss=None) -> list[str]:
    """Readable paths of every node the probe covers, in the order ``StepMetrics.layer``
    indexes them: the network (``net (serial)``), each layer in pre-order
    (``serial[3]/residual[1] (MultiHeadAttention)``), and last the loss (``loss (mse)``)."""
    name = getattr(loss, "name", loss) if loss is not None else "loss"
    return [n.path for n in nodes(net, str(name))]


def leaf_owners(net: Layer, params) -> list[int]:
    """For every leaf of ``params`` (in flattening order), the index of the deepest node that
    holds it: where a disagreeing parameter gradient lives."""
    owners: list[int] = []
    counter = [0]

    def walk(layer: Layer, p):
        index = counter[0]
        counter[0] += 1
        if is_combinator(layer) and isinstance(p, (tuple, list)):
            for child, cp in zip(layer.children, p):
                walk(child, cp)
        else:
            owners.extend([index] * len(jax.tree_util.tree_leaves(p)))
            counter[0] += descendants(layer)

    walk(net, params)
    return owners


def descendants(layer: Layer) -> int:
    """How many nodes lie below ``layer`` in the tree."""
    if not is_combinator(layer):
        return 0
    return sum(1 + descendants(c) for c in layer.children)


# --------------------------------------------------------------------------------------------
# The state the probe keeps between steps
# --------------------------------------------------------------------------------------------


class VerifyState(NamedTuple):
    """What the verification schedule carries from step to step (inside ``TrainState.verify``).

    ``step``: steps taken (applied or not); ``recheck``: run the full check next step (after a
    failed probe); ``grad_norm``: each parameter leaf's last gradient norm (a pytree like
    params); ``dx_norm``: each node's last input-gradient norm; both set the directions' scale.
    """

    step: jax.Array
    recheck: jax.Array
    grad_norm: Any
    dx_norm: jax.Array


def init_verify_state(net: Layer, params) -> VerifyState:
    """The first :class:`VerifyState`: step 0 (a full check), unit scales until measured."""
    n = len(nodes(net))
    ones = jax.tree_util.tree_map(lambda p: jnp.ones((), jnp.result_type(p)), params)
    return VerifyState(
        jnp.zeros((), jnp.int32), jnp.array(True), ones, jnp.ones((n,), jnp.result_type(float))
    )


# --------------------------------------------------------------------------------------------
# The tolerance
# --------------------------------------------------------------------------------------------

# kappa in  |lhs - rhs| <= kappa * eps * (sum of the terms' typical sizes): the relative error
# of a computed gradient or tangent, in units of eps, that the manual backward and jax.jvp may
# each carry (summation order, fused multiply-adds, a recurrence's accumulation), times a margin
# of six standard deviations of a random projection. See docs/verification.md.
PROBE_KAPPA = 256.0
# The bound for rounding that cancellation exposes (_adjoint): a rounding growth of ~16 eps in
# the terms' own size, the random-walk growth over ~256 summed terms.
CANCELLATION_KAPPA = 16.0


def probe_tolerance(dtype, magnitude) -> jax.Array:
    """``PROBE_KAPPA * eps(dtype) * magnitude``: the most the two sides of the adjoint
    identity may differ through rounding (``magnitude`` from :func:`_magnitudes`)."""
    return PROBE_KAPPA * jnp.finfo(dtype).eps * magnitude


def _sq(a) -> jax.Array:
    a = jnp.asarray(a)
    return jnp.sum(jnp.square(a.astype(jnp.result_type(float))))


def _inner(a, b) -> jax.Array:
    f = jnp.result_type(float)
    return jnp.sum(jnp.asarray(a).astype(f) * jnp.asarray(b).astype(f))


def _differentiable(x) -> bool:
    return jnp.issubdtype(jnp.result_type(x), jnp.inexact)


def _floor_norm(norm, total):
    # A leaf whose gradient is (legitimately) near zero is not blown up into a direction of
    # enormous size, where rounding in J u would swamp the test.
    return jnp.maximum(norm, 1e-3 * total + jnp.finfo(jnp.result_type(float)).tiny)


def _mix(h) -> jax.Array:
    """MurmurHash3's 32-bit finaliser: every input bit affects every output bit."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def sub_seed(seed, i: int) -> jax.Array:
    """An independent-looking seed for part ``i`` of ``seed`` (a uint32 scalar)."""
    return _mix(jnp.asarray(seed, jnp.uint32) ^ jnp.uint32((0x9E3779B9 * (i + 1)) & 0xFFFFFFFF))


def noise(seed, shape, dtype) -> jax.Array:
    """Zero-mean, unit-variance noise (uniform on ``[-sqrt 3, sqrt 3]``) of ``shape``: a hash
    of each entry's index and ``seed``, one elementwise pass.

    A probe needs fresh, zero-mean directions, not cryptographic randomness; JAX's threefry
    expands into dozens of small kernels per draw, which on a CPU cost more than a small
    network's whole probe."""
    size = math.prod(shape)
    h = _mix(jax.lax.iota(jnp.uint32, size) * jnp.uint32(0x9E3779B1) + seed)
    unit = (h >> 8).astype(jnp.float32) * (1.0 / (1 << 24)) - 0.5  # [-1/2, 1/2)
    return (unit * math.sqrt(12.0)).astype(dtype).reshape(shape)


def random_direction(seed, shape, dtype) -> jax.Array:
    """A zero-mean random direction of ``shape`` with ``E <g, u>^2 = |g|^2`` for every ``g``.

    Small arrays get independent entries. A large one gets a random rank-one matrix over its
    last axis, ``u = a b^T`` (reshaped): the same second moment from ``rows + columns`` random
    numbers instead of ``rows x columns``. A wrong gradient ``e`` still goes unnoticed only
    where ``a^T e b = 0``, a set of measure zero for any ``e != 0``.
    """
    size = math.prod(shape)
    if len(shape) < 2 or size <= 4096:
        return noise(seed, shape, dtype)
    cols = shape[-1]
    a = noise(sub_seed(seed, 0), (size // cols, 1), jnp.float32)
    b = noise(sub_seed(seed, 1), (1, cols), jnp.float32)
    return (a * b).reshape(shape).astype(dtype)


def _directions(key, params, x, grad_norm, dx_norm, network_input=False):
    """Gaussian directions, leaf ``L`` scaled by ``1 / |g_L|`` (its last gradient norm), so
    that each leaf's ``<g_L, u_L>`` is ``N(0, 1)``; ``u_x`` likewise by ``1 / |dx|``."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    norms = jax.tree_util.tree_leaves(grad_norm)
    total = sum((n for n in norms), jnp.zeros((), jnp.result_type(float))) + dx_norm
    keys = [sub_seed(key, i) for i in range(len(leaves) + 1)]
    u_leaves = []
    for k, leaf, norm in zip(keys[:-1], leaves, norms):
        scale = 1.0 / _floor_norm(norm, total)
        u = random_direction(k, jnp.shape(leaf), jnp.result_type(float)) * scale
        u_leaves.append(u.astype(jnp.result_type(leaf)))
    u_p = jax.tree_util.tree_unflatten(treedef, u_leaves)
    if network_input or not _differentiable(x):
        return u_p, None
    scale = 1.0 / _floor_norm(dx_norm, total)
    u_x = (random_direction(keys[-1], jnp.shape(x), jnp.result_type(float)) * scale).astype(
        jnp.result_type(x)
    )
    return u_p, u_x


class ProbeResult(NamedTuple):
    """One node's adjoint test: ``lhs = <dy, J u>``, ``rhs = <dp, u_p> + <dx, u_x>``, the
    tolerance, and the gradient norms measured on the way (for the next directions)."""

    lhs: jax.Array
    rhs: jax.Array
    tol: jax.Array
    dx_norm: jax.Array

    @property
    def ok(self) -> jax.Array:
        return jnp.abs(self.lhs - self.rhs) <= self.tol


# --------------------------------------------------------------------------------------------
# Instrumenting a network
# --------------------------------------------------------------------------------------------


class Probing(NamedTuple):
    """One step's probing plan, closed over by the instrumented layers of that trace.

    ``selected`` is a tuple of Python bools (a *static* plan: the step is compiled for exactly
    these nodes, no ``lax.cond`` anywhere) or a traced ``(N,)`` bool array (a *dynamic* plan:
    one compiled step serves every selection, each node behind a ``lax.cond``; what a fused
    ``lax.scan`` loop needs)."""

    selected: Any
    key: Any  # this step's probe seed (uint32): every direction is hashed from it
    grad_norm: Any  # pytree like params
    dx_norm: jax.Array  # (N,)


def _when(selected, index, yes, no):
    """``yes()`` if node ``index`` is selected, else ``no()``: a Python ``if`` for a static
    plan, a ``lax.cond`` for a dynamic one."""
    if isinstance(selected, tuple):
        return yes(None) if selected[index] else no(None)
    return _cond_keeping_statics(selected[index], yes, no)


def _cond_keeping_statics(pred, yes, no):
    """``lax.cond`` for branches whose results may hold Python values (a layer's cache can
    keep a static length): only arrays cross the cond, the rest is taken as traced."""
    statics: dict = {}

    def arrays_of(fn, name):
        def branch(_):
            leaves, tree = jax.tree_util.tree_flatten(fn(None))
            is_array = [isinstance(v, (jax.Array, np.ndarray, np.generic)) for v in leaves]
            statics[name] = (tree, leaves, is_array)
            return [v for v, a in zip(leaves, is_array) if a]

        return branch

    arrays = iter(jax.lax.cond(pred, arrays_of(yes, "yes"), arrays_of(no, "no"), None))
    tree, leaves, is_array = statics["no"]
    return jax.tree_util.tree_unflatten(
        tree, [next(arrays) if a else v for v, a in zip(leaves, is_array)]
    )


def _zero_result(_=None) -> ProbeResult:
    z = jnp.zeros((), jnp.result_type(float))
    return ProbeResult(z, z, z, z)


def instrument(net: Layer, plan: Probing | None, tape: dict) -> Layer:
    """``net`` with every node wrapped: a probed node checks the adjoint identity and writes a
    :class:`ProbeResult` to ``tape[index]``.

    A probed layer's forward runs as ``jax.jvp`` (the tangent rides in the step's forward). A
    probed combinator (``serial``, ``residual``, ``concat``) is tested on its own wiring: the
    same combinator rebuilt around linear stand-ins of its children (:func:`_standin`, same
    shapes, a hand-checked backward), so the test costs a few passes over the activations
    rather than a second forward of everything inside it; its children are nodes of their own.

    With ``plan=None`` (the full check's steps) nothing is probed: each node's backward only
    measures ``|dx|`` into ``tape[index]`` (a scalar), for the directions of later probes.
    The instrumented network computes exactly what ``net`` does.
    """
    counter = [0]

    def wrap(layer: Layer, norms) -> Layer:
        index = counter[0]
        counter[0] += 1
        if is_combinator(layer):
            kids = []
            for i, child in enumerate(layer.children):
                kids.append(wrap(child, None if norms is None else norms[i]))
            inner = rebuild(layer, kids)
            return _wrapped_combinator(index, layer, inner, plan, tape)
        counter[0] += descendants(layer)
        return _wrapped(index, layer, layer, norms, plan, tape)

    grad_norm = plan.grad_norm if plan is not None else None
    root = wrap(net, grad_norm)

    def run(params, state, x, context):
        # The network's input: its gradient is of no use to training (XLA drops the first
        # layer's dx), so a probe does not perturb it, which would make XLA compute it.
        tape["input"] = x
        return apply(root, params, state, x, key=context.key, train=context.train)

    return _bind(net, root, run, root.backward)


def _bind(original: Layer, inner: Layer, run, backward) -> Layer:
    """A layer with ``original``'s description and init, running ``run``/``backward``."""

    def forward(params, x):
        y, cache, _ = run(params, (), x, Context())
        return y, cache

    if inner.has_state:
        return Layer(
            original.init,
            lambda p, x: _forward_stateful(run, inner, p, x),
            backward,
            original.name,
            original.config,
            inner.init_state,
            run,
        )
    return Layer(original.init, forward, backward, original.name, original.config)


def _measure_dx(tape, index, dx):
    tape[index] = jnp.sqrt(_sq(dx)) if _differentiable(dx) else jnp.zeros(())


def _wrapped(index, original: Layer, inner: Layer, norms, plan, tape) -> Layer:
    def run(params, state, x, context):
        def f(p, xx):
            y, cache, new_state = apply(inner, p, state, xx, key=context.key, train=context.train)
            return y, (cache, new_state)

        if plan is None:
            y, (cache, new_state) = f(params, x)
            return y, (cache, None, None), new_state
        key = sub_seed(plan.key, index)

        def probed(_):
            u_p, u_x = _directions(
                key, params, x, norms, plan.dx_norm[index], x is tape.get("input")
            )
            if u_x is None:
                y, t, aux = _jvp_params(f, params, x, u_p)
            else:
                y, t, aux = jax.jvp(f, (params, x), (u_p, u_x), has_aux=True)
            return y, t, aux

        def plain(_):
            y, aux = f(params, x)
            # A dynamic plan's branches must agree in shape; a static one keeps no tangent.
            return y, None if isinstance(plan.selected, tuple) else jnp.zeros_like(y), aux

        y, t, (cache, new_state) = _when(plan.selected, index, probed, plain)
        return y, (cache, t, x), new_state

    def backward(params, cache, dy):
        inner_cache, t, x = cache
        dp, dx = inner.backward(params, inner_cache, dy)
        if plan is None:
            _measure_dx(tape, index, dx)
            return dp, dx
        key = sub_seed(plan.key, index)

        def check(_):
            u_p, u_x = _directions(
                key, params, x, norms, plan.dx_norm[index], x is tape.get("input")
            )
            result = _adjoint(dy, t, dp, u_p, dx, u_x)
            return result, tuple(jnp.sqrt(_sq(g)) for g in jax.tree_util.tree_leaves(dp))

        def skip(_):
            return _zero_result(), tuple(
                jnp.zeros((), jnp.result_type(float)) for _ in jax.tree_util.tree_leaves(dp)
            )

        tape[index], tape[("norms", index)] = _when(plan.selected, index, check, skip)
        return dp, dx

    return _bind(original, inner, run, backward)


def _adjoint(dy, t, dp, u_p, dx, u_x) -> ProbeResult:
    """Both sides of ``<dy, t> == <dp, u_p> + <dx, u_x>`` and their tolerance.

    Each term's typical size for a random direction is ``|g| |u| / sqrt(n)`` (a Gaussian
    direction's projection); rounding in a computed ``g`` of relative size ``kappa eps`` moves
    the term by that much times ``kappa eps`` at most, which sets the tolerance.
    """
    g_leaves, u_leaves = jax.tree_util.tree_leaves(dp), jax.tree_util.tree_leaves(u_p)
    terms = [_inner(g, u) for g, u in zip(g_leaves, u_leaves)]
    mags = [jnp.sqrt(_sq(g) * _sq(u) / max(jnp.size(u), 1)) for g, u in zip(g_leaves, u_leaves)]
    dx_norm = jnp.zeros((), jnp.result_type(float))
    if u_x is not None:
        terms.append(_inner(dx, u_x))
        dx_norm = jnp.sqrt(_sq(dx))
        mags.append(dx_norm * jnp.sqrt(_sq(u_x) / max(jnp.size(u_x), 1)))
    bound = jnp.sqrt(_sq(dy) * _sq(t))
    mags.append(bound / math.sqrt(max(jnp.size(t), 1)))
    zero = jnp.zeros((), jnp.result_type(float))
    dtype = jnp.result_type(dy)
    # Near a minimum a gradient is a sum of per-example terms that cancel, and its rounding
    # scales with those terms, not with the small result: |dy| |t| bounds every term of both
    # sides (Cauchy-Schwarz), so CANCELLATION_KAPPA eps of it covers that rounding.
    tol = (
        probe_tolerance(dtype, sum(mags, zero)) + CANCELLATION_KAPPA * jnp.finfo(dtype).eps * bound
    )
    return ProbeResult(_inner(dy, t), sum(terms, zero), tol, dx_norm)


# --------------------------------------------------------------------------------------------
# A combinator's own test: its wiring, around linear stand-ins of its children
# --------------------------------------------------------------------------------------------


def _standin(child: Layer, salt: int) -> Layer:
    """A linear layer with ``child``'s input and output shapes and one scalar parameter:
    ``y = s * d * R(x)``, ``R`` the input flattened and tiled (or cut) to the output's size,
    ``d`` a fixed pattern of weights in [0.5, 1.5]. Its backward: ``ds = <dy, d R(x)>``,
    ``dx = R^T(s d dy)`` (the tiles summed back, or the cut part zero)."""
    from .layers import output_shape

    def pattern(shape, dtype):
        # A constant of the program (numpy, not traced): nothing to compute per step.
        n = math.prod(shape)
        return jnp.asarray((1 + 0.5 * np.sin(np.arange(n) * (0.7 + salt))).reshape(shape), dtype)

    def forward(s, x):
        out = tuple(output_shape(child, jnp.shape(x)))
        dtype = jnp.result_type(s)
        flat = jnp.ravel(x).astype(dtype)
        size_in, size_out = flat.size, math.prod(out)
        if size_out <= size_in:
            r = flat[:size_out]
        else:
            r = jnp.tile(flat, -(-size_out // size_in))[:size_out]
        dr = pattern(out, dtype) * r.reshape(out)
        # The input's shape and dtype ride as an empty array: a cache holds arrays only.
        return s * dr, (dr, jnp.zeros((0, *jnp.shape(x)), jnp.result_type(x)))

    def backward(s, cache, dy):
        """``ds = <dy, d R(x)>``, ``dx = R^T (s d dy)``."""
        dr, like = cache
        in_shape, in_dtype = like.shape[1:], like.dtype
        ds = jnp.sum(dy * dr).astype(jnp.result_type(s))
        if not jnp.issubdtype(in_dtype, jnp.inexact):
            return ds, None
        g = jnp.ravel(s * pattern(dy.shape, dy.dtype) * dy)
        size_in = math.prod(in_shape)
        if g.size <= size_in:
            flat = jnp.pad(g, (0, size_in - g.size))
        else:
            reps = -(-g.size // size_in)
            flat = jnp.pad(g, (0, reps * size_in - g.size)).reshape(reps, size_in).sum(0)
        return ds, flat.reshape(in_shape).astype(in_dtype)

    return Layer(
        lambda key, shape: (output_shape(child, shape), jnp.ones(())), forward, backward, "standin"
    )


def _wrapped_combinator(index, original: Layer, inner: Layer, plan, tape) -> Layer:
    def run(params, state, x, context):
        y, cache, new_state = apply(inner, params, state, x, key=context.key, train=context.train)
        if plan is None:
            return y, (cache, None), new_state
        key = sub_seed(plan.key, index)

        network_input = x is tape.get("input")

        def probed(_):
            return _wiring_forward(original, x, key, y.dtype, network_input)

        def plain(_):
            return jax.eval_shape(lambda: _wiring_forward(original, x, key, y.dtype, network_input))

        if isinstance(plan.selected, tuple):
            wiring = probed(None) if plan.selected[index] else None
        else:
            shapes = plain(None)
            zeros = jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)
            wiring = jax.lax.cond(plan.selected[index], probed, lambda _: zeros, None)
        return y, (cache, wiring), new_state

    def backward(params, cache, dy):
        inner_cache, wiring = cache
        dp, dx = inner.backward(params, inner_cache, dy)
        if plan is None:
            _measure_dx(tape, index, dx)
            return dp, dx

        def check(_):
            return _wiring_check(original, wiring, dy)

        tape[index] = _when(plan.selected, index, check, _zero_result)
        return dp, dx

    return _bind(original, inner, run, backward)


def _wiring_net(original: Layer) -> Layer:
    kids = [_standin(c, i) for i, c in enumerate(original.children)]
    return rebuild(original, kids)


def _wiring_forward(original: Layer, x, key, dtype, network_input=False):
    """The stand-in combinator's forward with its tangent: what the backward check needs."""
    net = _wiring_net(original)
    k_p, k_x = sub_seed(key, 0), sub_seed(key, 1)
    n = len(original.children)
    s = tuple(jnp.ones((), dtype) for _ in range(n))
    u_s = tuple(noise(sub_seed(k_p, i), (), dtype) for i in range(n))
    if _differentiable(x) and not network_input:
        # |dx| of the wiring is about |dy| (the stand-ins have gains near 1): scale to match.
        u_x = random_direction(k_x, jnp.shape(x), jnp.result_type(x))
        _, t, cache = jax.jvp(net.forward, (s, x), (u_s, u_x), has_aux=True)
    else:
        u_x = None
        _, t, cache = jax.jvp(lambda p: net.forward(p, x), (s,), (u_s,), has_aux=True)
    return {"s": s, "u_s": u_s, "u_x": u_x, "t": t, "cache": cache}


def _wiring_check(original: Layer, wiring, dy) -> ProbeResult:
    net = _wiring_net(original)
    dp, dx = net.backward(wiring["s"], wiring["cache"], dy)
    return _adjoint(dy, wiring["t"], dp, wiring["u_s"], dx, wiring["u_x"])


def _forward_stateful(run, inner, params, x):
    from .layers import init_state

    y, cache, _ = run(params, init_state(inner, jnp.shape(x)), x, Context())
    return y, cache


def _jvp_params(f, params, x, u_p):
    """``jax.jvp`` of ``f`` in the parameters alone (integer inputs: token ids)."""
    y, t, aux = jax.jvp(lambda p: f(p, x), (params,), (u_p,), has_aux=True)
    return y, t, aux


def _probe_loss(loss, out, y, key, dx_norm) -> ProbeResult:
    """The loss's own adjoint test: ``d value(out + s u) / ds == <grad(out), u>``.

    Near a minimum the directional derivative is a small difference of large terms (for
    softmax cross-entropy, ``sum_c p_c u_c - u_label`` per example), so its rounding scales
    with the loss's gradient away from the minimum, not with ``|grad(out)|``: the tolerance
    also counts ``|grad(0)|``, the gradient at zero outputs (every term uncancelled)."""
    f = jnp.result_type(float)
    u = random_direction(key, jnp.shape(out), f) / jnp.maximum(dx_norm, jnp.finfo(f).tiny)
    u = u.astype(jnp.result_type(out))
    _, lhs = jax.jvp(lambda o: loss.value(o, y), (out,), (u,))
    g = loss.grad(out, y)
    g_norm = jnp.sqrt(_sq(g))
    g0_norm = jnp.sqrt(_sq(loss.grad(jnp.zeros_like(out), y)))
    mag = (g_norm + g0_norm) * jnp.sqrt(_sq(u) / max(jnp.size(u), 1)) + jnp.abs(lhs)
    return ProbeResult(
        jnp.asarray(lhs, f), _inner(g, u), probe_tolerance(jnp.result_type(out), mag), g_norm
    )


def schedule(step, n: int, k: int) -> jax.Array:
    """The ``k`` nodes probed at ``step``: ``(step * k + j) mod n`` for ``j < k``, so every
    node is probed at least once every ``ceil(n / k)`` steps."""
    first = (step * k) % n
    idx = (first + jnp.arange(k)) % n
    return jnp.zeros((n,), bool).at[idx].set(True)


def steps_to_cover(n: int, k: int) -> int:
    """How many steps the schedule takes to probe every one of ``n`` nodes: ``ceil(n/k)``."""
    return math.ceil(n / k)


# --------------------------------------------------------------------------------------------
# One step's gradients under the schedule
# --------------------------------------------------------------------------------------------


class Verified(NamedTuple):
    """What :func:`verified_gradients` returns for one step."""

    value: jax.Array
    grads: Any
    new_state: Any
    report: Any  # a GradReport
    grads_finite: jax.Array
    layer: jax.Array
    probed: jax.Array
    full: jax.Array
    verify: VerifyState


def check_schedule(probe, full_every, check_every, check: str, n_nodes: int | None = None):
    """Validate the schedule's arguments; returns ``(probe, full_every)`` (``check_every=M``
    is ``probe=0, full_every=M``; ``None`` for both means a full check every step)."""
    for name, value, low in (
        ("probe", probe, 0),
        ("full_every", full_every, 1),
        ("check_every", check_every, 1),
    ):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(
                f"{name} must be an integer >= {low}, got {value!r}"
                + (" (probe=0 turns the probe off)" if name == "probe" else "")
            )
    if check_every is not None and (probe or full_every is not None):
        raise ValueError(
            "check_every=N is a full check every N-th step and nothing between; give either "
            "check_every or probe=/full_every=, not both"
        )
    if check == "off" and (probe or full_every is not None or check_every is not None):
        raise ValueError(
            'probe=, full_every= and check_every= schedule checks; check="off" runs none '
            '(use check="report", "skip" or "raise")'
        )
    if probe and n_nodes is not None and probe > n_nodes:
        raise ValueError(
            f"probe={probe} is more than the network's {n_nodes} nodes (jaxbp.layer_paths); "
            f"expected 1..{n_nodes}"
        )
    if check_every is not None:
        return 0, check_every
    if probe and full_every is None:
        full_every = 100
    return (probe or 0), full_every


def _probed_norms(tape, old, owners):
    """The gradient norms kept for the directions' scale: the probed nodes' leaves measured
    now (their probe computed them), every other leaf as it was."""
    leaves, treedef = jax.tree_util.tree_flatten(old)
    taken: dict = {}
    out = []
    for leaf, owner in zip(leaves, owners):
        measured = tape.get(("norms", owner))
        if measured is None:
            out.append(leaf)
            continue
        i = taken.get(owner, 0)
        taken[owner] = i + 1
        out.append(jnp.where(measured[i] > 0, measured[i], leaf).astype(leaf.dtype))
    return jax.tree_util.tree_unflatten(treedef, out)


def _grad_norms(grads, old):
    # On a full check's step every leaf's norm is measured (the check reads each leaf anyway).
    return jax.tree_util.tree_map(
        lambda g, o: jnp.sqrt(_sq(g)).astype(jnp.result_type(o)), grads, old
    )


class _Outcome(NamedTuple):
    """What either part of a step (the full check, the probe) hands back."""

    value: jax.Array
    grads: Any
    new_state: Any
    report: Any
    grads_finite: Any
    layer: jax.Array
    probed: jax.Array
    dx_norm: jax.Array
    recheck: jax.Array
    grad_norm: Any


def verified_gradients(
    net: Layer,
    loss,
    params,
    state,
    x,
    y,
    step_key,
    verify: VerifyState,
    *,
    probe: int,
    full_every: int | None,
    rtol=None,
    atol=None,
    plan: str | tuple | None = None,
) -> Verified:
    """Loss, manual gradients and the verification verdict of one step under the schedule.

    A full check (manual vs ``jax.grad``, leaf by leaf) runs at step 0, every ``full_every``
    steps and right after a failed probe; otherwise ``probe`` nodes are probed (none with
    ``probe=0``). ``plan`` is what the caller already knows about this step (the host-side
    step of ``make_train_step`` reads the schedule before the call): ``"full"``, or the tuple
    of probed nodes (one bool per node), and only that branch is compiled. ``None`` traces
    both and picks with ``lax.cond`` (a fused loop's step).
    """
    from .backprop import backprop_and_autodiff
    from .gradcheck import compare_with_finiteness, unchecked_report

    all_nodes = nodes(net, getattr(loss, "name", "loss"))
    n = len(all_nodes)
    owners = jnp.asarray(leaf_owners(net, params) or [-1], jnp.int32)
    step = verify.step
    # Fresh every step, from the step count and the step's key: hashed, no threefry.
    probe_key = _mix(jnp.asarray(step, jnp.uint32) * jnp.uint32(0x9E3779B1) ^ jnp.uint32(0x5EED))
    if step_key is not None:
        for word in jnp.ravel(jax.random.key_data(step_key)).astype(jnp.uint32):
            probe_key = _mix(probe_key ^ word)

    def full_branch(_):
        tape: dict = {}
        inet = instrument(net, None, tape)
        value, grads, grads_ad, new_state = backprop_and_autodiff(
            inet, loss, params, x, y, state=state, key=step_key, validate=False
        )
        report, finite = compare_with_finiteness(grads, grads_ad, rtol=rtol, atol=atol)
        measured = jnp.stack([tape[i] for i in range(n - 1)] + [verify.dx_norm[n - 1]])
        layer = jnp.where(report.ok, -1, owners[jnp.clip(report.worst, 0, owners.size - 1)])
        return _Outcome(
            value,
            grads,
            new_state,
            report,
            finite,
            layer.astype(jnp.int32),
            probed=jnp.zeros((n,), bool),
            dx_norm=measured.astype(verify.dx_norm.dtype),
            recheck=jnp.array(False),
            grad_norm=_grad_norms(grads, verify.grad_norm),
        )

    def probe_branch(selected):
        tape: dict = {}
        probing = Probing(selected, probe_key, verify.grad_norm, verify.dx_norm)
        inet = instrument(net, probing, tape) if probe else net
        out, cache, new_state = apply(inet, params, state, x, key=step_key, train=True)
        value = loss.value(out, y)
        grads, _ = inet.backward(params, cache, loss.grad(out, y))
        report = unchecked_report(grads)
        # A static plan lets the guard test each gradient leaf in its parameter's pass; the
        # branches of a lax.cond must agree, and the full check's gives one verdict.
        finite = None if static else all_finite(grads)
        selected_arr = jnp.asarray(selected, bool)
        if not probe:
            return _Outcome(
                value,
                grads,
                new_state,
                report,
                finite,
                jnp.array(-1, jnp.int32),
                probed=selected_arr,
                dx_norm=verify.dx_norm,
                recheck=jnp.array(False),
                grad_norm=verify.grad_norm,
            )
        res_loss = _when(
            selected,
            n - 1,
            lambda _: _probe_loss(loss, out, y, sub_seed(probe_key, n - 1), verify.dx_norm[n - 1]),
            _zero_result,
        )
        results = [tape[i] for i in range(n - 1)] + [res_loss]
        passed = jnp.stack([r.ok for r in results]) | ~selected_arr
        ok = jnp.all(passed)
        layer = jnp.where(ok, -1, jnp.argmin(passed)).astype(jnp.int32)
        gap = jnp.stack([jnp.abs(r.lhs - r.rhs) / jnp.maximum(r.tol, 1e-300) for r in results])
        worst = jnp.max(jnp.where(selected_arr, gap, 0.0)) * (
            PROBE_KAPPA * jnp.finfo(jnp.result_type(value)).eps
        )
        report = _with_verdict(report, ok, worst)
        measured = jnp.where(selected_arr, jnp.stack([r.dx_norm for r in results]), verify.dx_norm)
        return _Outcome(
            value,
            grads,
            new_state,
            report,
            finite,
            layer,
            probed=selected_arr,
            dx_norm=measured.astype(verify.dx_norm.dtype),
            recheck=~ok,
            grad_norm=_probed_norms(tape, verify.grad_norm, owners_py),
        )

    static = plan is not None
    owners_py = leaf_owners(net, params)
    if plan == "full":
        outs, full = full_branch(None), jnp.array(True)
    elif isinstance(plan, tuple):
        outs, full = probe_branch(plan), jnp.array(False)
    else:
        full = verify.recheck | (step == 0)
        if full_every is not None:
            full = full | (step % full_every == 0)
        selected = schedule(step, n, probe) if probe else jnp.zeros((n,), bool)
        outs = jax.lax.cond(full, full_branch, lambda _: probe_branch(selected), None)
    new_verify = VerifyState(step + 1, outs.recheck, outs.grad_norm, outs.dx_norm)
    return Verified(
        outs.value,
        outs.grads,
        outs.new_state,
        outs.report,
        outs.grads_finite,
        outs.layer,
        outs.probed,
        full,
        new_verify,
    )


def host_plan(step: int, recheck: bool, n: int, probe: int, full_every: int | None):
    """The static plan of :func:`verified_gradients` for a step whose schedule the host has
    read: ``"full"`` or the tuple of probed nodes."""
    if recheck or step == 0 or (full_every is not None and step % full_every == 0):
        return "full"
    if not probe:
        return (False,) * n
    first = (step * probe) % n
    chosen = {(first + j) % n for j in range(probe)}
    return tuple(i in chosen for i in range(n))


def _with_verdict(report, ok, worst):
    import dataclasses

    return dataclasses.replace(
        report, ok=ok, worst_rel_error=worst.astype(report.worst_rel_error.dtype)
    )
