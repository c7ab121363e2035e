"""Which examples each training step sees: the one batch order of every training loop.

Epoch ``e`` of a run with data key ``key`` visits the examples in the order
``permutation(fold_in(key, e), n)``, cut into ``n // batch_size`` batches; the ragged tail is
dropped, so every batch has one static shape (what a compiled step wants), and since the
permutation is redrawn each epoch a different tail is dropped each time. :func:`jaxbp.fit` and
``jaxbp train`` (:func:`jaxbp.training.compiled.epoch_order`) both draw from here, so a run's
order depends only on its key, never on which loop ran it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["epoch_order", "run_order"]


def epoch_order(key, epoch, n: int, batch_size: int) -> jax.Array:
    """Epoch ``epoch``'s batches: ``(n // batch_size, batch_size)`` example indices."""
    if not 1 <= batch_size <= n:
        raise ValueError(
            f"batch_size must be between 1 and the number of examples ({n}), got {batch_size}"
        )
    steps = n // batch_size
    order = jax.random.permutation(jax.random.fold_in(key, epoch), n)
    return order[: steps * batch_size].reshape(steps, batch_size)


def run_order(key, n, batch_size, steps) -> jax.Array:
    """The first ``steps`` batches of a run, epoch after epoch: ``(steps, batch_size)``."""
    epochs = max(1, -(-steps // (n // batch_size)))
    orders = jax.vmap(lambda e: epoch_order(key, e, n, batch_size))(jnp.arange(epochs))
    return orders.reshape(-1, batch_size)[:steps]
