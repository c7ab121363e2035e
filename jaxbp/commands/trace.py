"""``jaxbp trace``: the worked example, every number of the chain rule.

With no arguments: the seed tutorial's 2-2-2 example in its own notation, then where the
seed's stated numbers are wrong. With ``--config FILE.json``: any small fully connected network
(format in :mod:`jaxbp.trace.config`). With ``--example conv|attention|gru`` or ``--model
FILE.json``: one Conv1D, one attention head or a GRU unrolled through time (format in
:mod:`jaxbp.trace.layer_traces`). ``--format html`` writes any of them as one interactive page
(:mod:`jaxbp.trace.html`); ``--out FILE`` writes to a file instead of standard output.
"""

from __future__ import annotations

import argparse
import os
import sys

from ..trace import FORMATS
from . import args as types


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = (
        'Config format (JSON): {"inputs": [0.1, 0.05], "targets": [0.02, 0.98], '
        '"layers": [{"weights": [[0.25, 0.2], [0.5, 0.15]], "bias": 0.3, '
        '"activation": "sigmoid"}, ...], "loss": "half_sse", "learning_rate": 0.5}. '
        "weights[i][j] joins input i to neuron j; bias is one shared number or one per neuron; "
        "inputs/targets are one example or a list of examples."
    )
    parser.add_argument(
        "--config",
        metavar="FILE.json",
        help="the network to trace (default: the seed tutorial's 2-2-2 example)",
    )
    parser.add_argument(
        "--example",
        choices=("conv", "attention", "gru", "tied", "llama"),
        help="a built-in layer example: a Conv1D (5 inputs, kernel 3, stride 2), "
        "one causal attention head (3 tokens of dimension 2), a GRU "
        "(3 steps of one input, hidden 2: backpropagation through time), a tied "
        "autoencoder (one matrix used twice: its gradient is the sum of both uses') or a "
        "Llama block (3 tokens, width 4, 2 heads sharing 1 key/value head: RMSNorm, rope, "
        "SwiGLU, the tied embedding)",
    )
    parser.add_argument(
        "--model",
        metavar="FILE.json",
        help="one layer to trace (Conv1D, MultiHeadAttention, GRU, tied) with its "
        "numbers: "
        '{"model": {"name": "Conv1D", ...}, "params": {...}, '
        '"inputs": [...], "targets": [...]}',
    )
    # The traced kinds are jaxbp's own; --import is here as on every command that reads a model
    # file (a module's registrations run first; the file itself never imports anything).
    types.add_import_argument(parser)
    parser.add_argument(
        "--steps",
        type=types.positive_int,
        metavar="N",
        help="train N full-batch steps; report the loss after each and the last weights",
    )
    parser.add_argument(
        "--freeze-bias", action="store_true", help="update weights only, as the seed's code does"
    )
    parser.add_argument(
        "--format",
        choices=(*FORMATS, "html"),
        default="text",
        help="output format (default: text); html: one self-contained interactive page "
        "(the picture, a step-through of the chain rule, jax.grad beside it)",
    )
    parser.add_argument(
        "--out",
        metavar="FILE",
        help="write the trace to FILE instead of standard output (its folder must exist)",
    )
    parser.add_argument(
        "--plot",
        metavar="FILE.png",
        help="also draw the network with its weights, activations and gradients",
    )


def _layer_trace(args):
    """The traced layer of ``--example`` / ``--model``; flags of the network trace are errors."""
    from ..trace.layer_traces import trace_example, trace_file

    chosen = [
        flag
        for flag, value in (
            ("--config", args.config),
            ("--steps", args.steps),
            ("--freeze-bias", args.freeze_bias),
            ("--example", args.example),
            ("--model", args.model),
        )
        if value
    ]
    if len(chosen) > 1:
        raise ValueError(
            f"{chosen[0]} and {chosen[1]} cannot be combined; --example and "
            f"--model trace one layer, --config/--steps/--freeze-bias a network"
        )
    return trace_example(args.example) if args.example else trace_file(args.model)


def _check_out(args) -> None:
    """Fail before the work, not after it: --out's folder must exist; html is a page of its
    own, not a companion of --plot's picture."""
    if args.format == "html" and args.plot:
        raise ValueError(
            "--plot cannot be combined with --format html; the page draws the network itself "
            "(use --plot with --format text, markdown or json)"
        )
    if args.out:
        folder = os.path.dirname(os.path.abspath(args.out))
        if not os.path.isdir(folder):
            raise ValueError(f"--out {args.out}: folder {folder} does not exist; create it first")
        if os.path.isdir(args.out):
            raise ValueError(f"--out {args.out} is a folder; expected a file name")


def _rendered(traced, fmt: str) -> str:
    if fmt == "html":
        from ..trace.html import trace_html

        return trace_html(traced)
    return traced.render(fmt) + ("\n" if fmt == "json" else "")


def _write(args, make_trace, plot) -> int:
    """Print ``make_trace()`` (a network's or a layer's trace) in ``--format`` (to ``--out``
    when given); with ``--plot``, ``plot(trace, path)`` draws it and names what it drew. The
    paths are checked first."""
    _check_out(args)
    if args.plot:
        from ..plots import check_plot_path

        check_plot_path(args.plot)
    traced = make_trace()
    text = _rendered(traced, args.format)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as file:
            file.write(text)
        print(f"{args.format} trace written to {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    if args.plot:
        drawn = plot(traced, args.plot)
        print(f"{drawn} diagram written to {args.plot}", file=sys.stderr)
    return 0


def _plot_layer(traced, path) -> str:
    from ..plots_layers import plot_layer_trace

    plot_layer_trace(traced, path)
    return traced.kind


def _plot_network(result, path) -> str:
    from ..plots import plot_network

    plot_network(result, path)
    return "network"


def run(args) -> int:
    from ..trace import load_config, seed_config, trace

    if args.example or args.model:
        return _write(args, lambda: _layer_trace(args), _plot_layer)
    config = load_config(args.config) if args.config else seed_config()
    network_trace = lambda: trace(config, steps=args.steps, freeze_bias=args.freeze_bias)
    return _write(args, network_trace, _plot_network)
