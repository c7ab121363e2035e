"""jaxbp and the rest of JAX: ``jax.custom_vjp`` functions in, jaxbp layers out.

Most hand-written backward passes in JAX are ``jax.custom_vjp`` functions inside Flax or
Equinox models. Checking one is awkward: ``jax.grad`` of the function uses the custom rule, so
autodiff compares the rule with itself. The reference here is ``jax.vjp`` of the undecorated
primal, ``fn.fun``; the manual gradient is the user's ``bwd`` applied to the residuals of the
user's ``fwd``.

- :func:`check_vjp`: the user's ``bwd`` vs ``jax.vjp(fn.fun)``, per argument, as a
  :class:`~jaxbp.GradReport` whose leaves are named by argument (``x``, ``w['b']``).
- :func:`check_vjp_fd`: the same plus central finite differences, as a :class:`~jaxbp.GradCheck`.
- :func:`vjp_verdicts`: each row of such a report in words ("a constant factor 2.000", "bwd
  returns zero where jax.vjp does not", ...), for rules that are not the gradient on purpose.
- :func:`from_custom_vjp`: a jaxbp layer whose backward is the user's ``bwd``, so that
  :func:`~jaxbp.check_layer` and :func:`~jaxbp.make_train_step` check it every step.
- :func:`as_custom_vjp`: the other way round, a jaxbp layer (or network) as a plain
  ``custom_vjp`` function ``apply(params, x)``: ``jax.grad`` of any model calling it runs the
  layer's hand-written backward.

Conventions for a user's ``fn``: arguments are positional; ``nondiff_argnums`` are honoured
(``bwd(*nondiff_args, residuals, g)``, as in JAX) and passed through untraced, so they may be
strings, dtypes, dimension numbers, callables as well as numbers and arrays (under ``jit``,
mark them static or close over them); every other argument is differentiated and must be
floating point (a pytree of arrays is fine); outputs may be any pytree of float arrays. The
check functions also take an ``equinox.filter_custom_vjp`` (its ``vjp_arg``'s float arrays are
differentiated, everything else is static). Where JAX cannot reverse-differentiate the primal
(a ``lax.while_loop``), the reference is forward mode: the same vector.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import sys
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ._trees import tree_difference
from .errors import ArgumentError
from .gradcheck import GradCheck, GradReport, compare_grads, fd_tolerance, finite_difference_grads
from .layers import Layer, bound
from .model import ReferenceNotAllowedError, resolve_reference
from .registry import register_layer

__all__ = [
    "check_vjp",
    "check_vjp_fd",
    "vjp_verdicts",
    "from_custom_vjp",
    "as_custom_vjp",
    "resolve",
    "argument_names",
    "primal_of",
    "nondiff_argnums_of",
]


# --------------------------------------------------------------------------------------------
# Taking a custom_vjp function apart
# --------------------------------------------------------------------------------------------


class _Rule(NamedTuple):
    """A custom_vjp function's pieces, with its argument names (``fn.fun``'s signature)."""

    fun: Callable
    fwd: Callable
    bwd: Callable
    nondiff: tuple
    signature: inspect.Signature | None
    label: str
    # "jax" (jax.custom_vjp) or "equinox" (equinox.filter_custom_vjp, whose fwd and bwd take
    # other arguments: _equinox_rule turns it into the jax convention once the arguments are
    # known).
    kind: str = "jax"


def _label(fn) -> str:
    return getattr(fn, "__name__", None) or type(fn).__name__


def _is_equinox_vjp(fn) -> bool:
    # By name, so that checking a jax.custom_vjp never imports equinox.
    cls = type(fn)
    return cls.__name__ == "filter_custom_vjp" and cls.__module__.startswith("equinox")


def _unwrap(fn, who: str, equinox: bool = True) -> _Rule:
    label = _label(fn)
    if _is_equinox_vjp(fn):
        label = _label(fn.fn)
        if not equinox:
            raise ArgumentError(
                f"{who} expects a jax.custom_vjp function; {label} is an "
                f"equinox.filter_custom_vjp (check it with check_vjp, or use a jax.custom_vjp)"
            )
        if fn.fn_fwd is None or fn.fn_bwd is None:
            raise ValueError(
                f"{who}: the equinox.filter_custom_vjp function {label} has no rule yet; "
                f"give it {label}.def_fwd(fwd) and {label}.def_bwd(bwd) first"
            )
        try:
            signature = inspect.signature(fn.fn)
        except (TypeError, ValueError):
            signature = None
        return _Rule(fn.fn, fn.fn_fwd, fn.fn_bwd, (), signature, label, "equinox")
    if isinstance(fn, jax.custom_jvp):
        raise ArgumentError(
            f"{who} expects a jax.custom_vjp function, got the jax.custom_jvp "
            f"function {label} (its rule is a JVP; check it with jax.jvp)"
        )
    if not isinstance(fn, jax.custom_vjp):
        raise ArgumentError(
            f"{who} expects a jax.custom_vjp function (decorated with "
            f"@jax.custom_vjp, then given .defvjp(fwd, bwd)), got "
            f"{type(fn).__name__} {label}"
        )
    if fn.fwd is None or fn.bwd is None:
        raise ValueError(
            f"{who}: the custom_vjp function {label} has no rule yet; call "
            f"{label}.defvjp(fwd, bwd) first"
        )
    if getattr(fn, "symbolic_zeros", False):
        raise ValueError(
            f"{who}: {label} uses symbolic_zeros=True, whose fwd takes "
            f"CustomVJPPrimal wrappers; define its rule without symbolic zeros"
        )
    try:
        signature = inspect.signature(fn.fun)
    except (TypeError, ValueError):  # a builtin or C function: positional names only
        signature = None
    return _Rule(fn.fun, fn.fwd, fn.bwd, tuple(fn.nondiff_argnums), signature, label)


def argument_names(fn, count: int | None = None) -> tuple[str, ...]:
    """The names of ``fn``'s first ``count`` positional arguments (``x``, ``w``, ...).

    Taken from the primal's signature; extra positional arguments of a ``*args`` signature are
    named ``args[0]``, ``args[1]``, ...; unnamed ones ``arg0``, ``arg1``, ...
    """
    fun = fn.fn if _is_equinox_vjp(fn) else getattr(fn, "fun", fn)
    try:
        params = list(inspect.signature(fun).parameters.values())
    except (TypeError, ValueError):
        params = []
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    star = next((p.name for p in params if p.kind == p.VAR_POSITIONAL), None)
    count = len(positional) if count is None else count
    names = [p.name for p in positional[:count]]
    for extra in range(count - len(names)):
        names.append(f"{star}[{extra}]" if star else f"arg{len(names)}")
    return tuple(names)


def primal_of(fn) -> Callable:
    """The undecorated primal of a ``jax.custom_vjp`` (``fn.fun``) or an
    ``equinox.filter_custom_vjp`` (``fn.fn``) function: what :func:`check_vjp` differentiates."""
    return fn.fn if _is_equinox_vjp(fn) else fn.fun


def nondiff_argnums_of(fn, count: int) -> tuple[int, ...]:
    """The positions, among ``count`` positional arguments, that ``fn`` does not differentiate:
    its ``nondiff_argnums``, or for an ``equinox.filter_custom_vjp`` every one but the first."""
    if _is_equinox_vjp(fn):
        return tuple(range(1, count))
    return tuple(i for i in fn.nondiff_argnums if i < count)


def _bind(rule: _Rule, args: tuple, who: str) -> tuple:
    """``args`` checked against the primal's signature, with defaults filled in."""
    if rule.signature is not None:
        try:
            bound = rule.signature.bind(*args)
        except TypeError as e:
            raise ArgumentError(f"{who}: {rule.label} {e}") from None
        bound.apply_defaults()
        if bound.kwargs:
            raise ArgumentError(
                f"{who}: {rule.label} has keyword-only arguments "
                f"({', '.join(bound.kwargs)}); custom_vjp functions take "
                f"positional arguments"
            )
        args = tuple(bound.args)
    for index in rule.nondiff:
        if index >= len(args):
            raise ValueError(
                f"{who}: {rule.label} has nondiff_argnums={rule.nondiff} but "
                f"was given {len(args)} arguments"
            )
    return args


def _diff_indices(rule: _Rule, args: tuple) -> list[int]:
    return [i for i in range(len(args)) if i not in rule.nondiff]


def _equinox_rule(rule: _Rule, args: tuple) -> tuple[_Rule, tuple]:
    """An ``equinox.filter_custom_vjp`` in the jax convention, and its arguments.

    Equinox differentiates the floating-point arrays of the first argument ``vjp_arg`` only;
    every other argument is nondiff. Its fwd takes ``perturbed`` (which leaves of ``vjp_arg``
    are differentiated) first, and its bwd ``(residuals, g, perturbed, vjp_arg, *args)``. The
    differentiable argument becomes ``vjp_arg``'s float arrays (``None`` elsewhere, leaves that
    pytrees skip); its other leaves (functions, integers, static fields) are closed over.
    Likewise only the float arrays of the output are compared.
    """
    import equinox as eqx

    if not args:
        raise ArgumentError(f"{rule.label} (an equinox.filter_custom_vjp) needs its vjp_arg")
    vjp_arg, rest = args[0], args[1:]
    diff, static = eqx.partition(vjp_arg, eqx.is_inexact_array)
    perturbed = jax.tree_util.tree_map(eqx.is_inexact_array, vjp_arg)
    fun, fwd, bwd = rule.fun, rule.fwd, rule.bwd

    # Outputs too: only float arrays have cotangents (None elsewhere, as equinox's bwd expects).
    def primal(d, *others):
        return eqx.filter(fun(eqx.combine(d, static), *others), eqx.is_inexact_array)

    def forward(d, *others):
        out, residuals = fwd(perturbed, eqx.combine(d, static), *others)
        return eqx.filter(out, eqx.is_inexact_array), (residuals, d)

    def backward(*others_residuals_g):
        *others, (residuals, d), g = others_residuals_g
        return (bwd(residuals, g, perturbed, eqx.combine(d, static), *others),)

    nondiff = tuple(range(1, len(args)))
    return rule._replace(fun=primal, fwd=forward, bwd=backward, nondiff=nondiff), (diff, *rest)


def _static_snapshot(rule: _Rule, args: tuple) -> dict:
    """Copies of the nondiff arguments that are plain Python values (not arrays), by index,
    to prove afterwards that fwd and bwd left them as the primal saw them."""
    snapshot = {}
    for index in rule.nondiff:
        value = args[index]
        leaves = jax.tree_util.tree_leaves(value)
        if any(isinstance(leaf, (jax.Array, np.ndarray)) for leaf in leaves):
            continue  # arrays are immutable to JAX code; tracers cannot be compared
        try:
            before = copy.deepcopy(value)
            comparable = bool(before == value)
        except Exception:  # uncopyable or incomparable (a lock, a module): nothing to check
            continue
        if comparable:  # functions and most objects compare by identity: copies differ
            snapshot[index] = before
    return snapshot


def _check_unchanged(rule: _Rule, args: tuple, snapshot: dict, names: tuple, stage: str) -> None:
    for index, before in snapshot.items():
        try:
            same = bool(before == args[index])
        except Exception:  # == that raises or is not a bool: cannot tell, trust it
            continue
        if not same:
            raise ValueError(
                f"{rule.label}'s {stage} changed its nondiff argument {names[index]!r} from "
                f"{before!r} to {args[index]!r}; the bwd must see the value the primal was "
                f"called with (do not mutate nondiff arguments)"
            )


def _check_float_arguments(rule: _Rule, args: tuple, names: tuple, who: str) -> None:
    for index in _diff_indices(rule, args):
        leaves = jax.tree_util.tree_flatten_with_path(args[index])[0]
        if not leaves:
            raise ValueError(
                f"{who}: argument {names[index]!r} of {rule.label} holds no "
                f"arrays; mark it in nondiff_argnums"
            )
        for path, leaf in leaves:
            dtype = jnp.result_type(leaf)
            if not jnp.issubdtype(dtype, jnp.floating):
                raise ArgumentError(
                    f"{who}: argument {names[index]}{jax.tree_util.keystr(path)} "
                    f"of {rule.label} has dtype {dtype}; only floating-point "
                    f"arguments are differentiated (mark it in nondiff_argnums, "
                    f"or pass x.astype(float))"
                )


# --------------------------------------------------------------------------------------------
# The user's bwd, checked for structure and shape, and the reference
# --------------------------------------------------------------------------------------------


def _fill_zeros(cotangent, primal):
    # JAX lets a bwd return None for a zero cotangent, for a whole argument or a subtree.
    if cotangent is None:
        return jax.tree_util.tree_map(jnp.zeros_like, primal)
    return jax.tree_util.tree_map(
        lambda c, p: jax.tree_util.tree_map(jnp.zeros_like, p) if c is None else c,
        cotangent,
        primal,
        is_leaf=lambda c: c is None,
    )


def _checked_cotangents(
    rule: _Rule, cotangents, primals: tuple, names: tuple, nondiff_names: tuple = ()
) -> tuple:
    """The bwd's output as a tuple shaped exactly like ``primals``, or a one-line error.

    JAX's own message for a wrong structure or shape names neither the argument nor the
    expected shape; this one does.
    """
    expected = f"one per differentiable argument: {', '.join(names)}"
    if not isinstance(cotangents, (tuple, list)):
        raise ValueError(
            f"{rule.label}'s bwd must return a tuple of cotangents ({expected}), "
            f"got {type(cotangents).__name__}"
        )
    if nondiff_names and len(cotangents) == len(primals) + len(nondiff_names):
        listed = ", ".join(repr(n) for n in nondiff_names)
        raise ValueError(
            f"{rule.label}'s bwd returned {len(cotangents)} cotangents, one for every "
            f"argument, but {listed} {'is' if len(nondiff_names) == 1 else 'are'} in "
            f"nondiff_argnums and get{'s' if len(nondiff_names) == 1 else ''} none "
            f"(bwd receives {'it' if len(nondiff_names) == 1 else 'them'} first instead); "
            f"return {len(primals)} ({expected})"
        )
    if len(cotangents) != len(primals):
        raise ValueError(
            f"{rule.label}'s bwd returned {len(cotangents)} cotangents, expected "
            f"{len(primals)} ({expected})"
        )
    out = []
    for name, cotangent, primal in zip(names, cotangents, primals):
        try:
            cotangent = _fill_zeros(cotangent, primal)
        except ValueError:  # tree_map on trees of different structure
            pass
        # jaxlib ships PyTreeDef without a stub, so mypy cannot see its __ne__: hence the ignore.
        if (
            jax.tree_util.tree_structure(cotangent)  # type: ignore[operator]
            != jax.tree_util.tree_structure(primal)
        ):
            raise ValueError(
                f"{rule.label}'s bwd returned a cotangent for argument {name!r} "
                f"that does not match the argument: "
                f"{tree_difference(primal, cotangent)}"
            )
        pairs = zip(
            jax.tree_util.tree_flatten_with_path(primal)[0], jax.tree_util.tree_leaves(cotangent)
        )
        for (path, p), c in pairs:
            where = name + jax.tree_util.keystr(path)
            if jnp.shape(c) != jnp.shape(p):
                raise ValueError(
                    f"{rule.label}'s bwd returned a cotangent of shape "
                    f"{tuple(jnp.shape(c))} for argument {where!r}, expected shape "
                    f"{tuple(jnp.shape(p))} (the shape of {where})"
                )
            if not jnp.issubdtype(jnp.result_type(c), jnp.floating):
                raise ArgumentError(
                    f"{rule.label}'s bwd returned a cotangent of dtype "
                    f"{jnp.result_type(c)} for argument {where!r}, expected a "
                    f"floating-point dtype"
                )
        out.append(cotangent)
    return tuple(out)


def _primal_of_diff(rule: _Rule, args: tuple) -> Callable:
    """``fn.fun`` as a function of the differentiable arguments only."""
    diff = _diff_indices(rule, args)

    def primal(*diff_args):
        full = list(args)
        for index, value in zip(diff, diff_args):
            full[index] = value
        return rule.fun(*full)

    return primal


def _manual_vjp(rule: _Rule, args: tuple, cotangent, names: tuple) -> tuple:
    """The user's rule: ``bwd(*nondiff_args, residuals of fwd, cotangent)``."""
    snapshot = _static_snapshot(rule, args)
    _, residuals = rule.fwd(*args)
    _check_unchanged(rule, args, snapshot, names, "fwd")
    nondiff_args = [args[i] for i in rule.nondiff]
    diff = _diff_indices(rule, args)
    cotangents = rule.bwd(*nondiff_args, residuals, cotangent)
    _check_unchanged(rule, args, snapshot, names, "bwd")
    return _checked_cotangents(
        rule,
        cotangents,
        tuple(args[i] for i in diff),
        tuple(names[i] for i in diff),
        tuple(names[i] for i in rule.nondiff),
    )


def _random_cotangent(rule: _Rule, args: tuple, key):
    # Over the differentiable arguments only: nondiff ones may be strings, dtypes or
    # functions, which eval_shape cannot trace.
    diff_args = tuple(args[i] for i in _diff_indices(rule, args))
    out = jax.eval_shape(_primal_of_diff(rule, args), *diff_args)
    leaves, treedef = jax.tree_util.tree_flatten(out)
    for leaf in leaves:
        if not jnp.issubdtype(leaf.dtype, jnp.floating):
            raise ArgumentError(
                f"{rule.label} returns an output of dtype {leaf.dtype}; check_vjp "
                f"needs floating-point outputs"
            )
    keys = jax.random.split(key, max(len(leaves), 1))
    return jax.tree_util.tree_unflatten(
        treedef, [jax.random.normal(k, leaf.shape, leaf.dtype) for k, leaf in zip(keys, leaves)]
    )


def _projected(out, cotangent):
    """``<cotangent, out>``: its gradient is the VJP (for finite differences, forward mode)."""
    return sum(
        jnp.vdot(dy, y)
        for dy, y in zip(jax.tree_util.tree_leaves(cotangent), jax.tree_util.tree_leaves(out))
    )


def _reference_vjp(rule: _Rule, args: tuple, cotangent, who: str) -> tuple:
    """``jax.vjp`` of the primal; forward mode where reverse mode cannot run.

    Many custom_vjp rules exist because their primal cannot be reverse-differentiated (a
    ``lax.while_loop``, such as Equinox's checkpointed loop). The gradient of
    ``<cotangent, primal(args)>`` by ``jax.jacfwd`` is the same vector, one JVP per input
    entry, so small inputs are checked all the same.
    """
    primal = _primal_of_diff(rule, args)
    diff_args = tuple(args[i] for i in _diff_indices(rule, args))
    try:
        _, reference_vjp = jax.vjp(primal, *diff_args)
        return tuple(reference_vjp(cotangent))
    except Exception as reverse_error:  # the user's primal: any error JAX's transpose raises
        reverse = str(reverse_error).splitlines()[0] if str(reverse_error) else ""
        reverse = f"{type(reverse_error).__name__}: {reverse}"

    def projected(*d):
        return _projected(primal(*d), cotangent)

    try:
        return tuple(jax.jacfwd(projected, argnums=tuple(range(len(diff_args))))(*diff_args))
    except Exception as forward_error:
        forward = str(forward_error).splitlines()[0] if str(forward_error) else ""
        raise ValueError(
            f"{who}: {rule.label}'s primal cannot be differentiated by JAX, so there is no "
            f"reference for its bwd (reverse mode: {reverse}; forward mode: "
            f"{type(forward_error).__name__}: {forward})"
        ) from forward_error


def _prepare(fn, args, who, key, cotangent):
    rule = _unwrap(fn, who)
    args = _bind(rule, tuple(args), who)
    if rule.kind == "equinox":
        rule, args = _equinox_rule(rule, args)
    names = argument_names(fn, len(args))
    _check_float_arguments(rule, args, names, who)
    if cotangent is None:
        cotangent = _random_cotangent(rule, args, jax.random.key(0) if key is None else key)
    diff = _diff_indices(rule, args)
    snapshot = _static_snapshot(rule, args)
    manual = _manual_vjp(rule, args, cotangent, names)
    reference = _reference_vjp(rule, args, cotangent, who)
    _check_unchanged(rule, args, snapshot, names, "primal")
    diff_names = tuple(names[i] for i in diff)
    return rule, args, diff_names, cotangent, manual, reference


def _named(report: GradReport, names: tuple, reference: tuple) -> GradReport:
    # compare_grads names leaves by tree path ("[1]['b']"); a person reads "w['b']".
    paths = tuple(
        name + jax.tree_util.keystr(path)
        for name, tree in zip(names, reference)
        for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]
    )
    return dataclasses.replace(report, paths=paths)


def check_vjp(
    fn, *args, key=None, cotangent=None, rtol: float | None = None, atol: float | None = None
) -> GradReport:
    """Check a ``jax.custom_vjp`` function's ``bwd`` against ``jax.vjp`` of its primal.

    ``args`` are the function's positional arguments (defaults fill the rest). The cotangent
    is drawn at random (``key``, default ``jax.random.key(0)``) unless given. The report has
    one row per array of every differentiable argument, named by argument (``x``,
    ``params['W']``). Works under ``jit`` (``fn`` static) and ``vmap``.
    """
    _, _, diff_names, _, manual, reference = _prepare(fn, args, "check_vjp", key, cotangent)
    return _named(compare_grads(manual, reference, rtol=rtol, atol=atol), diff_names, reference)


def check_vjp_fd(fn, *args, key=None, cotangent=None, eps: float | None = None) -> GradCheck:
    """Three opinions on a custom_vjp rule: its ``bwd``, ``jax.vjp`` of the primal, and central
    finite differences of ``<cotangent, fn(args)>`` (two primal evaluations per input entry:
    for small inputs).

    Returns a :class:`~jaxbp.GradCheck` whose reports name leaves by argument.
    """
    rule, args, diff_names, cotangent, manual, reference = _prepare(
        fn, args, "check_vjp_fd", key, cotangent
    )
    primal = _primal_of_diff(rule, args)

    def projected(diff_args):
        return _projected(primal(*diff_args), cotangent)

    diff = _diff_indices(rule, args)
    fd = tuple(finite_difference_grads(projected, tuple(args[i] for i in diff), eps=eps))
    return GradCheck(
        _named(compare_grads(manual, reference), diff_names, reference),
        _named(compare_grads(manual, fd, tolerances=fd_tolerance), diff_names, reference),
        _named(compare_grads(reference, fd, tolerances=fd_tolerance), diff_names, reference),
    )


def vjp_verdicts(report: GradReport) -> tuple[str, ...]:
    """One line per row of a :func:`check_vjp` report: what the rule's cotangent is, in words.

    Read from the report's statistics (``a`` the bwd's cotangent, ``b`` ``jax.vjp``'s):
    ``"agrees"``; ``"looks like: a constant factor 2.000"`` (cosine 1 and ``|a|/|b| = 2``: a
    gradient scaled on purpose, such as optax's gradient scaler, or a factor forgotten);
    ``"bwd returns zero ..."``; ``"jax.vjp of the primal is zero ..."`` (the primal does not
    depend on the argument, yet the rule passes a value back through its cotangent, as
    fp8 scales are carried); an approximation; or the cosine and norm ratio of a plain
    mismatch. Forces a host sync; not for use under ``jit``.
    """
    cosine = np.asarray(report.cosine, np.float64)
    ratio = (
        np.ones_like(cosine)
        if report.norm_ratio is None
        else np.asarray(report.norm_ratio, np.float64)
    )
    ok = np.asarray(report.leaf_ok)
    # A scaled copy has cosine 1 up to rounding, which for float32 leaves (whose statistics
    # may be float64 under x64) reaches ~1e-6 on large leaves: 1e-5 (0.26 degrees) reads as
    # parallel for every dtype. A "looks like", not a proof: the factor is printed to 3 places.
    parallel = 1e-5
    verdicts = []
    for i in range(len(report.paths)):
        c, r = cosine[i], ratio[i]
        if ok[i]:
            verdicts.append("agrees")
        elif not np.isfinite(c) and not (r == 0 or np.isinf(r)):
            verdicts.append("not finite: bwd or jax.vjp holds a NaN or an inf")
        elif r == 0:
            verdicts.append(
                "bwd returns zero where jax.vjp of the primal does not: the rule drops "
                "this gradient"
            )
        elif np.isinf(r):
            verdicts.append(
                "jax.vjp of the primal is zero (the primal does not depend on it here) but "
                "bwd is not: the rule passes another value back through this cotangent, "
                "not a gradient"
            )
        elif abs(c) >= 1 - parallel:
            factor = float(np.sign(c) * r)
            flipped = " (the sign is flipped)" if abs(factor + 1) < 1e-3 else ""
            verdicts.append(f"looks like: a constant factor {factor:.3f}{flipped}")
        elif c > 0.99 and abs(r - 1) < 0.05:
            verdicts.append(
                f"close, not equal: cosine {c:.4f}, |bwd|/|jax.vjp| {r:.4g} (an "
                f"approximation of the gradient, such as a rounded or quantized one)"
            )
        else:
            verdicts.append(f"differs: cosine {c:.4f}, |bwd|/|jax.vjp| {r:.4g}")
    return tuple(verdicts)


# --------------------------------------------------------------------------------------------
# "module:name" references, so that a description of a CustomVJP layer is JSON
# --------------------------------------------------------------------------------------------


def _reference_of(obj) -> str:
    if isinstance(obj, str):
        return obj
    return f"{getattr(obj, '__module__', '?')}:{getattr(obj, '__qualname__', _label(obj))}"


def resolve(reference: str | Any, what: str = "object") -> Any:
    """The object a ``"module:name"`` string names (``"mypkg.ops:linear"``) in a module that is
    already imported; other values are returned as they are. A string never imports a module:
    descriptions reach this layer through :func:`jaxbp.build`, which resolves their references
    only inside the modules its caller allowed (``modules=``, ``--import``)."""
    if not isinstance(reference, str):
        return reference
    module_name = reference.partition(":")[0]
    loaded = {module_name: sys.modules[module_name]} if module_name in sys.modules else {}
    try:
        return resolve_reference(reference, loaded, f"the {what}")
    except ReferenceNotAllowedError:
        raise ValueError(
            f"the {what} {reference!r} names module {module_name!r}, which is not imported; "
            f"a string never imports a module: import it first, or pass the function itself"
        ) from None


# --------------------------------------------------------------------------------------------
# A custom_vjp function as a jaxbp layer
# --------------------------------------------------------------------------------------------


def _input_index(names: tuple, input_arg, label: str) -> int:
    if isinstance(input_arg, str):
        if input_arg not in names:
            raise ValueError(
                f"from_custom_vjp: {label} has no argument {input_arg!r}; its "
                f"arguments are {', '.join(names)}"
            )
        return names.index(input_arg)
    if (
        not isinstance(input_arg, int)
        or isinstance(input_arg, bool)
        or not 0 <= input_arg < len(names)
    ):
        raise ValueError(
            f"from_custom_vjp: input_arg must name one of {label}'s arguments "
            f"({', '.join(names)}) or be an index below {len(names)}, got "
            f"{input_arg!r}"
        )
    return input_arg


def _layer_roles(rule: _Rule, fn, input_arg, constants: dict):
    """(names, input index, parameter names) of a custom_vjp function used as a layer."""
    names = argument_names(fn)
    if not names:
        raise ValueError(f"from_custom_vjp: {rule.label} takes no named positional arguments")
    x_index = _input_index(names, input_arg, rule.label)
    if x_index in rule.nondiff:
        raise ValueError(
            f"from_custom_vjp: the input {names[x_index]!r} of {rule.label} is in "
            f"nondiff_argnums; the layer input must be differentiable"
        )
    nondiff_names = {names[i] for i in rule.nondiff}
    missing = sorted(nondiff_names - set(constants))
    unknown = sorted(set(constants) - nondiff_names)
    if missing or unknown:
        raise ValueError(
            f"from_custom_vjp: constants must give exactly the nondiff arguments "
            f"of {rule.label} ({', '.join(sorted(nondiff_names)) or 'none'}); "
            f"missing {missing or 'none'}, unexpected {unknown or 'none'}"
        )
    param_names = tuple(n for i, n in enumerate(names) if i != x_index and i not in rule.nondiff)
    return names, x_index, param_names


def _check_param_dict(params, param_names: tuple, label: str, where: str) -> None:
    if not isinstance(params, dict) or set(params) != set(param_names):
        got = f"keys {tuple(sorted(params))}" if isinstance(params, dict) else type(params).__name__
        raise ValueError(
            f"CustomVJP({label}): {where} must be a dict with keys "
            f"{tuple(sorted(param_names))} (the parameters of {label}), got {got}"
        )


class _CustomLayer(NamedTuple):
    """What a layer made by :func:`from_custom_vjp` needs: the rule and each argument's role."""

    rule: _Rule
    init: Callable
    names: tuple  # every argument of fn, in order
    x_index: int  # the layer input's
    param_names: tuple  # the differentiable arguments other than x: the params dict's keys
    fixed: dict  # the nondiff arguments' values, by name


def _check_custom_vjp_arguments(fn, init, input_arg, constants) -> tuple[_CustomLayer, tuple]:
    """The layer's pieces, and ``constants`` as sorted ``(name, value)`` pairs (its config)."""
    fn_obj, init_obj = resolve(fn, "custom_vjp function"), resolve(init, "init function")
    rule = _unwrap(fn_obj, "from_custom_vjp", equinox=False)
    if not callable(init_obj):
        raise ArgumentError(
            f"from_custom_vjp: init must be a function (key, input_shape) -> "
            f"params dict, got {type(init_obj).__name__}"
        )
    pairs = (
        tuple(sorted(constants.items()))
        if isinstance(constants, dict)
        else tuple((str(k), v) for k, v in constants)
    )
    fixed = dict(pairs)
    names, x_index, param_names = _layer_roles(rule, fn_obj, input_arg, fixed)
    return _CustomLayer(rule, init_obj, names, x_index, param_names, fixed), pairs


def _custom_arguments(spec: _CustomLayer, params, x) -> tuple:
    """``fn``'s positional arguments: ``x``, the constants and the params, each in its place."""
    return tuple(
        x if i == spec.x_index else spec.fixed[n] if i in spec.rule.nondiff else params[n]
        for i, n in enumerate(spec.names)
    )


def _custom_init(spec: _CustomLayer, key, input_shape):
    label = spec.rule.label
    example = tuple(1 if d == -1 else d for d in input_shape)
    params = spec.init(key, tuple(input_shape))
    _check_param_dict(params, spec.param_names, label, "init's result")
    leaves = jax.tree_util.tree_leaves(params)
    x = jax.ShapeDtypeStruct(example, leaves[0].dtype if leaves else jnp.float32)
    out = jax.eval_shape(lambda p, xx: spec.rule.fun(*_custom_arguments(spec, p, xx)), params, x)
    if not hasattr(out, "shape"):
        raise ValueError(
            f"CustomVJP({label}): a layer's output must be one array, got "
            f"{jax.tree_util.tree_structure(out)}"
        )
    shape = tuple(out.shape)
    if input_shape and input_shape[0] == -1 and shape:
        shape = (-1, *shape[1:])  # keep the batch dimension unknown, as given
    return shape, params


def _custom_forward(spec: _CustomLayer, params, x):
    label = spec.rule.label
    _check_param_dict(params, spec.param_names, label, "params")
    args = _custom_arguments(spec, params, x)
    _check_float_arguments(spec.rule, args, spec.names, f"CustomVJP({label})")
    snapshot = _static_snapshot(spec.rule, args)
    _, residuals = spec.rule.fwd(*args)
    _check_unchanged(spec.rule, args, snapshot, spec.names, "fwd")
    # x rides along in the cache only so that a wrong dx shape can name the expected one.
    return spec.rule.fun(*args), (residuals, x)


def _custom_backward(spec: _CustomLayer, params, cache, dy):
    """The user's rule: ``(dE/dargs) = fn.bwd(*constants, residuals, dy)``, split into
    ``dE/dparams`` (by argument name) and ``dE/dx``."""
    rule, names = spec.rule, spec.names
    residuals, x = cache
    args = _custom_arguments(spec, params, x)
    diff = _diff_indices(rule, args)
    snapshot = _static_snapshot(rule, args)
    returned = rule.bwd(*(args[i] for i in rule.nondiff), residuals, dy)
    _check_unchanged(rule, args, snapshot, names, "bwd")
    cotangents = _checked_cotangents(
        rule,
        returned,
        tuple(args[i] for i in diff),
        tuple(names[i] for i in diff),
        tuple(names[i] for i in rule.nondiff),
    )
    by_name = {names[i]: c for i, c in zip(diff, cotangents)}
    return {n: by_name[n] for n in spec.param_names}, by_name[names[spec.x_index]]


def from_custom_vjp(fn, init, input_arg: int | str = 0, constants=()) -> Layer:
    """A jaxbp layer computing ``fn``, a ``jax.custom_vjp`` function, with ``fn``'s own bwd.

    Convention: argument ``input_arg`` (an index or a name; default the first) is the layer
    input ``x``; every other differentiable argument is a parameter, and the layer's params are
    a dict keyed by argument name (``{"w": ..., "b": ...}`` for ``fn(x, w, b)``), so a checked
    train step names a wrong leaf ``[0]['w']``. Arguments in ``nondiff_argnums`` take fixed
    values from ``constants`` (a dict, or ``(name, value)`` pairs).

    ``init(key, input_shape) -> params dict``. The layer's forward output is ``fn.fun`` (the
    undecorated primal, which ``jax.grad`` differentiates for the reference) and its cache the
    residuals of ``fn.fwd``; its backward is ``fn.bwd``. ``fn`` and ``init`` may also be given
    as ``"module:name"`` strings (that is how a description records them).
    """
    spec, pairs = _check_custom_vjp_arguments(fn, init, input_arg, constants)
    config = (
        ("fn", _reference_of(fn)),
        ("init", _reference_of(init)),
        ("input_arg", input_arg),
        ("constants", pairs),
    )
    return bound(spec, _custom_init, _custom_forward, _custom_backward, "CustomVJP", config)


# --------------------------------------------------------------------------------------------
# A jaxbp layer as a custom_vjp function
# --------------------------------------------------------------------------------------------


def as_custom_vjp(layer: Layer) -> Callable:
    """``apply(params, x) -> y``: ``layer`` (or a whole network) as a ``jax.custom_vjp``.

    ``fwd`` is the layer's forward (residuals: params and the layer's cache) and ``bwd`` its
    hand-written backward, so ``jax.grad`` of any model that calls ``apply`` (Flax, Equinox,
    plain JAX) uses the chain rule written in jaxbp. Works under ``jit``, ``vmap`` and inside
    ``lax.scan`` like any custom_vjp function.
    """
    if not isinstance(layer, Layer):
        hint = " (did you forget to call it, e.g. Dense(10)?)" if callable(layer) else ""
        raise ArgumentError(f"as_custom_vjp expects a jaxbp Layer, got {layer!r}{hint}")
    if layer.has_state:
        # Its forward would run from the initial state without a key, silently: refuse.
        raise ValueError(
            f"as_custom_vjp expects a layer without state or randomness; "
            f"{layer.name} has some (BatchNorm, Dropout), which "
            f"apply(params, x) cannot carry"
        )

    @jax.custom_vjp
    def apply(params, x):
        return layer.forward(params, x)[0]

    def fwd(params, x):
        y, cache = layer.forward(params, x)
        return y, (params, cache)

    def bwd(residuals, dy):
        params, cache = residuals
        dparams, dx = layer.backward(params, cache, dy)
        return dparams, dx

    apply.defvjp(fwd, bwd)
    # custom_vjp objects take attributes at runtime (it wraps the function like
    # functools.wraps), but jax's class declares none of them: hence the ignores.
    apply.__name__ = apply.__qualname__ = f"{layer.name}_apply"  # type: ignore[attr-defined]
    apply.layer = layer  # type: ignore[attr-defined]
    return apply


# A description {"name": "CustomVJP", "fn": "mypkg.ops:linear", "init": "mypkg.ops:init", ...}
# builds the layer wherever descriptions are read (checkpoints, --model); build resolves fn and
# init only inside the modules the reader allowed (--import mypkg.ops).
register_layer("CustomVJP", from_custom_vjp, references=("fn", "init"))
