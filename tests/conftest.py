"""Session-wide JAX settings for the test suite, and the helpers several test files share.

float64 is switched on for the whole session so that gradient checks can be tight (~1e-12);
tests of float32 behaviour pass explicit ``float32`` dtypes.

Equinox-style strictness is applied where it does not fight the code under test: JAX's
``jax_numpy_dtype_promotion="strict"`` breaks inside optax (``1 - decay**count`` mixes a Python
float with an int32 step count) and ``jax_numpy_rank_promotion="raise"`` forbids the
``(batch, out) + (out,)`` bias broadcast every dense layer relies on, so neither is set
globally; tests/test_layers.py and tests/test_losses.py run the pure layer and loss code under
strict dtype promotion locally instead.

Every compiled XLA:CPU program keeps about 20 memory mappings of its own (LLVM's code and data
sections), and Linux allows a process 65,530 (``vm.max_map_count``). A test worker that has
compiled some 3,000 programs can map no more: the next compile aborts the interpreter ("Fatal
Python error: Aborted" in ``backend_compile_and_load``), late in ``make test``, in whichever
test comes next. :func:`_release_compiled_programs` empties JAX's caches between tests once
the mappings pass a third of that limit.

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


class _CompileCount:
    """Compiles since the last look at this process's memory mappings (module docstring)."""

    since_last_look = 0

    @classmethod
    def listen(cls, event: str, _duration: float, **_) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            cls.since_last_look += 1


jax.monitoring.register_event_duration_secs_listener(_CompileCount.listen)
# ~20 mappings a program: look every 250 compiles, clear above 22,000 (a third of 65,530).
LOOK_EVERY_COMPILES = 250
MAX_MAPPINGS = 22_000


def memory_mappings() -> int:
    """How many memory mappings this process holds (0 where /proc is not there)."""
    try:
        with open("/proc/self/maps", "rb") as maps:
            return maps.read().count(b"\n")
    except OSError:
        return 0


@pytest.fixture(autouse=True)
def _release_compiled_programs():
    """After a test: drop JAX's compiled programs when they hold too many memory mappings.

    Reading /proc/self/maps costs ~1 ms per 1,000 mappings, so it is read only after enough
    compiles; clearing costs the next test a recompile of what it shares with earlier ones.
    """
    yield
    if _CompileCount.since_last_look >= LOOK_EVERY_COMPILES:
        _CompileCount.since_last_look = 0
        if memory_mappings() > MAX_MAPPINGS:
            jax.clear_caches()


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
