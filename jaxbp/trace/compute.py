"""The numbers of a trace: one backprop step through the network's own layers, in float64.

:func:`walk_network` runs each layer of a ``serial`` network forward, the loss's gradient, then
each layer's hand-written ``backward`` in reverse (what ``serial``'s own backward does), and
keeps every intermediate: each layer's output, ``dE/d(its output)`` and its parameter
gradients. :func:`neuron_stages` groups the layers into what the document calls a layer of
neurons: a ``Dense`` (``in_``, the weighted sums) and the element-wise activations after it
(``out_``). :func:`trace` adds ``jax.grad`` as the check, the SGD update and, optionally, a few
training steps, and returns a :class:`~jaxbp.trace.Trace`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from .config import TraceConfig, parse_config, seed_config
from .network import network_from_config
from .result import LayerTrace, Trace

__all__ = ["NetworkWalk", "Stage", "walk_network", "neuron_stages", "stage_traces", "trace"]


class NetworkWalk(NamedTuple):
    """Every intermediate of one forward and backward pass, one entry per layer of the chain.

    ``outputs[i]`` is layer ``i``'s output, ``output_grads[i]`` is ``dE/d(that output)``,
    ``caches[i]`` what its forward kept, ``grads[i]`` its ``dE/dparams`` (a tuple shaped like
    the network's params); ``value`` is the loss.
    """

    layers: tuple
    outputs: tuple
    output_grads: tuple
    caches: tuple
    grads: tuple
    value: Any


class Stage(NamedTuple):
    """A layer of neurons: the index of its ``Dense`` and of the element-wise layers after it."""

    dense: int
    activations: tuple

    @property
    def last(self) -> int:
        """The layer whose output is the neurons' ``out_``."""
        return self.activations[-1] if self.activations else self.dense


def _chain(net) -> tuple:
    """The layers of a ``serial`` network, or the layer itself."""
    return net.children if net.name == "serial" else (net,)


def walk_network(net, params, loss, x, y) -> NetworkWalk:
    """Forward through each layer of ``net``, the loss, and each layer's ``backward`` in reverse.

    ``params`` are ``net``'s (one entry per layer of a ``serial`` network).
    """
    layers = _chain(net)
    params = tuple(params) if net.name == "serial" else (params,)
    outputs, caches, hidden = [], [], x
    for layer, layer_params in zip(layers, params):
        hidden, cache = layer.forward(layer_params, hidden)
        outputs.append(hidden)
        caches.append(cache)
    output_grad = loss.grad(hidden, y)
    output_grads, grads = [None] * len(layers), [None] * len(layers)
    for i in reversed(range(len(layers))):
        output_grads[i] = output_grad
        grads[i], output_grad = layers[i].backward(params[i], caches[i], output_grad)
    return NetworkWalk(
        layers,
        tuple(outputs),
        tuple(output_grads),
        tuple(caches),
        tuple(grads),
        loss.value(hidden, y),
    )


def _elementwise_names() -> set:
    from ..layers import ACTIVATIONS

    return {make().name for make in ACTIVATIONS.values()}


def _undescribable(index: int, layer, elementwise: set) -> str:
    if layer.name in elementwise:
        return (
            f"trace cannot describe layer {index} ({layer.name}): an activation before any "
            f"Dense layer; expected each activation to follow a Dense layer"
        )
    return (
        f"trace cannot describe layer {index} ({layer.name}) yet: expected a chain of "
        f"Dense layers, each followed by element-wise activations "
        f"({', '.join(sorted(elementwise))})"
    )


def neuron_stages(layers) -> list[Stage]:
    """Group a chain of layers into :class:`Stage` s; a ``ValueError`` names the first layer that
    is neither a ``Dense`` nor an element-wise activation after one."""
    elementwise = _elementwise_names()
    stages = []
    for index, layer in enumerate(layers):
        if layer.name == "Dense":
            stages.append(Stage(index, ()))
        elif layer.name in elementwise and stages and not layer.has_state:
            stages[-1] = stages[-1]._replace(activations=stages[-1].activations + (index,))
        else:
            raise ValueError(_undescribable(index, layer, elementwise))
    return stages


def _activation_derivative(walk: NetworkWalk, stage: Stage):
    """``dout/din`` element by element: the activations' own ``backward`` of a cotangent of ones
    (for several activations in a row, the product of their derivatives)."""
    import jax.numpy as jnp

    derivative = jnp.ones_like(walk.outputs[stage.last])
    for i in reversed(stage.activations):
        _, derivative = walk.layers[i].backward((), walk.caches[i], derivative)
    return derivative


class ParamTrees(NamedTuple):
    """The parameter trees a trace reports, each shaped like the network's params."""

    manual_grads: tuple
    autodiff_grads: tuple
    after_one_step: tuple
    after_training: tuple


def _as_numpy(array) -> np.ndarray:
    return np.asarray(array, np.float64)


def stage_traces(walk: NetworkWalk, trees: ParamTrees) -> tuple:
    """One :class:`~jaxbp.trace.LayerTrace` per stage of the walked network."""
    traces = []
    for stage in neuron_stages(walk.layers):
        dense = stage.dense
        traces.append(
            LayerTrace(
                net=_as_numpy(walk.outputs[dense]),
                out=_as_numpy(walk.outputs[stage.last]),
                dE_dout=_as_numpy(walk.output_grads[stage.last]),
                dout_dnet=_as_numpy(_activation_derivative(walk, stage)),
                delta=_as_numpy(walk.output_grads[dense]),
                grad_weights=_as_numpy(trees.manual_grads[dense]["W"]),
                grad_bias=_as_numpy(trees.manual_grads[dense]["b"]),
                autodiff_weights=_as_numpy(trees.autodiff_grads[dense]["W"]),
                autodiff_bias=_as_numpy(trees.autodiff_grads[dense]["b"]),
                step1_weights=_as_numpy(trees.after_one_step[dense]["W"]),
                step1_bias=_as_numpy(trees.after_one_step[dense]["b"]),
                final_weights=_as_numpy(trees.after_training[dense]["W"]),
                final_bias=_as_numpy(trees.after_training[dense]["b"]),
            )
        )
    return tuple(traces)


# --------------------------------------------------------------------------------------------
# The step, the check, the training
# --------------------------------------------------------------------------------------------


def _max_abs_difference(tree_a, tree_b) -> float:
    import jax
    import jax.numpy as jnp

    return max(
        float(jnp.max(jnp.abs(a - b)))
        for a, b in zip(jax.tree_util.tree_leaves(tree_a), jax.tree_util.tree_leaves(tree_b))
    )


def _optimizer(learning_rate: float, freeze_bias: bool):
    from ..train import biases, freeze, sgd

    optimizer = sgd(learning_rate)
    return freeze(optimizer, biases) if freeze_bias else optimizer


def _one_step(optimizer, params, grads):
    import optax

    updates, _ = optimizer.update(grads, optimizer.init(params), params)
    return optax.apply_updates(params, updates)


class Training(NamedTuple):
    params: tuple
    history: np.ndarray  # the loss before each step, then after the last
    rel_errors: np.ndarray  # per step, the worst leaf's relative error, manual vs jax.grad


def _train(net, loss, optimizer, params, x, y, steps: int) -> Training:
    """``steps`` full-batch steps of :func:`jaxbp.fit`, each checked against ``jax.grad``."""
    from ..backprop import loss_fn
    from ..train import fit, init_train_state

    result = fit(
        net,
        loss,
        optimizer,
        init_train_state(net, optimizer, params),
        x,
        y,
        steps=steps,
        check="report",
    )
    final = result.state.params
    after = loss_fn(net, loss)(final, x, y)
    return Training(
        final,
        np.append(np.asarray(result.history.loss), float(after)),
        np.asarray(result.history.rel_error),
    )


def _trace_float64(config: TraceConfig, steps: int | None, freeze_bias: bool) -> Trace:
    import jax.numpy as jnp

    from ..backprop import autodiff
    from ..losses import get_loss

    net, params = network_from_config(config)
    loss = get_loss(config.loss)
    if loss.terms is None:  # every built-in loss has terms; a registered one may not
        raise ValueError(
            f"trace needs a loss that splits into per-output terms, {config.loss!r} does not"
        )
    x = jnp.asarray(config.inputs, jnp.float64)
    y = jnp.asarray(config.targets, jnp.float64)
    walk = walk_network(net, params, loss, x, y)
    _, autodiff_grads = autodiff(net, loss, params, x, y)
    optimizer = _optimizer(config.learning_rate, freeze_bias)
    after_one_step = _one_step(optimizer, params, walk.grads)
    training = _train(net, loss, optimizer, params, x, y, steps) if steps is not None else None
    trees = ParamTrees(
        walk.grads, autodiff_grads, after_one_step, training.params if training else after_one_step
    )
    errors = _as_numpy(loss.terms(walk.outputs[-1], y))
    return Trace(
        config,
        stage_traces(walk, trees),
        errors,
        float(walk.value),
        _max_abs_difference(walk.grads, autodiff_grads),
        bool(freeze_bias),
        steps,
        training.history if training else None,
        training.rel_errors if training else None,
    )


def trace(
    config: TraceConfig | dict | None = None, *, steps: int | None = None, freeze_bias: bool = False
) -> Trace:
    """Trace one backprop step of ``config`` (default: the seed's example) in float64.

    The gradients are jaxbp's manual chain rule (each layer's ``backward``), compared with
    ``jax.grad``. The update is ``jaxbp.sgd(learning_rate)`` (with ``freeze_bias``, wrapped in
    ``jaxbp.freeze(..., jaxbp.biases)`` so biases stay, as in the seed's code). With ``steps``,
    trains that many full-batch steps with :func:`jaxbp.fit` (each step checked against
    ``jax.grad``) and records the loss before each step and after the last.
    """
    import jax

    if config is None:
        config = seed_config()
    if not isinstance(config, TraceConfig):
        config = parse_config(config)
    if steps is not None and (not isinstance(steps, int) or isinstance(steps, bool) or steps < 1):
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    # The worked numbers are float64 whatever the caller's global setting.
    with jax.enable_x64(True):
        return _trace_float64(config, steps, freeze_bias)
