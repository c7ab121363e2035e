"""Pictures: the traced network, learning-rate sweeps, training curves.

matplotlib is imported inside each function (``import jaxbp`` stays light) and drawn through
``matplotlib.figure.Figure`` directly, never ``pyplot``: no GUI backend is touched, no global
state changes, and the functions work on a headless machine and inside a notebook alike.
The format follows the file name's extension (``.png``, ``.pdf``, ``.svg``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence

import numpy as np

__all__ = ["plot_network", "plot_loss_curves", "plot_training_curves"]

_POS, _NEG = "#1f77b4", "#d62728"  # blue: positive weight, red: negative
_MAX_LABELLED_EDGES = 48
_X_GAP, _Y_GAP = 4.0, 2.6  # network diagram: units between columns, between neurons


def _figure(width: float, height: float):
    try:
        from matplotlib.figure import Figure
    except ImportError:  # pragma: no cover - matplotlib ships with the cli extra
        raise ImportError("plots need matplotlib: pip install 'jaxbp[plot]'") from None
    return Figure(figsize=(width, height), layout="constrained")


def _check_folder(path) -> str:
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise OSError(f"cannot write {path!r}: folder {folder!r} does not exist")
    return path


def check_plot_path(path) -> str:
    """For the commands' ``--plot``: fail before the work, not after it, when the plot cannot
    be written (a missing folder, or a format other than .png, .pdf, .svg)."""
    path = _check_folder(path)
    if not path.lower().endswith((".png", ".pdf", ".svg")):
        raise ValueError(f"--plot expects a file name ending in .png, .pdf or .svg, got {path!r}")
    return path


def _save(fig, path) -> str:
    path = _check_folder(path)
    fig.savefig(path, dpi=150)
    return path


# --------------------------------------------------------------------------------------------
# The traced network
# --------------------------------------------------------------------------------------------


def plot_network(trace, path) -> str:
    """Draw a :class:`jaxbp.trace.Trace`: every neuron with its ``in``/``out`` (first example),
    every weight as an edge (blue positive, red negative, width by size) labelled with its value
    and ``dE/dw``, and each bias with its gradient. Returns ``path``."""
    cfg = trace.config
    widths = cfg.widths
    columns = len(widths)
    tallest = max(widths)
    span_x, span_y = (columns - 1) * _X_GAP + 2.0, (tallest - 1) * _Y_GAP + 4.7
    scale = min(0.75, 16.0 / span_x, 14.0 / span_y)  # inches per unit, capped for big nets
    fig = _figure(max(6.0, span_x * scale), max(4.0, span_y * scale + 0.6))
    ax = fig.add_subplot()
    ax.set_axis_off()

    pos = {(c, j): (c * _X_GAP, _neuron_y(n, j)) for c, n in enumerate(widths) for j in range(n)}
    label_edges = sum(a * b for a, b in zip(widths, widths[1:])) <= _MAX_LABELLED_EDGES
    top = (tallest - 1) / 2 * _Y_GAP + 1.0
    # edges first, so the nodes sit on top of them
    _draw_edges(ax, trace, pos, label_edges)
    _draw_biases(ax, trace, pos, top)
    _draw_nodes(fig, ax, trace, pos)
    _draw_column_labels(ax, cfg, tallest)
    ax.set_title(_network_title(trace, label_edges), fontsize=10)
    ax.set_xlim(-1.0, (columns - 1) * _X_GAP + 1.0)
    ax.set_ylim(-(tallest - 1) / 2 * _Y_GAP - 2.4, top + 1.3)
    ax.set_aspect("equal")
    return _save(fig, path)


def _neuron_y(count, j):
    """Neurons of a column are centred vertically, top to bottom."""
    return ((count - 1) / 2 - j) * _Y_GAP


def _draw_edges(ax, trace, pos, label_edges):
    """One line per weight, coloured by sign and widened by size; labelled when few enough."""
    cfg, names = trace.config, trace.names
    max_w = max(float(np.max(np.abs(l.weights))) for l in cfg.layers) or 1.0
    for k, (layer, lt) in enumerate(zip(cfg.layers, trace.layers)):
        n_in, n_out = layer.weights.shape
        for i, j in np.ndindex(layer.weights.shape):
            (x0, y0), (x1, y1) = pos[(k, i)], pos[(k + 1, j)]
            w = float(layer.weights[i, j])
            ax.plot(
                [x0, x1],
                [y0, y1],
                color=_POS if w >= 0 else _NEG,
                lw=0.6 + 3.0 * abs(w) / max_w,
                alpha=0.75,
                zorder=1,
                solid_capstyle="round",
            )
            if label_edges:
                # Stagger labels along the edge so that crossing edges keep theirs apart.
                t = 0.28 + 0.44 * ((i + j) % 2) if n_in * n_out > 1 else 0.5
                lx, ly = x0 + t * (x1 - x0), y0 + t * (y1 - y0)
                angle = math.degrees(math.atan2(y1 - y0, x1 - x0))
                wname = names.weight(k, i, j)
                ax.text(
                    lx,
                    ly,
                    f"{wname} = {w:.4g}\ndE/d{wname} = {float(lt.grad_weights[i, j]):.3g}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    rotation=angle,
                    rotation_mode="anchor",
                    zorder=3,
                    bbox=dict(boxstyle="round,pad=0.15", fc="white", ec="none", alpha=0.85),
                )


def _draw_biases(ax, trace, pos, top):
    """Bias boxes: one per layer, above its column, dotted to the neurons it feeds."""
    cfg, names = trace.config, trace.names
    for k, (layer, lt) in enumerate(zip(cfg.layers, trace.layers)):
        bx, by = (k + 0.5) * _X_GAP, top
        if layer.shared_bias:
            text = (
                f"{names.bias(k)} = {float(layer.bias):.4g}\n"
                f"dE/d{names.bias(k)} = {float(lt.grad_bias):.3g}"
            )
        else:
            text = "\n".join(
                f"{names.bias(k, j)} = {float(b):.3g} (dE/d = {float(g):.3g})"
                for j, (b, g) in enumerate(zip(layer.bias, lt.grad_bias))
            )
        for j in range(layer.width):
            x1, y1 = pos[(k + 1, j)]
            ax.plot([bx, x1], [by, y1], color="0.6", lw=0.8, ls=":", zorder=0)
        ax.text(
            bx,
            by,
            text,
            ha="center",
            va="bottom",
            fontsize=7.5,
            zorder=4,
            bbox=dict(boxstyle="round,pad=0.3", fc="#f4f4f4", ec="0.6"),
        )


def _node_text(trace, c, j):
    """A neuron's name, the numbers written below it, and its fill colour."""
    cfg, names = trace.config, trace.names
    if c == 0:
        return names.input(j), f"{float(cfg.inputs[0, j]):.4g}", "#e8e8e8"
    last = c == len(cfg.widths) - 1
    lt = trace.layers[c - 1]
    below = (
        f"in {float(lt.net[0, j]):.4f}\nout {float(lt.out[0, j]):.4f}\n"
        f"dE/din {float(lt.delta[0, j]):.4g}"
    )
    if last:
        below += f"\ntarget {float(cfg.targets[0, j]):.4g}"
    return names.neuron(c - 1, j), below, "#fff3c4" if last else "#dff0d8"


def _draw_nodes(fig, ax, trace, pos):
    """Every neuron as a circle, its name inside and its numbers below."""
    for c, n in enumerate(trace.config.widths):
        for j in range(n):
            x, y = pos[(c, j)]
            name, below, face = _node_text(trace, c, j)
            ax.add_patch(_circle(fig, (x, y), 0.32, face))
            ax.text(x, y, name, ha="center", va="center", fontsize=10, weight="bold", zorder=6)
            ax.text(
                x,
                y - 0.4,
                below,
                ha="center",
                va="top",
                fontsize=7.5,
                zorder=6,
                bbox=dict(boxstyle="round,pad=0.2", fc="white", ec="none", alpha=0.85),
            )


def _draw_column_labels(ax, cfg, tallest):
    """Each column's kind under it: inputs, hidden or outputs, with its activation."""
    columns = len(cfg.widths)
    for c in range(columns):
        kind = "inputs" if c == 0 else ("outputs" if c == columns - 1 else "hidden")
        act = f" ({cfg.layers[c - 1].activation})" if c > 0 else ""
        ax.text(
            c * _X_GAP,
            -(tallest - 1) / 2 * _Y_GAP - 1.9,
            kind + act,
            ha="center",
            va="top",
            fontsize=9,
            color="0.35",
        )


def _network_title(trace, label_edges) -> str:
    cfg = trace.config
    title = (
        "The seed's 2-2-2 example" if cfg.is_seed else f"{'-'.join(map(str, cfg.widths))} network"
    )
    subtitle = f"{cfg.loss} = {trace.loss:.4f}, learning rate {cfg.learning_rate:g}"
    if cfg.inputs.shape[0] > 1:
        subtitle += f"; activations of example 1 of {cfg.inputs.shape[0]}, gradients over all"
    if not label_edges:
        subtitle += "; too many weights to label (see the text trace)"
    return f"{title}\n{subtitle}"


def _circle(fig, center, radius, face):
    from matplotlib.patches import Circle

    return Circle(center, radius, fc=face, ec="0.25", lw=1.2, zorder=5)


# --------------------------------------------------------------------------------------------
# Loss curves of a learning-rate sweep
# --------------------------------------------------------------------------------------------


def plot_loss_curves(
    curves: Mapping[str, Sequence[float]],
    path,
    *,
    title: str = "",
    xlabel: str = "step",
    ylabel: str = "loss",
    logy: bool = True,
) -> str:
    """One line per entry of ``curves`` (label -> loss per step), on a log scale by default.
    Non-finite values are left out of the line. Returns ``path``."""
    if not curves:
        raise ValueError("plot_loss_curves needs at least one curve, got none")
    fig = _figure(7.5, 4.6)
    ax = fig.add_subplot()
    colors = _colors(len(curves))
    for (label, values), color in zip(curves.items(), colors):
        y = np.asarray(values, np.float64)
        y = np.where(np.isfinite(y), y, np.nan)
        if logy:
            y = np.where(y > 0, y, np.nan)
        ax.plot(np.arange(len(y)), y, label=label, color=color, lw=1.8)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=9)
    if title:
        ax.set_title(title, fontsize=10)
    return _save(fig, path)


def _colors(n):
    from matplotlib import colormaps

    if n <= 10:  # distinct hues, all dark enough to read on white
        return [colormaps["tab10"](i) for i in range(n)]
    cmap = colormaps["viridis"]
    return [cmap(0.85 * i / max(1, n - 1)) for i in range(n)]


# --------------------------------------------------------------------------------------------
# Training curves
# --------------------------------------------------------------------------------------------


def plot_training_curves(history: Mapping[str, Sequence[float]], path, *, title: str = "") -> str:
    """Training curves from ``history``, a mapping of series name -> values.

    Series are grouped into panels by name: names containing ``"loss"`` (log scale),
    ``"acc"`` (accuracy), and anything else numeric (e.g. ``"max_grad_rel_error"``, log
    scale). An ``"epoch"`` (or ``"step"``) series, if present, is the x axis of every series of
    its length; series of another length (say, a loss per step next to an accuracy per epoch)
    are spread evenly over the same range, so they share the axis. Returns ``path``.
    """
    series = {
        k: np.asarray(v, np.float64).reshape(-1)
        for k, v in history.items()
        if _is_numeric_series(v)
    }
    x_key = "epoch" if "epoch" in series else ("step" if "step" in series else None)
    x_ref = series.pop(x_key) if x_key else None
    series = {k: v for k, v in series.items() if v.size}
    if not series:
        raise ValueError(
            f"plot_training_curves: no numeric series to plot in history "
            f"(keys: {', '.join(history) or 'none'})"
        )
    groups: dict[str, list[str]] = {"loss": [], "accuracy": [], "other": []}
    for name in series:
        lower = name.lower()
        kind = "loss" if "loss" in lower else ("accuracy" if "acc" in lower else "other")
        groups[kind].append(name)
    panels = [(kind, names) for kind, names in groups.items() if names]
    fig = _figure(5.0 * len(panels), 4.0)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    x_end = float(x_ref[-1]) if x_ref is not None and x_ref.size else None
    for ax, (kind, names) in zip(axes, panels):
        for name in names:
            y = series[name]
            x: np.ndarray
            if x_ref is not None and len(x_ref) == len(y):
                x = x_ref
            elif x_end is not None:
                x = np.linspace(x_end / len(y), x_end, len(y))
            else:
                x = np.arange(1, len(y) + 1)
            logy = kind != "accuracy" and np.all(y[np.isfinite(y)] > 0)
            ax.plot(
                x,
                np.where(np.isfinite(y), y, np.nan),
                label=name,
                lw=1.5,
                marker="o" if len(y) <= 30 else None,
                ms=3,
            )
            if logy:
                ax.set_yscale("log")
        ax.set_xlabel(x_key or "step")
        if x_key is not None:  # epochs and steps are whole: no tick at epoch 1.5 of a short run
            from matplotlib.ticker import MaxNLocator

            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if kind == "other" and all(np.all(series[n][np.isfinite(series[n])] == 0) for n in names):
            # Exactly 0 throughout (manual = jax.grad to the last bit): a log axis cannot show
            # it, and a flat line at 0 looks like a missing panel; say it in words.
            ax.text(0.5, 0.5, "0 at every point", transform=ax.transAxes, ha="center")
        ax.set_title(kind if kind != "other" or len(names) > 2 else ", ".join(names), fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=11)
    return _save(fig, path)


def _is_numeric_series(v) -> bool:
    try:
        a = np.asarray(v)
    except Exception:  # anything that is not an array is simply not plotted
        return False
    return a.dtype.kind in "fiub" and a.ndim <= 1 and a.dtype.kind != "b"
