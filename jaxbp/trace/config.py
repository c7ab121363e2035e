"""The trace config: a small fully connected network and its data, as plain JSON, validated.

::

    {
      "inputs": [0.1, 0.05],
      "targets": [0.02, 0.98],
      "layers": [
        {"weights": [[0.25, 0.2], [0.5, 0.15]], "bias": 0.3, "activation": "sigmoid"},
        {"weights": [[0.7, 0.4], [0.6, 0.35]], "bias": 0.9, "activation": "sigmoid"}
      ],
      "loss": "half_sse",
      "learning_rate": 0.5
    }

``weights[i][j]`` joins input ``i`` to neuron ``j`` (the layout of :class:`jaxbp.Dense`);
``bias`` is one number shared by the layer (as in the seed) or a list, one per neuron (default
0); ``inputs``/``targets`` are one example or a list of examples; ``activation`` is a name from
:data:`jaxbp.ACTIVATIONS`, ``loss`` one from :data:`jaxbp.LOSSES` (default ``half_sse``),
``learning_rate`` a positive number (default 0.5). With no config, ``jaxbp trace`` uses
:func:`seed_config`, the seed tutorial's 2-2-2 example.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import numpy as np

__all__ = [
    "ConfigError",
    "TraceLayer",
    "TraceConfig",
    "seed_config",
    "parse_config",
    "load_config",
    "traceable_losses",
]

_TOP_KEYS = ("inputs", "targets", "layers", "loss", "learning_rate")
_LAYER_KEYS = ("weights", "bias", "activation")
_DEFAULT_LOSS = "half_sse"
_DEFAULT_LEARNING_RATE = 0.5


class ConfigError(ValueError):
    """A trace config that cannot describe a network: names the key, what it got, what it
    expected."""


@dataclasses.dataclass(frozen=True)
class TraceLayer:
    """One validated layer: ``weights`` ``(in, out)``, ``bias`` ``()`` (shared) or ``(out,)``."""

    weights: np.ndarray
    bias: np.ndarray
    activation: str

    @property
    def shared_bias(self) -> bool:
        return self.bias.ndim == 0

    @property
    def width(self) -> int:
        return self.weights.shape[1]


@dataclasses.dataclass(frozen=True)
class TraceConfig:
    """A validated trace config. ``inputs``/``targets`` are always ``(examples, features)``;
    ``single`` records that the config gave one example (its outputs are then unbatched)."""

    inputs: np.ndarray
    targets: np.ndarray
    layers: tuple
    loss: str
    learning_rate: float
    single: bool

    @property
    def widths(self) -> tuple:
        """``(inputs, layer 0 width, layer 1 width, ...)``."""
        return (self.inputs.shape[1],) + tuple(layer.width for layer in self.layers)

    @property
    def examples(self) -> int:
        return self.inputs.shape[0]

    @property
    def is_seed_shape(self) -> bool:
        """A 2-2-2 network: it is named as the seed names it (W1..W8, b1, b2, h1, o1, ...)."""
        return self.widths == (2, 2, 2)

    @property
    def is_seed(self) -> bool:
        """Exactly the seed tutorial's example (so its stated numbers can be checked)."""
        seed = parse_config(seed_config())
        return (
            self.is_seed_shape
            and self.single
            and self.loss == seed.loss
            and self.learning_rate == seed.learning_rate
            and np.array_equal(self.inputs, seed.inputs)
            and np.array_equal(self.targets, seed.targets)
            and all(_same_layer(a, b) for a, b in zip(self.layers, seed.layers))
        )

    def to_dict(self) -> dict:
        """The config as JSON-ready Python values (shaped as a config file would give them)."""
        unbatch = (lambda a: a[0].tolist()) if self.single else (lambda a: a.tolist())
        return {
            "inputs": unbatch(self.inputs),
            "targets": unbatch(self.targets),
            "layers": [
                {
                    "weights": layer.weights.tolist(),
                    "bias": layer.bias.tolist(),
                    "activation": layer.activation,
                }
                for layer in self.layers
            ],
            "loss": self.loss,
            "learning_rate": self.learning_rate,
        }


def _same_layer(a: TraceLayer, b: TraceLayer) -> bool:
    return (
        a.activation == b.activation
        and np.array_equal(a.weights, b.weights)
        and a.bias.shape == b.bias.shape
        and np.array_equal(a.bias, b.bias)
    )


def seed_config() -> dict:
    """The seed tutorial's example as a trace config (a fresh dict)."""
    from .. import seed

    return {
        "inputs": list(seed.SEED_INPUTS),
        "targets": list(seed.SEED_TARGETS),
        "layers": [
            {
                "weights": [list(row) for row in seed.SEED_W_INPUT_HIDDEN],
                "bias": seed.SEED_BIASES[0],
                "activation": "sigmoid",
            },
            {
                "weights": [list(row) for row in seed.SEED_W_HIDDEN_OUTPUT],
                "bias": seed.SEED_BIASES[1],
                "activation": "sigmoid",
            },
        ],
        "loss": "half_sse",
        "learning_rate": seed.SEED_LEARNING_RATE,
    }


def traceable_losses() -> list[str]:
    """The losses a trace can break into per-output terms (those with ``Loss.terms``), sorted."""
    from ..losses import LOSSES

    return sorted(name for name, loss in LOSSES.items() if loss.terms is not None)


# --------------------------------------------------------------------------------------------
# Reading values: each helper names the key it reads in its error
# --------------------------------------------------------------------------------------------


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _shown(value) -> str:
    """``value`` as the error message shows it: JSON, cut to 60 characters."""
    text = (
        json.dumps(value)
        if isinstance(value, (list, dict, str, int, float, bool, type(None)))
        else repr(value)
    )
    return text if len(text) <= 60 else text[:57] + "..."


def _is_finite(value) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # a JSON integer beyond float range, such as 1e400 written out
        return False


def _number(value, where: str) -> float:
    if not _is_number(value):
        raise ConfigError(f"config: {where} must be a number, got {_shown(value)}")
    if not _is_finite(value):
        raise ConfigError(f"config: {where} must be a finite number, got {_shown(value)}")
    return float(value)


def _vector(value, where: str) -> list:
    if not isinstance(value, list) or not value:
        raise ConfigError(
            f"config: {where} must be a non-empty list of numbers, got {_shown(value)}"
        )
    return [_number(entry, f"{where}[{i}]") for i, entry in enumerate(value)]


def _examples(value, where: str) -> tuple[np.ndarray, bool]:
    """One example (a list of numbers) or several (a list of equally long lists)."""
    if isinstance(value, list) and value and all(isinstance(e, list) for e in value):
        rows = [_vector(entry, f"{where}[{i}]") for i, entry in enumerate(value)]
        for i, row in enumerate(rows):
            if len(row) != len(rows[0]):
                raise ConfigError(
                    f"config: {where}[{i}] has {len(row)} numbers but {where}[0] has "
                    f"{len(rows[0])}; expected every example to have the same length"
                )
        return np.asarray(rows, np.float64), False
    if isinstance(value, list) and any(isinstance(e, list) for e in value):
        raise ConfigError(
            f"config: {where} mixes numbers and lists; expected one example "
            f"(a list of numbers) or a list of examples (a list of lists)"
        )
    return np.asarray([_vector(value, where)], np.float64), True


def _matrix(value, where: str) -> np.ndarray:
    if not isinstance(value, list) or not value or not all(isinstance(r, list) for r in value):
        raise ConfigError(
            f"config: {where} must be a non-empty list of rows (weights[i][j] "
            f"joins input i to neuron j), got {_shown(value)}"
        )
    rows = [_vector(row, f"{where}[{i}]") for i, row in enumerate(value)]
    for i, row in enumerate(rows):
        if len(row) != len(rows[0]):
            raise ConfigError(
                f"config: {where} is ragged: row {i} has {len(row)} entries but row 0 has "
                f"{len(rows[0])}; expected every row to have one entry per neuron"
            )
    return np.asarray(rows, np.float64)


def _check_keys(obj: dict, allowed, where: str) -> None:
    unknown = [key for key in obj if key not in allowed]
    if unknown:
        raise ConfigError(
            f"config: unknown key {unknown[0]!r} in {where}; expected keys: {', '.join(allowed)}"
        )


# --------------------------------------------------------------------------------------------
# The parts of a config
# --------------------------------------------------------------------------------------------


def _inputs_and_targets(obj: dict) -> tuple[np.ndarray, np.ndarray, bool]:
    inputs, single = _examples(obj["inputs"], "inputs")
    targets, single_targets = _examples(obj["targets"], "targets")
    if single != single_targets or len(inputs) != len(targets):
        written = {True: "(one list of numbers)", False: "(a list of lists)"}
        raise ConfigError(
            f"config: inputs give {len(inputs)} example(s) {written[single]} but targets give "
            f"{len(targets)} {written[single_targets]}; "
            f"expected one target per example, written the same way"
        )
    return inputs, targets, single


def _bias(raw, where: str, width: int) -> np.ndarray:
    if not isinstance(raw, list):
        return np.asarray(_number(raw, where), np.float64)
    bias = np.asarray(_vector(raw, where), np.float64)
    if bias.shape[0] != width:
        raise ConfigError(
            f"config: {where} has {bias.shape[0]} entries but the layer has {width} neurons; "
            f"expected one number (shared) or {width} (one per neuron)"
        )
    return bias


def _activation(raw, where: str) -> str:
    from ..layers import ACTIVATIONS

    if not isinstance(raw, str) or raw not in ACTIVATIONS:
        raise ConfigError(
            f"config: {where} is {_shown(raw)}; expected one of: {', '.join(sorted(ACTIVATIONS))}"
        )
    return raw


def _layer(raw, index: int, input_width: int) -> TraceLayer:
    where = f"layers[{index}]"
    if not isinstance(raw, dict):
        raise ConfigError(
            f"config: {where} must be an object with keys "
            f"{', '.join(_LAYER_KEYS)}, got {_shown(raw)}"
        )
    _check_keys(raw, _LAYER_KEYS, where)
    for key in ("weights", "activation"):
        if key not in raw:
            raise ConfigError(
                f"config: {where} is missing key {key!r}; expected keys: "
                f"weights, activation (and optionally bias)"
            )
    weights = _matrix(raw["weights"], f"{where}.weights")
    if weights.shape[0] != input_width:
        previous = "the inputs have" if index == 0 else f"layer {index - 1} has"
        raise ConfigError(
            f"config: {where}.weights has {weights.shape[0]} rows but {previous} "
            f"width {input_width}; expected {input_width} rows "
            f"(weights[i][j] joins input i to neuron j)"
        )
    bias = _bias(raw.get("bias", 0.0), f"{where}.bias", weights.shape[1])
    return TraceLayer(weights, bias, _activation(raw["activation"], f"{where}.activation"))


def _layers(raw_layers, input_width: int) -> tuple:
    if not isinstance(raw_layers, list) or not raw_layers:
        raise ConfigError(
            f"config: layers must be a non-empty list of layer objects, got {_shown(raw_layers)}"
        )
    layers, width = [], input_width
    for index, raw in enumerate(raw_layers):
        layers.append(_layer(raw, index, width))
        width = layers[-1].width
    return tuple(layers)


def _loss(obj: dict) -> str:
    loss = obj.get("loss", _DEFAULT_LOSS)
    names = traceable_losses()
    if not isinstance(loss, str) or loss not in names:
        raise ConfigError(f"config: loss is {_shown(loss)}; expected one of: {', '.join(names)}")
    return loss


def _learning_rate(obj: dict) -> float:
    rate = obj.get("learning_rate", _DEFAULT_LEARNING_RATE)
    if not _is_number(rate) or not _is_finite(rate) or rate <= 0:
        raise ConfigError(
            f"config: learning_rate is {_shown(rate)}; expected a positive finite number"
        )
    return float(rate)


def parse_config(obj: Any) -> TraceConfig:
    """Validate a trace config (a dict, as read from JSON) and return a :class:`TraceConfig`.

    Raises :class:`ConfigError` (a ``ValueError``) naming the key or layer that is wrong, what
    it holds and what was expected.
    """
    if not isinstance(obj, dict):
        raise ConfigError(
            f"config: expected a JSON object with keys {', '.join(_TOP_KEYS)}, got {_shown(obj)}"
        )
    _check_keys(obj, _TOP_KEYS, "the top level")
    for key in ("inputs", "targets", "layers"):
        if key not in obj:
            raise ConfigError(
                f"config: missing key {key!r}; expected keys: inputs, targets, "
                f"layers (and optionally loss, learning_rate)"
            )
    inputs, targets, single = _inputs_and_targets(obj)
    layers = _layers(obj["layers"], inputs.shape[1])
    if targets.shape[1] != layers[-1].width:
        raise ConfigError(
            f"config: targets have {targets.shape[1]} numbers per example but the last layer "
            f"(layers[{len(layers) - 1}]) has {layers[-1].width} neurons; "
            f"expected {layers[-1].width}"
        )
    return TraceConfig(inputs, targets, layers, _loss(obj), _learning_rate(obj), single)


def load_config(path: str | os.PathLike) -> TraceConfig:
    """Read and validate a JSON trace config file (see the module docstring for the format)."""
    shown = repr(os.fspath(path))
    try:
        with open(path, encoding="utf-8") as file:
            text = file.read()
    except FileNotFoundError:
        raise ConfigError(f"config file {shown} not found") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {shown} is a directory; expected a JSON file") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {shown} is not UTF-8 text: {e}") from None
    try:
        obj = json.loads(text)
    except RecursionError:  # json recurses per nesting level
        raise ConfigError(
            f"config file {shown} is nested too deeply; expected a JSON object "
            f"of inputs, targets and layers"
        ) from None
    except json.JSONDecodeError as e:
        raise ConfigError(
            f"config file {shown} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}"
        ) from None
    return parse_config(obj)
