"""Session-wide JAX settings for the test suite, and the helpers several test files share.

float64 is switched on for the whole session so that gradient checks can be tight (~1e-12);
tests of float32 behaviour pass explicit ``float32`` dtypes.

Equinox-style strictness is applied where it does not fight the code under test: JAX's
``jax_numpy_dtype_promotion="strict"`` breaks inside optax (``1 - decay**count`` mixes a Python
float with an int32 step count) and ``jax_numpy_rank_promotion="raise"`` forbids the
``(batch, out) + (out,)`` bias broadcast every dense layer relies on, so neither is set
globally; tests/test_layers.py and tests/test_losses.py run the pure layer and loss code under
strict dtype promotion locally instead.

Shared fixtures: ``run_cli`` (``jaxbp.cli.main`` in-process, with its output) and
``run_python`` (a script in a fresh interpreter, as a reader runs it).
"""

import os
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import jax
import pytest

jax.config.update("jax_enable_x64", True)

ROOT = Path(__file__).resolve().parent.parent


class CliRun(NamedTuple):
    """What one ``jaxbp`` command did: its exit code and everything it printed."""

    code: int
    out: str
    err: str


@pytest.fixture
def run_cli(capsys):
    """``run_cli("trace", "--format", "json")``: ``jaxbp.cli.main`` on those arguments, in this
    process; returns ``(code, out, err)``. Arguments are passed through ``str`` (paths)."""

    from jaxbp import cli  # after x64 is on, like every test module's imports

    def run(*argv) -> CliRun:
        code = cli.main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return CliRun(code, out, err)

    return run


def fresh_interpreter_env() -> dict[str, str]:
    """The environment of a child interpreter: the shell's JAX_* settings (a GPU platform, x64)
    would change what it prints, so they are dropped and the CPU is asked for."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
    env["JAX_PLATFORMS"] = "cpu"
    return env


@pytest.fixture(scope="session")
def run_python():
    """``run_python(script, *args)``: ``python script args`` in a fresh interpreter from the
    repository root; asserts exit code 0 and returns what it printed on stdout."""

    def run(script, *args, timeout=300) -> str:
        result = subprocess.run(
            [sys.executable, str(script), *map(str, args)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=fresh_interpreter_env(),
            cwd=ROOT,
        )
        assert result.returncode == 0, f"{script} failed:\n{result.stdout}\n{result.stderr}"
        return result.stdout

    return run
