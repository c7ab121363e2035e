"""The optimizer of a network with a rule: fixed feedback matrices stay fixed."""

from __future__ import annotations

import functools

import jax

from ..layers import Layer
from ..train import freeze

__all__ = ["fixed_feedback", "optimizer"]


def _mask(layer: Layer, params):
    false = jax.tree_util.tree_map(lambda _: False, params)
    if layer.name == "FeedbackAlignment":
        return {**false, "B": True}
    if layer.name == "DirectFeedbackAlignment":
        inner = dict(layer.config)["layer"]
        return {
            "net": _mask(inner, params["net"]),
            "B": jax.tree_util.tree_map(lambda _: True, params["B"]),
        }
    if layer.name in ("serial", "residual", "concat") and isinstance(params, (tuple, list)):
        return tuple(_mask(c, p) for c, p in zip(layer.children, params))
    return false


def fixed_feedback(net: Layer, params):
    """A mask pytree shaped like ``params``: ``True`` for the fixed feedback matrices (the
    ``B`` of every ``FeedbackAlignment`` and ``DirectFeedbackAlignment``)."""
    return _mask(net, params)


def _has_fixed_feedback(layer: Layer) -> bool:
    if layer.name in ("FeedbackAlignment", "DirectFeedbackAlignment"):
        return True
    return any(_has_fixed_feedback(c) for c in layer.children)


def optimizer(opt, net: Layer):
    """``opt`` with the fixed feedback matrices of ``net`` frozen: no update, no weight decay
    (:func:`jaxbp.freeze`). KP's ``B`` is trained like ``W``; ``opt`` itself is returned when
    ``net`` has no fixed feedback. The same object for the same arguments (compiled once)."""
    try:
        return _frozen_optimizer(opt, net)
    except TypeError:  # something unhashable in the layer's config: no cache
        return _frozen_optimizer.__wrapped__(opt, net)


@functools.lru_cache(maxsize=32)
def _frozen_optimizer(opt, net: Layer):
    if not _has_fixed_feedback(net):
        return opt
    return freeze(opt, functools.partial(fixed_feedback, net))
