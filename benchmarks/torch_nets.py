"""PyTorch eager twins of jaxbp networks, built from their model description
(:func:`jaxbp.describe`), and the benchmark variant that trains one with ``torch.optim.SGD``.

The twin is what a PyTorch user would write for the same network: ``F.conv1d`` /
``F.conv2d``, ``F.batch_norm``, ``F.max_pool2d``, ``F.linear``, ``torch.nn.GRU``, autograd for
the backward. Its weights are copied from jaxbp's params into PyTorch's own layouts, and
:meth:`TorchNet.params` maps them back::

    jaxbp                                      PyTorch
    Conv1D/Conv2D W (*kernel, in, out), b      weight (out, in, *kernel), bias
    Dense W (in, out), b                       weight (out, in), bias            (F.linear)
    BatchNorm scale, bias; state mean, var     weight, bias; running_mean, running_var
    GRU Wi (in, 3H), Wh (H, 3H), bi, bh        weight_ih_l0 = Wi.T, weight_hh_l0 = Wh.T,
      (gates r, z, n in both)                  bias_ih_l0 = bi, bias_hh_l0 = bh  (nn.GRU)
    bidirectional {forward, backward}          one nn.GRU(bidirectional=True), "_reverse"

Inputs come channels-last, as jaxbp has them; the twin moves the channels to axis 1 before
its first convolution, pooling or BatchNorm and back before a Dense, Flatten or GRU (a
PyTorch user's ``x.transpose(1, 2)``; its cost is part of the timing). The arithmetic is
jaxbp's: convolutions pad ``(lo, hi)`` as jaxbp does ("SAME" puts the odd zero at the end,
through ``F.pad`` where the two sides differ), BatchNorm in training mode normalises with the
biased batch variance over every axis but the channels and moves its running statistics by
``1 - momentum`` (PyTorch's momentum is jaxbp's ``1 - momentum``), GlobalAvgPool is the mean
over the spatial axes, and the loss is the mean softmax cross-entropy of integer labels.

PyTorch is optional: it is imported when a twin is made, not with this module.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np

import jaxbp

from .networks import LEARNING_RATE, TORCH_VARIANT, torch_threads
from .reference import torch_available

__all__ = ["TorchNet", "eager_baseline", "torch_baseline"]

_COVERED = (
    "serial",
    "residual",
    "Conv1D",
    "Conv2D",
    "BatchNorm",
    "Relu",
    "MaxPool2D",
    "GlobalAvgPool",
    "Flatten",
    "Dense",
    "GRU",
    "bidirectional",
)

# Where the channels are: last (jaxbp's layout, and what Dense, Flatten and GRU read) or on
# axis 1 (what PyTorch's convolutions, pooling and batch_norm read). None: either will do.
LAST, FIRST = "channels last", "channels first"


def _channels_first(x):
    return x if x.ndim <= 2 else x.movedim(-1, 1)


def _channels_last(x):
    return x if x.ndim <= 2 else x.movedim(1, -1)


class _Built(NamedTuple):
    """One layer of the twin: ``run(x) -> y``, the layout it reads and leaves (None: the one
    it was given), and trees shaped like jaxbp's params and state whose leaves are functions
    returning that leaf's current value as numpy."""

    run: Callable
    reads: str | None
    leaves: str | None
    params: Any
    state: Any


def _tuple(value, rank: int) -> tuple[int, ...]:
    return (int(value),) * rank if isinstance(value, int) else tuple(int(v) for v in value)


def _pads(padding, sizes, kernel_eff, strides) -> tuple[tuple[int, int], ...]:
    """jaxbp's ``(lo, hi)`` per spatial axis (:mod:`jaxbp.conv`): "SAME" gives
    ``ceil(n / s)`` outputs with the odd zero at the end."""
    rank = len(sizes)
    if isinstance(padding, str):
        if padding.upper() == "VALID":
            return ((0, 0),) * rank
        totals = [
            max((-(-n // s) - 1) * s + k - n, 0) for n, k, s in zip(sizes, kernel_eff, strides)
        ]
        return tuple((t // 2, t - t // 2) for t in totals)
    if isinstance(padding, int):
        return ((padding, padding),) * rank
    if rank == 1 and len(padding) == 2 and all(isinstance(v, int) for v in padding):
        return ((int(padding[0]), int(padding[1])),)
    return tuple((v, v) if isinstance(v, int) else (int(v[0]), int(v[1])) for v in padding)


class TorchNet:
    """A jaxbp network in PyTorch eager mode: ``logits``, ``loss``, ``params``, ``state``.

    ``description``: :func:`jaxbp.describe` of the network; ``params`` (and ``state``, the
    BatchNorm running statistics, default the initial ones) copied from jaxbp's pytrees;
    ``dtype``: a torch dtype, default the params' own (float32 or float64). ``leaves`` holds
    every trained tensor (leaf tensors with ``requires_grad``), for an optimizer. A layer the
    twin does not cover raises a ``ValueError`` naming it and where it sits.
    """

    def __init__(self, description: dict, params, state=(), dtype=None):
        import torch

        self.torch = torch
        if dtype is None:
            first = jax.tree_util.tree_leaves(params)[:1]
            is64 = bool(first) and np.asarray(first[0]).dtype == np.float64
            dtype = torch.float64 if is64 else torch.float32
        self.dtype = dtype
        self.leaves: list = []
        built = self._build(description, params, state, LAST, "model")
        run = built.run
        self._run = run if built.leaves in (LAST, None) else lambda x: _channels_last(run(x))
        self._params, self._state = built.params, built.state

    # ----------------------------------------------------------------------------------------
    # Use
    # ----------------------------------------------------------------------------------------

    def inputs(self, x):
        """``x`` (numpy, JAX or torch, channels last) as a tensor of the twin's dtype."""
        if isinstance(x, self.torch.Tensor):
            return x.to(self.dtype)
        return self.torch.as_tensor(np.array(x), dtype=self.dtype)

    def logits(self, x):
        """The network's output for a batch ``x``, channels last."""
        return self._run(self.inputs(x))

    def loss(self, x, labels):
        """The mean softmax cross-entropy of integer ``labels`` (shaped like the output without
        its last axis), as jaxbp's ``softmax_cross_entropy``."""
        out = self.logits(x)
        if not isinstance(labels, self.torch.Tensor):
            labels = self.torch.as_tensor(np.array(labels))
        return self.torch.nn.functional.cross_entropy(
            out.reshape(-1, out.shape[-1]), labels.long().reshape(-1)
        )

    def params(self):
        """The current weights as a numpy pytree shaped like jaxbp's params."""
        return jax.tree_util.tree_map(lambda get: get(), self._params)

    def state(self):
        """The current BatchNorm running statistics, shaped like jaxbp's state."""
        return jax.tree_util.tree_map(lambda get: get(), self._state)

    # ----------------------------------------------------------------------------------------
    # Building, one method per layer
    # ----------------------------------------------------------------------------------------

    def _leaf(self, array, layout: Callable = lambda a: a):
        """A trained tensor from a jaxbp leaf, ``layout`` mapping it to PyTorch's layout."""
        t = self.torch.tensor(layout(np.asarray(array)), dtype=self.dtype, requires_grad=True)
        self.leaves.append(t)
        return t

    @staticmethod
    def _export(t, layout: Callable = lambda a: a) -> Callable:
        return lambda: np.array(layout(t.detach().numpy()))

    def _build(self, desc: dict, params, state, layout: str, where: str) -> _Built:
        name = desc.get("name")
        if name not in _COVERED:
            raise ValueError(
                f"{where}: the PyTorch twin has no {name!r} layer; it covers {', '.join(_COVERED)}"
            )
        method = getattr(self, f"_build_{name.lower()}")
        return method(desc, params, state, layout, where)

    def _build_serial(self, desc, params, state, layout, where) -> _Built:
        layers = desc["layers"]
        states = state if state else ((),) * len(layers)  # () when no layer has state
        runs, out_params, out_states, now = [], [], [], layout
        for i, (d, p, s) in enumerate(zip(layers, params, states, strict=True)):
            built = self._build(d, p, s, now, f"{where}.layers[{i}]")
            if built.reads not in (None, now):
                runs.append(_channels_first if built.reads == FIRST else _channels_last)
                now = built.reads
            runs.append(built.run)
            now = built.leaves or now
            out_params.append(built.params)
            out_states.append(built.state)

        def run(x):
            for f in runs:
                x = f(x)
            return x

        out_state = tuple(out_states) if any(s != () for s in out_states) else ()
        return _Built(run, None, now, tuple(out_params), out_state)

    def _build_residual(self, desc, params, state, layout, where) -> _Built:
        """``y = x + f(x)``, ``f`` the serial body; its output back in ``x``'s layout."""
        body = self._build_serial(desc, params, state, layout, where)
        back = {FIRST: _channels_first, LAST: _channels_last}[layout]
        inner = body.run if body.leaves in (None, layout) else lambda x: back(body.run(x))
        return _Built(lambda x: x + inner(x), None, layout, body.params, body.state)

    def _build_conv(self, desc, params, rank: int) -> _Built:
        f = self.torch.nn.functional
        conv = f.conv1d if rank == 1 else f.conv2d
        kernel = _tuple(desc["kernel_size"], rank)
        strides = _tuple(desc.get("stride", 1), rank)
        dilations = _tuple(desc.get("dilation", 1), rank)
        kernel_eff = tuple((k - 1) * d + 1 for k, d in zip(kernel, dilations))
        padding = desc.get("padding", "VALID")
        to_torch = (rank + 1, rank, *range(rank))  # (*kernel, in, out) -> (out, in, *kernel)
        to_jaxbp = (*range(2, rank + 2), 1, 0)
        w = self._leaf(params["W"], lambda a: np.transpose(a, to_torch))
        b = self._leaf(params["b"])
        geometry: dict[tuple, tuple] = {}  # spatial sizes -> (F.pad's list or None, padding)

        def pads_for(sizes):
            if sizes not in geometry:
                pads = _pads(padding, sizes, kernel_eff, strides)
                if all(lo == hi for lo, hi in pads):
                    geometry[sizes] = (None, tuple(lo for lo, _ in pads))
                else:  # F.pad lists the last axis first
                    flat = [p for pair in reversed(pads) for p in pair]
                    geometry[sizes] = (flat, 0)
            return geometry[sizes]

        def run(x):
            flat, pad = pads_for(tuple(x.shape[2:]))
            if flat is not None:
                x = f.pad(x, flat)
            return conv(x, w, b, strides, pad, dilations)

        exported = {"W": self._export(w, lambda a: np.transpose(a, to_jaxbp)), "b": self._export(b)}
        return _Built(run, FIRST, FIRST, exported, ())

    def _build_conv1d(self, desc, params, state, layout, where) -> _Built:
        return self._build_conv(desc, params, 1)

    def _build_conv2d(self, desc, params, state, layout, where) -> _Built:
        return self._build_conv(desc, params, 2)

    def _build_batchnorm(self, desc, params, state, layout, where) -> _Built:
        """Training mode: batch statistics (biased variance) over all axes but the channels;
        the running statistics move by PyTorch's ``momentum = 1 - jaxbp's momentum``."""
        torch, f = self.torch, self.torch.nn.functional
        scale, bias = self._leaf(params["scale"]), self._leaf(params["bias"])
        n = scale.shape[0]
        mean = torch.tensor(np.asarray(state["mean"]) if state else np.zeros(n), dtype=self.dtype)
        var = torch.tensor(np.asarray(state["var"]) if state else np.ones(n), dtype=self.dtype)
        momentum, eps = 1.0 - float(desc.get("momentum", 0.9)), float(desc.get("eps", 1e-5))

        def run(x):
            return f.batch_norm(x, mean, var, scale, bias, True, momentum, eps)

        exported = {"scale": self._export(scale), "bias": self._export(bias)}
        return _Built(
            run, FIRST, FIRST, exported, {"mean": self._export(mean), "var": self._export(var)}
        )

    def _build_relu(self, desc, params, state, layout, where) -> _Built:
        return _Built(self.torch.relu, None, None, (), ())

    def _build_maxpool2d(self, desc, params, state, layout, where) -> _Built:
        window = _tuple(desc["window"], 2)
        stride = window if desc.get("stride") is None else _tuple(desc["stride"], 2)
        pool = self.torch.nn.functional.max_pool2d
        return _Built(lambda x: pool(x, window, stride), FIRST, FIRST, (), ())

    def _build_globalavgpool(self, desc, params, state, layout, where) -> _Built:
        # (batch, *spatial, channels) or (batch, channels, *spatial) -> (batch, channels)
        if layout == FIRST:
            run = lambda x: x.mean(dim=tuple(range(2, x.ndim)))
        else:
            run = lambda x: x.mean(dim=tuple(range(1, x.ndim - 1)))
        return _Built(run, None, LAST, (), ())

    def _build_flatten(self, desc, params, state, layout, where) -> _Built:
        return _Built(lambda x: x.flatten(1), LAST, LAST, (), ())

    def _build_dense(self, desc, params, state, layout, where) -> _Built:
        linear = self.torch.nn.functional.linear
        w = self._leaf(params["W"], np.transpose)
        b = self._leaf(params["b"])
        run = (lambda x: linear(x, w) + b) if b.ndim == 0 else (lambda x: linear(x, w, b))
        return _Built(
            run, LAST, LAST, {"W": self._export(w, np.transpose), "b": self._export(b)}, ()
        )

    def _build_gru(self, desc, params, state, layout, where, both: bool = False) -> _Built:
        """``torch.nn.GRU(batch_first=True)`` with jaxbp's weights (gate order r, z, n in
        both). A lone ``reverse=True`` GRU reads the time-flipped sequence."""
        torch = self.torch
        directions = ("forward", "backward") if both else ("forward",)
        per = {d: params[d] for d in directions} if both else {"forward": params}
        hidden = int(desc["hidden"])
        gru = torch.nn.GRU(
            per["forward"]["Wi"].shape[0],
            hidden,
            batch_first=True,
            bidirectional=both,
            dtype=self.dtype,
        )
        names = {"Wi": "weight_ih_l0", "Wh": "weight_hh_l0", "bi": "bias_ih_l0", "bh": "bias_hh_l0"}
        exported: dict = {}
        with torch.no_grad():
            for d in directions:
                exported[d] = {}
                for leaf, stem in names.items():
                    t = getattr(gru, stem + ("_reverse" if d == "backward" else ""))
                    t.copy_(torch.as_tensor(np.array(per[d][leaf]).T))  # .T: 1-D unchanged
                    exported[d][leaf] = self._export(t, np.transpose)
        self.leaves.extend(gru.parameters())
        sequences, flip = bool(desc.get("return_sequences", True)), bool(desc.get("reverse"))

        def run(x):
            out, h_n = gru(x.flip(1) if flip else x)
            if not sequences:  # the final state of each direction, concatenated
                return torch.cat(list(h_n), dim=-1) if both else h_n[0]
            return out.flip(1) if flip else out

        return _Built(run, LAST, LAST, exported if both else exported["forward"], ())

    def _build_bidirectional(self, desc, params, state, layout, where) -> _Built:
        inner = desc["layer"]
        if inner.get("name") != "GRU":
            raise ValueError(
                f"{where}.layer: the PyTorch twin has no bidirectional {inner.get('name')!r}; "
                f"it covers bidirectional GRU"
            )
        return self._build_gru(inner, params, state, layout, where, both=True)


# --------------------------------------------------------------------------------------------
# The benchmark variant
# --------------------------------------------------------------------------------------------


def eager_baseline(make_twin: Callable) -> Callable:
    """A ``baselines`` callable for :func:`benchmarks.networks.run_network`: the variant
    ``TORCH_VARIANT`` runs ``n`` steps of ``torch.optim.SGD`` at ``LEARNING_RATE`` on the twin
    ``make_twin(net, params, state, dtype)`` (float32; it has ``leaves`` and ``loss(x, y)``),
    or is skipped with the reason (torch missing, a layer the twin lacks). Sets PyTorch's
    thread count for the process to :func:`torch_threads`."""

    def baseline(net, params, state, x, y) -> tuple[dict, dict]:
        why = torch_available()
        if why:
            return {}, {TORCH_VARIANT: why}
        import torch

        torch.set_num_threads(torch_threads())
        try:
            model = make_twin(net, params, state, torch.float32)
        except ValueError as e:
            return {}, {TORCH_VARIANT: str(e)}
        opt = torch.optim.SGD(model.leaves, lr=LEARNING_RATE)
        xa = np.array(x)
        xt = torch.as_tensor(xa, dtype=torch.float32 if xa.dtype.kind == "f" else torch.long)
        yt = torch.as_tensor(np.array(y), dtype=torch.long)

        def run(n):
            for _ in range(n):
                opt.zero_grad(set_to_none=True)
                model.loss(xt, yt).backward()
                opt.step()

        run.model = model  # type: ignore[attr-defined]  # the tests read the twin's weights
        return {TORCH_VARIANT: (run, None)}, {}

    return baseline


def _network_twin(net, params, state, dtype) -> TorchNet:
    return TorchNet(jaxbp.describe(net), params, state, dtype=dtype)


_network_baseline = eager_baseline(_network_twin)


def torch_baseline(net, params, state, x, y) -> tuple[dict, dict]:
    """W4-W6's PyTorch eager variant (:func:`eager_baseline` of a :class:`TorchNet`)."""
    return _network_baseline(net, params, state, x, y)
