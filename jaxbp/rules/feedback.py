"""The learning rules as layers: feedback alignment, Kolen-Pollack, sign symmetry (each wraps a
``Dense`` or convolution) and direct feedback alignment (wraps a serial network); the formulas
are in :mod:`jaxbp.rules`."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from ..errors import ArgumentError
from ..layers import Layer, glorot_uniform, output_shape
from ..registry import register_layer

__all__ = [
    "FEEDBACK_LAYERS",
    "RULE_LAYERS",
    "FeedbackAlignment",
    "KolenPollack",
    "SignSymmetry",
    "DirectFeedbackAlignment",
    "check_dfa_network",
]

FEEDBACK_LAYERS = ("Dense", "Conv1D", "Conv2D")
RULE_LAYERS = ("FeedbackAlignment", "KolenPollack", "SignSymmetry", "DirectFeedbackAlignment")


# --------------------------------------------------------------------------------------------
# Per-layer rules: FA, KP, sign symmetry
# --------------------------------------------------------------------------------------------


def _check_wrappable(layer, who: str) -> None:
    if not isinstance(layer, Layer):
        raise ArgumentError(f"{who} expects a jaxbp Layer, got {layer!r}")
    if layer.name not in FEEDBACK_LAYERS:
        raise ValueError(
            f"{who} is not defined for layer {layer.name}; expected one of: "
            f"{', '.join(FEEDBACK_LAYERS)} (a layer whose dE/dx is linear in W)"
        )


def _check_params(params, who: str, keys=("B", "W", "b")) -> None:
    if not isinstance(params, dict) or sorted(params) != sorted(keys):
        got = sorted(params) if isinstance(params, dict) else type(params).__name__
        raise ValueError(f"{who} expects params with keys {', '.join(sorted(keys))}, got {got}")


def _without_b(params) -> dict:
    return {k: v for k, v in params.items() if k != "B"}


def _feedback_init(layer: Layer, key, input_shape):
    # W from the key itself (backprop's weights); B with the layer's own initialiser from an
    # independent key, so it has W's distribution and no relation to W.
    shape, params = layer.init(key, input_shape)
    _, other = layer.init(jax.random.fold_in(key, 1), input_shape)
    return shape, {**params, "B": other["W"]}


def _feedback_layer(layer: Layer, name: str, learn_b: bool) -> Layer:
    _check_wrappable(layer, name)

    def init(key, input_shape):
        return _feedback_init(layer, key, input_shape)

    def forward(params, x):
        _check_params(params, name)
        return layer.forward(_without_b(params), x)

    def backward(params, cache, dy):
        grads, _ = layer.backward(_without_b(params), cache, dy)
        # The same backward with B in W's place: for Dense dx = dy @ B.T (its dW is unused and
        # compiled away).
        _, dx = layer.backward({**_without_b(params), "W": params["B"]}, cache, dy)
        db = grads["W"] if learn_b else jnp.zeros_like(params["B"])
        return {**grads, "B": db}, dx

    backward.__doc__ = _KP_DOC if learn_b else _FA_DOC
    return Layer(init, forward, backward, name, (("layer", layer),))


_FA_DOC = """Feedback alignment: ``dE/dx = dy @ B.T`` (a convolution: the transposed convolution
    of ``dy`` with ``B``), ``B`` fixed and random, not ``W``; ``dE/dW = x.T @ dy`` and
    ``dE/db = sum_n dy[n]`` as the wrapped layer's; ``dE/dB = 0`` (``B`` never changes)."""

_KP_DOC = """Kolen-Pollack: ``dE/dx = dy @ B.T``; ``dE/dW = x.T @ dy``, ``dE/db = sum_n dy[n]``;
    ``dE/dB = dE/dW`` (``B`` gets ``W``'s update and ``W``'s weight decay, so ``B - W`` only
    decays: ``B_t - W_t = (1 - lr * wd)^t (B_0 - W_0)`` under SGD)."""


def FeedbackAlignment(layer: Layer) -> Layer:
    """``layer`` (a ``Dense``, ``Conv1D`` or ``Conv2D``) learning by feedback alignment.

    Params: the layer's plus ``"B"`` (``W``'s shape): ``dE/dx = dy @ B.T`` (module docstring).
    """
    return _feedback_layer(layer, "FeedbackAlignment", learn_b=False)


def KolenPollack(layer: Layer) -> Layer:
    """``layer`` learning by Kolen-Pollack: FA whose ``B`` gets ``W``'s update and decay."""
    return _feedback_layer(layer, "KolenPollack", learn_b=True)


def SignSymmetry(layer: Layer) -> Layer:
    """``layer`` learning by sign symmetry: ``dE/dx = dy @ sign(W).T``; no extra params."""
    _check_wrappable(layer, "SignSymmetry")

    def backward(params, cache, dy):
        """Sign symmetry: ``dE/dx = dy @ sign(W).T`` (a convolution: the transposed convolution
        of ``dy`` with ``sign(W)``); ``dE/dW = x.T @ dy``, ``dE/db = sum_n dy[n]`` as the
        wrapped layer's."""
        grads, _ = layer.backward(params, cache, dy)
        _, dx = layer.backward({**params, "W": jnp.sign(params["W"])}, cache, dy)
        return grads, dx

    return Layer(layer.init, layer.forward, backward, "SignSymmetry", (("layer", layer),))


# --------------------------------------------------------------------------------------------
# Direct feedback alignment: a combinator over a whole serial network
# --------------------------------------------------------------------------------------------


def _with_params(params) -> list[int]:
    return [i for i, p in enumerate(params) if jax.tree_util.tree_leaves(p)]


def check_dfa_network(layer) -> tuple:
    """The children of ``layer`` if direct feedback alignment is defined for it (a serial
    network of layers without state or randomness), else the error naming why."""
    if not isinstance(layer, Layer):
        raise ArgumentError(f"DirectFeedbackAlignment expects a jaxbp Layer, got {layer!r}")
    if layer.name != "serial":
        raise ValueError(
            f"direct feedback alignment is not defined for layer {layer.name}; "
            f"it expects a serial network (the output error reaches each of its "
            f"hidden layers directly)"
        )
    for i, child in enumerate(layer.children):
        if child.has_state:
            raise ValueError(
                f"layer {i} ({child.name}): direct feedback alignment is not "
                f"defined for a layer with state or randomness"
            )
    return layer.children


def DirectFeedbackAlignment(layer: Layer) -> Layer:
    """A serial network trained by direct feedback alignment (Nøkland 2016).

    The network is cut into blocks, each starting at a layer with parameters (a ``Dense``
    with the activation after it). Params: ``{"net": the network's params, "B": (B_1, ...)}``,
    one fixed random ``B_k`` of shape ``(outputs, features of block k's output)`` per hidden
    block (every block but the last).
    """
    children = check_dfa_network(layer)

    def init(key, input_shape):
        shape, net_params = layer.init(key, input_shape)
        starts = _with_params(net_params)
        _check_dfa_layers(children, starts)
        shapes = [tuple(input_shape)]
        for child in children:
            shapes.append(output_shape(child, shapes[-1]))
        batch_rank, outputs = len(shape) - 1, int(shape[-1])
        keys = jax.random.split(jax.random.fold_in(key, 1), max(len(starts) - 1, 1))
        feedback = []
        for j, end in enumerate(starts[1:]):
            dtype = jax.tree_util.tree_leaves(net_params[starts[j]])[0].dtype
            size = math.prod(shapes[end][batch_rank:])
            feedback.append(glorot_uniform(keys[j], (outputs, size), dtype))
        return shape, {"net": net_params, "B": tuple(feedback)}

    def forward(params, x):
        _check_params(params, "DirectFeedbackAlignment", keys=("B", "net"))
        caches, outs, h = [], [], x
        for i, (child, p) in enumerate(zip(children, params["net"])):
            try:
                h, c = child.forward(p, h)
            except (ValueError, TypeError) as e:
                raise type(e)(f"layer {i} ({child.name}): {e}") from None
            caches.append(c)
            outs.append(h)
        return h, (x, tuple(caches), tuple(outs))

    def backward(params, cache, dy):
        """Direct feedback alignment: with the output error ``e = dy``, hidden block ``k``
        gets ``dE/dh_k = e @ B_k`` (reshaped to its output ``h_k``) and runs its own backward
        (``da_k = dE/dh_k * f'(a_k)``, ``dE/dW_k = x_k.T @ da_k``, ``dE/db_k = sum_n da_k``);
        the last block gets ``e`` through its ordinary backward. No error flows from a block
        to the one below it, so ``dE/dx = 0``; ``dE/dB_k = 0`` (fixed)."""
        x, caches, outs = cache
        net_params = params["net"]
        starts = _with_params(net_params)
        grads = [jax.tree_util.tree_map(jnp.zeros_like, p) for p in net_params]
        errors = dy.reshape(-1, dy.shape[-1])
        for j, (start, end) in enumerate(zip(starts, starts[1:] + [len(children)])):
            d = (
                dy
                if end == len(children)
                else ((errors @ params["B"][j]).reshape(jnp.shape(outs[end - 1])))
            )
            for i in reversed(range(start, end)):
                grads[i], d = children[i].backward(net_params[i], caches[i], d)
        feedback = tuple(jnp.zeros_like(b) for b in params["B"])
        return {"net": tuple(grads), "B": feedback}, jnp.zeros_like(x)

    return Layer(init, forward, backward, "DirectFeedbackAlignment", (("layer", layer),))


def _check_dfa_layers(children, starts) -> None:
    if not starts:
        raise ValueError(
            "direct feedback alignment needs a network with at least one layer with parameters"
        )
    for i in starts:
        if children[i].name not in FEEDBACK_LAYERS:
            raise ValueError(
                f"layer {i} ({children[i].name}): direct feedback alignment is "
                f"not defined for this layer; expected {', '.join(FEEDBACK_LAYERS)}"
                f" and parameter-free layers"
            )


register_layer("FeedbackAlignment", FeedbackAlignment)
register_layer("KolenPollack", KolenPollack)
register_layer("SignSymmetry", SignSymmetry)
register_layer("DirectFeedbackAlignment", DirectFeedbackAlignment)
