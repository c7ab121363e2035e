"""The baselines jaxbp is measured against: plain ``jax.value_and_grad``, numpy, PyTorch.

Every baseline starts from the same parameters as jaxbp (copied from its params pytree) and
computes the same loss and gradients, so the tests can check them number for number.
"""

from __future__ import annotations

import jax
import numpy as np

import jaxbp


def dense_params(params) -> list[tuple]:
    """The ``(W, b)`` pairs of a ``serial`` network's Dense layers, in order."""
    return [(p["W"], p["b"]) for p in params if isinstance(p, dict)]


def activation_names(net) -> list[str]:
    """The activation after each Dense layer (``"identity"`` when none follows)."""
    names, layers = [], net.children
    for i, layer in enumerate(layers):
        if layer.name == "Dense":
            nxt = layers[i + 1].name if i + 1 < len(layers) else "Identity"
            names.append(nxt.lower() if nxt != "Dense" else "identity")
    return names


def jax_grad_step(net, loss, learning_rate: float):
    """A plain jitted step through ``jax.value_and_grad``: no checks, no guard, plain SGD."""
    value_fn = jaxbp.loss_fn(net, loss)

    def step(params, x, y):
        value, grads = jax.value_and_grad(value_fn)(params, x, y)
        return jax.tree_util.tree_map(lambda p, g: p - learning_rate * g, params, grads), value

    return step


# --------------------------------------------------------------------------------------------
# numpy, in the seed's style
# --------------------------------------------------------------------------------------------


def _np_sigmoid(x):
    return 1 / (1 + np.exp(-x))


class NumpyMLP:
    """The seed's numpy program, generalised to any depth.

    Forward caches each layer's input and output; the backward is the explicit chain rule
    (``delta = error * activation'(output)``, ``dW = input.T @ delta``,
    ``error_below = delta @ W.T``); SGD updates the weights and biases in place.
    """

    def __init__(self, net, params, loss: str, learning_rate: float, dtype=np.float32):
        self.layers = [[np.array(w, dtype), np.array(b, dtype)] for w, b in dense_params(params)]
        self.acts = activation_names(net)
        self.loss = loss
        self.lr = dtype(learning_rate)
        self.dtype = dtype

    def forward(self, x):
        cache = []
        out = x
        for (w, b), act in zip(self.layers, self.acts):
            inp = out
            z = np.dot(inp, w) + b
            if act == "sigmoid":
                out = _np_sigmoid(z)
            elif act == "relu":
                out = np.maximum(z, 0)
            elif act == "identity":
                out = z
            else:
                raise ValueError(f"NumpyMLP: unsupported activation {act!r}")
            cache.append((inp, out))
        return out, cache

    def loss_and_delta(self, out, y):
        """The loss and ``dE/d(output)``, averaged over examples as jaxbp's losses do."""
        n = out.shape[0]
        if self.loss == "half_sse":
            return 0.5 * np.sum((y - out) ** 2) / n, (out - y) / n
        if self.loss == "mse":
            return np.mean((out - y) ** 2), 2 * (out - y) / out.size
        if self.loss == "softmax_cross_entropy":
            z = out - out.max(axis=1, keepdims=True)
            e = np.exp(z)
            p = e / e.sum(axis=1, keepdims=True)
            rows = np.arange(n)
            value = -np.mean(z[rows, y] - np.log(e.sum(axis=1)))
            p[rows, y] -= 1
            return value, p / n
        raise ValueError(f"NumpyMLP: unsupported loss {self.loss!r}")

    def grads(self, x, y):
        """``(loss, [(dW, db), ...])`` for a batch ``x`` of shape ``(batch, features)``."""
        out, cache = self.forward(x)
        value, error = self.loss_and_delta(out, y)
        grads = [None] * len(self.layers)
        for i in reversed(range(len(self.layers))):
            inp, o = cache[i]
            act = self.acts[i]
            if act == "sigmoid":
                delta = error * (o * (1 - o))
            elif act == "relu":
                delta = error * (o > 0)
            else:
                delta = error
            w, b = self.layers[i]
            db = delta.sum() if b.ndim == 0 else delta.sum(axis=0)
            grads[i] = (np.dot(inp.T, delta), db)
            if i:
                error = np.dot(delta, w.T)
        return value, grads

    def step(self, x, y):
        """One SGD step, in place; returns the loss before the update."""
        value, grads = self.grads(x, y)
        for (w, b), (dw, db) in zip(self.layers, grads):
            w -= self.lr * dw
            if b.ndim == 0:
                b[...] = b - self.lr * db
            else:
                b -= self.lr * db
        return value


# --------------------------------------------------------------------------------------------
# PyTorch eager (optional)
# --------------------------------------------------------------------------------------------


def torch_available() -> str | None:
    """``None`` when torch imports, else why it does not."""
    try:
        import torch  # noqa: F401
    except ImportError as e:
        return f"torch not installed ({e.__class__.__name__})"
    return None


class TorchMLP:
    """The same network in PyTorch eager mode, autograd + ``torch.optim.SGD``, jaxbp's layout."""

    def __init__(self, net, params, loss: str, learning_rate: float):
        import torch

        self.torch = torch
        self.params = [
            (
                torch.tensor(np.array(w, np.float32), requires_grad=True),
                torch.tensor(np.array(b, np.float32), requires_grad=True),
            )
            for w, b in dense_params(params)
        ]
        self.acts = activation_names(net)
        self.loss = loss
        flat = [t for pair in self.params for t in pair]
        self.opt = torch.optim.SGD(flat, lr=learning_rate)

    def value(self, x, y):
        torch = self.torch
        out = x
        for (w, b), act in zip(self.params, self.acts):
            out = out @ w + b
            if act == "sigmoid":
                out = torch.sigmoid(out)
            elif act == "relu":
                out = torch.relu(out)
        n = out.shape[0]
        if self.loss == "half_sse":
            return 0.5 * ((y - out) ** 2).sum() / n
        if self.loss == "mse":
            return ((out - y) ** 2).mean()
        return torch.nn.functional.cross_entropy(out, y)

    def grads(self, x, y):
        for pair in self.params:
            for t in pair:
                t.grad = None
        value = self.value(x, y)
        value.backward()
        return float(value.detach()), [(w.grad.numpy(), b.grad.numpy()) for w, b in self.params]

    def step(self, x, y):
        self.opt.zero_grad(set_to_none=True)
        value = self.value(x, y)
        value.backward()
        self.opt.step()
        return value
