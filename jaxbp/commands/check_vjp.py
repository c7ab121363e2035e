"""``jaxbp check --vjp MODULE:NAME --shapes 4,3 3``: check a user's ``jax.custom_vjp`` function.

Three opinions on every argument's gradient, on random inputs of the given shapes: the
function's own ``bwd``, ``jax.vjp`` of its undecorated primal, and central finite differences
(:func:`jaxbp.interop.check_vjp_fd`). One row per array of every differentiable argument,
named by argument, with what the bwd's cotangent looks like where it disagrees ("a constant
factor 2.000"). Exit code 0 when all three agree, 1 when they do not; a bad target, a shape
list that does not fit, a ``bwd`` of the wrong structure or non-float arguments raise
``ValueError``/``TypeError``, which ``jaxbp.cli`` prints as one line with exit code 2.

Arguments in ``nondiff_argnums`` (a mode string, a dtype, dimension numbers, a number) take
their default, or a value given with ``--static NAME=VALUE`` (:func:`parse_static`: Python
literals and ``dtype:NAME`` only, so a command line never runs code).
``equinox.filter_custom_vjp`` functions work too (the first argument is the array).

``check.py`` wires it in: :func:`add_arguments` adds ``--vjp``, ``--shapes`` and ``--static``,
and ``run`` calls :func:`run_vjp` when ``--vjp`` is given.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any

from . import tables

__all__ = [
    "add_arguments",
    "parse_shape",
    "parse_static",
    "load_target",
    "random_arguments",
    "run_vjp",
]


def parse_shape(text: str) -> tuple:
    """``"4,3"`` -> ``(4, 3)``; ``"scalar"`` or ``"()"`` -> ``()`` (an argparse type)."""
    if text.strip() in ("scalar", "()"):
        return ()
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a shape such as 4,3 (or 'scalar'), got {text!r}"
        ) from None
    if any(d < 1 for d in shape):
        raise argparse.ArgumentTypeError(f"expected positive dimensions, got {text!r}")
    return shape


def parse_static(text: str) -> tuple[str, Any]:
    """``"mode=tanh"`` -> ``("mode", "tanh")`` (an argparse type), a nondiff argument's value.

    The value is a Python literal where it reads as one (``3``, ``0.5``, ``'relu'``,
    ``(((1,), (0,)), ((), ()))``, ``None``, ``True``), a dtype for ``dtype:NAME``
    (``dtype:float8_e4m3fn``), and otherwise the text itself (``tanh``).
    """
    name, sep, value = text.partition("=")
    name = name.strip()
    if not sep or not name.isidentifier():
        raise argparse.ArgumentTypeError(
            f"expected NAME=VALUE for a nondiff argument (such as mode=tanh, n=3 or "
            f"dtype=dtype:float32), got {text!r}"
        )
    if value.startswith("dtype:"):
        import jax.numpy as jnp

        try:
            return name, jnp.dtype(value[len("dtype:") :])
        except TypeError:
            raise argparse.ArgumentTypeError(
                f"{name}: {value[len('dtype:') :]!r} is not a dtype (such as float32, bfloat16, "
                f"float8_e4m3fn)"
            ) from None
    try:
        return name, ast.literal_eval(value)
    except (ValueError, SyntaxError):  # not a literal: the text is the value (mode=tanh)
        return name, value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``--vjp`` and ``--shapes``; ``--seed``, ``--eps``, ``--dtype``, ``--format`` are check's."""
    parser.add_argument(
        "--vjp",
        metavar="MODULE:NAME",
        help="check a jax.custom_vjp function instead of a network: "
        "mypkg.ops:linear or path/to/file.py:linear",
    )
    parser.add_argument(
        "--shapes",
        type=parse_shape,
        nargs="+",
        metavar="SHAPE",
        help="with --vjp: one comma-separated shape per differentiable "
        "argument, such as 4,3 3 (random inputs); scalar (or ()) for a scalar",
    )
    parser.add_argument(
        "--static",
        type=parse_static,
        action="append",
        default=None,
        metavar="NAME=VALUE",
        help="with --vjp: the value of an argument in nondiff_argnums, such as "
        "mode=tanh, n=3, dims='(((1,), (0,)), ((), ()))' or dtype=dtype:float32 "
        "(repeat for several; Python literals, dtype:NAME, or plain text)",
    )


def _import_module(spec: str):
    if spec.endswith(".py"):
        path = Path(spec)
        if not path.is_file():
            raise ValueError(f"--vjp: file {spec!r} does not exist")
        module_spec = importlib.util.spec_from_file_location(path.stem, path)
        if module_spec is None or module_spec.loader is None:
            raise ValueError(f"--vjp: cannot import {spec!r} as a Python module")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules.setdefault(path.stem, module)  # pickling, dataclasses look it up
        module_spec.loader.exec_module(module)
        return module
    if os.getcwd() not in sys.path:  # as `python -m` would: modules beside the user resolve
        sys.path.insert(0, os.getcwd())
    try:
        return importlib.import_module(spec)
    except ImportError as e:
        raise ValueError(f"--vjp: cannot import module {spec!r}: {e}") from None


def load_target(target: str):
    """The object ``MODULE:NAME`` (or ``path/file.py:NAME``) names."""
    module_spec, sep, name = target.rpartition(":")
    if not sep or not module_spec or not name:
        raise ValueError(f"--vjp expects MODULE:NAME (such as mypkg.ops:linear), got {target!r}")
    obj = _import_module(module_spec)
    for part in name.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"--vjp: {module_spec!r} has no {name!r}")
        obj = getattr(obj, part)
    return obj


def random_arguments(fn, shapes, seed: int, dtype, static: dict | None = None) -> tuple:
    """Arguments for ``fn``: a random normal array of each shape for its differentiable
    arguments, in order (extra shapes go to ``*args``); every other argument (those in
    ``nondiff_argnums``, and trailing ones with a default) takes its value in ``static`` (by
    name) or its default."""
    import inspect

    import jax

    from ..interop import nondiff_argnums_of, primal_of

    try:
        signature = list(inspect.signature(primal_of(fn)).parameters.values())
    except (TypeError, ValueError):
        signature = []
    params = [p for p in signature if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    star = any(p.kind == p.VAR_POSITIONAL for p in signature) or not signature
    nondiff = set(nondiff_argnums_of(fn, len(params)))
    static = dict(static or {})
    label = _name(fn)
    _check_static_names(label, params, nondiff, static)
    keys = iter(jax.random.split(jax.random.key(seed), max(len(shapes), 1)))
    remaining = list(shapes)
    args = []
    for index, p in enumerate(params):
        if index in nondiff:
            if p.name in static:
                args.append(static[p.name])
            elif p.default is p.empty:
                raise ValueError(
                    f"--vjp: argument {p.name!r} of {label} is in nondiff_argnums "
                    f"without a default; give its value with --static {p.name}=VALUE"
                )
            else:
                args.append(p.default)
        elif remaining:
            args.append(jax.random.normal(next(keys), remaining.pop(0), dtype))
        elif p.default is not p.empty:
            args.append(p.default)
        else:
            raise ValueError(_count_message(fn, params, nondiff, len(shapes)))
    if remaining and not star:
        raise ValueError(_count_message(fn, params, nondiff, len(shapes)))
    args += [jax.random.normal(next(keys), shape, dtype) for shape in remaining]
    return tuple(args)


def _name(fn) -> str:
    # A jax.custom_vjp copies its function's __name__; an equinox.filter_custom_vjp keeps it on .fn.
    return str(getattr(fn, "__name__", None) or getattr(getattr(fn, "fn", None), "__name__", "fn"))


def _check_static_names(label: str, params, nondiff: set, static: dict) -> None:
    names = {p.name: i for i, p in enumerate(params)}
    nondiff_names = ", ".join(params[i].name for i in sorted(nondiff)) or "none"
    for name in static:
        if name not in names:
            raise ValueError(
                f"--static {name}=...: {label} has no argument {name!r} (its arguments: "
                f"{', '.join(names) or 'none'})"
            )
        if names[name] not in nondiff:
            raise ValueError(
                f"--static {name}=...: argument {name!r} of {label} is differentiated, so it "
                f"takes a random array from --shapes; --static gives nondiff arguments "
                f"(here: {nondiff_names})"
            )


def _count_message(fn, params, nondiff, given) -> str:
    diff = [p for i, p in enumerate(params) if i not in nondiff]
    required = [p for p in diff if p.default is p.empty]
    want = f"{len(required)}" if len(required) == len(diff) else f"{len(required)} to {len(diff)}"
    return (
        f"--shapes: {_name(fn)} takes {want} array arguments "
        f"({', '.join(p.name for p in diff)}), got {given} "
        f"shape{'s' if given != 1 else ''}"
    )


def run_vjp(
    target,
    shapes,
    seed: int = 0,
    *,
    eps: float | None = None,
    dtype: str = "float64",
    format: str = "text",
    static=(),
) -> int:
    """Check the custom_vjp function ``target`` (``MODULE:NAME`` or the function itself) on
    random inputs of ``shapes``, its nondiff arguments given by ``static`` (``(name, value)``
    pairs or a dict); print the table (or JSON); 0 when all agree, else 1."""
    import jax

    with jax.enable_x64(dtype == "float64"):
        return _run_vjp(target, shapes, seed, eps, dtype, format, static)


def _static_dict(static) -> dict:
    pairs = list(static.items()) if isinstance(static, dict) else list(static or ())
    out: dict = {}
    for name, value in pairs:
        if name in out:
            raise ValueError(f"--static {name}=... is given twice; give each argument once")
        out[name] = value
    return out


def _run_vjp(target, shapes, seed, eps, dtype, format, static) -> int:
    import jax
    import jax.numpy as jnp

    from ..errors import ArgumentError
    from ..interop import argument_names, check_vjp_fd, nondiff_argnums_of, vjp_verdicts

    fn = load_target(target) if isinstance(target, str) else target
    if not isinstance(fn, jax.custom_vjp) and type(fn).__name__ != "filter_custom_vjp":
        raise ArgumentError(
            f"--vjp expects a jax.custom_vjp function (decorated with "
            f"@jax.custom_vjp, then given .defvjp(fwd, bwd)) or an "
            f"equinox.filter_custom_vjp; {target} is a {type(fn).__name__}"
        )
    if not shapes:
        raise ValueError(
            "--vjp needs --shapes: one comma-separated shape per array argument, "
            "such as --shapes 4,3 3"
        )
    args = random_arguments(fn, shapes, seed, jnp.dtype(dtype), _static_dict(static))
    names = argument_names(fn, len(args))
    key = jax.random.key(seed + 1)
    nondiff = set(nondiff_argnums_of(fn, len(args)))
    positions = [i for i in range(len(args)) if i not in nondiff]

    # Only the arrays are jit's arguments: nondiff values (a mode string, a dtype, dimension
    # numbers) are closed over, static, as the custom_vjp itself treats them.
    def check(*diff_args):
        full = list(args)
        for index, value in zip(positions, diff_args):
            full[index] = value
        return check_vjp_fd(fn, *full, key=key, eps=eps)

    diff = [args[i] for i in positions]
    result = jax.jit(check)(*diff)
    looks = vjp_verdicts(result.manual_vs_autodiff)
    rows = _rows(result, diff, looks)
    ok = result.ok
    label = target if isinstance(target, str) else _name(fn)
    fixed = [f"{names[i]}={args[i]!r}" for i in sorted(nondiff) if i < len(names)]
    header = (
        f"custom_vjp {label}({', '.join(names)}), shapes "
        f"{' '.join(','.join(map(str, s)) or 'scalar' for s in shapes)}, {dtype}, "
        f"seed {seed}" + (f", nondiff {', '.join(fixed)}" if fixed else "")
    )
    worst = result.manual_vs_autodiff
    worst_row = next((r for r in rows if r["argument"] == worst.worst_path), None)
    verdict = (
        "all arguments agree: bwd = jax.vjp of the primal = finite differences"
        if ok
        else f"MISMATCH: worst argument {worst.worst_path} (bwd vs jax.vjp relative "
        f"error {float(worst.worst_rel_error):.3e}"
        + (f"; {worst_row['looks_like']}" if worst_row else "")
        + ")"
    )
    if format == "json":
        print(
            json.dumps(
                {
                    "function": label,
                    "dtype": dtype,
                    "seed": seed,
                    "ok": ok,
                    "arguments": rows,
                    "reports": {
                        n: getattr(result, n).to_dict()
                        for n in ("manual_vs_autodiff", "manual_vs_fd", "autodiff_vs_fd")
                    },
                },
                indent=2,
            )
        )
    else:
        _print_table(header, rows, verdict, ok, dtype)
    return 0 if ok else 1


def _rows(result, diff_args, looks) -> list[dict]:
    import jax
    import numpy as np

    leaves = [leaf for arg in diff_args for leaf in jax.tree_util.tree_leaves(arg)]
    rows = []
    for index, path in enumerate(result.manual_vs_autodiff.paths):
        reports = (result.manual_vs_autodiff, result.manual_vs_fd, result.autodiff_vs_fd)
        rows.append(
            {
                "argument": path,
                "shape": list(np.shape(leaves[index])),
                "bwd_vs_vjp": float(reports[0].rel_error[index]),
                "bwd_vs_fd": float(reports[1].rel_error[index]),
                "vjp_vs_fd": float(reports[2].rel_error[index]),
                "ok": all(bool(r.leaf_ok[index]) for r in reports),
                "looks_like": looks[index],
            }
        )
    return rows


def _print_table(header, rows, verdict, ok, dtype) -> None:
    from rich.table import Table

    out = tables.console()
    out.print(header, highlight=False)
    table = Table(
        title="relative error per argument: max|a - b| / max(|a|, |b|)", title_justify="left"
    )
    for name in (
        "argument",
        "shape",
        "bwd vs jax.vjp",
        "bwd vs finite diff",
        "jax.vjp vs finite diff",
        "ok",
    ):
        table.add_column(name, justify="left" if name == "argument" else "right")
    for r in rows:
        table.add_row(
            r["argument"],
            tables.shape_text(r["shape"]),
            f"{r['bwd_vs_vjp']:.2e}",
            f"{r['bwd_vs_fd']:.2e}",
            f"{r['vjp_vs_fd']:.2e}",
            tables.ok_text(r["ok"]),
        )
    out.print(table)
    for r in rows:  # in words, where the bwd and jax.vjp disagree
        if r["looks_like"] != "agrees":
            out.print(f"{r['argument']}: {r['looks_like']}", highlight=False)
    tables.print_check_verdict(out, dtype, "bwd vs jax.vjp", ok, verdict)
