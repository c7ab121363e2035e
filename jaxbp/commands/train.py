"""``jaxbp train``: a fully connected network on real data, every step checked against jax.grad.

With no flags: scikit-learn's handwritten digits (no download), the digits defaults of
:data:`jaxbp.data.DATASET_DEFAULTS`, ``--check report``. Every flag left out takes the
dataset's default (or, with ``--resume``, the value the checkpoint's run used).

Exit codes: 0 done; 2 a bad flag, bad data or an unusable checkpoint (one line); 3 the run was
stopped by a fault (too many non-finite steps, or a gradient disagreement with
``--check raise``); 130 Ctrl-C (after writing a checkpoint).
"""

from __future__ import annotations

import argparse
import math
import os
import sys

EXIT_FAULT = 3
EXIT_INTERRUPTED = 130


def _hidden(text: str) -> tuple:
    parts = [p.strip() for p in text.split(",")]
    try:
        widths = tuple(int(p) for p in parts)
    except ValueError:
        widths = ()
    if not widths or any(w < 1 for w in widths):
        raise argparse.ArgumentTypeError(
            f"expected comma-separated positive layer widths such as 128,128, got {text!r}")
    return widths


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer seed, got {text!r}") from None
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"expected a seed in [0, 2**32), got {text!r}")
    return value


def _number(positive: bool):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value) or (value <= 0 if positive else value < 0):
            need = "a positive finite number" if positive else "a finite number >= 0"
            raise argparse.ArgumentTypeError(f"expected {need}, got {text!r}")
        return value
    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # Choices are listed here rather than imported, so `jaxbp train --help` stays light; a test
    # checks they match the library's tables.
    parser.add_argument("--dataset", choices=("xor", "seed", "digits", "iris", "breast_cancer",
                                              "mnist1d"),
                        help="what to train on (default: digits)")
    parser.add_argument("--hidden", type=_hidden, metavar="W,W,...",
                        help="hidden-layer widths, e.g. 128,128")
    parser.add_argument("--activation", choices=("gelu", "identity", "leaky_relu", "relu",
                                                 "sigmoid", "softplus", "tanh"),
                        help="activation after each hidden layer")
    parser.add_argument("--output-activation", choices=("auto", "gelu", "identity",
                                                        "leaky_relu", "relu", "sigmoid",
                                                        "softplus", "tanh"),
                        help="after the last layer (auto: none, except sigmoid for a sigmoid "
                             "network on a squared error, as in the seed tutorial)")
    parser.add_argument("--loss", choices=("half_sse", "mse", "sigmoid_binary_cross_entropy",
                                           "softmax_cross_entropy"))
    parser.add_argument("--optimizer", choices=("sgd", "momentum", "adam"),
                        help="sgd: jaxbp.sgd; momentum: optax.sgd(lr, momentum=0.9); "
                             "adam: optax.adam (adamw with --weight-decay)")
    parser.add_argument("--lr", type=_number(True), metavar="LR", help="(peak) learning rate")
    parser.add_argument("--schedule", choices=("constant", "cosine", "warmup_cosine"),
                        help="learning-rate schedule over the run")
    parser.add_argument("--weight-decay", type=_number(False), metavar="WD",
                        help="decoupled weight decay of the weights (not the biases)")
    parser.add_argument("--epochs", type=_positive_int, metavar="N")
    parser.add_argument("--batch-size", type=_positive_int, metavar="N")
    parser.add_argument("--seed", type=_seed, metavar="N",
                        help="initialisation and data-order seed (default 0)")
    parser.add_argument("--check", choices=("off", "report", "skip", "raise"),
                        help="compare each step's manual gradients with jax.grad: off, report "
                             "(default), skip disagreeing updates, or raise")
    parser.add_argument("--out", metavar="DIR",
                        help="folder for checkpoint.npz, metrics.json, curves.png "
                             "(default: runs/<dataset>)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from DIR's checkpoint (flags left out: as that run)")
    parser.add_argument("--max-bad-steps", type=_positive_int, default=10, metavar="N",
                        help="stop after N non-finite (skipped) steps (default 10)")
    parser.add_argument("--checkpoint-every", type=_positive_int, metavar="EPOCHS",
                        help="epochs between checkpoints (default: about 20 per run)")
    parser.add_argument("--devices", type=_positive_int, default=1, metavar="N",
                        help="data parallel over N devices: each batch split across them, "
                             "params replicated (default 1; see docs/scaling.md)")
    parser.add_argument("--progress", choices=("auto", "bar", "lines", "none"), default="auto",
                        help="progress display (auto: a bar on a terminal, lines otherwise)")


def run(args) -> int:
    from ..gradcheck import GradientMismatchError
    from ..trainer import TrainConfig, train

    dataset = args.dataset
    out = args.out or os.path.join("runs", dataset or "digits")
    config = TrainConfig(
        dataset=dataset, hidden=args.hidden, activation=args.activation,
        output_activation=args.output_activation, loss=args.loss, optimizer=args.optimizer,
        lr=args.lr, schedule=args.schedule, weight_decay=args.weight_decay,
        epochs=args.epochs, batch_size=args.batch_size, seed=args.seed, check=args.check,
        out=out, resume=args.resume, max_bad_steps=args.max_bad_steps,
        checkpoint_every=args.checkpoint_every, devices=args.devices)
    try:
        result = train(config, progress=args.progress)
    except GradientMismatchError as e:
        print(f"jaxbp train: stopped: {' '.join(str(e).split())}", file=sys.stderr)
        return EXIT_FAULT
    except KeyboardInterrupt:  # a second Ctrl-C: the checkpoint on disk is the previous one
        print(f"jaxbp train: interrupted; the last complete checkpoint is in {out}",
              file=sys.stderr)
        return EXIT_INTERRUPTED

    m = result.metrics
    cfg = result.config
    if result.status == "interrupted":
        print(f"jaxbp train: {result.message}", file=sys.stderr)
        return EXIT_INTERRUPTED
    if result.status == "nonfinite":
        print(f"jaxbp train: stopped: {result.message}", file=sys.stderr)
        return EXIT_FAULT

    def pct(v):
        return "-" if v is None else f"{100 * v:.2f}%"

    err = m["max_grad_rel_error"]
    check = ("gradient check off" if cfg.check == "off" else
             f"manual vs jax.grad: worst relative error {err:.2e} ({m['worst_grad_leaf']})"
             if err is not None else "manual vs jax.grad: no finite step to compare")
    print(f"{m['dataset']}: {'-'.join(map(str, cfg.hidden))} {cfg.activation}, "
          f"{cfg.optimizer} lr {cfg.lr:g}, {m['epochs']} epochs, {m['steps']} steps "
          f"in {m['seconds']:.1f}s")
    if m["test_accuracy"] is not None:
        print(f"test accuracy {pct(m['test_accuracy'])}  train accuracy "
              f"{pct(m['train_accuracy'])}  final loss {m['final_loss']:.4g}")
    else:
        print(f"final loss {m['final_loss']:.4g}  test loss {m['test_loss']:.4g}")
    skipped = m["skipped_nonfinite"] + m["skipped_mismatch"]
    if skipped:
        check += (f"; {m['skipped_nonfinite']} non-finite and {m['skipped_mismatch']} "
                  f"disagreeing steps skipped")
    print(check)
    print(f"wrote {out}/metrics.json, curves.png, checkpoint.npz")
    return 0
