"""Named model presets: a model description plus the settings that train it well.

``jaxbp train --model NAME`` trains preset ``NAME``; ``--model FILE.json`` (or a JSON string)
trains any description (:mod:`jaxbp.model`) with the dataset's MLP training settings. A preset
is registered with one call::

    register_preset(
        "cnn",
        lambda num_outputs: {"name": "serial", "layers": [..., {"name": "Dense",
                                                             "out_dim": num_outputs}]},
        dataset="mnist1d",          # the dataset it trains on by default
        input_shape=(40, 1),        # each example reshaped to this (None: flat features)
        fused=False,                # one jitted call per step (convolutions: see make_loop)
        augment={"shift": 4},       # random circular shifts of the training batches
        optimizer="adam", lr=3e-3, epochs=30, batch_size=64, loss="softmax_cross_entropy")

``model`` is a description or a function ``num_outputs -> description`` (the output width
comes from the dataset). A preset may be registered again for one dataset
(``dataset=..., for_dataset=True``): ``get_preset(name, dataset)`` prefers that variant. The
per-dataset MLPs of :data:`jaxbp.data.DATASET_DEFAULTS` are the ``"mlp"`` preset's variants;
an MLP preset has ``model=None``: its description is built by :func:`mlp_description` from
the ``hidden`` and ``activation`` settings (which ``--hidden``/``--activation`` override).

Registering imports no JAX (descriptions are plain data); only :func:`mlp_description` does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

__all__ = [
    "Preset",
    "TRAINING_KEYS",
    "register_preset",
    "get_preset",
    "preset_names",
    "mlp_description",
    "output_activation",
]

# Settings a preset may carry (the rest of TrainConfig is about the run, not the model).
TRAINING_KEYS = (
    "hidden",
    "activation",
    "output_activation",
    "loss",
    "optimizer",
    "lr",
    "schedule",
    "weight_decay",
    "epochs",
    "batch_size",
)
AUGMENTS = ("shift",)


@dataclasses.dataclass(frozen=True)
class Preset:
    """A model and how to train it (see the module docstring)."""

    name: str
    model: Mapping | Callable[[int], Mapping] | None
    dataset: str | None = None
    input_shape: tuple | None = None
    fused: bool = True
    augment: Mapping | None = None
    defaults: Mapping = dataclasses.field(default_factory=dict)

    @property
    def is_mlp(self) -> bool:
        """Built from ``hidden``/``activation`` (:func:`mlp_description`), not a fixed model."""
        return self.model is None

    def description(self, num_outputs: int) -> dict:
        """The model's description for ``num_outputs`` outputs (not for MLP presets)."""
        if self.model is None:
            raise ValueError(f"preset {self.name!r} is an MLP: use mlp_description")
        model = self.model(num_outputs) if callable(self.model) else self.model
        return dict(model)


# (name, dataset or None) -> Preset
_PRESETS: dict[tuple[str, str | None], Preset] = {}


def _check_preset(name, input_shape, augment, defaults) -> None:
    if not isinstance(name, str) or not name or name.endswith(".json") or "{" in name:
        raise ValueError(f"a preset name must be a plain word, got {name!r}")
    unknown = sorted(set(defaults) - set(TRAINING_KEYS))
    if unknown:
        raise ValueError(
            f"preset {name!r}: unknown setting(s) {', '.join(unknown)}; expected "
            f"some of: {', '.join(TRAINING_KEYS)}"
        )
    if input_shape is not None and (
        not isinstance(input_shape, (tuple, list))
        or not all(isinstance(d, int) and d >= 1 for d in input_shape)
    ):
        raise ValueError(
            f"preset {name!r}: input_shape must be a tuple of positive integers "
            f"such as (40, 1), got {input_shape!r}"
        )
    for key, value in dict(augment or {}).items():
        if key not in AUGMENTS or not isinstance(value, int) or value < 0:
            raise ValueError(
                f"preset {name!r}: augment expects {{'shift': N}} with N >= 0, "
                f"got {dict(augment)!r}"
            )


def register_preset(
    name: str,
    model,
    *,
    dataset: str | None = None,
    input_shape: tuple | None = None,
    fused: bool = True,
    augment: Mapping | None = None,
    for_dataset: bool = False,
    **defaults: Any,
) -> Preset:
    """Register preset ``name`` (see the module docstring); returns it.

    ``for_dataset=True`` registers the variant used when training on ``dataset`` (as the
    ``"mlp"`` preset has one per dataset); otherwise this is the preset itself, and ``dataset``
    is the one it trains on when ``--dataset`` is not given.
    """
    _check_preset(name, input_shape, augment, defaults)
    if for_dataset and dataset is None:
        raise ValueError(f"preset {name!r}: for_dataset=True needs dataset=")
    preset = Preset(
        name,
        model,
        dataset,
        None if input_shape is None else tuple(input_shape),
        bool(fused),
        None if augment is None else dict(augment),
        dict(defaults),
    )
    _PRESETS[(name, dataset if for_dataset else None)] = preset
    return preset


def preset_names() -> list[str]:
    """Every registered preset name, sorted."""
    return sorted({name for name, _ in _PRESETS})


def get_preset(name: str, dataset: str | None = None) -> Preset:
    """Preset ``name``: its variant for ``dataset`` if there is one, else the preset itself."""
    for key in ((name, dataset), (name, None)):
        if key in _PRESETS:
            return _PRESETS[key]
    if any(n == name for n, _ in _PRESETS):
        known = sorted(d for n, d in _PRESETS if n == name and d)
        raise ValueError(
            f"preset {name!r} has no variant for dataset {dataset!r}; expected "
            f"one of: {', '.join(known)}"
        )
    raise ValueError(
        f"unknown model {name!r}; expected a preset ({', '.join(preset_names())}) "
        f"or a JSON file holding a model description"
    )


def output_activation(activation: str, output: str, loss: str) -> str | None:
    """The activation after the last layer: ``output`` unless it is ``"auto"``, which means
    none (logits), except a sigmoid for a sigmoid network trained on a squared error (the seed
    tutorial's all-sigmoid network)."""
    if output != "auto":
        return None if output == "identity" else output
    if activation == "sigmoid" and loss in ("half_sse", "mse"):
        return "sigmoid"
    return None


def _activation_description(name: str) -> dict:
    # Activations register under their layer names ("Relu", "LeakyRelu", ...).
    from .layers import activation
    from .model import describe

    return describe(activation(name))


def mlp_description(
    hidden,
    activation: str,
    num_outputs: int,
    *,
    output: str | None = None,
    dtype: str | None = "float32",
) -> dict:
    """``Dense(h) -> activation`` for each width of ``hidden``, then ``Dense(num_outputs)``
    and ``output`` (an activation name, or ``None``): the description of a plain MLP."""

    def dense(width):
        return {"name": "Dense", "out_dim": int(width), **({"dtype": dtype} if dtype else {})}

    layers = []
    for width in hidden:
        layers += [dense(width), _activation_description(activation)]
    layers.append(dense(num_outputs))
    if output is not None:
        layers.append(_activation_description(output))
    return {"name": "serial", "layers": layers}


def _register_dataset_mlps() -> None:
    from .data import DATASET_DEFAULTS

    for dataset, settings in DATASET_DEFAULTS.items():
        register_preset("mlp", None, dataset=dataset, for_dataset=True, **settings)
    register_preset("mlp", None, dataset="digits", **DATASET_DEFAULTS["digits"])


_register_dataset_mlps()


def _conv1d(channels: int, kernel: int, stride: int = 1, padding="SAME") -> dict:
    return {
        "name": "Conv1D",
        "out_channels": channels,
        "kernel_size": kernel,
        "stride": stride,
        "padding": padding,
    }


def mnist1d_cnn(num_outputs: int) -> dict:
    """The MNIST-1D paper's ConvBase: three Conv1D of 25 channels (kernels 5, 3, 3, stride 2,
    padding 1) with ReLU, flattened into Dense; 5,210 params for 10 classes."""
    layers = []
    for kernel in (5, 3, 3):
        layers += [_conv1d(25, kernel, 2, 1), {"name": "Relu"}]
    return {
        "name": "serial",
        "layers": [*layers, {"name": "Flatten"}, {"name": "Dense", "out_dim": num_outputs}],
    }


def mnist1d_resnet(
    num_outputs: int, channels: int = 32, blocks: int = 4, stem_kernel: int = 3
) -> dict:
    """A small residual 1-D network: a stride-2 stem, ``blocks`` residual blocks of two 3-wide
    convolutions with BatchNorm (``y = relu(x + bn(conv(relu(bn(conv(x))))))``), global
    average pooling, Dense; about 26k params with 32 channels and 4 blocks."""

    def block():
        return {
            "name": "residual",
            "layers": [
                _conv1d(channels, 3),
                {"name": "BatchNorm"},
                {"name": "Relu"},
                _conv1d(channels, 3),
                {"name": "BatchNorm"},
            ],
        }

    body = []
    for _ in range(blocks):
        body += [block(), {"name": "Relu"}]
    return {
        "name": "serial",
        "layers": [
            _conv1d(channels, stem_kernel, 2),
            {"name": "BatchNorm"},
            {"name": "Relu"},
            *body,
            {"name": "GlobalAvgPool"},
            {"name": "Dense", "out_dim": num_outputs},
        ],
    }


def digits_cnn(num_outputs: int) -> dict:
    """scikit-learn's 8x8 digits as images: two 3x3 Conv2D + ReLU + 2x2 max-pool stages (32
    and 64 channels), flattened, Dropout 0.3, Dense."""

    def stage(channels):
        return [
            {"name": "Conv2D", "out_channels": channels, "kernel_size": 3, "padding": "SAME"},
            {"name": "Relu"},
            {"name": "MaxPool2D", "window": 2},
        ]

    return {
        "name": "serial",
        "layers": [
            *stage(32),
            *stage(64),
            {"name": "Flatten"},
            {"name": "Dropout", "rate": 0.3},
            {"name": "Dense", "out_dim": num_outputs},
        ],
    }


def mnist1d_rnn(num_outputs: int, kind: str = "GRU", hidden: int = 6) -> dict:
    """The MNIST-1D paper's recurrent model: a bidirectional ``kind`` (GRU or LSTM) over the
    40 steps of one input each, every step's output flattened into Dense; 5,134 params for a
    GRU of hidden 6 and 10 classes."""
    cell = {"name": kind, "hidden": hidden, "return_sequences": True}
    return {
        "name": "serial",
        "layers": [
            {"name": "bidirectional", "layer": cell},
            {"name": "Flatten"},
            {"name": "Dense", "out_dim": num_outputs},
        ],
    }


def _register_network_presets() -> None:
    # Convolutions train one jitted call per step (fused=False): on XLA CPU a lax.scan whose
    # body holds convolutions is many times slower than the same steps called one by one (W4,
    # W5 in benchmarks/: 11x, 33x). The GRU and LSTM presets too: fused is only ~5% faster (W6).
    common: dict[str, Any] = dict(loss="softmax_cross_entropy", optimizer="adam", fused=False)
    mnist1d: dict[str, Any] = dict(dataset="mnist1d", input_shape=(40, 1), augment={"shift": 4})
    cosine: dict[str, Any] = dict(lr=1e-2, schedule="cosine", epochs=200, batch_size=100)
    register_preset("cnn", mnist1d_cnn, **mnist1d, **cosine, **common)
    register_preset(
        "resnet",
        mnist1d_resnet,
        **mnist1d,
        lr=1e-2,
        schedule="warmup_cosine",
        weight_decay=0.2,
        epochs=150,
        batch_size=128,
        **common,
    )
    for name, kind in (("gru", "GRU"), ("lstm", "LSTM")):
        rnn = lambda n, kind=kind: mnist1d_rnn(n, kind)
        register_preset(name, rnn, **mnist1d, **cosine, **common)
    register_preset(
        "cnn",
        digits_cnn,
        dataset="digits",
        for_dataset=True,
        input_shape=(8, 8, 1),
        lr=3e-3,
        schedule="cosine",
        weight_decay=0.05,
        epochs=40,
        batch_size=32,
        **common,
    )


_register_network_presets()


def gpt_description(
    vocab_size: int, *, layers: int = 4, heads: int = 4, width: int = 128, context: int = 128
) -> dict:
    """A character-level GPT (GPT-2's pre-norm block, as llm.c and nanoGPT): token and learned
    position embeddings, ``layers`` blocks of ``x + attention(layernorm(x))`` (causal, ``heads``
    heads) and ``x + mlp(layernorm(x))`` (``Dense(4 width) -> Gelu -> Dense(width)``), a final
    LayerNorm and ``Dense(vocab_size)`` logits. 836k params with the defaults and 103
    characters."""

    def block():
        attention = {
            "name": "residual",
            "layers": [
                {"name": "LayerNorm"},
                {"name": "MultiHeadAttention", "num_heads": heads, "causal": True},
            ],
        }
        mlp = {
            "name": "residual",
            "layers": [
                {"name": "LayerNorm"},
                {"name": "Dense", "out_dim": 4 * width},
                {"name": "Gelu"},
                {"name": "Dense", "out_dim": width},
            ],
        }
        return [attention, mlp]

    body = [layer for _ in range(layers) for layer in block()]
    return {
        "name": "serial",
        "layers": [
            {"name": "Embedding", "vocab_size": vocab_size, "dim": width},
            {"name": "PositionalEmbedding", "max_len": context, "dim": width},
            *body,
            {"name": "LayerNorm"},
            {"name": "Dense", "out_dim": vocab_size},
        ],
    }


def _register_gpt() -> None:
    from .data import TEXT_DEFAULTS

    # input_shape=(context,): each example is a window of that many characters. fused=True:
    # unlike the convolutions, the transformer's steps run faster inside one lax.scan per epoch
    # (checked step 552-593 ms against 671-743 ms called one by one; W7 in benchmarks/).
    register_preset(
        "gpt", gpt_description, dataset="text", input_shape=(128,), fused=True, **TEXT_DEFAULTS
    )


_register_gpt()


def llama_description(
    vocab_size: int,
    *,
    layers: int = 4,
    heads: int = 4,
    kv_heads: int = 2,
    width: int = 128,
    hidden: int = 352,
    block_size: int | None = None,
) -> dict:
    """A character-level Llama, sized like the ``gpt`` preset: a token embedding (no learned
    positions: rotary ones inside attention), ``layers`` blocks of ``x + attention(rmsnorm(x))``
    (causal, ``heads`` query heads sharing ``kv_heads`` key/value heads, rope, no biases) and
    ``x + swiglu(rmsnorm(x))`` (``hidden`` about ``2/3 * 4 * width``, as Llama sizes it), a
    final RMSNorm and logits through the embedding matrix transposed (``tied``). The logits
    keep ``Dense``'s bias, the one bias left (``Dense`` has no bias-free form)."""
    attention = {
        "name": "MultiHeadAttention",
        "num_heads": heads,
        "causal": True,
        "num_kv_heads": kv_heads,
        "rope": True,
        "bias": False,
        **({} if block_size is None else {"block_size": block_size}),
    }
    block = [
        {"name": "residual", "layers": [{"name": "RMSNorm"}, attention]},
        {"name": "residual", "layers": [{"name": "RMSNorm"}, {"name": "SwiGLU", "hidden": hidden}]},
    ]
    head = 1 + 2 * layers + 1  # embedding, the blocks, the final RMSNorm, then the logits
    return {
        "name": "tied",
        "layers": [
            {"name": "Embedding", "vocab_size": vocab_size, "dim": width},
            *(layer for _ in range(layers) for layer in block),
            {"name": "RMSNorm"},
            {"name": "Dense", "out_dim": vocab_size},
        ],
        "source": "0.W",
        "target": f"{head}.W",
        "transpose": True,
    }


def _register_llama() -> None:
    from .data import TEXT_DEFAULTS

    # As the gpt preset: windows of 128 characters, one lax.scan per epoch.
    register_preset(
        "llama", llama_description, dataset="text", input_shape=(128,), fused=True, **TEXT_DEFAULTS
    )


_register_llama()
