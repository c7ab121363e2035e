"""Comparing gradients: manual chain rule vs ``jax.grad`` vs finite differences.

:func:`compare_grads` runs on device and inside ``jit`` (no host sync): it returns a
:class:`GradReport`, a pytree of arrays whose leaf paths are static metadata, so it can be
returned from a jitted train step and printed afterwards.

Per leaf it measures

- ``max_abs_diff = max |a - b|``
- ``rel_error = max |a - b| / max(max |a|, max |b|, tiny)``: the error relative to the leaf as a
  whole, so entries that are tiny through cancellation do not read as failures in float32;
- ``cosine``: the cosine similarity of the two leaves (1 for two all-zero leaves);
- ``norm_ratio = ||a|| / ||b||`` (Frobenius norms; 1 for two all-zero leaves, inf when only
  ``b`` is zero): with ``cosine``, how far a learning rule's update is from the gradient;
- ``leaf_ok``: an ``allclose``-style test, ``|a - b| <= atol * scale + rtol * |b|`` element-wise,
  with ``scale = max(max |a|, max |b|)`` so that ``atol`` is relative to the leaf, and both
  leaves finite.

A leaf holding a NaN or an inf on either side is never ok: its ``rel_error`` is inf, its
``cosine`` NaN, and its ``max_abs_diff`` NaN if either side holds a NaN, else inf. Neither is a
leaf whose two sides differ in shape (a wrong gradient, not a wrong call): its ``max_abs_diff``
and ``rel_error`` are inf, and ``mismatched_shapes`` names both shapes.

Two trees that are equal entry for entry and finite (often the case in a checked train step:
when the manual backward is autodiff's arithmetic, XLA computes it once for both) are
recognised in one pass per leaf, ``sum |a - b| == 0``, and their statistics are then known
without computing them (max difference 0, relative error 0, cosine 1); a ``lax.cond`` runs the
full statistics otherwise.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ._trees import tree_difference
from .layers import apply, init_state

__all__ = [
    "GradReport",
    "GradientMismatchError",
    "compare_grads",
    "compare_with_finiteness",
    "unchecked_report",
    "default_tolerance",
    "finite_difference_grads",
    "fd_tolerance",
    "check_grads",
    "GradCheck",
    "check_layer",
    "INPUT_LEAF",
    "conform_grads",
]

# (rtol, atol) for manual vs autodiff. float32 uses the 2e-3 of JAX's own gradient checks;
# float64 is tight enough to catch a wrong term anywhere but leaves room for summation order.
_TOLERANCES = {
    np.dtype(np.float64): (1e-10, 1e-10),
    np.dtype(np.float32): (2e-3, 2e-3),
    np.dtype(jnp.bfloat16): (1e-1, 1e-1),
    np.dtype(np.float16): (1e-1, 1e-1),
}

# Central differences carry truncation O(h^2) and round-off O(eps / h) error: looser.
_FD_TOLERANCES = {
    np.dtype(np.float64): (1e-5, 1e-5),
    np.dtype(np.float32): (3e-2, 3e-2),
}
_FD_STEPS = {np.dtype(np.float64): 1e-5, np.dtype(np.float32): 1e-2}


def _tolerance_of(table, dtype):
    dtype = np.dtype(dtype)
    if dtype not in table:
        raise TypeError(f"gradients must be floating point, got dtype {dtype}")
    return table[dtype]


def default_tolerance(dtype) -> tuple[float, float]:
    """``(rtol, atol)`` used by :func:`compare_grads` for leaves of ``dtype``."""
    return _tolerance_of(_TOLERANCES, dtype)


def fd_tolerance(dtype) -> tuple[float, float]:
    """``(rtol, atol)`` for comparisons against finite differences."""
    return _tolerance_of(_FD_TOLERANCES, dtype)


class GradientMismatchError(ValueError):
    """A manual gradient disagrees with its reference; ``.report`` holds the comparison.

    The message is built from the report: "manual gradient disagrees with jax.grad at step 7:
    worst leaf [2]['W'], relative error 1.000e+00; nothing was updated", then the table.
    With ``culprit`` (a :class:`jaxbp.diagnose.Culprit`, found by :func:`jaxbp.locate`) it
    first names the broken layer and the kind of mistake: "layer serial[3] (Conv1D): dW
    disagrees with jax.vjp of its forward; looks like: a factor of 2 (a missing 1/2?)".
    ``probed`` (a node's path) says that the per-layer probe of that node failed.
    """

    def __init__(
        self,
        report: GradReport,
        *,
        what: str = "manual gradient",
        reference: str = "jax.grad",
        step: int | None = None,
        note: str = "nothing was updated",
        culprit=None,
        probed: str | None = None,
    ):
        self.report, self.step, self.culprit, self.probed = report, step, culprit, probed
        where = f" at step {step}" if step is not None else ""
        tail = f"; {note}" if note else ""
        head = f"{culprit}\n" if culprit is not None else ""
        if probed:
            body = (
                f"the adjoint test of layer {probed} failed{where}: its manual backward "
                f"disagrees with jax.jvp of its forward (relative gap "
                f"{float(report.worst_rel_error):.3e}){tail}"
            )
        else:
            body = (
                f"{what} disagrees with {reference}{where}: worst leaf "
                f"{report.worst_path}, relative error "
                f"{float(report.worst_rel_error):.3e}{tail}\n{report.table()}"
            )
        super().__init__(head + body)


@dataclasses.dataclass(frozen=True)
class GradReport:
    """Per-leaf agreement of two gradient pytrees (see the module docstring).

    Array fields have one entry per leaf (in ``paths`` order); ``ok``, ``worst`` and
    ``worst_rel_error`` summarise them. Under ``vmap`` every field gains a batch dimension.
    """

    max_abs_diff: jax.Array
    rel_error: jax.Array
    cosine: jax.Array
    leaf_ok: jax.Array
    ok: jax.Array
    worst: jax.Array
    worst_rel_error: jax.Array
    paths: tuple = ()
    norm_ratio: jax.Array | None = None
    # ``(path, manual shape, reference shape)`` of each leaf whose two sides differ in shape
    # (each such leaf is a mismatch; its statistics read inf / NaN).
    mismatched_shapes: tuple = ()

    @property
    def worst_path(self) -> str:
        """The path of the leaf with the largest relative error (forces a host sync)."""
        worst = int(np.asarray(self.worst))
        return self.paths[worst] if self.paths and worst >= 0 else ""

    def to_dict(self) -> dict:
        """Plain Python numbers, for JSON and printing."""
        leaves = {}
        for i, path in enumerate(self.paths):
            leaves[path] = {
                "max_abs_diff": float(self.max_abs_diff[i]),
                "rel_error": float(self.rel_error[i]),
                "cosine": float(self.cosine[i]),
                "norm_ratio": self._norm_ratio(i),
                "ok": bool(self.leaf_ok[i]),
            }
        return {
            "ok": bool(self.ok),
            "worst_leaf": self.worst_path,
            "worst_rel_error": float(self.worst_rel_error),
            "leaves": leaves,
        }

    def _norm_ratio(self, i: int) -> float:
        return float("nan") if self.norm_ratio is None else float(self.norm_ratio[i])

    def table(self) -> str:
        """A fixed-width table, one row per leaf."""
        width = max([len("leaf")] + [len(p) for p in self.paths])
        rows = [
            f"{'leaf':<{width}}  {'max|a-b|':>10}  {'rel error':>10}  {'cosine':>10}  "
            f"{'|a|/|b|':>10}  ok"
        ]
        for i, path in enumerate(self.paths):
            rows.append(
                f"{path:<{width}}  {float(self.max_abs_diff[i]):>10.3e}  "
                f"{float(self.rel_error[i]):>10.3e}  {float(self.cosine[i]):>10.6f}  "
                f"{self._norm_ratio(i):>10.4g}  "
                f"{'yes' if bool(self.leaf_ok[i]) else 'NO'}"
            )
        verdict = (
            "all leaves agree"
            if bool(self.ok)
            else (
                f"MISMATCH: worst leaf {self.worst_path}, relative error "
                f"{float(self.worst_rel_error):.3e}"
            )
        )
        return "\n".join(rows + [verdict])

    def __str__(self):
        return self.table()

    def raise_if_failed(self, what: str = "manual gradient") -> None:
        """Raise :class:`GradientMismatchError` naming the worst leaf unless ``ok``."""
        if not bool(self.ok):
            raise GradientMismatchError(self, what=what, reference="the reference", note="")


jax.tree_util.register_dataclass(
    GradReport,
    data_fields=[
        "max_abs_diff",
        "rel_error",
        "cosine",
        "leaf_ok",
        "ok",
        "worst",
        "worst_rel_error",
        "norm_ratio",
    ],
    meta_fields=["paths", "mismatched_shapes"],
)


def _path_name(path) -> str:
    return jax.tree_util.keystr(path) or "<root>"


def _flatten_pair(manual, reference):
    """``(paths, manual leaves, reference leaves)``; a tree of another structure is an error
    of the call, but a leaf of another shape is a wrong gradient, reported as a mismatch of
    that leaf (see :func:`compare_with_finiteness`)."""
    ref_leaves, ref_def = jax.tree_util.tree_flatten_with_path(reference)
    man_leaves, man_def = jax.tree_util.tree_flatten(manual)
    if man_def != ref_def:
        raise ValueError(
            f"compare_grads expects two pytrees of the same structure; in the "
            f"first, {tree_difference(reference, manual)} (taking the second as "
            f"the expected tree)"
        )
    paths = tuple(_path_name(p) for p, _ in ref_leaves)
    return paths, list(man_leaves), [leaf for _, leaf in ref_leaves]


def _leaf_dtype(a, b):
    # The less precise of the two decides how close they can be.
    da, db = jnp.result_type(a), jnp.result_type(b)
    for d in (da, db):
        if not jnp.issubdtype(d, jnp.floating):
            raise TypeError(f"gradients must be floating point, got dtype {d}")
    # jnp.finfo, not np.finfo: numpy does not know bfloat16.
    return da if jnp.finfo(da).eps >= jnp.finfo(db).eps else db


def _leaf_stats(a, b, rtol, atol):
    """``(max_abs_diff, rel_error, cosine, ok, a_finite, scale, norm_ratio)`` of one leaf pair.

    This runs inside every checked train step, so it is shaped for speed: XLA on CPU gives each
    reduction its own kernel and pass over the leaf (it does not merge sibling reductions), and
    an ``isfinite`` reduction costs as much as any other. So finiteness is read off statistics
    that are needed anyway: ``max |a|`` is ``inf`` when ``a`` holds an ``inf``, and ``sum a^2``
    is NaN exactly when ``a`` holds a NaN (a sum of non-negative terms can overflow to ``inf``
    but never becomes NaN by itself). ``max`` alone cannot be trusted with NaN: the vectorised
    CPU reduction may drop it.

    The element-wise test ``|a - b| <= atol * scale + rtol * |b|`` for every entry is
    ``max(|a - b| - rtol * |b|) <= atol * scale``, which needs no second pass once ``scale``
    is known.
    """
    tiny = jnp.finfo(a.dtype).tiny
    diff = jnp.abs(a - b)
    slack = diff - rtol * jnp.abs(b)
    scale_a, scale_b = jnp.max(jnp.abs(a)), jnp.max(jnp.abs(b))
    max_diff, max_slack = jnp.max(diff), jnp.max(slack)
    aa, bb, ab = jnp.sum(a * a), jnp.sum(b * b), jnp.sum(a * b)
    scale = jnp.maximum(scale_a, scale_b)
    a_finite = jnp.isfinite(scale_a) & ~jnp.isnan(aa)
    finite = a_finite & jnp.isfinite(scale_b) & ~jnp.isnan(bb)
    # A NaN anywhere reads NaN, an inf inf (the vectorised max may have dropped inf - inf).
    max_diff = jnp.where(finite, max_diff, jnp.where(jnp.isnan(aa + bb), jnp.nan, jnp.inf))
    close = max_slack <= atol * scale
    # A non-finite leaf is never "close", and its relative error reads as inf.
    rel = jnp.where(finite, max_diff / jnp.maximum(scale, tiny), jnp.inf)
    norm = jnp.sqrt(aa) * jnp.sqrt(bb)
    cosine = jnp.where(
        norm > 0, ab / jnp.maximum(norm, tiny), jnp.where(scale > 0, 0.0, 1.0).astype(a.dtype)
    )
    cosine = jnp.where(finite, cosine, jnp.nan)
    # From the sums above: no extra pass over the leaf.
    ratio = jnp.where(
        bb > 0,
        jnp.sqrt(aa) / jnp.sqrt(jnp.maximum(bb, tiny)),
        jnp.where(aa > 0, jnp.inf, 1.0).astype(a.dtype),
    )
    ratio = jnp.where(finite, ratio, jnp.nan)
    return max_diff, rel, cosine, finite & close, a_finite, scale, ratio


# Differences below ROUNDING_FLOOR * eps * (the largest gradient entry of the whole tree) are
# rounding, whatever the leaf: a gradient that is zero in exact arithmetic (a bias feeding a
# BatchNorm, whose mean it removes) comes out as a sum of terms that cancel, a few eps of the
# terms' size, which neither side computes "more correctly".
ROUNDING_FLOOR = 1e3


def _apply_rounding_floor(stats):
    """Leaves whose difference is below the tree's rounding floor agree; their relative error
    is taken relative to the tree's largest gradient entry instead of their own."""
    scales = [jnp.where(jnp.isfinite(s[5]), s[5], 0).astype(jnp.result_type(float)) for s in stats]
    tree_scale = jnp.max(jnp.stack(scales))
    out = []
    for max_diff, rel, cosine, ok, a_finite, _scale, ratio in stats:
        # Never looser than a tenth of the dtype's own tolerance: in bfloat16, 1e3 eps is 8.
        relative_floor = min(
            ROUNDING_FLOOR * float(jnp.finfo(max_diff.dtype).eps),
            0.1 * default_tolerance(max_diff.dtype)[1],
        )
        floor = relative_floor * tree_scale
        rounding = jnp.isfinite(rel) & (max_diff <= floor) & (tree_scale > 0)
        rel = jnp.where(rounding, max_diff / jnp.where(tree_scale > 0, tree_scale, 1), rel)
        out.append((max_diff, rel.astype(max_diff.dtype), cosine, ok | rounding, a_finite, ratio))
    return out


# The input gradient's leaf in a comparison that includes it (``inputs=`` of compare_grads).
INPUT_LEAF = "input"


def compare_grads(
    manual,
    reference,
    *,
    rtol: float | None = None,
    atol: float | None = None,
    tolerances: Callable = default_tolerance,
    inputs: tuple | None = None,
) -> GradReport:
    """Compare two gradient pytrees leaf by leaf; jit-compatible, no host sync.

    ``rtol``/``atol`` default per leaf dtype (:func:`default_tolerance`); ``atol`` is relative
    to the leaf's scale (see the module docstring). ``inputs=(manual dx, reference dx)`` adds
    the input gradient as one more leaf, named ``input``, after the parameters' leaves: the
    first layer's ``dx``, which no parameter gradient depends on. A leaf whose two sides differ
    in shape is a mismatch of that leaf (relative error inf), and
    ``report.mismatched_shapes`` names both shapes; two trees of different structure are an
    error of the call (``ValueError``).
    """
    return compare_with_finiteness(
        manual, reference, rtol=rtol, atol=atol, tolerances=tolerances, inputs=inputs
    )[0]


def conform_grads(manual, reference):
    """``manual`` with each leaf whose shape differs from ``reference``'s replaced by NaNs of
    the reference leaf's shape and dtype (the other leaves as they are).

    A checked step forms its update before it decides whether to apply it; a manual gradient
    of the wrong shape would make the optimizer fail while it traces. Conformed, the update is
    formed, it is NaN where the gradient was wrong, and the report (a mismatch of that leaf)
    and the non-finite guard refuse it."""
    return jax.tree_util.tree_map(
        lambda m, r: (
            m
            if jnp.shape(m) == jnp.shape(r)
            else jnp.full(jnp.shape(r), jnp.nan, jnp.result_type(r))
        ),
        manual,
        reference,
    )


def unchecked_report(grads) -> GradReport:
    """The report of a step that compared nothing (``check="off"``): NaN statistics, ok, no
    worst leaf (-1); the same pytree structure as a real report, so metrics keep one shape."""
    paths = tuple(_path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(grads)[0])
    nan = jnp.full((len(paths),), jnp.nan, jnp.result_type(float))
    return GradReport(
        nan,
        nan,
        nan,
        jnp.ones((len(paths),), bool),
        jnp.array(True),
        jnp.array(-1, jnp.int32),
        jnp.array(jnp.nan, nan.dtype),
        paths,
        nan,
    )


def _comparison_leaves(man, ref, rtol, atol, tolerances) -> list[tuple]:
    """Per leaf pair ``(a, b, rtol, atol, a_own, fits)``: both in the dtype they are compared
    in (:func:`_leaf_dtype`), the tolerances (given, else ``tolerances(dtype)``), ``a`` in its
    own dtype when the comparison narrows it (else ``None``), and whether the shapes agree."""
    leaves = []
    for a, b in zip(man, ref):
        dtype = _leaf_dtype(a, b)
        r_def, a_def = tolerances(dtype)
        narrowed = jnp.result_type(a) != dtype
        leaves.append(
            (
                jnp.asarray(a, dtype),
                jnp.asarray(b, dtype),
                r_def if rtol is None else rtol,
                a_def if atol is None else atol,
                a if narrowed else None,
                jnp.shape(a) == jnp.shape(b),
            )
        )
    return leaves


def _misfit_stats(a, dtype):
    """The statistics of a leaf whose manual side has the wrong shape: a mismatch (max
    difference and relative error inf, cosine and norm ratio NaN), scale 0 so it moves no
    other leaf's rounding floor, and whether its entries are finite all the same."""
    inf, nan = jnp.array(jnp.inf, dtype), jnp.array(jnp.nan, dtype)
    return inf, inf, nan, jnp.array(False), jnp.all(jnp.isfinite(a)), jnp.zeros((), dtype), nan


def compare_with_finiteness(
    manual, reference, *, rtol=None, atol=None, tolerances=default_tolerance, inputs=None
):
    """:func:`compare_grads`, and whether every leaf of ``manual`` is finite (a scalar bool;
    the parameters' leaves only, not ``inputs``: it guards the update).

    The train step's non-finite guard reads the second result instead of making passes of
    its own over the gradients.
    """
    paths, man, ref = _flatten_pair(manual, reference)
    params_count = len(paths)
    if inputs is not None:
        if not isinstance(inputs, (tuple, list)) or len(inputs) != 2:
            raise ValueError(
                f"compare_grads: inputs must be a pair (manual dx, reference dx), got "
                f"{type(inputs).__name__}"
            )
        paths, man, ref = (*paths, INPUT_LEAF), [*man, inputs[0]], [*ref, inputs[1]]
    if not paths:
        raise ValueError("compare_grads: the gradient pytrees have no leaves to compare")
    leaves = _comparison_leaves(man, ref, rtol, atol, tolerances)
    misfits = tuple(
        (path, tuple(jnp.shape(a)), tuple(jnp.shape(b)))
        for path, a, b in zip(paths, man, ref)
        if jnp.shape(a) != jnp.shape(b)
    )

    def equal(dtype):
        # Equal, finite leaves (or empty ones): max |a-b| 0, rel 0, cosine 1, ok, a finite,
        # scale 0 (unused), norm ratio 1.
        zero, one = jnp.zeros((), dtype), jnp.ones((), dtype)
        return zero, zero, one, jnp.array(True), jnp.array(True), zero, one

    def full(_):
        out = []
        for a, b, r, t, a_own, fits in leaves:
            if not fits:
                out.append(_misfit_stats(a if a_own is None else a_own, a.dtype))
                continue
            if a.size == 0:
                out.append(equal(a.dtype))
                continue
            leaf = _leaf_stats(a, b, r, t)
            if a_own is not None:  # finite in its own dtype may overflow in the reference's
                leaf = leaf[:4] + (jnp.all(jnp.isfinite(a_own)),) + leaf[5:]
            out.append(leaf)
        return _apply_rounding_floor(out)

    def identical(_):  # a NaN or inf never gets here
        return [equal(a.dtype)[:5] + equal(a.dtype)[6:] for a, *_ in leaves]

    # The common case in a checked step: the manual backward is autodiff's arithmetic, XLA
    # computed it once, and the two trees are the same numbers. One pass per leaf proves it:
    # sum |a - b| is 0 exactly when every entry is equal and finite (NaN - NaN, inf - inf and
    # finite - inf all make the sum NaN or inf; a sum of non-negative terms cannot cancel, though
    # a backend that flushes subnormals may read a difference below ~1e-38 as 0). Only
    # otherwise are the statistics computed; a leaf of the wrong shape is never the same.
    if misfits:
        stats = full(None)
    else:
        same = jnp.all(jnp.stack([jnp.sum(jnp.abs(a - b)) == 0 for a, b, *_ in leaves]))
        stats = jax.lax.cond(same, identical, full, None)
    f32 = lambda xs: jnp.stack([jnp.asarray(x, jnp.result_type(float)) for x in xs])
    max_abs, rel, cos, ratio = (f32([s[i] for s in stats]) for i in (0, 1, 2, 5))
    leaf_ok = jnp.stack([s[3] for s in stats])
    params_finite = [s[4] for s in stats[:params_count]]
    manual_finite = jnp.all(jnp.stack(params_finite)) if params_finite else jnp.array(True)
    rel = jnp.where(jnp.isnan(rel), jnp.inf, rel)
    # The worst leaf is the failing leaf of largest relative error, or if all pass, the leaf
    # of largest relative error.
    any_failed = ~jnp.all(leaf_ok)
    worst = jnp.where(
        any_failed, jnp.argmax(jnp.where(leaf_ok, -1.0, rel)), jnp.argmax(rel)
    ).astype(jnp.int32)
    report = GradReport(
        max_abs, rel, cos, leaf_ok, ~any_failed, worst, rel[worst], paths, ratio, misfits
    )
    return report, manual_finite


# --------------------------------------------------------------------------------------------
# Finite differences
# --------------------------------------------------------------------------------------------


def finite_difference_grads(
    fn: Callable[[Any], jax.Array], params, *, eps: float | None = None, batch_size: int = 256
):
    """Central differences ``(f(p + h e_i) - f(p - h e_i)) / 2h`` for every parameter entry.

    ``fn(params) -> scalar``. ``h`` defaults per dtype (1e-5 in float64, 1e-2 in float32).
    Costs two evaluations of ``fn`` per parameter entry: meant for small networks and tests.
    """
    leaves, treedef = jax.tree_util.tree_flatten(params)
    grads = []
    for index, leaf in enumerate(leaves):
        leaf = jnp.asarray(leaf)
        h = eps if eps is not None else _tolerance_of(_FD_STEPS, leaf.dtype)
        if leaf.size == 0:
            grads.append(jnp.zeros_like(leaf))
            continue

        def at(flat_leaf, index=index, shape=leaf.shape):
            new = list(leaves)
            new[index] = flat_leaf.reshape(shape)
            return fn(jax.tree_util.tree_unflatten(treedef, new))

        flat = leaf.reshape(-1)

        def one(i, flat=flat, at=at, h=h):
            step = jnp.zeros_like(flat).at[i].set(h)
            return (at(flat + step) - at(flat - step)) / (2 * h)

        g = jax.lax.map(one, jnp.arange(flat.size), batch_size=min(batch_size, flat.size))
        grads.append(g.reshape(leaf.shape).astype(leaf.dtype))
    return jax.tree_util.tree_unflatten(treedef, grads)


class GradCheck(NamedTuple):
    """Three opinions on one gradient, compared pairwise; ``inputs``, when the input gradient
    was checked too, the same three comparisons of ``dE/dx`` (a :class:`GradCheck`)."""

    manual_vs_autodiff: GradReport
    manual_vs_fd: GradReport
    autodiff_vs_fd: GradReport
    inputs: GradCheck | None = None

    @property
    def ok(self) -> bool:
        reports = (self.manual_vs_autodiff, self.manual_vs_fd, self.autodiff_vs_fd)
        return all(bool(r.ok) for r in reports) and (self.inputs is None or self.inputs.ok)


def _three_ways(manual, auto, fd) -> GradCheck:
    return GradCheck(
        compare_grads(manual, auto),
        compare_grads(manual, fd, tolerances=fd_tolerance),
        compare_grads(auto, fd, tolerances=fd_tolerance),
    )


def check_grads(
    net,
    loss,
    params,
    x,
    y,
    *,
    eps: float | None = None,
    inputs: bool = True,
    state=None,
    key=None,
    train: bool = True,
) -> GradCheck:
    """Manual backprop vs ``jax.grad`` vs central finite differences, for one batch.

    The parameters' gradients, and with ``inputs`` (the default) also ``dE/dx``, the first
    layer's input gradient, which no parameter gradient depends on (``.inputs``; left out for
    integer token ids, which have none). ``state``, ``key`` and ``train`` run the network as
    :func:`jaxbp.backprop` does: ``train=False`` with the running statistics in ``state``.
    """
    from .backprop import autodiff, backprop, forward

    inputs = inputs and jnp.issubdtype(jnp.result_type(x), jnp.inexact)
    run = {"state": state, "key": key, "train": train}
    manual = backprop(net, loss, params, x, y, wrt_inputs=inputs, **run)[1]
    auto = autodiff(net, loss, params, x, y, wrt_inputs=inputs, **run)[1]
    loss = _loss_value(loss)

    def value(p, xx):
        return loss(forward(net, p, xx, **run), y)

    fd = finite_difference_grads(lambda p: value(p, x), params, eps=eps)
    if not inputs:
        return _three_ways(manual, auto, fd)
    fd_x = finite_difference_grads(lambda xx: value(params, xx), x, eps=eps)
    return _three_ways(manual[0], auto[0], fd)._replace(
        inputs=_three_ways(manual[1], auto[1], fd_x)
    )


def _loss_value(loss) -> Callable:
    from .losses import get_loss

    return get_loss(loss).value


# Random parameters are ``init``'s moved by this much noise (a standard deviation): off the
# special values (BatchNorm's and LayerNorm's scale 1 and bias 0) at which a wrong formula
# can give the right numbers, such as ``dy / scale`` for ``dy * scale``.
PARAM_NOISE = 0.5


def _random_params(layer, key, shape, dtype):
    k_init, k_noise = jax.random.split(key)
    _, params = layer.init(k_init, shape)
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(k_noise, max(len(leaves), 1))
    moved = [
        jnp.asarray(p, dtype) + PARAM_NOISE * jax.random.normal(k, jnp.shape(p), dtype)
        for p, k in zip(leaves, keys)
    ]
    return jax.tree_util.tree_unflatten(treedef, moved)


def _random_state(layer, key, shape, dtype):
    """The layer's initial state, every entry raised by U(0.25, 1): running means off 0 and
    variances off 1, still positive (as a variance must be)."""
    leaves, treedef = jax.tree_util.tree_flatten(init_state(layer, shape))
    keys = jax.random.split(key, max(len(leaves), 1))
    moved = [
        jnp.asarray(s, dtype) + jax.random.uniform(k, jnp.shape(s), dtype, 0.25, 1.0)
        for s, k in zip(leaves, keys)
    ]
    return jax.tree_util.tree_unflatten(treedef, moved)


def check_layer(
    layer,
    key,
    input_shape,
    *,
    dtype=None,
    params=None,
    x=None,
    state=None,
    train: bool = True,
    rtol: float | None = None,
    atol: float | None = None,
) -> GradReport:
    """Check a layer's hand-written backward against ``jax.vjp`` of its forward.

    Draws from ``key`` an input ``x``, a cotangent ``dy`` and random parameters (``init``'s,
    moved by N(0, 0.5^2) noise: initial values such as a scale of 1 hide wrong formulas)
    unless given, then compares ``layer.backward(params, cache, dy)`` with the VJP of the
    forward for both the parameter gradients (leaf ``['params']...``) and the input gradient
    (``['x']``). A layer with state or randomness runs through :func:`jaxbp.apply` with a key
    drawn from ``key`` (Dropout's mask) and ``state`` (default: the initial state, every entry
    raised by U(0.25, 1)); ``train=False`` checks the evaluation backward (BatchNorm with its
    running statistics, as fine-tuning with frozen statistics differentiates it).
    """
    dtype = dtype or jax.dtypes.canonicalize_dtype(jnp.float64)
    # The first three keys as before this function drew state and a forward key: the same
    # key gives the same x and dy as it always did.
    k_init, k_x, k_dy = jax.random.split(key, 3)
    k_state, k_apply = jax.random.fold_in(key, 3), jax.random.fold_in(key, 4)
    shape = tuple(1 if d == -1 else d for d in input_shape)
    if params is None:
        params = _random_params(layer, k_init, shape, dtype)
    if x is None:
        x = jax.random.normal(k_x, shape, dtype)
    if state is None:
        state = _random_state(layer, k_state, jnp.shape(x), dtype) if layer.has_state else ()

    def run(p, xx):
        return apply(layer, p, state, xx, key=k_apply, train=train)[:2]

    y, cache = run(params, x)
    dy = jax.random.normal(k_dy, y.shape, y.dtype)
    dparams, dx = layer.backward(params, cache, dy)
    if not jnp.issubdtype(jnp.result_type(x), jnp.inexact):  # token ids: no input gradient
        _, vjp_params = jax.vjp(lambda p: run(p, x)[0], params)
        (ref_params,) = vjp_params(dy)
        return compare_grads({"params": dparams}, {"params": ref_params}, rtol=rtol, atol=atol)
    _, vjp = jax.vjp(lambda p, xx: run(p, xx)[0], params, x)
    ref_params, ref_x = vjp(dy)
    return compare_grads(
        {"params": dparams, "x": dx}, {"params": ref_params, "x": ref_x}, rtol=rtol, atol=atol
    )
