"""jaxbp.text and the "text" dataset: corpus, vocabulary, windows, baseline, evaluation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxbp import text
from jaxbp.data import SEQUENCE_DATASETS, load_dataset
from jaxbp.model import build
from jaxbp.presets import gpt_description
from jaxbp.training import compiled


def test_pydoc_corpus_is_the_documented_text():
    corpus = text.pydoc_corpus()
    from pydoc_data.topics import topics

    assert corpus == "".join(topics[k] for k in sorted(topics))
    # The "about 465,000 characters, 103 distinct" (CPython 3.11: 464,970).
    assert 400_000 < len(corpus) < 550_000
    assert 90 <= len(text.make_vocabulary(corpus)) <= 115


def test_text_dataset_split_and_targets():
    ds = load_dataset("text")
    assert "text" in SEQUENCE_DATASETS and ds.task == "sequence"
    corpus = text.pydoc_corpus()
    n = int(0.9 * len(corpus))
    assert ds.vocabulary == "".join(sorted(set(corpus))) and ds.num_classes == len(ds.vocabulary)
    assert text.decode(ds.x_train[:50], ds.vocabulary) == corpus[:50]
    assert len(ds.x_train) == n - 1 and len(ds.x_test) == len(corpus) - n - 1
    np.testing.assert_array_equal(ds.y_train[:-1], ds.x_train[1:])  # y is the next character
    assert text.decode(ds.y_test[-5:], ds.vocabulary) == corpus[-5:]
    assert ds.x_train.dtype == np.int32


def test_bigram_baseline_is_2_32():
    ds = load_dataset("text")
    train = np.append(ds.x_train, ds.y_train[-1])
    valid = np.append(ds.x_test, ds.y_test[-1])
    assert text.bigram_loss(train, valid, ds.num_classes) == pytest.approx(2.32, abs=0.01)


def test_encode_decode_round_trip_and_unknown_character():
    vocab = text.make_vocabulary("hello world\n")
    assert vocab == "\n dehlorw"
    ids = text.encode("hello", vocab)
    assert ids.dtype == np.int32 and text.decode(ids, vocab) == "hello"
    with pytest.raises(
        ValueError,
        match=r"prompt has character 'z' at position 2, which is not "
        r"in the model's 9-character vocabulary",
    ):
        text.encode("hez", vocab, what="prompt")


def test_read_text_file_errors(tmp_path):
    empty, latin, good = tmp_path / "empty.txt", tmp_path / "latin.txt", tmp_path / "ok.txt"
    empty.write_bytes(b"")
    latin.write_bytes("caf\xe9".encode("latin-1"))
    good.write_text("ok text é", encoding="utf-8")
    with pytest.raises(ValueError, match="holds 0 characters"):
        text.read_text_file(empty)
    with pytest.raises(ValueError, match="is not UTF-8: byte 0xe9 at offset 3"):
        text.read_text_file(latin)
    assert text.read_text_file(good) == "ok text é"
    missing = tmp_path / "missing.txt"
    with pytest.raises(ValueError, match=r"^text file '.*missing.txt' cannot be read: No such"):
        text.read_text_file(missing)
    with pytest.raises(ValueError, match="a text file applies only to dataset 'text'"):
        load_dataset("xor", text=str(good))
    ds = load_dataset("text", text=str(_long_file(tmp_path)))
    assert ds.num_classes == len(ds.vocabulary)


def _long_file(tmp_path):
    path = tmp_path / "long.txt"
    path.write_text("abcdefgh ijkl\n" * 20, encoding="utf-8")
    return path


@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 60), context=st.integers(1, 17))
def test_eval_windows_cover_every_position_once(n, context):
    x = np.arange(n, dtype=np.int32) % 7
    y = (x + 1) % 7
    xs, ys = text.eval_windows(x, y, context)
    assert xs.shape == ys.shape == (-(-n // context), context)
    np.testing.assert_array_equal(xs.ravel()[:n], x)
    np.testing.assert_array_equal(ys.ravel()[:n], y)
    assert np.all(ys.ravel()[n:] == -1) and np.sum(ys >= 0) == n


def test_window_batch_fn_cuts_windows_at_random_offsets():
    context = 8
    x = jnp.arange(100, dtype=jnp.int32)
    batch = compiled.window_batch_fn(context)
    data = (x, x + 1, jax.random.key(0))
    row = jnp.array([0, 3, 11, 5])  # windows 0, 3, 11 (the last, 11 * 8 + 7 > 92: clipped)
    xb, yb = batch(data, row)
    assert xb.shape == yb.shape == (3, context)
    np.testing.assert_array_equal(yb, xb + 1)
    starts = np.asarray(xb[:, 0])
    assert np.all(np.diff(np.asarray(xb), axis=1) == 1)  # contiguous windows
    assert 0 <= starts[0] < 8 and 24 <= starts[1] < 32 and starts[2] == 100 - context
    xb2, _ = batch(data, row.at[-1].set(6))  # another step: other offsets
    assert not np.array_equal(xb, xb2)


@pytest.mark.slow
def test_sequence_evaluator_is_the_loss_over_every_position():
    """Chunked, padded evaluation == the mean over positions of -log softmax, each position
    scored once in one long causal pass per non-overlapping window (numpy reference)."""
    vocab, context = 11, 8
    net = build(gpt_description(vocab, layers=1, heads=2, width=8, context=context))
    _, params = net.init(jax.random.key(1), (-1, context))
    rng = np.random.default_rng(0)
    ids = rng.integers(0, vocab, 45).astype(np.int32)
    x, y = ids[:-1], ids[1:]
    xs, ys = text.eval_windows(x, y, context)
    for chunk in (1, 4):
        evaluate = compiled.sequence_evaluator(net, True, chunk)
        loss, acc = evaluate(params, (), jnp.asarray(xs), jnp.asarray(ys))
        total, correct = 0.0, 0
        for start in range(0, len(x), context):  # windows of exactly the real length
            logits = np.asarray(
                net.forward(params, jnp.asarray(x[start : start + context]))[0], np.float64
            )
            logp = (
                logits
                - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
                - logits.max(-1, keepdims=True)
            )
            target = y[start : start + context]
            total -= logp[np.arange(len(target)), target].sum()
            correct += int(np.sum(logits.argmax(-1) == target))
        assert float(loss) == pytest.approx(total / len(x), rel=1e-10)
        assert float(acc) == pytest.approx(correct / len(x), rel=1e-12)
