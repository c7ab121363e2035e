"""``jaxbp train``: a network on real data, every step checked against jax.grad.

With no flags: scikit-learn's handwritten digits (no download), the digits MLP preset,
``--check report``. ``--model NAME|FILE.json`` trains a preset (:mod:`jaxbp.presets`) or any
model description; ``--hidden``/``--activation`` shape the default MLP. Every flag left out
takes the preset's (dataset's) default, or with ``--resume``, the value the checkpoint's run
used. The library does the work (:mod:`jaxbp.training`); this command adds the progress
display and Ctrl-C, through ``run``'s ``on_epoch`` callback.

Exit codes: 0 done; 2 a bad flag, bad data or an unusable checkpoint (one line); 3 the run was
stopped by a fault (too many non-finite steps, or a gradient disagreement with
``--check raise``); 130 Ctrl-C (after writing a checkpoint).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
import threading

from . import args as types

EXIT_FAULT = 3
EXIT_INTERRUPTED = 130
_hidden = types.widths(1, "128,128")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # Choices are listed here rather than imported, so `jaxbp train --help` stays light; a test
    # checks they match the library's tables.
    _add_model_arguments(parser)
    _add_optimization_arguments(parser)
    _add_run_arguments(parser)


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """What is trained: the data, the model, the loss."""
    parser.add_argument(
        "--dataset",
        choices=("xor", "seed", "digits", "iris", "breast_cancer", "mnist1d", "text"),
        help="what to train on (default: digits; text: a character-level GPT)",
    )
    parser.add_argument(
        "--text",
        metavar="FILE",
        help="with --dataset text: a UTF-8 file to train on (default: the "
        "pydoc_data.topics reference text every Python ships)",
    )
    parser.add_argument(
        "--model",
        type=types.model,
        metavar="NAME|FILE.json",
        help="a preset: mlp (the dataset's MLP, the default), cnn, resnet, gru, lstm, gpt, "
        "llama; or a JSON model description (see jaxbp.model and docs/training.md)",
    )
    types.add_import_argument(parser)
    parser.add_argument(
        "--hidden", type=_hidden, metavar="W,W,...", help="hidden-layer widths, e.g. 128,128"
    )
    parser.add_argument(
        "--activation",
        choices=("gelu", "identity", "leaky_relu", "relu", "sigmoid", "softplus", "tanh"),
        help="activation after each hidden layer",
    )
    parser.add_argument(
        "--output-activation",
        choices=("auto", "gelu", "identity", "leaky_relu", "relu", "sigmoid", "softplus", "tanh"),
        help="after the last layer (auto: none, except sigmoid for a sigmoid "
        "network on a squared error, as in the seed tutorial)",
    )
    parser.add_argument(
        "--loss",
        choices=("half_sse", "mse", "sigmoid_binary_cross_entropy", "softmax_cross_entropy"),
        help="the loss (default: the dataset's or the preset's own: softmax_cross_entropy "
        "for classes, half_sse for the seed)",
    )


def _add_optimization_arguments(parser: argparse.ArgumentParser) -> None:
    """How it is trained: optimizer, schedule, batches, seed, the gradient check, the rule."""
    parser.add_argument(
        "--optimizer",
        choices=("sgd", "momentum", "adam"),
        help="sgd: jaxbp.sgd; momentum: optax.sgd(lr, momentum=0.9); "
        "adam: optax.adam (adamw with --weight-decay)",
    )
    parser.add_argument(
        "--lr", type=types.positive_number, metavar="LR", help="(peak) learning rate"
    )
    parser.add_argument(
        "--schedule",
        choices=("constant", "cosine", "warmup_cosine"),
        help="learning-rate schedule over the run",
    )
    parser.add_argument(
        "--weight-decay",
        type=types.nonnegative_number,
        metavar="WD",
        help="weight decay of every parameter but the biases named 'b': decoupled (adamw) "
        "with adam, added to the gradient with sgd and momentum",
    )
    parser.add_argument(
        "--epochs",
        type=types.positive_int,
        metavar="N",
        help="passes over the training set (default: the dataset's or the preset's own)",
    )
    parser.add_argument(
        "--batch-size",
        type=types.positive_int,
        metavar="N",
        help="examples per step (default: the dataset's or the preset's own)",
    )
    parser.add_argument(
        "--seed",
        type=types.seed,
        metavar="N",
        help="initialisation and data-order seed (default 0)",
    )
    parser.add_argument(
        "--check",
        choices=("off", "report", "skip", "raise"),
        help="compare each step's manual gradients with jax.grad: off, report "
        "(default), skip disagreeing updates, or raise",
    )
    parser.add_argument(
        "--probe",
        type=types.positive_int,
        metavar="K",
        help="probe K layers per step with the per-layer adjoint test (cheap), the full check "
        "at step 0, every --full-every steps and after a failed probe (default: the full "
        "check every step)",
    )
    parser.add_argument(
        "--full-every",
        type=types.positive_int,
        metavar="M",
        help="with --probe: steps between full checks (default 100)",
    )
    parser.add_argument(
        "--check-every",
        type=types.positive_int,
        metavar="N",
        help="the full check every N-th step only, nothing between",
    )
    parser.add_argument(
        "--rule",
        choices=("bp", "fa", "kp", "sign", "dfa"),
        help="learning rule: bp (backprop, the default), fa (feedback "
        "alignment), kp (Kolen-Pollack), sign (sign symmetry), dfa (direct "
        "feedback alignment); the angle of each layer's update to jax.grad "
        "goes to metrics.json and alignment.png (see jaxbp.rules)",
    )


def _add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """Where the run is written, resumed, stopped, spread and shown."""
    parser.add_argument(
        "--out",
        metavar="DIR",
        help="folder for checkpoint.npz, metrics.json, curves.png (default: runs/<dataset>)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue from DIR's checkpoint (flags left out: as that run)",
    )
    parser.add_argument(
        "--max-bad-steps",
        type=types.positive_int,
        default=10,
        metavar="N",
        help="stop after N non-finite (skipped) steps (default 10)",
    )
    parser.add_argument(
        "--checkpoint-every",
        type=types.positive_int,
        metavar="EPOCHS",
        help="epochs between checkpoints (default: about 20 per run)",
    )
    parser.add_argument(
        "--devices",
        type=types.positive_int,
        default=1,
        metavar="N",
        help="data parallel over N devices: each batch split across them, "
        "params replicated (default 1; see docs/scaling.md)",
    )
    parser.add_argument(
        "--shard-params",
        action="store_true",
        help="with --devices N: split params and optimizer state over the N devices "
        "(each holds about 1/N) instead of replicating them",
    )
    parser.add_argument(
        "--progress",
        choices=("auto", "bar", "lines", "none"),
        default="auto",
        help="progress display (auto: a bar on a terminal, lines otherwise)",
    )


def run(args) -> int:
    from ..gradcheck import GradientMismatchError
    from ..training import TrainConfig, finish, prepare
    from ..training import run as run_training
    from ..training.model import dataset_name
    from ..training.progress import Progress

    config = TrainConfig(
        dataset=args.dataset,
        model=args.model,
        hidden=args.hidden,
        activation=args.activation,
        output_activation=args.output_activation,
        loss=args.loss,
        optimizer=args.optimizer,
        lr=args.lr,
        schedule=args.schedule,
        weight_decay=args.weight_decay,
        epochs=args.epochs,
        batch_size=args.batch_size,
        seed=args.seed,
        check=args.check,
        probe=args.probe or 0,
        full_every=args.full_every,
        check_every=args.check_every,
        resume=args.resume,
        max_bad_steps=args.max_bad_steps,
        checkpoint_every=args.checkpoint_every,
        devices=args.devices,
        shard_params=args.shard_params,
        text=args.text,
        rule=getattr(args, "rule", None),
        imports=tuple(args.imports),
    )
    # runs/<the data set trained on>: `--model gpt` alone goes to runs/text.
    out = args.out or os.path.join("runs", dataset_name(config))
    session = prepare(dataclasses.replace(config, out=out))
    assert session.cfg.epochs is not None  # resolve_config filled it
    bar = Progress(args.progress, session.cfg.epochs, session.epoch, session.dataset.name)
    # Notes warn (an old run about to be replaced, a mode changed): --progress none hides the
    # bar, not them.
    for note in session.notes:
        print(f"note: {note}", file=bar.stream if bar.mode != "none" else sys.stderr)
    try:
        with SigintFlag() as sigint:

            def on_epoch(row: dict) -> bool:  # a true return stops the run: Ctrl-C was pressed
                bar.update(row)
                return sigint.set

            status, message = run_training(session, on_epoch=on_epoch)
    except GradientMismatchError as e:
        print(f"jaxbp train: stopped: {' '.join(str(e).split())}", file=sys.stderr)
        return EXIT_FAULT
    except KeyboardInterrupt:  # a second Ctrl-C: the checkpoint on disk is the previous one
        print(
            f"jaxbp train: interrupted; the last complete checkpoint is in {out}", file=sys.stderr
        )
        return EXIT_INTERRUPTED
    finally:
        bar.close()
    result = finish(session, status, message)
    if status == "interrupted":
        print(f"jaxbp train: {message}", file=sys.stderr)
        return EXIT_INTERRUPTED
    if status == "nonfinite":
        print(f"jaxbp train: stopped: {message}", file=sys.stderr)
        return EXIT_FAULT
    _print_summary(result, out)
    return 0


def _print_summary(result, out: str) -> None:
    from ..training.model import model_label
    from ..training.progress import format_value

    m, cfg = result.metrics, result.config

    def pct(v):
        return "-" if v is None else f"{100 * v:.2f}%"

    err = m["max_grad_rel_error"]
    check = (
        "gradient check off"
        if cfg.check == "off"
        else f"manual vs jax.grad: worst relative error {err:.2e} ({m['worst_grad_leaf']})"
        if err is not None
        else "manual vs jax.grad: no finite step to compare"
    )
    model = model_label(cfg, m["preset"])
    print(
        f"{m['dataset']}: {model}, {cfg.optimizer} lr {cfg.lr:g}, {m['epochs']} epochs, "
        f"{m['steps']} steps in {m['seconds']:.1f}s"
    )
    if m["dataset"] == "text":  # a sequence model: the loss per character is the measure
        print(
            f"validation loss {m['test_loss']:.4f} nats per character (the whole validation "
            f"split)  train loss {m['final_loss']:.4f}  validation next-character accuracy "
            f"{pct(m['test_accuracy'])}"
        )
    elif m["test_accuracy"] is not None:
        print(
            f"test accuracy {pct(m['test_accuracy'])}  train accuracy "
            f"{pct(m['train_accuracy'])}  final loss {m['final_loss']:.4g}"
        )
    else:
        print(f"final loss {m['final_loss']:.4g}  test loss {m['test_loss']:.4g}")
    if m["skipped_nonfinite"] + m["skipped_mismatch"]:
        check += (
            f"; {m['skipped_nonfinite']} non-finite and {m['skipped_mismatch']} "
            f"disagreeing steps skipped"
        )
    print(check)
    if m.get("alignment"):
        print(
            f"{m['rule']}: angle to jax.grad by layer "
            + ", ".join(
                f"{layer} {format_value(a['angle'], '.1f')} deg"
                for layer, a in m["alignment"].items()
            )
        )
    print(f"wrote {out}/" + ", ".join(f.name for f in result.files))


# --------------------------------------------------------------------------------------------
# Ctrl-C: the command's side of run()'s on_epoch callback (the display is the library's
# jaxbp.training.progress.Progress)
# --------------------------------------------------------------------------------------------


class SigintFlag:
    """First Ctrl-C sets a flag read between epochs; the second raises KeyboardInterrupt."""

    def __init__(self):
        self.set = False
        self.previous = None
        self.active = threading.current_thread() is threading.main_thread()

    def __enter__(self):
        if self.active:
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.set:
            raise KeyboardInterrupt
        self.set = True

    def __exit__(self, *exc):
        if self.active:
            signal.signal(signal.SIGINT, self.previous)
        return False
