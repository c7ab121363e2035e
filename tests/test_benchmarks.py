"""Correctness of the benchmark suite (never its timings): every variant computes what jaxbp
does."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbp

# benchmarks/ is found through pytest's ``pythonpath`` (pyproject.toml).
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


@pytest.mark.slow
def test_numpy_mlp_matches_jaxbp_gradients(problem):
    net, params, x, y, loss, value, grads = problem
    model = NumpyMLP(net, params, loss, LEARNING_RATE)
    np_value, np_grads = model.grads(np.asarray(x), np.asarray(y))
    np.testing.assert_allclose(np_value, value, **F32)
    for (dw, db), (gw, gb) in zip(np_grads, _dense_grads(grads), strict=True):
        np.testing.assert_allclose(dw, gw, **F32)
        np.testing.assert_allclose(db, gb, **F32)


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_bench_command_writes_json(tmp_path, capsys):
    from jaxbp.cli import main

    path = tmp_path / "bench.json"
    assert main(["bench", "--quick", "--workloads", "W0,W1,W2,W3", "--json", str(path)]) == 0
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


def test_bench_command_knows_every_workload_of_the_suite():
    from benchmarks.suite import WORKLOADS
    from jaxbp.commands.bench import WORKLOADS as COMMAND_WORKLOADS

    assert COMMAND_WORKLOADS == tuple(WORKLOADS)


def test_workloads_accept_commas_and_spaces():
    from benchmarks.suite import split_workloads

    assert split_workloads(["W0,w1", "W3", "W1"]) == ["W0", "W1", "W3"]
    assert split_workloads(["W2"]) == ["W2"]


# --------------------------------------------------------------------------------------------
# W7: the character-level GPT, its PyTorch twin, attention memory, the twin training script
# --------------------------------------------------------------------------------------------

GPT_VOCAB, GPT_CONTEXT = 13, 8


@pytest.fixture(scope="module")
def tiny_gpt():
    from benchmarks.networks import build as build_network
    from jaxbp.presets import gpt_description

    desc = gpt_description(GPT_VOCAB, layers=1, heads=2, width=8, context=GPT_CONTEXT)
    return build_network(
        desc, (GPT_CONTEXT,), 4, "softmax_cross_entropy", GPT_VOCAB, integer_inputs=GPT_VOCAB
    )


@pytest.mark.slow
def test_w7_jaxbp_step_equals_the_plain_jax_grad_step(tiny_gpt):
    from benchmarks.networks import LEARNING_RATE as NET_LR
    from benchmarks.networks import plain_step

    net, params, state, x, y = tiny_gpt
    assert x.dtype == jnp.int32 and int(x.max()) < GPT_VOCAB and y.shape == x.shape
    plain, _, value = jax.jit(plain_step(net, "softmax_cross_entropy", NET_LR))(params, state, x, y)
    opt = jaxbp.sgd(NET_LR)
    ts, m = jaxbp.make_train_step(net, "softmax_cross_entropy", opt, check="report")(
        jaxbp.init_train_state(net, opt, params), x, y
    )
    assert bool(m.ok) and bool(m.applied)
    np.testing.assert_allclose(m.loss, value, **F32)
    for a, b in zip(*(jax.tree_util.tree_leaves(t) for t in (plain, ts.params)), strict=True):
        assert a.dtype == jnp.float32
        np.testing.assert_allclose(a, b, **F32)


@pytest.mark.slow
def test_w7_pytorch_step_equals_the_plain_jax_grad_step(tiny_gpt):
    torch = pytest.importorskip("torch")
    from benchmarks.networks import LEARNING_RATE as NET_LR
    from benchmarks.networks import TORCH_VARIANT, plain_step, torch_threads
    from benchmarks.w7_gpt import torch_baseline

    net, params, state, x, y = tiny_gpt
    before = [np.array(a) for a in jax.tree_util.tree_leaves(params)]
    variants, skipped = torch_baseline(net, params, state, x, y)
    assert skipped == {} and set(variants) == {TORCH_VARIANT}
    assert torch.get_num_threads() == torch_threads()
    run, compile_s = variants[TORCH_VARIANT]
    run(2)
    ref = params
    for _ in range(2):
        ref, _, _ = jax.jit(plain_step(net, "softmax_cross_entropy", NET_LR))(ref, state, x, y)
    leaves = jax.tree_util.tree_leaves
    for a, b in zip(leaves(run.model.params()), leaves(ref), strict=True):
        assert a.dtype == np.float32
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6)
    # the steps moved the weights (the comparison is not of two copies of the start)
    assert (
        max(float(np.max(np.abs(a - o))) for a, o in zip(leaves(ref), before, strict=True)) > 1e-3
    )
    assert compile_s is None


@pytest.mark.slow
def test_w7_attention_memory_reports_both_backwards():
    from benchmarks.w7_gpt import _memory_note, attention_memory

    batch, time, width, heads = 2, 64, 8, 2
    m = attention_memory(batch, time, width, heads)
    assert m["probabilities_bytes"] == batch * heads * time * time * 4
    grads_bytes = 4 * (4 * width * width + 4 * width) + 4 * batch * time * width  # params + dx
    for name in ("jaxbp manual", "jax.grad"):
        # the 9 output arrays, and XLA's table of pointers to them (8 bytes each on CPU)
        assert grads_bytes <= m[name]["output_bytes"] <= grads_bytes + 8 * 9
        # the backward needs the (batch, heads, T, T) probabilities at least once
        assert m[name]["temp_bytes"] >= m["probabilities_bytes"]
    note = _memory_note(m)
    assert "T=64" in note and "jaxbp manual" in note and "probability matrix is 0.1 MiB" in note
    assert "unavailable" in _memory_note(m | {"unavailable": "X"})


@pytest.mark.slow
def test_w7_quick_section_and_targets(tmp_path):
    from benchmarks.networks import TORCH_VARIANT
    from benchmarks.suite import run_suite, table_rows

    data = run_suite(["W7"], quick=True, tiny=True, json_path=str(tmp_path / "w7.json"), echo=False)
    section = json.loads((tmp_path / "w7.json").read_text())["W7"]
    names = set(section["variants"])
    assert {
        "jaxbp step check=off",
        "jaxbp step check=report",
        "jaxbp unguarded step check=off",
        "jax.value_and_grad step",
        "jaxbp fused loop (2 steps/call)",
    } <= names
    assert (TORCH_VARIANT in names) != (TORCH_VARIANT in section["skipped"])
    assert section["tokens_per_step"] == 4 * GPT_CONTEXT and section["context"] == GPT_CONTEXT
    for v in section["variants"].values():
        assert v["tokens_per_s"] == pytest.approx(section["tokens_per_step"] / v["median_s"])
    memory = section["attention_memory"]
    assert memory["time"] == 16 and memory["probabilities_bytes"] == 2 * 2 * 16 * 16 * 4
    assert section["notes"] and "attention memory" in section["notes"][0]
    whats = [t["what"] for t in data["targets"]]
    assert whats == [
        "W7 manual step (off) / jax.grad step",
        "W7 checked (report) / unchecked (off)",
        "W7 fused scan / one call per step",
        "W7 PyTorch eager step / jaxbp step (off) (speed-up)",
    ]
    torch_target = data["targets"][-1]
    off = section["variants"]["jaxbp step check=off"]["median_s"]
    if TORCH_VARIANT in names:
        want = section["variants"][TORCH_VARIANT]["median_s"] / off
        assert torch_target["value"] == pytest.approx(want)
    else:
        assert torch_target["met"] is None
    rows = table_rows(data)
    assert all("tokens/s)" in row[2] for row in rows if row[0] == "W7" and row[1] in names)


# --------------------------------------------------------------------------------------------
# benchmarks.gpt_twin: jaxbp's text run and the PyTorch twin's replay of it
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["constant", "cosine", "warmup_cosine"])
def test_twin_learning_rate_is_the_trainers_schedule(schedule):
    from benchmarks.gpt_twin import learning_rate
    from jaxbp.training import TrainConfig, build_optimizer

    # optax's warmup_cosine_decay_schedule evaluates its cosine in float32 (jax 0.10.2, optax
    # 0.2.x), whatever the dtype of the gradients: its steps agree to float32 rounding.
    rtol = 1e-6 if schedule == "warmup_cosine" else 1e-12
    for total in (1, 7, 30, 50, 1020):  # 5% of 30 and 50 round half to even: 2 warm-up steps
        opt = build_optimizer(TrainConfig(optimizer="sgd", lr=0.5, schedule=schedule), total)
        g = jnp.ones((), jnp.float64)
        state = opt.init(g)
        for step in range(total + 2):
            update, state = opt.update(g, state)
            want = -learning_rate(schedule, 0.5, total, step)
            np.testing.assert_allclose(update, want, rtol=rtol, atol=1e-15)


@pytest.fixture(scope="module")
def twin_text(tmp_path_factory):
    from pydoc_data.topics import topics

    path = tmp_path_factory.mktemp("twin") / "for.txt"
    path.write_text(topics["for"], encoding="utf-8")
    return str(path)


def _tiny_gpt_model(text, tmp_path, fused=False):
    from jaxbp.data import load_dataset
    from jaxbp.presets import gpt_description

    vocab = load_dataset("text", text=text).num_classes
    path = tmp_path / "tiny_gpt.json"
    model = gpt_description(vocab, layers=1, heads=2, width=16, context=16)
    path.write_text(json.dumps({"model": model, "input_shape": [16], "fused": fused}))
    return str(path)


@pytest.mark.slow
@pytest.mark.parametrize("fused", [False, True], ids=["per-step", "fused"])
def test_twin_trains_like_jaxbp_train_float64(twin_text, tmp_path, fused):
    """A whole (tiny) run: jaxbp's side ends at ``jaxbp train``'s own validation loss, and the
    twin, on the same batches with the same AdamW and schedule, agrees to float64 rounding."""
    pytest.importorskip("torch")
    from benchmarks.gpt_twin import compare
    from jaxbp.training import TrainConfig, train

    model = _tiny_gpt_model(twin_text, tmp_path, fused)
    run = compare(0, epochs=2, text=twin_text, model=model)
    s = run.settings
    # the fused loop's first call is the whole first epoch (a scan compiles per length)
    assert s["jaxbp_first_call_steps"] == (s["steps_per_epoch"] if fused else 1)
    assert s["dtype"] == "float64" and s["schedule"] == "warmup_cosine" and s["lr"] == 3e-3
    assert [r.epoch for r in run.epochs] == [1, 2]
    assert run.epochs[-1].steps == s["steps"] == 2 * s["steps_per_epoch"] >= 6
    result = train(TrainConfig(dataset="text", text=twin_text, model=model, epochs=2, seed=0))
    assert [h["test_loss"] for h in result.history] == [r.jaxbp_loss for r in run.epochs]
    for r in run.epochs:
        np.testing.assert_allclose(r.torch_loss, r.jaxbp_loss, rtol=1e-9)
    assert run.epochs[-1].jaxbp_loss < run.epochs[0].jaxbp_loss  # it learned something


@pytest.mark.slow
def test_twin_command_stops_after_steps(twin_text, tmp_path, capsys):
    pytest.importorskip("torch")
    from benchmarks.gpt_twin import main

    model = _tiny_gpt_model(twin_text, tmp_path)
    argv = ["--steps", "3", "--text", twin_text, "--model", model, "--seeds", "0", "1"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.startswith("     1 ")]
    assert len(rows) == 2 and all(row[1] == "3" for row in rows)  # epoch 1, 3 steps, per seed
    for row in rows:
        jaxbp_val, torch_val = float(row[2]), float(row[3])
        assert abs(jaxbp_val - torch_val) < 1e-4
    assert "3 of" in out and "over seeds: jaxbp" in out and "+-" in out


# --------------------------------------------------------------------------------------------
# W4-W6: the PyTorch eager twins of the convolutional and recurrent networks
# --------------------------------------------------------------------------------------------


def _twin_network(name: str):
    """``(net, params, state, x, y)`` of one network at the size ``run(tiny=True)`` uses."""
    from benchmarks.networks import build as build_network
    from benchmarks.w5_conv2d import conv2d_stack
    from benchmarks.w6_gru import gru_last_state
    from jaxbp.presets import mnist1d_resnet, mnist1d_rnn

    description, shape, batch = {
        "W4 resnet": (mnist1d_resnet(10, channels=4, blocks=1), (40, 1), 8),
        "W5 conv2d": (conv2d_stack(4, 10), (8, 8, 4), 4),
        "W6 bidirectional GRU": (mnist1d_rnn(10, hidden=2), (40, 1), 8),
        "W6 GRU last state": (gru_last_state(8, 10), (4, 8), 4),
    }[name]
    return build_network(description, shape, batch, "softmax_cross_entropy", 10)


TWIN_NETWORKS = ["W4 resnet", "W5 conv2d", "W6 bidirectional GRU", "W6 GRU last state"]


def _two_plain_steps(net, params, state, x, y):
    from benchmarks.networks import LEARNING_RATE as NET_LR
    from benchmarks.networks import plain_step

    step = jax.jit(plain_step(net, "softmax_cross_entropy", NET_LR))
    for _ in range(2):
        params, state, _ = step(params, state, x, y)
    return params, state


def _assert_twin_matches(model, params, ref, ref_state, dtype, tol):
    leaves, structure = jax.tree_util.tree_leaves, jax.tree_util.tree_structure
    got = model.params()
    assert structure(got) == structure(ref)
    for a, b in zip(leaves(got), leaves(ref), strict=True):
        assert a.dtype == dtype
        np.testing.assert_allclose(a, b, **tol)
    # the steps moved the weights (the comparison is not of two copies of the start)
    start = leaves(params)
    assert max(float(np.max(np.abs(a - o))) for a, o in zip(leaves(ref), start)) > 1e-3
    # BatchNorm's running statistics are state, not params: they move as jaxbp's do too
    assert structure(model.state()) == structure(ref_state)
    for a, b in zip(leaves(model.state()), leaves(ref_state), strict=True):
        np.testing.assert_allclose(a, b, **tol)


@pytest.mark.slow
@pytest.mark.parametrize("name", TWIN_NETWORKS)
def test_pytorch_twin_step_equals_the_plain_jax_grad_step(name):
    torch = pytest.importorskip("torch")
    from benchmarks.networks import TORCH_VARIANT, torch_threads
    from benchmarks.torch_nets import torch_baseline

    net, params, state, x, y = _twin_network(name)
    variants, skipped = torch_baseline(net, params, state, x, y)
    assert skipped == {} and set(variants) == {TORCH_VARIANT}
    assert torch.get_num_threads() == torch_threads()
    run, compile_s = variants[TORCH_VARIANT]
    run(2)
    ref, ref_state = _two_plain_steps(net, params, state, x, y)
    _assert_twin_matches(run.model, params, ref, ref_state, np.float32, dict(rtol=2e-4, atol=2e-6))
    assert compile_s is None


@pytest.mark.slow
def test_pytorch_twin_float64_equals_the_plain_jax_grad_step():
    torch = pytest.importorskip("torch")
    from benchmarks.networks import LEARNING_RATE as NET_LR
    from benchmarks.torch_nets import TorchNet

    net, params, state, x, y = _twin_network("W4 resnet")
    params, state, x = jax.tree_util.tree_map(
        lambda a: jnp.asarray(a, jnp.float64), (params, state, x)
    )
    model = TorchNet(jaxbp.describe(net), params, state)
    assert model.dtype == torch.float64
    opt = torch.optim.SGD(model.leaves, lr=NET_LR)
    for _ in range(2):
        opt.zero_grad(set_to_none=True)
        model.loss(x, y).backward()
        opt.step()
    ref, ref_state = _two_plain_steps(net, params, state, x, y)
    _assert_twin_matches(model, params, ref, ref_state, np.float64, dict(rtol=1e-10, atol=1e-12))


def test_pytorch_twin_names_a_layer_it_lacks():
    pytest.importorskip("torch")
    from benchmarks.networks import TORCH_VARIANT
    from benchmarks.networks import build as build_network
    from benchmarks.torch_nets import TorchNet, torch_baseline

    tanh = {"name": "serial", "layers": [{"name": "Dense", "out_dim": 3}, {"name": "Tanh"}]}
    net, params, state, x, y = build_network(tanh, (2,), 4, "softmax_cross_entropy", 3)
    with pytest.raises(ValueError, match=r"model.layers\[1\]: the PyTorch twin has no 'Tanh'"):
        TorchNet(jaxbp.describe(net), params)
    variants, skipped = torch_baseline(net, params, state, x, y)
    assert variants == {} and "'Tanh'" in skipped[TORCH_VARIANT]
    lstm = {"name": "bidirectional", "layer": {"name": "LSTM", "hidden": 2}}
    with pytest.raises(
        ValueError, match="model.layer: the PyTorch twin has no bidirectional 'LSTM'"
    ):
        TorchNet(lstm, {})


def test_suite_has_a_pytorch_target_per_network_model():
    from benchmarks.suite import targets

    def section(torch_s, suffixes=("",), skipped=None):
        times = {"jaxbp step check=off": 1.0, "jaxbp step check=report": 1.1}
        times |= {"jax.value_and_grad step": 1.0, "jaxbp fused loop (2 steps/call)": 2.0}
        if torch_s:
            times["PyTorch eager step"] = torch_s
        variants = {f"{k}{s}": {"median_s": v} for s in suffixes for k, v in times.items()}
        return {"variants": variants, "skipped": skipped or {}}

    results = {
        "W4": section(3.0),
        "W5": section(None, skipped={"PyTorch eager step": "torch not installed"}),
        "W6": section(0.5, suffixes=("", " [GRU(256) T=64]")),
        "W7": section(None, skipped={"PyTorch eager": "no PyTorch twin"}),
    }
    found = {t["what"]: t for t in targets(results) if "PyTorch" in t["what"]}
    assert list(found) == [
        "W4 PyTorch eager step / jaxbp step (off) (speed-up)",
        "W5 PyTorch eager step / jaxbp step (off) (speed-up)",
        "W6 PyTorch eager step / jaxbp step (off) (speed-up)",
        "W6 [GRU(256) T=64] PyTorch eager step / jaxbp step (off) (speed-up)",
    ]
    w4, w5, w6, _ = found.values()
    assert w4["value"] == 3.0 and w4["met"] and w4["target"] == "at least 1.0x"
    assert w5["value"] is None and w5["met"] is None
    assert w6["value"] == 0.5 and w6["met"] is False


TWIN_OPTIONS = {  # name -> (description, input shape): the options W4-W6 leave at defaults
    "Conv1D dilated, explicit padding; residual leaving its layout": (
        [
            {
                "name": "Conv1D",
                "out_channels": 4,
                "kernel_size": 3,
                "stride": 2,
                "padding": [1, 2],
                "dilation": 2,
            },
            {
                "name": "residual",
                "layers": [
                    {"name": "Conv1D", "out_channels": 4, "kernel_size": 3, "padding": "SAME"},
                    {"name": "Relu"},
                    {"name": "Dense", "out_dim": 4},
                ],
            },
            {"name": "Flatten"},
            {"name": "Dense", "out_dim": 3},
        ],
        (11, 3),
    ),
    "Conv2D strided SAME with uneven sides; pooling with overlap; BatchNorm": (
        [
            {
                "name": "Conv2D",
                "out_channels": 4,
                "kernel_size": [3, 2],
                "stride": [2, 1],
                "padding": "SAME",
                "dilation": [2, 1],
            },
            {"name": "MaxPool2D", "window": 2, "stride": 1},
            {"name": "BatchNorm", "momentum": 0.8, "eps": 1e-3},
            {"name": "Conv2D", "out_channels": 2, "kernel_size": 2, "padding": [[0, 1], [1, 0]]},
            {"name": "GlobalAvgPool"},
            {"name": "Dense", "out_dim": 3},
        ],
        (9, 7, 3),
    ),
    "reversed GRU; bidirectional GRU's final states": (
        [
            {"name": "GRU", "hidden": 3, "reverse": True},
            {
                "name": "bidirectional",
                "layer": {"name": "GRU", "hidden": 2, "return_sequences": False},
            },
            {"name": "Dense", "out_dim": 3},
        ],
        (5, 4),
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(TWIN_OPTIONS))
def test_pytorch_twin_forward_equals_jaxbp_apply_float64(name):
    """Layer options the workloads do not use (padding forms, strides, dilation, reverse)."""
    torch = pytest.importorskip("torch")
    from benchmarks.torch_nets import TorchNet

    layers, shape = TWIN_OPTIONS[name]
    net = jaxbp.build({"name": "serial", "layers": layers})
    k_init, k_x, k_y = jax.random.split(jax.random.key(3), 3)
    _, params = net.init(k_init, (2, *shape))
    state = jaxbp.init_state(net, (2, *shape))
    x = jax.random.normal(k_x, (2, *shape), jnp.float64)
    y = jax.random.randint(k_y, (2,), 0, 3)
    out, _, new_state = jaxbp.apply(net, params, state, x)
    model = TorchNet(jaxbp.describe(net), params, state)
    assert model.dtype == torch.float64
    np.testing.assert_allclose(model.logits(x).detach().numpy(), out, rtol=1e-10, atol=1e-12)
    leaves = jax.tree_util.tree_leaves
    for a, b in zip(leaves(model.state()), leaves(new_state), strict=True):  # after one forward
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
    loss = jaxbp.get_loss("softmax_cross_entropy").value(out, y)
    np.testing.assert_allclose(float(model.loss(x, y).detach()), loss, rtol=1e-10)


def test_fused_scan_line_says_which_loop_is_faster_and_sets_no_target():
    from benchmarks.suite import _network_targets, _verdict

    def section(fused_s):
        names = ("jaxbp step check=off", "jaxbp step check=report", "jax.value_and_grad step")
        variants = {n: {"median_s": t} for n, t in zip(names, (2.0, 3.0, 2.5), strict=True)}
        return {"variants": variants | {"jaxbp fused loop (3 steps/call)": {"median_s": fused_s}}}

    for fused_s, verdict in ((1.0, "scan faster"), (6.0, "per step faster")):
        out = {t["what"]: t for t in _network_targets("W9", section(fused_s))}
        fused = out["W9 fused scan / one call per step"]
        assert fused["value"] == fused_s / 2.0 and fused["met"] is None
        assert _verdict(fused) == verdict
        assert out["W9 manual step (off) / jax.grad step"]["met"] is True  # 2.0 / 2.5
        assert out["W9 checked (report) / unchecked (off)"]["met"] is False  # 1.5 > 1.3


# --------------------------------------------------------------------------------------------
# benchmarks.one_forward: both gradients from one forward against two
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_one_forward_variants_compute_the_same_gradients(capsys):
    """The three timed functions agree (float64), and the quick run prints every workload."""
    from benchmarks.networks import build
    from benchmarks.one_forward import main, variants, workloads

    for spec in workloads(tiny=True).values():
        net, params, state, x, y = build(*spec["args"])
        params = jax.tree.map(lambda p: p.astype(np.float64), params)
        x = x.astype(np.float64)
        fns = variants(net, params, state, x, y)
        manual = fns["manual only"](params, state, x, y)
        two, one = (fns[k](params, state, x, y) for k in ("two forwards", "one forward"))
        assert bool(two[2]) and bool(one[2])  # each compared its own pair and found it equal
        for got in (two[0], one[0], two[1], one[1]):
            for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(manual), strict=True):
                np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)
    assert main(["--quick"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == list(workloads(tiny=True))
    assert all("two forwards" in line and "one forward" in line for line in lines)


def test_targets_print_in_their_unit_and_a_quick_run_judges_none():
    from benchmarks.suite import _target, _value, _verdict

    percent = _target("W2 achieved GFLOP/s / GEMM ceiling", 61.25, 85, "at least", "%")
    speed = _target("W1 manual step (off) / jax.grad step", 0.8, 1.0, "at most")
    assert _value(percent) == "61.25%" and percent["target"] == "at least 85%"
    assert _value(speed) == "0.80x" and _verdict(speed) == "met"
    assert _verdict(percent) == "MISSED"
    assert _verdict(percent, smoke=True) == _verdict(speed, smoke=True) == "- (--quick)"
    assert _value(_target("W3", None, 2.0, "at least")) == "-"
