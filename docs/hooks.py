"""mkdocs hooks for jaxbp's site (named in mkdocs.yml; excluded from the pages themselves).

- The README becomes the page ``readme.md``, its ``docs/...`` links made relative to the site,
  and the docs' own ``../README.md`` links point at it: one story, no copy to keep in step.
- Code written in a docstring, such as ``grads[2]['W']``, reads to Markdown as a reference link
  ``[2]['W']``; such non-names go back to plain text instead of failing the strict build.
- ``api.md``'s ``<!-- backward formulas -->`` marker becomes a table of every layer's backward
  docstring, read from the layers themselves (a backward is a closure inside its constructor,
  which a static reader of the source cannot see).
"""

from __future__ import annotations

import html
import re
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parent.parent
MARKER = "<!-- backward formulas -->"
_AUTOREF = re.compile(
    r'<autoref (?P<attrs>[^>]*?)identifier="(?P<id>[^"]*)"(?P<rest>[^>]*)>'
    r"(?P<title>.*?)</autoref>",
    re.DOTALL,
)
_NAME = re.compile(r"[A-Za-z_][\w.]*\Z")

# One instance of each layer whose backward the API page lists: (what to show, how to make it
# from the jaxbp module).
LAYERS = [
    ("Dense(out_dim)", lambda j: j.Dense(2)),
    ("Sigmoid", lambda j: j.Sigmoid),
    ("Tanh", lambda j: j.Tanh),
    ("Relu", lambda j: j.Relu),
    ("LeakyRelu(slope)", lambda j: j.LeakyRelu(0.01)),
    ("Gelu", lambda j: j.Gelu),
    ("Softplus", lambda j: j.Softplus),
    ("Conv1D(...)", lambda j: j.Conv1D(1, 3)),
    ("Conv2D(...)", lambda j: j.Conv2D(1, (3, 3))),
    ("MaxPool1D(...)", lambda j: j.MaxPool1D(2)),
    ("AvgPool1D(...)", lambda j: j.AvgPool1D(2)),
    ("BatchNorm()", lambda j: j.BatchNorm()),
    ("Dropout(rate)", lambda j: j.Dropout(0.5)),
    ("LayerNorm()", lambda j: j.LayerNorm()),
    ("Embedding(vocab, dim)", lambda j: j.Embedding(4, 2)),
    ("MultiHeadAttention(num_heads)", lambda j: j.MultiHeadAttention(1)),
    ("GRU(hidden)", lambda j: j.GRU(2)),
    ("LSTM(hidden)", lambda j: j.LSTM(2)),
]


def on_files(files, config):
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    readme = re.sub(r"\]\(docs/", "](", readme)
    files.append(File.generated(config, "readme.md", content=readme))
    return files


def _formulas() -> str:
    import inspect

    import jaxbp

    rows = ["| layer | backward (its docstring) |", "|---|---|"]
    for shown, make in LAYERS:
        layer = make(jaxbp)
        doc = inspect.cleandoc(layer.backward.__doc__ or "")
        if not doc:
            raise ValueError(f"{shown}: its backward has no docstring; each states its formula")
        doc = " ".join(doc.split()).replace("|", "\\|")
        rows.append(f"| `jaxbp.{shown}` | {doc} |")
    return "\n".join(rows)


def on_page_markdown(markdown, page, config, files):
    markdown = markdown.replace("](../README.md", "](readme.md")
    if MARKER in markdown:
        markdown = markdown.replace(MARKER, _formulas())
    return markdown


def _plain_unless_name(match: re.Match) -> str:
    identifier = html.unescape(match["id"])
    if _NAME.match(identifier):
        return match[0]
    return f"[{match['title']}][{html.escape(identifier)}]"


def on_page_content(content, page, config, files):
    return _AUTOREF.sub(_plain_unless_name, content)
