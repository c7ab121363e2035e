"""jaxbp and the rest of JAX: ``jax.custom_vjp`` functions in, jaxbp layers out.

Most hand-written backward passes in JAX are ``jax.custom_vjp`` functions inside Flax or
Equinox models. Checking one is awkward: ``jax.grad`` of the function uses the custom rule, so
autodiff compares the rule with itself. The reference here is ``jax.vjp`` of the undecorated
primal, ``fn.fun``; the manual gradient is the user's ``bwd`` applied to the residuals of the
user's ``fwd``.

- :func:`check_vjp`: the user's ``bwd`` vs ``jax.vjp(fn.fun)``, per argument, as a
  :class:`~jaxbp.GradReport` whose leaves are named by argument (``x``, ``w['b']``).
- :func:`check_vjp_fd`: the same plus central finite differences, as a :class:`~jaxbp.GradCheck`.
- :func:`from_custom_vjp`: a jaxbp layer whose backward is the user's ``bwd``, so that
  :func:`~jaxbp.check_layer` and :func:`~jaxbp.make_train_step` check it every step.
- :func:`as_custom_vjp`: the other way round, a jaxbp layer (or network) as a plain
  ``custom_vjp`` function ``apply(params, x)``: ``jax.grad`` of any model calling it runs the
  layer's hand-written backward.

Conventions for a user's ``fn``: arguments are positional; ``nondiff_argnums`` are honoured
(``bwd(*nondiff_args, residuals, g)``, as in JAX); every other argument is differentiated and
must be floating point (a pytree of arrays is fine); outputs may be any pytree of float arrays.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from ._trees import tree_difference
from .gradcheck import GradCheck, GradReport, compare_grads, fd_tolerance, finite_difference_grads
from .layers import Layer, bound

__all__ = [
    "check_vjp",
    "check_vjp_fd",
    "from_custom_vjp",
    "as_custom_vjp",
    "resolve",
    "argument_names",
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


def _label(fn) -> str:
    return getattr(fn, "__name__", None) or type(fn).__name__


def _unwrap(fn, who: str) -> _Rule:
    label = _label(fn)
    if isinstance(fn, jax.custom_jvp):
        raise TypeError(
            f"{who} expects a jax.custom_vjp function, got the jax.custom_jvp "
            f"function {label} (its rule is a JVP; check it with jax.jvp)"
        )
    if not isinstance(fn, jax.custom_vjp):
        raise TypeError(
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
    fun = getattr(fn, "fun", fn)
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


def _bind(rule: _Rule, args: tuple, who: str) -> tuple:
    """``args`` checked against the primal's signature, with defaults filled in."""
    if rule.signature is not None:
        try:
            bound = rule.signature.bind(*args)
        except TypeError as e:
            raise TypeError(f"{who}: {rule.label} {e}") from None
        bound.apply_defaults()
        if bound.kwargs:
            raise TypeError(
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
                raise TypeError(
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


def _checked_cotangents(rule: _Rule, cotangents, primals: tuple, names: tuple) -> tuple:
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
                raise TypeError(
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
    _, residuals = rule.fwd(*args)
    nondiff_args = [args[i] for i in rule.nondiff]
    diff = _diff_indices(rule, args)
    return _checked_cotangents(
        rule,
        rule.bwd(*nondiff_args, residuals, cotangent),
        tuple(args[i] for i in diff),
        tuple(names[i] for i in diff),
    )


def _random_cotangent(rule: _Rule, args: tuple, key):
    out = jax.eval_shape(rule.fun, *args)
    leaves, treedef = jax.tree_util.tree_flatten(out)
    for leaf in leaves:
        if not jnp.issubdtype(leaf.dtype, jnp.floating):
            raise TypeError(
                f"{rule.label} returns an output of dtype {leaf.dtype}; check_vjp "
                f"needs floating-point outputs"
            )
    keys = jax.random.split(key, max(len(leaves), 1))
    return jax.tree_util.tree_unflatten(
        treedef, [jax.random.normal(k, leaf.shape, leaf.dtype) for k, leaf in zip(keys, leaves)]
    )


def _prepare(fn, args, who, key, cotangent):
    rule = _unwrap(fn, who)
    args = _bind(rule, tuple(args), who)
    names = argument_names(fn, len(args))
    _check_float_arguments(rule, args, names, who)
    if cotangent is None:
        cotangent = _random_cotangent(rule, args, jax.random.key(0) if key is None else key)
    diff = _diff_indices(rule, args)
    manual = _manual_vjp(rule, args, cotangent, names)
    _, reference_vjp = jax.vjp(_primal_of_diff(rule, args), *(args[i] for i in diff))
    reference = tuple(reference_vjp(cotangent))
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
        out = primal(*diff_args)
        return sum(
            jnp.vdot(dy, y)
            for dy, y in zip(jax.tree_util.tree_leaves(cotangent), jax.tree_util.tree_leaves(out))
        )

    diff = _diff_indices(rule, args)
    fd = tuple(finite_difference_grads(projected, tuple(args[i] for i in diff), eps=eps))
    return GradCheck(
        _named(compare_grads(manual, reference), diff_names, reference),
        _named(compare_grads(manual, fd, tolerances=fd_tolerance), diff_names, reference),
        _named(compare_grads(reference, fd, tolerances=fd_tolerance), diff_names, reference),
    )


# --------------------------------------------------------------------------------------------
# "module:name" references, so that a description of a CustomVJP layer is JSON
# --------------------------------------------------------------------------------------------


def _reference_of(obj) -> str:
    if isinstance(obj, str):
        return obj
    return f"{getattr(obj, '__module__', '?')}:{getattr(obj, '__qualname__', _label(obj))}"


def resolve(reference: str | Any, what: str = "object") -> Any:
    """The object a ``"module:name"`` string names (``"mypkg.ops:linear"``); other values are
    returned as they are. A dotted name walks attributes (``"mod:Class.method"``)."""
    if not isinstance(reference, str):
        return reference
    module_name, sep, name = reference.partition(":")
    if not sep or not module_name or not name:
        raise ValueError(
            f"expected the {what} as MODULE:NAME (such as mypkg.ops:linear), got {reference!r}"
        )
    try:
        obj = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(
            f"cannot import module {module_name!r} for the {what} {reference!r}: {e}"
        ) from None
    for part in name.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"module {module_name!r} has no {name!r} (the {what} {reference!r})")
        obj = getattr(obj, part)
    return obj


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
    rule = _unwrap(fn_obj, "from_custom_vjp")
    if not callable(init_obj):
        raise TypeError(
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
    _, residuals = spec.rule.fwd(*args)
    # x rides along in the cache only so that a wrong dx shape can name the expected one.
    return spec.rule.fun(*args), (residuals, x)


def _custom_backward(spec: _CustomLayer, params, cache, dy):
    """The user's rule: ``(dE/dargs) = fn.bwd(*constants, residuals, dy)``, split into
    ``dE/dparams`` (by argument name) and ``dE/dx``."""
    rule, names = spec.rule, spec.names
    residuals, x = cache
    args = _custom_arguments(spec, params, x)
    diff = _diff_indices(rule, args)
    cotangents = _checked_cotangents(
        rule,
        rule.bwd(*(args[i] for i in rule.nondiff), residuals, dy),
        tuple(args[i] for i in diff),
        tuple(names[i] for i in diff),
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
        raise TypeError(f"as_custom_vjp expects a jaxbp Layer, got {layer!r}{hint}")
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
# builds the layer wherever descriptions are read (checkpoints, --model).
from .model import register_layer  # noqa: E402  (after the factory it registers)

register_layer("CustomVJP", from_custom_vjp)
