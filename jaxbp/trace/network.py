"""The network a trace config describes: a model description, built by :func:`jaxbp.model.build`."""

from __future__ import annotations

from .config import TraceConfig

__all__ = ["network_description", "network_params", "network_from_config"]


def network_description(config: TraceConfig) -> dict:
    """``{"name": "serial", "layers": [Dense, activation, Dense, activation, ...]}``: the
    config's network as a model description (see :mod:`jaxbp.model`)."""
    from ..layers import activation
    from ..model import describe

    layers = []
    for layer in config.layers:
        layers.append({"name": "Dense", "out_dim": layer.width, "shared_bias": layer.shared_bias})
        layers.append(describe(activation(layer.activation)))
    return {"name": "serial", "layers": layers}


def network_params(config: TraceConfig) -> tuple:
    """The config's weights and biases as the network's params, float64 jax arrays (call inside
    ``jax.enable_x64(True)``): ``({"W", "b"}, (), {"W", "b"}, (), ...)``."""
    import jax.numpy as jnp

    params: list[dict | tuple] = []
    for layer in config.layers:
        params.append(
            {
                "W": jnp.asarray(layer.weights, jnp.float64),
                "b": jnp.asarray(layer.bias, jnp.float64),
            }
        )
        params.append(())  # the activation has none
    return tuple(params)


def network_from_config(config: TraceConfig):
    """``(net, params)``: the network :func:`network_description` describes, with the config's
    weights (float64; call inside ``jax.enable_x64(True)``)."""
    from ..model import build

    return build(network_description(config)), network_params(config)
