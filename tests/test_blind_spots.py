"""The checks' blind spots (issue 22), each with a planted bug that used to pass and is caught now.

1. ``check_layer`` checked at the initial parameters, where BatchNorm's and LayerNorm's scale is
   1: ``dxhat = dy / scale`` for ``dy * scale`` passed. It now checks at random parameters.
2. Evaluation mode's backward (BatchNorm with running statistics) was unreachable:
   ``check_layer(..., train=False)`` and ``backprop_and_autodiff(..., train=False)`` reach it.
3. The step compared parameter gradients only, never the first layer's ``dx``:
   ``backprop_and_autodiff(..., wrt_inputs=True)`` with ``compare_grads(..., inputs=...)`` is
   the step's comparison with it, and ``check_grads`` checks it by default.
4. A manual gradient of the wrong shape made ``compare_grads`` raise; it is now a mismatch of
   that leaf, with both shapes named.
5. Dropout could not go through ``check_layer``; it draws the forward's key from ``key``.

And the mutation run (``benchmarks/mutants.py``) on a handful of mutants.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbp
from benchmarks import mutants
from jaxbp import norm

KEY = jax.random.key(0)


def divides_by_scale(layer, backward):
    """``layer`` whose backward reads ``dy / scale`` where it should read ``dy * scale``: the
    real backward handed ``1 / scale``, which changes ``dx`` only (``dscale`` reads no scale)."""

    def wrong(params, cache, dy):
        return backward({**params, "scale": 1 / params["scale"]}, cache, dy)

    return layer._replace(backward=wrong)


def initial_params(layer, shape):
    return layer.init(KEY, shape)[1]


_check_layer_jit = jax.jit(jaxbp.check_layer, static_argnums=(0, 2), static_argnames="train")
LAYERNORM = jaxbp.LayerNorm()


@pytest.mark.parametrize(
    "layer, backward, jit",
    [
        (jaxbp.BatchNorm(), norm._batchnorm_backward, False),
        (jaxbp.BatchNorm(), norm._batchnorm_backward, True),
        (LAYERNORM, LAYERNORM.backward, True),
    ],
    ids=["BatchNorm-eager", "BatchNorm-jit", "LayerNorm-jit"],
)
def test_dy_over_scale_passes_at_init_and_fails_at_random_params(layer, backward, jit):
    check = _check_layer_jit if jit else jaxbp.check_layer
    bad = divides_by_scale(layer, backward)
    # At init (scale 1) the wrong formula is right: the blind spot.
    assert bool(jaxbp.check_layer(bad, KEY, (4, 3), params=initial_params(layer, (4, 3))).ok)
    report = check(bad, KEY, (4, 3))
    assert not bool(report.ok) and report.worst_path == "['x']"
    assert float(report.worst_rel_error) > 0.01
    np.testing.assert_array_equal(report.leaf_ok, [True, True, False])  # dscale, dbias right


def wrong_in_evaluation(params, cache, dy):
    """BatchNorm's backward, with the evaluation ``dx`` divided by ``rstd`` instead of
    multiplied by it (the training backward is the real one)."""
    grads, dx = norm._batchnorm_backward(params, cache, dy)
    if isinstance(cache, dict):  # the running statistics' cache
        dx = dx / cache["rstd"] ** 2
    return grads, dx


def test_evaluation_backward_is_checked():
    bad = jaxbp.BatchNorm()._replace(backward=wrong_in_evaluation)
    assert bool(jaxbp.check_layer(bad, KEY, (4, 3)).ok)  # training mode cannot see it
    report = jaxbp.check_layer(bad, KEY, (4, 3), train=False)
    assert not bool(report.ok) and report.worst_path == "['x']"
    assert bool(jaxbp.check_layer(jaxbp.BatchNorm(), KEY, (4, 3), train=False).ok)
    # float32, its own tolerances: the real evaluation backward passes.
    bn32 = jaxbp.BatchNorm(dtype=jnp.float32)
    assert bool(jaxbp.check_layer(bn32, KEY, (4, 3), dtype=jnp.float32, train=False).ok)


@pytest.mark.slow
def test_frozen_statistics_step_and_check_grads_see_the_evaluation_backward():
    net = jaxbp.serial(jaxbp.Dense(3), jaxbp.BatchNorm()._replace(backward=wrong_in_evaluation))
    _, params = net.init(KEY, (-1, 3))
    x = jax.random.normal(jax.random.key(1), (4, 3))
    y = jax.random.normal(jax.random.key(2), (4, 3))
    # Running statistics away from their initial (0, 1), as after some training.
    state = ((), {"mean": jnp.array([0.3, -0.2, 0.5]), "var": jnp.array([1.5, 0.7, 2.0])})
    for train, agree in ((True, True), (False, False)):
        _, manual, auto, _ = jaxbp.backprop_and_autodiff(
            net, "mse", params, x, y, state=state, train=train
        )
        assert bool(jaxbp.compare_grads(manual, auto).ok) is agree
    check = jaxbp.check_grads(net, "mse", params, x, y, state=state, train=False)
    assert not check.ok and check.manual_vs_autodiff.worst_path == "[0]['W']"
    assert bool(check.autodiff_vs_fd.ok)  # the reference and finite differences agree


def negated_dx(layer):
    """``layer`` whose ``dx`` has the wrong sign; its parameter gradients are right."""

    def backward(params, cache, dy):
        grads, dx = layer.backward(params, cache, dy)
        return grads, -dx

    return layer._replace(backward=backward)


NET = jaxbp.serial(negated_dx(jaxbp.Dense(3)), jaxbp.Tanh, jaxbp.Dense(2))
GOOD = jaxbp.serial(jaxbp.Dense(3), jaxbp.Tanh, jaxbp.Dense(2))
PARAMS = NET.init(KEY, (-1, 2))[1]
X = jax.random.normal(jax.random.key(1), (3, 2))
Y = jnp.array([0, 1, 1])


def step_comparison(net, params, x, y, wrt_inputs):
    """The checked step's comparison, with the input gradient when ``wrt_inputs``."""
    _, manual, auto = jaxbp.backprop_and_autodiff(
        net, "softmax_cross_entropy", params, x, y, wrt_inputs=wrt_inputs
    )
    if not wrt_inputs:
        return jaxbp.compare_grads(manual, auto)
    return jaxbp.compare_grads(manual[0], auto[0], inputs=(manual[1], auto[1]))


_step_comparison_jit = jax.jit(step_comparison, static_argnums=(0, 4))


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_the_first_layers_dx_is_verified(jit):
    compare = _step_comparison_jit if jit else step_comparison
    assert bool(compare(NET, PARAMS, X, Y, False).ok)  # the parameters alone cannot see it
    report = compare(NET, PARAMS, X, Y, True)
    assert not bool(report.ok) and report.worst_path == jaxbp.gradcheck.INPUT_LEAF
    assert report.paths[-1] == "input" and bool(np.all(np.asarray(report.leaf_ok)[:-1]))
    assert float(report.cosine[-1]) == pytest.approx(-1.0)
    assert bool(compare(GOOD, PARAMS, X, Y, True).ok)


def test_wrt_inputs_gives_jax_grads_input_gradient():
    net = GOOD
    value, (grads, dx) = jaxbp.backprop(net, "softmax_cross_entropy", PARAMS, X, Y, wrt_inputs=True)
    loss = jaxbp.loss_fn(net, "softmax_cross_entropy")
    want_grads, want_dx = jax.grad(loss, argnums=(0, 1))(PARAMS, X, Y)
    np.testing.assert_allclose(dx, want_dx, rtol=1e-12, atol=1e-14)
    _, (auto_grads, auto_dx) = jaxbp.autodiff(
        net, "softmax_cross_entropy", PARAMS, X, Y, wrt_inputs=True
    )
    np.testing.assert_allclose(auto_dx, want_dx, rtol=1e-12, atol=1e-14)
    assert bool(jaxbp.compare_grads(grads, want_grads).ok)
    assert bool(jaxbp.compare_grads(auto_grads, want_grads).ok)
    ids = jnp.array([[0, 1], [2, 3]])
    embed = jaxbp.Embedding(4, 2)
    with pytest.raises(ValueError, match="integer token ids.*no gradient; pass wrt_inputs=False"):
        jaxbp.backprop(
            embed, "mse", embed.init(KEY, (2, 2))[1], ids, jnp.zeros((2, 2, 2)), wrt_inputs=True
        )


@functools.partial(jax.jit, static_argnames="inputs")
def check_grads_jit(params, x, y, inputs=True):
    return jaxbp.check_grads(NET, "softmax_cross_entropy", params, x, y, inputs=inputs)


@pytest.mark.slow
def test_check_grads_checks_the_input_gradient_by_default():
    check = check_grads_jit(PARAMS, X, Y)
    assert not check.ok
    assert bool(check.manual_vs_autodiff.ok)  # every parameter gradient is right
    assert not bool(check.inputs.manual_vs_autodiff.ok)
    assert not bool(check.inputs.manual_vs_fd.ok) and bool(check.inputs.autodiff_vs_fd.ok)
    without = check_grads_jit(PARAMS, X, Y, inputs=False)
    assert without.ok and without.inputs is None


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_a_wrong_shape_is_a_mismatch_of_its_leaf(jit):
    right = {"W": jnp.ones((4, 3)), "b": jnp.ones(3)}
    wrong = {"W": jnp.ones((4, 1)), "b": jnp.ones(3)}
    compare = jax.jit(jaxbp.compare_grads) if jit else jaxbp.compare_grads
    report = compare(wrong, right)
    assert not bool(report.ok) and report.worst_path == "['W']"
    np.testing.assert_array_equal(report.leaf_ok, [False, True])
    assert float(report.rel_error[0]) == np.inf and float(report.rel_error[1]) == 0.0
    assert report.mismatched_shapes == (("['W']", (4, 1), (4, 3)),)
    # The manual side's finiteness is still judged (the step's guard reads it).
    _, finite = jaxbp.gradcheck.compare_with_finiteness(wrong, right)
    assert bool(finite)
    _, finite = jaxbp.gradcheck.compare_with_finiteness({**wrong, "b": jnp.full(3, jnp.nan)}, right)
    assert not bool(finite)
    with pytest.raises(ValueError, match="same structure"):  # another tree is the call's error
        jaxbp.compare_grads({"W": right["W"]}, right)
    # Conformed, a step can form (and then refuse) the update: NaN where the shape was wrong.
    conformed = jaxbp.gradcheck.conform_grads(wrong, right)
    assert conformed["W"].shape == (4, 3) and bool(jnp.all(jnp.isnan(conformed["W"])))
    assert conformed["b"] is wrong["b"]


def test_dropout_goes_through_check_layer():
    dropout = jaxbp.Dropout(0.5)
    report = jaxbp.check_layer(dropout, KEY, (4, 3))
    assert bool(report.ok) and report.paths == ("['x']",)
    unmasked = dropout._replace(backward=lambda params, scale, dy: ((), dy))
    assert not bool(jaxbp.check_layer(unmasked, KEY, (4, 3)).ok)
    assert bool(jaxbp.check_layer(unmasked, KEY, (4, 3), train=False).ok)  # eval: no mask


# --------------------------------------------------------------------------------------------
# The mutation run
# --------------------------------------------------------------------------------------------


def test_mutants_cover_every_backward_and_loss_gradient():
    found = mutants.enumerate_mutants()
    functions = {(m.file, m.function) for m in found}
    for expected in (
        ("layers", "Dense.backward"),
        ("norm", "_batchnorm_backward"),
        ("recurrent", "_gru_scan_backward"),
        ("recurrent", "bidirectional.backward"),
        ("conv", "_conv_backward"),
        ("attention", "LayerNorm.backward"),
        ("losses", "_softmax_ce_grad"),
    ):
        assert expected in functions
    # The scan body nested in _lstm_scan_backward is mutated as part of it.
    lstm = [m for m in found if m.function == "_lstm_scan_backward"]
    assert any("dc * f_t" in m.text for m in lstm)
    assert len({(m.file, m.position) for m in found}) == len(found)


def test_a_mutant_is_applied_in_memory_and_undone():
    (mutant,) = [
        m
        for m in mutants.enumerate_mutants(["norm"])
        if m.text == "dy * params['scale'] -> dy / params['scale']"
    ]
    original = norm._batchnorm_backward.__code__
    params = {"scale": jnp.full(3, 2.0), "bias": jnp.zeros(3)}
    cache = (jnp.ones((4, 3)), jnp.ones(3))
    with mutants.applied(mutant):
        assert norm._batchnorm_backward.__code__ is not original
        _, dx = norm._batchnorm_backward(params, cache, jnp.ones((4, 3)))
    assert norm._batchnorm_backward.__code__ is original
    _, dx_real = norm._batchnorm_backward(params, cache, jnp.ones((4, 3)))
    # The mutant's dxhat is dy / 2 instead of dy * 2; with xhat = 1 the mean terms are
    # (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)) = -dxhat: dx = -dxhat * rstd.
    np.testing.assert_allclose(dx, -0.5 * jnp.ones((4, 3)))
    np.testing.assert_allclose(dx_real, -2.0 * jnp.ones((4, 3)))


@pytest.mark.slow
def test_mutation_run_kills_a_known_bad_mutant_and_prints_the_table():
    results = mutants.run(
        ["norm"],
        match="dy * params['scale'] -> dy / params['scale']",
        case_names={"BatchNorm"},
        workers=0,
    )
    (result,) = results
    assert result.outcomes["step"] == mutants.KILLED_MISMATCH
    assert result.outcomes["check_layer"] == mutants.KILLED_MISMATCH
    table = mutants.kill_table(results, mutants.load_allowlist())
    row = next(line for line in table.splitlines() if line.startswith("norm.py")).split()
    assert row[:3] == ["norm.py", "1", "0"]  # one mutant, none equivalent
    columns = dict(zip(mutants.CHECKS, row[3:], strict=True))
    # killed by a mismatch / by a crash / survived / not reached
    assert columns["step"] == columns["check_layer"] == "1/0/0/0"
