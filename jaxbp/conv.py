"""Convolution and pooling layers with hand-derived backward passes.

Layouts are channels-last, as in JAX: inputs ``(batch, *spatial, channels)`` or one example
``(*spatial, channels)``; kernels ``(*kernel, in, out)`` (``WIO`` for ``Conv1D``, ``HWIO`` for
``Conv2D``; a PyTorch ``Conv1d`` weight ``(out, in, k)`` is ``W.transpose(2, 1, 0)`` here).

Index notation (1-D; 2-D applies the same to each spatial axis): the input ``x`` is padded by
``(lo, hi)`` zeros to ``xp`` of length ``n + lo + hi``; a kernel of ``k`` taps with dilation
``d`` spans ``k_eff = (k - 1) d + 1`` positions; with stride ``s`` there are
``m = (n + lo + hi - k_eff) // s + 1`` outputs, and the last ``r = n + lo + hi - (m - 1) s -
k_eff`` padded positions are never read (the stride steps over them)::

    y[b, o, co] = bias[co] + sum_{j, ci} xp[b, o s + j d, ci] W[j, ci, co]

The backward passes are convolutions too, in the formulation ``jax.vjp`` of
``lax.conv_general_dilated`` uses, so they cost what ``jax.grad`` costs (see
``benchmarks/conv_layers.py``).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from . import arguments
from .errors import ArgumentError
from .layers import INITIALISERS, InputShapeError, Layer, bound, check_float, default_float
from .registry import register_layer

__all__ = [
    "AvgPool1D",
    "AvgPool2D",
    "Conv1D",
    "Conv2D",
    "Flatten",
    "GlobalAvgPool",
    "MaxPool1D",
    "MaxPool2D",
]

# Dimension numbers per spatial rank: the forward, dx (kernel read with in/out swapped), and
# dW (x's batch axis contracted as the feature axis, dy's batch axis as the kernel's input axis,
# the result laid out as the kernel: spatial, in, out).
_FORWARD_DIMS = {1: ("NWC", "WIO", "NWC"), 2: ("NHWC", "HWIO", "NHWC")}
_DX_DIMS = {1: ("NWC", "WOI", "NWC"), 2: ("NHWC", "HWOI", "NHWC")}
_DW_DIMS = {1: ("CWN", "IWO", "WNC"), 2: ("CHWN", "IHWO", "HWNC")}
_SPATIAL_NAMES = {1: "length", 2: "height, width"}


# --------------------------------------------------------------------------------------------
# Argument checks (at construction)
# --------------------------------------------------------------------------------------------


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


_positive = arguments.positive_int


def _hashable(value):
    """Lists (from JSON, or the caller) as tuples, so a layer's config can key the caches of
    compiled steps: ``padding=[1, 1]`` is stored as ``(1, 1)``."""
    return tuple(_hashable(v) for v in value) if isinstance(value, (list, tuple)) else value


def _sizes(layer: str, what: str, value, rank: int) -> tuple[int, ...]:
    """An int, or a sequence of ``rank`` ints, as a tuple of ``rank`` positive ints."""
    if _is_int(value):
        return (_positive(layer, what, value),) * rank
    if isinstance(value, (tuple, list)) and len(value) == rank:
        return tuple(_positive(layer, what, v) for v in value)
    expected = "a positive integer" if rank == 1 else f"a positive integer or {rank} of them"
    raise ArgumentError(f"{layer} expects {what} to be {expected}, got {value!r}")


def _pad_pair(layer: str, value) -> tuple[int, int]:
    if isinstance(value, (tuple, list)) and len(value) == 2:
        lo, hi = (arguments.non_negative_int(layer, "padding", v) for v in value)
        return lo, hi
    raise ArgumentError(f"{layer} expects a padding pair (lo, hi) of integers, got {value!r}")


def _padding(layer: str, value, rank: int):
    """``"VALID"`` / ``"SAME"`` (any case), or explicit ``((lo, hi), ...)`` per spatial axis."""
    forms = (
        "'VALID', 'SAME', an int or a pair (lo, hi)"
        if rank == 1
        else "'VALID', 'SAME', an int, a pair (per axis) or ((lo, hi), (lo, hi))"
    )
    if isinstance(value, str):
        if value.upper() not in ("VALID", "SAME"):
            raise ArgumentError(f"{layer} padding must be {forms}, got {value!r}")
        return value.upper()
    if _is_int(value):
        pad = arguments.non_negative_int(layer, "padding", value)
        return ((pad, pad),) * rank
    if isinstance(value, (tuple, list)) and len(value) == 2 and rank == 1:
        return (_pad_pair(layer, value),)
    if isinstance(value, (tuple, list)) and len(value) == rank:
        if all(_is_int(v) for v in value):
            return tuple(_pad_pair(layer, (v, v)) for v in value)
        return tuple(_pad_pair(layer, v) for v in value)
    raise ArgumentError(f"{layer} padding must be {forms}, got {value!r}")


def _initialiser(layer: str, w_init) -> Callable:
    w_init = arguments.initialiser(layer, "w_init", w_init, tuple(INITIALISERS))
    return INITIALISERS[w_init] if isinstance(w_init, str) else w_init


# --------------------------------------------------------------------------------------------
# Shapes (at trace time)
# --------------------------------------------------------------------------------------------


def _explicit_padding(padding, sizes, kernel_eff, stride) -> tuple[tuple[int, int], ...]:
    """``(lo, hi)`` per spatial axis; ``"SAME"`` gives ``ceil(n / s)`` outputs, extra zero at hi."""
    if padding == "VALID":
        return ((0, 0),) * len(sizes)
    if padding == "SAME":
        pads = []
        for n, k, s in zip(sizes, kernel_eff, stride, strict=True):
            total = max((-(-n // s) - 1) * s + k - n, 0)
            pads.append((total // 2, total - total // 2))
        return tuple(pads)
    return padding


def _spatial_shape(layer: str, shape, rank: int, what: str) -> tuple[int, ...]:
    """Check the rank and that every dimension (bar a -1 batch) is positive; the spatial sizes."""
    layout = f"(batch, {_SPATIAL_NAMES[rank]}, channels) or ({_SPATIAL_NAMES[rank]}, channels)"
    shape = tuple(shape)
    if len(shape) not in (rank + 1, rank + 2):
        raise InputShapeError(f"{layer} expects {what} of shape {layout}, got shape {shape}")
    if len(shape) == rank + 1 and shape[0] == -1:  # -1 is only ever the batch placeholder
        raise InputShapeError(
            f"{layer} expects {what} of shape {layout}, got shape {shape}: "
            f"a batch whose examples lack an axis"
        )
    dims = shape[1:] if len(shape) == rank + 2 and shape[0] == -1 else shape
    if any(d < 1 for d in dims):
        raise InputShapeError(
            f"{layer} expects {what} of shape {layout} with no empty dimension, got shape {shape}"
        )
    return shape[-rank - 1 : -1]


def _window_message(layer, noun, window, window_eff, padded, rank):
    one = (lambda t: str(t[0])) if rank == 1 else (lambda t: str(tuple(t)))
    dilated = f" (dilated to {one(window_eff)})" if tuple(window) != tuple(window_eff) else ""
    where = "padded input" if noun == "kernel" else "input"
    size = "length" if rank == 1 else "size"
    return f"{layer}: {noun} {one(window)}{dilated} is larger than the {where} {size} {one(padded)}"


def _out_sizes(layer, noun, sizes, pads, window, window_eff, stride, rank):
    padded = [n + lo + hi for n, (lo, hi) in zip(sizes, pads, strict=True)]
    if any(p < k for p, k in zip(padded, window_eff, strict=True)):
        raise InputShapeError(_window_message(layer, noun, window, window_eff, padded, rank))
    return tuple((p - k) // s + 1 for p, k, s in zip(padded, window_eff, stride, strict=True))


# --------------------------------------------------------------------------------------------
# Convolutions
# --------------------------------------------------------------------------------------------


def _check_conv_params(layer, rank, kernel, w, b, x):
    spatial = ", ".join(map(str, kernel))
    if w.ndim != rank + 2 or tuple(w.shape[:rank]) != kernel:
        raise ValueError(
            f"{layer} expects W of shape ({spatial}, in, out), got shape {tuple(w.shape)}"
        )
    if tuple(b.shape) != (w.shape[-1],):
        raise ValueError(
            f"{layer} expects b of shape ({w.shape[-1]},) for W of shape "
            f"{tuple(w.shape)}, got shape {tuple(b.shape)}"
        )
    if x.shape[-1] != w.shape[-2]:
        layout = f"(batch, {_SPATIAL_NAMES[rank]}, channels)"
        raise InputShapeError(
            f"{layer} expects inputs of shape {layout} with {w.shape[-2]} "
            f"channels, got shape {tuple(x.shape)}"
        )


class _ConvSpec(NamedTuple):
    """A convolution layer's checked arguments, as its init/forward/backward use them."""

    layer: str
    rank: int
    out_channels: int
    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    pad: Any  # "VALID", "SAME" or ((lo, hi), ...) per spatial axis
    kernel_eff: tuple[int, ...]
    initialiser: Callable
    dtype_name: str | None


def _check_conv_arguments(
    layer, rank, out_channels, kernel_size, stride, padding, dilation, w_init, dtype
) -> _ConvSpec:
    """The checked arguments."""
    _positive(layer, "out_channels", out_channels)
    kernel = _sizes(layer, "kernel_size", kernel_size, rank)
    strides = _sizes(layer, "stride", stride, rank)
    dilations = _sizes(layer, "dilation", dilation, rank)
    pad = _padding(layer, padding, rank)
    initialiser = _initialiser(layer, w_init)
    dtype_name = arguments.float_dtype(layer, dtype)
    kernel_eff = tuple((k - 1) * d + 1 for k, d in zip(kernel, dilations, strict=True))
    spec = _ConvSpec(
        layer,
        rank,
        out_channels,
        kernel,
        strides,
        dilations,
        pad,
        kernel_eff,
        initialiser,
        dtype_name,
    )
    return spec


def _conv_geometry(spec: _ConvSpec, shape):
    """Spatial sizes, explicit (lo, hi) padding and output sizes for an input shape."""
    sizes = _spatial_shape(spec.layer, shape, spec.rank, "inputs")
    pads = _explicit_padding(spec.pad, sizes, spec.kernel_eff, spec.strides)
    out = _out_sizes(
        spec.layer, "kernel", sizes, pads, spec.kernel, spec.kernel_eff, spec.strides, spec.rank
    )
    return sizes, pads, out


def _conv_init(spec: _ConvSpec, key, input_shape):
    _, _, out = _conv_geometry(spec, input_shape)
    dt = jnp.dtype(spec.dtype_name) if spec.dtype_name else default_float()
    w_shape = (*spec.kernel, int(input_shape[-1]), spec.out_channels)
    w = jnp.asarray(spec.initialiser(key, w_shape, dt), dt)
    out_shape = (*input_shape[: -spec.rank - 1], *out, spec.out_channels)
    return tuple(out_shape), {"W": w, "b": jnp.zeros((spec.out_channels,), dt)}


def _conv_forward(spec: _ConvSpec, params, x):
    rank = spec.rank
    check_float(x, spec.layer)
    _, pads, _ = _conv_geometry(spec, x.shape)
    w, b = params["W"], params["b"]
    _check_conv_params(spec.layer, rank, spec.kernel, w, b, x)
    dt = jnp.result_type(x, w)
    xb = x if x.ndim == rank + 2 else x[None]
    y = (
        lax.conv_general_dilated(
            xb.astype(dt),
            w.astype(dt),
            spec.strides,
            pads,
            rhs_dilation=spec.dilations,
            dimension_numbers=_FORWARD_DIMS[rank],
        )
        + b
    )
    return (y if x.ndim == rank + 2 else y[0]), x


def _conv_backward_pads(spec: _ConvSpec, sizes, pads, out):
    """The padding of the dx and dW convolutions: see :func:`_conv_backward`."""
    per_axis = list(zip(sizes, pads, out, spec.strides, spec.kernel_eff, strict=True))
    unread = [n + lo + hi - (m - 1) * s - k for n, (lo, hi), m, s, k in per_axis]
    dx_pads = [
        (k - 1 - lo, k - 1 - hi + r)
        for k, (lo, hi), r in zip(spec.kernel_eff, pads, unread, strict=True)
    ]
    dw_pads = [(lo, hi - r) for (lo, hi), r in zip(pads, unread, strict=True)]
    return dx_pads, dw_pads


def _conv_backward(spec: _ConvSpec, params, x, dy):
    """Chain rule through ``y[b,o,co] = bias[co] + sum_{j,ci} xp[b, o s + j d, ci] W[j,ci,co]``.

    (1-D indices, per spatial axis in 2-D; ``xp`` is ``x`` padded by ``(lo, hi)``, the
    last ``r`` positions of ``xp`` are never read: see the module docstring.)

    ``dW[j, ci, co] = sum_{b, o} xp[b, o s + j d, ci] dy[b, o, co]``: the correlation of
    the input with ``dy``, ``dy``'s taps spread ``s`` apart (``rhs_dilation=s``), kernel
    taps ``d`` apart (``window_strides=d``), the batch contracted; padding ``(lo, hi - r)``.

    ``dxp[b, i, ci] = sum_{o, j : o s + j d = i} dy[b, o, co] W[j, ci, co]``: the transposed
    convolution, ``dy`` with ``s - 1`` zeros between entries (``lhs_dilation=s``) convolved
    with the flipped kernel, in/out swapped, dilated by ``d``; padding
    ``(k_eff - 1 - lo, k_eff - 1 - hi + r)`` crops ``xp``'s padding off and gives the ``r``
    unread positions zero gradient.

    ``dbias[co] = sum_{b, o} dy[b, o, co]``.
    """
    rank = spec.rank
    w, b = params["W"], params["b"]
    sizes, pads, out = _conv_geometry(spec, x.shape)
    batched = x.ndim == rank + 2
    dt = jnp.result_type(x, w)
    xb, dyb = (x, dy) if batched else (x[None], dy[None])
    xb, dyb = xb.astype(dt), dyb.astype(dt)
    dx_pads, dw_pads = _conv_backward_pads(spec, sizes, pads, out)
    dx = lax.conv_general_dilated(
        dyb,
        lax.rev(w.astype(dt), tuple(range(rank))),
        (1,) * rank,
        dx_pads,
        lhs_dilation=spec.strides,
        rhs_dilation=spec.dilations,
        dimension_numbers=_DX_DIMS[rank],
    )
    dw = lax.conv_general_dilated(
        xb,
        dyb,
        spec.dilations,
        dw_pads,
        rhs_dilation=spec.strides,
        dimension_numbers=_DW_DIMS[rank],
    )
    db = jnp.sum(dyb, axis=tuple(range(rank + 1)))
    dx = dx if batched else dx[0]
    return {"W": dw.astype(w.dtype), "b": db.astype(b.dtype)}, dx.astype(x.dtype)


def _conv(layer, rank, out_channels, kernel_size, stride, padding, dilation, w_init, dtype):
    """The convolution layer of ``rank`` spatial axes; see :func:`Conv1D`."""
    spec = _check_conv_arguments(
        layer, rank, out_channels, kernel_size, stride, padding, dilation, w_init, dtype
    )
    # The arguments as given (a function stays a function: describe() refuses to write it),
    # lists made tuples so the config stays hashable.
    config = (
        ("out_channels", out_channels),
        ("kernel_size", _hashable(kernel_size)),
        ("stride", _hashable(stride)),
        ("padding", _hashable(padding)),
        ("dilation", _hashable(dilation)),
        ("w_init", w_init),
        ("dtype", spec.dtype_name),
    )
    return bound(spec, _conv_init, _conv_forward, _conv_backward, layer, config)


def Conv1D(
    out_channels: int,
    kernel_size: int,
    stride: int = 1,
    padding="VALID",
    dilation: int = 1,
    w_init="he",
    dtype=None,
) -> Layer:
    """1-D convolution (cross-correlation, as everywhere in deep learning) plus bias.

    Inputs ``(batch, length, channels)`` or one example ``(length, channels)``; params
    ``{"W": (kernel_size, in, out), "b": (out,)}``. ``padding`` is ``"VALID"``, ``"SAME"``
    (``ceil(length / stride)`` outputs, the odd zero at the end, as in TensorFlow and
    ``lax``), an int (both sides) or a pair ``(lo, hi)``. ``w_init`` is ``"he"`` (normal,
    ``fan_in = kernel_size * in``), ``"glorot"`` or a function ``(key, shape, dtype)``; the bias
    starts at 0. ``dtype`` (a name such as ``"float32"``) defaults to JAX's float.
    """
    return _conv("Conv1D", 1, out_channels, kernel_size, stride, padding, dilation, w_init, dtype)


def Conv2D(
    out_channels: int, kernel_size, stride=1, padding="VALID", dilation=1, w_init="he", dtype=None
) -> Layer:
    """2-D convolution plus bias, channels last.

    Inputs ``(batch, H, W, C)`` or one example ``(H, W, C)``; params
    ``{"W": (kh, kw, in, out), "b": (out,)}`` (HWIO). ``kernel_size``, ``stride`` and
    ``dilation`` are an int or a pair ``(h, w)``; ``padding`` is ``"VALID"``, ``"SAME"``, an int,
    a pair ``(ph, pw)`` (each symmetric) or ``((lo, hi), (lo, hi))``. See :func:`Conv1D`.
    """
    return _conv("Conv2D", 2, out_channels, kernel_size, stride, padding, dilation, w_init, dtype)


# --------------------------------------------------------------------------------------------
# Pooling
# --------------------------------------------------------------------------------------------


def _window_tap(x, offset, stride, out):
    """``x[b, offset + o * stride, c]`` for every output ``o``: one tap of every window."""
    limit = [o + (m - 1) * s + 1 for o, m, s in zip(offset, out, stride, strict=True)]
    return lax.slice(x, (0, *offset, 0), (x.shape[0], *limit, x.shape[-1]), (1, *stride, 1))


def _window_untap(part, offset, stride, sizes):
    """The transpose of :func:`_window_tap`: ``part`` put back at ``offset + o * stride``."""
    config = [(0, 0, 0)]
    for o, s, n, m in zip(offset, stride, sizes, part.shape[1:-1], strict=True):
        config.append((o, n - o - (m - 1) * s - 1, s - 1))
    config.append((0, 0, 0))
    return lax.pad(part, jnp.zeros((), part.dtype), config)


def _pool(layer, rank, window, stride, forward_taps, backward_taps):
    """A VALID pooling layer; ``forward_taps(taps) -> (y, aux)``,
    ``backward_taps(aux, dy) -> [dtap per window offset]``."""
    win = _sizes(layer, "window", window, rank)
    strides = win if stride is None else _sizes(layer, "stride", stride, rank)
    offsets = list(itertools.product(*(range(w) for w in win)))

    def geometry(shape):
        sizes = _spatial_shape(layer, shape, rank, "inputs")
        no_pad = ((0, 0),) * rank
        return sizes, _out_sizes(layer, "window", sizes, no_pad, win, win, strides, rank)

    def init(key, input_shape):
        _, out = geometry(input_shape)
        return (*input_shape[: -rank - 1], *out, input_shape[-1]), ()

    def forward(params, x):
        check_float(x, layer)
        _, out = geometry(x.shape)
        xb = x if x.ndim == rank + 2 else x[None]
        y, aux = forward_taps([_window_tap(xb, o, strides, out) for o in offsets])
        if x.ndim == rank + 1:
            y, aux = y[0], jax.tree_util.tree_map(lambda a: a[0], aux)
        return y, (x, aux)

    def backward(params, cache, dy):
        x, aux = cache
        sizes, _ = geometry(x.shape)
        batched = x.ndim == rank + 2
        if not batched:
            dy, aux = dy[None], jax.tree_util.tree_map(lambda a: a[None], aux)
        parts = backward_taps(aux, dy)
        dx = sum(_window_untap(p, o, strides, sizes) for p, o in zip(parts, offsets, strict=True))
        return (), (dx if batched else dx[0])

    backward.__doc__ = backward_taps.__doc__
    config = (("window", _hashable(window)), ("stride", _hashable(stride)))
    return Layer(init, forward, backward, layer, config)


def _max_taps(taps):
    # The first maximum of each window, chosen explicitly with strict ">" (not
    # reduce_window(max), whose autodiff picks its own tie): jax.grad of this forward routes
    # ties to the same element as the backward below.
    best, arg = taps[0], jnp.zeros(taps[0].shape, jnp.int32)
    for i, tap in enumerate(taps[1:], 1):
        take = tap > best
        best, arg = jnp.where(take, tap, best), jnp.where(take, i, arg)
    return best, arg


def _max_pool(layer, rank, window, stride):
    count = math.prod(_sizes(layer, "window", window, rank))

    def backward_taps(arg, dy):
        """``dx[b, i, c] = sum_o dy[b, o, c] [i = o s + j*(o)]`` with ``j*(o)`` the first
        argmax of window ``o`` (the element the forward picked): each window's gradient goes to
        its maximum; where windows overlap, an input that is the maximum of several gets their sum.
        """
        zero = jnp.zeros((), dy.dtype)
        return [jnp.where(arg == i, dy, zero) for i in range(count)]

    return _pool(layer, rank, window, stride, _max_taps, backward_taps)


def _avg_pool(layer, rank, window, stride):
    count = math.prod(_sizes(layer, "window", window, rank))

    def forward_taps(taps):
        return sum(taps[1:], taps[0]) / count, ()

    def backward_taps(_, dy):
        """``dx[b, i, c] = sum_{o, j : o s + j = i} dy[b, o, c] / K`` with ``K`` the window
        volume: every element of window ``o`` gets ``1/K`` of its gradient."""
        return [dy / count] * count

    return _pool(layer, rank, window, stride, forward_taps, backward_taps)


def MaxPool1D(window: int, stride: int | None = None) -> Layer:
    """Maximum over windows of ``window`` positions, ``stride`` apart (default: ``window``,
    non-overlapping), no padding. Inputs ``(batch, length, channels)`` or ``(length, channels)``.
    """
    return _max_pool("MaxPool1D", 1, window, stride)


def MaxPool2D(window, stride=None) -> Layer:
    """Maximum over ``window`` (an int or ``(h, w)``) patches, ``stride`` apart (default:
    ``window``), no padding. Inputs ``(batch, H, W, C)`` or ``(H, W, C)``."""
    return _max_pool("MaxPool2D", 2, window, stride)


def AvgPool1D(window: int, stride: int | None = None) -> Layer:
    """Mean over windows of ``window`` positions, ``stride`` apart (default: ``window``)."""
    return _avg_pool("AvgPool1D", 1, window, stride)


def AvgPool2D(window, stride=None) -> Layer:
    """Mean over ``window`` (an int or ``(h, w)``) patches, ``stride`` apart (default: window)."""
    return _avg_pool("AvgPool2D", 2, window, stride)


# --------------------------------------------------------------------------------------------
# Global pooling and flattening
# --------------------------------------------------------------------------------------------


def _example_axes(layer, shape, example_ndim, layout, minimum):
    """How many leading axes are batch axes: 1 (or 0 for a single example)."""
    shape = tuple(shape)
    if example_ndim is None:
        if len(shape) < minimum + 1:
            raise InputShapeError(f"{layer} expects inputs of shape {layout}, got shape {shape}")
        return 1
    if len(shape) not in (example_ndim, example_ndim + 1):
        raise InputShapeError(
            f"{layer} expects inputs of {example_ndim} axes per example "
            f"(or a batch of them), got shape {shape}"
        )
    return len(shape) - example_ndim


def GlobalAvgPool(spatial_dims: int | None = None) -> Layer:
    """Mean over every spatial axis: ``(batch, *spatial, channels) -> (batch, channels)``.

    With ``spatial_dims=None`` the first axis is always the batch. Give ``spatial_dims`` (1 for
    sequences, 2 for images) to also accept one example ``(*spatial, channels) -> (channels,)``,
    as ``jax.vmap`` over examples needs.
    """
    if spatial_dims is not None:
        _positive("GlobalAvgPool", "spatial_dims", spatial_dims)
    layout = "(batch, *spatial, channels) with at least one spatial axis"

    def axes(shape):
        example_ndim = None if spatial_dims is None else spatial_dims + 1
        lead = _example_axes("GlobalAvgPool", shape, example_ndim, layout, minimum=2)
        return tuple(range(lead, len(shape) - 1))

    def init(key, input_shape):
        drop = axes(input_shape)
        return tuple(d for i, d in enumerate(input_shape) if i not in drop), ()

    def forward(params, x):
        check_float(x, "GlobalAvgPool")
        return jnp.mean(x, axis=axes(x.shape)), x

    def backward(params, x, dy):
        """``dx[b, *p, c] = dy[b, c] / P`` for every spatial position ``p``, ``P`` of them."""
        drop = axes(x.shape)
        count = math.prod(x.shape[i] for i in drop)
        return (), jnp.broadcast_to(jnp.expand_dims(dy / count, drop), x.shape).astype(x.dtype)

    return Layer(init, forward, backward, "GlobalAvgPool", (("spatial_dims", spatial_dims),))


def Flatten(example_ndim: int | None = None) -> Layer:
    """Flatten all but the batch axis: ``(batch, d1, d2, ...) -> (batch, d1 * d2 * ...)``.

    With ``example_ndim=None`` the first axis is always the batch. Give ``example_ndim`` (the
    number of axes of one example, 3 for ``(H, W, C)``) to also accept a single example, which
    is then flattened whole, as ``jax.vmap`` over examples needs.
    """
    if example_ndim is not None:
        _positive("Flatten", "example_ndim", example_ndim)

    def out_shape(shape):
        lead = _example_axes("Flatten", shape, example_ndim, "(batch, ...)", minimum=1)
        return (*shape[:lead], math.prod(shape[lead:]))

    def init(key, input_shape):
        return out_shape(input_shape), ()

    def forward(params, x):
        return x.reshape(out_shape(x.shape)), x

    def backward(params, x, dy):
        """``dx = dy`` reshaped back to the input's shape (flattening moves no numbers)."""
        return (), dy.reshape(x.shape)

    return Layer(init, forward, backward, "Flatten", (("example_ndim", example_ndim),))


# Registration: the names descriptions use (jaxbp.model.build).
register_layer("Conv1D", Conv1D)
register_layer("Conv2D", Conv2D)
register_layer("MaxPool1D", MaxPool1D)
register_layer("MaxPool2D", MaxPool2D)
register_layer("AvgPool1D", AvgPool1D)
register_layer("AvgPool2D", AvgPool2D)
register_layer("GlobalAvgPool", GlobalAvgPool)
register_layer("Flatten", Flatten)
