"""A training run in three steps: :func:`prepare`, :func:`run`, :func:`finish`.

::

    session = prepare(TrainConfig(dataset="digits", out="runs/digits"))
    status, message = run(session, on_epoch=lambda row: False)   # True: stop after this epoch
    result = finish(session, status, message)                    # metrics.json, curves.png

:func:`train` does all three. Each epoch is one call of the loop of
:func:`jaxbp.train.make_loop` (a fused ``lax.scan`` over the epoch's batches, or one jitted
call per step for presets that ask for it) over the verified step :func:`jaxbp.train_step`,
then an evaluation of the train and test sets (``jaxbp.forward(..., train=False)``: BatchNorm's
running statistics, no dropout). Python runs only between epochs.

Determinism. The initial params come from ``split(key(seed))[0]``; epoch ``e``'s order is
``permutation(fold_in(split(key(seed))[1], e), n)``; Dropout's key lives in the
:class:`jaxbp.TrainState` (and in the checkpoint); augmentation draws from ``fold_in(aug_key,
step)``. A run resumed from a checkpoint written after epoch ``e`` therefore sees exactly the
batches the uninterrupted run saw, goes through the same compiled loop, and ends with
bit-identical params.

Faults. A step whose loss, gradients or update are not finite is not applied and is counted;
after ``max_bad_steps`` of them the run stops (``"nonfinite"``) without writing a new checkpoint.
``check="raise"`` stops at the first disagreement with :class:`jaxbp.GradientMismatchError`
(carrying the report and the step). ``on_epoch`` returning true (the command's Ctrl-C) writes
a checkpoint and stops (``"interrupted"``).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .. import rules
from ..checkpoint import (
    CheckpointError,
    read_header,
    restore_train_state,
    save_checkpoint,
    train_state_groups,
    write_json,
)
from ..errors import InputShapeError
from ..layers import Layer, output_shape
from ..model import ReferenceNotAllowedError, describe
from ..presets import Preset
from ..probe import layer_paths
from ..train import (
    REASON_MISMATCH,
    REASON_NONFINITE,
    TrainState,
    init_train_state,
    raise_first_mismatch,
)
from . import compiled
from .config import TrainConfig, config_dict, resolve_config
from .model import TrainData, choose_model, model_label, targets
from .progress import PROGRESS_MODES, Progress

__all__ = [
    "TrainResult",
    "Session",
    "prepare",
    "run",
    "finish",
    "train",
    "CHECKPOINT_FILE",
    "METRICS_FILE",
    "CURVES_FILE",
]

CHECKPOINT_FILE = "checkpoint.npz"
METRICS_FILE = "metrics.json"
CURVES_FILE = "curves.png"
ALIGNMENT_FILE = "alignment.png"


class TrainResult(NamedTuple):
    """What :func:`train` returns.

    ``status``: ``"completed"``, ``"nonfinite"`` (stopped after ``max_bad_steps`` non-finite
    steps) or ``"interrupted"`` (``on_epoch`` asked to stop; a checkpoint was written).
    ``metrics`` is what ``metrics.json`` holds; ``history`` one dict per epoch;
    ``train_state`` the final :class:`jaxbp.TrainState` (``params``/``opt_state`` are its);
    ``files`` what the run left in its output folder (the plots only where matplotlib is
    installed).
    """

    params: Any
    opt_state: Any
    net: Layer
    config: TrainConfig
    metrics: dict
    history: list
    status: str
    checkpoint: Path | None
    message: str
    train_state: TrainState | None = None
    files: tuple[Path, ...] = ()


@dataclasses.dataclass
class Session:
    """Everything :func:`prepare` decided, and the run's progress (``ts``, ``epoch``,
    ``history``), which :func:`run` advances."""

    cfg: TrainConfig
    dataset: Any
    preset: Preset
    description: dict
    net: Layer
    data: TrainData
    loop: Callable
    evaluate: Callable
    data_key: Any
    ts: TrainState
    out: Path | None
    epoch: int = 0
    history: list = dataclasses.field(default_factory=list)
    notes: list = dataclasses.field(default_factory=list)
    seconds_before: float = 0.0
    last_saved: int = 0
    resumed: bool = False
    t_start: float = dataclasses.field(default_factory=time.perf_counter)
    # The verification schedule's record: per node, how often it was probed; full checks;
    # and every failed step (step, node path, "probe" or "full").
    probed: Any = None
    full_checks: int = 0
    failures: list = dataclasses.field(default_factory=list)

    @property
    def checkpoint_path(self) -> Path | None:
        return None if self.out is None else self.out / CHECKPOINT_FILE

    @property
    def steps_per_epoch(self) -> int:
        batch_size = self.cfg.batch_size
        assert batch_size is not None  # resolve_config filled it
        return self.data.n_train // batch_size

    def seconds(self) -> float:
        return self.seconds_before + time.perf_counter() - self.t_start


# --------------------------------------------------------------------------------------------
# prepare
# --------------------------------------------------------------------------------------------


def _output_folder(config: TrainConfig) -> tuple[Path | None, dict | None, list]:
    """The output folder, the checkpoint header to resume from (or None), and notes."""
    out = Path(config.out) if config.out is not None else None
    if out is not None and out.exists() and not out.is_dir():
        raise ValueError(
            f"the output folder {str(out)!r} is a file; expected a folder "
            f"(it is created if missing) to hold the checkpoint and results"
        )
    ckpt = None if out is None else out / CHECKPOINT_FILE
    if config.resume and ckpt is None:
        raise ValueError("resume needs an output folder (--out) holding a checkpoint")
    if config.resume and ckpt is not None and ckpt.exists():
        return out, read_header(ckpt), []
    if config.resume:
        return out, None, [f"no checkpoint in {out}; starting from scratch"]
    if ckpt is not None and ckpt.exists():
        return (
            out,
            None,
            [
                f"starting a new run in {out}: its old checkpoint will be replaced "
                f"(--resume continues it instead)"
            ],
        )
    return out, None, []


def _network(description: dict, from_checkpoint: Path | None, modules: tuple) -> Layer:
    try:
        return compiled.network(description, modules)
    except ReferenceNotAllowedError as e:
        if from_checkpoint is None:
            raise
        raise CheckpointError(f"checkpoint {from_checkpoint}: {e}") from None
    except (ValueError, TypeError) as e:
        if from_checkpoint is None:
            raise
        raise CheckpointError(
            f"checkpoint {from_checkpoint} describes a network this jaxbp "
            f"cannot build ({e}); it was probably written by an older "
            f"jaxbp: start a new run with another --out"
        ) from None


def _check_output(net: Layer, data: TrainData, description_source: str) -> None:
    examples = tuple(data.x_train.shape[1:])
    try:
        shape = output_shape(net, (-1, *examples))
    except InputShapeError as e:
        if len(examples) != 1 or data.context:
            raise
        # Flat examples into a layer that wants more axes (a convolution): the model file
        # says how to reshape them, and a user who has not met "input_shape" cannot guess it.
        raise InputShapeError(
            f"{e}; the dataset's examples are flat vectors of {examples[0]} numbers: add "
            f'"input_shape" to the model file, {{"model": {{...}}, "input_shape": '
            f"[{examples[0]}, 1]}} for a sequence of {examples[0]} positions with one channel "
            f"(the product must be {examples[0]})"
        ) from None
    want = (data.context, data.num_outputs) if data.context else (data.num_outputs,)
    if tuple(shape[1:]) != want:
        raise ValueError(
            f"{description_source} produces outputs of shape {tuple(shape)}, but "
            f"the dataset needs (batch, {', '.join(map(str, want))})"
        )
    if data.context:
        _check_vocabulary_size(net, data.num_outputs, description_source)


def _check_vocabulary_size(net: Layer, num_tokens: int, description_source: str) -> None:
    # Out-of-range ids inside jit would only show as NaN: refuse before training instead.
    first = net
    while first.children:
        first = first.children[0]
    vocab = dict(first.config).get("vocab_size") if first.name == "Embedding" else None
    if vocab is not None and vocab < num_tokens:
        raise ValueError(
            f"{description_source} embeds {vocab} token ids, but the text has "
            f"{num_tokens} distinct characters (ids up to {num_tokens - 1})"
        )


def _first_train_state(cfg: TrainConfig, net: Layer, data: TrainData, optimizer):
    """The step-0 train state (params from ``split(key(seed))[0]``) and the data key."""
    assert cfg.seed is not None  # resolve_config filled it
    init_key, data_key = jax.random.split(jax.random.key(cfg.seed))
    example_shape = (-1, *data.x_train.shape[1:])
    _, params = net.init(init_key, example_shape)
    key = jax.random.fold_in(jax.random.key(cfg.seed), 2) if net.has_state else None
    ts = init_train_state(
        net,
        optimizer,
        params,
        input_shape=(cfg.batch_size, *data.x_train.shape[1:]),
        key=key,
        verify=bool(cfg.probe or cfg.full_every or cfg.check_every),
    )
    return ts, data_key


def _training_data(cfg: TrainConfig, dataset, preset: Preset) -> TrainData:
    """The dataset's arrays with targets for ``cfg.loss`` (augmented or windowed with their own
    key), after checking that a batch fits the training set and splits over the devices."""
    assert cfg.seed is not None and cfg.loss is not None and cfg.batch_size is not None
    sequence = getattr(dataset, "task", None) == "sequence"  # windows at random offsets
    augment_key = (
        jax.random.fold_in(jax.random.key(cfg.seed), 3) if preset.augment or sequence else None
    )
    data = targets(dataset, cfg.loss, preset.input_shape, augment_key)
    if cfg.batch_size > data.n_train:
        raise ValueError(
            f"batch_size must be between 1 and the number of training examples "
            f"({data.n_train}), got {cfg.batch_size}"
        )
    if cfg.devices > 1:
        from ..parallel import check_batch_size, data_parallel_mesh

        check_batch_size(data_parallel_mesh(cfg.devices), cfg.batch_size)
    return data


def _epoch_loop(cfg: TrainConfig, preset: Preset, net: Layer, optimizer, data: TrainData):
    """The compiled epoch of ``net`` as ``cfg`` and ``preset`` say (see :mod:`.compiled`)."""
    assert cfg.loss is not None and cfg.check is not None and cfg.rule is not None
    check = rules.step_check(cfg.check, cfg.rule)
    probe, full_every = _schedule(cfg, net, check)
    return compiled.epoch_loop(
        net,
        cfg.loss,
        optimizer,
        check,
        preset.fused,
        int((preset.augment or {}).get("shift", 0)),
        cfg.devices,
        cfg.jit,
        data.context,
        probe,
        full_every,
        cfg.shard_params,
    )


def _sharded_memory(cfg: TrainConfig, ts) -> str:
    """What each device will hold of the split params and optimizer state, measured from the
    placed arrays' shards; ``ValueError`` if the model has nothing to split."""
    from .. import parallel

    mesh = parallel.data_parallel_mesh(cfg.devices)
    parallel.check_shardable(mesh, ts.params)
    placed = parallel.place_train_state(mesh, ts, shard=True)
    parts = (placed.params, placed.opt_state)
    total = sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(parts))
    most = max(parallel.bytes_per_device(parts).values())
    return (
        f"shard_params: each of {cfg.devices} devices holds at most {most:,} of the "
        f"{total:,} bytes of params and optimizer state ({most / total:.1%})"
    )


def _schedule(cfg: TrainConfig, net: Layer, check: str) -> tuple[int, int | None]:
    """``(probe, full_every)`` of the run (``jaxbp.probe.check_schedule``), checked against
    the network's node count; a rule's "report" steps keep the user's schedule."""
    from ..probe import check_schedule

    if check == "off":
        return 0, None
    return check_schedule(cfg.probe, cfg.full_every, cfg.check_every, check, len(layer_paths(net)))


def prepare(config: TrainConfig | None = None, dataset=None) -> Session:
    """Resolve ``config`` (see :class:`TrainConfig`), load the data, build (or, on resume,
    rebuild from the checkpoint's description) the network, and restore the train state.

    ``dataset``: a :class:`jaxbp.data.Dataset` (or any object with its fields) to train on
    instead of loading ``config.dataset``; its ``defaults`` are its MLP's settings.
    """
    config = config or TrainConfig()
    out, header, notes = _output_folder(config)
    saved = header["config"] if header else None
    dataset, preset, model_key = choose_model(config, dataset, header)
    cfg = resolve_config(
        dataclasses.replace(config, dataset=dataset.name, model=model_key),
        preset.defaults,
        saved,
        mlp=preset.is_mlp,
    )
    # resolve_config filled these (only the MLP fields may stay None): tell the type checker.
    assert (
        cfg.seed is not None
        and cfg.loss is not None
        and cfg.batch_size is not None
        and cfg.epochs is not None
        and cfg.check is not None
        and cfg.rule is not None
    )
    data = _training_data(cfg, dataset, preset)
    ckpt = out / CHECKPOINT_FILE if header and out is not None else None
    if header and int(header.get("epoch", -1)) >= cfg.epochs:
        # Nothing is left to train, but metrics.json and the plots are written again.
        notes = [
            *notes,
            f"the run in {out} is already complete ({int(header['epoch'])} of {cfg.epochs} "
            f"epochs): no epoch is trained; its results are written again",
        ]
    description = (
        header["network"]
        if header
        else rules.apply_rule_to_description(
            _description(preset, cfg, data),
            cfg.rule,
            (-1, *data.x_train.shape[1:]),
            modules=cfg.imports,
        )
    )
    net = _network(description, ckpt, cfg.imports)
    _check_output(net, data, f"model {model_label(cfg, preset.name)}")
    if rules.step_check(cfg.check, cfg.rule) != cfg.check:
        # Said at run time, not only in the docs: the user asked for another mode.
        notes = [
            *notes,
            f"check {cfg.check!r} runs as 'report' under rule {cfg.rule!r}: its updates "
            f"differ from jax.grad's by design, so every step would be refused; the angle "
            f"to the gradient is recorded instead",
        ]
    optimizer = rules.optimizer(
        compiled.optimizer(cfg, cfg.epochs * (data.n_train // cfg.batch_size)), net
    )
    ts, data_key = _first_train_state(cfg, net, data, optimizer)
    if cfg.shard_params:
        notes = [*notes, _sharded_memory(cfg, ts)]
    session = Session(
        cfg,
        dataset,
        preset,
        describe(net),
        net,
        data,
        _epoch_loop(cfg, preset, net, optimizer, data),
        compiled.sequence_evaluator(net, cfg.jit)
        if data.context
        else compiled.evaluator(net, cfg.loss, cfg.jit),
        data_key,
        ts,
        out,
        notes=notes,
    )
    if ckpt is not None:  # resuming (a header is only read from a checkpoint in ``out``)
        _restore(session, ckpt)
    return session


def _description(preset: Preset, cfg: TrainConfig, data: TrainData) -> dict:
    if not preset.is_mlp:
        return preset.description(data.num_outputs)
    from ..presets import mlp_description, output_activation

    # An MLP preset: resolve_config filled its fields and the loss.
    assert (
        cfg.hidden is not None
        and cfg.activation is not None
        and cfg.output_activation is not None
        and cfg.loss is not None
    )
    return mlp_description(
        cfg.hidden,
        cfg.activation,
        data.num_outputs,
        output=output_activation(cfg.activation, cfg.output_activation, cfg.loss),
    )


def _restore(session: Session, path: Path) -> None:
    session.ts, ckpt = restore_train_state(path, session.ts, network=session.description)
    session.epoch = session.last_saved = int(ckpt.header["epoch"])
    session.history = list(ckpt.header["history"])
    session.seconds_before = float(ckpt.header.get("seconds", 0.0))
    session.resumed = True
    assert session.cfg.epochs is not None  # resolve_config filled it
    if session.epoch > session.cfg.epochs:
        raise ValueError(
            f"--resume: the checkpoint is at epoch {session.epoch}, past the "
            f"requested {session.cfg.epochs} epochs"
        )


# --------------------------------------------------------------------------------------------
# run
# --------------------------------------------------------------------------------------------


def _header(s: Session, at_epoch: int) -> dict:
    p = s.preset
    return {
        "network": s.description,
        "config": config_dict(s.cfg),
        "epoch": at_epoch,
        "step": at_epoch * s.steps_per_epoch,
        "dataset": s.dataset.name,
        "preset": {
            "name": p.name,
            "input_shape": None if p.input_shape is None else list(p.input_shape),
            "fused": p.fused,
            "augment": p.augment,
        },
        "rng": {
            "seed": s.cfg.seed,
            "init": "split(key(seed))[0]",
            "data_order": "permutation(fold_in(split(key(seed))[1], epoch), n)",
            "dropout": "fold_in(key(seed), 2), split every step",
            "augment": "fold_in(fold_in(key(seed), 3), step)",
        },
        "history": [_json_row(r) for r in s.history],
        "seconds": s.seconds(),
        **_text_header(s),
    }


def _text_header(s: Session) -> dict:
    """A text model's vocabulary (``jaxbp generate`` decodes with it) and window length."""
    vocabulary = getattr(s.dataset, "vocabulary", None)
    if not s.data.context or vocabulary is None:
        return {}
    return {"text": {"vocabulary": vocabulary, "context": s.data.context}}


def _checkpoint(s: Session, at_epoch: int) -> None:
    if s.out is None:
        return
    # Clear temporaries a killed writer left (a fresh run or a resumed one): one writer per
    # folder, so any temporary found before this write is stale.
    s.out.mkdir(parents=True, exist_ok=True)
    for stale in s.out.glob(f".{CHECKPOINT_FILE}.*.tmp"):
        stale.unlink(missing_ok=True)
    save_checkpoint(s.checkpoint_path, train_state_groups(s.ts), _header(s, at_epoch))
    s.last_saved = at_epoch


def _train_epoch(s: Session) -> dict:
    """One epoch: the loop over its batches, the mismatch check, the evaluation; its row."""
    d, cfg = s.data, s.cfg
    assert cfg.check is not None and cfg.rule is not None  # resolve_config filled them
    order = compiled.epoch_order(
        s.data_key,
        jnp.asarray(s.epoch, jnp.int32),
        d.n_train,
        cfg.batch_size,
        bool(s.preset.augment or d.context),
    )
    ts, metrics = s.loop(s.ts, d.loop_data, order)
    metrics = jax.device_get(metrics)
    # Under a rule other than backprop the step ran "raise" as "report" (rules.step_check):
    # its updates disagree with jax.grad by design and were applied, so nothing is raised.
    _count_verification(s, metrics)
    if rules.step_check(cfg.check, cfg.rule) == "raise":
        raise_first_mismatch(
            metrics,
            first_step=s.epoch * s.steps_per_epoch,
            note=f"epoch {s.epoch + 1}: that update was not applied and the "
            f"checkpoint on disk is from epoch {s.last_saved}",
            locate_with=_failed_batch(s, ts, metrics, order),
        )
    evals = jax.device_get(
        (
            s.evaluate(ts.params, ts.state, d.x_train, d.t_train, d.y_train),
            s.evaluate(ts.params, ts.state, d.x_test, d.t_test, d.y_test),
        )
    )
    s.ts = ts
    row = _epoch_row(s.epoch + 1, metrics, evals, cfg.check)
    # The rule's angle to jax.grad, per layer; None under backprop or unchecked, so that every
    # epoch row has the same keys in every mode.
    row["alignment"] = (
        rules.layer_alignment(metrics.report, keep=np.asarray(metrics.reason) != REASON_NONFINITE)
        if cfg.rule != "bp" and cfg.check != "off"
        else None
    )
    return row


def _count_verification(s: Session, metrics) -> None:
    """Add one epoch's stacked metrics to the run's verification record (metrics.json)."""
    probed = np.asarray(metrics.probed)
    full = np.asarray(metrics.full)
    counts = probed.sum(axis=0).astype(int)
    s.probed = counts if s.probed is None else s.probed + counts
    s.full_checks += int(full.sum())
    paths = layer_paths(s.net, s.cfg.loss)
    first = s.epoch * s.steps_per_epoch
    for t in np.flatnonzero(
        ~np.asarray(metrics.ok) & (np.asarray(metrics.reason) == REASON_MISMATCH)
    ):
        layer = int(np.asarray(metrics.layer)[t])
        s.failures.append(
            {
                "step": first + int(t),
                "node": paths[layer] if 0 <= layer < len(paths) else None,
                "check": "full" if bool(full[t]) else "probe",
            }
        )


def _failed_batch(s: Session, ts, metrics, order):
    """``(net, loss, train state, x, y)`` of the first disagreeing step, for locating the
    culprit (the loop froze the train state there), or ``None`` if every step agreed."""
    bad = np.flatnonzero(np.asarray(metrics.reason) == REASON_MISMATCH)
    if not bad.size:
        return None
    d = s.data
    shift = int((s.preset.augment or {}).get("shift", 0))
    batch_fn = (
        compiled.window_batch_fn(d.context)
        if d.context
        else compiled.shift_batch_fn(shift)
        if shift
        else compiled.gather_batch
    )
    x, y = batch_fn(d.loop_data, jnp.asarray(order)[int(bad[0])])
    return s.net, s.cfg.loss, ts, x, y


def verification_record(s: Session) -> dict:
    """Per node: how often it was probed and fully checked; every failure."""
    paths = layer_paths(s.net, s.cfg.loss)
    probed = [0] * len(paths) if s.probed is None else [int(c) for c in s.probed]
    return {
        "probe": s.cfg.probe,
        "full_every": s.cfg.full_every,
        "check_every": s.cfg.check_every,
        "nodes": [
            {"path": p, "probed": c, "fully_checked": s.full_checks} for p, c in zip(paths, probed)
        ],
        "full_checks": s.full_checks,
        "failures": s.failures,
    }


def run(session: Session, on_epoch: Callable[[dict], bool] | None = None) -> tuple[str, str]:
    """Train ``session`` to its last epoch; returns ``(status, message)``.

    ``on_epoch(row)`` is called after each epoch with its row (the command's progress bar);
    a true return stops the run after writing a checkpoint (the command's Ctrl-C).
    """
    s, cfg = session, session.cfg
    assert cfg.epochs is not None and cfg.checkpoint_every is not None  # resolve_config's
    if not s.resumed:
        _checkpoint(s, 0)  # from the first moment on, a last good state is on disk
    while s.epoch < cfg.epochs:
        row = _train_epoch(s)
        s.history.append(row)
        s.epoch += 1
        stop = bool(on_epoch(row)) if on_epoch is not None else False
        bad = sum(r["skipped_nonfinite"] for r in s.history)
        if bad >= cfg.max_bad_steps:
            where = (
                f"; the last good checkpoint (epoch {s.last_saved}) is in {s.checkpoint_path}"
                if s.out is not None
                else ""
            )
            return "nonfinite", (
                f"stopped after {bad} non-finite steps (limit --max-bad-steps "
                f"{cfg.max_bad_steps}) at epoch {s.epoch}: the loss, a gradient or an update "
                f"was NaN or inf (too large a learning rate, or bad data); none of those steps "
                f"touched the parameters{where}"
            )
        if stop:
            _checkpoint(s, s.epoch)
            return "interrupted", (
                f"interrupted at epoch {s.epoch}/{cfg.epochs}"
                + (
                    f"; checkpoint saved to {s.checkpoint_path}, continue with "
                    f"--resume --out {s.out}"
                    if s.out is not None
                    else ""
                )
            )
        if s.epoch % cfg.checkpoint_every == 0 or s.epoch == cfg.epochs:
            _checkpoint(s, s.epoch)
    return "completed", ""


def _epoch_row(epoch: int, m, evals, check: str) -> dict:
    loss = np.asarray(m.loss, np.float64)
    finite = loss[np.isfinite(loss)]
    reason = np.asarray(m.reason)
    rel = np.asarray(m.rel_error, np.float64)
    # A non-finite step has an infinite "relative error" that says nothing about the backward.
    usable = (reason != REASON_NONFINITE) & ~np.isnan(rel)
    checked = rel[usable] if check != "off" else rel[:0]
    (train_loss, train_acc), (test_loss, test_acc) = evals
    row: dict[str, Any]  # per-leaf errors are added below
    row = {
        "epoch": epoch,
        "loss": float(finite.mean()) if finite.size else float("nan"),
        "train_loss": float(train_loss),
        "train_accuracy": float(train_acc),
        "test_loss": float(test_loss),
        "test_accuracy": float(test_acc),
        "max_grad_rel_error": float(checked.max()) if checked.size else None,
        "steps": int(loss.size),
        "applied_steps": int(np.sum(np.asarray(m.applied))),
        "skipped_nonfinite": int(np.sum(reason == REASON_NONFINITE)),
        # check="report" applies a disagreeing step: only the refused ones were skipped
        "skipped_mismatch": int(np.sum((reason == REASON_MISMATCH) & ~np.asarray(m.applied, bool))),
        "grad_rel_error_by_leaf": {},  # {} when no step was checked: the same keys always
    }
    if check != "off" and np.any(reason != REASON_NONFINITE):
        leaf = np.asarray(m.leaf_rel_error, np.float64)[reason != REASON_NONFINITE]
        row["grad_rel_error_by_leaf"] = {
            p: float(v) for p, v in zip(m.report.paths, np.max(leaf, axis=0))
        }
    return row


def _nan_to_none(v):
    return None if v is None or (isinstance(v, float) and not math.isfinite(v)) else v


def _json_row(row: dict) -> dict:
    return {k: (_nan_to_none(v) if isinstance(v, float) else v) for k, v in row.items()}


# --------------------------------------------------------------------------------------------
# finish
# --------------------------------------------------------------------------------------------


def finish(session: Session, status: str = "completed", message: str = "") -> TrainResult:
    """Summarise the run; with an output folder, write ``metrics.json`` and ``curves.png``."""
    s = session
    metrics = _summary(s, status)
    files: list[Path | str | None] = []  # the plots are None without matplotlib
    if s.out is not None:
        s.out.mkdir(parents=True, exist_ok=True)
        files.append(write_json(s.out / METRICS_FILE, metrics))
        if s.history:
            files.append(
                _write_curves(
                    s.history,
                    s.out / CURVES_FILE,
                    f"{s.dataset.name}: {model_label(s.cfg, s.preset.name)}, "
                    f"{s.cfg.optimizer} lr {s.cfg.lr:g}",
                    held_out="validation" if s.data.context else "test",
                )
            )
        if any(r.get("alignment") for r in s.history) and s.cfg.rule is not None:
            files.append(
                _write_alignment(
                    s.history,
                    s.out / ALIGNMENT_FILE,
                    f"{s.dataset.name}: {rules.RULE_NAMES[s.cfg.rule]}, "
                    f"{model_label(s.cfg, s.preset.name)}",
                )
            )
    ckpt = s.checkpoint_path
    ckpt = ckpt if ckpt is not None and ckpt.exists() else None
    return TrainResult(
        s.ts.params,
        s.ts.opt_state,
        s.net,
        s.cfg,
        metrics,
        s.history,
        status,
        ckpt,
        message,
        s.ts,
        tuple(Path(f) for f in (*files, ckpt) if f is not None),
    )


def train(
    config: TrainConfig | None = None,
    dataset=None,
    *,
    on_epoch: Callable[[dict], bool] | None = None,
    progress: str = "none",
    stream=None,
) -> TrainResult:
    """:func:`prepare`, :func:`run`, :func:`finish`: train as ``config`` says.

    ``progress`` (``"auto"``, ``"bar"``, ``"lines"``, ``"none"``) shows
    :class:`~jaxbp.training.progress.Progress` (the display ``jaxbp train`` shows) on
    ``stream`` (default stderr), for scripts; ``on_epoch`` is the general hook.
    """
    if progress not in PROGRESS_MODES:
        raise ValueError(
            f"unknown progress mode {progress!r}; expected one of: {', '.join(PROGRESS_MODES)}"
        )
    session = prepare(config, dataset)
    bar = None
    if progress != "none":
        assert session.cfg.epochs is not None  # resolve_config filled it
        bar = Progress(progress, session.cfg.epochs, session.epoch, session.dataset.name, stream)
    hook = on_epoch if bar is None else _with_progress(bar, on_epoch)
    try:
        status, message = run(session, hook)
    finally:
        if bar is not None:
            bar.close()
    return finish(session, status, message)


def _with_progress(bar, on_epoch: Callable[[dict], bool] | None) -> Callable[[dict], bool]:
    """``on_epoch`` (if any) after updating the progress display ``bar`` with the row."""

    def hook(row: dict) -> bool:
        bar.update(row)
        return bool(on_epoch and on_epoch(row))

    return hook


def _summary(s: Session, status: str) -> dict:
    history, last = s.history, (s.history[-1] if s.history else {})
    checked = [r["max_grad_rel_error"] for r in history if r.get("max_grad_rel_error") is not None]
    by_leaf: dict[str, float] = {}
    for r in history:
        for p, v in r.get("grad_rel_error_by_leaf", {}).items():
            by_leaf[p] = max(by_leaf.get(p, 0.0), v)
    totals = {
        k: sum(r[k] for r in history)
        for k in ("steps", "applied_steps", "skipped_nonfinite", "skipped_mismatch")
    }
    metrics = {
        "dataset": s.dataset.name,
        "status": status,
        "train_accuracy": last.get("train_accuracy"),
        "test_accuracy": last.get("test_accuracy"),
        "final_loss": last.get("train_loss"),
        "test_loss": last.get("test_loss"),
        "max_grad_rel_error": max(checked) if checked else None,
        "worst_grad_leaf": max(by_leaf, key=by_leaf.__getitem__) if by_leaf else None,
        "grad_rel_error_by_leaf": by_leaf,
        **totals,
        "epochs": len(history),
        "rule": s.cfg.rule,
        "alignment": last.get("alignment"),
        "steps_per_epoch": s.steps_per_epoch,
        "seconds": s.seconds(),
        "check": s.cfg.check,
        "verification": verification_record(s),
        "config": config_dict(s.cfg),
        "network": s.description,
        "preset": s.preset.name,
        "input_shape": None if s.preset.input_shape is None else list(s.preset.input_shape),
        "augment": s.preset.augment,
        "fused": s.preset.fused,
        "num_params": int(sum(np.size(l) for l in jax.tree_util.tree_leaves(s.ts.params))),
        "checkpoint": str(s.checkpoint_path) if s.out is not None else None,
        "history": [
            {k: v for k, v in _json_row(r).items() if k != "grad_rel_error_by_leaf"}
            for r in history
        ],
    }
    return {k: (_nan_to_none(v) if isinstance(v, float) else v) for k, v in metrics.items()}


def _write_curves(history, path, title, held_out: str = "test"):
    """``held_out`` names the held-out split in the legend: a text run's last 10% is its
    validation set, as the command's summary says."""
    try:
        from ..plots import plot_training_curves
    except ImportError:  # matplotlib is an optional extra: the run itself is complete
        return None

    keys = (
        "epoch",
        "train_loss",
        "test_loss",
        "train_accuracy",
        "test_accuracy",
        "max_grad_rel_error",
    )
    series = {k: [np.nan if r.get(k) is None else r[k] for r in history] for k in keys}
    for key, also in (("train_accuracy", "test_accuracy"), ("max_grad_rel_error", None)):
        if all(isinstance(v, float) and math.isnan(v) for v in series[key]):
            series.pop(key)
            if also:
                series.pop(also)
    series = {k.replace("test_", f"{held_out}_"): v for k, v in series.items()}
    return plot_training_curves(series, path, title=title)


def _write_alignment(history, path, title):
    from ..plots_rules import plot_alignment

    try:
        return plot_alignment(history, path, title=title)
    except ImportError:  # matplotlib is an optional extra: the run itself is complete
        return None
