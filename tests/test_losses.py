"""Losses: values against independent formulas (optax, numpy), hand gradients vs jax.grad,
numerical stability, and clear errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxbp

pytestmark = pytest.mark.filterwarnings("error")

KEY = jax.random.key(0)


def data(loss_name, shape, dtype, key=KEY, onehot=False):
    k1, k2 = jax.random.split(key)
    out = 3.0 * jax.random.normal(k1, shape, dtype)
    if loss_name == "softmax_cross_entropy":
        labels = jax.random.randint(k2, shape[:-1], 0, shape[-1])
        return out, (jax.nn.one_hot(labels, shape[-1], dtype=dtype) if onehot else labels)
    if loss_name == "sigmoid_binary_cross_entropy":
        return out, jax.random.uniform(k2, shape, dtype)
    return out, jax.random.normal(k2, shape, dtype)


def reference(loss_name, out, target):
    """The loss from an independent implementation."""
    out64 = np.asarray(out, np.float64)
    if loss_name == "half_sse":
        t = np.asarray(target, np.float64)
        per = 0.5 * np.sum((t - out64) ** 2, axis=-1)
        return np.mean(per)
    if loss_name == "mse":
        return np.mean(np.asarray(optax.squared_error(out, target)))
    if loss_name == "softmax_cross_entropy":
        if jnp.issubdtype(jnp.result_type(target), jnp.integer):
            return np.mean(np.asarray(optax.softmax_cross_entropy_with_integer_labels(out, target)))
        return np.mean(np.asarray(optax.softmax_cross_entropy(out, target)))
    return np.mean(np.asarray(optax.sigmoid_binary_cross_entropy(out, target)))


CASES = [
    (name, onehot)
    for name in jaxbp.LOSSES
    for onehot in (False, True)
    if onehot is False or name == "softmax_cross_entropy"
]
IDS = [f"{n}{'-onehot' if o else ''}" for n, o in CASES]


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(6, 4), (4,)], ids=["batch", "single"])
@pytest.mark.parametrize("name, onehot", CASES, ids=IDS)
def test_value_against_independent_formula(name, onehot, shape):
    loss = jaxbp.get_loss(name)
    for dtype, rtol in ((jnp.float64, 1e-13), (jnp.float32, 1e-5)):
        out, target = data(name, shape, dtype, onehot=onehot)
        value = loss(out, target)
        assert value.shape == () and value.dtype == dtype
        assert float(value) == pytest.approx(float(reference(name, out, target)), rel=rtol)


def test_half_sse_is_the_seeds_e_total():
    out, target = jnp.array([0.8401, 0.7922]), jnp.array([0.02, 0.98])
    assert float(jaxbp.half_sse(out, target)) == pytest.approx(
        0.5 * (0.02 - 0.8401) ** 2 + 0.5 * (0.98 - 0.7922) ** 2, rel=1e-15
    )
    # A batch averages the per-example E_total.
    batch = jnp.stack([out, target])
    assert float(jaxbp.half_sse(batch, jnp.stack([target, target]))) == pytest.approx(
        float(jaxbp.half_sse(out, target)) / 2, rel=1e-15
    )


@pytest.mark.slow
@pytest.mark.parametrize("jit", [False, True], ids=["nojit", "jit"])
@pytest.mark.parametrize("name, onehot", CASES, ids=IDS)
def test_hand_gradient_equals_jax_grad(name, onehot, jit):
    loss = jaxbp.get_loss(name)

    def both(out, target):
        return loss.grad(out, target), jax.grad(loss.value)(out, target)

    fn = jax.jit(both) if jit else both
    for shape in ((6, 4), (4,)):
        for dtype, tol in ((jnp.float64, 1e-13), (jnp.float32, 1e-6)):
            out, target = data(name, shape, dtype, onehot=onehot)
            g, g_ref = fn(out, target)
            assert g.dtype == dtype and g.shape == out.shape
            np.testing.assert_allclose(g, g_ref, rtol=tol, atol=tol)


@pytest.mark.slow
def test_softmax_ce_soft_labels_gradient():
    out, _ = data("softmax_cross_entropy", (5, 3), jnp.float64)
    soft = jax.random.uniform(jax.random.key(3), (5, 3), jnp.float64)
    g = jaxbp.softmax_cross_entropy.grad(out, soft)
    np.testing.assert_allclose(
        g, jax.grad(jaxbp.softmax_cross_entropy.value)(out, soft), rtol=1e-13, atol=1e-15
    )


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64], ids=["f32", "f64"])
def test_huge_logits_are_stable(dtype):
    logits = jnp.array([[1e4, 0.0, -1e4], [-1e4, 1e4, 0.0]], dtype)
    labels = jnp.array([1, 1])
    ce = jaxbp.softmax_cross_entropy
    value, grad = ce(logits, labels), ce.grad(logits, labels)
    assert bool(jnp.isfinite(value)) and bool(jnp.all(jnp.isfinite(grad)))
    # First example: log-softmax of the label is -1e4; second: 0.
    assert float(value) == pytest.approx(1e4 / 2, rel=1e-6)
    np.testing.assert_allclose(grad, [[0.5, -0.5, 0.0], [0.0, 0.0, 0.0]], atol=1e-6)
    np.testing.assert_allclose(jax.grad(ce.value)(logits, labels), grad, atol=1e-6)
    bce = jaxbp.sigmoid_binary_cross_entropy
    z = jnp.array([1e4, -1e4, 1e4, -1e4], dtype)
    t = jnp.array([0.0, 1.0, 1.0, 0.0], dtype)
    assert float(bce(z, t)) == pytest.approx(1e4 / 2, rel=1e-6)
    g = bce.grad(z, t)
    assert bool(jnp.all(jnp.isfinite(g)))
    np.testing.assert_allclose(g, [0.25, -0.25, 0.0, 0.0], atol=1e-7)
    np.testing.assert_allclose(jax.grad(bce.value)(z, t), g, atol=1e-7)


@pytest.mark.slow
def test_losses_under_strict_dtype_promotion():
    with jax.numpy_dtype_promotion("strict"):
        for name, onehot in CASES:
            for dtype in (jnp.float32, jnp.float64):
                out, target = data(name, (3, 4), dtype, onehot=onehot)
                v, g = jax.eval_shape(
                    lambda o, t: (jaxbp.get_loss(name)(o, t), jaxbp.get_loss(name).grad(o, t)),
                    out,
                    target,
                )
                assert v.dtype == dtype and g.dtype == dtype, name


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["half_sse", "mse", "sigmoid_binary_cross_entropy"])
def test_target_shape_and_dtype_errors(name):
    loss = jaxbp.get_loss(name)
    out = jnp.zeros((4, 2))
    with pytest.raises(
        ValueError,
        match=rf"{name} expects targets of the output's shape "
        r"\(4, 2\), got shape \(4, 3\)",
    ):
        loss(out, jnp.zeros((4, 3)))
    with pytest.raises(ValueError, match=r"got shape \(4,\)"):
        loss.grad(out, jnp.zeros((4,)))
    with pytest.raises(TypeError, match="floating-point targets, got dtype int"):
        jax.jit(loss.value)(out, jnp.zeros((4, 2), jnp.int32))


def test_softmax_ce_label_errors():
    ce = jaxbp.softmax_cross_entropy
    logits = jnp.zeros((3, 4))
    with pytest.raises(ValueError, match=r"labels in \[0, 4\), got values \[-1, 4\]"):
        ce(logits, jnp.array([0, 4, -1]))
    with pytest.raises(ValueError, match=r"integer labels of shape \(3,\), got shape \(2,\)"):
        ce.grad(logits, jnp.array([0, 1]))
    with pytest.raises(ValueError, match=r"or one-hot targets of shape \(3, 4\), got shape"):
        ce(logits, jnp.zeros((3, 5)))
    with pytest.raises(TypeError, match="integer labels or floating one-hot targets"):
        ce(logits, jnp.zeros((3, 4), bool))
    # Under jit a label cannot raise: it poisons the loss with NaN instead (never applied).
    assert bool(jnp.isnan(jax.jit(ce.value)(logits, jnp.array([0, 4, 1]))))


def test_get_loss():
    assert jaxbp.get_loss("mse") is jaxbp.mse
    assert jaxbp.get_loss(jaxbp.half_sse) is jaxbp.half_sse
    with pytest.raises(ValueError, match=r"unknown loss 'l1'; expected one of: half_sse, mse"):
        jaxbp.get_loss("l1")
