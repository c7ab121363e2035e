"""A small document model (sections of blocks) and its renderers: plain text and Markdown; and
the trace's numbers as JSON."""

from __future__ import annotations

from typing import NamedTuple

__all__ = [
    "FORMATS",
    "Section",
    "Block",
    "Lines",
    "Paragraph",
    "Subtitle",
    "Table",
    "render_text",
    "render_markdown",
    "trace_json",
]

FORMATS = ("text", "markdown", "json")


class Lines(NamedTuple):
    """Formula lines, shown as written (indented in text, a code block in Markdown)."""

    lines: list


class Paragraph(NamedTuple):
    text: str


class Subtitle(NamedTuple):
    text: str


class Table(NamedTuple):
    headers: list
    rows: list


# What a section holds, in order.
Block = Lines | Paragraph | Subtitle | Table


class Section(NamedTuple):
    title: str
    blocks: list  # of Block


# --------------------------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------------------------


def _text_table(table: Table) -> list[str]:
    widths = [max(len(str(cell)) for cell in column) for column in zip(table.headers, *table.rows)]

    def row(cells):
        return "  ".join(str(cell).ljust(width) for cell, width in zip(cells, widths)).rstrip()

    return [row(table.headers), row(["-" * width for width in widths])] + [
        row(cells) for cells in table.rows
    ]


def _text_block(block) -> list[str]:
    if isinstance(block, Lines):
        return ["  " + line for line in block.lines]
    if isinstance(block, Paragraph):
        return [block.text]
    if isinstance(block, Subtitle):
        return [f"-- {block.text} --"]
    return ["  " + line for line in _text_table(block)]


def render_text(document: list[Section]) -> str:
    out = []
    for section in document:
        out += [section.title, "=" * len(section.title)]
        for block in section.blocks:
            out += _text_block(block)
        out.append("")
    return "\n".join(out).rstrip() + "\n"


# --------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------


def _markdown_cell(cell) -> str:
    # A bare "|" (the header |diff|) would split the cell and break the table.
    return str(cell).replace("|", "\\|")


def _markdown_table(table: Table) -> list[str]:
    return (
        [
            "| " + " | ".join(map(_markdown_cell, table.headers)) + " |",
            "|" + "|".join("---" for _ in table.headers) + "|",
        ]
        + ["| " + " | ".join(map(_markdown_cell, row)) + " |" for row in table.rows]
        + [""]
    )


def _markdown_block(block) -> list[str]:
    if isinstance(block, Lines):
        return ["```text", *block.lines, "```", ""]
    if isinstance(block, Paragraph):
        return [block.text, ""]
    if isinstance(block, Subtitle):
        return [f"### {block.text}", ""]
    return _markdown_table(block)


def render_markdown(document: list[Section]) -> str:
    out = []
    for index, section in enumerate(document):
        out += [f"{'#' if index == 0 else '##'} {section.title}", ""]
        for block in section.blocks:
            out += _markdown_block(block)
    return "\n".join(out).rstrip() + "\n"


# --------------------------------------------------------------------------------------------
# JSON
# --------------------------------------------------------------------------------------------


def trace_json(trace) -> dict:
    """Exactly the keys ``layers`` (``net``, ``out``), ``errors``, ``loss``, ``gradients``,
    ``updated`` (``weights``, ``bias``, shaped as in the config), ``autodiff_max_abs_diff``
    and, after ``steps``, ``history``. Numbers are floats, arrays nested lists."""
    per_example = (lambda a: a[0].tolist()) if trace.config.single else (lambda a: a.tolist())
    result = {
        "layers": [
            {"net": per_example(layer.net), "out": per_example(layer.out)} for layer in trace.layers
        ],
        "errors": trace.errors.tolist(),
        "loss": float(trace.loss),
        "gradients": [
            {"weights": layer.grad_weights.tolist(), "bias": layer.grad_bias.tolist()}
            for layer in trace.layers
        ],
        "updated": [
            {"weights": layer.final_weights.tolist(), "bias": layer.final_bias.tolist()}
            for layer in trace.layers
        ],
        "autodiff_max_abs_diff": float(trace.autodiff_max_abs_diff),
    }
    if trace.history is not None:
        result["history"] = [float(value) for value in trace.history]
    return result
