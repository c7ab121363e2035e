"""Correctness of the benchmark suite (never its timings): every variant computes what jaxbp
does."""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbp

# benchmarks/ is a top-level folder of the checkout, not part of the installed package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.mlp import (
    LEARNING_RATE,
    build,
    copy_tree,
    fused_loop,
    matmul_flops,
    mlp_description,
)
from benchmarks.reference import NumpyMLP, TorchMLP, jax_grad_step, torch_available
from benchmarks.w3_per_example import per_example_fns

SHAPES = {  # name -> (sizes, activation, loss, batch): W1 and W2 shrunk, same structure
    "w1": ((12, 8, 6, 4), "relu", "softmax_cross_entropy", 5),
    "w2": ((6, 7, 7, 5), "relu", "mse", 4),
}
F32 = dict(rtol=2e-4, atol=1e-5)


def _dense_grads(grads):
    return [(g["W"], g["b"]) for g in grads if isinstance(g, dict)]


@pytest.fixture(scope="module", params=sorted(SHAPES))
def problem(request):
    sizes, act, loss, batch = SHAPES[request.param]
    net, params, x, y = build(sizes, act, loss, batch, seed=3)
    value, grads = jaxbp.backprop(net, loss, params, x, y)
    return net, params, x, y, loss, value, grads


def test_numpy_mlp_matches_jaxbp_gradients(problem):
    net, params, x, y, loss, value, grads = problem
    model = NumpyMLP(net, params, loss, LEARNING_RATE)
    np_value, np_grads = model.grads(np.asarray(x), np.asarray(y))
    np.testing.assert_allclose(np_value, value, **F32)
    for (dw, db), (gw, gb) in zip(np_grads, _dense_grads(grads), strict=True):
        np.testing.assert_allclose(dw, gw, **F32)
        np.testing.assert_allclose(db, gb, **F32)


def test_numpy_step_matches_jaxbp_step(problem):
    net, params, x, y, loss, _, _ = problem
    opt = jaxbp.sgd(LEARNING_RATE)
    ts, _ = jaxbp.make_train_step(net, loss, opt, check="off")(
        jaxbp.init_train_state(net, opt, params), x, y
    )
    new = ts.params
    model = NumpyMLP(net, params, loss, LEARNING_RATE)
    model.step(np.asarray(x), np.asarray(y))
    for (w, b), (jw, jb) in zip(model.layers, _dense_grads(new), strict=True):
        np.testing.assert_allclose(w, jw, **F32)
        np.testing.assert_allclose(b, jb, **F32)


def test_plain_jax_grad_step_matches_jaxbp_step(problem):
    net, params, x, y, loss, value, _ = problem
    opt = jaxbp.sgd(LEARNING_RATE)
    ts, m = jaxbp.make_train_step(net, loss, opt, check="report")(
        jaxbp.init_train_state(net, opt, params), x, y
    )
    new = ts.params
    assert bool(m.ok) and bool(m.applied)
    plain, plain_value = jax.jit(jax_grad_step(net, loss, LEARNING_RATE))(params, x, y)
    np.testing.assert_allclose(plain_value, value, **F32)
    for a, b in zip(jax.tree_util.tree_leaves(plain), jax.tree_util.tree_leaves(new), strict=True):
        np.testing.assert_allclose(a, b, **F32)


def test_fused_loop_matches_repeated_steps(problem):
    """The fused variant (train_step inside one lax.scan) equals the same steps one by one."""
    net, params, x, y, loss, _, _ = problem
    opt = jaxbp.sgd(LEARNING_RATE)
    step = jaxbp.make_train_step(net, loss, opt, check="off")
    many = fused_loop(net, loss, opt, x, y, check="off", steps=3)
    fused, metrics = many(jaxbp.init_train_state(net, opt, copy_tree(params)))
    ts = jaxbp.init_train_state(net, opt, params)
    for t in range(3):
        ts, m = step(ts, x, y)
        np.testing.assert_allclose(metrics.loss[t], m.loss, **F32)
    for a, b in zip(jax.tree_util.tree_leaves(fused), jax.tree_util.tree_leaves(ts), strict=True):
        np.testing.assert_allclose(a, b, **F32)


def test_mlp_is_built_from_its_description():
    desc = mlp_description((5, 4, 3), "leaky_relu")
    assert desc == {
        "name": "serial",
        "layers": [
            {"name": "Dense", "out_dim": 4, "dtype": "float32"},
            {"name": "LeakyRelu", "slope": 0.01},
            {"name": "Dense", "out_dim": 3, "dtype": "float32"},
        ],
    }
    net, params, _, _ = build((5, 4, 3), "leaky_relu", "mse", 2)
    described = jaxbp.describe(net)
    assert [layer["name"] for layer in described["layers"]] == ["Dense", "LeakyRelu", "Dense"]
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(params))


@pytest.mark.skipif(torch_available() is not None, reason="PyTorch is optional")
def test_torch_mlp_matches_jaxbp_gradients(problem):
    import torch

    net, params, x, y, loss, value, grads = problem
    model = TorchMLP(net, params, loss, LEARNING_RATE)
    yt = torch.from_numpy(
        np.asarray(y).astype(np.int64) if loss == "softmax_cross_entropy" else np.asarray(y).copy()
    )
    t_value, t_grads = model.grads(torch.from_numpy(np.asarray(x).copy()), yt)
    np.testing.assert_allclose(t_value, value, **F32)
    for (dw, db), (gw, gb) in zip(t_grads, _dense_grads(grads), strict=True):
        np.testing.assert_allclose(dw, gw, **F32)
        np.testing.assert_allclose(db, gb, **F32)


def test_numpy_seed_step_reproduces_the_seed_program():
    """float64, the seed's own numbers: its program's weights after one step (lr 0.5)."""
    sp = jaxbp.seed_problem(jnp.float64)
    model = NumpyMLP(sp.net, sp.params, "half_sse", sp.learning_rate, dtype=np.float64)
    value = model.step(np.asarray(sp.x)[None], np.asarray(sp.y)[None])
    np.testing.assert_allclose(value, 0.3540, atol=5e-5)  # E_total, 4 places
    np.testing.assert_allclose(
        value, jaxbp.backprop(sp.net, "half_sse", sp.params, sp.x, sp.y)[0], rtol=1e-12
    )
    np.testing.assert_allclose(
        model.layers[0][0], [[0.24921513, 0.1993274], [0.49960756, 0.1496637]], atol=1e-8
    )
    np.testing.assert_allclose(
        model.layers[1][0], [[0.66769329, 0.40907027], [0.56799435, 0.35898575]], atol=1e-8
    )


def test_per_example_variants_agree_with_single_example_backprop():
    sizes, act, loss, batch = SHAPES["w1"]
    net, params, x, y = build(sizes, act, loss, batch, seed=4)
    fns = per_example_fns(net, loss)
    manual = jax.jit(fns["vmap(jaxbp manual backward)"])(params, x, y)
    auto = jax.jit(fns["vmap(jax.grad)"])(params, x, y)
    for i in (0, batch - 1):
        _, one = jaxbp.backprop(net, loss, params, x[i], y[i])
        for a, b, c in zip(
            *(jax.tree_util.tree_leaves(t) for t in (manual, auto, one)), strict=True
        ):
            np.testing.assert_allclose(a[i], c, **F32)
            np.testing.assert_allclose(b[i], c, **F32)
    # all `batch` gradients, not a sum: leading axis of every leaf is the batch
    assert all(leaf.shape[0] == batch for leaf in jax.tree_util.tree_leaves(manual))


def test_matmul_flops_counts_forward_dw_and_dx():
    # one layer: forward + dW, no dx into the data: 2 * 2*B*i*o
    assert matmul_flops((3, 4), 5) == 2 * 2 * 5 * 3 * 4
    assert matmul_flops((1024,) * 4, 1024) == 8 * 2.0 * 1024**3


def test_bench_command_writes_json(tmp_path, capsys):
    from jaxbp.cli import main

    path = tmp_path / "bench.json"
    assert main(["bench", "--quick", "--json", str(path)]) == 0
    data = json.loads(path.read_text())
    for key in ("machine", "ceiling", "W0", "W1", "W2", "W3", "targets", "wall_s"):
        assert key in data, key
    assert data["tiny"] is True
    for w in ("W1", "W2"):
        names = set(data[w]["variants"])
        assert {
            "jaxbp step check=off",
            "jaxbp step check=report",
            "jax.value_and_grad step",
            "numpy (seed style)",
        } <= names
        for v in data[w]["variants"].values():
            assert v["median_s"] > 0 and v["gflops"] > 0
        assert ("PyTorch eager" in names) != ("PyTorch eager" in data[w]["skipped"])
    assert {"vmap(jaxbp manual backward)", "vmap(jax.grad)"} <= set(data["W3"]["variants"])
    assert {
        "jaxbp fused loop check=off",
        "jaxbp fused loop check=report",
        "numpy loop (seed style)",
    } <= set(data["W0"]["variants"])
    assert data["machine"]["blas"], "the JSON names numpy's BLAS"
    assert len(data["targets"]) >= 8
    assert all({"what", "value", "target", "met"} <= set(t) for t in data["targets"])
    assert "targets" in capsys.readouterr().out


def test_bench_command_rejects_an_unknown_workload(capsys):
    from jaxbp.cli import main

    assert main(["bench", "--workloads", "W9"]) == 2
    assert "W9" in capsys.readouterr().err


def test_workloads_accept_commas_and_spaces():
    from benchmarks.suite import split_workloads

    assert split_workloads(["W0,w1", "W3", "W1"]) == ["W0", "W1", "W3"]
    assert split_workloads(["W2"]) == ["W2"]
