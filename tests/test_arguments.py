"""One error per kind of mistake, in every layer family; descriptions that round-trip.

Every bad constructor argument is a :class:`jaxbp.ArgumentError` (also a ``TypeError`` and a
``ValueError``), raised by the shared checkers of :mod:`jaxbp.arguments`; an input that does not
fit a layer is an :class:`jaxbp.InputShapeError`. Construction only: these tests are fast.
"""

from __future__ import annotations

import inspect
import math

import jax
import jax.numpy as jnp
import pytest

import jaxbp
from jaxbp import arguments
from jaxbp.errors import ArgumentError, InputShapeError, UserError
from jaxbp.llama import RMSNorm, SwiGLU
from jaxbp.model import build, describe

# layer family -> (factory, the keyword that is a size, the valid call's other arguments)
SIZES = {
    "Dense": (jaxbp.Dense, "out_dim", {}),
    "Conv1D": (jaxbp.Conv1D, "out_channels", {"kernel_size": 3}),
    "Conv2D": (jaxbp.Conv2D, "kernel_size", {"out_channels": 2}),
    "MaxPool1D": (jaxbp.MaxPool1D, "window", {}),
    "GRU": (jaxbp.GRU, "hidden", {}),
    "LSTM": (jaxbp.LSTM, "hidden", {}),
    "Embedding": (jaxbp.Embedding, "dim", {"vocab_size": 5}),
    "PositionalEmbedding": (jaxbp.PositionalEmbedding, "max_len", {"dim": 4}),
    "MultiHeadAttention": (jaxbp.MultiHeadAttention, "num_heads", {}),
    "SwiGLU": (SwiGLU, "hidden", {}),
}

# layer family -> a valid call, given extra keyword arguments
DTYPED = {
    "Dense": lambda **kw: jaxbp.Dense(3, **kw),
    "Conv1D": lambda **kw: jaxbp.Conv1D(2, 3, **kw),
    "Conv2D": lambda **kw: jaxbp.Conv2D(2, 3, **kw),
    "GRU": lambda **kw: jaxbp.GRU(3, **kw),
    "LSTM": lambda **kw: jaxbp.LSTM(3, **kw),
    "Embedding": lambda **kw: jaxbp.Embedding(5, 4, **kw),
    "PositionalEmbedding": lambda **kw: jaxbp.PositionalEmbedding(8, 4, **kw),
    "LayerNorm": lambda **kw: jaxbp.LayerNorm(**kw),
    "BatchNorm": lambda **kw: jaxbp.BatchNorm(**kw),
    "MultiHeadAttention": lambda **kw: jaxbp.MultiHeadAttention(2, **kw),
    "RMSNorm": lambda **kw: RMSNorm(**kw),
    "SwiGLU": lambda **kw: SwiGLU(8, **kw),
}

# layer family -> (factory, flag name, the valid call's other arguments)
FLAGS = {
    "Dense": (jaxbp.Dense, "shared_bias", {"out_dim": 3}),
    "GRU": (jaxbp.GRU, "reverse", {"hidden": 3}),
    "LSTM": (jaxbp.LSTM, "return_sequences", {"hidden": 3}),
    "MultiHeadAttention": (jaxbp.MultiHeadAttention, "causal", {"num_heads": 2}),
}

# layer family -> (factory, number argument)
NUMBERS = {
    "LayerNorm": (jaxbp.LayerNorm, "eps"),
    "BatchNorm": (jaxbp.BatchNorm, "eps"),
    "RMSNorm": (RMSNorm, "eps"),
    "Dropout": (jaxbp.Dropout, "rate"),
    "LeakyRelu": (jaxbp.LeakyRelu, "slope"),
    "MultiHeadAttention": (lambda **kw: jaxbp.MultiHeadAttention(2, **kw), "rope_theta"),
}


def test_the_error_classes():
    # Both built-in classes, so code that caught either before keeps catching the mistake.
    assert issubclass(ArgumentError, TypeError) and issubclass(ArgumentError, ValueError)
    assert issubclass(ArgumentError, UserError) and issubclass(InputShapeError, UserError)
    assert issubclass(InputShapeError, ValueError) and not issubclass(InputShapeError, TypeError)
    assert jaxbp.InputShapeError is InputShapeError and jaxbp.ArgumentError is ArgumentError


@pytest.mark.parametrize("family", sorted(SIZES))
@pytest.mark.parametrize("bad", [2.5, "4", True, 0, -1, None])
def test_a_bad_size_is_one_error_in_every_layer(family, bad):
    make, name, others = SIZES[family]
    with pytest.raises(ArgumentError, match=rf"^{family} expects .*positive integer") as e:
        make(**{**others, name: bad})
    assert name in str(e.value) and str(e.value).endswith(f"got {bad!r}")


@pytest.mark.parametrize("family", sorted(DTYPED))
@pytest.mark.parametrize("bad", ["int32", "bool", "not-a-dtype", 3])
def test_a_bad_dtype_is_one_error_in_every_layer(family, bad):
    with pytest.raises(ArgumentError, match=rf"^{family} expects dtype to be None or a floating"):
        DTYPED[family](dtype=bad)


@pytest.mark.parametrize("family", sorted(DTYPED))
def test_a_floating_dtype_is_kept(family):
    layer = DTYPED[family](dtype="float32")
    assert dict(layer.config)["dtype"] == "float32"


@pytest.mark.parametrize("family", sorted(FLAGS))
@pytest.mark.parametrize("bad", ["yes", 2, [True], None, 1.0])
def test_a_flag_takes_a_bool_only(family, bad):
    make, name, others = FLAGS[family]
    with pytest.raises(ArgumentError, match=rf"expects {name} to be True or False, got"):
        make(**{**others, name: bad})


@pytest.mark.parametrize("family", sorted(NUMBERS))
@pytest.mark.parametrize("bad", [math.nan, math.inf, "0.1", True, None])
def test_a_number_must_be_finite(family, bad):
    make, name = NUMBERS[family]
    with pytest.raises(ArgumentError, match=rf"^{family} expects {name} "):
        make(**{name: bad})


@pytest.mark.parametrize(
    "layer, message",
    [
        ({"out_dim": 2, "shared_bias": "yes"}, r"shared_bias to be True or False, got 'yes'"),
        ({"out_dim": 2, "shared_bias": 2}, r"shared_bias to be True or False, got 2"),
        ({"out_dim": 2, "shared_bias": [True]}, r"shared_bias to be True or False, got \(True,\)"),
        ({"out_dim": 2, "b_init": math.nan}, r"b_init to be a finite number or a function"),
        ({"out_dim": 2, "b_init": "3"}, r"b_init to be a finite number or a function, got '3'"),
        ({"out_dim": 2, "w_init": 3}, r"w_init must be 'auto', 'glorot', 'he' or a function"),
        ({"out_dim": 2.0}, r"positive integer out_dim, got 2.0"),
    ],
)
def test_model_file_mistakes_fail_when_built(layer, message):
    description = {"name": "serial", "layers": [{"name": "Dense", **layer}, {"name": "Tanh"}]}
    with pytest.raises(ArgumentError, match=rf"^model\.layers\[0\]: Dense expects|{message}") as e:
        build(description)
    assert str(e.value).startswith("model.layers[0]: Dense ")
    assert e.match(message)


def test_the_checkers_return_what_the_layer_stores():
    assert arguments.positive_int("L", "n", jnp.int32(3).item()) == 3
    assert arguments.flag("L", "f", jnp.bool_(True).item()) is True
    assert arguments.number("L", "x", 2) == 2.0 and isinstance(arguments.number("L", "x", 2), float)
    assert arguments.float_dtype("L", jnp.float32) == "float32"
    assert arguments.float_dtype("L", None) is None
    assert arguments.init_value("L", "b", 1) == 1.0


# --------------------------------------------------------------------------------------------
# Inputs: the same mistake, the same class
# --------------------------------------------------------------------------------------------


def test_batchnorm_width_and_dtype_errors():
    net = jaxbp.BatchNorm()
    _, params = net.init(jax.random.key(0), (-1, 3))
    state = jaxbp.init_state(net, (-1, 3))
    with pytest.raises(InputShapeError, match=r"^BatchNorm expects inputs with 3 features"):
        jaxbp.apply(net, params, state, jnp.ones((2, 4)))
    with pytest.raises(ArgumentError, match=r"^BatchNorm expects floating-point inputs"):
        jaxbp.apply(net, params, state, jnp.ones((2, 3), jnp.int32))


@pytest.mark.parametrize(
    "layer, shape",
    [(jaxbp.Dense(2), (2, 3)), (jaxbp.LayerNorm(), (2, 3)), (jaxbp.GRU(2), (2, 4, 3))],
)
def test_integer_inputs_are_one_error(layer, shape):
    _, params = layer.init(jax.random.key(0), shape)
    with pytest.raises(ArgumentError, match=r"expects floating-point inputs, got dtype int32"):
        jax.jit(layer.forward)(params, jnp.ones(shape, jnp.int32))


# --------------------------------------------------------------------------------------------
# describe / build
# --------------------------------------------------------------------------------------------

EXAMPLES = [
    jaxbp.Dense(3, shared_bias=True, w_init="he", b_init=0.5, dtype="float32"),
    jaxbp.Conv1D(2, 3, padding=[1, 2], stride=[1]),
    jaxbp.Conv2D(2, [3, 3], padding=[[1, 1], [0, 0]], dilation=(1, 2)),
    jaxbp.MaxPool2D([2, 2]),
    jaxbp.Flatten(3),
    jaxbp.GRU(4, reverse=True),
    jaxbp.MultiHeadAttention(2, causal=True, rope=True, bias=False),
    jaxbp.BatchNorm(momentum=0.5),
    jaxbp.Dropout(0.25),
    jaxbp.LeakyRelu(0.2),
    jaxbp.serial(jaxbp.Dense(4), jaxbp.Relu, jaxbp.residual(jaxbp.Dense(4), jaxbp.Tanh)),
]


@pytest.mark.parametrize("layer", EXAMPLES, ids=lambda layer: layer.name)
def test_build_of_describe_is_the_identity(layer):
    again = build(describe(layer))
    assert again.name == layer.name
    assert describe(again) == describe(layer)
    if layer.name != "serial":  # a combinator's config holds its children, new objects
        assert again.config == layer.config


@pytest.mark.parametrize("layer", EXAMPLES, ids=lambda layer: layer.name)
def test_configs_are_hashable(layer):
    # list-valued arguments (padding=[1, 1]) are stored as tuples: the compiled-step caches
    # key on configs
    hash(layer.config)
    hash(build(describe(layer)).config)


def test_describe_refuses_a_function_it_cannot_write():
    def my_init(key, shape, dtype):
        return jnp.zeros(shape, dtype)

    net = jaxbp.serial(jaxbp.Dense(3), jaxbp.Tanh, jaxbp.Dense(2, w_init=my_init))
    with pytest.raises(
        ArgumentError, match=r"^model\.layers\[2\]\.w_init: cannot describe .*my_init"
    ):
        describe(net)
    with pytest.raises(ArgumentError, match=r"w_init: cannot describe the function 'my_init'"):
        describe(jaxbp.Conv1D(2, 3, w_init=my_init))
    # the layer itself works: only writing it down is refused
    _, params = net.init(jax.random.key(0), (-1, 4))
    assert float(jnp.sum(jnp.abs(params[2]["W"]))) == 0.0


# --------------------------------------------------------------------------------------------
# train_step / fit: one validation, one default
# --------------------------------------------------------------------------------------------


def test_train_step_refuses_an_unknown_check_mode():
    net = jaxbp.serial(jaxbp.Dense(2))
    _, params = net.init(jax.random.key(0), (-1, 3))
    optimizer = jaxbp.sgd(0.1)
    ts = jaxbp.init_train_state(net, optimizer, params)
    x, y = jnp.ones((4, 3)), jnp.zeros((4, 2))
    with pytest.raises(ValueError, match=r"unknown check mode 'bogus'"):
        jaxbp.train_step(net, jaxbp.mse, optimizer, ts, x, y, check="bogus")


def test_fit_and_the_steps_default_to_the_same_check():
    defaults = {
        f.__name__: inspect.signature(f).parameters["check"].default
        for f in (jaxbp.fit, jaxbp.train_step, jaxbp.make_train_step)
    }
    assert set(defaults.values()) == {"report"}, defaults
