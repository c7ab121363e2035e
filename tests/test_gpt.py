"""The character-level GPT: parity with an independent plain-JAX GPT (and a PyTorch twin when
PyTorch is installed), the trainer on text, ``jaxbp generate``, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbp
from jaxbp.cli import main
from jaxbp.data import Dataset, load_dataset
from jaxbp.model import build, describe
from jaxbp.presets import get_preset, gpt_description
from jaxbp.training import TrainConfig, build_optimizer, prepare, train

VOCAB, CONTEXT, WIDTH, HEADS, LAYERS = 13, 8, 8, 2, 1


def tiny_net(**kw):
    args = dict(layers=LAYERS, heads=HEADS, width=WIDTH, context=CONTEXT) | kw
    return build(gpt_description(VOCAB, **args))


def batches(steps=10, batch=3, seed=0):
    ids = np.random.default_rng(seed).integers(0, VOCAB, (steps, batch, CONTEXT + 1))
    return jnp.asarray(ids[..., :-1], jnp.int32), jnp.asarray(ids[..., 1:], jnp.int32)


# --------------------------------------------------------------------------------------------
# A GPT written independently with jnp ops (jax.grad differentiates it)
# --------------------------------------------------------------------------------------------


def ref_layernorm(h, p, eps=1e-5):
    mean = h.mean(-1, keepdims=True)
    var = ((h - mean) ** 2).mean(-1, keepdims=True)
    return (h - mean) / jnp.sqrt(var + eps) * p["scale"] + p["bias"]


def ref_attention(h, p, heads):
    b, t, d = h.shape
    q, k, v = (
        (h @ p["W" + n] + p["b" + n]).reshape(b, t, heads, d // heads).transpose(0, 2, 1, 3)
        for n in "qkv"
    )
    s = q @ k.transpose(0, 1, 3, 2) / jnp.sqrt(d // heads)
    s = jnp.where(jnp.tril(jnp.ones((t, t), bool)), s, -jnp.inf)
    o = (jax.nn.softmax(s, axis=-1) @ v).transpose(0, 2, 1, 3).reshape(b, t, d)
    return o @ p["Wo"] + p["bo"]


def ref_loss(params, ids, labels, heads=HEADS):
    h = params[0]["W"][ids] + params[1]["P"][: ids.shape[1]]
    for att, mlp in zip(params[2:-2:2], params[3:-2:2], strict=True):
        h = h + ref_attention(ref_layernorm(h, att[0]), att[1], heads)
        inner = jax.nn.gelu(ref_layernorm(h, mlp[0]) @ mlp[1]["W"] + mlp[1]["b"], approximate=True)
        h = h + inner @ mlp[3]["W"] + mlp[3]["b"]
    logits = ref_layernorm(h, params[-2]) @ params[-1]["W"] + params[-1]["b"]
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, labels[..., None], axis=-1))


def ref_adamw(lr, wd, b1=0.9, b2=0.999, eps=1e-8):
    """AdamW by hand; weights decay, biases (leaves named 'b') do not, as the trainer's."""

    def decays(path):
        return not (isinstance(path[-1], jax.tree_util.DictKey) and path[-1].key == "b")

    def update(params, grads, m, v, t):
        m = jax.tree_util.tree_map(lambda m, g: b1 * m + (1 - b1) * g, m, grads)
        v = jax.tree_util.tree_map(lambda v, g: b2 * v + (1 - b2) * g * g, v, grads)

        def step(path, p, m, v):
            adam = (m / (1 - b1**t)) / (jnp.sqrt(v / (1 - b2**t)) + eps)
            return p - lr * (adam + (wd * p if decays(path) else 0))

        return jax.tree_util.tree_map_with_path(step, params, m, v), m, v

    return update


@pytest.mark.slow
def test_gpt_preset_is_the_issue_model_and_round_trips():
    description = gpt_description(103)
    net = build(description)
    shape, params = net.init(jax.random.key(0), (-1, 128))
    assert shape == (-1, 128, 103)
    assert sum(np.size(p) for p in jax.tree_util.tree_leaves(params)) == 836_199
    assert describe(build(describe(net))) == describe(net)
    preset = get_preset("gpt")
    assert preset.dataset == "text" and preset.input_shape == (128,)
    assert preset.description(103) == description


@pytest.mark.slow
@pytest.mark.parametrize("jit", [pytest.param(False, marks=pytest.mark.slow), True])
def test_manual_gradients_equal_jax_grad_and_reference_float64(jit):
    net = tiny_net()
    _, params = net.init(jax.random.key(0), (-1, CONTEXT))
    x, y = batches(1)
    x, y = x[0], y[0]
    manual = jax.jit(jaxbp.backprop, static_argnums=(0, 1)) if jit else jaxbp.backprop
    value, grads = manual(net, "softmax_cross_entropy", params, x, y)
    auto_value, auto = jaxbp.autodiff(net, "softmax_cross_entropy", params, x, y)
    ref_value, ref = jax.value_and_grad(ref_loss)(params, x, y)
    assert jax.tree_util.tree_leaves(grads)[0].dtype == jnp.float64
    np.testing.assert_allclose(value, ref_value, rtol=1e-12)
    np.testing.assert_allclose(auto_value, ref_value, rtol=1e-12)
    biggest = max(float(jnp.max(jnp.abs(r))) for r in jax.tree_util.tree_leaves(ref))
    for g, a, r in zip(*(jax.tree_util.tree_leaves(t) for t in (grads, auto, ref)), strict=True):
        # A key bias's gradient is 0 in exact arithmetic (softmax ignores a shift of all
        # scores): rounding-level leaves are measured against the largest gradient.
        scale = max(float(jnp.max(jnp.abs(r))), 1e-6 * biggest)
        assert float(jnp.max(jnp.abs(g - a))) / scale < 1e-10
        assert float(jnp.max(jnp.abs(g - r))) / scale < 1e-10


@pytest.mark.slow
def test_ten_adamw_steps_equal_the_plain_jax_reference():
    """llm.c's parity test without PyTorch: 10 checked AdamW steps of jaxbp (the trainer's
    optimizer) and of the reference GPT with AdamW by hand give the same losses and params."""
    net = tiny_net()
    _, params = net.init(jax.random.key(2), (-1, CONTEXT))
    lr, wd = 3e-3, 0.1
    opt = build_optimizer(
        TrainConfig(optimizer="adam", lr=lr, schedule="constant", weight_decay=wd), 10
    )
    ts = jaxbp.init_train_state(net, opt, params)
    step = jaxbp.make_train_step(net, "softmax_cross_entropy", opt, "raise")
    update = jax.jit(ref_adamw(lr, wd))
    ref_grad = jax.jit(jax.value_and_grad(ref_loss))
    ref_params = params
    m = v = jax.tree_util.tree_map(jnp.zeros_like, params)
    xs, ys = batches(10)
    for t in range(10):
        ts, metrics = step(ts, xs[t], ys[t])
        ref_value, grads = ref_grad(ref_params, xs[t], ys[t])
        ref_params, m, v = update(ref_params, grads, m, v, t + 1)
        assert bool(metrics.applied) and float(metrics.rel_error) < 1e-10
        np.testing.assert_allclose(metrics.loss, ref_value, rtol=1e-10)
    leaves = jax.tree_util.tree_leaves
    for a, b in zip(leaves(ts.params), leaves(ref_params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10)  # bk: rounding-level steps


def _torch_gpt():
    """``benchmarks.torch_gpt`` (it imports torch, so only when a test asks)."""
    import importlib

    return importlib.import_module("benchmarks.torch_gpt")


@pytest.mark.slow
def test_torch_twin_same_loss_gradients_and_adamw_steps():
    torch = pytest.importorskip("torch")
    TorchGPT, gpt_heads = _torch_gpt().TorchGPT, _torch_gpt().gpt_heads

    net = tiny_net()
    _, params = net.init(jax.random.key(3), (-1, CONTEXT))
    twin = TorchGPT(params, gpt_heads(describe(net)))
    assert twin.dtype == torch.float64 and gpt_heads(describe(net)) == HEADS
    lr, wd = 3e-3, 0.1
    topt = torch.optim.AdamW(
        [
            {"params": [w for w, d in zip(twin.leaves, twin.decays) if d], "weight_decay": wd},
            {"params": [w for w, d in zip(twin.leaves, twin.decays) if not d], "weight_decay": 0},
        ],
        lr=lr,
        eps=1e-8,
    )
    assert sum(twin.decays) == len(twin.leaves) - 2 * LAYERS - 1  # the Dense biases 'b' only
    opt = build_optimizer(
        TrainConfig(optimizer="adam", lr=lr, schedule="constant", weight_decay=wd), 10
    )
    ts = jaxbp.init_train_state(net, opt, params)
    step = jaxbp.make_train_step(net, "softmax_cross_entropy", opt, "raise")
    xs, ys = batches(10, seed=4)
    for t in range(10):
        value, grads = jaxbp.backprop(net, "softmax_cross_entropy", ts.params, xs[t], ys[t])
        topt.zero_grad()
        tl = twin.loss(xs[t], ys[t])
        tl.backward()
        np.testing.assert_allclose(float(value), tl.item(), rtol=1e-10)
        for g, w in zip(jax.tree_util.tree_leaves(grads), twin.grads(), strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-8, atol=1e-10)
        ts, _ = step(ts, xs[t], ys[t])
        topt.step()
    leaves = jax.tree_util.tree_leaves
    for a, w in zip(leaves(ts.params), leaves(twin.params()), strict=True):
        # atol as in the reference test: bk's exact gradient is 0 (softmax ignores a per-query
        # shift), so both optimizers move it by rounding noise alone, ~1e-11.
        np.testing.assert_allclose(a, w, rtol=1e-9, atol=1e-10)


def test_torch_twin_refuses_a_network_that_is_not_a_gpt():
    gpt_heads = _torch_gpt().gpt_heads

    bad = gpt_description(VOCAB, layers=1)
    bad["layers"][2] = {"name": "residual", "layers": []}
    with pytest.raises(ValueError, match=r"layers\[2\] to be residual \['LayerNorm', 'Multi"):
        gpt_heads(bad)
    with pytest.raises(ValueError, match="runs a GPT description"):
        gpt_heads({"name": "serial", "layers": [{"name": "Dense", "out_dim": 3}]})


# --------------------------------------------------------------------------------------------
# The trainer on text, and jaxbp generate
# --------------------------------------------------------------------------------------------


def tiny_model_file(tmp_path, vocab, **kw):
    input_context = kw.pop("input_context", None)
    fused = kw.pop("fused", False)
    args = dict(layers=1, heads=2, width=16, context=16) | kw
    context = input_context or args["context"]
    path = tmp_path / f"tiny_gpt{'_fused' if fused else ''}.json"
    path.write_text(
        json.dumps(
            {"model": gpt_description(vocab, **args), "input_shape": [context], "fused": fused}
        )
    )
    return str(path)


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    from pydoc_data.topics import topics

    path = tmp_path_factory.mktemp("text") / "for.txt"
    path.write_text(topics["for"] + topics["while"], encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def trained(corpus_file, tmp_path_factory):
    work = tmp_path_factory.mktemp("run")
    vocab = load_dataset("text", text=str(corpus_file)).num_classes
    cfg = TrainConfig(
        dataset="text",
        text=str(corpus_file),
        model=tiny_model_file(work, vocab),
        epochs=2,
        batch_size=8,
        lr=1e-2,
        out=str(work / "out"),
    )
    return train(cfg), work / "out"


@pytest.mark.slow
def test_training_on_text_checks_every_step_and_stores_the_vocabulary(trained, corpus_file):
    result, out = trained
    m = result.metrics
    assert result.status == "completed" and m["applied_steps"] == m["steps"] > 0
    assert m["max_grad_rel_error"] < 1e-4  # float64 under the test suite's x64
    first, last = result.history
    assert last["test_loss"] < first["test_loss"] and last["test_loss"] < np.log(
        m["network"]["layers"][-1]["out_dim"]
    )
    header = jaxbp.checkpoint.read_header(out / "checkpoint.npz")
    text = corpus_file.read_text(encoding="utf-8")
    assert header["text"] == {"vocabulary": "".join(sorted(set(text))), "context": 16}
    # The reported validation loss is the loss over the whole validation split, recomputed.
    session = prepare(TrainConfig(dataset="text", text=str(corpus_file), out=str(out), resume=True))
    ids = np.asarray(load_dataset("text", text=str(corpus_file)).x_test)
    labels = np.asarray(load_dataset("text", text=str(corpus_file)).y_test)
    total = 0.0
    for start in range(0, len(ids), 16):
        logits = session.net.forward(session.ts.params, jnp.asarray(ids[start : start + 16]))[0]
        logp = jax.nn.log_softmax(logits, axis=-1)
        total -= float(jnp.sum(logp[jnp.arange(len(logits)), labels[start : start + 16]]))
    assert last["test_loss"] == pytest.approx(total / len(ids), rel=1e-9)


@pytest.mark.slow
def test_generate_prints_a_repeatable_sample(trained, capsys):
    _, out = trained
    argv = ["generate", "--checkpoint", str(out), "--prompt", "for ", "--length", "40"]
    outputs = []
    for extra in ([], [], ["--seed", "1"], ["--temperature", "0"], ["--temperature", "0"]):
        assert main([*argv, *extra]) == 0
        outputs.append(capsys.readouterr().out)
    assert all(o.startswith("for ") and len(o) == len("for ") + 40 + 1 for o in outputs)
    assert outputs[0] == outputs[1] != outputs[2]  # the seed decides
    assert outputs[3] == outputs[4]


@pytest.mark.slow
def test_generate_refuses_bad_prompts_and_checkpoints(trained, tmp_path, capsys):
    _, out = trained
    assert main(["generate", "--checkpoint", str(out), "--prompt", "for \u2603"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    vocab = jaxbp.checkpoint.read_header(out / "checkpoint.npz")["text"]["vocabulary"]
    assert captured.err.strip() == (
        "jaxbp generate: error: --prompt has character '\u2603' at "
        "position 4, which is not in the model's "
        f"{len(vocab)}-character vocabulary"
    )
    xor = tmp_path / "xor"
    assert (
        main(
            ["train", "--dataset", "xor", "--epochs", "1", "--progress", "none", "--out", str(xor)]
        )
        == 0
    )
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(xor)]) == 2
    err = capsys.readouterr().err
    assert "is not a text model (it was trained on dataset 'xor')" in err and err.count("\n") == 1
    assert main(["generate", "--checkpoint", str(tmp_path / "missing")]) == 2
    assert "no checkpoint at" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# Bad input: one line saying what and where, nothing written
# --------------------------------------------------------------------------------------------


def _refused(cfg, match, dataset=None, exc=ValueError):
    with pytest.raises(exc, match=match):
        prepare(cfg, dataset)
    assert not Path(cfg.out).exists()  # nothing written half-way


def test_bad_text_input_is_refused_before_training(corpus_file, tmp_path):
    vocab = load_dataset("text", text=str(corpus_file)).num_classes
    out = str(tmp_path / "never")
    base = dict(dataset="text", text=str(corpus_file), out=out)
    _refused(
        TrainConfig(**base, model=tiny_model_file(tmp_path, vocab, context=8, input_context=16)),
        "PositionalEmbedding expects sequences of at most max_len 8 positions, got 16",
    )
    _refused(
        TrainConfig(**base, model=tiny_model_file(tmp_path, vocab, heads=3)),
        "num_heads 3 does not divide dim 16",
    )
    small = tiny_model_file(tmp_path, vocab)
    spec = json.loads(open(small).read())
    spec["model"]["layers"][0]["vocab_size"] = vocab - 5
    (tmp_path / "small_vocab.json").write_text(json.dumps(spec))
    _refused(
        TrainConfig(**base, model=str(tmp_path / "small_vocab.json")),
        f"embeds {vocab - 5} token ids, but the text has {vocab} distinct characters",
    )
    for content, match in ((b"", "holds 0 characters"), (b"ab\xffcd", "is not UTF-8: byte 0xff")):
        bad = tmp_path / "bad.txt"
        bad.write_bytes(content)
        _refused(TrainConfig(dataset="text", text=str(bad), out=out), match)
    ds = load_dataset("text", text=str(corpus_file))
    broken = ds._replace(x_train=np.where(np.arange(len(ds.x_train)) == 7, 999, ds.x_train))
    _refused(
        TrainConfig(dataset="text", model=small, out=out),
        rf"x_train has token id 999 at position 7, outside \[0, {vocab}\)",
        broken,
    )
    assert isinstance(ds, Dataset)


def _cli_offers_text() -> bool:
    import argparse

    from jaxbp.commands import train as command

    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    return any(a.dest == "dataset" and "text" in (a.choices or ()) for a in parser._actions)


@pytest.mark.slow
@pytest.mark.skipif(
    not _cli_offers_text(), reason="jaxbp/commands/train.py does not offer --dataset text yet"
)
def test_cli_train_text_then_generate(corpus_file, tmp_path, capsys):
    vocab = load_dataset("text", text=str(corpus_file)).num_classes
    out = tmp_path / "run"
    argv = [
        "train",
        "--dataset",
        "text",
        "--text",
        str(corpus_file),
        "--model",
        tiny_model_file(tmp_path, vocab),
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--progress",
        "none",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("text: 'tiny_gpt.json', adam") and "nats per character" in printed
    assert main(["generate", "--checkpoint", str(out), "--length", "5"]) == 0
    assert len(capsys.readouterr().out) == 1 + 5 + 1  # the default prompt is a newline
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert main([*argv[:4], str(empty), *argv[5:-1], str(tmp_path / "never")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("jaxbp train: error: text file") and err.count("\n") == 1
    assert not (tmp_path / "never").exists()


@pytest.mark.slow
def test_devices_2_gives_the_same_run(corpus_file, tmp_path):
    """--devices 2 (two host devices in a fresh process): the same validation loss."""
    import subprocess
    import sys

    vocab = load_dataset("text", text=str(corpus_file)).num_classes
    script = (
        "import os, sys\n"
        "os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=2'\n"
        "from jaxbp.training import TrainConfig, train\n"
        "losses = [train(TrainConfig(dataset='text', text=sys.argv[1], model=sys.argv[2],\n"
        "          epochs=1, batch_size=8, devices=d)).metrics['test_loss'] for d in (2, 1)]\n"
        "print(losses[0], losses[1])\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(corpus_file), tiny_model_file(tmp_path, vocab)],
        capture_output=True,
        text=True,
        check=True,
    )
    two, one = map(float, done.stdout.split())
    assert two == pytest.approx(one, rel=1e-6)


def test_fused_text_loop_equals_one_call_per_step(corpus_file, tmp_path):
    """The gpt preset trains fused (one lax.scan per epoch, windows cut inside it): the same
    run as one jitted call per step, to float64 rounding."""
    vocab = load_dataset("text", text=str(corpus_file)).num_classes
    results = {}
    for fused in (False, True):
        model = tiny_model_file(tmp_path, vocab, fused=fused)
        cfg = TrainConfig(
            dataset="text", text=str(corpus_file), model=model, epochs=2, batch_size=8, lr=1e-2
        )
        results[fused] = train(cfg)
    per_step, fused = results[False], results[True]
    assert fused.metrics["fused"] is True and per_step.metrics["fused"] is False
    assert fused.metrics["steps"] == per_step.metrics["steps"] > 2
    leaves = jax.tree_util.tree_leaves
    for a, b in zip(leaves(fused.params), leaves(per_step.params), strict=True):
        assert a.dtype == jnp.float64
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(
        fused.metrics["test_loss"], per_step.metrics["test_loss"], rtol=1e-10
    )
