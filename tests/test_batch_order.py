"""The one batch order every training loop draws from (jaxbp.batch_order)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxbp.batch_order import epoch_order, run_order
from jaxbp.training import compiled

KEY = jax.random.key(0)


def test_an_epoch_is_a_permutation_with_a_different_tail_each_time():
    orders = np.stack([np.asarray(epoch_order(KEY, e, 103, 10)) for e in range(7)])
    assert orders.shape == (7, 10, 10)  # the ragged 3 dropped
    for epoch in orders:
        flat = epoch.ravel()
        assert len(np.unique(flat)) == 100 and flat.min() >= 0 and flat.max() < 103
    assert not np.array_equal(orders[0], orders[1])
    dropped = {frozenset(set(range(103)) - set(e.ravel().tolist())) for e in orders}
    assert len(dropped) > 1  # no example is always left out


def test_the_order_depends_on_the_key_alone():
    np.testing.assert_array_equal(epoch_order(KEY, 3, 50, 8), epoch_order(KEY, 3, 50, 8))
    assert not np.array_equal(epoch_order(KEY, 3, 50, 8), epoch_order(jax.random.key(1), 3, 50, 8))
    full = epoch_order(KEY, 0, 5, 5)
    np.testing.assert_array_equal(np.sort(full[0]), np.arange(5))


def test_fit_and_jaxbp_train_draw_the_same_batches():
    # fit's run is the epochs laid end to end; the trainer's compiled order is each epoch.
    run = np.asarray(run_order(KEY, 10, 3, 7))
    epochs = [np.asarray(compiled.epoch_order(KEY, e, 10, 3, False)) for e in range(3)]
    np.testing.assert_array_equal(run, np.concatenate(epochs)[:7])
    with_step = np.asarray(compiled.epoch_order(KEY, 2, 10, 3, True))
    np.testing.assert_array_equal(with_step[:, :3], epochs[2])
    np.testing.assert_array_equal(with_step[:, 3], [6, 7, 8])  # the global step numbers


@pytest.mark.parametrize("n, batch_size", [(10, 0), (10, 11)])
def test_a_batch_larger_than_the_data_is_refused(n, batch_size):
    with pytest.raises(ValueError, match=rf"between 1 and the number of examples \({n}\)"):
        epoch_order(KEY, 0, n, batch_size)


@pytest.mark.slow  # every (n, batch_size) compiles anew: about 1 s an example
@settings(max_examples=15, deadline=None)
@given(n=st.integers(1, 40), data=st.data())
def test_every_batch_holds_distinct_examples(n, data):
    batch_size = data.draw(st.integers(1, n))
    steps = data.draw(st.integers(1, 3 * (n // batch_size)))
    order = np.asarray(
        run_order(jax.random.key(data.draw(st.integers(0, 99))), n, batch_size, steps)
    )
    assert order.shape == (steps, batch_size)
    per_epoch = n // batch_size
    for start in range(0, steps, per_epoch):
        flat = order[start : start + per_epoch].ravel()
        assert len(set(flat.tolist())) == len(flat) and ((0 <= flat) & (flat < n)).all()
    assert jnp.issubdtype(order.dtype, jnp.integer)
