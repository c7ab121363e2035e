"""Fault injection: every wrong backward is caught by every check mode, and nothing is lost.

The matrix (fault kind x position x check mode) runs eagerly (``jit=False``: the same code,
no compilation per cell); a diagonal of it runs again under ``jit`` and through ``fit``.
Non-finite data and a learning rate that blows up must never reach the params.
"""

import math

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
        np.array_equal(np.asarray(u), np.asarray(v), equal_nan=True) for u, v in zip(la, lb)
    )


def tol(dtype):
    return 1e-12 if dtype == jnp.float64 else 1e-5


# --------------------------------------------------------------------------------------------
# The matrix
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
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
        ts = jaxbp.init_train_state(bad, opt, params)
        keep = jax.tree_util.tree_map(np.array, ts)
        for mode in jaxbp.CHECK_MODES:
            step = jaxbp.make_train_step(bad, "mse", opt, check=mode, jit=jit)
            if mode == "raise":
                with pytest.raises(jaxbp.GradientMismatchError) as info:
                    step(ts, x, y)
                report = info.value.report  # the error carries its report: no parsing
                leaf, rel = report.worst_path, float(report.worst_rel_error)
                # The culprit's line comes first (jaxbp.locate), then the comparison's.
                culprit_line, first = str(info.value).splitlines()[:2]
                assert "disagrees with jax.vjp of its forward; looks like: " in culprit_line
                assert leaf in expected_leaves, first
                assert rel > 0.1, first
                assert f"worst leaf {leaf}, relative error {rel:.3e}" in first
                if kind in EXACT_REL and index != 1:
                    assert rel == pytest.approx(EXACT_REL[kind], rel=1e-3)
                assert "nothing was updated" in first and info.value.step is None
                assert same(ts, keep)
                continue
            new_ts, m = step(ts, x, y)
            new_params = new_ts.params
            assert math.isfinite(float(m.loss))
            if mode == "off":
                # Honest: with nothing to compare against, a wrong backward is not detected.
                assert bool(m.ok) and bool(m.applied)
                assert int(m.reason) == jaxbp.REASON_APPLIED
                assert math.isnan(float(m.rel_error)) and int(m.worst_leaf) == -1
                # ... and the update follows the faulty gradient, not the true one.
                ref_updates, _ = opt.update(g_bad, opt.init(params), params)
                jax.tree_util.tree_map(
                    lambda a, b: np.testing.assert_allclose(a, b, rtol=tol(dtype), atol=tol(dtype)),
                    new_params,
                    optax.apply_updates(params, ref_updates),
                )
                continue
            report = m.report
            assert not bool(m.ok), mode
            assert int(m.reason) == jaxbp.REASON_MISMATCH
            assert report.worst_path in expected_leaves
            assert report.paths[int(m.worst_leaf)] == report.worst_path
            assert float(m.rel_error) == float(report.worst_rel_error) > 0.1
            if kind in EXACT_REL and index != 1:
                assert float(m.rel_error) == pytest.approx(EXACT_REL[kind], rel=1e-3)
            failing = {p for p, ok in zip(report.paths, np.asarray(report.leaf_ok)) if not ok}
            assert failing == expected_leaves, (mode, failing)
            if mode == "report":
                assert bool(m.applied) and not same(new_params, params)
            else:  # skip: bit-for-bit nothing
                assert not bool(m.applied)
                assert same(new_ts, keep), (name, mode)
        assert same(ts, keep)  # no mode touched the caller's arrays


# A diagonal of the matrix again under jit: (index, kind, mode), every mode and kind once.
JIT_CELLS = [
    (2, "factor2", "off"),
    (0, "transpose", "report"),
    (1, "missing_term", "skip"),
    (2, "sign", "raise"),
    (0, "missing_term", "skip"),
]


@pytest.mark.slow
@pytest.mark.parametrize("index, kind, mode", JIT_CELLS)
def test_fault_under_jit_matches_eager(index, kind, mode):
    params, x, y = PARAMS64, X64, Y64
    bad = faults.inject(NET, index, kind)
    opt = optax.adam(1e-2) if mode == "skip" else jaxbp.sgd(0.1)
    ts = jaxbp.init_train_state(bad, opt, params)
    outs = {}
    for jit in (False, True):
        step = jaxbp.make_train_step(bad, "mse", opt, check=mode, jit=jit)
        if mode == "raise":
            with pytest.raises(jaxbp.GradientMismatchError) as info:
                step(ts, x, y)
            outs[jit] = (str(info.value).splitlines()[0], info.value.report)
        else:
            outs[jit] = step(ts, x, y)
    if mode == "raise":
        assert outs[True][0] == outs[False][0]
        report = outs[True][1]
        assert report.worst_path == "[2]['W']" and float(report.worst_rel_error) == 2.0
        return
    (t0, m0), (t1, m1) = outs[False], outs[True]
    for field in ("ok", "applied", "reason", "worst_leaf"):
        assert int(getattr(m0, field)) == int(getattr(m1, field)), field
    np.testing.assert_allclose(float(m1.loss), float(m0.loss), rtol=1e-12)
    if mode != "off":
        np.testing.assert_allclose(float(m1.rel_error), float(m0.rel_error), rtol=1e-9)
        assert m1.report.worst_path in faulty_leaves(index, kind)
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12), t1.params, t0.params
    )
    if mode == "skip":
        assert same(t1, ts)


# --------------------------------------------------------------------------------------------
# Through fit
# --------------------------------------------------------------------------------------------


def test_fit_raise_names_step_and_leaf_and_keeps_params():
    bad = faults.inject(NET, 0, "sign")
    keep = jax.tree_util.tree_map(np.array, PARAMS64)
    ts = jaxbp.init_train_state(bad, jaxbp.sgd(0.1), PARAMS64)
    with pytest.raises(
        jaxbp.GradientMismatchError,
        match=r"at step 0: worst leaf \[0\]\['W'\], relative error 2\.000e\+00",
    ) as info:
        jaxbp.fit(bad, "mse", jaxbp.sgd(0.1), ts, X64, Y64, steps=4, check="raise")
    assert info.value.step == 0 and info.value.report.worst_path == "[0]['W']"
    assert same(PARAMS64, keep)


@pytest.mark.slow
def test_fit_skip_leaves_everything_bit_identical():
    opt = optax.adam(1e-2)  # a state with moments, not only a counter
    bad = faults.inject(NET, 2, "missing_term")
    ts = jaxbp.init_train_state(bad, opt, PARAMS64)
    res = jaxbp.fit(
        bad, "mse", opt, ts, X64, Y64, steps=5, batch_size=8, check="skip", key=jax.random.key(3)
    )
    assert not np.asarray(res.history.applied).any()
    assert (np.asarray(res.history.reason) == jaxbp.REASON_MISMATCH).all()
    assert same(res.state, ts)


def test_fit_report_applies_and_reports_every_step():
    bad = faults.inject(NET, 1, "factor2")
    ts = jaxbp.init_train_state(bad, jaxbp.sgd(0.1), PARAMS64)
    res = jaxbp.fit(bad, "mse", jaxbp.sgd(0.1), ts, X64, Y64, steps=5, check="report")
    h = res.history
    assert np.asarray(h.applied).all() and not np.asarray(h.ok).any()
    assert (np.asarray(h.reason) == jaxbp.REASON_MISMATCH).all()
    paths = h.report.paths
    assert {paths[i] for i in np.asarray(h.worst_leaf)} <= faulty_leaves(1, "factor2")
    assert (np.asarray(h.rel_error) > 0.1).all()
    assert not same(res.state.params, PARAMS64)


# --------------------------------------------------------------------------------------------
# Non-finite numbers never reach the params
# --------------------------------------------------------------------------------------------

POISONS = {
    "nan in x": lambda x, y: (faults.poison(x, (3, 1)), y),
    "inf in x": lambda x, y: (faults.poison(x, 0, float("inf")), y),
    "nan in y": lambda x, y: (x, faults.poison(y, (5, 2))),
    "-inf in y": lambda x, y: (x, faults.poison(y, 7, -float("inf"))),
}


@pytest.mark.slow
@pytest.mark.parametrize("poison", list(POISONS))
def test_nonfinite_data_skips_the_step_in_every_mode(poison):
    x, y = POISONS[poison](X64, Y64)
    for name, opt in optimizers().items():
        ts = jaxbp.init_train_state(NET, opt, PARAMS64)
        for mode in jaxbp.CHECK_MODES:  # "raise" raises on mismatches only: this is skipped
            step = jaxbp.make_train_step(NET, "mse", opt, check=mode, jit=False)
            new_ts, m = step(ts, x, y)
            assert not math.isfinite(float(m.loss))
            assert not bool(m.applied) and not bool(m.ok)
            assert int(m.reason) == jaxbp.REASON_NONFINITE, (name, mode)
            assert same(new_ts, ts), (name, mode)


@pytest.mark.slow
def test_nonfinite_data_under_jit_and_fit():
    x = faults.poison(X64, 2)  # one bad example among 16
    step = jaxbp.make_train_step(NET, "mse", optax.adam(1e-2), check="skip")
    ts = jaxbp.init_train_state(NET, optax.adam(1e-2), PARAMS64)
    new_ts, m = step(ts, x, Y64)
    assert int(m.reason) == jaxbp.REASON_NONFINITE
    assert same(new_ts, ts)
    # Mini-batches of 4: only the batches holding example 2 are skipped; the rest train.
    res = jaxbp.fit(
        NET,
        "mse",
        jaxbp.sgd(0.1),
        jaxbp.init_train_state(NET, jaxbp.sgd(0.1), PARAMS64),
        x,
        Y64,
        steps=12,
        batch_size=4,
        check="report",
        key=jax.random.key(5),
    )
    reasons = np.asarray(res.history.reason)
    assert (reasons == jaxbp.REASON_NONFINITE).sum() == 3  # one batch per epoch, 3 epochs
    assert (reasons == jaxbp.REASON_APPLIED).sum() == 9
    assert all(
        np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree_util.tree_leaves(res.state.params)
    )


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64], ids=["f32", "f64"])
def test_learning_rate_that_blows_up_never_corrupts_params(dtype):
    params, x, y = problem(dtype)
    opt = jaxbp.sgd(1e12)
    ts = jaxbp.init_train_state(NET, opt, params)
    step = jaxbp.make_train_step(NET, "mse", opt, check="report")
    reasons = []
    for _ in range(40):
        ts, m = step(ts, x, y)
        reasons.append(int(m.reason))
        assert all(
            np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree_util.tree_leaves(ts.params)
        )
    # It diverges (some steps applied, then the loss or update overflows) and from then on
    # every step is refused.
    assert reasons[0] == jaxbp.REASON_APPLIED
    assert reasons[-1] == jaxbp.REASON_NONFINITE
    # Once stuck, the params are the last finite ones: the remaining steps change nothing.
    first_bad = reasons.index(jaxbp.REASON_NONFINITE)
    assert set(reasons[first_bad:]) == {jaxbp.REASON_NONFINITE}
    if dtype == jnp.float32:  # the same inside fit's compiled loop (one compile is enough)
        opt = jaxbp.sgd(1e12)
        res = jaxbp.fit(
            NET, "mse", opt, jaxbp.init_train_state(NET, opt, problem(dtype)[0]), x, y, steps=40
        )
        np.testing.assert_array_equal(np.asarray(res.history.reason), reasons)
        jax.tree_util.tree_map(np.testing.assert_array_equal, res.state.params, ts.params)


# --------------------------------------------------------------------------------------------
# The toolkit itself
# --------------------------------------------------------------------------------------------


def test_faulty_network_has_the_same_params_and_outputs():
    for index, kind in FAULTS:
        bad = faults.inject(NET, index, kind)
        _, p = bad.init(jax.random.key(0), (-1, 3))
        assert same(p, PARAMS64)
        np.testing.assert_array_equal(jaxbp.forward(bad, p, X64), jaxbp.forward(NET, p, X64))
        described = jaxbp.describe(bad)["layers"][index]
        assert described == {
            "name": "Fault",
            "kind": kind,
            "layer": jaxbp.describe(NET.children[index]),
        }
        # The faulty network travels as a description: rebuilt, it is still faulty.
        rebuilt = jaxbp.model.build(jaxbp.describe(bad))
        assert jaxbp.describe(rebuilt) == jaxbp.describe(bad)
        _, g_bad = jaxbp.backprop(bad, "mse", p, X64, Y64)
        _, g_rebuilt = jaxbp.backprop(rebuilt, "mse", p, X64, Y64)
        assert same(g_bad, g_rebuilt)


def test_inject_keeps_the_networks_initialisation():
    # Dense before a Relu is He-initialised by serial; its Fault keeps that init.
    net = jaxbp.serial(jaxbp.Dense(4), jaxbp.Relu, jaxbp.Dense(2))
    bad = faults.inject(net, 0, "sign")
    _, p = net.init(jax.random.key(0), (-1, 3))
    _, p_bad = bad.init(jax.random.key(0), (-1, 3))
    assert same(p, p_bad)


def test_dense_faults_exactly():
    dense = jaxbp.Dense(3)
    _, p = dense.init(jax.random.key(0), (-1, 2))
    x = jax.random.normal(jax.random.key(1), (4, 2))
    dy = jax.random.normal(jax.random.key(2), (4, 3))
    _, cache = dense.forward(p, x)
    g, dx = dense.backward(p, cache, dy)
    expect = {
        "sign": (-g["W"], g["b"]),
        "factor2": (2 * g["W"], g["b"]),
        "missing_term": (g["W"], jnp.zeros(3)),
        "transpose": (g["W"].T.reshape(2, 3), g["b"]),
    }  # non-square: read in W's shape
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


@pytest.mark.slow
@pytest.mark.parametrize(
    "layer, kind",
    [
        (jaxbp.Dense(3), "sign"),
        (jaxbp.Dense(3), "transpose"),
        (jaxbp.Relu, "missing_term"),
        (jaxbp.Gelu, "factor2"),
        (jaxbp.LeakyRelu(0.1), "sign"),
    ],
)
def test_check_layer_catches_each_fault(layer, kind):
    key = jax.random.key(7)
    assert bool(jaxbp.check_layer(layer, key, (5, 3)).ok)
    report = jaxbp.check_layer(faults.wrong_backward(layer, kind), key, (5, 3))
    assert not bool(report.ok)
    assert report.worst_rel_error > 0.1


@pytest.mark.slow
def test_three_way_check_blames_the_manual_gradient():
    bad = faults.inject(NET, 2, "factor2")
    result = jaxbp.check_grads(bad, "mse", PARAMS64, X64[:4], Y64[:4])
    assert not result.ok
    assert not bool(result.manual_vs_autodiff.ok) and not bool(result.manual_vs_fd.ok)
    assert bool(result.autodiff_vs_fd.ok)  # the reference and finite differences agree
    assert result.manual_vs_fd.worst_path == "[2]['W']"


def test_toolkit_errors():
    with pytest.raises(
        ValueError,
        match="unknown fault kind 'flip'; expected one of: sign, transpose, missing_term, factor2",
    ):
        faults.wrong_backward(jaxbp.Dense(2), "flip")
    with pytest.raises(ValueError, match="'transpose' does not apply.*Tanh.*diagonal"):
        faults.wrong_backward(jaxbp.Tanh, "transpose")
    with pytest.raises(ValueError, match="'missing_term' does not apply to Identity"):
        faults.wrong_backward(jaxbp.Identity, "missing_term")
    with pytest.raises(ValueError, match="single layer, got a serial network.*inject"):
        faults.wrong_backward(NET, "sign")
    with pytest.raises(ValueError, match="single layer, got a residual network.*inject"):
        faults.wrong_backward(jaxbp.residual(jaxbp.Dense(3)), "sign")
    with pytest.raises(ValueError, match=r"model: unknown fault kind 'flip'"):
        jaxbp.model.build({"name": "Fault", "layer": {"name": "Tanh"}, "kind": "flip"})
    with pytest.raises(TypeError, match="expects a Layer"):
        faults.wrong_backward("Dense", "sign")
    with pytest.raises(ValueError, match=r"layer index must be an integer in \[-3, 3\), got 3"):
        faults.inject(NET, 3, "sign")
    with pytest.raises(TypeError, match="jaxbp.serial"):
        faults.inject(jaxbp.Dense(2), 0, "sign")
    with pytest.raises(TypeError, match="floating-point data.*int32"):
        faults.poison(jnp.zeros(3, jnp.int32))
    assert faults.inject(NET, -1, "sign").children[2].config[-1] == ("kind", "sign")


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


@pytest.mark.slow
def test_matrix_tables():
    # The matrix's network comes from a description and holds a BatchNorm (layer state).
    assert faults.MATRIX_MODEL["layers"][2] == {"name": "BatchNorm"}
    rows = faults.fault_matrix(
        jnp.float64,
        jit=False,
        kinds=("sign", "transpose"),
        positions=(("last Dense", 3), ("activation (Tanh)", 1)),
    )
    skip = rows[0]["modes"]["skip"]["adam"]
    assert not skip["applied"] and skip["unchanged"] and not skip["state_moved"]
    assert rows[0]["modes"]["report"]["adam"]["state_moved"]  # applied: the statistics move
    assert rows[0]["modes"]["raise"]["sgd"]["worst_leaf"] == "[3]['W']"
    lines = faults.format_matrix(rows).splitlines()
    assert lines[0] == "| fault | where | `off` | `report` | `skip` | `raise` |"
    assert lines[2] == (
        "| sign | last Dense (layer 3) | applied; not detected | `[3]['W']`, rel 2.00e+00; "
        "applied | `[3]['W']`, rel 2.00e+00; skipped, params+opt+layer state bit-identical | "
        "raised: `[3]['W']`, rel 2.000e+00; params unchanged |"
    )
    assert lines[5].startswith("| transpose | activation (Tanh) (layer 1) | n/a: a diagonal")
    assert "NOT" not in "\n".join(lines) and "UNEXPECTED" not in "\n".join(lines)
    table = faults.format_nonfinite(faults.nonfinite_matrix(jnp.float32, jit=False, blowup_steps=6))
    body = table.splitlines()[2:]
    assert len(body) == 5 and "UNEXPECTED" not in table and "NOT FINITE" not in table
    assert body[0].count("skipped (non-finite); params+opt+layer state bit-identical") == 4
    assert (
        body[-1].count(
            " steps applied, then every step skipped (non-finite); params and state finite"
        )
        == 4
    )
