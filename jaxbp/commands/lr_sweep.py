"""``jaxbp lr-sweep``: the seed's learning-rate section, made visible.

"Large learning rates lead to large updates, risking overshooting the optimal solution. Small
learning rates result in slow convergence." The same network, the same starting weights, trained
at several learning rates: one plot of the loss curves and a table of how each run ended.

All learning rates train at once: :func:`jaxbp.fit` (one compiled ``lax.scan``) is ``vmap``-ed
over the learning rate, passed to :func:`jaxbp.sgd` as a constant schedule so it can be traced.
"""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING, NamedTuple

from . import args as types

if TYPE_CHECKING:  # numpy is imported when a sweep runs, not when the CLI starts
    import numpy as np

# dataset -> (default learning rates, default steps, what is trained)
PROBLEMS = {
    "seed": (
        (0.05, 0.5, 5.0, 50.0, 500.0),
        200,
        "the seed's 2-2-2 sigmoid network, its weights and its one example, half_sse",
    ),
    "xor": (
        (0.1, 1.0, 10.0, 100.0),
        1000,
        "XOR: 2-3-1, tanh hidden, sigmoid output, half_sse, full batch of the 4 points",
    ),
}

VERDICTS = ("slow", "converges", "overshoots, then converges", "stuck higher", "diverges")


class SweepResult(NamedTuple):
    """``losses[r]``: the loss before each step of learning rate ``lrs[r]``, then after the last."""

    lrs: tuple
    losses: np.ndarray  # (len(lrs), steps + 1)
    description: str


# XOR's network, as a model description (--model replaces it).
XOR_MODEL = {
    "name": "serial",
    "layers": [
        {"name": "Dense", "out_dim": 3},
        {"name": "Tanh"},
        {"name": "Dense", "out_dim": 1},
        {"name": "Sigmoid"},
    ],
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dataset",
        choices=sorted(PROBLEMS),
        default="seed",
        help="seed: the seed's 2-2-2 example (default); xor: a 2-3-1 net on XOR",
    )
    parser.add_argument(
        "--lrs",
        type=types.numbers,
        metavar="LR,LR,...",
        help="learning rates (default: seed 0.05,0.5,5,50,500; xor 0.1,1,10,100)",
    )
    parser.add_argument(
        "--steps",
        type=types.positive_int,
        metavar="N",
        help="full-batch gradient-descent steps (default: seed 200, xor 1000)",
    )
    parser.add_argument(
        "--seed",
        type=types.seed,
        default=0,
        help="initialisation seed for xor (the seed problem has fixed weights)",
    )
    parser.add_argument(
        "--model",
        type=types.model,
        metavar="FILE.json",
        help="train this model description instead (JSON file or string; "
        "initialised from --seed; it must take 2 inputs)",
    )
    types.add_import_argument(parser)
    parser.add_argument(
        "--out",
        default=os.path.join("runs", "lr-sweep"),
        metavar="DIR",
        help="folder for lr_sweep.png and lr_sweep.json (default: runs/lr-sweep)",
    )
    parser.add_argument(
        "--plot",
        metavar="FILE.png",
        help="where to draw the loss curves (default: DIR/lr_sweep.png)",
    )
    parser.add_argument(
        "--format",
        choices=("text", "json"),
        default="text",
        help="the table as text (default) or JSON on stdout",
    )


def problem(dataset: str, seed: int = 0, model=None, modules=()):
    """``(net, loss, params, x, y)`` in float64 for ``"seed"`` or ``"xor"`` (call inside
    ``jax.enable_x64(True)``). ``model`` (a description, file or JSON string) replaces the
    network, initialised from ``seed``; without it the seed problem keeps its exact weights.
    ``modules``: where the model's references to code may point (``--import``)."""
    import jax
    import jax.numpy as jnp

    from ..model import build, load_description
    from ..seed import SEED_INPUTS, SEED_TARGETS, seed_problem

    if dataset not in PROBLEMS:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of: {', '.join(PROBLEMS)}")
    if dataset == "seed" and model is None:
        p = seed_problem(jnp.float64)
        return p.net, "half_sse", p.params, p.x, p.y
    if dataset == "seed":
        x, y = jnp.asarray(SEED_INPUTS, jnp.float64), jnp.asarray(SEED_TARGETS, jnp.float64)
    else:
        x = jnp.asarray([[0, 0], [0, 1], [1, 0], [1, 1]], jnp.float64)
        y = jnp.asarray([[0], [1], [1], [0]], jnp.float64)
    net = build(load_description(XOR_MODEL if model is None else model), modules=modules)
    _, params = net.init(jax.random.key(seed), (-1, 2))
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), params)
    return net, "half_sse", params, x, y


def sweep(
    dataset: str = "seed",
    lrs=None,
    steps: int | None = None,
    seed: int = 0,
    model=None,
    modules=(),
) -> SweepResult:
    """Train ``dataset``'s network from the same start at every learning rate in ``lrs``
    (float64, full batch, plain SGD; each run is :func:`jaxbp.fit`, vmapped over the rates)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from ..backprop import loss_fn
    from ..train import fit, init_train_state, sgd

    default_lrs, default_steps, description = PROBLEMS[dataset]
    if model is not None:
        description = f"{dataset} with the model {model if len(model) < 40 else 'given'}"
    lrs = tuple(float(v) for v in (lrs or default_lrs))
    steps = steps or default_steps
    with jax.enable_x64(True):
        net, loss, params, x, y = problem(dataset, seed, model, modules)

        def one(lr):
            # A schedule that ignores the step count: sgd takes it without float(), so the
            # learning rate can be a traced value and vmap runs every rate in one program.
            opt = sgd(lambda count: lr)
            result = fit(net, loss, opt, init_train_state(net, opt, params), x, y, steps=steps)
            return result.history.loss, loss_fn(net, loss)(result.state.params, x, y)

        history, final = jax.vmap(one)(jnp.asarray(lrs, jnp.float64))
        losses = np.concatenate([np.asarray(history), np.asarray(final)[:, None]], axis=1)
    return SweepResult(lrs, losses, description)


def verdict(curve) -> str:
    """How one loss curve (before each step, then after the last) behaved.

    ``diverges``: the loss is no longer finite; ``stuck higher``: it ends finite but no lower
    than it started (a step threw the units into saturation, where the gradients vanish, as
    the tutorial's rate 500 does); ``overshoots, then converges``: the loss rose at some step
    but ended lower; ``slow``: it fell every step but by less than 10x; ``converges``: it fell
    every step, by 10x or more.
    """
    import numpy as np

    curve = np.asarray(curve, np.float64)
    first, last = curve[0], curve[-1]
    if not np.isfinite(last):
        return "diverges"
    if last >= first:
        return "stuck higher"
    if np.any(np.diff(curve) > 0):
        return "overshoots, then converges"
    return "slow" if last > 0.1 * first else "converges"


def summary(result: SweepResult) -> list[dict]:
    """One row per learning rate: start, after one step, lowest, final, rises, verdict."""
    import numpy as np

    rows = []
    for lr, curve in zip(result.lrs, result.losses):
        rows.append(
            {
                "lr": lr,
                "start": float(curve[0]),
                "after_1_step": float(curve[1]),
                "lowest": float(np.nanmin(curve)),
                "final": float(curve[-1]),
                "steps_loss_rose": int(np.sum(np.diff(curve) > 0)),
                "verdict": verdict(curve),
            }
        )
    return rows


def run(args) -> int:
    from ..checkpoint import write_json
    from ..plots import check_plot_path, plot_loss_curves

    if args.plot:  # checked before the sweep runs (and before --out is created)
        check_plot_path(args.plot)
    plot_path = args.plot or os.path.join(args.out, "lr_sweep.png")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise ValueError(
            f"--out {args.out!r} is a file; expected a folder (it is created if missing)"
        )
    os.makedirs(args.out, exist_ok=True)
    result = sweep(args.dataset, args.lrs, args.steps, args.seed, args.model, args.imports)
    rows = summary(result)
    steps = result.losses.shape[1] - 1
    from ..seed import SEED_LEARNING_RATE

    def label(r):
        own = " (the seed's)" if args.dataset == "seed" and r["lr"] == SEED_LEARNING_RATE else ""
        return f"lr {r['lr']:g}{own}: {r['verdict']}"

    plot_loss_curves(
        {label(r): curve for r, curve in zip(rows, result.losses)},
        plot_path,
        title=f"{result.description}\nplain gradient descent, {steps} steps, same starting weights",
        ylabel="loss (log scale)",
    )
    record = {
        "dataset": args.dataset,
        "description": result.description,
        "steps": steps,
        "runs": [{**r, "losses": curve.tolist()} for r, curve in zip(rows, result.losses)],
    }
    json_path = os.path.join(args.out, "lr_sweep.json")
    write_json(json_path, record, indent=1, allow_nan=True)  # diverged runs: NaN
    if args.format == "json":
        import json

        print(
            json.dumps(
                {"dataset": args.dataset, "steps": steps, "runs": rows, "plot": plot_path}, indent=2
            )
        )
    else:
        _print_table(args.dataset, result.description, steps, rows)
        print(f"loss curves: {plot_path}\nevery loss value: {json_path}")
    return 0


def _print_table(dataset, description, steps, rows) -> None:
    from rich.console import JustifyMethod
    from rich.table import Table

    from .tables import console

    table = Table(
        title=f"lr-sweep on {dataset}: {description}, {steps} steps", title_justify="left"
    )
    columns: list[tuple[str, JustifyMethod]] = [
        ("lr", "right"),
        ("loss at start", "right"),
        ("after 1 step", "right"),
        ("lowest", "right"),
        ("final", "right"),
        ("steps loss rose", "right"),
        ("verdict", "left"),
    ]
    for name, justify in columns:
        table.add_column(name, justify=justify)
    style = {
        "diverges": "red",
        "stuck higher": "red",
        "overshoots, then converges": "yellow",
        "slow": "cyan",
        "converges": "green",
    }
    for r in rows:
        table.add_row(
            f"{r['lr']:g}",
            f"{r['start']:.4g}",
            f"{r['after_1_step']:.4g}",
            f"{r['lowest']:.4g}",
            f"{r['final']:.4g}",
            str(r["steps_loss_rose"]),
            f"[{style[r['verdict']]}]{r['verdict']}[/]",
        )
    console().print(table)
