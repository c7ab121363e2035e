"""The worked example of weight tying: ``jaxbp trace --example tied``.

A tied autoencoder, :func:`jaxbp.tied` of ``Dense -> activation -> Dense`` in which the second
Dense's weights are the first's transposed (as GPT-2's logits use the token embedding): one
matrix ``W``, used twice. The forward shows both uses; the backward works out each use's
gradient on its own (the output layer's ``h_j * dy_i``, the first layer's ``x_i * dz_j``) and
then adds them, ``dE/dW[i][j] = x_i * dz_j + h_j * dy_i``, every total checked against the
network's own ``backward`` and ``jax.grad``.

Names: ``x1, x2`` the inputs, ``z_j`` / ``h_j`` hidden neuron ``j``'s sum and activation,
``y_i`` output ``i``; ``W[i][j]`` joins input ``i`` to hidden neuron ``j`` and, transposed,
hidden neuron ``j`` to output ``i``; ``b0`` and ``b2`` are the two layers' biases.
"""

from __future__ import annotations

import json

import numpy as np

from .config import ConfigError
from .layer_traces import (
    TracedLayer,
    build_layer,
    check_section,
    float64,
    half_sse,
    nested_array,
    spec_data,
    sum_line,
)
from .notation import computed, factor, given, given_factor
from .render import Lines, Paragraph, Section

__all__ = ["EXAMPLE", "trace_tied"]

EXAMPLE = {
    "model": {
        "name": "tied",
        "layers": [
            {"name": "Dense", "out_dim": 3},
            {"name": "Tanh"},
            {"name": "Dense", "out_dim": 2},
        ],
        "source": "0.W",
        "target": "2.W",
        "transpose": True,
    },
    "params": [
        {"W": [[0.5, -0.3, 0.8], [0.2, 0.4, -0.4]], "b": [0.1, 0.0, 0.2]},
        {},
        {"b": [0.05, -0.05]},
    ],
    "inputs": [1.0, 0.5],
    "targets": [1.0, 0.5],
}
MAX_WIDTH = 4
_SHAPE = (
    "a tied network of Dense, an activation and Dense, with source '0.W', target '2.W' and "
    "transpose true (a tied autoencoder, at most 4 inputs and 4 hidden neurons)"
)


def _checked_layer(spec: dict):
    layer = build_layer(spec)
    config = dict(layer.config)
    names = [child.name for child in layer.children]
    if (
        layer.name != "tied"
        or len(names) != 3
        or names[0] != "Dense"
        or names[2] != "Dense"
        or dict(layer.children[1].config)
        or (config["source"], config["target"], config["transpose"]) != ("0.W", "2.W", True)
    ):
        raise ConfigError(f"trace file: the tied trace expects {_SHAPE}; got {names}")
    return layer


def _params(spec: dict, example: dict, layer, width: int):
    """The given params (a list of three per-layer objects), or ``init``'s rounded."""
    import jax
    import jax.numpy as jnp

    _, initial = layer.init(jax.random.PRNGKey(0), (width,))
    if "params" not in spec:
        return jax.tree_util.tree_map(lambda v: jnp.asarray(np.round(float64(v), 2)), initial)
    given_params = spec["params"]
    if not isinstance(given_params, list) or len(given_params) != 3:
        raise ConfigError(
            f"trace file: params of a tied network must be a list of three objects, one per "
            f"layer ({json.dumps(jax.tree_util.tree_map(lambda v: list(v.shape), initial))}), "
            f"got {json.dumps(given_params)[:60]}"
        )
    params = []
    for i, (entry, like) in enumerate(zip(given_params, initial, strict=True)):
        like = like or {}  # the activation's params are (), written {}
        if not isinstance(entry, dict) or set(entry) != set(like):
            raise ConfigError(
                f"trace file: params[{i}] must be an object with keys {sorted(like)}, "
                f"got {json.dumps(entry)[:60]}"
            )
        arrays = {}
        for key, value in like.items():
            array = nested_array(entry[key], f"params[{i}].{key}")
            if array.shape != value.shape:
                raise ConfigError(
                    f"trace file: params[{i}].{key} has shape {array.shape}; expected "
                    f"{tuple(value.shape)}"
                )
            arrays[key] = jnp.asarray(array)
        params.append(arrays or ())
    return tuple(params)


def _numbers(spec: dict, example: dict) -> dict:
    import jax
    import jax.numpy as jnp

    layer = _checked_layer(spec)
    x = spec_data(spec, example, "inputs")
    if x.ndim != 1 or not 1 <= x.size <= MAX_WIDTH:
        raise ConfigError(f"trace file: inputs must be one example of 1 to {MAX_WIDTH} numbers")
    params = _params(spec, example, layer, x.size)
    w, b0, b2 = (float64(a) for a in (params[0]["W"], params[0]["b"], params[2]["b"]))
    if w.shape[1] > MAX_WIDTH:
        raise ConfigError(f"trace file: the tied trace shows at most {MAX_WIDTH} hidden neurons")
    y, cache = layer.forward(params, jnp.asarray(x))
    t = spec_data(spec, example, "targets", expected=y.shape)
    dy = float64(y) - t
    grads, dx = layer.backward(params, cache, jnp.asarray(dy))
    activation = layer.children[1]
    z = x @ w + b0
    h, act_cache = activation.forward((), jnp.asarray(z))
    _, slope = activation.backward((), act_cache, jnp.ones_like(jnp.asarray(z)))
    h, slope = float64(h), float64(slope)
    dh = dy @ w  # dE/dh_j = sum_i dy_i * W[i][j]: W transposed, then the backward's W.T
    dz = dh * slope
    manual = {
        "W": float64(grads[0]["W"]),
        "b0": float64(grads[0]["b"]),
        "b2": float64(grads[2]["b"]),
        "x": float64(dx),
    }
    auto, auto_x = jax.grad(
        lambda p, inputs: half_sse(layer.forward(p, inputs)[0], jnp.asarray(t)), argnums=(0, 1)
    )(params, jnp.asarray(x))
    autodiff = {
        "W": float64(auto[0]["W"]),
        "b0": float64(auto[0]["b"]),
        "b2": float64(auto[2]["b"]),
        "x": float64(auto_x),
    }
    return {
        "layer": layer,
        "activation": activation.name,
        "params": params,
        "x": x,
        "t": t,
        "W": w,
        "b0": b0,
        "b2": b2,
        "z": z,
        "h": h,
        "y": float64(y),
        "dy": dy,
        "slope": slope,
        "dh": dh,
        "dz": dz,
        "use_output": np.outer(dy, h),  # [i][j]: h_j * dy_i, output layer's use, transposed
        "use_first": np.outer(x, dz),  # [i][j]: x_i * dz_j, the first layer's use
        "manual": manual,
        "autodiff": autodiff,
        "loss": float(half_sse(float64(y), t)),
    }


def _forward_section(n: dict) -> Section:
    lines = []
    inputs, hidden = range(len(n["x"])), range(len(n["h"]))
    for j in hidden:
        symbols = [f"x{i + 1}*W[{i + 1}][{j + 1}]" for i in inputs] + [f"b0_{j + 1}"]
        numbers = [f"{given_factor(n['x'][i])}*{given_factor(n['W'][i, j])}" for i in inputs]
        terms = [n["x"][i] * n["W"][i, j] for i in inputs] + [n["b0"][j]]
        lines.append(
            sum_line(
                f"z_{j + 1}",
                symbols,
                [*numbers, given_factor(n["b0"][j])],
                terms,
                n["z"][j],
                f"z_{j + 1}",
            )
        )
        lines.append(f"h_{j + 1} = {n['activation']}(z_{j + 1}) = {computed(n['h'][j])}")
    for i in inputs:
        symbols = [f"h_{j + 1}*W[{i + 1}][{j + 1}]" for j in hidden] + [f"b2_{i + 1}"]
        numbers = [f"{factor(n['h'][j])}*{given_factor(n['W'][i, j])}" for j in hidden]
        terms = [n["h"][j] * n["W"][i, j] for j in hidden] + [n["b2"][i]]
        lines.append(
            sum_line(
                f"y_{i + 1}",
                symbols,
                [*numbers, given_factor(n["b2"][i])],
                terms,
                n["y"][i],
                f"y_{i + 1}",
            )
        )
    return Section(
        "Forward pass: one matrix, two uses",
        [
            Paragraph(
                "The first layer multiplies the inputs by W; the output layer multiplies the "
                "hidden activations by W transposed (its weight from hidden j to output i is "
                "W[i][j]). There is one W in the params, not two."
            ),
            Lines(lines),
        ],
    )


def _error_section(n: dict) -> Section:
    lines = [
        f"dE/dy_{i + 1} = y_{i + 1} - t_{i + 1} = {computed(n['y'][i])} - {given(n['t'][i])} = "
        f"{computed(n['dy'][i])}"
        for i in range(len(n["y"]))
    ]
    return Section(
        "Error",
        [Lines([f"E = 1/2 sum (y_i - t_i)^2 = {computed(n['loss'])}", *lines])],
    )


def _backward_section(n: dict) -> Section:
    inputs, hidden = range(len(n["x"])), range(len(n["h"]))
    output_use = [
        f"through the output layer: dE/dW[{i + 1}][{j + 1}] = h_{j + 1} * dE/dy_{i + 1} = "
        f"{factor(n['h'][j])}*{factor(n['dy'][i])} = {computed(n['use_output'][i, j])}"
        for i in inputs
        for j in hidden
    ]
    back = []
    for j in hidden:
        back.append(
            sum_line(
                f"dE/dh_{j + 1}",
                [f"dE/dy_{i + 1}*W[{i + 1}][{j + 1}]" for i in inputs],
                [f"{factor(n['dy'][i])}*{given_factor(n['W'][i, j])}" for i in inputs],
                [n["dy"][i] * n["W"][i, j] for i in inputs],
                n["dh"][j],
                f"dE/dh_{j + 1}",
            )
        )
        back.append(
            f"dE/dz_{j + 1} = dE/dh_{j + 1} * {n['activation']}'(z_{j + 1}) = "
            f"{factor(n['dh'][j])}*{factor(n['slope'][j])} = {computed(n['dz'][j])}"
        )
    first_use = [
        f"through the first layer: dE/dW[{i + 1}][{j + 1}] = x{i + 1} * dE/dz_{j + 1} = "
        f"{given_factor(n['x'][i])}*{factor(n['dz'][j])} = {computed(n['use_first'][i, j])}"
        for i in inputs
        for j in hidden
    ]
    added = [
        sum_line(
            f"dE/dW[{i + 1}][{j + 1}]",
            [f"x{i + 1}*dE/dz_{j + 1}", f"h_{j + 1}*dE/dy_{i + 1}"],
            [factor(n["use_first"][i, j]), factor(n["use_output"][i, j])],
            [n["use_first"][i, j], n["use_output"][i, j]],
            n["manual"]["W"][i, j],
            f"dE/dW[{i + 1}][{j + 1}]",
        )
        for i in inputs
        for j in hidden
    ]
    return Section(
        "Backward pass: each use's gradient, then their sum",
        [
            Paragraph("The output layer's use (its dE/dW transposed back onto W's layout):"),
            Lines(output_use),
            Paragraph("Back through the output layer (by W transposed) and the activation:"),
            Lines(back),
            Paragraph("The first layer's use:"),
            Lines(first_use),
            Paragraph(
                "W is one parameter, so its gradient is the sum of both uses' (the chain rule "
                "adds the paths through every place W appears); the totals are the network's "
                "own backward:"
            ),
            Lines(added),
        ],
    )


def _check_rows(n: dict) -> list:
    rows = []
    for key, label in (("W", "dE/dW"), ("b0", "dE/db0"), ("b2", "dE/db2"), ("x", "dE/dx")):
        manual, auto = n["manual"][key], n["autodiff"][key]
        for index in np.ndindex(manual.shape):
            name = label + "".join(f"[{k + 1}]" for k in index)
            rows.append((name, manual[index], auto[index]))
    return rows


def trace_tied(spec: dict, example: dict = EXAMPLE) -> TracedLayer:
    """Trace one step of the tied autoencoder a trace file describes."""
    import jax

    from ..model import describe

    with jax.enable_x64(True):
        n = _numbers(spec, example)
    sections = [
        _forward_section(n),
        _error_section(n),
        _backward_section(n),
        check_section(_check_rows(n)),
    ]
    used = {
        "model": describe(n["layer"]),
        "params": [{k: float64(v).tolist() for k, v in dict(p).items()} for p in n["params"]],
        "inputs": n["x"].tolist(),
        "targets": n["t"].tolist(),
    }
    numbers = {
        key: n[key].tolist() for key in ("z", "h", "y", "dy", "dh", "dz", "use_first", "use_output")
    }
    numbers["loss"] = n["loss"]
    numbers["grads"] = {k: v.tolist() for k, v in n["manual"].items()}
    return TracedLayer("tied", used, numbers, sections, n["manual"], n["autodiff"])
