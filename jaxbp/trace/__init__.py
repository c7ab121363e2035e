"""The worked example behind ``jaxbp trace``: every number of one backprop step, for any small net.

A *trace config* (:mod:`jaxbp.trace.config`) describes a small fully connected network and its
data as plain JSON; with none, the seed tutorial's 2-2-2 example. :func:`trace` builds the
network from a model description (:mod:`jaxbp.trace.network`), runs it through jaxbp's own
layers (:mod:`jaxbp.trace.compute`): the forward pass, the loss, each layer's hand-written
``backward`` with every factor of the chain rule kept, ``jax.grad`` of the same loss as the
check, and the SGD update, in float64 whatever the global ``jax_enable_x64`` setting. The
:class:`Trace` it returns (:mod:`jaxbp.trace.result`) renders itself as text, Markdown or JSON
(:mod:`jaxbp.trace.document`, :mod:`jaxbp.trace.notation`, :mod:`jaxbp.trace.render`) and, for
the seed's example, lists where the seed's stated numbers are wrong (:mod:`jaxbp.trace.errata`).
"""

from __future__ import annotations

from .compute import neuron_stages, trace, walk_network
from .config import ConfigError, TraceConfig, TraceLayer, load_config, parse_config, seed_config
from .network import network_description, network_from_config
from .render import FORMATS
from .result import LayerTrace, Trace

__all__ = [
    "TraceConfig",
    "TraceLayer",
    "Trace",
    "LayerTrace",
    "ConfigError",
    "seed_config",
    "parse_config",
    "load_config",
    "network_description",
    "network_from_config",
    "walk_network",
    "neuron_stages",
    "trace",
    "FORMATS",
]
