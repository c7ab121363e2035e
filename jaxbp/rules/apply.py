"""A learning rule applied to a whole network, or to its description."""

from __future__ import annotations

import jax

from ..errors import ArgumentError
from ..layers import Layer, concat, explicit_init, output_shape, residual, serial
from ..model import build, describe
from .check import RULE_NAMES, check_rule
from .feedback import (
    FEEDBACK_LAYERS,
    RULE_LAYERS,
    DirectFeedbackAlignment,
    FeedbackAlignment,
    KolenPollack,
    SignSymmetry,
    check_dfa_network,
)

__all__ = ["apply_rule", "apply_rule_to_description"]

_WRAPPERS = {"fa": FeedbackAlignment, "kp": KolenPollack, "sign": SignSymmetry}


def _has_params(layer: Layer, input_shape) -> bool:
    found = []

    def params_only():
        _, params = layer.init(jax.random.key(0), tuple(input_shape))
        found.append(bool(jax.tree_util.tree_leaves(params)))
        return params

    jax.eval_shape(params_only)
    return found[0]


def _wrap(layer: Layer, rule: str, shape, where: str) -> Layer:
    if layer.name in RULE_LAYERS:  # a layer given its own rule keeps it
        return layer
    if layer.name in ("serial", "residual"):
        # A wrapper hides its layer's config from serial, which would resolve w_init="auto"
        # by the layer that follows: make that choice explicit before wrapping.
        children, new = explicit_init(layer.children), []
        for i, child in enumerate(children):
            new.append(_wrap(child, rule, shape, f"{where}.layers[{i}]"))
            shape = output_shape(child, shape)
        return (serial if layer.name == "serial" else residual)(*new)
    if layer.name == "concat":
        return concat(
            *[_wrap(c, rule, shape, f"{where}.layers[{i}]") for i, c in enumerate(layer.children)]
        )
    if layer.name in FEEDBACK_LAYERS:
        return _WRAPPERS[rule](layer)
    if not _has_params(layer, shape):
        return layer
    raise ValueError(
        f"{where}: learning rule {rule} ({RULE_NAMES[rule]}) is not defined for "
        f"layer {layer.name}; it is defined for {', '.join(FEEDBACK_LAYERS)} and "
        f"parameter-free layers"
    )


def apply_rule(net: Layer, rule: str, input_shape) -> Layer:
    """``net`` learning by ``rule`` (one of :data:`RULES`) on inputs of ``input_shape``.

    ``"bp"`` returns ``net``; ``"fa"``, ``"kp"``, ``"sign"`` wrap every ``Dense``/``Conv``
    layer (inside ``serial``, ``residual``, ``concat``); ``"dfa"`` wraps the whole serial
    network. A layer with parameters that the rule is not defined for is a ``ValueError``
    naming it; a layer already wrapped by a rule keeps its own.
    """
    check_rule(rule)
    if not isinstance(net, Layer):
        raise ArgumentError(f"apply_rule expects a jaxbp Layer, got {net!r}")
    shape = tuple(input_shape)
    if rule == "bp":
        return net
    if rule != "dfa":
        return _wrap(net, rule, shape, "model")
    if net.name == "DirectFeedbackAlignment":
        return net
    check_dfa_network(net)
    dfa = DirectFeedbackAlignment(serial(*explicit_init(net.children)))
    try:
        output_shape(dfa, shape)  # the per-layer checks need the params
    except ValueError as e:
        raise ValueError(f"model: {e}") from None
    return dfa


def apply_rule_to_description(description: dict, rule: str, input_shape, modules=()) -> dict:
    """:func:`apply_rule` on a model description: the description of the result (``modules``
    as :func:`jaxbp.model.build`'s)."""
    return describe(apply_rule(build(description, modules=modules), rule, input_shape))
