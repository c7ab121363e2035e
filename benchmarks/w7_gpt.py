"""W7 attention: the character-level GPT preset (4 pre-norm blocks, 4 causal heads, width 128,
context 128, the reference text's 103 characters; 836k params) at its training batch
(``TEXT_DEFAULTS``: 32 windows), token ids in, softmax cross-entropy at every position, plain
SGD. Beside jaxbp's variants (:mod:`benchmarks.networks`), the PyTorch eager twin
(:mod:`benchmarks.torch_gpt`: the same weights, the same SGD step, float32, autograd), timed in
the same interleaved rounds. Reported per step and in tokens per second
(``batch * context / median step seconds``).

Also measured: attention's memory at sequence 512. One ``MultiHeadAttention`` layer (width 128,
4 heads, causal, batch 8, float32), forward then backward compiled as one function: the
temporary buffers XLA allocates (``Compiled.memory_analysis().temp_size_in_bytes``) for jaxbp's
manual backward and for ``jax.vjp`` of the same forward, against the size of one
``(batch, heads, T, T)`` probability matrix.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

import jaxbp
from jaxbp.attention import MultiHeadAttention
from jaxbp.data import TEXT_DEFAULTS, load_text
from jaxbp.presets import gpt_description

from .networks import run_network
from .torch_gpt import TorchGPT, gpt_heads
from .torch_nets import eager_baseline


def _gpt_twin(net, params, state, dtype) -> TorchGPT:
    return TorchGPT(params, gpt_heads(jaxbp.describe(net)), dtype=dtype)


# The PyTorch eager variant (``run(n)``: ``n`` SGD steps of the twin), or why it is skipped.
torch_baseline = eager_baseline(_gpt_twin)


def attention_memory(batch: int, time: int, width: int, heads: int) -> dict:
    """Compiled temporary memory of one causal ``MultiHeadAttention`` layer's forward +
    backward (float32): jaxbp's manual backward and ``jax.vjp`` of the same forward."""
    layer = MultiHeadAttention(heads, causal=True)
    shape = (batch, time, width)
    with jax.enable_x64(False):
        _, params = layer.init(jax.random.key(0), shape)
        x = jax.random.normal(jax.random.key(1), shape, jnp.float32)
        dy = jax.random.normal(jax.random.key(2), shape, jnp.float32)

        def manual(p, x, dy):
            _, cache = layer.forward(p, x)
            return layer.backward(p, cache, dy)

        def autodiff(p, x, dy):
            _, vjp = jax.vjp(lambda p, x: layer.forward(p, x)[0], p, x)
            return vjp(dy)

        out: dict = {
            "batch": batch,
            "time": time,
            "width": width,
            "heads": heads,
            "causal": True,
            "dtype": "float32",
            "probabilities_bytes": batch * heads * time * time * 4,
        }
        for name, fn in (("jaxbp manual", manual), ("jax.grad", autodiff)):
            compiled = jax.jit(fn).lower(params, x, dy).compile()
            try:
                stats = compiled.memory_analysis()
                temp = int(stats.temp_size_in_bytes)
            except (AttributeError, NotImplementedError, TypeError) as e:
                # memory_analysis is None or raises on backends that do not report it.
                out["unavailable"] = f"{type(e).__name__}: {e}"
                return out
            out[name] = {
                "temp_bytes": temp,
                "argument_bytes": int(stats.argument_size_in_bytes),
                "output_bytes": int(stats.output_size_in_bytes),
            }
    return out


def _memory_note(m: dict) -> str:
    where = (
        f"attention memory, one MultiHeadAttention layer (batch {m['batch']}, T={m['time']}, "
        f"width {m['width']}, {m['heads']} heads, causal, float32), forward + backward compiled "
        f"as one function"
    )
    mib = 2.0**20
    matrix = f"one (batch, heads, T, T) probability matrix is {m['probabilities_bytes'] / mib:.1f}"
    if "unavailable" in m:
        return f"{where}: memory_analysis unavailable ({m['unavailable']}); {matrix} MiB"
    manual, auto = m["jaxbp manual"]["temp_bytes"], m["jax.grad"]["temp_bytes"]
    return (
        f"{where}: XLA temp buffers, jaxbp manual {manual / mib:.1f} MiB, jax.grad "
        f"{auto / mib:.1f} MiB; {matrix} MiB"
    )


def run(*, quick: bool = False, tiny: bool = False) -> dict:
    vocab = 13 if tiny else load_text().num_classes
    layers, heads, width, context = (1, 2, 8, 8) if tiny else (4, 4, 128, 128)
    batch = 4 if tiny else int(TEXT_DEFAULTS["batch_size"])
    section = run_network(
        "W7",
        f"character-level GPT preset ({layers} blocks, {heads} heads, width {width}, context "
        f"{context}, vocabulary {vocab}), batch {batch}",
        gpt_description(vocab, layers=layers, heads=heads, width=width, context=context),
        (context,),
        batch,
        "softmax_cross_entropy",
        vocab,
        steps=2 if tiny else 3,
        rounds=2 if tiny else (3 if quick else 5),
        integer_inputs=vocab,
        tokens_per_step=batch * context,
        baselines=torch_baseline,
    )
    section["context"] = context
    section["tokens_per_step"] = batch * context
    memory = attention_memory(*((2, 16, 8, 2) if tiny else (8, 512, 128, 4)))
    section["attention_memory"] = memory
    section["notes"] = [_memory_note(memory)]
    return section
