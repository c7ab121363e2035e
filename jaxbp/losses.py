"""Losses: pure functions of ``(output, target)`` with hand-derived gradients.

A :class:`Loss` is a NamedTuple ``(value, grad, name, terms)``: ``value(out, target)`` is the
scalar error and ``grad(out, target)`` is ``dE/d(out)``, written out; the optional
``terms(out, target)`` gives each output's share of the value (``jaxbp trace`` prints them as
the seed's ``E_o1``, ``E_o2``). A loss is also callable, so ``loss(out, target)`` is its value.
``backprop`` uses ``grad``; ``autodiff`` differentiates ``value`` with ``jax.grad``; the two
therefore check the same mathematics.

Batches: an output of shape ``(features,)`` is one example; ``(batch, features)`` is a batch,
and every loss averages over the examples of a batch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .errors import ArgumentError

__all__ = [
    "Loss",
    "half_sse",
    "mse",
    "softmax_cross_entropy",
    "sigmoid_binary_cross_entropy",
    "LOSSES",
    "get_loss",
]


class Loss(NamedTuple):
    """A loss: ``value(out, target) -> scalar`` and its gradient ``grad(out, target) -> dE/dout``.

    ``terms(out, target)``, when given, is an array shaped like ``out``: each output's
    contribution, normalised as the value normalises, so that ``terms(...).sum() == value(...)``.
    """

    value: Callable
    grad: Callable
    name: str = "loss"
    terms: Callable | None = None

    def __call__(self, out, target):
        return self.value(out, target)


def _num_examples(out):
    return 1 if out.ndim <= 1 else out.size // out.shape[-1]


def _check_array(name, target):
    if not hasattr(target, "shape") or not hasattr(target, "dtype"):  # a list, say
        raise ArgumentError(
            f"{name} expects targets as an array, got {type(target).__name__} "
            f"(convert with jnp.asarray(y))"
        )


def _check_same_shape(name, out, target):
    _check_array(name, target)
    if tuple(jnp.shape(target)) != tuple(out.shape):
        raise ValueError(
            f"{name} expects targets of the output's shape {tuple(out.shape)}, "
            f"got shape {tuple(jnp.shape(target))}"
        )
    if not jnp.issubdtype(jnp.result_type(target), jnp.floating):
        raise ArgumentError(
            f"{name} expects floating-point targets, got dtype {jnp.result_type(target)}"
        )


# --------------------------------------------------------------------------------------------
# half_sse: the seed's E_total = sum_k 1/2 (target_k - out_k)^2
# --------------------------------------------------------------------------------------------


def _half_sse_value(out, target):
    _check_same_shape("half_sse", out, target)
    # (out - target)^2 == (target - out)^2; this order makes jax.grad's operations the manual's.
    return 0.5 * jnp.sum((out - target) ** 2) / _num_examples(out)


def _half_sse_grad(out, target):
    """``dE/dout_k = -(target_k - out_k) = out_k - target_k`` (divided by the batch size).

    Computed as ``(0.5 / batch) * 2 (out - target)``, the operations ``jax.grad`` of the value
    produces, so that XLA shares the backward pass between the two gradients of a checked step.
    """
    _check_same_shape("half_sse", out, target)
    return (0.5 / _num_examples(out)) * (2 * (out - target))


def _half_sse_terms(out, target):
    """``E_k = 1/2 (target_k - out_k)^2`` (divided by the batch size)."""
    _check_same_shape("half_sse", out, target)
    return 0.5 * (out - target) ** 2 / _num_examples(out)


half_sse = Loss(_half_sse_value, _half_sse_grad, "half_sse", _half_sse_terms)


# --------------------------------------------------------------------------------------------
# mse: mean over every element
# --------------------------------------------------------------------------------------------


def _mse_value(out, target):
    _check_same_shape("mse", out, target)
    return jnp.mean((out - target) ** 2)


def _mse_grad(out, target):
    """``dE/dout = 2 (out - target) / N`` with ``N`` the number of elements."""
    _check_same_shape("mse", out, target)
    return 2 * (out - target) / out.size


def _mse_terms(out, target):
    """``E_k = (out_k - target_k)^2 / N``."""
    _check_same_shape("mse", out, target)
    return (out - target) ** 2 / out.size


mse = Loss(_mse_value, _mse_grad, "mse", _mse_terms)


# --------------------------------------------------------------------------------------------
# softmax cross-entropy, integer labels or one-hot targets
# --------------------------------------------------------------------------------------------


def _onehot_targets(logits, target):
    """Integer labels -> one-hot (NaN rows for labels out of range); one-hot passes through."""
    num_classes = logits.shape[-1]
    _check_array("softmax_cross_entropy", target)
    target = jnp.asarray(target)
    if jnp.issubdtype(target.dtype, jnp.integer):
        if target.shape != logits.shape[:-1]:
            raise ValueError(
                f"softmax_cross_entropy expects integer labels of shape {logits.shape[:-1]}, "
                f"got shape {target.shape}"
            )
        if not isinstance(target, jax.core.Tracer):
            # NumPy, not jnp: inside a trace (lax.map, scan) jnp ops on concrete labels would
            # be staged out as tracers and bool() would fail.
            labels = np.asarray(target)
            bad = (labels < 0) | (labels >= num_classes)
            if bad.any():
                raise ValueError(
                    f"softmax_cross_entropy expects labels in [0, {num_classes}), got values "
                    f"{sorted(set(labels[bad].tolist()))[:5]}"
                )
        valid = (target >= 0) & (target < num_classes)
        onehot = jax.nn.one_hot(target, num_classes, dtype=logits.dtype)
        # Under jit a label cannot raise: it poisons its example with NaN instead, which the
        # train step sees as a non-finite loss and so never applies.
        return jnp.where(valid[..., None], onehot, jnp.nan)
    if target.shape != logits.shape:
        raise ValueError(
            f"softmax_cross_entropy expects integer labels of shape {logits.shape[:-1]} or "
            f"one-hot targets of shape {logits.shape}, got shape {target.shape}"
        )
    if not jnp.issubdtype(target.dtype, jnp.floating):
        raise ArgumentError(
            f"softmax_cross_entropy expects integer labels or floating one-hot "
            f"targets, got dtype {target.dtype}"
        )
    return target


def _log_softmax_parts(logits):
    """``(z - m, exp(z - m), sum_k exp(z_k - m))``, ``m`` the row max: no large logit is
    exponentiated.

    The max is a constant for differentiation (``stop_gradient``), as in ``jax.nn.logsumexp``:
    the result does not depend on it.
    """
    shifted = logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    exps = jnp.exp(shifted)
    return shifted, exps, jnp.sum(exps, axis=-1, keepdims=True)


def _softmax_ce_value(logits, target):
    onehot = _onehot_targets(logits, target)
    shifted, _, total = _log_softmax_parts(logits)
    # log softmax_k = (z_k - m) - log sum_j exp(z_j - m)
    return -jnp.sum(onehot * (shifted - jnp.log(total))) / _num_examples(logits)


def _softmax_ce_grad(logits, target):
    """Fused softmax + cross-entropy, ``dE/dz_k = (softmax(z)_k sum_j t_j - t_k) / batch``.

    Written as ``g_k + (-sum_j g_j) e^(z_k - m) / sum_j e^(z_j - m)`` with ``g = -t / batch``:
    the same value, in the same operations that ``jax.grad`` of the loss produces, so that in a
    checked step XLA computes the backward pass once for both gradients instead of twice.
    ``sum_j t_j`` is 1 for a one-hot row; keeping it covers soft labels that sum to anything.
    """
    onehot = _onehot_targets(logits, target)
    _, exps, total = _log_softmax_parts(logits)
    g = onehot * (-1 / _num_examples(logits))
    return g + (-jnp.sum(g, axis=-1, keepdims=True) / total) * exps


def _softmax_ce_terms(logits, target):
    """``E_k = -t_k log softmax(z)_k`` (divided by the batch size)."""
    onehot = _onehot_targets(logits, target)
    shifted, _, total = _log_softmax_parts(logits)
    return -onehot * (shifted - jnp.log(total)) / _num_examples(logits)


softmax_cross_entropy = Loss(
    _softmax_ce_value, _softmax_ce_grad, "softmax_cross_entropy", _softmax_ce_terms
)


# --------------------------------------------------------------------------------------------
# sigmoid binary cross-entropy from logits
# --------------------------------------------------------------------------------------------


def _bce_elements(logits, target):
    _check_same_shape("sigmoid_binary_cross_entropy", logits, target)
    # -t log s(z) - (1-t) log(1-s(z)) = max(z, 0) - z t + log(1 + e^-|z|): stable for any z.
    return jnp.maximum(logits, 0) - logits * target + jnp.log1p(jnp.exp(-jnp.abs(logits)))


def _bce_value(logits, target):
    return jnp.mean(_bce_elements(logits, target))


def _bce_terms(logits, target):
    """``E_k = BCE(z_k, t_k) / N``, ``N`` the number of elements."""
    return _bce_elements(logits, target) / logits.size


def _bce_grad(logits, target):
    """``dE/dz = (sigmoid(z) - target) / N`` with ``N`` the number of elements."""
    _check_same_shape("sigmoid_binary_cross_entropy", logits, target)
    return (jax.nn.sigmoid(logits) - target) / logits.size


sigmoid_binary_cross_entropy = Loss(
    _bce_value, _bce_grad, "sigmoid_binary_cross_entropy", _bce_terms
)


LOSSES = {
    loss.name: loss for loss in (half_sse, mse, softmax_cross_entropy, sigmoid_binary_cross_entropy)
}


def get_loss(name_or_loss) -> Loss:
    """A :class:`Loss` by name (``"half_sse"``, ``"mse"``, ...), or the loss itself."""
    if isinstance(name_or_loss, Loss):
        return name_or_loss
    try:
        return LOSSES[name_or_loss]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown loss {name_or_loss!r}; expected one of: {', '.join(sorted(LOSSES))}"
        ) from None
