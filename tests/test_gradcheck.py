"""compare_grads, finite differences, check_grads and check_layer catching real mistakes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbp

pytestmark = pytest.mark.filterwarnings("error")


def tree(dtype=jnp.float64):
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    return (
        {"W": jax.random.normal(k1, (3, 4), dtype), "b": jax.random.normal(k2, (4,), dtype)},
        (),
        {"W": jax.random.normal(k3, (4, 2), dtype), "b": jnp.asarray(0.5, dtype)},
    )


_compare_jit = jax.jit(jaxbp.compare_grads)


@pytest.mark.parametrize("jit", [False, True], ids=["nojit", "jit"])
def test_equal_trees_agree(jit):
    compare = _compare_jit if jit else jaxbp.compare_grads
    a = tree()
    report = compare(a, a)
    assert bool(report.ok) and float(report.worst_rel_error) == 0.0
    assert report.paths == ("[0]['W']", "[0]['b']", "[2]['W']", "[2]['b']")
    np.testing.assert_array_equal(report.max_abs_diff, 0.0)
    np.testing.assert_allclose(report.cosine, 1.0, rtol=1e-15)
    assert report.to_dict()["ok"] is True and "all leaves agree" in report.table()
    report.raise_if_failed()


@pytest.mark.parametrize("jit", [False, True], ids=["nojit", "jit"])
def test_perturbed_leaf_is_named_with_its_relative_error(jit):
    compare = _compare_jit if jit else jaxbp.compare_grads
    a = tree()
    b = (a[0], (), {"W": a[2]["W"].at[1, 0].add(1e-3), "b": a[2]["b"]})
    report = compare(b, a)
    assert not bool(report.ok)
    assert report.worst_path == "[2]['W']"
    scale = max(float(jnp.max(jnp.abs(a[2]["W"]))), float(jnp.max(jnp.abs(b[2]["W"]))))
    assert float(report.worst_rel_error) == pytest.approx(1e-3 / scale, rel=1e-9)
    assert float(report.max_abs_diff[2]) == pytest.approx(1e-3, rel=1e-9)
    np.testing.assert_array_equal(report.leaf_ok, [True, True, False, True])
    with pytest.raises(jaxbp.GradientMismatchError, match=r"worst leaf \[2\]\['W'\]") as info:
        report.raise_if_failed()
    assert info.value.report is report and info.value.step is None
    assert "MISMATCH: worst leaf [2]['W']" in report.table()


def test_nan_leaf_fails_and_is_worst():
    a = tree()
    b = (a[0], (), {"W": a[2]["W"], "b": jnp.asarray(jnp.nan)})
    for x, y in ((b, a), (a, b), (b, b)):
        report = jaxbp.compare_grads(x, y)
        assert not bool(report.ok)
        assert report.worst_path == "[2]['b']" and np.isinf(float(report.worst_rel_error))
    # Under jit too, and a small mismatch elsewhere does not hide the NaN.
    c = ({"W": a[0]["W"] * 1.01, "b": a[0]["b"]}, (), b[2])
    report = _compare_jit(c, a)
    assert report.worst_path == "[2]['b']"


_compare_internal_jit = jax.jit(jaxbp.gradcheck.compare_with_finiteness)


# Finiteness is read off max |.| (inf) and sum of squares (NaN), not from isfinite passes: every
# kind of non-finite entry, on either side, at a big leaf (vectorised reductions) and a small one.
@pytest.mark.slow
@pytest.mark.parametrize("size", [7, 4099])
@pytest.mark.parametrize("jit", [False, True], ids=["nojit", "jit"])
@pytest.mark.parametrize(
    "where,value",
    [
        ("manual", jnp.nan),
        ("reference", jnp.nan),
        ("manual", jnp.inf),
        ("reference", -jnp.inf),
        ("both", jnp.inf),
        ("both", jnp.nan),
    ],
)
def test_every_nonfinite_entry_is_caught(where, value, jit, size):
    compare = _compare_internal_jit if jit else jaxbp.gradcheck.compare_with_finiteness
    for dtype in (jnp.float32, jnp.float64):
        good = jnp.linspace(-1.0, 1.0, size, dtype=dtype)
        bad = good.at[size // 2].set(value)
        a = bad if where in ("manual", "both") else good
        b = bad if where in ("reference", "both") else good
        report, manual_finite = compare({"ok": good, "g": a}, {"ok": good, "g": b})
        assert not bool(report.ok) and report.worst_path == "['g']"
        assert np.isinf(float(report.worst_rel_error))
        assert report.paths == ("['g']", "['ok']")
        assert bool(report.leaf_ok[1]) and float(report.rel_error[1]) == 0.0
        assert bool(manual_finite) == (where == "reference")
        assert np.isnan(float(report.cosine[0]))
        assert (
            np.isnan(float(report.max_abs_diff[0]))
            if np.isnan(value)
            else float(report.max_abs_diff[0]) == np.inf
        )


def test_manual_finiteness_is_judged_in_its_own_dtype():
    # A float64 manual leaf beyond float32's range is finite, even though the comparison runs
    # in the float32 reference's precision (where it reads inf, and so disagrees).
    big = jnp.array([1e39, 1.0], jnp.float64)
    for compare in (jaxbp.gradcheck.compare_with_finiteness, _compare_internal_jit):
        report, manual_finite = compare({"g": big}, {"g": jnp.array([3e38, 1.0], jnp.float32)})
        assert bool(manual_finite) and not bool(report.ok)


def test_bfloat16_and_float16_leaves():
    for dtype in (jnp.bfloat16, jnp.float16):
        a = jnp.array([1.0, -2.0, 0.5], dtype)
        assert jaxbp.default_tolerance(dtype) == (1e-1, 1e-1)
        assert bool(jaxbp.compare_grads({"g": a}, {"g": a * 1.01}).ok)
        # Mixed with float32: the less precise dtype sets the tolerance.
        assert bool(jaxbp.compare_grads({"g": a}, {"g": a.astype(jnp.float32) * 1.05}).ok)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_bfloat16_and_float16_catch_a_sign_flip(dtype):
    a = jnp.array([1.0, -2.0, 0.5], dtype)
    assert not bool(jaxbp.compare_grads({"g": a}, {"g": -a}).ok)
    assert not bool(jaxbp.compare_grads({"g": a}, {"g": 2 * a}).ok)


def test_nan_in_a_large_float32_leaf_under_jit():
    # The path where XLA CPU's vectorised max may drop a NaN (jax 0.10.2 returned the largest
    # finite value for a (1024, 1024) float32 max): the comparison must not rely on it.
    g = jax.random.normal(jax.random.key(0), (1024, 1024), jnp.float32)
    for value in (jnp.nan, jnp.inf):
        bad = g.at[513, 700].set(value)
        for a, b, manual_ok in ((bad, g, False), (g, bad, True)):
            report, manual_finite = _compare_internal_jit({"g": a}, {"g": b})
            assert not bool(report.ok) and np.isinf(float(report.worst_rel_error))
            assert bool(manual_finite) == manual_ok


@pytest.mark.parametrize("jit", [False, True], ids=["nojit", "jit"])
def test_huge_finite_gradients_are_finite(jit):
    # float32 entries whose squares overflow: the sums read inf, which is not NaN, so the leaf
    # still counts as finite and equal leaves agree.
    compare = _compare_internal_jit if jit else jaxbp.gradcheck.compare_with_finiteness
    g = jnp.array([3e30, -1.0, 2e25], jnp.float32)
    report, manual_finite = compare({"g": g}, {"g": g})
    assert bool(report.ok) and bool(manual_finite) and float(report.worst_rel_error) == 0.0
    report, _ = compare({"g": g}, {"g": g.at[0].set(3.1e30)})
    assert not bool(report.ok) and float(report.rel_error[0]) == pytest.approx(0.1 / 3.1, rel=1e-5)


@pytest.mark.slow
def test_elementwise_tolerance_is_relative_to_the_entry_and_the_leaf():
    # |a - b| <= atol * scale + rtol * |b| at every entry, scale = max(max|a|, max|b|).
    b = jnp.array([100.0, 1.0])
    a = jnp.array([100.1, 1.0])  # diff 0.1 on the big entry
    assert bool(jaxbp.compare_grads({"g": a}, {"g": b}, rtol=2e-3, atol=0.0).ok)  # 0.1 <= 0.2
    assert not bool(jaxbp.compare_grads({"g": a}, {"g": b}, rtol=5e-4, atol=0.0).ok)
    assert bool(jaxbp.compare_grads({"g": a}, {"g": b}, rtol=0.0, atol=1.1e-3).ok)
    a = jnp.array([100.0, 1.1])  # diff 0.1 on the small entry: rtol * |b| allows only 2e-3
    assert not bool(jaxbp.compare_grads({"g": a}, {"g": b}, rtol=2e-3, atol=0.0).ok)
    assert bool(jaxbp.compare_grads({"g": a}, {"g": b}, rtol=2e-3, atol=1e-3).ok)


def test_structure_and_shape_mismatch_errors():
    a = tree()
    with pytest.raises(
        ValueError,
        match=r"same structure.*got unexpected leaves \[2\]\['W'\], "
        r"\[2\]\['b'\]",
    ):
        jaxbp.compare_grads(a, a[:2])
    with pytest.raises(ValueError, match=r"got a list at the top level, expected a tuple"):
        jaxbp.compare_grads(list(a), a)
    # A leaf of another shape is a wrong gradient, not a wrong call: a mismatch of that leaf.
    b = (a[0], (), {"W": a[2]["W"][:, :1], "b": a[2]["b"]})
    report = jaxbp.compare_grads(b, a)
    assert not bool(report.ok) and report.worst_path == "[2]['W']"
    assert report.mismatched_shapes == (("[2]['W']", (4, 1), tuple(a[2]["W"].shape)),)
    with pytest.raises(ValueError, match="no leaves"):
        jaxbp.compare_grads((), ())
    with pytest.raises(TypeError, match="floating point"):
        jaxbp.compare_grads(jnp.arange(3), jnp.arange(3))


def test_tiny_through_cancellation_does_not_fail_float32():
    # 1e-6 next to 1.0: a 30% "error" on the tiny entry is float32 noise, not a wrong gradient.
    a = jnp.array([1.0, 1e-6, -0.5], jnp.float32)
    b = jnp.array([1.0, 1.3e-6, -0.5], jnp.float32)
    report = jaxbp.compare_grads({"g": a}, {"g": b})
    assert bool(report.ok) and float(report.worst_rel_error) < 1e-6
    # The same leaf wrong where it matters still fails.
    report = jaxbp.compare_grads({"g": a.at[0].set(1.01)}, {"g": b})
    assert not bool(report.ok)
    # float64 is far tighter.
    report = jaxbp.compare_grads({"g": a.astype(jnp.float64) + 1e-9}, {"g": a.astype(jnp.float64)})
    assert not bool(report.ok)


def test_tolerances_by_dtype_and_override():
    assert jaxbp.default_tolerance(jnp.float64) == (1e-10, 1e-10)
    assert jaxbp.default_tolerance(jnp.float32) == (2e-3, 2e-3)
    a = {"g": jnp.array([1.0, 2.0])}
    b = {"g": jnp.array([1.0, 2.0 + 1e-6])}
    assert not bool(jaxbp.compare_grads(a, b).ok)
    assert bool(jaxbp.compare_grads(a, b, rtol=1e-5, atol=0.0).ok)
    # Mixed dtypes: the less precise one sets the tolerance.
    assert bool(jaxbp.compare_grads({"g": a["g"].astype(jnp.float32)}, b).ok)


def test_cosine():
    r = jaxbp.compare_grads({"g": jnp.array([1.0, 0.0])}, {"g": jnp.array([0.0, 1.0])})
    assert float(r.cosine[0]) == pytest.approx(0.0, abs=1e-15)
    r = jaxbp.compare_grads({"g": jnp.zeros(3)}, {"g": jnp.zeros(3)})
    assert float(r.cosine[0]) == 1.0 and bool(r.ok)
    r = jaxbp.compare_grads({"g": -jnp.ones(3)}, {"g": jnp.ones(3)})
    assert float(r.cosine[0]) == pytest.approx(-1.0)


@pytest.mark.slow
def test_vmap_gives_a_report_per_example():
    a = jnp.ones((5, 3))
    b = a.at[2, 1].set(2.0)
    r = jax.vmap(lambda x, y: jaxbp.compare_grads({"g": x}, {"g": y}))(a, b)
    np.testing.assert_array_equal(r.ok, [True, True, False, True, True])


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32], ids=["f64", "f32"])
def test_finite_differences_of_a_known_function(dtype):
    p = {"a": jnp.array([0.5, -1.0, 2.0], dtype), "b": jnp.asarray(0.3, dtype)}
    f = lambda q: jnp.sum(q["a"] ** 3) * q["b"] + jnp.sin(q["b"])
    fd = jaxbp.finite_difference_grads(f, p)
    exact = {"a": 3 * p["a"] ** 2 * p["b"], "b": jnp.sum(p["a"] ** 3) + jnp.cos(p["b"])}
    assert fd["a"].dtype == dtype
    report = jaxbp.compare_grads(fd, exact, tolerances=jaxbp.fd_tolerance)
    assert bool(report.ok), report.table()


def wrong_dense(out_dim, bug):
    """A Dense whose backward has a deliberate mistake."""
    layer = jaxbp.Dense(out_dim)

    def backward(params, x, dy):
        dp, dx = layer.backward(params, x, dy)
        if bug == "sign":
            dp = {"W": -dp["W"], "b": dp["b"]}
        elif bug == "no_transpose":  # dx = dy @ W instead of dy @ W.T (square W)
            dx = dy @ params["W"]
        return dp, dx

    return layer._replace(backward=backward)


@pytest.mark.slow
def test_check_layer_catches_wrong_backward():
    report = jaxbp.check_layer(wrong_dense(3, "sign"), jax.random.key(0), (5, 3))
    assert not bool(report.ok) and report.worst_path == "['params']['W']"
    report = jaxbp.check_layer(wrong_dense(3, "no_transpose"), jax.random.key(0), (5, 3))
    assert not bool(report.ok) and report.worst_path == "['x']"
    np.testing.assert_array_equal(report.leaf_ok, [True, True, False])


@pytest.mark.slow
def test_check_grads_three_opinions():
    net = jaxbp.serial(jaxbp.Dense(3), jaxbp.Tanh, jaxbp.Dense(2))
    _, params = net.init(jax.random.key(0), (-1, 3))
    x = jax.random.normal(jax.random.key(1), (4, 3))
    y = jnp.array([0, 1, 1, 0])
    check = jaxbp.check_grads(net, "softmax_cross_entropy", params, x, y)
    assert check.ok, [str(r) for r in check]
    bad = jaxbp.serial(jaxbp.Dense(3), jaxbp.Tanh, wrong_dense(2, "sign"))
    check = jaxbp.check_grads(bad, "softmax_cross_entropy", params, x, y)
    assert not check.ok
    assert not bool(check.manual_vs_autodiff.ok) and not bool(check.manual_vs_fd.ok)
    assert bool(check.autodiff_vs_fd.ok)
    assert check.manual_vs_autodiff.worst_path == "[2]['W']"
