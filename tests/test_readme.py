"""The README's Python API snippet runs as written: ``x`` and ``y`` are defined in it."""

from __future__ import annotations

import contextlib
import io
import re

import jax.numpy as jnp
import pytest
from conftest import ROOT


def _api_snippet() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## The Python API") :]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "the README's API section has no python block"
    return match.group(1)


@pytest.mark.slow  # compiles the jitted, checked step: about 10 s of CPU
def test_the_api_snippet_runs():
    scope: dict = {}
    with contextlib.redirect_stdout(io.StringIO()) as out:
        exec(compile(_api_snippet(), "README.md", "exec"), scope)
    metrics = scope["metrics"]
    assert scope["x"].shape == (32, 784) and scope["y"].shape == (32,)
    assert bool(metrics.ok) and bool(metrics.applied)
    assert jnp.isfinite(metrics.loss) and "W" in out.getvalue()
