"""Character-level text for the GPT preset: the corpus, its vocabulary, windows, sampling.

The default corpus is one every Python installation ships: the reference text of
``pydoc_data.topics`` (the pages ``help("for")`` prints). :func:`pydoc_corpus` joins the values
of the dict ``pydoc_data.topics.topics`` in sorted-key order with nothing between them; on
CPython 3.11 that is 464,970 characters, 103 distinct. Any UTF-8 file works instead
(:func:`read_text_file`).

The vocabulary is the sorted string of the distinct characters of the whole text (train and
validation): character ``vocabulary[i]`` has id ``i``. The split is by position: the first
``floor(0.9 * len)`` characters train, the rest validate (:func:`split_ids`).

Everything here but :func:`sample` is NumPy only (the data loader imports it without JAX).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

__all__ = [
    "TRAIN_FRACTION",
    "bigram_loss",
    "check_vocabulary",
    "decode",
    "encode",
    "eval_windows",
    "make_vocabulary",
    "pydoc_corpus",
    "read_text_file",
    "sample",
    "split_ids",
]

TRAIN_FRACTION = 0.9


def pydoc_corpus() -> str:
    """The ``pydoc_data.topics`` reference text: its values joined in sorted-key order."""
    from pydoc_data.topics import topics

    return "".join(topics[key] for key in sorted(topics))


def read_text_file(path) -> str:
    """The UTF-8 text of the file at ``path``; ``ValueError`` if it is missing, cannot be
    read, is empty or is not UTF-8."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:  # one line naming the file, not a raw "[Errno 2] ..."
        raise ValueError(
            f"text file {str(path)!r} cannot be read: {e.strerror or type(e).__name__}; "
            f"expected a UTF-8 text file"
        ) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"text file {str(path)!r} is not UTF-8: byte {data[e.start]:#04x} at "
            f"offset {e.start} cannot be decoded"
        ) from None
    if len(text) < 2:
        raise ValueError(
            f"text file {str(path)!r} holds {len(text)} characters; expected a "
            f"non-empty UTF-8 text (at least 2 characters)"
        )
    return text


def make_vocabulary(text: str) -> str:
    """The sorted distinct characters of ``text``: character ``i`` has id ``i``."""
    return "".join(sorted(set(text)))


def check_vocabulary(vocabulary, where: str = "vocabulary") -> str:
    """``vocabulary`` if it is a non-empty string of distinct characters, else ``ValueError``."""
    if not isinstance(vocabulary, str) or not vocabulary or len(set(vocabulary)) != len(vocabulary):
        raise ValueError(
            f"{where} must be a non-empty string of distinct characters, got {vocabulary!r:.60}"
        )
    return vocabulary


def encode(text: str, vocabulary: str, what: str = "text") -> np.ndarray:
    """``text`` as int32 ids into ``vocabulary``; ``ValueError`` naming the first character
    that is not in it and where."""
    index = {ch: i for i, ch in enumerate(vocabulary)}
    try:
        return np.fromiter((index[ch] for ch in text), np.int32, len(text))
    except KeyError as e:
        ch = e.args[0]
        raise ValueError(
            f"{what} has character {ch!r} at position {text.index(ch)}, which is "
            f"not in the model's {len(vocabulary)}-character vocabulary"
        ) from None


def decode(ids, vocabulary: str) -> str:
    """The characters of ``ids`` (integers into ``vocabulary``)."""
    return "".join(vocabulary[int(i)] for i in np.asarray(ids).ravel())


def split_ids(ids: np.ndarray, fraction: float = TRAIN_FRACTION):
    """``(train, validation)``: the first ``floor(fraction * len)`` ids, then the rest."""
    n = int(fraction * len(ids))
    if n < 2 or len(ids) - n < 2:
        raise ValueError(
            f"a text of {len(ids)} characters is too short to split "
            f"{fraction:g}/{1 - fraction:g} into train and validation parts of "
            f"at least 2 characters each"
        )
    return ids[:n], ids[n:]


def eval_windows(x: np.ndarray, y: np.ndarray, context: int):
    """Non-overlapping windows covering every position of ``x`` (``y[i]`` is the character
    after ``x[i]``): ``(xs, ys)`` of shape ``(ceil(len / context), context)``.

    The last window is padded at its end with id 0 and label -1 (no label). A causal model's
    outputs at the real positions do not depend on the padding after them, so a loss over the
    labels >= 0 is the loss over every position exactly once.
    """
    n = len(x)
    windows = -(-n // context)
    pad = windows * context - n
    xs = np.concatenate([x, np.zeros(pad, x.dtype)]).reshape(windows, context)
    ys = np.concatenate([y, np.full(pad, -1, y.dtype)]).reshape(windows, context)
    return xs.astype(np.int32), ys.astype(np.int32)


def bigram_loss(
    train_ids: np.ndarray, val_ids: np.ndarray, vocab_size: int, smoothing: float = 1.0
) -> float:
    """The baseline: nats per character on ``val_ids`` of next-character probabilities
    counted on ``train_ids`` (add-``smoothing`` counts). 2.32 on the pydoc split."""
    counts = np.full((vocab_size, vocab_size), float(smoothing))
    np.add.at(counts, (train_ids[:-1], train_ids[1:]), 1.0)
    probs = counts / counts.sum(axis=1, keepdims=True)
    return float(-np.log(probs[val_ids[:-1], val_ids[1:]]).mean())


def sample(
    net,
    params,
    prompt_ids,
    length: int,
    *,
    context: int,
    temperature: float = 1.0,
    key=None,
    state=None,
) -> np.ndarray:
    """``length`` ids drawn one at a time after ``prompt_ids`` (at least one id) from the
    softmax of the model's logits divided by ``temperature`` (0: the most likely id).

    The model sees the last ``context`` ids; a shorter history is padded after its end (a
    causal model ignores what follows), so one compiled function serves every step.
    """
    import jax

    prompt = np.asarray(prompt_ids, np.int32).ravel()
    if prompt.size < 1:
        raise ValueError("sample needs a prompt of at least one character")
    if not temperature >= 0:
        raise ValueError(f"temperature must be a number >= 0, got {temperature!r}")
    key = jax.random.key(0) if key is None else key
    step = _sampler(net, context)
    ids: list[int] = prompt.tolist()
    for i in range(int(length)):
        history = np.asarray(ids[-context:], np.int32)
        window = np.zeros(context, np.int32)
        window[: history.size] = history
        ids.append(
            int(
                step(
                    params,
                    state,
                    window,
                    history.size - 1,
                    float(temperature),
                    jax.random.fold_in(key, i),
                )
            )
        )
    return np.asarray(ids[prompt.size :], np.int32)


def _sampler(net, context: int) -> Callable:
    import jax
    import jax.numpy as jnp

    from .backprop import forward

    @jax.jit
    def step(params, state, window, position, temperature, key):
        logits = forward(net, params, window[None], state=state, train=False)[0, position]
        greedy = jnp.argmax(logits)
        drawn = jax.random.categorical(key, logits / jnp.maximum(temperature, 1e-30))
        return jnp.where(temperature > 0, drawn, greedy)

    return step
