"""Recurrent layers (GRU, LSTM) with backpropagation through time written out by hand.

Sequences are ``(batch, time, features)`` or a single example ``(time, features)``. Parameters
follow PyTorch's layout transposed, so weights port from ``torch.nn.GRU`` / ``torch.nn.LSTM`` by
a transpose (:func:`from_torch_state_dict`)::

    Wi: (in, G*H)   Wh: (H, G*H)   bi: (G*H,)   bh: (G*H,)      G = 3 (GRU: r, z, n)
                                                                G = 4 (LSTM: i, f, g, o)

The forward computes the input projections ``x @ Wi + bi`` of every step in one matmul, then
runs a ``lax.scan`` over time for the recurrence; the state starts at zero. ``reverse=True``
reads the sequence from its last step to its first (PyTorch's reverse direction); outputs are
always in the original time order.

The backward is backpropagation through time: a reverse ``lax.scan`` carrying ``dE/dh`` (and
``dE/dc`` for the LSTM) from step ``t + 1`` to step ``t``, which emits the gradient of each
step's gate pre-activations ``da_t``. Everything that does not depend on the recurrence is done
after the scan with one matmul each, over all steps at once::

    dWh = sum_t h_{t-1}^T @ dah_t      dbh = sum_t dah_t
    dWi = sum_t x_t^T @ dax_t          dbi = sum_t dax_t        dx_t = dax_t @ Wi^T

where ``dax_t`` / ``dah_t`` are the gradients of the input / hidden projections (equal for the
LSTM; for the GRU they differ in the ``n`` gate, see :func:`GRU`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from . import arguments
from .layers import InputShapeError, Layer, check_float
from .registry import register_layer

__all__ = ["GRU", "LSTM", "bidirectional", "from_torch_state_dict"]

_SEQUENCE_SHAPE = "(batch, time, features) or (time, features)"


# --------------------------------------------------------------------------------------------
# Argument and input checks
# --------------------------------------------------------------------------------------------


def _check_arguments(name, hidden, return_sequences, reverse):
    arguments.positive_int(name, "hidden size", hidden)
    arguments.flag(name, "return_sequences", return_sequences)
    arguments.flag(name, "reverse", reverse)


def _check_sequence(name, x, in_dim):
    """``x`` as a batch ``(batch, time, in_dim)``; raises at trace time on a wrong shape."""
    check_float(x, name)
    shape = tuple(x.shape)
    if x.ndim not in (2, 3):
        raise InputShapeError(
            f"{name} expects inputs of shape {_SEQUENCE_SHAPE}, got shape {shape}"
        )
    if shape[-1] != in_dim:
        raise InputShapeError(
            f"{name} expects inputs of shape {_SEQUENCE_SHAPE} with {in_dim} "
            f"features, got shape {shape}"
        )
    if shape[-2] == 0:
        raise InputShapeError(f"{name} expects at least one time step, got shape {shape}")
    return x if x.ndim == 3 else x[None]


# --------------------------------------------------------------------------------------------
# Time-major helpers: the scans run over axis 0, in processing order
# --------------------------------------------------------------------------------------------


def _to_steps(a, reverse):
    """``(batch, time, ...)`` -> ``(time, batch, ...)`` in the order the recurrence reads it."""
    a = jnp.swapaxes(a, 0, 1)
    return a[::-1] if reverse else a


def _from_steps(a, reverse):
    """Inverse of :func:`_to_steps`."""
    return jnp.swapaxes(a[::-1] if reverse else a, 0, 1)


def _sigmoid(a):
    return jax.nn.sigmoid(a)


def _previous(states, initial):
    """``[s_{-1}, s_0, ..., s_{T-2}]``: the state each step started from."""
    return jnp.concatenate([initial[None], states[:-1]], axis=0)


# --------------------------------------------------------------------------------------------
# The cells: one step forward, one step backward
# --------------------------------------------------------------------------------------------


class _Cell(NamedTuple):
    """What distinguishes a GRU from an LSTM; the scans and parameter gradients are shared.

    ``scan(params, xp, state0) -> (hs, steps)``: the forward recurrence over projected inputs
    ``xp`` (time-major), returning every hidden state and what the backward needs per step.
    ``scan_backward(params, steps, state0, dys, dh_last) -> (dax, dah)``: BPTT, returning the
    gradients of the input and hidden projections of every step.
    """

    gates: int
    scan: Callable
    scan_backward: Callable


def _gru_scan(params, xp, h0):
    wh, bh = params["Wh"], params["bh"]

    def step(h, xp_t):
        xr, xz, xn = jnp.split(xp_t, 3, axis=-1)
        hr, hz, hn = jnp.split(h @ wh + bh, 3, axis=-1)
        r = _sigmoid(xr + hr)
        z = _sigmoid(xz + hz)
        n = jnp.tanh(xn + r * hn)
        h_new = (1 - z) * n + z * h
        return h_new, (h_new, r, z, n, hn)

    _, (hs, r, z, n, hn) = jax.lax.scan(step, h0, xp)
    return hs, (hs, r, z, n, hn)


def _gru_scan_backward(params, steps, h0, dys, dh_last):
    wh_t = params["Wh"].T
    hs, r, z, n, hn = steps
    h_prev = _previous(hs, h0)

    def step(dh_next, xs):
        dy_t, h_p, r_t, z_t, n_t, hn_t = xs
        dh = dh_next if dy_t is None else dh_next + dy_t
        dan = dh * (1 - z_t) * (1 - n_t * n_t)
        daz = dh * (h_p - n_t) * z_t * (1 - z_t)
        dar = dan * hn_t * r_t * (1 - r_t)
        dah = jnp.concatenate([dar, daz, dan * r_t], axis=-1)
        return dh * z_t + dah @ wh_t, (dah, dan)

    _, (dah, dan) = jax.lax.scan(step, dh_last, (dys, h_prev, r, z, n, hn), reverse=True)
    hidden = dan.shape[-1]
    dax = jnp.concatenate([dah[..., : 2 * hidden], dan], axis=-1)
    return dax, dah


def _lstm_scan(params, xp, h0):
    wh = params["Wh"]

    def step(carry, xp_t):
        h, c = carry
        ai, af, ag, ao = jnp.split(xp_t + h @ wh, 4, axis=-1)
        i, f, g, o = _sigmoid(ai), _sigmoid(af), jnp.tanh(ag), _sigmoid(ao)
        c_new = f * c + i * g
        tc = jnp.tanh(c_new)
        h_new = o * tc
        return (h_new, c_new), (h_new, c_new, i, f, g, o, tc)

    _, steps = jax.lax.scan(step, (h0, h0), xp)
    return steps[0], steps


def _lstm_scan_backward(params, steps, h0, dys, dh_last):
    wh_t = params["Wh"].T
    _, cs, i, f, g, o, tc = steps
    c_prev = _previous(cs, h0)

    def step(carry, xs):
        dh_next, dc_next = carry
        dy_t, c_p, i_t, f_t, g_t, o_t, tc_t = xs
        dh = dh_next if dy_t is None else dh_next + dy_t
        dc = dc_next + dh * o_t * (1 - tc_t * tc_t)
        da = jnp.concatenate(
            [
                dc * g_t * i_t * (1 - i_t),
                dc * c_p * f_t * (1 - f_t),
                dc * i_t * (1 - g_t * g_t),
                dh * tc_t * o_t * (1 - o_t),
            ],
            axis=-1,
        )
        return (da @ wh_t, dc * f_t), da

    carry0 = (dh_last, jnp.zeros_like(dh_last))
    _, da = jax.lax.scan(step, carry0, (dys, c_prev, i, f, g, o, tc), reverse=True)
    return da, da


_GRU_CELL = _Cell(3, _gru_scan, _gru_scan_backward)
_LSTM_CELL = _Cell(4, _lstm_scan, _lstm_scan_backward)


# --------------------------------------------------------------------------------------------
# The layer, shared by GRU and LSTM
# --------------------------------------------------------------------------------------------


def _init_params(key, name, gates, hidden, input_shape, dtype):
    shape = tuple(input_shape)
    if len(shape) not in (2, 3):
        raise InputShapeError(
            f"{name} expects inputs of shape {_SEQUENCE_SHAPE}, got shape {shape}"
        )
    if len(shape) == 2 and shape[0] == -1:  # -1 is only ever the batch placeholder
        raise InputShapeError(
            f"{name} expects inputs of shape {_SEQUENCE_SHAPE}, got shape {shape}: "
            f"a batch of vectors, without a time or features axis"
        )
    in_dim = int(shape[-1])
    if in_dim < 1:
        raise InputShapeError(f"{name} expects at least one input feature, got shape {shape}")
    dt = dtype or jax.dtypes.canonicalize_dtype(jnp.float64)
    # PyTorch's initialisation: every weight and bias uniform in +-1/sqrt(hidden).
    bound = 1.0 / math.sqrt(hidden)
    shapes = {
        "Wi": (in_dim, gates * hidden),
        "Wh": (hidden, gates * hidden),
        "bi": (gates * hidden,),
        "bh": (gates * hidden,),
    }
    keys = jax.random.split(key, len(shapes))
    return {
        leaf: jax.random.uniform(k, s, dt, -bound, bound)
        for k, (leaf, s) in zip(keys, shapes.items(), strict=True)
    }


def _recurrent(name, cell, hidden, return_sequences, reverse, dtype, factory) -> Layer:
    _check_arguments(name, hidden, return_sequences, reverse)
    dtype_name = arguments.float_dtype(name, dtype)
    return_sequences, reverse = bool(return_sequences), bool(reverse)

    def init(key, input_shape):
        params = _init_params(key, name, cell.gates, hidden, input_shape, dtype_name)
        shape = tuple(input_shape)
        out = (*shape[:-1], hidden) if return_sequences else (*shape[:-2], hidden)
        return out, params

    def forward(params, x):
        wi = params["Wi"]
        xs = _to_steps(_check_sequence(name, x, wi.shape[0]), reverse)
        # Folding bh into the projection is free for the LSTM; the GRU's n gate needs
        # h @ Wh_n + bh_n on its own (it is multiplied by r), so its bh stays in the step.
        bias = params["bi"] + params["bh"] if cell is _LSTM_CELL else params["bi"]
        xp = xs @ wi + bias
        h0 = jnp.zeros((xp.shape[1], hidden), xp.dtype)
        hs, steps = cell.scan(params, xp, h0)
        y = _from_steps(hs, reverse) if return_sequences else hs[-1]
        if x.ndim == 2:
            y = y[0]
        return y, (xs, steps)

    def backward(params, cache, dy):
        xs, steps = cache
        single = dy.ndim == (2 if return_sequences else 1)
        dy = dy[None] if single else dy
        if return_sequences:
            dys, dh_last = _to_steps(dy, reverse), jnp.zeros_like(dy[:, 0])
        else:
            dys, dh_last = None, dy
        h0 = jnp.zeros_like(dh_last)
        dax, dah = cell.scan_backward(params, steps, h0, dys, dh_last)
        gates = dax.shape[-1]
        h_prev = _previous(steps[0], h0).reshape(-1, hidden)
        dah2, dax2 = dah.reshape(-1, gates), dax.reshape(-1, gates)
        grads = {
            "Wi": xs.reshape(-1, xs.shape[-1]).T @ dax2,
            "Wh": h_prev.T @ dah2,
            "bi": jnp.sum(dax2, axis=0),
            "bh": jnp.sum(dah2, axis=0),
        }
        dx = _from_steps(dax @ params["Wi"].T, reverse)
        return grads, (dx[0] if single else dx)

    backward.__doc__ = factory.__doc__
    config = (
        ("hidden", hidden),
        ("return_sequences", return_sequences),
        ("reverse", reverse),
        ("dtype", dtype_name),
    )
    return Layer(init, forward, backward, name, config)


def GRU(hidden: int, return_sequences: bool = True, reverse: bool = False, dtype=None) -> Layer:
    """Gated recurrent unit, PyTorch's equations and gate order (r, z, n), zero initial state.

    Forward, per step, with ``ax = x_t @ Wi + bi`` and ``ah = h_{t-1} @ Wh + bh`` split into
    their ``r, z, n`` thirds::

        r = sigmoid(ax_r + ah_r)      z = sigmoid(ax_z + ah_z)
        n = tanh(ax_n + r * ah_n)     h_t = (1 - z) * n + z * h_{t-1}

    ``return_sequences=True`` returns every ``h_t``, ``(batch, time, H)`` in the original time
    order; ``False`` returns the final state ``(batch, H)`` (for ``reverse=True`` the state
    after reading the whole reversed sequence, at original time 0: PyTorch's ``h_n``).

    Backward (BPTT), steps in reverse processing order, ``dh_T = 0``::

        dh    = dy_t + dh_next           (dh_next: what step t+1 sent back)
        dan   = dh * (1 - z) * (1 - n^2)
        daz   = dh * (h_{t-1} - n) * z * (1 - z)
        dar   = dan * ah_n * r * (1 - r)
        dah   = [dar, daz, dan * r]      dax = [dar, daz, dan]
        dh_{t-1} = dh * z + dah @ Wh^T

    then, after the scan: ``dWh = sum_t h_{t-1}^T dah_t``, ``dbh = sum_t dah_t``,
    ``dWi = sum_t x_t^T dax_t``, ``dbi = sum_t dax_t``, ``dx_t = dax_t @ Wi^T``. With
    ``return_sequences=False`` only the final step has a ``dy``.
    """
    return _recurrent("GRU", _GRU_CELL, hidden, return_sequences, reverse, dtype, GRU)


def LSTM(hidden: int, return_sequences: bool = True, reverse: bool = False, dtype=None) -> Layer:
    """Long short-term memory, PyTorch's equations and gate order (i, f, g, o), zero state.

    Forward, per step, with ``a = x_t @ Wi + bi + h_{t-1} @ Wh + bh`` split into quarters::

        i = sigmoid(a_i)   f = sigmoid(a_f)   g = tanh(a_g)   o = sigmoid(a_o)
        c_t = f * c_{t-1} + i * g             h_t = o * tanh(c_t)

    ``return_sequences`` as for :func:`GRU` (the final state returned is ``h``, not ``c``).

    Backward (BPTT), steps in reverse processing order, ``dh_T = dc_T = 0``::

        dh  = dy_t + dh_next
        dc  = dc_next + dh * o * (1 - tanh(c_t)^2)
        da  = [dc * g * i (1 - i),  dc * c_{t-1} * f (1 - f),
               dc * i * (1 - g^2),  dh * tanh(c_t) * o (1 - o)]
        dh_{t-1} = da @ Wh^T          dc_{t-1} = dc * f

    then, after the scan: ``dWh = sum_t h_{t-1}^T da_t``, ``dWi = sum_t x_t^T da_t``,
    ``dbi = dbh = sum_t da_t``, ``dx_t = da_t @ Wi^T``.
    """
    return _recurrent("LSTM", _LSTM_CELL, hidden, return_sequences, reverse, dtype, LSTM)


_RECURRENT = {"GRU": GRU, "LSTM": LSTM}


# --------------------------------------------------------------------------------------------
# Bidirectional
# --------------------------------------------------------------------------------------------


def bidirectional(layer: Layer) -> Layer:
    """A forward and a reversed copy of a GRU/LSTM, outputs concatenated on the feature axis.

    ``layer`` must be built with ``reverse=False``; its reversed twin shares every other
    argument. Params are ``{"forward": ..., "backward": ...}``. The output is
    ``[y_forward, y_backward]`` on the last axis: ``(batch, time, 2H)``, or with
    ``return_sequences=False`` the two final states ``(batch, 2H)`` (PyTorch's ``h_n[0]`` and
    ``h_n[1]``, concatenated).
    """
    if not isinstance(layer, Layer) or layer.name not in _RECURRENT:
        got = layer.name if isinstance(layer, Layer) else type(layer).__name__
        raise ValueError(f"bidirectional expects a GRU or LSTM layer, got {got}")
    config = dict(layer.config)
    if config["reverse"]:
        raise ValueError(
            "bidirectional expects a layer built with reverse=False (it adds the "
            "reversed copy itself), got reverse=True"
        )
    ahead = layer
    behind = _RECURRENT[layer.name](**{**config, "reverse": True})
    hidden = config["hidden"]

    def init(key, input_shape):
        k_forward, k_backward = jax.random.split(key)
        shape, p_forward = ahead.init(k_forward, input_shape)
        _, p_backward = behind.init(k_backward, input_shape)
        return (*shape[:-1], 2 * hidden), {"forward": p_forward, "backward": p_backward}

    def forward(params, x):
        y_forward, c_forward = ahead.forward(params["forward"], x)
        y_backward, c_backward = behind.forward(params["backward"], x)
        return jnp.concatenate([y_forward, y_backward], axis=-1), (c_forward, c_backward)

    def backward(params, cache, dy):
        """Split ``dy = [dy_forward, dy_backward]`` on the last axis, run each direction's
        backward on its half; ``dx = dx_forward + dx_backward`` (both read the same ``x``)."""
        g_forward, dx_forward = ahead.backward(params["forward"], cache[0], dy[..., :hidden])
        g_backward, dx_backward = behind.backward(params["backward"], cache[1], dy[..., hidden:])
        return {"forward": g_forward, "backward": g_backward}, dx_forward + dx_backward

    return Layer(init, forward, backward, "bidirectional", (("layer", layer),))


_bidirectional = bidirectional  # from_torch_state_dict's keyword of the same name hides it


# --------------------------------------------------------------------------------------------
# Porting PyTorch weights
# --------------------------------------------------------------------------------------------


def _to_numpy(tensor) -> np.ndarray:
    if hasattr(tensor, "detach"):  # a torch.Tensor, without importing torch
        tensor = tensor.detach().cpu().numpy()
    return np.asarray(tensor)


def _torch_direction(kind, state_dict, prefix, suffix, gates, dtype):
    """``{"Wi", "Wh", "bi", "bh"}`` for one direction of one layer, transposed to jaxbp's layout."""
    names = {
        leaf: f"{prefix}{torch_name}{suffix}"
        for leaf, torch_name in (
            ("Wi", "weight_ih"),
            ("Wh", "weight_hh"),
            ("bi", "bias_ih"),
            ("bh", "bias_hh"),
        )
    }
    for leaf in ("Wi", "Wh"):
        if names[leaf] not in state_dict:
            raise ValueError(
                f"{kind} state_dict: missing {names[leaf]}; got keys {sorted(state_dict)}"
            )
    arrays = {leaf: _to_numpy(state_dict[key]) for leaf, key in names.items() if key in state_dict}
    w_ih = arrays["Wi"]
    if w_ih.ndim != 2 or w_ih.shape[0] % gates or w_ih.shape[0] == 0:
        raise ValueError(
            f"{kind} state_dict: {names['Wi']} has shape {w_ih.shape}, expected "
            f"({gates} * hidden, in)"
        )
    hidden = w_ih.shape[0] // gates
    expected = {
        "Wi": w_ih.shape,
        "Wh": (gates * hidden, hidden),
        "bi": (gates * hidden,),
        "bh": (gates * hidden,),
    }
    if ("bi" in arrays) != ("bh" in arrays):
        missing = names["bh"] if "bi" in arrays else names["bi"]
        raise ValueError(f"{kind} state_dict: missing {missing}; got keys {sorted(state_dict)}")
    for leaf, array in arrays.items():
        if array.shape != expected[leaf]:
            raise ValueError(
                f"{kind} state_dict: {names[leaf]} has shape {array.shape}, "
                f"expected {expected[leaf]}"
            )
    # A module built with bias=False has no bias tensors: its biases are zero.
    zeros = np.zeros(gates * hidden)
    return {
        "Wi": jnp.asarray(arrays["Wi"].T, dtype),
        "Wh": jnp.asarray(arrays["Wh"].T, dtype),
        "bi": jnp.asarray(arrays.get("bi", zeros), dtype),
        "bh": jnp.asarray(arrays.get("bh", zeros), dtype),
    }


def from_torch_state_dict(
    kind: str,
    state_dict,
    *,
    bidirectional: bool | None = None,
    layer_index: int = 0,
    return_sequences: bool = True,
    prefix: str = "",
    dtype=None,
) -> tuple[Layer, Any]:
    """``(layer, params)`` equal to one layer of a PyTorch ``GRU`` / ``LSTM`` module.

    ``state_dict`` maps names to tensors or arrays (``module.state_dict()``): for
    ``layer_index`` k, ``weight_ih_lk`` ``(G*H, in)``, ``weight_hh_lk`` ``(G*H, H)``,
    ``bias_ih_lk`` and ``bias_hh_lk`` ``(G*H,)`` (absent for ``bias=False``), and the same with
    ``_reverse`` for a bidirectional module. ``bidirectional=None`` reads it from the keys.
    ``prefix`` is prepended to every name (``"encoder.rnn."`` for a submodule's weights).

    jaxbp's layers are batch-first: feed ``(batch, time, features)``, as PyTorch with
    ``batch_first=True``. The returned ``params`` are ``{"Wi": weight_ih.T, "Wh": weight_hh.T,
    "bi": bias_ih, "bh": bias_hh}`` (nested under ``"forward"`` / ``"backward"`` if
    bidirectional), in ``dtype`` (default: float64 under ``jax_enable_x64``, else float32).
    """
    name = kind.upper() if isinstance(kind, str) else kind
    if name not in _RECURRENT:
        raise ValueError(f"from_torch_state_dict expects kind 'GRU' or 'LSTM', got {kind!r}")
    if not hasattr(state_dict, "keys"):
        raise TypeError(
            f"{name} state_dict: expected a mapping of names to tensors, got "
            f"{type(state_dict).__name__}"
        )
    gates = 3 if name == "GRU" else 4
    dt = np.dtype(dtype) if dtype is not None else jax.dtypes.canonicalize_dtype(jnp.float64)
    stem = f"{prefix}weight_ih_l{layer_index}"
    if f"{prefix}weight_hr_l{layer_index}" in state_dict:
        raise ValueError(
            f"{name} state_dict: LSTM with proj_size (weight_hr_l{layer_index}) is not supported"
        )
    has_reverse = f"{stem}_reverse" in state_dict
    if bidirectional is None:
        bidirectional = has_reverse
    elif not bidirectional and has_reverse:
        raise ValueError(
            f"{name} state_dict holds {stem}_reverse (a bidirectional module); "
            f"pass bidirectional=True"
        )
    directions = {"forward": "", "backward": "_reverse"} if bidirectional else {"forward": ""}
    params = {
        d: _torch_direction(name, state_dict, prefix, f"_l{layer_index}{suffix}", gates, dt)
        for d, suffix in directions.items()
    }
    hidden = params["forward"]["Wh"].shape[0]
    if bidirectional and params["backward"]["Wi"].shape != params["forward"]["Wi"].shape:
        raise ValueError(
            f"{name} state_dict: {stem}_reverse has shape "
            f"{params['backward']['Wi'].shape[::-1]}, expected "
            f"{params['forward']['Wi'].shape[::-1]}"
        )
    layer = _RECURRENT[name](hidden, return_sequences=return_sequences, dtype=dtype)
    if bidirectional:
        return _bidirectional(layer), params
    return layer, params["forward"]


register_layer("GRU", GRU)
register_layer("LSTM", LSTM)
register_layer("bidirectional", bidirectional)
