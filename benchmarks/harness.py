"""Timing machinery shared by every workload: interleaved rounds, medians, compile times.

Variants of one workload are timed side by side: each round runs every variant once (in a
rotating order), so a burst of load on a shared machine hits them all alike and the ratios
stay meaningful even when the absolute times move. A variant is a ``run(n)`` callable that
performs ``n`` training steps (or one whole job) and blocks until the result is ready.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp


def compile_timed(jitted, *args):
    """AOT-compile ``jitted`` for ``args``: returns ``(compiled, seconds)``."""
    start = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    return compiled, time.perf_counter() - start


# Seconds of idle time before each timed run. BLAS and OpenMP worker threads busy-wait for a
# while after a call returns (OpenBLAS for up to ~0.1 s): a variant timed right after numpy or
# PyTorch would share the cores with their spinning threads. Measured here: XLA's 1024^3 GEMM
# ran at 128 GFLOP/s right after three numpy GEMMs, 182 alone or after a 0.2 s pause.
SETTLE_S = 0.2


def measure(
    variants: dict[str, Callable[[int], None]],
    *,
    steps: int,
    rounds: int,
    warmup: int = 1,
    settle: float | None = None,
) -> dict[str, dict]:
    """Median seconds per step of each variant over ``rounds`` interleaved rounds.

    ``steps`` is a dict name -> steps per round, or one number for all. ``settle`` seconds of
    idle time precede every timed run (default ``SETTLE_S``, read at call time so that a smoke
    run can set it to 0); they are not part of the timing.
    """
    settle = SETTLE_S if settle is None else settle
    names = list(variants)
    per = steps if isinstance(steps, dict) else {n: steps for n in names}
    for name in names:
        for _ in range(warmup):
            variants[name](per[name])
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            if settle:
                time.sleep(settle)
            start = time.perf_counter()
            variants[name](per[name])
            samples[name].append((time.perf_counter() - start) / per[name])
    out = {}
    for name in names:
        s = sorted(samples[name])
        out[name] = {
            "median_s": statistics.median(s),
            "min_s": s[0],
            "max_s": s[-1],
            "rounds": rounds,
            "steps_per_round": per[name],
        }
    return out


def gemm_ceiling(*, rounds: int, size: int = 1024) -> dict:
    """float32 ``size^3`` GEMM GFLOP/s through XLA (and numpy's BLAS, for reference)."""
    import numpy as np

    a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (size, size), jnp.float32)
    mm, compile_s = compile_timed(jax.jit(jnp.matmul), a, b)
    an, bn = np.asarray(a), np.asarray(b)

    def run_jax(n):
        out = None
        for _ in range(n):
            out = mm(a, b)
        out.block_until_ready()

    def run_numpy(n):
        for _ in range(n):
            an @ bn

    reps = 8 if size >= 512 else 20
    t = measure({"xla": run_jax, "numpy": run_numpy}, steps=reps, rounds=rounds)
    flops = 2.0 * size**3
    # A ceiling is the best the machine did: the fastest round, not the median.
    return {
        "size": size,
        "flops": flops,
        "compile_s": compile_s,
        "gflops": flops / t["xla"]["min_s"] / 1e9,
        "numpy_gflops": flops / t["numpy"]["min_s"] / 1e9,
        "median_gflops": flops / t["xla"]["median_s"] / 1e9,
        "best_s": t["xla"]["min_s"],
    }


def blas_info() -> list[dict]:
    """numpy's BLAS library and the kernel it runs (threadpoolctl), if threadpoolctl is there."""
    import numpy

    try:
        import threadpoolctl
    except ImportError:  # no threadpoolctl: numpy's build config names the library at least
        try:
            blas = numpy.show_config(mode="dicts")["Build Dependencies"]["blas"]
            return [
                {
                    "internal_api": blas.get("name"),
                    "version": blas.get("version"),
                    "architecture": None,
                    "num_threads": None,
                }
            ]
        except Exception:  # the layout of show_config varies across numpy versions
            return []
    keys = ("internal_api", "version", "architecture", "num_threads")
    return [
        {k: info.get(k) for k in keys}
        for info in threadpoolctl.threadpool_info()
        if info.get("user_api") == "blas"
    ]


def machine_info() -> dict:
    """What the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    import numpy

    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "numpy": numpy.__version__,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "openblas_env": {k: os.environ.get(k) for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")},
        "blas": blas_info(),
        "load_average": load,
    }
    try:
        import torch

        info["torch"] = torch.__version__
    except ImportError:
        info["torch"] = None
    return info
