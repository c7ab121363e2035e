"""Gradients of a network's loss two ways: the manual chain rule and ``jax.grad``.

Both return ``(value, grads)`` with ``grads`` shaped exactly like ``params``; both work under
``jit`` and ``vmap`` (per-example gradients are ``jax.vmap`` over single examples).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from ._trees import tree_difference
from .errors import ArgumentError
from .layers import InputShapeError, Layer, apply, init_state, serial
from .losses import Loss, get_loss

__all__ = [
    "forward",
    "backprop",
    "autodiff",
    "backprop_and_autodiff",
    "loss_fn",
    "check_inputs",
    "check_params",
]


def check_inputs(x) -> None:
    """Trace-time checks on a batch of inputs: floating point or integer ids, not empty."""
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):  # a list: result_type would fail
        raise ArgumentError(
            f"inputs must be an array of shape (batch, features), got "
            f"{type(x).__name__} (convert with jnp.asarray(x))"
        )
    dtype = jnp.result_type(x)
    # Integer inputs are token ids for an Embedding; a layer that needs floats says so itself.
    if not (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)):
        raise ArgumentError(
            f"inputs must be floating point (or integer token ids), got dtype "
            f"{dtype} (convert with x.astype(jnp.float32))"
        )
    shape = jnp.shape(x)
    if len(shape) == 0:
        raise ValueError("inputs must have shape (features,) or (batch, features), got a scalar")
    if 0 in shape:
        raise ValueError(
            f"empty batch: inputs must have at least one example and one feature, "
            f"got shape {tuple(shape)}"
        )


@functools.lru_cache(maxsize=256)
def _expected_params(net: Layer, example_shape: tuple):
    _, shapes = jax.eval_shape(lambda: net.init(jax.random.key(0), example_shape))
    return jax.tree_util.tree_flatten_with_path(shapes)


def check_params(net: Layer, params, input_shape) -> None:
    """Trace-time check that ``params`` has the tree and shapes ``net.init`` would make."""
    if not isinstance(net, Layer):
        raise ArgumentError(f"net must be a jaxbp Layer (such as jaxbp.serial(...)), got {net!r}")
    shape = tuple(input_shape)
    example = (1, *shape[1:]) if len(shape) >= 2 else shape
    try:
        expected, expected_def = _expected_params(net, example)
    except TypeError:  # an unhashable custom layer: skip the cache
        _, shapes = jax.eval_shape(lambda: net.init(jax.random.key(0), example))
        expected, expected_def = jax.tree_util.tree_flatten_with_path(shapes)
    got, got_def = jax.tree_util.tree_flatten_with_path(params)
    if got_def != expected_def:
        expected_tree = jax.tree_util.tree_unflatten(expected_def, [w for _, w in expected])
        raise ValueError(
            f"params do not match the network: "
            f"{tree_difference(expected_tree, params)}; expected the tree that "
            f"net.init(key, input_shape) makes"
        )
    for (path, want), (_, leaf) in zip(expected, got):
        if tuple(jnp.shape(leaf)) != tuple(want.shape):
            _raise_forward_shape_error(net, params, shape)
            raise ValueError(
                f"params do not match the network: leaf "
                f"{jax.tree_util.keystr(path)} expected shape {tuple(want.shape)}, "
                f"got shape {tuple(jnp.shape(leaf))}"
            )
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
            raise ArgumentError(
                f"params must be floating point: leaf {jax.tree_util.keystr(path)} "
                f"got dtype {jnp.result_type(leaf)}"
            )


def _raise_forward_shape_error(net: Layer, params, input_shape) -> None:
    """Raise the forward pass's own shape error, if it has one.

    Params that do not fit the inputs mismatch either way; when the first layer with
    parameters rejects the inputs, its message says which layer, what width it expects and
    what shape it got (``layer 0 (Dense): Dense expects inputs of width 2, got shape (8, 5)``),
    which reads better than a parameter shape derived from the wrong input.
    """
    x = jax.ShapeDtypeStruct(tuple(input_shape), jax.dtypes.canonicalize_dtype(jnp.float64))
    state = init_state(net, input_shape)
    if (
        net.name == "serial"
        and isinstance(params, (tuple, list))
        and len(params) == len(net.children)
    ):
        # Only up to the first layer with parameters: that is where the inputs meet the params.
        # A mismatch further in is the params' own inconsistency, which the params message names.
        k = next((i for i, p in enumerate(params) if jax.tree_util.tree_leaves(p)), len(params) - 1)
        net, params = serial(*net.children[: k + 1]), tuple(params[: k + 1])
    try:
        jax.eval_shape(lambda p, xx: apply(net, p, state, xx, key=jax.random.key(0))[0], params, x)
    except InputShapeError as e:
        raise InputShapeError(str(e)) from None
    except Exception:  # the params' own inconsistency (a broadcast error): the params message
        pass


def forward(net: Layer, params, x, *, state=None, key=None, train: bool = True) -> jax.Array:
    """The network's output (the cache and the new state are dropped)."""
    if state is None and key is None and train:
        return net.forward(params, x)[0]
    state = init_state(net, jnp.shape(x)) if state is None else state
    return apply(net, params, state, x, key=key, train=train)[0]


def loss_fn(net: Layer, loss):
    """The pure function ``(params, x, y) -> loss value`` that ``jax.grad`` differentiates."""
    loss = get_loss(loss)

    def value(params, x, y):
        return loss.value(net.forward(params, x)[0], y)

    return value


def _prepare(net, loss, params, x, state, validate) -> tuple[Loss, Any]:
    """``(loss, the state to start from)``, the loss looked up and the inputs and params
    checked first (``validate``); without ``state``, the network's initial state."""
    loss = get_loss(loss)
    if validate:
        check_inputs(x)
        check_params(net, params, jnp.shape(x))
    return loss, init_state(net, jnp.shape(x)) if state is None else state


def _returned(value, grads, new_state, state_given):
    return (value, grads, new_state) if state_given else (value, grads)


def _check_wrt_inputs(x, wrt_inputs: bool) -> None:
    if wrt_inputs and not jnp.issubdtype(jnp.result_type(x), jnp.inexact):
        raise ValueError(
            f"wrt_inputs=True: the inputs are integer token ids (dtype "
            f"{jnp.result_type(x)}), which have no gradient; pass wrt_inputs=False"
        )


def backprop(
    net: Layer,
    loss: Loss | str,
    params,
    x,
    y,
    *,
    state=None,
    key=None,
    train: bool = True,
    validate: bool = True,
    wrt_inputs: bool = False,
):
    """Manual chain rule: forward with caches, ``dE/dout`` from the loss, backward.

    Returns ``(loss value, grads)``; with ``state`` given (a network with BatchNorm),
    ``(loss value, grads, new state)``. ``key`` seeds the randomness (Dropout's masks);
    ``train=False`` runs the evaluation forward (running statistics, no dropout).
    ``wrt_inputs=True`` makes ``grads`` the pair ``(dE/dparams, dE/dx)``, as
    ``jax.grad(f, argnums=(0, 1))`` gives it (floating-point inputs only).
    """
    loss, start = _prepare(net, loss, params, x, state, validate)
    _check_wrt_inputs(x, wrt_inputs)
    out, cache, new_state = apply(net, params, start, x, key=key, train=train)
    value = loss.value(out, y)
    grads, dx = net.backward(params, cache, loss.grad(out, y))
    grads = (grads, dx) if wrt_inputs else grads
    return _returned(value, grads, new_state, state is not None)


def autodiff(
    net: Layer,
    loss: Loss | str,
    params,
    x,
    y,
    *,
    state=None,
    key=None,
    train: bool = True,
    validate: bool = True,
    wrt_inputs: bool = False,
):
    """``jax.value_and_grad`` of the same pure loss, with the same state and key as
    :func:`backprop` (so the same batch statistics and dropout masks). Returns what it does."""
    loss, start = _prepare(net, loss, params, x, state, validate)
    _check_wrt_inputs(x, wrt_inputs)

    def value(p, xx):
        out, _, new_state = apply(net, p, start, xx, key=key, train=train)
        return loss.value(out, y), new_state

    argnums = (0, 1) if wrt_inputs else 0
    (value_, new_state), grads = jax.value_and_grad(value, argnums, has_aux=True)(params, x)
    return _returned(value_, grads, new_state, state is not None)


def backprop_and_autodiff(
    net: Layer,
    loss: Loss | str,
    params,
    x,
    y,
    *,
    state=None,
    key=None,
    train: bool = True,
    validate: bool = True,
    wrt_inputs: bool = False,
):
    """:func:`backprop` and :func:`autodiff` from one forward pass: what the verified step
    compares.

    ``jax.vjp`` of the forward carries the manual caches out as an auxiliary output, so the
    manual backward reads the very activations autodiff differentiates through; the network
    runs forward once instead of twice (``python -m benchmarks.one_forward``: 13-20% less time
    for the GRUs and the GPT; none for convolutions, whose twin forwards XLA already merges).
    Returns ``(loss value, manual grads, jax.grad's grads)``, with ``state`` given also the new
    state; ``wrt_inputs=True`` makes both gradients pairs ``(dE/dparams, dE/dx)``.
    """
    loss, start = _prepare(net, loss, params, x, state, validate)
    _check_wrt_inputs(x, wrt_inputs)

    def value(p, xx):
        out, cache, new_state = apply(net, p, start, xx, key=key, train=train)
        return loss.value(out, y), (out, cache, new_state)

    if wrt_inputs:
        value_, vjp, (out, cache, new_state) = jax.vjp(value, params, x, has_aux=True)
        grads_ad = vjp(jnp.ones_like(value_))
    else:
        value_, vjp, (out, cache, new_state) = jax.vjp(lambda p: value(p, x), params, has_aux=True)
        (grads_ad,) = vjp(jnp.ones_like(value_))
    grads, dx = net.backward(params, cache, loss.grad(out, y))
    both = (value_, (grads, dx) if wrt_inputs else grads, grads_ad)
    return (*both, new_state) if state is not None else both
