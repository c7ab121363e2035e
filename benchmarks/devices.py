"""Step time of the data-parallel verified train step against the device count.

    python -m benchmarks.devices                 # 1, 2, 4, 8 simulated CPU devices
    python -m benchmarks.devices --counts 1 2 --batch 512 --steps 20 --json out.json

Each device count runs in its own Python process, started with
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` (JAX fixes its device count when it
starts). The step is :func:`jaxbp.parallel.make_parallel_train_step` with ``check="report"``
(manual backward + ``jax.grad`` + comparison + adam update) on a fixed *global* batch, so the
work per device shrinks as ``1/N``.

Honest note: simulated CPU devices are threads of one process sharing this machine's cores
(two on the development machine), so the wall-clock time here does not drop like ``1/N``; it
measures the partitioning and all-reduce overhead, not a speed-up. What a real multi-GPU run
would see per device is the FLOP column: XLA's own count for the compiled per-device program
(``compiled.cost_analysis()["flops"]``), next to the matmul FLOPs worked out by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HIDDEN = (1024, 1024)
IN_DIM, OUT_DIM = 256, 10


def matmul_flops(batch: int, dims) -> dict:
    """Matmul FLOPs of one verified step over ``batch`` examples (2 FLOPs per multiply-add).

    forward ``x @ W``: 2·B·in·out per layer, once (the manual path and ``jax.grad``'s compute
    the same forward and XLA computes it once); each backward, the manual one and
    ``jax.grad``'s: ``dW = x.T @ dy``, 2·B·in·out per layer, and ``dx = dy @ W.T``, 2·B·in·out
    for every layer but the first (whose ``dx`` nobody needs, so XLA drops it).
    """
    macs = [a * b for a, b in zip(dims[:-1], dims[1:])]
    forward = 2 * batch * sum(macs)
    backward = 2 * batch * sum(macs) + 2 * batch * sum(macs[1:])
    return {
        "forward": forward,
        "manual_backward": backward,
        "autodiff_backward": backward,
        "total": forward + 2 * backward,
    }


def _worker(devices: int, batch: int, steps: int) -> dict:
    import jax
    import jax.numpy as jnp
    import optax

    import jaxbp
    from jaxbp import parallel

    assert jax.device_count() == devices, (jax.device_count(), devices)
    from benchmarks.mlp import mlp_description

    net = jaxbp.model.build(mlp_description((IN_DIM, *HIDDEN, OUT_DIM), "tanh"))
    _, params = net.init(jax.random.key(0), (-1, IN_DIM))
    x = jax.random.normal(jax.random.key(1), (batch, IN_DIM), jnp.float32)
    y = jax.nn.one_hot(
        jax.random.randint(jax.random.key(2), (batch,), 0, OUT_DIM), OUT_DIM, dtype=jnp.float32
    )
    mesh = parallel.data_parallel_mesh(devices)
    opt = optax.adam(1e-3)
    step = parallel.make_parallel_train_step(
        net, jaxbp.softmax_cross_entropy, opt, "report", mesh=mesh
    )
    x, y = parallel.shard_batch(mesh, x, y)
    ts = parallel.replicate(mesh, jaxbp.init_train_state(net, opt, params))
    t0 = time.perf_counter()
    compiled = step.jitted.lower(ts, x, y).compile()
    compile_s = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    for _ in range(3):  # warm-up
        ts, m = step(ts, x, y)
    jax.block_until_ready(ts)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        ts, m = step(ts, x, y)
        jax.block_until_ready((ts, m))
        times.append(time.perf_counter() - t0)
    times.sort()
    dims = (IN_DIM, *HIDDEN, OUT_DIM)
    return {
        "devices": devices,
        "global_batch": batch,
        "batch_per_device": batch // devices,
        "median_ms": 1e3 * times[len(times) // 2],
        "min_ms": 1e3 * times[0],
        "compile_s": compile_s,
        "xla_flops_per_device": float(cost.get("flops", "nan")),
        "matmul_flops_per_device": matmul_flops(batch // devices, dims)["total"],
        "final_loss": float(m.loss),
        "ok": bool(m.ok),
    }


def _run_count(devices: int, batch: int, steps: int, timeout: float) -> dict:
    env = dict(os.environ)
    flags = [
        f
        for f in env.get("XLA_FLAGS", "").split()
        if not f.startswith("--xla_force_host_platform_device_count")
    ]
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])
    env["JAX_PLATFORMS"] = "cpu"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.devices",
            "--worker",
            str(devices),
            "--batch",
            str(batch),
            "--steps",
            str(steps),
        ],
        env=env,
        cwd=root,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{devices} devices: worker failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.devices", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--counts", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--batch", type=int, default=1024, help="global batch (default 1024)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per count")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per count")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        print(json.dumps(_worker(args.worker, args.batch, args.steps)))
        return 0
    for n in args.counts:
        if n < 1 or args.batch % n:
            parser.error(f"--batch {args.batch} must split evenly over {n} devices")
    dims = (IN_DIM, *HIDDEN, OUT_DIM)
    print(
        f"verified step (check='report', adam), MLP {'-'.join(map(str, dims))}, float32, "
        f"global batch {args.batch}; {os.cpu_count()} CPU cores shared by all simulated "
        f"devices"
    )
    print(
        f"{'devices':>7}  {'batch/dev':>9}  {'median ms':>9}  {'min ms':>7}  "
        f"{'vs 1 dev':>8}  {'XLA GFLOP/dev':>13}  {'matmul GFLOP/dev':>16}"
    )
    rows = []
    for n in args.counts:
        row = _run_count(n, args.batch, args.steps, args.timeout)
        rows.append(row)
        base = rows[0]["median_ms"]
        print(
            f"{n:>7}  {row['batch_per_device']:>9}  {row['median_ms']:>9.2f}  "
            f"{row['min_ms']:>7.2f}  {row['median_ms'] / base:>7.2f}x  "
            f"{row['xla_flops_per_device'] / 1e9:>13.3f}  "
            f"{row['matmul_flops_per_device'] / 1e9:>16.3f}",
            flush=True,
        )
    print(
        "Simulated devices share the same cores: time does not fall as 1/N here. On N real "
        "devices each does the per-device FLOPs above, plus one all-reduce of the gradients."
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
