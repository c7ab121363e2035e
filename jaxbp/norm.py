"""Layers with state or randomness: BatchNorm (running statistics) and Dropout (a random mask).

Both follow the extended contract of :mod:`jaxbp.layers` (``init_state`` and ``apply``): the
state is returned, never mutated; the key is passed in; ``context.train`` switches between
training and evaluation. The backward reads what the forward used (the batch statistics, the
mask) from the cache, so it differentiates exactly the function that ran.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from . import arguments
from .errors import InputShapeError
from .layers import Context, Layer, check_float, default_float, stateful
from .registry import register_layer

__all__ = ["BatchNorm", "Dropout"]


def _check_rate(rate) -> float:
    return arguments.number("Dropout", "rate", rate, check=lambda v: 0 <= v < 1, expect="in [0, 1)")


def _check_batchnorm_arguments(momentum, eps) -> tuple[float, float]:
    return (
        arguments.number(
            "BatchNorm", "momentum", momentum, check=lambda v: 0 <= v <= 1, expect="in [0, 1]"
        ),
        arguments.number("BatchNorm", "eps", eps, check=lambda v: v > 0, expect="> 0"),
    )


def _batchnorm_backward(params, cache, dy):
    """``dscale = sum(dy * xhat)``, ``dbias = sum(dy)`` over every axis but the last.

    Training (the batch statistics depend on every example), with ``dxhat = dy * scale``
    and means over the ``m`` normalised positions:
    ``dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))``.
    Evaluation (constant statistics): ``dx = dxhat * rstd``.
    """
    train = isinstance(cache, tuple)
    xhat, rstd = cache if train else (cache["xhat"], cache["rstd"])
    axes = tuple(range(dy.ndim - 1))
    grads = {"scale": jnp.sum(dy * xhat, axis=axes), "bias": jnp.sum(dy, axis=axes)}
    dxhat = dy * params["scale"]
    if not train:
        return grads, dxhat * rstd
    dx = rstd * (dxhat - jnp.mean(dxhat, axis=axes) - xhat * jnp.mean(dxhat * xhat, axis=axes))
    return grads, dx


def BatchNorm(momentum: float = 0.9, eps: float = 1e-5, dtype=None) -> Layer:
    """Batch normalisation over every axis but the last (the features / channels).

    Training: ``mu = mean(x)``, ``var = mean((x - mu)^2)`` over the batch (and spatial) axes,
    ``xhat = (x - mu) / sqrt(var + eps)``, ``y = scale * xhat + bias``; the running statistics
    move to ``momentum * running + (1 - momentum) * batch`` (the unbiased variance, as PyTorch).
    Evaluation: the running statistics instead of the batch's, and the state is unchanged.

    params ``{"scale", "bias"}`` (ones, zeros), state ``{"mean", "var"}`` (zeros, ones), each
    of shape ``(features,)``.
    """
    momentum, eps = _check_batchnorm_arguments(momentum, eps)
    dtype = arguments.float_dtype("BatchNorm", dtype)

    def features(input_shape):
        if len(input_shape) < 1 or int(input_shape[-1]) < 1:
            raise InputShapeError(
                f"BatchNorm expects inputs of shape (..., features), got {tuple(input_shape)}"
            )
        return int(input_shape[-1])

    def init(key, input_shape):
        n, dt = features(input_shape), jnp.dtype(dtype) if dtype else default_float()
        return tuple(input_shape), {"scale": jnp.ones((n,), dt), "bias": jnp.zeros((n,), dt)}

    def init_state(input_shape):
        n, dt = features(input_shape), jnp.dtype(dtype) if dtype else default_float()
        return {"mean": jnp.zeros((n,), dt), "var": jnp.ones((n,), dt)}

    def apply(params, state, x, context: Context):
        check_float(x, "BatchNorm")
        if x.ndim < 1 or x.shape[-1] != params["scale"].shape[0]:
            raise InputShapeError(
                f"BatchNorm expects inputs with {params['scale'].shape[0]} features "
                f"on the last axis, got shape {tuple(x.shape)}"
            )
        axes = tuple(range(x.ndim - 1))
        if context.train:
            mean = jnp.mean(x, axis=axes)
            var = jnp.mean(jnp.square(x - mean), axis=axes)
            count = x.size // x.shape[-1]
            unbiased = var * (count / max(count - 1, 1))
            new_state = {
                "mean": momentum * state["mean"] + (1 - momentum) * mean,
                "var": momentum * state["var"] + (1 - momentum) * unbiased,
            }
        else:
            mean, var, new_state = state["mean"], state["var"], state
        rstd = jax.lax.rsqrt(var + eps)
        xhat = (x - mean) * rstd
        # The cache's structure (not a flag inside it, which jit would turn into an array)
        # tells the backward which statistics ran: a tuple for the batch's, a dict for fixed ones.
        cache = (xhat, rstd) if context.train else {"xhat": xhat, "rstd": rstd}
        return params["scale"] * xhat + params["bias"], cache, new_state

    config = (
        ("momentum", momentum),
        ("eps", eps),
        ("dtype", dtype),
    )
    return stateful(init, apply, _batchnorm_backward, init_state, "BatchNorm", config)


def Dropout(rate: float) -> Layer:
    """Inverted dropout: in training ``y = x * m / (1 - rate)``, ``m ~ Bernoulli(1 - rate)``
    drawn from the call's key; in evaluation ``y = x``. No params, no state."""
    rate = _check_rate(rate)

    def init(key, input_shape):
        return tuple(input_shape), ()

    def apply(params, state, x, context: Context):
        if not context.train or rate == 0.0:
            return x, None, state
        if context.key is None:
            raise ValueError(
                "Dropout needs a random key in training: pass key=... (to "
                "jaxbp.apply, jaxbp.backprop or the train state), or train=False"
            )
        keep = jax.random.bernoulli(context.key, 1.0 - rate, jnp.shape(x))
        scale = jnp.where(keep, 1.0 / (1.0 - rate), 0.0).astype(x.dtype)
        return x * scale, scale, state

    def backward(params, scale, dy):
        """``dE/dx = dy * m / (1 - rate)`` with the forward's mask (``dy`` in evaluation)."""
        return (), dy if scale is None else dy * scale

    return stateful(init, apply, backward, lambda shape: (), "Dropout", (("rate", rate),))


register_layer("BatchNorm", BatchNorm)
register_layer("Dropout", Dropout)
