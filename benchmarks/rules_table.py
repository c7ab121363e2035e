"""``python -m benchmarks.rules_table``: learning rules against backprop, over seeds.

Each cell trains the dataset's MLP preset with ``jaxbp.training.train`` (what ``jaxbp train
--dataset D --rule R --seed S --epochs E`` does; ``check="report"``, so every step measures
the rule's update against ``jax.grad``) and reports the mean test accuracy over the seeds and
the final epoch's angle to the gradient per layer (mean over seeds). Prints a Markdown table;
results go to ``benchmarks/results/rules.json``, angle plots (seed 0) to
``docs/img/rules_<dataset>.png``.

    python -m benchmarks.rules_table                        # every rule x dataset, seeds 0 1 2
    python -m benchmarks.rules_table --datasets digits --rules bp,fa --seeds 0
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

RULES = ("bp", "fa", "kp", "sign", "dfa")
# Shorter than the presets' own schedules (digits 60, mnist1d 150 epochs) to fit a CPU.
EPOCHS = {"digits": 20, "mnist1d": 30}
RESULTS = Path(__file__).parent / "results" / "rules.json"
IMAGES = Path(__file__).parent.parent / "docs" / "img"


def run_cell(dataset: str, rule: str, seeds, epochs: int) -> dict:
    from jaxbp.training import TrainConfig, train

    runs = []
    for seed in seeds:
        t0 = time.perf_counter()
        result = train(
            TrainConfig(dataset=dataset, rule=rule, seed=seed, epochs=epochs, check="report")
        )
        m = result.metrics
        runs.append(
            {
                "seed": seed,
                "test_accuracy": m["test_accuracy"],
                "train_accuracy": m["train_accuracy"],
                "alignment": m["alignment"],
                "history": m["history"],
                "seconds": time.perf_counter() - t0,
            }
        )
        print(
            f"{dataset} {rule} seed {seed}: test {m['test_accuracy']:.4f} "
            f"({runs[-1]['seconds']:.0f}s)",
            file=sys.stderr,
            flush=True,
        )
    return {"dataset": dataset, "rule": rule, "epochs": epochs, "runs": runs}


def _mean_angles(cell) -> dict:
    layers = cell["runs"][0]["alignment"] or {}
    return {
        layer: statistics.mean(r["alignment"][layer]["angle"] for r in cell["runs"])
        for layer in layers
    }


def table(cells) -> str:
    rows = [
        "| dataset (epochs) | rule | test accuracy, mean of seeds (min-max) | "
        "final angle to jax.grad per layer (degrees) |",
        "|---|---|---|---|",
    ]
    for cell in cells:
        acc = [r["test_accuracy"] for r in cell["runs"]]
        angles = _mean_angles(cell)
        shown = (
            ", ".join(f"{k} {v:.1f}" for k, v in angles.items())
            if angles
            else "0 (the gradient itself)"
        )
        rows.append(
            f"| {cell['dataset']} ({cell['epochs']}) | {cell['rule']} | "
            f"{100 * statistics.mean(acc):.2f}% ({100 * min(acc):.1f}-"
            f"{100 * max(acc):.1f}) | {shown} |"
        )
    return "\n".join(rows)


def plot(cells) -> None:
    from jaxbp.plots_rules import plot_rule_comparison

    for dataset in dict.fromkeys(c["dataset"] for c in cells):
        runs = {
            c["rule"]: c["runs"][0]["history"]
            for c in cells
            if c["dataset"] == dataset and c["rule"] != "bp"
        }
        if runs:
            IMAGES.mkdir(parents=True, exist_ok=True)
            plot_rule_comparison(
                runs,
                IMAGES / f"rules_{dataset}.png",
                title=f"{dataset}: angle of each hidden layer's update to "
                f"jax.grad (seed {cells[0]['runs'][0]['seed']})",
            )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="digits,mnist1d")
    parser.add_argument("--rules", default=",".join(RULES))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, help="override the per-dataset epochs")
    args = parser.parse_args(argv)
    cells = [
        run_cell(d, r, args.seeds, args.epochs or EPOCHS[d])
        for d in args.datasets.split(",")
        for r in args.rules.split(",")
    ]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(cells, indent=1))
    plot(cells)
    print(table(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
