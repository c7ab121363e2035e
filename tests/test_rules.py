"""Learning rules (jaxbp.rules): each rule's backward is what its formula says, the verified
step applies and measures it, and the trainer runs it."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxbp
from jaxbp import rules
from jaxbp.gradcheck import finite_difference_grads

LOSS = "softmax_cross_entropy"


def mlp():
    return jaxbp.serial(jaxbp.Dense(7), jaxbp.Tanh, jaxbp.Dense(6), jaxbp.Relu, jaxbp.Dense(3))


def data(n=5, d=4, dtype=jnp.float64):
    x = jax.random.normal(jax.random.key(1), (n, d), dtype)
    return x, jnp.arange(n) % 3


# ---------------------------------------------------------------------------------- round trip


@pytest.mark.slow
@pytest.mark.parametrize("rule", rules.RULES)
def test_rule_networks_round_trip(rule):
    net = rules.apply_rule(mlp(), rule, (-1, 4))
    d = jaxbp.describe(net)
    assert jaxbp.describe(jaxbp.build(d)) == d
    _, p = net.init(jax.random.key(0), (-1, 4))
    _, q = jaxbp.build(d).init(jax.random.key(0), (-1, 4))
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(lambda a, b: bool(jnp.all(a == b)), p, q))


def test_rule_starts_from_backprops_weights():
    _, bp = mlp().init(jax.random.key(3), (-1, 4))
    for rule in ("fa", "kp", "sign"):
        _, p = rules.apply_rule(mlp(), rule, (-1, 4)).init(jax.random.key(3), (-1, 4))
        for i in (0, 2, 4):
            np.testing.assert_array_equal(p[i]["W"], bp[i]["W"])
    _, p = rules.apply_rule(mlp(), "dfa", (-1, 4)).init(jax.random.key(3), (-1, 4))
    np.testing.assert_array_equal(p["net"][2]["W"], bp[2]["W"])
    assert [b.shape for b in p["B"]] == [(3, 7), (3, 6)]


# ---------------------------------------------------------------------------------- FA, KP, sign


def dense_case(wrapper, n=4, d_in=5, d_out=3, dtype=jnp.float64, seed=0):
    layer = wrapper(jaxbp.Dense(d_out, dtype=dtype))
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    _, p = layer.init(k1, (-1, d_in))
    x = jax.random.normal(k2, (n, d_in), dtype)
    dy = jax.random.normal(k3, (n, d_out), dtype)
    return layer, p, x, dy


@pytest.mark.parametrize("jit", [False, True])
def test_fa_dx_is_dy_times_b_transposed_exactly(jit):
    layer, p, x, dy = dense_case(rules.FeedbackAlignment)

    def grads(p, x, dy):
        return layer.backward(p, layer.forward(p, x)[1], dy)

    g, dx = (jax.jit(grads) if jit else grads)(p, x, dy)
    np.testing.assert_array_equal(dx, dy @ p["B"].T)
    assert not np.allclose(dx, dy @ p["W"].T)
    np.testing.assert_allclose(g["W"], x.T @ dy, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(g["b"], dy.sum(0), rtol=1e-12)
    np.testing.assert_array_equal(g["B"], 0)


@pytest.mark.slow
@settings(max_examples=8, deadline=None)
@given(
    n=st.integers(1, 6), d_in=st.integers(1, 7), d_out=st.integers(1, 7), seed=st.integers(0, 100)
)
def test_fa_and_sign_formulas_property(n, d_in, d_out, seed):
    layer, p, x, dy = dense_case(rules.FeedbackAlignment, n, d_in, d_out, seed=seed)
    _, dx = layer.backward(p, layer.forward(p, x)[1], dy)
    np.testing.assert_allclose(dx, dy @ p["B"].T, rtol=1e-12, atol=1e-12)
    layer, p, x, dy = dense_case(rules.SignSymmetry, n, d_in, d_out, seed=seed)
    _, dx = layer.backward(p, layer.forward(p, x)[1], dy)
    np.testing.assert_allclose(dx, dy @ jnp.sign(p["W"]).T, rtol=1e-12, atol=1e-12)


def test_fa_float32():
    layer, p, x, dy = dense_case(rules.FeedbackAlignment, dtype=jnp.float32)
    assert p["B"].dtype == jnp.float32
    _, dx = jax.jit(lambda p, x, dy: layer.backward(p, layer.forward(p, x)[1], dy))(p, x, dy)
    ref = np.asarray(dy, np.float64) @ np.asarray(p["B"], np.float64).T
    np.testing.assert_allclose(dx, ref, rtol=1e-5, atol=1e-6)


def with_b_equal_w(params):
    return tuple({**p, "B": p["W"]} if "B" in p else p for p in params)


@pytest.mark.slow
@pytest.mark.parametrize("rule", ["fa", "kp"])
def test_feedback_with_b_equal_w_is_backprop(rule):
    net = rules.apply_rule(mlp(), rule, (-1, 4))
    _, p = net.init(jax.random.key(0), (-1, 4))
    p = with_b_equal_w(p)
    x, y = data()
    _, g = jaxbp.backprop(net, LOSS, p, x, y)
    _, ref = jaxbp.backprop(
        mlp(), LOSS, tuple({k: v for k, v in q.items() if k != "B"} if q else q for q in p), x, y
    )
    for i in (0, 2, 4):
        np.testing.assert_allclose(g[i]["W"], ref[i]["W"], rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(g[i]["b"], ref[i]["b"], rtol=1e-12, atol=1e-14)
        want_b = ref[i]["W"] if rule == "kp" else jnp.zeros_like(ref[i]["W"])
        np.testing.assert_allclose(g[i]["B"], want_b, rtol=1e-12, atol=1e-14)

    # A third opinion on the W leaves: central finite differences of the loss.
    def loss_of_first_w(w):
        return jaxbp.loss_fn(net, LOSS)((dict(p[0], W=w), *p[1:]), x, y)

    fd = finite_difference_grads(loss_of_first_w, p[0]["W"])
    np.testing.assert_allclose(g[0]["W"], fd, rtol=1e-6, atol=1e-8)


@pytest.mark.slow
def test_fa_conv1d_dx_is_transposed_convolution_with_b():
    layer = rules.FeedbackAlignment(jaxbp.Conv1D(4, 3))
    _, p = layer.init(jax.random.key(0), (-1, 9, 2))
    x = jax.random.normal(jax.random.key(1), (2, 9, 2))
    y, cache = layer.forward(p, x)
    dy = jax.random.normal(jax.random.key(2), y.shape)
    g, dx = layer.backward(p, cache, dy)
    conv = jaxbp.Conv1D(4, 3)
    _, vjp = jax.vjp(lambda xx: conv.forward({"W": p["B"], "b": p["b"]}, xx)[0], x)
    np.testing.assert_allclose(dx, vjp(dy)[0], rtol=1e-12, atol=1e-12)
    _, vjp_w = jax.vjp(lambda w: conv.forward({"W": w, "b": p["b"]}, x)[0], p["W"])
    np.testing.assert_allclose(g["W"], vjp_w(dy)[0], rtol=1e-12, atol=1e-12)


def sgd_with_decay(lr, wd):
    return optax.chain(optax.add_decayed_weights(wd), jaxbp.sgd(lr))


@pytest.mark.slow
def test_kp_b_minus_w_shrinks_by_the_decay_factor():
    net = rules.apply_rule(mlp(), "kp", (-1, 4))
    _, p = net.init(jax.random.key(0), (-1, 4))
    x, y = data(8)
    lr, wd, steps = 0.1, 0.05, 30
    opt = rules.optimizer(sgd_with_decay(lr, wd), net)
    assert opt is not None
    result = jaxbp.fit(
        net, LOSS, opt, jaxbp.init_train_state(net, opt, p), x, y, steps=steps, check="report"
    )
    assert bool(np.all(result.history.applied))
    q = result.state.params
    for i in (0, 2, 4):
        before = np.linalg.norm(p[i]["B"] - p[i]["W"])
        after = np.linalg.norm(q[i]["B"] - q[i]["W"])
        np.testing.assert_allclose(after / before, (1 - lr * wd) ** steps, rtol=1e-9)
        assert not np.allclose(q[i]["W"], p[i]["W"])  # W really trained


@pytest.mark.slow
def test_fa_b_stays_fixed_under_weight_decay_and_adam():
    net = rules.apply_rule(mlp(), "fa", (-1, 4))
    _, p = net.init(jax.random.key(0), (-1, 4))
    x, y = data(8)
    opt = rules.optimizer(optax.adamw(1e-2, weight_decay=0.5), net)
    result = jaxbp.fit(net, LOSS, opt, jaxbp.init_train_state(net, opt, p), x, y, steps=5)
    for i in (0, 2, 4):
        np.testing.assert_array_equal(result.state.params[i]["B"], p[i]["B"])
        assert not np.allclose(result.state.params[i]["W"], p[i]["W"])
    assert rules.optimizer(optax.adam(1e-2), mlp()) is not None


# ---------------------------------------------------------------------------------- DFA


def test_dfa_hidden_updates_use_only_the_output_error():
    net = rules.apply_rule(mlp(), "dfa", (-1, 4))
    _, p = net.init(jax.random.key(0), (-1, 4))
    x, y = data()
    out, cache = net.forward(p, x)
    e = jax.random.normal(jax.random.key(5), out.shape)
    g, dx = net.backward(p, cache, e)
    w0, b0, w1, b1 = p["net"][0]["W"], p["net"][0]["b"], p["net"][2]["W"], p["net"][2]["b"]
    a0 = x @ w0 + b0
    h0 = jnp.tanh(a0)
    a1 = h0 @ w1 + b1
    h1 = jnp.maximum(a1, 0)
    d0 = (e @ p["B"][0]) * (1 - h0**2)
    d1 = (e @ p["B"][1]) * (a1 > 0)
    np.testing.assert_allclose(g["net"][0]["W"], x.T @ d0, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(g["net"][0]["b"], d0.sum(0), rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(g["net"][2]["W"], h0.T @ d1, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(g["net"][4]["W"], h1.T @ e, rtol=1e-12, atol=1e-13)
    np.testing.assert_array_equal(dx, 0)
    np.testing.assert_array_equal(g["B"][0], 0)
    # The layers above a hidden layer do not reach it: other upper weights, same hidden grads.
    other = dict(
        p,
        net=(
            p["net"][0],
            (),
            {"W": -3 * w1, "b": b1},
            (),
            {"W": 7 * p["net"][4]["W"], "b": p["net"][4]["b"]},
        ),
    )
    g2, _ = net.backward(other, cache, e)
    np.testing.assert_array_equal(g2["net"][0]["W"], g["net"][0]["W"])
    np.testing.assert_array_equal(g2["net"][2]["W"], g["net"][2]["W"])


@pytest.mark.slow
def test_dfa_conv_network_and_jit():
    net = jaxbp.serial(jaxbp.Conv1D(3, 3), jaxbp.Relu, jaxbp.Flatten(), jaxbp.Dense(4))
    dfa = rules.apply_rule(net, "dfa", (-1, 8, 1))
    _, p = dfa.init(jax.random.key(0), (-1, 8, 1))
    assert p["B"][0].shape == (4, 18)
    x = jax.random.normal(jax.random.key(1), (2, 8, 1))
    _, g = jax.jit(lambda p: jaxbp.backprop(dfa, LOSS, p, x, jnp.array([0, 3])))(p)
    assert g["net"][0]["W"].shape == (3, 1, 3) and np.all(np.isfinite(g["net"][0]["W"]))


# ---------------------------------------------------------------------------------- the step


@pytest.mark.slow
def test_verified_step_applies_rule_and_reports_alignment():
    net = rules.apply_rule(mlp(), "fa", (-1, 4))
    _, p = net.init(jax.random.key(0), (-1, 4))
    x, y = data()
    opt = rules.optimizer(jaxbp.sgd(0.1), net)
    ts = jaxbp.init_train_state(net, opt, p)
    step = jaxbp.make_train_step(net, LOSS, opt, check="report")
    new, m = step(ts, x, y)
    assert bool(m.applied) and not bool(m.ok)
    al = rules.layer_alignment(m.report)
    assert set(al) == {"[0]", "[2]", "[4]"}
    assert al["[4]"]["angle"] == pytest.approx(0, abs=1e-5)  # the output layer sees e itself
    assert al["[4]"]["norm_ratio"] == pytest.approx(1, abs=1e-12)
    assert 1 < al["[0]"]["angle"] < 179
    # The angle is arccos of the cosine of the W leaves, the ratio of their norms.
    _, man = jaxbp.backprop(net, LOSS, p, x, y)
    _, ref = jaxbp.autodiff(net, LOSS, p, x, y)
    a, b = np.ravel(man[0]["W"]), np.ravel(ref[0]["W"])
    cos = a @ b / np.linalg.norm(a) / np.linalg.norm(b)
    assert al["[0]"]["angle"] == pytest.approx(np.degrees(np.arccos(cos)), rel=1e-9)
    assert al["[0]"]["norm_ratio"] == pytest.approx(np.linalg.norm(a) / np.linalg.norm(b), rel=1e-9)
    # NaN data: not applied, even in report mode.
    bad, m = step(ts, x.at[0, 0].set(jnp.nan), y)
    assert not bool(m.applied) and int(m.reason) == jaxbp.REASON_NONFINITE
    np.testing.assert_array_equal(bad.params[0]["W"], p[0]["W"])


def test_step_check_and_alignment_of_stacked_reports():
    assert rules.step_check("skip", "fa") == "report"
    assert rules.step_check("raise", "dfa") == "report"
    assert rules.step_check("skip", "bp") == "skip"
    assert rules.step_check("off", "kp") == "off"
    report = jaxbp.compare_grads(
        {"W": jnp.array([[1.0, 0.0]] * 2)}, {"W": jnp.array([[0.0, 2.0]] * 2)}
    )
    stacked = jax.tree_util.tree_map(lambda a: jnp.stack([a, a]), report)
    assert rules.layer_alignment(stacked, keep=[True, False])["<root>"] == {
        "angle": pytest.approx(90.0),
        "norm_ratio": pytest.approx(0.5),
    }
    assert "|a|/|b|" in report.table() and report.to_dict()["leaves"]["['W']"]["norm_ratio"] == 0.5


# ---------------------------------------------------------------------------------- bad input


def test_bad_rules_and_layers():
    with pytest.raises(ValueError, match="unknown learning rule 'xx'; expected one of: bp"):
        rules.apply_rule(mlp(), "xx", (-1, 4))
    net = jaxbp.serial(jaxbp.Dense(4), jaxbp.LayerNorm(), jaxbp.Dense(2))
    for rule in ("fa", "dfa"):
        with pytest.raises(ValueError, match="LayerNorm") as e:
            rules.apply_rule(net, rule, (-1, 3))
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="model.layers\\[1\\]"):
        rules.apply_rule(net, "kp", (-1, 3))
    with pytest.raises(ValueError, match="not defined for layer Relu"):
        rules.FeedbackAlignment(jaxbp.Relu)
    with pytest.raises(ValueError, match="expects a serial network"):
        rules.apply_rule(jaxbp.residual(jaxbp.Dense(3)), "dfa", (-1, 3))
    with pytest.raises(TypeError):
        rules.KolenPollack("Dense")


@pytest.mark.parametrize("rule", ["fa", "dfa"])
def test_shape_errors_fire_under_jit(rule):
    net = rules.apply_rule(mlp(), rule, (-1, 4))
    _, p = net.init(jax.random.key(0), (-1, 4))
    with pytest.raises(ValueError, match="Dense expects inputs of width 4, got shape \\(2, 5\\)"):
        jax.jit(lambda p, x: net.forward(p, x)[0])(p, jnp.ones((2, 5)))


# ---------------------------------------------------------------------------------- trainer


@pytest.mark.slow
def test_trainer_and_command(tmp_path, capsys):
    from jaxbp.cli import main

    out = tmp_path / "run"
    code = main(
        [
            "train",
            "--dataset",
            "xor",
            "--rule",
            "fa",
            "--epochs",
            "3",
            "--check",
            "skip",
            "--out",
            str(out),
            "--progress",
            "none",
        ]
    )
    assert code == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["rule"] == "fa" and m["skipped_mismatch"] == 0 and m["applied_steps"] == m["steps"]
    assert set(m["alignment"]) == {"[0]", "[2]"} and m["alignment"]["[2]"]["angle"] < 1e-3
    assert all("alignment" in r for r in m["history"])
    assert (out / "alignment.png").stat().st_size > 0
    assert m["network"]["layers"][0]["name"] == "FeedbackAlignment"
    # Resume with another rule: one line, exit 2.
    capsys.readouterr()
    code = main(["train", "--rule", "bp", "--resume", "--out", str(out), "--progress", "none"])
    err = capsys.readouterr().err
    assert code == 2 and "rule" in err and len(err.strip().splitlines()) == 1
    assert main(["train", "--rule", "zz"]) == 2  # argparse: the choices, no traceback


def test_command_rejects_a_rule_undefined_for_the_model(tmp_path, capsys):
    from jaxbp.cli import main

    model = {
        "name": "serial",
        "layers": [
            {"name": "Dense", "out_dim": 4},
            {"name": "LayerNorm"},
            {"name": "Dense", "out_dim": 2},
        ],
    }
    path = tmp_path / "m.json"
    path.write_text(json.dumps(model))
    code = main(
        [
            "train",
            "--dataset",
            "xor",
            "--model",
            str(path),
            "--rule",
            "sign",
            "--epochs",
            "1",
            "--out",
            str(tmp_path / "o"),
            "--progress",
            "none",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "LayerNorm" in err and len(err.strip().splitlines()) == 1


def test_check_raise_with_another_rule_runs_as_report(run_cli, tmp_path):
    """The rule's updates disagree with jax.grad by design: --check raise neither skips nor
    stops on them (the step runs as report), and the run completes."""
    out = tmp_path / "raise"
    args = "train --dataset xor --rule fa --epochs 3 --check raise --progress none --out"
    code, _, err = run_cli(*args.split(), out)
    assert code == 0, err
    m = json.loads((out / "metrics.json").read_text())
    assert m["status"] == "completed" and m["applied_steps"] == m["steps"] > 0
    assert m["alignment"]["[0]"]["angle"] > 1.0  # the hidden layer's update is not the gradient


@pytest.mark.parametrize("check, noted", [("raise", True), ("skip", True), ("report", False)])
def test_a_rule_says_at_run_time_that_it_checks_as_report(check, noted):
    from jaxbp.training.config import TrainConfig
    from jaxbp.training.session import prepare

    session = prepare(TrainConfig(dataset="xor", rule="fa", check=check, epochs=1, out=None))
    said = [n for n in session.notes if "runs as 'report' under rule 'fa'" in n]
    assert bool(said) == noted, session.notes
    if noted:
        assert said[0].startswith(f"check {check!r} runs as 'report'")


@pytest.mark.slow  # three one-epoch runs: about 7 s of CPU
def test_epoch_rows_have_the_same_keys_in_every_mode():
    from jaxbp.training.config import TrainConfig
    from jaxbp.training.session import finish, prepare, run

    keys, rows = {}, {}
    for mode, extra in (("off", {}), ("report", {}), ("fa", {"rule": "fa"})):
        check = "off" if mode == "off" else "report"
        config = TrainConfig(dataset="xor", check=check, epochs=1, out=None, **extra)
        session = prepare(config)
        status, message = run(session)
        history = finish(session, status, message).metrics["history"]
        rows[mode] = history[0]
        keys[mode] = set(history[0])
    assert keys["off"] == keys["report"] == keys["fa"], keys
    assert rows["off"]["alignment"] is None and rows["report"]["alignment"] is None
    assert rows["fa"]["alignment"]  # the rule's angles, per layer
    assert rows["off"]["max_grad_rel_error"] is None
