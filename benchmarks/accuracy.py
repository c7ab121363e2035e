"""``python -m benchmarks.accuracy``: the README's training table, over seeds.

Each row trains one preset on one dataset with ``jaxbp.training.train`` (exactly what
``jaxbp train --model NAME --dataset D --seed S`` does, every step checked against
``jax.grad`` unless ``--check off``) for each seed, and reports the mean test accuracy, its
spread (min-max and sample standard deviation), the parameter count, the worst gradient
disagreement and the wall time per seed. Results go to ``benchmarks/results/accuracy.json``.

    python -m benchmarks.accuracy                       # every row, seeds 0 1 2
    python -m benchmarks.accuracy --rows cnn,resnet --seeds 0 1 2 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

# (row name, preset, dataset)
ROWS = {
    "mlp-digits": ("mlp", "digits"),
    "cnn-digits": ("cnn", "digits"),
    "mlp-mnist1d": ("mlp", "mnist1d"),
    "cnn-mnist1d": ("cnn", "mnist1d"),
    "resnet-mnist1d": ("resnet", "mnist1d"),
    "gru-mnist1d": ("gru", "mnist1d"),
    "lstm-mnist1d": ("lstm", "mnist1d"),
}
RESULTS = Path(__file__).parent / "results" / "accuracy.json"


def run_row(preset: str, dataset: str, seeds, check: str) -> dict:
    """Train ``preset`` on ``dataset`` once per seed; the row's numbers."""
    from jaxbp.training import TrainConfig, train

    runs = []
    for seed in seeds:
        start = time.perf_counter()
        result = train(TrainConfig(model=preset, dataset=dataset, seed=seed, check=check))
        m = result.metrics
        runs.append(
            {
                "seed": seed,
                "test_accuracy": m["test_accuracy"],
                "seconds": time.perf_counter() - start,
                "num_params": m["num_params"],
                "max_grad_rel_error": m["max_grad_rel_error"],
                "status": m["status"],
            }
        )
        print(
            f"  {preset}/{dataset} seed {seed}: {100 * m['test_accuracy']:.2f}% in "
            f"{runs[-1]['seconds']:.1f} s",
            file=sys.stderr,
        )
    accs = [100 * r["test_accuracy"] for r in runs]
    return {
        "preset": preset,
        "dataset": dataset,
        "check": check,
        "seeds": list(seeds),
        "num_params": runs[0]["num_params"],
        "mean": statistics.mean(accs),
        "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
        "min": min(accs),
        "max": max(accs),
        "seconds_per_seed": statistics.mean(r["seconds"] for r in runs),
        "max_grad_rel_error": max((r["max_grad_rel_error"] or 0.0) for r in runs),
        "runs": runs,
    }


def table(rows) -> str:
    lines = [
        "| model | dataset | params | seeds | test accuracy (mean ± sd, min-max) | "
        "s/seed | worst grad rel. error |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['preset']} | {r['dataset']} | {r['num_params']:,} | "
            f"{','.join(map(str, r['seeds']))} | {r['mean']:.2f} ± {r['std']:.2f} "
            f"({r['min']:.2f}-{r['max']:.2f}) | {r['seconds_per_seed']:.0f} | "
            f"{r['max_grad_rel_error']:.1e} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.accuracy",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--rows",
        default=",".join(ROWS),
        help=f"comma-separated rows (default: all: {', '.join(ROWS)})",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--check", default="report", choices=("off", "report", "skip"))
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.rows.split(",") if n.strip()]
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        parser.error(f"unknown row(s) {', '.join(unknown)}; expected some of: {', '.join(ROWS)}")
    rows = [run_row(*ROWS[n], args.seeds, args.check) for n in names]
    print(table(rows))
    old = json.loads(args.out.read_text()) if args.out.exists() else {}
    old.update({n: r for n, r in zip(names, rows)})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(old, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
