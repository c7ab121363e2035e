"""Fault injection: every wrong backward is caught by every check mode, and nothing is lost.

The matrix (fault kind x position x check mode) runs eagerly (``jit=False``: the same code,
no compilation per cell); a diagonal of it runs again under ``jit`` and through ``fit``.
Non-finite data and a learning rate that blows up must never reach the params.
"""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxbp
from jaxbp import faults

NET = jaxbp.serial(jaxbp.Dense(3), jaxbp.Tanh, jaxbp.Dense(3))
LEAVES = ("[0]['W']", "[0]['b']", "[2]['W']", "[2]['b']")
_, PARAMS64 = NET.init(jax.random.key(0), (-1, 3))
X64 = jax.random.normal(jax.random.key(1), (16, 3))
Y64 = jax.random.normal(jax.random.key(2), (16, 3))


def problem(dtype):
    cast = lambda t: jax.tree_util.tree_map(lambda a: a.astype(dtype), t)
    return cast(PARAMS64), cast(X64), cast(Y64)


FAULTS = [(i, k) for i in (0, 1, 2) for k in faults.FAULT_KINDS if (i, k) != (1, "transpose")]


def faulty_leaves(index, kind):
    """The leaves whose manual gradient the fault corrupts."""
    if index == 1:  # the activation: dx is wrong, so everything upstream of it
        return {"[0]['W']", "[0]['b']"}
    return {f"[{index}]['b']" if kind == "missing_term" else f"[{index}]['W']"}


# The relative error each fault must show on its worst leaf (None: data-dependent).
EXACT_REL = {"sign": 2.0, "factor2": 0.5, "missing_term": 1.0}


def optimizers():
    return {"sgd": jaxbp.sgd(0.1), "adam": optax.adam(1e-2)}


def same(a, b):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    return len(la) == len(lb) and all(
        np.array_equal(np.asarray(u), np.asarray(v), equal_nan=True) for u, v in zip(la, lb))


def tol(dtype):
    return 1e-12 if dtype == jnp.float64 else 1e-5


# --------------------------------------------------------------------------------------------
# The matrix
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("index, kind", FAULTS)
def test_fault_matrix_row(index, kind, dtype, jit=False):
    params, x, y = problem(dtype)
    bad = faults.inject(NET, index, kind)
    expected_leaves = faulty_leaves(index, kind)
    # What the faulty gradient and the true gradient are, for the "off" and "report" rows.
    _, g_bad = jaxbp.backprop(bad, "mse", params, x, y)
    _, g_true = jaxbp.autodiff(NET, "mse", params, x, y)
    assert not same(g_bad, g_true)
    for name, opt in optimizers().items():
        state = opt.init(params)
        keep_params = jax.tree_util.tree_map(np.array, params)
        keep_state = jax.tree_util.tree_map(np.array, state)
        for mode in jaxbp.CHECK_MODES:
            step = jaxbp.make_train_step(bad, "mse", opt, check=mode, jit=jit)
            if mode == "raise":
                with pytest.raises(jaxbp.GradientMismatchError) as info:
                    step(params, state, x, y)
                first = str(info.value).splitlines()[0]
                leaf = re.search(r"worst leaf (\S+),", first).group(1)
                rel = float(re.search(r"relative error ([0-9.e+-]+)", first).group(1))
                assert leaf in expected_leaves, first
                assert rel > 0.1, first
                if kind in EXACT_REL and index != 1:
                    assert rel == pytest.approx(EXACT_REL[kind], rel=1e-3)
                assert "nothing was updated" in first
                assert same(params, keep_params) and same(state, keep_state)
                continue
            new_params, new_state, m = step(params, state, x, y)
            assert math.isfinite(float(m["loss"]))
            if mode == "off":
                # Honest: with nothing to compare against, a wrong backward is not detected.
                assert bool(m["ok"]) and bool(m["applied"])
                assert int(m["reason"]) == jaxbp.REASON_APPLIED
                assert math.isnan(float(m["rel_error"])) and int(m["worst_leaf"]) == -1
                # ... and the update follows the faulty gradient, not the true one.
                ref_updates, _ = opt.update(g_bad, opt.init(params), params)
                jax.tree_util.tree_map(
                    lambda a, b: np.testing.assert_allclose(a, b, rtol=tol(dtype),
                                                            atol=tol(dtype)),
                    new_params, optax.apply_updates(params, ref_updates))
                continue
            report = m["report"]
            assert not bool(m["ok"]), mode
            assert int(m["reason"]) == jaxbp.REASON_MISMATCH
            assert report.worst_path in expected_leaves
            assert report.paths[int(m["worst_leaf"])] == report.worst_path
            assert float(m["rel_error"]) == float(report.worst_rel_error) > 0.1
            if kind in EXACT_REL and index != 1:
                assert float(m["rel_error"]) == pytest.approx(EXACT_REL[kind], rel=1e-3)
            failing = {p for p, ok in zip(report.paths, np.asarray(report.leaf_ok)) if not ok}
            assert failing == expected_leaves, (mode, failing)
            if mode == "report":
                assert bool(m["applied"]) and not same(new_params, params)
            else:  # skip: bit-for-bit nothing
                assert not bool(m["applied"])
                assert same(new_params, keep_params), (name, mode)
                assert same(new_state, keep_state), (name, mode)
        assert same(params, keep_params)  # no mode touched the caller's arrays


# A diagonal of the matrix again under jit: (index, kind, mode), every mode and kind once.
JIT_CELLS = [(2, "factor2", "off"), (0, "transpose", "report"), (1, "missing_term", "skip"),
             (2, "sign", "raise"), (0, "missing_term", "skip")]


@pytest.mark.parametrize("index, kind, mode", JIT_CELLS)
def test_fault_under_jit_matches_eager(index, kind, mode):
    params, x, y = PARAMS64, X64, Y64
    bad = faults.inject(NET, index, kind)
    opt = optax.adam(1e-2) if mode == "skip" else jaxbp.sgd(0.1)
    state = opt.init(params)
    outs = {}
    for jit in (False, True):
        step = jaxbp.make_train_step(bad, "mse", opt, check=mode, jit=jit)
        if mode == "raise":
            with pytest.raises(jaxbp.GradientMismatchError) as info:
                step(params, state, x, y)
            outs[jit] = str(info.value).splitlines()[0]
        else:
            outs[jit] = step(params, state, x, y)
    if mode == "raise":
        assert outs[True] == outs[False]
        assert "[2]['W']" in outs[True] and "relative error 2.000e+00" in outs[True]
        return
    (p0, s0, m0), (p1, s1, m1) = outs[False], outs[True]
    for key in ("ok", "applied", "reason", "worst_leaf"):
        assert int(m0[key]) == int(m1[key]), key
    np.testing.assert_allclose(float(m1["loss"]), float(m0["loss"]), rtol=1e-12)
    if mode != "off":
        np.testing.assert_allclose(float(m1["rel_error"]), float(m0["rel_error"]), rtol=1e-9)
        assert m1["report"].worst_path in faulty_leaves(index, kind)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12), p1, p0)
    if mode == "skip":
        assert same(p1, params) and same(s1, state)


# --------------------------------------------------------------------------------------------
# Through fit
# --------------------------------------------------------------------------------------------


def test_fit_raise_names_step_and_leaf_and_keeps_params():
    bad = faults.inject(NET, 0, "sign")
    keep = jax.tree_util.tree_map(np.array, PARAMS64)
    with pytest.raises(jaxbp.GradientMismatchError,
                       match=r"at step 0: worst leaf \[0\]\['W'\], relative error 2\.000e\+00"):
        jaxbp.fit(bad, "mse", jaxbp.sgd(0.1), PARAMS64, X64, Y64, steps=4, check="raise")
    assert same(PARAMS64, keep)


def test_fit_skip_leaves_everything_bit_identical():
    opt = optax.adam(1e-2)  # a state with moments, not only a counter
    bad = faults.inject(NET, 2, "missing_term")
    state = opt.init(PARAMS64)
    res = jaxbp.fit(bad, "mse", opt, PARAMS64, X64, Y64, steps=5, batch_size=8, check="skip",
                    key=jax.random.key(3))
    assert not np.asarray(res.history["applied"]).any()
    assert (np.asarray(res.history["reason"]) == jaxbp.REASON_MISMATCH).all()
    assert same(res.params, PARAMS64) and same(res.opt_state, state)


def test_fit_report_applies_and_reports_every_step():
    bad = faults.inject(NET, 1, "factor2")
    res = jaxbp.fit(bad, "mse", jaxbp.sgd(0.1), PARAMS64, X64, Y64, steps=5, check="report")
    h = res.history
    assert np.asarray(h["applied"]).all() and not np.asarray(h["ok"]).any()
    assert (np.asarray(h["reason"]) == jaxbp.REASON_MISMATCH).all()
    paths = h["report"].paths
    assert {paths[i] for i in np.asarray(h["worst_leaf"])} <= faulty_leaves(1, "factor2")
    assert (np.asarray(h["rel_error"]) > 0.1).all()
    assert not same(res.params, PARAMS64)


# --------------------------------------------------------------------------------------------
# Non-finite numbers never reach the params
# --------------------------------------------------------------------------------------------

POISONS = {
    "nan in x": lambda x, y: (faults.poison(x, (3, 1)), y),
    "inf in x": lambda x, y: (faults.poison(x, 0, float("inf")), y),
    "nan in y": lambda x, y: (x, faults.poison(y, (5, 2))),
    "-inf in y": lambda x, y: (x, faults.poison(y, 7, -float("inf"))),
}


@pytest.mark.parametrize("poison", list(POISONS))
def test_nonfinite_data_skips_the_step_in_every_mode(poison):
    x, y = POISONS[poison](X64, Y64)
    for name, opt in optimizers().items():
        state = opt.init(PARAMS64)
        for mode in jaxbp.CHECK_MODES:  # "raise" raises on mismatches only: this is skipped
            step = jaxbp.make_train_step(NET, "mse", opt, check=mode, jit=False)
            params, new_state, m = step(PARAMS64, state, x, y)
            assert not math.isfinite(float(m["loss"]))
            assert not bool(m["applied"]) and not bool(m["ok"])
            assert int(m["reason"]) == jaxbp.REASON_NONFINITE, (name, mode)
            assert same(params, PARAMS64) and same(new_state, state), (name, mode)


def test_nonfinite_data_under_jit_and_fit():
    x = faults.poison(X64, 2)  # one bad example among 16
    step = jaxbp.make_train_step(NET, "mse", optax.adam(1e-2), check="skip")
    state = optax.adam(1e-2).init(PARAMS64)
    params, new_state, m = step(PARAMS64, state, x, Y64)
    assert int(m["reason"]) == jaxbp.REASON_NONFINITE
    assert same(params, PARAMS64) and same(new_state, state)
    # Mini-batches of 4: only the batches holding example 2 are skipped; the rest train.
    res = jaxbp.fit(NET, "mse", jaxbp.sgd(0.1), PARAMS64, x, Y64, steps=12, batch_size=4,
                    check="report", key=jax.random.key(5))
    reasons = np.asarray(res.history["reason"])
    assert (reasons == jaxbp.REASON_NONFINITE).sum() == 3  # one batch per epoch, 3 epochs
    assert (reasons == jaxbp.REASON_APPLIED).sum() == 9
    assert all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree_util.tree_leaves(
        res.params))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64], ids=["f32", "f64"])
def test_learning_rate_that_blows_up_never_corrupts_params(dtype):
    params, x, y = problem(dtype)
    opt = jaxbp.sgd(1e12)
    state = opt.init(params)
    step = jaxbp.make_train_step(NET, "mse", opt, check="report")
    reasons = []
    for _ in range(40):
        params, state, m = step(params, state, x, y)
        reasons.append(int(m["reason"]))
        assert all(np.isfinite(np.asarray(leaf)).all()
                   for leaf in jax.tree_util.tree_leaves(params))
    # It diverges (some steps applied, then the loss or update overflows) and from then on
    # every step is refused.
    assert reasons[0] == jaxbp.REASON_APPLIED
    assert reasons[-1] == jaxbp.REASON_NONFINITE
    # Once stuck, the params are the last finite ones: the remaining steps change nothing.
    first_bad = reasons.index(jaxbp.REASON_NONFINITE)
    assert set(reasons[first_bad:]) == {jaxbp.REASON_NONFINITE}
    if dtype == jnp.float32:  # the same inside fit's compiled loop (one compile is enough)
        res = jaxbp.fit(NET, "mse", jaxbp.sgd(1e12), problem(dtype)[0], x, y, steps=40)
        np.testing.assert_array_equal(np.asarray(res.history["reason"]), reasons)
        jax.tree_util.tree_map(np.testing.assert_array_equal, res.params, params)


# --------------------------------------------------------------------------------------------
# The toolkit itself
# --------------------------------------------------------------------------------------------


def test_faulty_network_has_the_same_params_and_outputs():
    for index, kind in FAULTS:
        bad = faults.inject(NET, index, kind)
        _, p = bad.init(jax.random.key(0), (-1, 3))
        assert same(p, PARAMS64)
        np.testing.assert_array_equal(jaxbp.forward(bad, p, X64), jaxbp.forward(NET, p, X64))
        assert jaxbp.describe(bad)["layers"][index]["fault"] == kind


def test_dense_faults_exactly():
    dense = jaxbp.Dense(3)
    _, p = dense.init(jax.random.key(0), (-1, 2))
    x = jax.random.normal(jax.random.key(1), (4, 2))
    dy = jax.random.normal(jax.random.key(2), (4, 3))
    _, cache = dense.forward(p, x)
    g, dx = dense.backward(p, cache, dy)
    expect = {"sign": (-g["W"], g["b"]), "factor2": (2 * g["W"], g["b"]),
              "missing_term": (g["W"], jnp.zeros(3)),
              "transpose": (g["W"].T.reshape(2, 3), g["b"])}  # non-square: read in W's shape
    for kind, (w, b) in expect.items():
        gb, dxb = faults.wrong_backward(dense, kind).backward(p, cache, dy)
        np.testing.assert_array_equal(gb["W"], w)
        np.testing.assert_array_equal(gb["b"], b)
        np.testing.assert_array_equal(dxb, dx)  # only the one parameter gradient is wrong


def test_activation_faults_exactly():
    x = jax.random.normal(jax.random.key(1), (4, 3))
    dy = jax.random.normal(jax.random.key(2), (4, 3))
    y, cache = jaxbp.Sigmoid.forward((), x)
    _, dx = jaxbp.Sigmoid.backward((), cache, dy)
    for kind, want in {"sign": -dx, "factor2": 2 * dx, "missing_term": dy}.items():
        _, got = faults.wrong_backward(jaxbp.Sigmoid, kind).backward((), cache, dy)
        np.testing.assert_allclose(got, want, rtol=1e-15)


@pytest.mark.parametrize("layer, kind", [(jaxbp.Dense(3), "sign"), (jaxbp.Dense(3), "transpose"),
                                         (jaxbp.Relu, "missing_term"), (jaxbp.Gelu, "factor2"),
                                         (jaxbp.LeakyRelu(0.1), "sign")])
def test_check_layer_catches_each_fault(layer, kind):
    key = jax.random.key(7)
    assert bool(jaxbp.check_layer(layer, key, (5, 3)).ok)
    report = jaxbp.check_layer(faults.wrong_backward(layer, kind), key, (5, 3))
    assert not bool(report.ok)
    assert report.worst_rel_error > 0.1


def test_three_way_check_blames_the_manual_gradient():
    bad = faults.inject(NET, 2, "factor2")
    result = jaxbp.check_grads(bad, "mse", PARAMS64, X64[:4], Y64[:4])
    assert not result.ok
    assert not bool(result.manual_vs_autodiff.ok) and not bool(result.manual_vs_fd.ok)
    assert bool(result.autodiff_vs_fd.ok)  # the reference and finite differences agree
    assert result.manual_vs_fd.worst_path == "[2]['W']"


def test_toolkit_errors():
    with pytest.raises(ValueError, match="unknown fault kind 'flip'; expected one of: sign, "
                                         "transpose, missing_term, factor2"):
        faults.wrong_backward(jaxbp.Dense(2), "flip")
    with pytest.raises(ValueError, match="'transpose' does not apply.*Tanh.*diagonal"):
        faults.wrong_backward(jaxbp.Tanh, "transpose")
    with pytest.raises(ValueError, match="'missing_term' does not apply to Identity"):
        faults.wrong_backward(jaxbp.Identity, "missing_term")
    with pytest.raises(ValueError, match="single layer, got a serial network.*inject"):
        faults.wrong_backward(NET, "sign")
    with pytest.raises(TypeError, match="expects a Layer"):
        faults.wrong_backward("Dense", "sign")
    with pytest.raises(ValueError, match=r"layer index must be an integer in \[-3, 3\), got 3"):
        faults.inject(NET, 3, "sign")
    with pytest.raises(TypeError, match="jaxbp.serial"):
        faults.inject(jaxbp.Dense(2), 0, "sign")
    with pytest.raises(TypeError, match="floating-point data.*int32"):
        faults.poison(jnp.zeros(3, jnp.int32))
    assert faults.inject(NET, -1, "sign").config[2].config[-1] == ("fault", "sign")


def test_poison():
    x = jnp.zeros((3, 2))
    assert np.isnan(np.asarray(faults.poison(x))[0]).all()
    assert np.isnan(np.asarray(faults.poison(x))[1:]).sum() == 0
    p = faults.poison(x, (1, 1), float("inf"))
    assert np.isinf(p[1, 1]) and np.isfinite(np.delete(np.asarray(p).ravel(), 3)).all()
    mask = jnp.array([[True, False], [False, False], [False, True]])
    assert int(jnp.isnan(faults.poison(x, mask)).sum()) == 2
    jitted = jax.jit(lambda a: faults.poison(a, (2, 0)))(x)
    assert np.isnan(jitted[2, 0]) and int(jnp.isnan(jitted).sum()) == 1
    assert float(jnp.sum(x)) == 0.0  # the input is not modified
    assert faults.poison(x.astype(jnp.float32)).dtype == jnp.float32


def test_matrix_tables():
    rows = faults.fault_matrix(jnp.float64, jit=False, kinds=("sign", "transpose"),
                               positions=(("last Dense", 2), ("activation (Tanh)", 1)))
    lines = faults.format_matrix(rows).splitlines()
    assert lines[0] == "| fault | where | `off` | `report` | `skip` | `raise` |"
    assert lines[2] == (
        "| sign | last Dense (layer 2) | applied; not detected | `[2]['W']`, rel 2.00e+00; "
        "applied | `[2]['W']`, rel 2.00e+00; skipped, params+state bit-identical | raised: "
        "`[2]['W']`, rel 2.000e+00; params unchanged |")
    assert lines[5].startswith("| transpose | activation (Tanh) (layer 1) | n/a: a diagonal")
    assert "NOT" not in "\n".join(lines) and "UNEXPECTED" not in "\n".join(lines)
    table = faults.format_nonfinite(faults.nonfinite_matrix(jnp.float32, jit=False,
                                                            blowup_steps=6))
    body = table.splitlines()[2:]
    assert len(body) == 5 and "UNEXPECTED" not in table and "NOT FINITE" not in table
    assert body[0].count("skipped (non-finite); params+state bit-identical") == 4
    assert body[-1].count("2 steps applied, then every step skipped (non-finite); "
                          "params finite") == 4
