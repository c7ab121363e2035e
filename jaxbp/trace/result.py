"""What :func:`~jaxbp.trace.trace` returns: every number of the step, and its renderings."""

from __future__ import annotations

import dataclasses
import json

import numpy as np

from .config import TraceConfig
from .document import trace_document
from .errata import seed_errata, seed_values
from .notation import TraceNames
from .render import FORMATS, render_markdown, render_text, trace_json

__all__ = ["LayerTrace", "Trace"]


@dataclasses.dataclass(frozen=True)
class LayerTrace:
    """Every number of one layer, for the first step. Per-neuron arrays are ``(examples, width)``.

    ``net`` (the weighted sum, ``in_``), ``out`` (after the activation), ``dE_dout``,
    ``dout_dnet`` (the activation's derivative, from its own ``backward``) and
    ``delta = dE/dnet = dE_dout * dout_dnet``; the manual gradients ``grad_weights``,
    ``grad_bias``, ``jax.grad``'s (``autodiff_weights``, ``autodiff_bias``), and the parameters
    after the first update (``step1_weights``, ``step1_bias``) and after the last
    (``final_weights``, ``final_bias``).
    """

    net: np.ndarray
    out: np.ndarray
    dE_dout: np.ndarray
    dout_dnet: np.ndarray
    delta: np.ndarray
    grad_weights: np.ndarray
    grad_bias: np.ndarray
    autodiff_weights: np.ndarray
    autodiff_bias: np.ndarray
    step1_weights: np.ndarray
    step1_bias: np.ndarray
    final_weights: np.ndarray
    final_bias: np.ndarray


@dataclasses.dataclass(frozen=True)
class Trace:
    """The result of :func:`~jaxbp.trace.trace`. Render with :meth:`to_text`,
    :meth:`to_markdown`, :meth:`to_json` (or :meth:`render`)."""

    config: TraceConfig
    layers: tuple
    errors_per_example: np.ndarray  # (examples, outputs); summed over examples = errors
    loss: float
    autodiff_max_abs_diff: float
    freeze_bias: bool
    steps: int | None
    history: np.ndarray | None  # loss before each step, then after the last
    step_rel_errors: np.ndarray | None  # per step, worst leaf rel. error manual vs jax.grad

    @property
    def errors(self) -> np.ndarray:
        """Each output's share of the loss (they add up to :attr:`loss`)."""
        return self.errors_per_example.sum(axis=0)

    @property
    def names(self) -> TraceNames:
        return TraceNames(self.config)

    def seed_values(self) -> dict:
        """The correct value of every quantity the seed states (keys of ``SEED_STATED``).

        Only meaningful for the seed's 2-2-2 example (see :meth:`errata`).
        """
        return seed_values(self)

    def errata(self) -> list[dict] | None:
        """For the seed's example: each number the seed states, the correct value, and whether
        they agree to the 4 places the seed prints. ``None`` for any other config."""
        return seed_errata(self)

    def to_json(self) -> dict:
        """The numbers as plain JSON values (see :func:`jaxbp.trace.render.trace_json`)."""
        return trace_json(self)

    def to_text(self) -> str:
        return render_text(trace_document(self))

    def to_markdown(self) -> str:
        return render_markdown(trace_document(self))

    def render(self, fmt: str = "text") -> str:
        """The trace as ``"text"``, ``"markdown"`` or ``"json"``."""
        if fmt == "json":
            return json.dumps(self.to_json(), indent=2)
        if fmt == "markdown":
            return self.to_markdown()
        if fmt == "text":
            return self.to_text()
        raise ValueError(f"unknown format {fmt!r}; expected one of: {', '.join(FORMATS)}")
