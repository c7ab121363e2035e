"""A PyTorch twin of jaxbp's character-level GPT (:func:`jaxbp.presets.gpt_description`), built
from a jaxbp params pytree: the same weights, the same arithmetic, autograd for the backward.

jaxbp's layout, which the twin reads leaf by leaf::

    [Embedding {W}, PositionalEmbedding {P},
     (LayerNorm {scale, bias}, MultiHeadAttention {Wq, Wk, Wv, Wo, bq, bk, bv, bo}),   per block
     (LayerNorm, Dense {W, b}, Gelu (), Dense {W, b}),                                 per block
     LayerNorm, Dense]

with ``Dense`` as ``y = x @ W + b`` (``W`` is ``(in, out)``), LayerNorm's ``eps`` 1e-5 and the
tanh-approximate GELU. :class:`TorchGPT` holds the torch tensors in the same pytree, so
``leaves[i]`` and ``jax.tree_util.tree_leaves(params)[i]`` are the same parameter.

PyTorch is optional: it is imported when a :class:`TorchGPT` is made, not with this module.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

__all__ = ["TorchGPT", "gpt_heads", "decays"]


def _names(layers) -> list[str]:
    return [layer.get("name") for layer in layers]


def gpt_heads(description: dict) -> int:
    """The number of attention heads of a GPT description (:func:`jaxbp.describe` or
    :func:`jaxbp.presets.gpt_description`); a ``ValueError`` naming the first layer that does
    not fit the GPT's layout, which is all the twin can run."""
    layers = description.get("layers", []) if description.get("name") == "serial" else []
    expected = "serial [Embedding, PositionalEmbedding, blocks..., LayerNorm, Dense]"
    if _names(layers[:2]) != ["Embedding", "PositionalEmbedding"] or _names(layers[-2:]) != [
        "LayerNorm",
        "Dense",
    ]:
        raise ValueError(f"the PyTorch twin runs a GPT description, {expected}; got {description}")
    blocks = layers[2:-2]
    heads = set()
    for i, block in enumerate(blocks):
        want = (
            ["LayerNorm", "MultiHeadAttention"]
            if i % 2 == 0
            else ["LayerNorm", "Dense", "Gelu", "Dense"]
        )
        inner = block.get("layers", [])
        if block.get("name") != "residual" or _names(inner) != want:
            raise ValueError(
                f"the PyTorch twin expects layers[{i + 2}] to be residual {want}, got "
                f"{block.get('name')} {_names(inner)}"
            )
        if i % 2 == 0:
            if inner[1].get("causal") is not True:
                raise ValueError(f"the PyTorch twin expects causal attention in layers[{i + 2}]")
            heads.add(int(inner[1]["num_heads"]))
    if len(blocks) % 2 or len(heads) != 1:
        raise ValueError(
            f"the PyTorch twin expects pairs of attention and MLP blocks with one head count, "
            f"got {len(blocks)} blocks with heads {sorted(heads)}"
        )
    return heads.pop()


def decays(params) -> list[bool]:
    """Per leaf (``tree_leaves`` order): is it weight-decayed? jaxbp's AdamW decays every leaf
    but those named ``'b'`` (``jaxbp.training.config``: ``mask = not biases(params)``), so the
    attention biases ``bq..bo`` and LayerNorm's ``scale``/``bias`` are decayed too."""
    import jaxbp

    return [not b for b in jax.tree_util.tree_leaves(jaxbp.biases(params))]


class TorchGPT:
    """The GPT in PyTorch eager mode from jaxbp ``params`` (copied): ``logits``, ``loss``.

    ``dtype``: a torch dtype; default the params' own (float32 or float64).
    """

    def __init__(self, params, heads: int, dtype=None):
        import torch

        self.torch = torch
        leaves, treedef = jax.tree_util.tree_flatten(params)
        if dtype is None:
            dtype = torch.float64 if np.asarray(leaves[0]).dtype == np.float64 else torch.float32
        self.leaves = [
            torch.tensor(np.array(leaf), dtype=dtype, requires_grad=True) for leaf in leaves
        ]
        self.tree: Any = jax.tree_util.tree_unflatten(treedef, self.leaves)
        self.heads = int(heads)
        self.dtype = dtype
        self.decays = decays(params)

    def _ids(self, ids):
        if isinstance(ids, self.torch.Tensor):
            return ids.long()
        return self.torch.as_tensor(np.array(ids), dtype=self.torch.long)

    def logits(self, ids):
        """``(batch, time, vocab)`` logits of token ids ``(batch, time)``."""
        f = self.torch.nn.functional
        p = self.tree
        ids = self._ids(ids)
        h = p[0]["W"][ids] + p[1]["P"][: ids.shape[1]]
        b, t, d = h.shape
        for att, mlp in zip(p[2:-2:2], p[3:-2:2], strict=True):
            a = f.layer_norm(h, (d,), att[0]["scale"], att[0]["bias"], 1e-5)
            q, k, v = (
                f.linear(a, att[1]["W" + n].t(), att[1]["b" + n])
                .view(b, t, self.heads, -1)
                .transpose(1, 2)
                for n in "qkv"
            )
            o = f.scaled_dot_product_attention(q, k, v, is_causal=True)
            h = h + f.linear(o.transpose(1, 2).reshape(b, t, d), att[1]["Wo"].t(), att[1]["bo"])
            a = f.layer_norm(h, (d,), mlp[0]["scale"], mlp[0]["bias"], 1e-5)
            inner = f.gelu(f.linear(a, mlp[1]["W"].t(), mlp[1]["b"]), approximate="tanh")
            h = h + f.linear(inner, mlp[3]["W"].t(), mlp[3]["b"])
        h = f.layer_norm(h, (d,), p[-2]["scale"], p[-2]["bias"], 1e-5)
        return f.linear(h, p[-1]["W"].t(), p[-1]["b"])

    def loss(self, ids, labels, reduction: str = "mean"):
        """Softmax cross-entropy over every position whose label is >= 0 (-1 marks padding):
        the mean (jaxbp's loss), or with ``reduction="sum"`` the total."""
        out = self.logits(ids)
        labels = self._ids(labels)
        return self.torch.nn.functional.cross_entropy(
            out.reshape(-1, out.shape[-1]), labels.reshape(-1), ignore_index=-1, reduction=reduction
        )

    def grads(self) -> list[np.ndarray]:
        """The leaves' ``.grad`` as numpy arrays (after ``loss(...).backward()``)."""
        return [w.grad.detach().numpy() for w in self.leaves]

    def params(self):
        """The current weights as a numpy pytree shaped like jaxbp's params."""
        return jax.tree_util.tree_map(lambda w: w.detach().numpy().copy(), self.tree)
