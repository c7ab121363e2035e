"""The per-layer probe, the culprit and the diagnosis (jaxbp.probe, jaxbp.diagnose).

One small network (Dense, Tanh, a residual, Dense) and its faulty twins serve most tests, so a
handful of compiled programs serve many assertions. The static path (``make_train_step``:
the host reads the schedule) and the dynamic one (a fused loop: ``lax.cond`` per node) must
make the same decisions.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxbp
from jaxbp import faults, probe
from jaxbp.diagnose import diagnose

LOSS = "softmax_cross_entropy"
BODY = (
    jaxbp.Dense(6),
    jaxbp.Tanh,
    jaxbp.residual(jaxbp.Dense(6), jaxbp.Relu),
    jaxbp.Dense(3),
)
NET = jaxbp.serial(*BODY)
PATHS = [
    "net (serial)",
    "serial[0] (Dense)",
    "serial[1] (Tanh)",
    "serial[2] (residual)",
    "serial[2]/residual[0] (Dense)",
    "serial[2]/residual[1] (Relu)",
    "serial[3] (Dense)",
    f"loss ({LOSS})",
]
N = len(PATHS)
_, PARAMS = NET.init(jax.random.key(0), (-1, 4))
X = jax.random.normal(jax.random.key(1), (16, 4))
Y = jnp.arange(16) % 3
OPT = optax.sgd(0.05)


def cast(tree, dtype):
    return jax.tree_util.tree_map(lambda a: a.astype(dtype), tree)


def past_step_zero(net, params):
    """A train state whose schedule is past step 0's full check (so step 1 probes node 1)."""
    ts = jaxbp.init_train_state(net, OPT, params, verify=True)
    v = ts.verify._replace(step=jnp.array(1, jnp.int32), recheck=jnp.array(False))
    return ts._replace(verify=v)


def test_layer_paths_name_every_node_in_pre_order_then_the_loss():
    assert jaxbp.layer_paths(NET, LOSS) == PATHS
    # leaf_owners: each parameter leaf belongs to the deepest node holding it
    assert probe.leaf_owners(NET, PARAMS) == [1, 1, 4, 4, 6, 6]


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
def test_a_correct_network_passes_every_probe(dtype):
    """Two full cycles of the schedule: every node probed twice, never a false alarm; the
    probed nodes follow the schedule and the full check runs at step 0 and at full_every."""
    params, x = cast(PARAMS, dtype), X.astype(dtype)
    step = jaxbp.make_train_step(NET, LOSS, OPT, check="skip", probe=1, full_every=N + 1)
    ts = jaxbp.init_train_state(NET, OPT, params)
    seen = np.zeros(N, int)
    for t in range(2 * N + 2):
        ts, m = step(ts, x, Y)
        assert bool(m.ok) and bool(m.applied) and int(m.layer) == -1, t
        assert bool(m.full) == (t % (N + 1) == 0)
        if not bool(m.full):
            assert int(np.argmax(np.asarray(m.probed))) == t % N
        seen += np.asarray(m.probed)
    assert np.all(seen >= 1)


@pytest.mark.slow
def test_probe_and_full_check_agree_with_jit_off_and_in_a_fused_loop():
    """The host-dispatched steps (static plans), the same steps un-jitted, and a fused
    lax.scan (a dynamic plan, lax.cond per node) give the same numbers and decisions."""
    kw = dict(check="report", probe=2, full_every=5)
    ts0 = jaxbp.init_train_state(NET, OPT, PARAMS, verify=True)
    runs = []
    for jit in (True, False):
        step = jaxbp.make_train_step(NET, LOSS, OPT, jit=jit, **kw)
        ts, hist = ts0, []
        for _ in range(7):
            ts, m = step(ts, X, Y)
            hist.append((np.asarray(m.probed), bool(m.full), bool(m.ok), float(m.loss)))
        runs.append((ts, hist))
    fused = jaxbp.fit(NET, LOSS, OPT, ts0, X, Y, steps=7, **kw)
    hist_fused = [
        (
            np.asarray(fused.history.probed[t]),
            bool(fused.history.full[t]),
            bool(fused.history.ok[t]),
            float(fused.history.loss[t]),
        )
        for t in range(7)
    ]
    for hist in (runs[1][1], hist_fused):
        for a, b in zip(runs[0][1], hist):
            assert np.array_equal(a[0], b[0]) and a[1:3] == b[1:3]
            assert a[3] == pytest.approx(b[3], rel=1e-12)
    for ts in (runs[1][0], fused.state):
        for a, b in zip(
            jax.tree_util.tree_leaves(runs[0][0].params), jax.tree_util.tree_leaves(ts.params)
        ):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)


FAULT_CASES = [
    # (position in BODY, kind, node the probe must name, leaf, diagnosis must contain)
    (0, "sign", 1, "dW", "sign flipped"),
    (3, "factor2", 6, "dW", "a factor of 2"),
    (3, "missing_term", 6, "db", "missing term"),
    (1, "factor2", 2, "dx", "a factor of 2"),
]


@pytest.mark.slow
@pytest.mark.parametrize("index,kind,node,leaf,looks", FAULT_CASES)
def test_a_fault_is_caught_by_the_probe_and_the_culprit_named(index, kind, node, leaf, looks):
    net = faults.inject(jaxbp.serial(*BODY), index, kind)
    step = jaxbp.make_train_step(net, LOSS, OPT, check="skip", probe=1, full_every=1000)
    ts = past_step_zero(net, PARAMS)
    for _ in range(N):  # one cycle of the schedule reaches every node
        new, m = step(ts, X, Y)
        if not bool(m.ok):
            break
        ts = new
    assert not bool(m.ok) and int(m.layer) == node and not bool(m.full)
    # skipped: nothing changed, and the next step runs the full check
    for a, b in zip(
        jax.tree_util.tree_leaves((new.params, new.opt_state)),
        jax.tree_util.tree_leaves((ts.params, ts.opt_state)),
    ):
        assert np.array_equal(a, b)
    assert bool(new.verify.recheck)
    _, m2 = step(new, X, Y)
    assert bool(m2.full) and not bool(m2.ok)
    culprit = jaxbp.locate(net, LOSS, PARAMS, X, Y)
    assert culprit.index == node and culprit.leaf == leaf and looks in culprit.diagnosis


@pytest.mark.slow
def test_raise_names_the_layer_and_the_mistake():
    net = faults.inject(jaxbp.serial(*BODY), 3, "factor2")
    step = jaxbp.make_train_step(net, LOSS, OPT, check="raise")
    ts = jaxbp.init_train_state(net, OPT, PARAMS)
    with pytest.raises(jaxbp.GradientMismatchError) as info:
        step(ts, X, Y)
    first = str(info.value).splitlines()[0]
    assert first == (
        "layer serial[3] (Fault): dW disagrees with jax.vjp of its forward; "
        "looks like: a factor of 2 (a missing 1/2?)"
    )
    assert info.value.culprit.index == 6
    # A probe failure under "raise" says which node's adjoint test failed.
    probing = jaxbp.make_train_step(net, LOSS, OPT, check="raise", probe=N, full_every=1000)
    with pytest.raises(jaxbp.GradientMismatchError, match=r"adjoint test of layer"):
        probing(past_step_zero(net, PARAMS), X, Y)


def _broken_residual(inner):
    """A residual whose backward drops the skip path (dx = f's dx only)."""
    good = jaxbp.residual(*inner)

    def backward(params, cache, dy):
        grads, dx = good.backward(params, cache, dy)
        return grads, dx - dy  # the library adds dy; take it out again

    return good._replace(backward=backward)


def _broken_serial(*layers):
    """A serial that hands its last child the wrong cotangent (2 dy)."""
    good = jaxbp.serial(*layers)

    def backward(params, caches, dy):
        return good.backward(params, caches, 2 * dy)

    return good._replace(backward=backward)


@pytest.mark.slow
@pytest.mark.parametrize("which", ["residual", "serial"])
def test_a_broken_combinator_is_caught_though_its_children_pass(which):
    if which == "residual":
        bad = _broken_residual((jaxbp.Dense(6), jaxbp.Relu))
        net = jaxbp.serial(jaxbp.Dense(6), jaxbp.Tanh, bad, jaxbp.Dense(3))
        node = 3
    else:
        net = jaxbp.serial(jaxbp.Dense(6), _broken_serial(jaxbp.Tanh, jaxbp.Dense(3)))
        node = 2
    _, params = net.init(jax.random.key(0), (-1, 4))
    n = len(jaxbp.layer_paths(net))
    step = jaxbp.make_train_step(net, LOSS, OPT, check="skip", probe=n, full_every=1000)
    _, m = step(past_step_zero(net, params), X, Y)
    assert not bool(m.ok) and int(m.layer) == node
    assert jaxbp.locate(net, LOSS, params, X, Y).index == node


def test_a_broken_loss_gradient_is_caught_at_the_loss_node():
    good = jaxbp.get_loss("mse")
    bad = good._replace(grad=lambda out, t: 2 * good.grad(out, t), name="bad_mse")
    yf = jax.nn.one_hot(Y, 3)
    step = jaxbp.make_train_step(NET, bad, OPT, check="skip", probe=N, full_every=1000)
    _, m = step(past_step_zero(NET, PARAMS), X, yf)
    assert not bool(m.ok) and int(m.layer) == N - 1
    culprit = jaxbp.locate(NET, bad, PARAMS, X, yf)
    assert culprit.path == "loss (bad_mse)" and culprit.diagnosis.startswith("a factor of 2")


def test_token_ids_are_probed_on_the_parameters_alone():
    net = jaxbp.serial(jaxbp.Embedding(11, 4), jaxbp.Dense(5))
    _, params = net.init(jax.random.key(0), (-1, 6))
    tokens = jax.random.randint(jax.random.key(3), (4, 6), 0, 11)
    labels = jax.random.randint(jax.random.key(4), (4, 6), 0, 5)
    n = len(jaxbp.layer_paths(net))
    step = jaxbp.make_train_step(net, LOSS, OPT, check="raise", probe=n, full_every=1000)
    _, m = step(past_step_zero(net, params), tokens, labels)
    assert bool(m.ok) and np.all(np.asarray(m.probed))


def test_a_small_leaf_is_not_drowned_by_a_large_one():
    """The bias of a layer whose weight gradient is 1e4 times larger: a missing bias term
    is still caught (each leaf's direction is scaled by its own gradient norm)."""
    net = faults.inject(jaxbp.serial(jaxbp.Dense(3)), 0, "missing_term")
    params = ({"W": PARAMS[0]["W"][:, :3], "b": jnp.zeros(3)},)
    x = 1e4 * X  # dW ~ x.T @ dy is 1e4 x db
    step = jaxbp.make_train_step(net, LOSS, OPT, check="report", probe=1, full_every=1000)
    _, m = step(past_step_zero(net, params), x, Y)
    assert int(m.layer) == 1 and not bool(m.ok)


@pytest.mark.slow
def test_check_every_runs_the_full_check_every_nth_step_only():
    step = jaxbp.make_train_step(NET, LOSS, OPT, check="report", check_every=3)
    ts = jaxbp.init_train_state(NET, OPT, PARAMS)
    fulls = []
    for _ in range(7):
        ts, m = step(ts, X, Y)
        fulls.append(bool(m.full))
        assert not np.any(np.asarray(m.probed))
    assert fulls == [True, False, False, True, False, False, True]


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(check="report", probe=N + 1), "more than the network's 8 nodes"),
        (dict(check="report", probe=-1), "probe must be an integer >= 0"),
        (dict(check="report", probe=1.5), "probe must be an integer"),
        (dict(check="report", probe=1, full_every=0), "full_every must be an integer >= 1"),
        (dict(check="report", check_every=0), "check_every must be an integer >= 1"),
        (dict(check="off", probe=1), 'check="off" runs none'),
        (dict(check="report", probe=1, check_every=5), "not both"),
    ],
)
def test_bad_schedules_are_one_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        jaxbp.make_train_step(NET, LOSS, OPT, **kwargs)


def test_train_step_without_the_schedule_state_says_how_to_make_it():
    ts = jaxbp.init_train_state(NET, OPT, PARAMS)
    with pytest.raises(ValueError, match=r"init_train_state\(\.\.\., verify=True\)"):
        jaxbp.train_step(NET, LOSS, OPT, ts, X, Y, probe=1)


@pytest.mark.slow
def test_the_cli_probes_and_records_every_node(run_cli, tmp_path):
    out = tmp_path / "run"
    result = run_cli(
        "train",
        "--epochs",
        "1",
        "--probe",
        "2",
        "--full-every",
        "5",
        "--out",
        str(out),
        "--progress",
        "none",
    )
    assert result.code == 0, result.err
    import json

    record = json.loads((out / "metrics.json").read_text())["verification"]
    assert record["probe"] == 2 and record["failures"] == []
    assert record["nodes"][0]["path"] == "net (serial)"
    assert all(n["probed"] >= 1 for n in record["nodes"])
    assert record["full_checks"] >= 1
    bad = run_cli("train", "--epochs", "1", "--probe", "99", "--progress", "none")
    assert bad.code == 2 and "probe=99 is more than" in bad.err


# --------------------------------------------------------------------------------------------
# The diagnosis
# --------------------------------------------------------------------------------------------

B = np.arange(1.0, 13.0).reshape(3, 4) - 6.5


@pytest.mark.parametrize(
    "manual,expected",
    [
        (-B, "sign flipped (a factor of -1)"),
        (2 * B, "a factor of 2 (a missing 1/2?)"),
        (0.5 * B, "a factor of 0.5 (an extra 1/2?)"),
        (B / 32, "a factor of 0.03125 = 1/32, one over the batch (an extra 1/batch?)"),
        (np.zeros_like(B), "zero where jax.grad is not (a missing term): all 12 entries"),
    ],
)
def test_diagnose_names_the_pattern(manual, expected):
    assert diagnose(manual, B, batch=32) == expected


def test_diagnose_transposes_few_entries_and_no_pattern():
    square = np.arange(9.0).reshape(3, 3) - 4.0
    assert diagnose(square.T, square).startswith("transposed")
    wrong = B.copy()
    wrong[0, 0] += 5.0
    big = np.tile(B, (10, 10))
    sparse = big.copy()
    sparse[0, 0] += 5.0
    assert diagnose(sparse, big) == (
        "1 of 1200 entries wrong, at (0, 0) (all on an edge of the array: a boundary?)"
    )
    rng = np.random.default_rng(0)
    assert diagnose(rng.normal(size=B.shape), B).startswith("no simple pattern")
    missing = B.copy()
    missing[:, 1] = 0.0
    assert diagnose(missing, B).startswith("zero where jax.grad is not (a missing term): 3 of")


@pytest.mark.slow
def test_the_verification_cost_benchmark_runs(capsys, monkeypatch):
    from benchmarks import verify_cost

    one = {k: v for k, v in verify_cost.workloads(True).items() if k.startswith("W1")}
    monkeypatch.setattr(verify_cost, "workloads", lambda tiny: one)
    results = verify_cost.run(tiny=True, rounds=1)
    out = capsys.readouterr().out
    assert "| W1 MLP" in out and "probe=1" in out
    (t,) = results.values()
    assert t["nodes"] == 7 and np.isfinite(t["floor"])
    assert all(t[k] > 0 for k in ("off", "full", "probe=1", "check_every=10", "jax.grad step"))
