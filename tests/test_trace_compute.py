"""Suggested for tests/: jaxbp.trace's computation on chains the config format cannot write,
and Loss.terms (the per-output errors the trace prints)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

jax.config.update("jax_enable_x64", True)

import jaxbp
from jaxbp.trace import neuron_stages, walk_network
from jaxbp.trace.compute import ParamTrees, stage_traces


@pytest.mark.slow
def test_walk_of_any_dense_activation_chain_matches_jax_grad():
    net = jaxbp.serial(
        jaxbp.Dense(3), jaxbp.Dense(2, shared_bias=True), jaxbp.Tanh, jaxbp.Sigmoid, jaxbp.Dense(2)
    )
    _, params = net.init(jax.random.key(0), (-1, 4))
    x = jax.random.normal(jax.random.key(1), (5, 4))
    y = jax.random.normal(jax.random.key(2), (5, 2))
    walk = walk_network(net, params, jaxbp.half_sse, x, y)
    assert [tuple(s) for s in neuron_stages(walk.layers)] == [(0, ()), (1, (2, 3)), (4, ())]
    _, expected = jaxbp.autodiff(net, jaxbp.half_sse, params, x, y)
    for a, b in zip(jax.tree_util.tree_leaves(walk.grads), jax.tree_util.tree_leaves(expected)):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15)
    first, second, _ = stage_traces(walk, ParamTrees(walk.grads, expected, params, params))
    assert np.all(first.dout_dnet == 1) and np.array_equal(first.out, first.net)
    t = np.tanh(second.net)
    s = 1 / (1 + np.exp(-t))
    np.testing.assert_allclose(second.dout_dnet, (1 - t**2) * s * (1 - s), rtol=1e-13)
    np.testing.assert_allclose(second.delta, second.dE_dout * second.dout_dnet, rtol=1e-13)


@pytest.mark.parametrize(
    "net, fragment",
    [
        (jaxbp.serial(jaxbp.Sigmoid, jaxbp.Dense(2)), "layer 0 (Sigmoid): an activation before"),
        (
            jaxbp.serial(jaxbp.Dense(2), jaxbp.residual(jaxbp.Dense(2))),
            "cannot describe layer 1 (residual) yet",
        ),
    ],
)
def test_layers_the_trace_cannot_describe(net, fragment):
    with pytest.raises(ValueError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        neuron_stages(net.children)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(jaxbp.LOSSES))
@pytest.mark.parametrize("batched", [True, False])
def test_loss_terms_add_up_to_the_value(name, batched):
    loss = jaxbp.LOSSES[name]
    out = jax.random.normal(jax.random.key(0), (5, 3))
    target = (
        jax.nn.one_hot(jnp.array([0, 2, 1, 1, 0]), 3)
        if name.startswith("softmax")
        else jax.random.uniform(jax.random.key(1), (5, 3))
    )
    if not batched:
        out, target = out[0], target[0]
    for terms in (loss.terms, jax.jit(loss.terms)):
        assert terms(out, target).shape == out.shape
        assert float(terms(out, target).sum()) == pytest.approx(
            float(loss.value(out, target)), rel=1e-14
        )
