"""The training loop behind ``jaxbp train``, as a library function.

::

    result = jaxbp.trainer.train(TrainConfig(dataset="digits", out="runs/digits"))
    result.metrics["test_accuracy"]

:func:`train` builds a fully connected network (``hidden`` widths, one ``activation``), an
optimizer, and runs the verified step of :func:`jaxbp.make_train_step` (manual gradients,
compared with ``jax.grad`` on every step unless ``check="off"``, non-finite updates refused)
epoch after epoch. Each epoch is *one* compiled call: a ``lax.scan`` over its minibatches, with
the data on device and the per-step metrics coming back stacked, followed by an evaluation of
the train and test sets; Python only runs between epochs (progress, checkpoints, Ctrl-C).

Determinism. The initial params come from ``key(seed)``; the order of the examples in epoch
``e`` is ``jax.random.permutation(fold_in(data_key, e), n)``, a pure function of ``(seed, e)``.
A run resumed from a checkpoint written after epoch ``e`` therefore sees exactly the batches
the uninterrupted run saw, goes through the same compiled epoch function, and ends with
bit-identical params.

Faults. A step whose loss, gradients or update are not finite is not applied and is counted;
after ``max_bad_steps`` of them the run stops (``status="nonfinite"``) without writing a new
checkpoint, so the last good checkpoint stays on disk. ``check="raise"`` stops at the first
gradient disagreement with :class:`jaxbp.GradientMismatchError`. Ctrl-C (SIGINT) finishes the
current epoch, writes a checkpoint and returns ``status="interrupted"``; a second Ctrl-C
interrupts at once (the checkpoint on disk is still the previous, complete one).

Files written into ``out``: ``checkpoint.npz`` (see :mod:`jaxbp.checkpoint`), ``metrics.json``
and ``curves.png``. See docs/training.md.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from .checkpoint import load_checkpoint, read_header, save_checkpoint
from .gradcheck import GradientMismatchError
from .layers import Dense, activation as activation_layer, describe, serial, ACTIVATIONS
from .losses import LOSSES, get_loss
from .train import (
    CHECK_MODES,
    REASON_MISMATCH,
    REASON_NONFINITE,
    _raw_step,
    _select,
    biases,
    sgd,
)

__all__ = [
    "TrainConfig",
    "TrainResult",
    "OPTIMIZERS",
    "SCHEDULES",
    "CHECKPOINT_FILE",
    "METRICS_FILE",
    "CURVES_FILE",
    "resolve_config",
    "build_network",
    "build_optimizer",
    "build_epoch_fn",
    "train",
]

OPTIMIZERS = ("sgd", "momentum", "adam")
SCHEDULES = ("constant", "cosine", "warmup_cosine")
OUTPUT_ACTIVATIONS = ("auto", *sorted(ACTIVATIONS))
CHECKPOINT_FILE = "checkpoint.npz"
METRICS_FILE = "metrics.json"
CURVES_FILE = "curves.png"

# Used where neither the caller nor the dataset's defaults say otherwise.
_FALLBACK = dict(dataset="digits", hidden=(64,), activation="relu", output_activation="auto",
                 loss="softmax_cross_entropy", optimizer="adam", lr=1e-3, schedule="constant",
                 weight_decay=0.0, epochs=20, batch_size=32, seed=0, check="report")

# Config fields that decide what is computed: a resumed run must agree with its checkpoint on
# these (``epochs`` may grow when the learning rate does not depend on it).
_IDENTITY_FIELDS = ("dataset", "hidden", "activation", "output_activation", "loss", "optimizer",
                    "lr", "schedule", "weight_decay", "batch_size", "seed", "check")
_WARMUP_FRACTION = 0.05


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """What to train and how. ``None`` means "the dataset's default" (``Dataset.defaults``),
    or with ``resume``, "whatever the checkpoint's run used".

    - ``dataset``: a name of :data:`jaxbp.data.DATASETS` (or pass a ``Dataset`` to
      :func:`train`).
    - ``hidden``: hidden-layer widths, e.g. ``(128, 128)``; ``activation`` after each.
    - ``output_activation``: ``"auto"`` (none, i.e. logits, except a sigmoid output for a
      sigmoid network trained on a squared error: the seed tutorial's network) or a name.
    - ``loss``: a name of :data:`jaxbp.LOSSES`. Non-softmax losses on a classification
      dataset regress one-hot targets.
    - ``optimizer``: ``"sgd"`` (:func:`jaxbp.sgd`), ``"momentum"`` (``optax.sgd(lr, 0.9)``) or
      ``"adam"`` (``optax.adam``; ``optax.adamw`` with ``weight_decay``).
    - ``schedule``: ``"constant"``, ``"cosine"`` (decay to 0 over the run) or
      ``"warmup_cosine"`` (linear warm-up over the first 5% of steps, then cosine).
    - ``weight_decay``: decoupled decay of the weights (biases are not decayed).
    - ``check``: ``"off"``, ``"report"``, ``"skip"`` or ``"raise"`` (:mod:`jaxbp.train`).
    - ``out``: folder for checkpoint, metrics and curves (``None``: write nothing).
    - ``resume``: continue from ``out``'s checkpoint (start afresh if there is none).
    - ``max_bad_steps``: stop after this many non-finite (skipped) steps.
    - ``checkpoint_every``: epochs between checkpoints (default: about 20 per run, plus the
      last epoch).
    - ``devices``: number of devices for data parallelism (1: no sharding).
    - ``jit``: ``False`` runs the same epoch function op by op (slow; for debugging).
    """

    dataset: str | None = None
    hidden: tuple[int, ...] | None = None
    activation: str | None = None
    output_activation: str | None = None
    loss: str | None = None
    optimizer: str | None = None
    lr: float | None = None
    schedule: str | None = None
    weight_decay: float | None = None
    epochs: int | None = None
    batch_size: int | None = None
    seed: int | None = None
    check: str | None = None
    out: str | None = None
    resume: bool = False
    max_bad_steps: int = 10
    checkpoint_every: int | None = None
    devices: int = 1
    jit: bool = True


class TrainResult(NamedTuple):
    """What :func:`train` returns.

    ``status``: ``"completed"``, ``"nonfinite"`` (stopped after ``max_bad_steps`` non-finite
    steps) or ``"interrupted"`` (Ctrl-C; a checkpoint was written). ``metrics`` is what
    ``metrics.json`` holds; ``history`` one dict per epoch.
    """

    params: Any
    opt_state: Any
    net: Any
    config: TrainConfig
    metrics: dict
    history: list
    status: str
    checkpoint: Path | None
    message: str


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _positive_int(name, v, minimum=1):
    if not _is_int(v) or v < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {v!r}")
    return int(v)


def _choice(name, v, options):
    if v not in options:
        raise ValueError(f"unknown {name} {v!r}; expected one of: {', '.join(options)}")
    return v


def _validate(cfg: TrainConfig) -> TrainConfig:
    """Check every field of a resolved config; return it with canonical types."""
    hidden = cfg.hidden
    if isinstance(hidden, (str, bytes)) or not isinstance(hidden, (tuple, list)):
        raise ValueError(f"hidden must be a sequence of positive integers, got {hidden!r}")
    if not all(_is_int(h) and h >= 1 for h in hidden):
        raise ValueError(f"hidden layer widths must be positive integers, got {list(hidden)}")
    _choice("activation", cfg.activation, sorted(ACTIVATIONS))
    _choice("output activation", cfg.output_activation, OUTPUT_ACTIVATIONS)
    _choice("loss", cfg.loss, sorted(LOSSES))
    _choice("optimizer", cfg.optimizer, OPTIMIZERS)
    _choice("schedule", cfg.schedule, SCHEDULES)
    _choice("check mode", cfg.check, CHECK_MODES)
    for name in ("lr", "weight_decay"):
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)):
            raise ValueError(f"{name} must be a number, got {v!r}")
        if not math.isfinite(float(v)) or (float(v) <= 0 if name == "lr" else float(v) < 0):
            need = "a positive finite number" if name == "lr" else "a finite number >= 0"
            raise ValueError(f"{name} must be {need}, got {v!r}")
    _positive_int("epochs", cfg.epochs)
    _positive_int("batch_size", cfg.batch_size)
    if not _is_int(cfg.seed) or not 0 <= cfg.seed < 2**32:
        raise ValueError(f"seed must be an integer in [0, 2**32), got {cfg.seed!r}")
    _positive_int("max_bad_steps", cfg.max_bad_steps)
    _positive_int("checkpoint_every", cfg.checkpoint_every)
    _positive_int("devices", cfg.devices)
    return dataclasses.replace(cfg, hidden=tuple(int(h) for h in hidden), lr=float(cfg.lr),
                               weight_decay=float(cfg.weight_decay), epochs=int(cfg.epochs),
                               batch_size=int(cfg.batch_size), seed=int(cfg.seed))


def resolve_config(config: TrainConfig, defaults: dict | None = None,
                   saved: dict | None = None) -> TrainConfig:
    """Fill every ``None`` of ``config``: from ``saved`` (a checkpoint's config, on resume),
    then the dataset's ``defaults``, then built-in fallbacks; then validate.

    On resume, a field set explicitly that contradicts the checkpoint is an error naming it.
    """
    values = {}
    for f in dataclasses.fields(TrainConfig):
        v = getattr(config, f.name)
        if v is None and saved is not None and f.name in saved and f.name != "checkpoint_every":
            v = saved[f.name]
            if f.name == "hidden":
                v = tuple(v)
        if v is None and defaults is not None and f.name in defaults:
            v = defaults[f.name]
        if v is None and f.name in _FALLBACK:
            v = _FALLBACK[f.name]
        values[f.name] = v
    if values["checkpoint_every"] is None and _is_int(values["epochs"]):
        values["checkpoint_every"] = max(1, int(values["epochs"]) // 20)
    cfg = _validate(TrainConfig(**values))
    if saved is not None:
        for name in _IDENTITY_FIELDS:
            want = saved.get(name)
            want = tuple(want) if name == "hidden" and want is not None else want
            if want is not None and getattr(cfg, name) != want:
                raise ValueError(
                    f"--resume: {name} is {_show(getattr(cfg, name))} but the checkpoint's run "
                    f"used {_show(want)}; drop the flag to continue that run, or choose "
                    f"another --out for a new one")
        if cfg.epochs != saved.get("epochs") and cfg.schedule != "constant":
            raise ValueError(f"--resume: epochs is {cfg.epochs} but the checkpoint's run used "
                             f"{saved.get('epochs')}, and its {cfg.schedule} learning-rate "
                             f"schedule depends on the number of epochs")
    return cfg


def _show(v):
    return ",".join(map(str, v)) if isinstance(v, tuple) else repr(v)


def _config_dict(cfg: TrainConfig) -> dict:
    d = dataclasses.asdict(cfg)
    d["hidden"] = list(cfg.hidden)
    return d


# --------------------------------------------------------------------------------------------
# Network, optimizer, data
# --------------------------------------------------------------------------------------------


def _output_activation(cfg: TrainConfig) -> str | None:
    if cfg.output_activation != "auto":
        return None if cfg.output_activation == "identity" else cfg.output_activation
    if cfg.activation == "sigmoid" and cfg.loss in ("half_sse", "mse"):
        return "sigmoid"  # the seed tutorial's all-sigmoid network
    return None


def build_network(cfg: TrainConfig, num_outputs: int, dtype=jnp.float32):
    """``Dense(h) -> activation`` for each hidden width, then ``Dense(num_outputs)`` (and the
    output activation, if any)."""
    layers = []
    for width in cfg.hidden:
        layers += [Dense(width, dtype=dtype), activation_layer(cfg.activation)]
    layers.append(Dense(num_outputs, dtype=dtype))
    out_act = _output_activation(cfg)
    if out_act is not None:
        layers.append(activation_layer(out_act))
    return serial(*layers)


def _learning_rate(cfg: TrainConfig, total_steps: int):
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "cosine":
        return optax.cosine_decay_schedule(cfg.lr, total_steps)
    warmup = max(1, int(round(_WARMUP_FRACTION * total_steps)))
    return optax.warmup_cosine_decay_schedule(0.0, cfg.lr, warmup, max(total_steps, warmup + 1))


def _weights_mask(params):
    return jax.tree_util.tree_map(lambda is_bias: not is_bias, biases(params))


def build_optimizer(cfg: TrainConfig, total_steps: int) -> optax.GradientTransformation:
    """The optimizer named by ``cfg.optimizer`` with ``cfg``'s schedule and weight decay."""
    lr = _learning_rate(cfg, total_steps)
    if cfg.optimizer == "adam":
        if cfg.weight_decay:
            return optax.adamw(lr, weight_decay=cfg.weight_decay, mask=_weights_mask)
        return optax.adam(lr)
    base = sgd(lr) if cfg.optimizer == "sgd" else optax.sgd(lr, momentum=0.9)
    if cfg.weight_decay:
        return optax.chain(optax.add_decayed_weights(cfg.weight_decay, mask=_weights_mask), base)
    return base


def _load_data(cfg: TrainConfig, dataset):
    if dataset is None:
        from .data import load_dataset

        dataset = load_dataset(cfg.dataset or _FALLBACK["dataset"], seed=0)
    for field in ("x_train", "y_train", "x_test", "y_test", "task", "num_classes"):
        if not hasattr(dataset, field):
            raise TypeError(f"dataset must look like jaxbp.data.Dataset (missing {field!r}), "
                            f"got {type(dataset).__name__}")
    return dataset


def _targets(dataset, loss_name: str):
    """Device arrays ``(x_train, t_train, y_train, x_test, t_test, y_test)``: ``t`` are the
    loss's targets, ``y`` the labels accuracy is measured against (``None`` for regression)."""
    x_tr = np.asarray(dataset.x_train, np.float32)
    x_te = np.asarray(dataset.x_test, np.float32)
    for name, x in (("x_train", x_tr), ("x_test", x_te)):
        if x.ndim != 2 or x.shape[0] == 0:
            raise ValueError(f"dataset {name} must have shape (examples, features) with at "
                             f"least one example, got {x.shape}")
    if dataset.task == "classification":
        c = int(dataset.num_classes)
        y_tr = np.asarray(dataset.y_train).astype(np.int32)
        y_te = np.asarray(dataset.y_test).astype(np.int32)
        for name, y, x in (("y_train", y_tr, x_tr), ("y_test", y_te, x_te)):
            if y.shape != (x.shape[0],):
                raise ValueError(f"dataset {name} must hold one label per example, shape "
                                 f"({x.shape[0]},), got {y.shape}")
            if y.size and (y.min() < 0 or y.max() >= c):
                raise ValueError(f"dataset {name} has labels outside [0, {c})")
        if loss_name == "softmax_cross_entropy":
            t_tr, t_te = y_tr, y_te
        else:  # squared errors and sigmoid cross-entropy regress one-hot targets
            t_tr = np.eye(c, dtype=np.float32)[y_tr]
            t_te = np.eye(c, dtype=np.float32)[y_te]
        num_outputs = c
    else:
        if loss_name == "softmax_cross_entropy":
            raise ValueError(f"loss softmax_cross_entropy needs a classification dataset; "
                             f"{dataset.name!r} is a regression task (use half_sse or mse)")
        t_tr = np.asarray(dataset.y_train, np.float32)
        t_te = np.asarray(dataset.y_test, np.float32)
        y_tr = y_te = None
        num_outputs = int(t_tr.shape[1])
    return x_tr, t_tr, y_tr, x_te, t_te, y_te, num_outputs


# --------------------------------------------------------------------------------------------
# One compiled epoch
# --------------------------------------------------------------------------------------------


def _evaluate(net, loss, params, x, t, y):
    out = net.forward(params, x)[0]
    value = loss.value(out, t)
    if y is None:
        acc = jnp.array(jnp.nan, out.dtype)
    else:
        acc = jnp.mean((jnp.argmax(out, axis=-1) == y).astype(out.dtype))
    return value, acc


def build_epoch_fn(net, loss, optimizer, cfg: TrainConfig, n_train: int) -> Callable:
    """The one place the training computation is built.

    Returns ``epoch_fn(params, opt_state, data_key, epoch, data) -> (params, opt_state,
    steps, evals)``, with ``data = (x_train, t_train, y_train, x_test, t_test, y_test)`` on
    device. It draws epoch ``epoch``'s order, ``permutation(fold_in(data_key, epoch), n)``,
    scans the verified step over its ``n // batch_size`` batches (the ragged tail is dropped;
    a different tail each epoch), and evaluates the train and test sets with the new params.
    ``steps`` holds per-step ``loss``, ``rel_error``, ``leaf_rel_error``, ``applied`` and
    ``reason`` stacked along the first axis; ``evals`` the four evaluation scalars.

    With ``check="raise"`` the inner step runs as ``"skip"`` and, after the first disagreement,
    the rest of the epoch leaves params and optimizer state alone, so the caller can raise at
    that step. Data parallelism (``cfg.devices > 1``) extends this function.
    """
    loss = get_loss(loss)
    inner = "skip" if cfg.check == "raise" else cfg.check
    raw = _raw_step(net, loss, optimizer, inner, None, None, True)
    bs = cfg.batch_size
    steps = n_train // bs
    stop_on_mismatch = cfg.check == "raise"
    mesh = None
    if cfg.devices != 1:  # data parallel: each batch split over a mesh (jaxbp.parallel)
        from . import parallel
        if not cfg.jit:
            raise ValueError(f"devices={cfg.devices} needs the compiled epoch (jit=True)")
        mesh = parallel.data_parallel_mesh(cfg.devices)
        parallel.check_batch_size(mesh, bs)

    def epoch_fn(params, opt_state, data_key, epoch, data):
        x_tr, t_tr, y_tr, x_te, t_te, y_te = data
        order = jax.random.permutation(jax.random.fold_in(data_key, epoch), n_train)
        batches = order[: steps * bs].reshape(steps, bs)

        def body(carry, idx):
            p, s, stopped = carry
            xb, tb = x_tr[idx], t_tr[idx]
            if mesh is not None:
                xb, tb = parallel.constrain_batch(mesh, xb, tb)
            new_p, new_s, m = raw(p, s, xb, tb)
            if stop_on_mismatch:
                new_p = _select(stopped, p, new_p)
                new_s = _select(stopped, s, new_s)
                stopped = stopped | (m["reason"] == REASON_MISMATCH)
            out = {"loss": m["loss"], "rel_error": m["rel_error"], "applied": m["applied"],
                   "reason": m["reason"]}
            if "report" in m:
                out["leaf_rel_error"] = m["report"].rel_error
            return (new_p, new_s, stopped), out

        (params, opt_state, _), history = jax.lax.scan(
            body, (params, opt_state, jnp.array(False)), batches)
        train_loss, train_acc = _evaluate(net, loss, params, x_tr, t_tr, y_tr)
        test_loss, test_acc = _evaluate(net, loss, params, x_te, t_te, y_te)
        return params, opt_state, history, (train_loss, train_acc, test_loss, test_acc)

    if mesh is not None:
        return parallel.jit_replicated(epoch_fn, mesh)
    return jax.jit(epoch_fn) if cfg.jit else _eager(epoch_fn)


def _eager(fn):
    """``fn`` run op by op: ``lax.scan`` becomes a Python loop, nothing is compiled whole."""
    def run(*args):
        with jax.disable_jit():
            return fn(*args)
    return run


# --------------------------------------------------------------------------------------------
# Progress display
# --------------------------------------------------------------------------------------------


def _fmt(v, spec=".4f"):
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


class _Progress:
    """A rich progress bar on a terminal; plain lines (about ten per run) otherwise."""

    def __init__(self, mode: str, total: int, start: int, title: str, stream=None):
        self.stream = stream or sys.stderr
        if mode == "auto":
            mode = "bar" if getattr(self.stream, "isatty", lambda: False)() else "lines"
        self.mode, self.total, self.title = mode, total, title
        self.every = max(1, total // 10)
        self.bar = None
        if mode == "bar":
            from rich.console import Console
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                       TimeElapsedColumn, TimeRemainingColumn)

            self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                                MofNCompleteColumn(), TextColumn("{task.fields[stats]}"),
                                TimeElapsedColumn(), TimeRemainingColumn(),
                                console=Console(file=self.stream), transient=False)
            self.task = self.bar.add_task(title, total=total, completed=start, stats="")
            self.bar.start()

    def update(self, row: dict):
        stats = (f"loss {_fmt(row['loss'])}  acc {_fmt(row['train_accuracy'], '.3f')}/"
                 f"{_fmt(row['test_accuracy'], '.3f')}  grad err "
                 f"{_fmt(row['max_grad_rel_error'], '.1e')}")
        if row["skipped_nonfinite"] or row["skipped_mismatch"]:
            stats += f"  skipped {row['skipped_nonfinite']}+{row['skipped_mismatch']}"
        if self.mode == "bar":
            self.bar.update(self.task, completed=row["epoch"], stats=stats)
        elif self.mode == "lines":
            e = row["epoch"]
            if e % self.every == 0 or e == self.total or row["skipped_nonfinite"]:
                print(f"{self.title} epoch {e}/{self.total}  {stats}", file=self.stream,
                      flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


# --------------------------------------------------------------------------------------------
# Ctrl-C
# --------------------------------------------------------------------------------------------


class _SigintFlag:
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


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


_CACHE: "collections.OrderedDict[tuple, Any]" = collections.OrderedDict()
_CACHE_SIZE = 32


def _cached(key: tuple, build: Callable):
    """``build()``, memoised on ``key`` (which names the builder, so a replaced builder misses).

    Networks and optimizers are immutable pairs of pure functions, so sharing them is safe;
    sharing them is what lets ``jax.jit`` find the epoch function it compiled before.
    """
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    value = _CACHE[key] = build()
    if len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return value


def _leaf_paths(params) -> list[str]:
    return [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def _nan_to_none(v):
    return None if v is None or (isinstance(v, float) and not math.isfinite(v)) else v


def _epoch_row(epoch, steps_host, evals, check) -> dict:
    loss = np.asarray(steps_host["loss"], np.float64)
    finite = loss[np.isfinite(loss)]
    reason = np.asarray(steps_host["reason"])
    rel = np.asarray(steps_host["rel_error"], np.float64)
    # A non-finite step has an infinite "relative error" that says nothing about the backward.
    checked = rel[(reason != REASON_NONFINITE) & ~np.isnan(rel)] if check != "off" else rel[:0]
    row = {
        "epoch": epoch,
        "loss": float(finite.mean()) if finite.size else float("nan"),
        "train_loss": float(evals[0]),
        "train_accuracy": float(evals[1]),
        "test_loss": float(evals[2]),
        "test_accuracy": float(evals[3]),
        "max_grad_rel_error": float(checked.max()) if checked.size else None,
        "steps": int(loss.size),
        "applied_steps": int(np.sum(np.asarray(steps_host["applied"]))),
        "skipped_nonfinite": int(np.sum(reason == REASON_NONFINITE)),
        "skipped_mismatch": int(np.sum(reason == REASON_MISMATCH)),
    }
    return row


def _json_row(row):
    return {k: (_nan_to_none(v) if isinstance(v, float) else v) for k, v in row.items()}


def _curves(history):
    keys = ("epoch", "train_loss", "test_loss", "train_accuracy", "test_accuracy",
            "max_grad_rel_error")
    return {k: [np.nan if r.get(k) is None else r[k] for r in history] for k in keys}


def _write_curves(history, path, title):
    try:
        from .plots import plot_training_curves
    except ImportError:  # plots.py not present: nothing to draw with
        return None
    series = _curves(history)
    if all(v is None or (isinstance(v, float) and math.isnan(v))
           for v in series["train_accuracy"]):
        series.pop("train_accuracy"), series.pop("test_accuracy")
    if all(isinstance(v, float) and math.isnan(v) for v in series["max_grad_rel_error"]):
        series.pop("max_grad_rel_error")
    return plot_training_curves(series, path, title=title)


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False, allow_nan=False)
        f.write("\n")
    os.replace(tmp, path)


def train(config: TrainConfig | None = None, dataset=None, *, progress: str = "none",
          stream=None) -> TrainResult:
    """Train as ``config`` says; see the module docstring and :class:`TrainConfig`.

    ``dataset``: a :class:`jaxbp.data.Dataset` (or any object with its fields) to train on
    instead of loading ``config.dataset``; its ``defaults`` fill the config's ``None`` fields.
    ``progress``: ``"auto"`` (a bar on a terminal, else plain lines), ``"bar"``, ``"lines"`` or
    ``"none"``; written to ``stream`` (default ``sys.stderr``).
    """
    t_start = time.perf_counter()
    config = config or TrainConfig()
    _choice("progress mode", progress, ("auto", "bar", "lines", "none"))
    out = Path(config.out) if config.out is not None else None
    if out is not None and out.exists() and not out.is_dir():
        raise ValueError(f"the output folder {str(out)!r} is a file; expected a folder "
                         f"(it is created if missing) to hold the checkpoint and results")
    ckpt_path = out / CHECKPOINT_FILE if out is not None else None

    saved_header = None
    notes = []
    if config.resume:
        if ckpt_path is None:
            raise ValueError("resume needs an output folder (--out) holding a checkpoint")
        if ckpt_path.exists():
            saved_header = read_header(ckpt_path)
        else:
            notes.append(f"no checkpoint in {out}; starting from scratch")
    elif ckpt_path is not None and ckpt_path.exists():
        notes.append(f"starting a new run in {out}: its old checkpoint will be replaced "
                     f"(--resume continues it instead)")
    saved_cfg = saved_header["config"] if saved_header else None

    if dataset is None:
        name = config.dataset or (saved_cfg or {}).get("dataset") or _FALLBACK["dataset"]
        config = dataclasses.replace(config, dataset=name)
        dataset = _load_data(config, None)
    else:
        dataset = _load_data(config, dataset)
        config = dataclasses.replace(config, dataset=config.dataset or dataset.name)
    cfg = resolve_config(config, getattr(dataset, "defaults", None), saved_cfg)

    x_tr, t_tr, y_tr, x_te, t_te, y_te, num_outputs = _targets(dataset, cfg.loss)
    n_train = x_tr.shape[0]
    if cfg.batch_size > n_train:
        raise ValueError(f"batch_size must be between 1 and the number of training examples "
                         f"({n_train}), got {cfg.batch_size}")
    steps_per_epoch = n_train // cfg.batch_size
    loss = get_loss(cfg.loss)
    # Same settings -> the same net, optimizer and compiled epoch function as last time, so a
    # second train() in one process (a sweep, a resume, a test) compiles nothing new.
    net = _cached((build_network, cfg.hidden, cfg.activation, cfg.output_activation, cfg.loss,
                   num_outputs), lambda: build_network(cfg, num_outputs))
    total_steps = cfg.epochs * steps_per_epoch
    optimizer = _cached(
        (build_optimizer, cfg.optimizer, cfg.lr, cfg.schedule, cfg.weight_decay,
         None if cfg.schedule == "constant" else total_steps),
        lambda: build_optimizer(cfg, total_steps))
    init_key, data_key = jax.random.split(jax.random.key(cfg.seed))
    _, params = net.init(init_key, (-1, x_tr.shape[1]))
    opt_state = optimizer.init(params)
    network = describe(net)
    paths = _leaf_paths(params)

    history: list[dict] = []
    epoch = 0
    seconds_before = 0.0
    if saved_header is not None:
        ckpt = load_checkpoint(ckpt_path, {"params": params, "opt_state": opt_state},
                               network=network)
        params = jax.tree_util.tree_map(jnp.asarray, ckpt.state["params"])
        opt_state = jax.tree_util.tree_map(jnp.asarray, ckpt.state["opt_state"])
        epoch = int(ckpt.header["epoch"])
        history = list(ckpt.header["history"])
        seconds_before = float(ckpt.header.get("seconds", 0.0))
        if epoch > cfg.epochs:
            raise ValueError(f"--resume: the checkpoint is at epoch {epoch}, past the "
                             f"requested {cfg.epochs} epochs")

    def to_device(a):
        return None if a is None else jnp.asarray(a)

    data = tuple(to_device(a) for a in (x_tr, t_tr, y_tr, x_te, t_te, y_te))
    epoch_fn = _cached((build_epoch_fn, net, loss, optimizer, cfg.check, cfg.batch_size,
                        n_train, cfg.jit, cfg.devices),
                       lambda: build_epoch_fn(net, loss, optimizer, cfg, n_train))

    def header(at_epoch, seconds):
        return {"network": network, "config": _config_dict(cfg), "epoch": at_epoch,
                "step": at_epoch * steps_per_epoch, "dataset": dataset.name,
                "rng": {"seed": cfg.seed, "init": "split(key(seed))[0]",
                        "data_order": "permutation(fold_in(split(key(seed))[1], epoch), n)"},
                "history": [_json_row(r) for r in history], "seconds": seconds}

    def checkpoint(at_epoch):
        if ckpt_path is None:
            return None
        return save_checkpoint(ckpt_path, {"params": params, "opt_state": opt_state},
                               header(at_epoch, seconds_before + time.perf_counter() - t_start))

    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        for stale in out.glob(f".{CHECKPOINT_FILE}.*.tmp"):  # left by a killed writer
            stale.unlink(missing_ok=True)

    status, message = "completed", ""
    last_saved = epoch
    bar = _Progress(progress, cfg.epochs, epoch, f"{dataset.name}", stream)
    for note in notes if bar.mode != "none" else ():
        print(f"note: {note}", file=bar.stream)
    try:
        with _SigintFlag() as sigint:
            if saved_header is None:
                checkpoint(0)  # from the first moment on, a last good state is on disk
            while epoch < cfg.epochs:
                new_params, new_state, steps_m, evals = epoch_fn(
                    params, opt_state, data_key, jnp.asarray(epoch, jnp.int32), data)
                steps_host, evals = jax.device_get((steps_m, evals))
                row = _epoch_row(epoch + 1, steps_host, evals, cfg.check)
                leaf_err = steps_host.get("leaf_rel_error")
                finite_steps = np.asarray(steps_host["reason"]) != REASON_NONFINITE
                if leaf_err is not None and np.any(finite_steps):
                    row["grad_rel_error_by_leaf"] = {
                        p: float(v)
                        for p, v in zip(paths, np.max(leaf_err[finite_steps], axis=0))}
                if cfg.check == "raise" and row["skipped_mismatch"]:
                    first = int(np.argmax(np.asarray(steps_host["reason"]) == REASON_MISMATCH))
                    worst = int(np.argmax(leaf_err[first]))
                    raise GradientMismatchError(
                        f"manual gradient disagrees with jax.grad at step "
                        f"{epoch * steps_per_epoch + first} (epoch {epoch + 1}): worst leaf "
                        f"{paths[worst]}, relative error {float(leaf_err[first, worst]):.3e}; "
                        f"that update was not applied and the checkpoint on disk is from epoch "
                        f"{last_saved}")
                params, opt_state = new_params, new_state
                history.append(row)
                epoch += 1
                bar.update(row)
                bad = sum(r["skipped_nonfinite"] for r in history)
                if bad >= cfg.max_bad_steps:
                    status = "nonfinite"
                    where = (f"; the last good checkpoint (epoch {last_saved}) is in "
                             f"{ckpt_path}" if ckpt_path else "")
                    message = (f"stopped after {bad} non-finite steps (limit "
                               f"--max-bad-steps {cfg.max_bad_steps}) at epoch {epoch}: the "
                               f"loss, a gradient or an update was NaN or inf (too large a "
                               f"learning rate, or bad data); none of those steps touched the "
                               f"parameters{where}")
                    break
                if sigint.set:
                    checkpoint(epoch)
                    last_saved = epoch
                    status = "interrupted"
                    message = (f"interrupted at epoch {epoch}/{cfg.epochs}" +
                               (f"; checkpoint saved to {ckpt_path}, continue with --resume"
                                if ckpt_path else ""))
                    break
                if epoch % cfg.checkpoint_every == 0 or epoch == cfg.epochs:
                    checkpoint(epoch)
                    last_saved = epoch
    finally:
        bar.close()

    seconds = seconds_before + time.perf_counter() - t_start
    metrics = _summary(cfg, dataset, network, history, params, status, seconds,
                       steps_per_epoch, ckpt_path)
    if out is not None:
        _write_json(out / METRICS_FILE, metrics)
        if history:
            _write_curves(history, out / CURVES_FILE,
                          f"{dataset.name}: {'-'.join(map(str, cfg.hidden))} {cfg.activation}, "
                          f"{cfg.optimizer} lr {cfg.lr:g}")
    return TrainResult(params, opt_state, net, cfg, metrics, history, status,
                       ckpt_path if ckpt_path is not None and ckpt_path.exists() else None,
                       message)


def _summary(cfg, dataset, network, history, params, status, seconds, steps_per_epoch,
             ckpt_path) -> dict:
    last = history[-1] if history else {}
    checked = [r["max_grad_rel_error"] for r in history if r.get("max_grad_rel_error") is not None]
    by_leaf: dict[str, float] = {}
    for r in history:
        for p, v in r.get("grad_rel_error_by_leaf", {}).items():
            by_leaf[p] = max(by_leaf.get(p, 0.0), v)
    worst_leaf = max(by_leaf, key=by_leaf.get) if by_leaf else None
    metrics = {
        "dataset": dataset.name,
        "status": status,
        "train_accuracy": last.get("train_accuracy"),
        "test_accuracy": last.get("test_accuracy"),
        "final_loss": last.get("train_loss"),
        "test_loss": last.get("test_loss"),
        "max_grad_rel_error": max(checked) if checked else None,
        "worst_grad_leaf": worst_leaf,
        "grad_rel_error_by_leaf": by_leaf,
        "steps": sum(r["steps"] for r in history),
        "applied_steps": sum(r["applied_steps"] for r in history),
        "skipped_nonfinite": sum(r["skipped_nonfinite"] for r in history),
        "skipped_mismatch": sum(r["skipped_mismatch"] for r in history),
        "epochs": len(history),
        "steps_per_epoch": steps_per_epoch,
        "seconds": seconds,
        "check": cfg.check,
        "config": _config_dict(cfg),
        "network": network,
        "num_params": int(sum(np.size(l) for l in jax.tree_util.tree_leaves(params))),
        "checkpoint": str(ckpt_path) if ckpt_path else None,
        "history": [{k: v for k, v in _json_row(r).items() if k != "grad_rel_error_by_leaf"}
                    for r in history],
    }
    return {k: (_nan_to_none(v) if isinstance(v, float) else v) for k, v in metrics.items()}
