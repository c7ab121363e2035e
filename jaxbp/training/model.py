"""Which model a run trains, on which data, in which shape.

:func:`choose_model` turns ``TrainConfig.model`` (a preset name, a JSON file, a JSON string or
a description dict) and the dataset into a :class:`jaxbp.presets.Preset`; on resume the
checkpoint's header decides (its description and preset settings), so the network is rebuilt
from the checkpoint alone. :func:`targets` puts the data in the shape the model takes.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np

from ..errors import ArgumentError
from ..model import load_description
from ..presets import TRAINING_KEYS, Preset, get_preset
from .config import FALLBACK, MLP_FIELDS, TrainConfig

__all__ = [
    "TrainData",
    "choose_model",
    "dataset_name",
    "targets",
    "model_label",
    "PRESET_FILE_KEYS",
]

# A model file holds a description ({"name": ...}) or a preset: {"model": description, ...}.
# The MLP's fields (hidden, activation) would shape nothing: the description is the network.
PRESET_FILE_KEYS = (
    "model",
    "dataset",
    "input_shape",
    "fused",
    "augment",
    *(k for k in TRAINING_KEYS if k not in MLP_FIELDS),
)


class TrainData(NamedTuple):
    """The data on device: inputs in the model's shape, the loss's targets ``t`` and the
    labels ``y`` accuracy is measured against (``None`` for regression). ``loop_data`` is what
    the training loop gathers batches from (with the augmentation key, if any)."""

    x_train: Any
    t_train: Any
    y_train: Any
    x_test: Any
    t_test: Any
    y_test: Any
    num_outputs: int
    loop_data: tuple
    context: int = 0  # a sequence task: characters per window (0: one example per row)
    n_examples: int | None = None  # a sequence task: training windows per epoch

    @property
    def n_train(self) -> int:
        return int(self.x_train.shape[0]) if self.n_examples is None else self.n_examples


def _is_file_model(model) -> bool:
    return isinstance(model, dict) or (
        isinstance(model, str)
        and (model.lstrip().startswith("{") or model.endswith(".json") or Path(model).is_file())
    )


def _file_spec(model) -> dict:
    """A description (or preset file, JSON string, dict) as a preset ``{"model": description,
    ...}``, read once and its keys judged: the one place a model file is checked."""
    spec = load_description(model)
    if not isinstance(spec, dict) or "name" in spec:
        spec = {"model": spec}  # a bare description (anything else fails the check below)
    mlp_only = [k for k in MLP_FIELDS if k in spec]
    if mlp_only:
        raise ValueError(
            f"model {_short(model)}: {' and '.join(mlp_only)} "
            f"belong{'s' if len(mlp_only) == 1 else ''} to the mlp preset and "
            f'would change nothing; a model file\'s network is its "model" description: '
            f"change the layers there"
        )
    unknown = sorted(set(spec) - set(PRESET_FILE_KEYS))
    if unknown or not isinstance(spec.get("model"), dict):
        raise ValueError(
            f"model {_short(model)}: expected a layer description "
            f'({{"name": ...}}) or {{"model": description, ...}} with keys '
            f"among {', '.join(PRESET_FILE_KEYS)}"
            + (f"; got unknown keys {', '.join(unknown)}" if unknown else "")
        )
    named = spec.get("dataset")
    if named is not None and not isinstance(named, str):
        raise ValueError(f'model {_short(model)}: "dataset" must be a data set name, got {named!r}')
    return spec


def _spec_of(model) -> dict | None:
    """:func:`_file_spec` for a model file; ``None`` for a named preset (``mlp`` included)."""
    return _file_spec(model) if model != "mlp" and _is_file_model(model) else None


def _file_preset(spec: dict, defaults: dict) -> Preset:
    """A preset for a checked file spec: the dataset's MLP training settings, overridden by
    the file's own."""
    settings = {k: v for k, v in defaults.items() if k in TRAINING_KEYS and k not in MLP_FIELDS}
    settings.update({k: spec[k] for k in TRAINING_KEYS if k in spec})
    shape = spec.get("input_shape")
    return Preset(
        "file",
        spec["model"],
        spec.get("dataset"),
        None if shape is None else tuple(shape),
        bool(spec.get("fused", True)),
        spec.get("augment"),
        settings,
    )


def _short(model) -> str:
    text = model if isinstance(model, str) else json.dumps(model)
    return repr(text if len(text) < 60 else text[:57] + "...")


def _load(name: str, dataset, text: str | None = None):
    if dataset is not None:
        for field in ("x_train", "y_train", "x_test", "y_test", "task", "num_classes"):
            if not hasattr(dataset, field):
                raise ArgumentError(
                    f"dataset must look like jaxbp.data.Dataset (missing "
                    f"{field!r}), got {type(dataset).__name__}"
                )
        return dataset
    from ..data import load_dataset

    return load_dataset(name, seed=0, text=text)


def _from_header(header: dict, config: TrainConfig, dataset):
    saved = header["config"]
    info = header.get("preset") or {"name": "mlp"}  # checkpoints before presets: MLPs
    dataset = _load(
        config.dataset or saved.get("dataset") or FALLBACK["dataset"],
        dataset,
        config.text or saved.get("text"),
    )
    shape = info.get("input_shape")
    preset = Preset(
        info["name"],
        header["network"],
        None,
        None if shape is None else tuple(shape),
        bool(info.get("fused", True)),
        info.get("augment"),
        {},
    )
    # An MLP run keeps its MLP fields (so --hidden on resume is compared with them).
    if saved.get("hidden") is not None:
        preset = Preset(
            preset.name, None, None, preset.input_shape, preset.fused, preset.augment, {}
        )
    return dataset, preset, config.model or saved.get("model") or "mlp"


def choose_model(config: TrainConfig, dataset, header: dict | None):
    """``(dataset, preset, model key)`` for a run: the key is what the config records."""
    if header is not None:
        return _from_header(header, config, dataset)
    model = config.model if config.model is not None else _default_model(config, dataset)
    spec = _spec_of(model)
    name = (
        config.dataset
        or (getattr(dataset, "name", None) if dataset is not None else None)
        or _model_dataset(model, spec)
        or FALLBACK["dataset"]
    )
    dataset = _load(name, dataset, config.text)
    defaults = dict(getattr(dataset, "defaults", None) or get_preset("mlp", name).defaults)
    if model == "mlp":
        return dataset, Preset("mlp", None, name, defaults=defaults), model
    if spec is None:
        return dataset, get_preset(model, dataset.name), model
    return dataset, _file_preset(spec, defaults), model


def _model_dataset(model, spec: dict | None) -> str | None:
    """The data set the model names: a preset file's ``"dataset"`` (``spec``, from
    :func:`_spec_of`), a named preset's (``gpt``: ``text``); ``None`` for ``mlp``."""
    if spec is not None:
        return spec.get("dataset")
    return None if model == "mlp" else get_preset(model).dataset


def dataset_name(config: TrainConfig) -> str:
    """The data set a fresh run of ``config`` trains on, as :func:`choose_model` picks it,
    without loading anything: ``config.dataset``, else the named preset's or the preset
    file's (``--model gpt``: ``text``), else the fallback. (An unknown preset or a faulty
    file falls back here; :func:`prepare` then says what is wrong with it.)"""
    if config.dataset:
        return config.dataset
    try:
        model = config.model
        named = None if model is None else _model_dataset(model, _spec_of(model))
    except ValueError:
        named = None
    return named or FALLBACK["dataset"]


def _default_model(config: TrainConfig, dataset) -> str:
    """``"gpt"`` for text (a sequence task), else ``"mlp"``."""
    sequence = config.dataset == "text" or getattr(dataset, "task", None) == "sequence"
    return "gpt" if sequence else "mlp"


def model_label(cfg: TrainConfig, preset_name: str) -> str:
    """``"256 relu"`` for an MLP, else the preset's name, the model file's name, or the start
    of the JSON given inline."""
    if cfg.hidden is not None:
        return f"{'-'.join(map(str, cfg.hidden))} {cfg.activation}"
    if preset_name != "file":
        return preset_name
    inline = not isinstance(cfg.model, str) or cfg.model.lstrip().startswith("{")
    return _short(cfg.model) if inline else repr(Path(cfg.model).name)


def _classification(dataset, loss_name: str, x_tr, x_te):
    c = int(dataset.num_classes)
    y_tr = np.asarray(dataset.y_train).astype(np.int32)
    y_te = np.asarray(dataset.y_test).astype(np.int32)
    for name, y, x in (("y_train", y_tr, x_tr), ("y_test", y_te, x_te)):
        if y.shape != (x.shape[0],):
            raise ValueError(
                f"dataset {name} must hold one label per example, shape "
                f"({x.shape[0]},), got {y.shape}"
            )
        if y.size and (y.min() < 0 or y.max() >= c):
            raise ValueError(f"dataset {name} has labels outside [0, {c})")
    if loss_name == "softmax_cross_entropy":
        return y_tr, y_tr, y_te, y_te, c
    # squared errors and sigmoid cross-entropy regress one-hot targets
    eye = np.eye(c, dtype=np.float32)
    return eye[y_tr], y_tr, eye[y_te], y_te, c


def _inputs(dataset, input_shape):
    out = []
    for name in ("x_train", "x_test"):
        x = np.asarray(getattr(dataset, name), np.float32)
        if x.ndim != 2 or x.shape[0] == 0:
            raise ValueError(
                f"dataset {name} must have shape (examples, features) with at "
                f"least one example, got {x.shape}"
            )
        if input_shape is not None:
            if math.prod(input_shape) != x.shape[1]:
                raise ValueError(
                    f"the model takes examples of shape {tuple(input_shape)}, "
                    f"but {dataset.name} has {x.shape[1]} features"
                )
            x = x.reshape(x.shape[0], *input_shape)
        out.append(x)
    return out


# Training windows the train loss is measured on each epoch (evenly spaced): the whole train
# split would cost a seventh of the epoch; the validation split is always measured whole.
TRAIN_EVAL_WINDOWS = 256


def _token_ids(dataset, name: str, vocab: int) -> np.ndarray:
    ids = np.asarray(getattr(dataset, name))
    if ids.ndim != 1 or ids.size < 1 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(
            f"sequence dataset {name} must be a 1-D array of integer token ids, "
            f"got {ids.dtype} of shape {ids.shape}"
        )
    bad = np.flatnonzero((ids < 0) | (ids >= vocab))
    if bad.size:
        raise ValueError(
            f"sequence dataset {name} has token id {int(ids[bad[0]])} at position "
            f"{int(bad[0])}, outside [0, {vocab}) (its {vocab} classes)"
        )
    return ids.astype(np.int32)


def sequence_targets(dataset, input_shape, window_key) -> TrainData:
    """A sequence task (token ids) on device: ``loop_data`` is the whole train split (ids and
    next ids) with ``window_key``, from which each step cuts windows of ``context`` ids at
    random offsets (:func:`jaxbp.training.compiled.window_batch_fn`); the test arrays are
    windows covering the whole validation split (:func:`jaxbp.text.eval_windows`)."""
    from ..text import eval_windows

    if input_shape is None or len(input_shape) != 1:
        raise ValueError(
            f"a sequence model needs input_shape (context,), the characters per "
            f"window, got {input_shape!r}"
        )
    context, vocab = int(input_shape[0]), int(dataset.num_classes)
    x_tr, y_tr, x_te, y_te = (
        _token_ids(dataset, n, vocab) for n in ("x_train", "y_train", "x_test", "y_test")
    )
    if len(x_tr) != len(y_tr) or len(x_te) != len(y_te) or len(x_tr) < context:
        raise ValueError(
            f"sequence dataset: the train split has {len(x_tr)} positions, "
            f"fewer than one window of {context} (or x and y differ in length)"
        )
    windows = len(x_tr) // context
    pick = np.unique(np.linspace(0, windows - 1, min(windows, TRAIN_EVAL_WINDOWS)).astype(int))
    starts = pick[:, None] * context + np.arange(context)
    x_te, t_te = eval_windows(x_te, y_te, context)
    arrays = [jnp.asarray(a) for a in (x_tr[starts], y_tr[starts], x_te, t_te)]
    return TrainData(
        arrays[0],
        arrays[1],
        arrays[1],
        arrays[2],
        arrays[3],
        arrays[3],
        vocab,
        (jnp.asarray(x_tr), jnp.asarray(y_tr), window_key),
        context,
        windows,
    )


def targets(dataset, loss_name: str, input_shape=None, augment_key=None) -> TrainData:
    """The dataset on device, inputs reshaped to ``input_shape`` (per example)."""
    if dataset.task == "sequence":
        return sequence_targets(dataset, input_shape, augment_key)
    x_tr, x_te = _inputs(dataset, input_shape)
    if dataset.task == "classification":
        t_tr, y_tr, t_te, y_te, num_outputs = _classification(dataset, loss_name, x_tr, x_te)
    else:
        if loss_name == "softmax_cross_entropy":
            raise ValueError(
                f"loss softmax_cross_entropy needs a classification dataset; "
                f"{dataset.name!r} is a regression task (use half_sse or mse)"
            )
        t_tr = np.asarray(dataset.y_train, np.float32)
        t_te = np.asarray(dataset.y_test, np.float32)
        y_tr = y_te = None
        num_outputs = int(t_tr.shape[1])
    on_device = [
        None if a is None else jnp.asarray(a) for a in (x_tr, t_tr, y_tr, x_te, t_te, y_te)
    ]
    x_train, t_train, y_train, x_test, t_test, y_test = on_device
    loop_data = (x_train, t_train) + (() if augment_key is None else (augment_key,))
    return TrainData(x_train, t_train, y_train, x_test, t_test, y_test, num_outputs, loop_data)
