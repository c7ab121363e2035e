"""Pictures of the single-layer traces (``jaxbp trace --example conv|attention|gru --plot F.png``).

matplotlib is imported inside each function and drawn through ``matplotlib.figure.Figure``
(no pyplot, no GUI backend), as in :mod:`jaxbp.plots`. The format follows the extension.
"""

from __future__ import annotations

import numpy as np

from .plots import check_plot_path

__all__ = ["plot_attention_trace", "plot_conv_trace", "plot_gru_trace", "plot_layer_trace"]

_READ, _IDLE, _MASKED = "#dff0d8", "#f4f4f4", "#d9d9d9"


def _figure(width: float, height: float):
    try:
        from matplotlib.figure import Figure
    except ImportError:  # pragma: no cover - matplotlib ships with the plot extra
        raise ImportError(
            "plots need matplotlib: pip install 'jaxbp[plot]'", name="matplotlib"
        ) from None
    return Figure(figsize=(width, height), layout="constrained")


def _box(ax, x: float, y: float, text: str, face: str, size: float = 8) -> None:
    from matplotlib.patches import Rectangle

    ax.add_patch(Rectangle((x - 0.45, y - 0.4), 0.9, 0.8, facecolor=face, edgecolor="0.5"))
    ax.text(x, y, text, ha="center", va="center", fontsize=size)


def _conv_row(ax, numbers: dict, spec: dict, o: int, row_y: float) -> None:
    """Output ``o``: the inputs, the window it reads with its weights, then ``y`` and ``dE/dy``."""
    x = np.asarray(spec["inputs"])[:, 0]
    w = np.asarray(spec["params"]["W"])[:, 0, 0]
    read = {position - 1: tap - 1 for tap, position in numbers["windows"][o]}
    for i, value in enumerate(x):
        _box(ax, i, row_y, f"{value:.3g}", _READ if i in read else _IDLE)
        if i in read:
            ax.text(
                i,
                row_y - 0.45,
                f"w{read[i] + 1} = {w[read[i]]:.3g}",
                ha="center",
                va="top",
                fontsize=7,
                color="#1f5f1f",
            )
    y = numbers["forward"]["y"][o][0]
    dy = numbers["gradients"]["y"][o][0]
    ax.text(
        len(x) + 0.2,
        row_y,
        f"y{o + 1} = {y:.4f}\ndE/dy{o + 1} = {dy:.4f}",
        ha="left",
        va="center",
        fontsize=8,
    )


def plot_conv_trace(traced, path) -> str:
    """The kernel sliding over the input: one row per output (the window it reads, the weight
    on each read input, ``y`` and ``dE/dy``), then ``dE/dw`` and the input gradient
    ``dE/dx``. One input and output channel (others: see the text trace)."""
    spec, numbers = traced.spec, traced.numbers
    if len(spec["inputs"][0]) != 1 or len(spec["params"]["b"]) != 1:
        raise ValueError(
            "the Conv1D plot draws one input and one output channel; use the text trace for several"
        )
    length, outputs = len(spec["inputs"]), len(numbers["forward"]["y"])
    fig = _figure(max(6.0, 1.0 * length + 3.0), 1.3 * (outputs + 2) + 0.6)
    ax = fig.add_subplot()
    ax.set_axis_off()
    for o in range(outputs):
        _conv_row(ax, numbers, spec, o, -1.4 * o)
    bottom = -1.4 * outputs
    for i, g in enumerate(np.asarray(numbers["gradients"]["x"])[:, 0]):
        _box(ax, i, bottom, f"{g:.4f}", "#fff3c4", 7)
        ax.text(i, bottom + 0.5, f"x{i + 1}", ha="center", va="bottom", fontsize=7)
    ax.text(
        length + 0.2, bottom, "dE/dx (transposed\nconvolution)", ha="left", va="center", fontsize=8
    )
    dw = np.asarray(numbers["gradients"]["W"])[:, 0, 0]
    weights = ",  ".join(f"dE/dw{j + 1} = {v:.4f}" for j, v in enumerate(dw))
    ax.set_title(
        f"Conv1D: the kernel over the input, one row per output\n{weights},  "
        f"dE/db = {numbers['gradients']['b'][0]:.4f};  E = {numbers['loss']:.4f}",
        fontsize=9,
    )
    ax.set_xlim(-0.8, length + 2.6)
    ax.set_ylim(bottom - 0.9, 0.9)
    fig.savefig(check_plot_path(path), dpi=150)
    return str(path)


def _heatmap(fig, ax, matrix: np.ndarray, mask: np.ndarray, title: str) -> None:
    shown = np.where(mask, matrix, np.nan)
    limit = float(np.nanmax(np.abs(shown))) or 1.0
    image = ax.imshow(shown, cmap="RdBu_r", vmin=-limit, vmax=limit)
    ax.set_facecolor(_MASKED)
    for (t, u), value in np.ndenumerate(matrix):
        dark = mask[t, u] and abs(value) > 0.6 * limit  # white on the deep colours
        ax.text(
            u,
            t,
            f"{value:.3f}" if mask[t, u] else "masked",
            ha="center",
            va="center",
            fontsize=8,
            color="white" if dark else "black",
        )
    tokens = matrix.shape[0]
    ax.set_xticks(range(tokens), [f"key {u + 1}" for u in range(tokens)], fontsize=7)
    ax.set_yticks(range(tokens), [f"query {t + 1}" for t in range(tokens)], fontsize=7)
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, shrink=0.7)


def plot_attention_trace(traced, path) -> str:
    """The attention matrix ``p``, its gradient ``dE/dp`` and the scores' gradient ``dE/ds``
    (after the softmax Jacobian), numbers in the cells, masked cells grey."""
    numbers = traced.numbers
    p = np.asarray(numbers["forward"]["p"])
    mask = np.asarray([[s is not None for s in row] for row in numbers["forward"]["s"]])
    worked = numbers["gradients"]["intermediate"]
    fig = _figure(12.0, 3.8)
    axes = fig.subplots(1, 3)
    _heatmap(fig, axes[0], p, mask, "attention p = softmax(s)")
    _heatmap(fig, axes[1], np.asarray(worked["p"]), mask, "dE/dp")
    _heatmap(fig, axes[2], np.asarray(worked["s"]), mask, "dE/ds = p * (dE/dp - r)")
    fig.suptitle(f"One attention head: E = {numbers['loss']:.4f}", fontsize=10)
    fig.savefig(check_plot_path(path), dpi=150)
    return str(path)


def _short(values) -> str:
    return "[" + ", ".join(f"{v:.3f}" for v in values) + "]"


def _gru_step(ax, numbers: dict, spec: dict, s: int, column: float) -> None:
    """Step ``s`` (1-based) of the unrolled GRU: ``x_s`` below, ``h_s`` with its gates and
    ``dE/dh_s`` above, the forward arrows into ``h_s`` and the backward arrow out of it."""
    forward, worked = numbers["forward"], numbers["gradients"]["intermediate"]
    i = s - 1
    _box(ax, column, 0.0, f"x{s}\n{_short(spec['inputs'][i])}", _IDLE, 7)
    gates = (
        f"r = {_short(forward['r'][i])}\nz = {_short(forward['z'][i])}\n"
        f"n = {_short(forward['n'][i])}"
    )
    ax.text(column + 0.55, 1.0, gates, ha="left", va="center", fontsize=6, color="0.3")
    _box(ax, column, 2.0, f"h{s}\n{_short(forward['h'][i])}", _READ, 7)
    ax.annotate(
        "", xy=(column, 1.6), xytext=(column, 0.4), arrowprops={"arrowstyle": "->", "color": "0.4"}
    )
    ax.text(column - 0.08, 1.0, "Wi, bi", ha="right", va="center", fontsize=7)
    ax.annotate(
        "",
        xy=(column - 0.45, 2.05),
        xytext=(column - 1.55, 2.05),
        arrowprops={"arrowstyle": "->", "color": "0.4"},
    )
    ax.text(column - 1.0, 2.2, "Wh, bh", ha="center", va="bottom", fontsize=7)
    ax.annotate(
        "",
        xy=(column - 1.55, 1.8),
        xytext=(column - 0.45, 1.8),
        arrowprops={"arrowstyle": "->", "color": "#b22222", "linestyle": "--"},
    )
    ax.text(
        column,
        2.55,
        f"dE/dh{s} = {_short(worked['h'][i])}",
        ha="center",
        va="bottom",
        fontsize=7,
        color="#b22222",
    )
    terms = numbers["gradients"]["per_step"]["bh"][i]
    ax.text(
        column,
        -0.6,
        f"step {s}'s term of dE/dbh:\n{_short(terms)}",
        ha="center",
        va="top",
        fontsize=6,
    )


def plot_gru_trace(traced, path) -> str:
    """The GRU unrolled over its steps: ``x_t`` under ``h_t`` (gates ``r, z, n`` beside it),
    the shared weights on every forward arrow, ``dE/dh_t`` flowing back along the red dashed
    arrows, and each step's term of ``dE/dbh`` (they add up to the total in the title)."""
    spec, numbers = traced.spec, traced.numbers
    steps = len(spec["inputs"])
    fig = _figure(max(6.0, 2.6 * steps + 2.5), 4.6)
    ax = fig.add_subplot()
    ax.set_axis_off()
    _box(ax, 0.0, 2.0, "h0\n0", _IDLE, 7)
    for s in range(1, steps + 1):
        _gru_step(ax, numbers, spec, s, 2.2 * s)
    last = 2.2 * steps
    loss = f"E = {numbers['loss']:.4f}\ntargets {_short(np.ravel(spec['targets']))}" + (
        "\n(on every h_t)" if np.ndim(spec["targets"]) == 2 else f"\n(on h{steps})"
    )
    ax.text(
        last + 1.9,
        2.0,
        loss,
        ha="left",
        va="center",
        fontsize=7,
        bbox={"facecolor": "#fff3c4", "edgecolor": "0.5"},
    )
    ax.annotate(
        "",
        xy=(last + 1.85, 2.0),
        xytext=(last + 0.95, 2.0),
        arrowprops={"arrowstyle": "->", "color": "0.4"},
    )
    total = _short(numbers["gradients"]["bh"])
    ax.set_title(
        f"GRU unrolled over {steps} steps: the same Wi, Wh, bi, bh at every step; "
        f"dE/dh flows back (red)\neach shared gradient is the sum of its per-step "
        f"terms, e.g. dE/dbh = {total}",
        fontsize=8,
    )
    ax.set_xlim(-0.8, last + 3.6)
    ax.set_ylim(-1.6, 3.0)
    fig.savefig(check_plot_path(path), dpi=150)
    return str(path)


def plot_layer_trace(traced, path) -> str:
    """Draw a :class:`jaxbp.trace.layer_traces.TracedLayer` by its kind."""
    plots = {"conv": plot_conv_trace, "attention": plot_attention_trace, "gru": plot_gru_trace}
    if traced.kind not in plots:
        raise ValueError(f"no plot for a {traced.kind} trace; expected one of: {', '.join(plots)}")
    return plots[traced.kind](traced, path)
