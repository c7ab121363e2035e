"""``jaxbp check``: three opinions on every gradient of a network given by flags.

The manual chain rule (each layer's hand-written ``backward``), ``jax.grad`` of the same loss,
and central finite differences, on a random batch: a table per parameter leaf (and per entry
for small networks), compared with :func:`jaxbp.check_grads`. Exit code 0 when all three agree,
1 when they do not.
"""

from __future__ import annotations

import argparse
import json
import sys

DTYPES = ("float64", "float32")


def _widths(text: str) -> tuple:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected layer widths such as 2,3,2 (inputs, hidden..., outputs), got "
            f"{text!r}") from None
    if len(values) < 2 or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(
            f"expected at least two positive widths such as 2,3,2 (inputs, hidden..., "
            f"outputs), got {text!r}")
    return values


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text!r}")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer seed, got {text!r}") from None
    if not 0 <= value < 2**32:  # as jaxbp train; a huge int would overflow jax.random.key
        raise argparse.ArgumentTypeError(f"expected a seed in [0, 2**32), got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..layers import ACTIVATIONS
    from ..losses import LOSSES

    parser.add_argument("--layers", type=_widths, default=(2, 3, 2), metavar="W0,W1,...",
                        help="widths: inputs, hidden layers, outputs (default: 2,3,2)")
    parser.add_argument("--activation", choices=sorted(ACTIVATIONS), default="tanh",
                        help="activation after every hidden layer (default: tanh)")
    parser.add_argument("--output-activation", choices=sorted(ACTIVATIONS), default="identity",
                        help="activation after the last layer (default: identity)")
    parser.add_argument("--loss", choices=sorted(LOSSES), default="mse",
                        help="loss (default: mse)")
    parser.add_argument("--batch", type=_positive_int, default=4, metavar="N",
                        help="examples in the random batch (default: 4)")
    parser.add_argument("--seed", type=_seed, default=0, help="random seed (default: 0)")
    parser.add_argument("--dtype", choices=DTYPES, default="float64",
                        help="precision of params and data (default: float64)")
    parser.add_argument("--shared-bias", action="store_true",
                        help="one bias per layer, as in the seed tutorial")
    parser.add_argument("--eps", type=_positive_float,
                        help="finite-difference step (default: 1e-5 in float64, 1e-2 in float32)")
    parser.add_argument("--entries", type=int, default=40, metavar="N",
                        help="list every parameter entry when the network has at most N "
                             "(default: 40; 0 never)")
    parser.add_argument("--format", choices=("text", "json"), default="text",
                        help="text tables (default) or JSON")


def build(widths, activation, output_activation, shared_bias=False, dtype=None):
    """``serial(Dense, act, ..., Dense, output_act)`` for ``widths = (inputs, ..., outputs)``."""
    from ..layers import Dense, activation as act, serial

    layers = []
    for index, width in enumerate(widths[1:]):
        last = index == len(widths) - 2
        layers += [Dense(width, shared_bias=shared_bias, dtype=dtype),
                   act(output_activation if last else activation)]
    return serial(*layers)


def random_problem(widths, loss, batch, seed, dtype):
    """A random input batch and targets that suit ``loss``."""
    import jax

    kx, ky = jax.random.split(jax.random.key(seed + 1))
    x = jax.random.normal(kx, (batch, widths[0]), dtype)
    out = widths[-1]
    if loss == "softmax_cross_entropy":
        y = jax.random.randint(ky, (batch,), 0, out)
    elif loss == "sigmoid_binary_cross_entropy":
        y = jax.random.bernoulli(ky, 0.5, (batch, out)).astype(dtype)
    else:
        y = jax.random.normal(ky, (batch, out), dtype)
    return x, y


def run(args) -> int:
    import jax

    # float64 needs x64 switched on; float32 runs with it off so that nothing is promoted.
    with jax.enable_x64(args.dtype == "float64"):
        return _run(args)


def _run(args) -> int:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from ..backprop import autodiff, backprop, loss_fn
    from ..gradcheck import check_grads, finite_difference_grads
    from ..layers import describe

    dtype = jnp.dtype(args.dtype)
    if args.loss == "softmax_cross_entropy" and args.layers[-1] < 2:
        raise ValueError("softmax_cross_entropy needs at least 2 outputs; got --layers "
                         f"{','.join(map(str, args.layers))} (1 output)")
    net = build(args.layers, args.activation, args.output_activation, args.shared_bias, dtype)
    _, params = net.init(jax.random.key(args.seed), (-1, args.layers[0]))
    x, y = random_problem(args.layers, args.loss, args.batch, args.seed, dtype)

    @jax.jit
    def three_ways(params, x, y):
        # check_grads decides; the three gradients themselves are for the per-entry table.
        # One compiled program: op-by-op dispatch of the same work is several times slower.
        result = check_grads(net, args.loss, params, x, y, eps=args.eps)
        grads = (backprop(net, args.loss, params, x, y)[1],
                 autodiff(net, args.loss, params, x, y)[1],
                 finite_difference_grads(lambda p: loss_fn(net, args.loss)(p, x, y), params,
                                         eps=args.eps))
        return result, grads

    result, grads = three_ways(params, x, y)
    ok = result.ok
    leaves_m, leaves_a, leaves_f = (jax.tree_util.tree_leaves(g) for g in grads)
    paths = result.manual_vs_autodiff.paths
    layer_names = [layer.name for layer in net.config]
    total = sum(int(np.size(leaf)) for leaf in leaves_m)

    leaf_rows = []
    for index, path in enumerate(paths):
        layer = int(path[1:path.index("]")])  # paths look like "[2]['W']"
        leaf_rows.append({
            "parameter": path,
            "layer": f"{layer_names[layer]} {layer}",
            "shape": list(np.shape(leaves_m[index])),
            "max_abs_manual": float(np.max(np.abs(leaves_m[index]))) if np.size(leaves_m[index]) else 0.0,
            "manual_vs_autodiff": float(result.manual_vs_autodiff.rel_error[index]),
            "manual_vs_fd": float(result.manual_vs_fd.rel_error[index]),
            "autodiff_vs_fd": float(result.autodiff_vs_fd.rel_error[index]),
            "ok": bool(result.manual_vs_autodiff.leaf_ok[index]
                       and result.manual_vs_fd.leaf_ok[index]
                       and result.autodiff_vs_fd.leaf_ok[index]),
        })
    entry_rows = []
    if total <= args.entries:
        for index, path in enumerate(paths):
            m, a, f = (np.asarray(leaves[index], np.float64)
                       for leaves in (leaves_m, leaves_a, leaves_f))
            for where in np.ndindex(m.shape):
                suffix = "[" + ",".join(map(str, where)) + "]" if where else ""
                entry_rows.append({"parameter": path + suffix, "manual": float(m[where]),
                                   "jax_grad": float(a[where]), "finite_diff": float(f[where])})

    header = (f"network {'-'.join(map(str, args.layers))}, {args.activation} hidden, "
              f"{args.output_activation} output, loss {args.loss}, batch {args.batch}, "
              f"{args.dtype}, seed {args.seed}")
    verdict = (f"all {total} parameters agree: manual = jax.grad = finite differences"
               if ok else
               f"MISMATCH: worst leaf {result.manual_vs_autodiff.worst_path} (manual vs "
               f"jax.grad relative error {float(result.manual_vs_autodiff.worst_rel_error):.3e})")
    if args.format == "json":
        print(json.dumps({
            "network": describe(net), "dtype": args.dtype, "loss": args.loss,
            "batch": args.batch, "seed": args.seed, "ok": ok, "parameters": total,
            "leaves": leaf_rows, "entries": entry_rows,
            "reports": {name: getattr(result, name).to_dict() for name in result._fields},
        }, indent=2))
    else:
        _print_tables(header, leaf_rows, entry_rows, verdict, ok, args.dtype)
    return 0 if ok else 1


def _print_tables(header, leaf_rows, entry_rows, verdict, ok, dtype) -> None:
    from rich.console import Console
    from rich.table import Table

    from ..gradcheck import default_tolerance, fd_tolerance

    console = Console(file=sys.stdout, width=None if sys.stdout.isatty() else 110)
    console.print(header, highlight=False)
    table = Table(title="relative error per parameter leaf: max|a - b| / max(|a|, |b|)",
                  title_justify="left")
    for name in ("parameter", "layer", "shape", "max |dE/dp|", "manual vs jax.grad",
                 "manual vs finite diff", "jax.grad vs finite diff", "ok"):
        table.add_column(name, justify="left" if name in ("parameter", "layer") else "right")
    for r in leaf_rows:
        table.add_row(r["parameter"], r["layer"], "x".join(map(str, r["shape"])) or "scalar",
                      f"{r['max_abs_manual']:.3e}", f"{r['manual_vs_autodiff']:.2e}",
                      f"{r['manual_vs_fd']:.2e}", f"{r['autodiff_vs_fd']:.2e}",
                      "[green]yes[/]" if r["ok"] else "[red bold]NO[/]")
    console.print(table)
    if entry_rows:
        entries = Table(title="every entry", title_justify="left")
        for name in ("parameter", "manual (chain rule)", "jax.grad", "finite difference",
                     "|manual - jax.grad|", "|manual - finite diff|"):
            entries.add_column(name, justify="left" if name == "parameter" else "right")
        for r in entry_rows:
            entries.add_row(r["parameter"], f"{r['manual']:+.10f}", f"{r['jax_grad']:+.10f}",
                            f"{r['finite_diff']:+.10f}", f"{abs(r['manual'] - r['jax_grad']):.1e}",
                            f"{abs(r['manual'] - r['finite_diff']):.1e}")
        console.print(entries)
    rtol, _ = default_tolerance(dtype)
    fd_rtol, _ = fd_tolerance(dtype)
    console.print(f"tolerances ({dtype}): manual vs jax.grad {rtol:g}, against finite "
                  f"differences {fd_rtol:g}", highlight=False)
    console.print(("[green]" if ok else "[red bold]") + verdict + "[/]", highlight=False)
