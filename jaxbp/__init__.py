"""jaxbp: explicit, verified backpropagation in JAX.

Every layer carries a hand-derived backward pass; every train step can check it against
``jax.grad`` before it applies the update::

    net = jaxbp.serial(jaxbp.Dense(64), jaxbp.Tanh, jaxbp.Dense(10))
    out_shape, params = net.init(jax.random.key(0), (-1, 784))
    value, grads = jaxbp.backprop(net, jaxbp.softmax_cross_entropy, params, x, y)
    step = jaxbp.make_train_step(net, jaxbp.softmax_cross_entropy, optax.adam(1e-3))
"""

from . import rules
from .attention import Embedding, LayerNorm, MultiHeadAttention, PositionalEmbedding
from .backprop import (
    autodiff,
    backprop,
    backprop_and_autodiff,
    check_inputs,
    check_params,
    forward,
    loss_fn,
)
from .conv import (
    AvgPool1D,
    AvgPool2D,
    Conv1D,
    Conv2D,
    Flatten,
    GlobalAvgPool,
    MaxPool1D,
    MaxPool2D,
)
from .diagnose import Culprit, diagnose, locate
from .errors import ArgumentError, UserError
from .gradcheck import (
    GradCheck,
    GradientMismatchError,
    GradReport,
    check_grads,
    check_layer,
    compare_grads,
    default_tolerance,
    fd_tolerance,
    finite_difference_grads,
    unchecked_report,
)
from .interop import as_custom_vjp, check_vjp, check_vjp_fd, from_custom_vjp
from .layers import (
    ACTIVATIONS,
    Context,
    Dense,
    Gelu,
    Identity,
    InputShapeError,
    Layer,
    LeakyRelu,
    Relu,
    Sigmoid,
    Softplus,
    Tanh,
    activation,
    apply,
    concat,
    elementwise,
    glorot_uniform,
    he_normal,
    init_state,
    output_shape,
    residual,
    serial,
    stateful,
)
from .llama import RMSNorm, SwiGLU, tied
from .losses import (
    LOSSES,
    Loss,
    get_loss,
    half_sse,
    mse,
    sigmoid_binary_cross_entropy,
    softmax_cross_entropy,
)
from .model import build, describe, layer_names, load_description, register_layer
from .norm import BatchNorm, Dropout
from .probe import VerifyState, init_verify_state, layer_paths
from .recurrent import GRU, LSTM, bidirectional, from_torch_state_dict
from .rules import (
    DirectFeedbackAlignment,
    FeedbackAlignment,
    KolenPollack,
    SignSymmetry,
    apply_rule,
)
from .seed import seed_network, seed_problem
from .train import (
    CHECK_MODES,
    REASON_APPLIED,
    REASON_MISMATCH,
    REASON_NONFINITE,
    REASONS,
    FitResult,
    SgdState,
    StepMetrics,
    TrainState,
    biases,
    fit,
    freeze,
    init_train_state,
    make_loop,
    make_train_step,
    sgd,
    train_step,
    with_verify,
)

# Every public name above, grouped by the module it comes from (as the imports are).
__all__ = [
    # submodules
    # jaxbp.probe and jaxbp.diagnose: the per-layer probe, the culprit and the diagnosis
    "VerifyState",
    "init_verify_state",
    "layer_paths",
    "Culprit",
    "diagnose",
    "locate",
    "with_verify",
    "rules",
    # jaxbp.attention
    "Embedding",
    "LayerNorm",
    "MultiHeadAttention",
    "PositionalEmbedding",
    # jaxbp.backprop
    "autodiff",
    "backprop",
    "backprop_and_autodiff",
    "check_inputs",
    "check_params",
    "forward",
    "loss_fn",
    # jaxbp.conv
    "AvgPool1D",
    "AvgPool2D",
    "Conv1D",
    "Conv2D",
    "Flatten",
    "GlobalAvgPool",
    "MaxPool1D",
    "MaxPool2D",
    # jaxbp.gradcheck
    "GradCheck",
    "GradientMismatchError",
    "GradReport",
    "check_grads",
    "check_layer",
    "compare_grads",
    "default_tolerance",
    "fd_tolerance",
    "finite_difference_grads",
    "unchecked_report",
    # jaxbp.interop
    "as_custom_vjp",
    "check_vjp",
    "check_vjp_fd",
    "from_custom_vjp",
    # jaxbp.errors
    "ArgumentError",
    "UserError",
    # jaxbp.layers
    "ACTIVATIONS",
    "Context",
    "Dense",
    "Gelu",
    "Identity",
    "InputShapeError",
    "Layer",
    "LeakyRelu",
    "Relu",
    "Sigmoid",
    "Softplus",
    "Tanh",
    "activation",
    "apply",
    "concat",
    "elementwise",
    "glorot_uniform",
    "he_normal",
    "init_state",
    "output_shape",
    "residual",
    "serial",
    "stateful",
    # jaxbp.losses
    "LOSSES",
    "Loss",
    "get_loss",
    "half_sse",
    "mse",
    "sigmoid_binary_cross_entropy",
    "softmax_cross_entropy",
    # jaxbp.model
    "build",
    "describe",
    "layer_names",
    "load_description",
    "register_layer",
    # jaxbp.llama
    "RMSNorm",
    "SwiGLU",
    "tied",
    # jaxbp.norm
    "BatchNorm",
    "Dropout",
    # jaxbp.recurrent
    "GRU",
    "LSTM",
    "bidirectional",
    "from_torch_state_dict",
    # jaxbp.rules
    "DirectFeedbackAlignment",
    "FeedbackAlignment",
    "KolenPollack",
    "SignSymmetry",
    "apply_rule",
    # jaxbp.seed
    "seed_network",
    "seed_problem",
    # jaxbp.train
    "CHECK_MODES",
    "REASON_APPLIED",
    "REASON_MISMATCH",
    "REASON_NONFINITE",
    "REASONS",
    "FitResult",
    "SgdState",
    "StepMetrics",
    "TrainState",
    "biases",
    "fit",
    "freeze",
    "init_train_state",
    "make_loop",
    "make_train_step",
    "sgd",
    "train_step",
]

__version__ = "0.1.0"
