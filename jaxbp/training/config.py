"""What a training run is: :class:`TrainConfig`, its validation and resolution, the optimizer.

A config field left ``None`` takes, in order: the checkpoint's value (on ``--resume``), the
model preset's setting (:mod:`jaxbp.presets`; for the default ``"mlp"`` preset, the dataset's
defaults), then :data:`FALLBACK`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import optax

from ..layers import ACTIVATIONS
from ..losses import LOSSES
from ..presets import TRAINING_KEYS
from ..rules import RULES
from ..train import CHECK_MODES, biases, sgd

__all__ = [
    "TrainConfig",
    "OPTIMIZERS",
    "SCHEDULES",
    "OUTPUT_ACTIVATIONS",
    "FALLBACK",
    "IDENTITY_FIELDS",
    "check_seed",
    "resolve_config",
    "config_dict",
    "build_optimizer",
    "WARMUP_FRACTION",
]

OPTIMIZERS = ("sgd", "momentum", "adam")
SCHEDULES = ("constant", "cosine", "warmup_cosine")
OUTPUT_ACTIVATIONS = ("auto", *sorted(ACTIVATIONS))
MLP_FIELDS = ("hidden", "activation", "output_activation")

# Used where neither the caller, the checkpoint nor the preset says otherwise.
FALLBACK: dict[str, Any] = dict(
    dataset="digits",
    model="mlp",
    hidden=(64,),
    activation="relu",
    output_activation="auto",
    loss="softmax_cross_entropy",
    optimizer="adam",
    lr=1e-3,
    schedule="constant",
    weight_decay=0.0,
    epochs=20,
    batch_size=32,
    seed=0,
    check="report",
    rule="bp",
)

# Fields that decide what is computed: a resumed run must agree with its checkpoint on these,
# every training setting but ``epochs`` (which may grow when the learning rate does not
# depend on it).
IDENTITY_FIELDS = (
    "dataset",
    "model",
    *(key for key in TRAINING_KEYS if key != "epochs"),
    "seed",
    "check",
    "text",
    "rule",
)
# warmup_cosine warms up linearly over this fraction of the run's steps.
WARMUP_FRACTION = 0.05


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """What to train and how. ``None`` means "the preset's (or dataset's) default", or with
    ``resume``, "whatever the checkpoint's run used".

    - ``dataset``: a name of :data:`jaxbp.data.DATASETS` (or pass a ``Dataset`` to ``train``).
    - ``model``: a preset name (:func:`jaxbp.presets.preset_names`; default ``"mlp"``, the
      dataset's MLP), a path to a JSON model description, a JSON string, or a description
      dict. A description's last layer must produce the dataset's outputs.
    - ``hidden``, ``activation``, ``output_activation``: the MLP (``model="mlp"`` only):
      hidden-layer widths, the activation after each, and after the last layer (``"auto"``:
      none, except a sigmoid for a sigmoid network on a squared error: the seed's network).
    - ``loss``: a name of :data:`jaxbp.LOSSES`. Non-softmax losses on a classification
      dataset regress one-hot targets.
    - ``optimizer``: ``"sgd"`` (:func:`jaxbp.sgd`), ``"momentum"`` (``optax.sgd(lr, 0.9)``) or
      ``"adam"`` (``optax.adam``; ``optax.adamw`` with ``weight_decay``).
    - ``schedule``: ``"constant"``, ``"cosine"`` (decay to 0 over the run) or
      ``"warmup_cosine"`` (linear warm-up over the first 5% of steps, then cosine).
    - ``weight_decay``: decay of every parameter but the leaves named ``'b'`` (the biases of
      Dense and the convolutions; LayerNorm's and BatchNorm's ``scale``/``bias`` and
      attention's ``bq``...``bo`` are decayed): decoupled with ``adam`` (``optax.adamw``),
      added to the gradient (L2, ``optax.add_decayed_weights``) with ``sgd`` and ``momentum``.
    - ``check``: ``"off"``, ``"report"``, ``"skip"`` or ``"raise"`` (:mod:`jaxbp.train`).
    - ``out``: folder for checkpoint, metrics and curves (``None``: write nothing).
    - ``resume``: continue from ``out``'s checkpoint (start afresh if there is none); the
      network is rebuilt from the checkpoint's description alone.
    - ``max_bad_steps``: stop after this many non-finite (skipped) steps.
    - ``checkpoint_every``: epochs between checkpoints (default: about 20 per run, plus the
      last epoch).
    - ``devices``: number of devices for data parallelism (1: no sharding).
    - ``shard_params``: split params and optimizer state over the ``devices`` instead of
      replicating them (:func:`jaxbp.parallel.place_train_state`); needs ``devices >= 2``.
    - ``jit``: ``False`` runs the same steps op by op (slow; for debugging).
    - ``text``: a UTF-8 file to train on with ``dataset="text"`` (default: the
      ``pydoc_data.topics`` reference text).
    - ``rule``: the learning rule, one of :data:`jaxbp.rules.RULES` (default ``"bp"``); with
      another rule ``check`` ``"skip"``/``"raise"`` act as ``"report"`` (the rule's update is
      applied and its angle to ``jax.grad`` measured; non-finite steps are still refused).
    - ``probe``, ``full_every``, ``check_every``: the verification schedule
      (:func:`jaxbp.make_train_step`): ``probe=k`` nodes' adjoint test per step with the full
      check every ``full_every`` steps (default 100), or the full check every
      ``check_every``-th step alone; ``0``/``None``: the full check every step.
    - ``imports``: modules imported before the model is built (``--import``): their
      ``register_layer`` calls run, and the model's ``"module:name"`` references may name
      code in them (in no other module: reading a model file or checkpoint imports nothing).
    """

    dataset: str | None = None
    model: Any = None
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
    shard_params: bool = False
    jit: bool = True
    text: str | None = None
    rule: str | None = None
    probe: int = 0
    full_every: int | None = None
    check_every: int | None = None
    imports: tuple[str, ...] = ()


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


def check_seed(value, what: str = "seed") -> int:
    """``value`` as an int if it is a valid seed, an integer in ``[0, 2**32)`` (what
    ``jax.random.key`` takes without overflow), else a ``ValueError``. The command-line parser
    (:func:`jaxbp.commands.args.seed`) checks the same range without importing JAX."""
    if not _is_int(value) or not 0 <= value < 2**32:
        raise ValueError(f"{what} must be an integer in [0, 2**32), got {value!r}")
    return int(value)


def _check_number(name, v, positive: bool) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)):
        raise ValueError(f"{name} must be a number, got {v!r}")
    if not math.isfinite(float(v)) or (float(v) <= 0 if positive else float(v) < 0):
        need = "a positive finite number" if positive else "a finite number >= 0"
        raise ValueError(f"{name} must be {need}, got {v!r}")
    return float(v)


def _check_mlp(cfg: TrainConfig) -> tuple | None:
    if cfg.hidden is None:
        return None
    hidden = cfg.hidden
    if isinstance(hidden, (str, bytes)) or not isinstance(hidden, (tuple, list)):
        raise ValueError(f"hidden must be a sequence of positive integers, got {hidden!r}")
    if not all(_is_int(h) and h >= 1 for h in hidden):
        raise ValueError(f"hidden layer widths must be positive integers, got {list(hidden)}")
    _choice("activation", cfg.activation, sorted(ACTIVATIONS))
    _choice("output activation", cfg.output_activation, OUTPUT_ACTIVATIONS)
    return tuple(int(h) for h in hidden)


def _validate(cfg: TrainConfig) -> TrainConfig:
    """Check every field of a resolved config; return it with canonical types."""
    hidden = _check_mlp(cfg)
    _choice("loss", cfg.loss, sorted(LOSSES))
    _choice("optimizer", cfg.optimizer, OPTIMIZERS)
    _choice("schedule", cfg.schedule, SCHEDULES)
    _choice("check mode", cfg.check, CHECK_MODES)
    _choice("learning rule", cfg.rule, RULES)
    lr = _check_number("lr", cfg.lr, positive=True)
    weight_decay = _check_number("weight_decay", cfg.weight_decay, positive=False)
    counts = {
        name: _positive_int(name, getattr(cfg, name))
        for name in ("epochs", "batch_size", "max_bad_steps", "checkpoint_every", "devices")
    }
    from ..probe import check_schedule

    check_schedule(cfg.probe, cfg.full_every, cfg.check_every, str(cfg.check))
    if not isinstance(cfg.shard_params, (bool, np.bool_)):
        raise ValueError(f"shard_params must be true or false, got {cfg.shard_params!r}")
    if cfg.shard_params and counts["devices"] < 2:
        raise ValueError(
            f"shard_params (--shard-params) needs devices >= 2 (--devices N) to split the "
            f"parameters over, got devices={counts['devices']}"
        )
    return dataclasses.replace(
        cfg,
        hidden=hidden,
        lr=lr,
        weight_decay=weight_decay,
        epochs=counts["epochs"],
        batch_size=counts["batch_size"],
        seed=check_seed(cfg.seed),
        imports=_module_names(cfg.imports),
    )


def _module_names(names) -> tuple[str, ...]:
    if isinstance(names, str) or not all(isinstance(n, str) and n.strip() for n in names):
        raise ValueError(f"imports must be a sequence of module names, got {names!r}")
    return tuple(names)


def _fill(config: TrainConfig, defaults: Mapping, saved: Mapping | None, mlp: bool) -> dict:
    values = {}
    for f in dataclasses.fields(TrainConfig):
        v = getattr(config, f.name)
        if v is None and saved is not None and f.name != "checkpoint_every":
            v = saved.get(f.name)
        if v is None and not (f.name in MLP_FIELDS and not mlp):
            v = defaults.get(f.name, FALLBACK.get(f.name))
        if f.name == "hidden" and v is not None and isinstance(v, list):
            v = tuple(v)
        values[f.name] = v
    if values["checkpoint_every"] is None and _is_int(values["epochs"]):
        values["checkpoint_every"] = max(1, int(values["epochs"]) // 20)
    return values


def resolve_config(
    config: TrainConfig,
    defaults: Mapping | None = None,
    saved: Mapping | None = None,
    *,
    mlp: bool = True,
) -> TrainConfig:
    """Fill every ``None`` of ``config``: from ``saved`` (a checkpoint's config, on resume),
    then ``defaults`` (the preset's settings), then :data:`FALLBACK`; then validate.

    ``mlp=False`` (a preset or file model): the MLP fields must stay unset. On resume, a field
    set explicitly that contradicts the checkpoint is an error naming it.
    """
    if not mlp:
        given = [name for name in MLP_FIELDS if getattr(config, name) is not None]
        if given:
            model = config.model or (saved or {}).get("model")
            raise ValueError(
                f"{given[0].replace('_', '-')} shapes the default MLP; it cannot "
                f"be combined with model {_show(model)}"
            )
    cfg = _validate(TrainConfig(**_fill(config, dict(defaults or {}), saved, mlp)))
    if saved is not None:
        _check_against_checkpoint(cfg, saved)
    return cfg


def _check_against_checkpoint(cfg: TrainConfig, saved: Mapping) -> None:
    for name in IDENTITY_FIELDS:
        want = saved.get(name, "mlp" if name == "model" else None)
        want = tuple(want) if name == "hidden" and want is not None else want
        if want is not None and getattr(cfg, name) != want:
            raise ValueError(
                f"--resume: {name} is {_show(getattr(cfg, name))} but the "
                f"checkpoint's run used {_show(want)}; drop the flag to continue "
                f"that run, or choose another --out for a new one"
            )
    if cfg.epochs != saved.get("epochs") and cfg.schedule != "constant":
        raise ValueError(
            f"--resume: epochs is {cfg.epochs} but the checkpoint's run used "
            f"{saved.get('epochs')}, and its {cfg.schedule} learning-rate "
            f"schedule depends on the number of epochs"
        )


def _show(v):
    return ",".join(map(str, v)) if isinstance(v, tuple) else repr(v)


def config_dict(cfg: TrainConfig) -> dict:
    """``cfg`` as JSON-able data (for the checkpoint header and metrics.json)."""
    d = dataclasses.asdict(cfg)
    d["hidden"] = None if cfg.hidden is None else list(cfg.hidden)
    return d


# --------------------------------------------------------------------------------------------
# The optimizer
# --------------------------------------------------------------------------------------------


def _learning_rate(cfg: TrainConfig, total_steps: int):
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "cosine":
        return optax.cosine_decay_schedule(cfg.lr, total_steps)
    warmup = max(1, int(round(WARMUP_FRACTION * total_steps)))
    return optax.warmup_cosine_decay_schedule(0.0, cfg.lr, warmup, max(total_steps, warmup + 1))


def _weights_mask(params):
    import jax

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
