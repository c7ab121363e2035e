"""``make demo`` installs what the demo needs; ``make test`` adds the test extras.

Read with ``make -n -B`` (print every command as on a fresh machine, run none).
"""

from __future__ import annotations

import shutil
import subprocess

import pytest
from conftest import ROOT

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")


def _plan(target: str) -> str:
    return subprocess.run(
        ["make", "-n", "-B", target], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout


def test_demo_installs_only_the_demo_extras():
    plan = _plan("demo")
    assert "pip install -q -e '.[all]'" in plan
    assert "test]" not in plan and "interop" not in plan and "lint" not in plan
    assert "jaxbp trace" in plan and "jaxbp train" in plan


@pytest.mark.parametrize("target", ["test", "test-fast", "lint"])
def test_the_test_targets_add_the_test_extras_to_the_same_venv(target):
    plan = _plan(target)
    assert plan.index("-e '.[all]'") < plan.index("-e '.[all,test]'")
    assert plan.count(" -m venv .venv") == 1
