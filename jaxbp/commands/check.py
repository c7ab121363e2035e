"""``jaxbp check``: three opinions on every gradient of a network given by flags.

The manual chain rule (each layer's hand-written ``backward``), ``jax.grad`` of the same loss,
and central finite differences, on a random batch: a table per parameter leaf (and per entry
for small networks), compared with :func:`jaxbp.check_grads`. Exit code 0 when all three agree,
1 when they do not.
"""

from __future__ import annotations

import argparse
import json

from . import args as types
from . import tables

DTYPES = ("float64", "float32")
_widths = types.widths(2, "2,3,2 (inputs, hidden..., outputs)", "at least two positive widths")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    _add_network_arguments(parser)
    _add_check_arguments(parser)
    from .check_vjp import add_arguments as add_vjp_arguments

    add_vjp_arguments(parser)


def _add_network_arguments(parser: argparse.ArgumentParser) -> None:
    """What is checked: an MLP given by its widths, or a model, and its loss."""
    from ..layers import ACTIVATIONS
    from ..losses import LOSSES

    parser.add_argument(
        "--layers",
        type=_widths,
        default=(2, 3, 2),
        metavar="W0,W1,...",
        help="widths: inputs, hidden layers, outputs (default: 2,3,2)",
    )
    parser.add_argument(
        "--model",
        type=types.model,
        metavar="NAME|FILE.json",
        help="check this model instead of an MLP: a preset (its outputs: the "
        "last --layers width) or a JSON model description",
    )
    types.add_import_argument(parser)
    parser.add_argument(
        "--input-shape",
        type=types.widths(1, "40,1", "comma-separated positive dimensions"),
        metavar="D,D,...",
        help="one example's shape for --model (default: the preset's, else "
        "the first --layers width)",
    )
    parser.add_argument(
        "--activation",
        choices=sorted(ACTIVATIONS),
        default="tanh",
        help="activation after every hidden layer (default: tanh)",
    )
    parser.add_argument(
        "--output-activation",
        choices=sorted(ACTIVATIONS),
        default="identity",
        help="activation after the last layer (default: identity)",
    )
    parser.add_argument("--loss", choices=sorted(LOSSES), default="mse", help="loss (default: mse)")
    parser.add_argument(
        "--shared-bias", action="store_true", help="one bias per layer, as in the seed tutorial"
    )


def _add_check_arguments(parser: argparse.ArgumentParser) -> None:
    """How it is checked: the random batch, the precision, the finite-difference step, output."""
    parser.add_argument(
        "--batch",
        type=types.positive_int,
        default=4,
        metavar="N",
        help="examples in the random batch (default: 4)",
    )
    parser.add_argument("--seed", type=types.seed, default=0, help="random seed (default: 0)")
    parser.add_argument(
        "--dtype",
        choices=DTYPES,
        default="float64",
        help="precision of params and data (default: float64)",
    )
    parser.add_argument(
        "--eps",
        type=types.positive_number,
        help="finite-difference step (default: 1e-5 in float64, 1e-2 in float32)",
    )
    parser.add_argument(
        "--entries",
        type=int,
        default=40,
        metavar="N",
        help="list every parameter entry when the network has at most N (default: 40; 0 never)",
    )
    parser.add_argument(
        "--format", choices=("text", "json"), default="text", help="text tables (default) or JSON"
    )


def build(widths, activation, output_activation, shared_bias=False, dtype=None):
    """The MLP ``widths = (inputs, hidden..., outputs)`` as a network (built from its
    description, as every command builds)."""
    from ..model import build as build_model

    return build_model(mlp_description(widths, activation, output_activation, shared_bias, dtype))


def mlp_description(widths, activation, output_activation, shared_bias=False, dtype=None):
    """``serial(Dense, act, ..., Dense, output_act)`` for ``widths``, as a description."""
    from ..presets import mlp_description as mlp

    description = mlp(
        widths[1:-1],
        activation,
        widths[-1],
        output=output_activation,
        dtype=None if dtype is None else str(dtype),
    )
    for layer in description["layers"]:
        if layer["name"] == "Dense" and shared_bias:
            layer["shared_bias"] = True
    return description


def model_problem(args, dtype):
    """``(net, input shape of one example, header)`` for ``--model`` or the ``--layers`` MLP."""
    from ..model import build as build_model
    from ..model import describe, load_description
    from ..presets import get_preset

    if args.model is None:
        net = build(args.layers, args.activation, args.output_activation, args.shared_bias, dtype)
        return (
            net,
            (args.layers[0],),
            (
                f"network {'-'.join(map(str, args.layers))}, {args.activation} hidden, "
                f"{args.output_activation} output"
            ),
        )
    if args.model.lstrip().startswith("{") or args.model.endswith(".json"):
        description, shape = load_description(args.model), None
    else:
        preset = get_preset(args.model)
        description, shape = preset.description(args.layers[-1]), preset.input_shape
    shape = tuple(args.input_shape or shape or (args.layers[0],))
    net = build_model(_with_dtype(description, str(dtype)), modules=args.imports)
    return net, shape, f"model {describe(net)['name']} ({args.model}), inputs {shape}"


def _with_dtype(description, dtype: str):
    # Every layer that takes a dtype gets --dtype (the description's own wins).
    import inspect

    from ..model import factory, layer_names

    out = dict(description)
    known = isinstance(out.get("name"), str) and out["name"] in layer_names()  # else: build says
    if known and "dtype" in inspect.signature(factory(out["name"])).parameters:
        out.setdefault("dtype", dtype)
    if "layers" in out:
        out["layers"] = [_with_dtype(d, dtype) for d in out["layers"]]
    return out


def random_problem(net, input_shape, loss, batch, seed, dtype):
    """A random input batch of ``input_shape`` examples and targets that suit ``loss``."""
    import jax

    from ..layers import output_shape

    kx, ky = jax.random.split(jax.random.key(seed + 1))
    x = jax.random.normal(kx, (batch, *input_shape), dtype)
    out_shape = output_shape(net, (batch, *input_shape))
    if loss == "softmax_cross_entropy":
        if out_shape[-1] < 2:
            raise ValueError(
                f"softmax_cross_entropy needs at least 2 outputs; the network has {out_shape[-1]}"
            )
        y = jax.random.randint(ky, out_shape[:-1], 0, out_shape[-1])
    elif loss == "sigmoid_binary_cross_entropy":
        y = jax.random.bernoulli(ky, 0.5, out_shape).astype(dtype)
    else:
        y = jax.random.normal(ky, out_shape, dtype)
    return x, y


def run(args) -> int:
    import jax

    if args.vjp is not None:  # a user's jax.custom_vjp instead of a network
        from .check_vjp import run_vjp

        return run_vjp(
            args.vjp,
            args.shapes,
            args.seed,
            eps=args.eps,
            dtype=args.dtype,
            format=args.format,
            static=args.static or (),
        )
    if args.shapes is not None:
        raise ValueError("--shapes needs --vjp MODULE:NAME (the function the shapes are for)")
    if args.static is not None:
        raise ValueError("--static needs --vjp MODULE:NAME (the function whose nondiff argument)")

    # float64 needs x64 switched on; float32 runs with it off so that nothing is promoted.
    with jax.enable_x64(args.dtype == "float64"):
        return _run(args)


def _three_ways(net, loss, eps):
    import jax

    from ..backprop import autodiff, backprop, loss_fn
    from ..gradcheck import check_grads, finite_difference_grads

    @jax.jit
    def three_ways(params, x, y):
        # check_grads decides; the three gradients themselves are for the per-entry table.
        # One compiled program: op-by-op dispatch of the same work is several times slower.
        result = check_grads(net, loss, params, x, y, eps=eps)
        grads = (
            backprop(net, loss, params, x, y)[1],
            autodiff(net, loss, params, x, y)[1],
            finite_difference_grads(lambda p: loss_fn(net, loss)(p, x, y), params, eps=eps),
        )
        return result, grads

    return three_ways


def _layer_label(net, path: str) -> str:
    children = net.children
    if not children or not path.startswith("[") or not path[1].isdigit():
        return net.name
    index = int(path[1 : path.index("]")])  # paths look like "[2]['W']"
    return f"{children[index].name} {index}"


def _leaf_rows(net, result, leaves_m) -> list[dict]:
    import numpy as np

    rows = []
    for index, path in enumerate(result.manual_vs_autodiff.paths):
        leaf = leaves_m[index]
        rows.append(
            {
                "parameter": path,
                "layer": _layer_label(net, path),
                "shape": list(np.shape(leaf)),
                "max_abs_manual": float(np.max(np.abs(leaf))) if np.size(leaf) else 0.0,
                "manual_vs_autodiff": float(result.manual_vs_autodiff.rel_error[index]),
                "manual_vs_fd": float(result.manual_vs_fd.rel_error[index]),
                "autodiff_vs_fd": float(result.autodiff_vs_fd.rel_error[index]),
                "ok": bool(
                    result.manual_vs_autodiff.leaf_ok[index]
                    and result.manual_vs_fd.leaf_ok[index]
                    and result.autodiff_vs_fd.leaf_ok[index]
                ),
            }
        )
    return rows


def _entry_rows(paths, leaves_m, leaves_a, leaves_f) -> list[dict]:
    import numpy as np

    rows = []
    for index, path in enumerate(paths):
        m, a, f = (
            np.asarray(leaves[index], np.float64) for leaves in (leaves_m, leaves_a, leaves_f)
        )
        for where in np.ndindex(m.shape):
            suffix = "[" + ",".join(map(str, where)) + "]" if where else ""
            rows.append(
                {
                    "parameter": path + suffix,
                    "manual": float(m[where]),
                    "jax_grad": float(a[where]),
                    "finite_diff": float(f[where]),
                }
            )
    return rows


def _run(args) -> int:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from ..model import describe

    dtype = jnp.dtype(args.dtype)
    net, input_shape, what = model_problem(args, dtype)
    _, params = net.init(jax.random.key(args.seed), (-1, *input_shape))
    x, y = random_problem(net, input_shape, args.loss, args.batch, args.seed, dtype)
    result, grads = _three_ways(net, args.loss, args.eps)(params, x, y)
    ok = result.ok
    leaves_m, leaves_a, leaves_f = (jax.tree_util.tree_leaves(g) for g in grads)
    total = sum(int(np.size(leaf)) for leaf in leaves_m)
    leaf_rows = _leaf_rows(net, result, leaves_m)
    entry_rows = (
        _entry_rows(result.manual_vs_autodiff.paths, leaves_m, leaves_a, leaves_f)
        if total <= args.entries
        else []
    )
    header = f"{what}, loss {args.loss}, batch {args.batch}, {args.dtype}, seed {args.seed}"
    verdict = (
        f"all {total} parameters agree: manual = jax.grad = finite differences"
        if ok
        else f"MISMATCH: worst leaf {result.manual_vs_autodiff.worst_path} (manual vs "
        f"jax.grad relative error {float(result.manual_vs_autodiff.worst_rel_error):.3e})"
    )
    culprit = None
    if not ok:
        from ..diagnose import locate

        culprit = locate(net, args.loss, params, x, y)
        if culprit is not None:
            verdict += f"\n{culprit}"
    if args.format == "json":
        print(
            json.dumps(
                {
                    "network": describe(net),
                    "dtype": args.dtype,
                    "loss": args.loss,
                    "batch": args.batch,
                    "seed": args.seed,
                    "ok": ok,
                    "parameters": total,
                    "leaves": leaf_rows,
                    "entries": entry_rows,
                    "culprit": None
                    if culprit is None
                    else {
                        "layer": culprit.path,
                        "leaf": culprit.leaf,
                        "looks_like": culprit.diagnosis,
                    },
                    "reports": {
                        name: getattr(result, name).to_dict() for name in result._fields[:3]
                    },
                    "input_reports": None
                    if result.inputs is None
                    else {
                        name: getattr(result.inputs, name).to_dict()
                        for name in result.inputs._fields[:3]
                    },
                },
                indent=2,
            )
        )
    else:
        _print_tables(header, leaf_rows, entry_rows, verdict, ok, args.dtype)
    return 0 if ok else 1


def _print_tables(header, leaf_rows, entry_rows, verdict, ok, dtype) -> None:
    from rich.table import Table

    out = tables.console()
    out.print(header, highlight=False)
    table = Table(
        title="relative error per parameter leaf: max|a - b| / max(|a|, |b|)", title_justify="left"
    )
    for name in (
        "parameter",
        "layer",
        "shape",
        "max |dE/dp|",
        "manual vs jax.grad",
        "manual vs finite diff",
        "jax.grad vs finite diff",
        "ok",
    ):
        table.add_column(name, justify="left" if name in ("parameter", "layer") else "right")
    for r in leaf_rows:
        table.add_row(
            r["parameter"],
            r["layer"],
            tables.shape_text(r["shape"]),
            f"{r['max_abs_manual']:.3e}",
            f"{r['manual_vs_autodiff']:.2e}",
            f"{r['manual_vs_fd']:.2e}",
            f"{r['autodiff_vs_fd']:.2e}",
            tables.ok_text(r["ok"]),
        )
    out.print(table)
    if entry_rows:
        entries = Table(title="every entry", title_justify="left")
        for name in (
            "parameter",
            "manual (chain rule)",
            "jax.grad",
            "finite difference",
            "|manual - jax.grad|",
            "|manual - finite diff|",
        ):
            entries.add_column(name, justify="left" if name == "parameter" else "right")
        for r in entry_rows:
            entries.add_row(
                r["parameter"],
                f"{r['manual']:+.10f}",
                f"{r['jax_grad']:+.10f}",
                f"{r['finite_diff']:+.10f}",
                f"{abs(r['manual'] - r['jax_grad']):.1e}",
                f"{abs(r['manual'] - r['finite_diff']):.1e}",
            )
        out.print(entries)
    tables.print_check_verdict(out, dtype, "manual vs jax.grad", ok, verdict)
