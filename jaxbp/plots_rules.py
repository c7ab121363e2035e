"""Pictures of learning rules: the angle between each layer's update and the gradient.

matplotlib is imported inside the functions and drawn through ``matplotlib.figure.Figure``
directly, never ``pyplot``, as in :mod:`jaxbp.plots`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from .plots import check_plot_path

__all__ = ["plot_alignment", "plot_rule_comparison", "alignment_series"]


def alignment_series(history: Sequence[Mapping]) -> tuple[np.ndarray, dict, dict]:
    """``(epochs, angle per layer, norm ratio per layer)`` from a run's history rows (each
    with an ``"alignment"`` entry, as ``jaxbp train --rule`` writes them); missing: NaN."""
    rows = [r for r in history if r.get("alignment")]
    epochs = np.asarray([r["epoch"] for r in rows], np.float64)
    layers = list(dict.fromkeys(k for r in rows for k in r["alignment"]))

    def series(field):
        return {
            layer: np.asarray(
                [_value(r["alignment"].get(layer, {}).get(field)) for r in rows], np.float64
            )
            for layer in layers
        }

    return epochs, series("angle"), series("norm_ratio")


def _figure(width: float, height: float):
    try:
        from matplotlib.figure import Figure
    except ImportError:  # pragma: no cover - matplotlib ships with the cli extra
        raise ImportError("plots need matplotlib: pip install 'jaxbp[plot]'") from None
    return Figure(figsize=(width, height), layout="constrained")


def _save(fig, path) -> str:
    path = check_plot_path(path)
    fig.savefig(path, dpi=150)
    return path


def _value(v) -> float:
    return math.nan if v is None else float(v)


def plot_alignment(history: Sequence[Mapping], path, *, title: str = "") -> str:
    """Two panels: the angle (degrees) between each layer's update and ``jax.grad``'s against
    the epoch, with the 90 degree line (Lillicrap et al.: feedback alignment moves within 90
    degrees and then improves), and the norm ratio ``||rule|| / ||grad||`` (log scale)."""
    epochs, angles, ratios = alignment_series(history)
    if not angles:
        raise ValueError("plot_alignment: no history row has an 'alignment' entry")
    fig = _figure(10.0, 4.0)
    ax_angle, ax_ratio = fig.subplots(1, 2)
    for layer in angles:
        ax_angle.plot(epochs, angles[layer], label=f"layer {layer}", lw=1.5)
        ratio = ratios[layer]
        if np.any(np.isfinite(ratio) & (ratio > 0)):
            ax_ratio.plot(epochs, np.where(ratio > 0, ratio, np.nan), label=f"layer {layer}")
    ax_angle.axhline(90.0, color="grey", ls="--", lw=1)
    ax_angle.set(
        xlabel="epoch",
        ylabel="angle to jax.grad (degrees)",
        ylim=(0, 120),
        title="update vs gradient",
    )
    ax_ratio.set(
        xlabel="epoch", ylabel="||rule update|| / ||gradient||", yscale="log", title="norm ratio"
    )
    for ax in (ax_angle, ax_ratio):
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_rule_comparison(runs: Mapping[str, Sequence[Mapping]], path, *, title: str = "") -> str:
    """One panel per rule: each hidden layer's angle against the epoch (``runs`` maps a rule's
    label to its history rows). Layers whose angle stays 0 (the output layer, which every rule
    trains with the true error) are left out."""
    fig = _figure(4.0 * max(1, len(runs)), 3.6)
    axes = np.atleast_1d(fig.subplots(1, max(1, len(runs)), sharey=True))
    for ax, (label, history) in zip(axes, runs.items()):
        epochs, angles, _ = alignment_series(history)
        for layer, angle in angles.items():
            if np.nanmax(np.abs(angle), initial=0.0) > 1e-6:
                ax.plot(epochs, angle, label=f"layer {layer}")
        ax.axhline(90.0, color="grey", ls="--", lw=1)
        ax.set(title=label, xlabel="epoch", ylim=(0, 120))
        ax.grid(alpha=0.3)
        if ax.lines[1:]:
            ax.legend(fontsize=7)
    axes[0].set_ylabel("angle to jax.grad (degrees)")
    if title:
        fig.suptitle(title)
    return _save(fig, path)
