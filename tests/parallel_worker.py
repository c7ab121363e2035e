"""The many-device side of tests/test_parallel.py, run as a subprocess.

JAX fixes its device count when it starts, so the 8-device runs cannot live in the pytest
process (which has one CPU device). This script runs them and writes the results to an
``.npz`` file; the test recomputes the same problems on one device with
``jaxbp.make_train_step`` and compares.

    python tests/parallel_worker.py single OUT.npz
        (XLA_FLAGS=--xla_force_host_platform_device_count=8 set by the caller)
    python tests/parallel_worker.py multi PROCESS_ID PORT OUT.npz
        (one of 2 processes joined through jax.distributed on 127.0.0.1:PORT, 4 devices each)

The problem definitions (``problem``, ``broken_net``, ``CONFIGS``, ``train``) are imported by
the test too, so both sides build exactly the same networks, data and optimizers.
"""

from __future__ import annotations

import os
import sys

STEPS = 3
BATCH = 32
# float64: every optimizer x check mode; float32 (looser tolerance): both optimizers once.
CONFIGS = [
    ("float64", opt, check) for opt in ("sgd", "adam") for check in ("off", "report", "skip")
]
CONFIGS += [("float32", "sgd", "report"), ("float32", "adam", "skip")]


def subprocess_env(devices: int) -> dict:
    """This environment for a worker subprocess that sees ``devices`` simulated CPU devices
    (the flag must be set before JAX starts, hence a new process)."""
    env = dict(os.environ)
    flags = [
        f
        for f in env.get("XLA_FLAGS", "").split()
        if not f.startswith("--xla_force_host_platform_device_count")
    ]
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])
    env["JAX_PLATFORMS"] = "cpu"
    return env


def free_port() -> int:
    """A free TCP port on the loopback address, for jax.distributed's coordinator."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def key_of(dtype, opt, check, tag=""):
    return f"{tag}{dtype}-{opt}-{check}"


def problem(dtype: str):
    """A 5-16-3 tanh classifier, its params and a 32-example batch, all of dtype ``dtype``."""
    import jax
    import jax.numpy as jnp

    import jaxbp

    dt = jnp.dtype(dtype)
    net = jaxbp.serial(jaxbp.Dense(16, dtype=dt), jaxbp.Tanh, jaxbp.Dense(3, dtype=dt))
    _, params = net.init(jax.random.key(0), (-1, 5))
    x = jax.random.normal(jax.random.key(1), (BATCH, 5), dt)
    y = jax.nn.one_hot(jax.random.randint(jax.random.key(2), (BATCH,), 0, 3), 3, dtype=dt)
    return net, params, x, y


def broken_net(dtype: str):
    """The same network whose last layer's backward forgets the batch's *last* example.

    With the batch split over 8 devices that example lives on the last device only: the manual
    gradient is wrong there and right everywhere else, so only a global comparison catches it.
    """
    import jaxbp

    net, params, x, y = problem(dtype)
    first, act, last = net.children

    def backward(p, cache, dy):
        dparams, _ = last.backward(p, cache, dy.at[-1].set(0))
        _, dx = last.backward(p, cache, dy)  # earlier layers stay right: one leaf pair is wrong
        return dparams, dx

    # Still named "Dense": serial rebuilds each layer's init from its registered name.
    bad_last = last._replace(backward=backward)
    return jaxbp.serial(first, act, bad_last), params, x, y


def optimizer(name: str):
    import optax

    import jaxbp

    return jaxbp.sgd(0.5) if name == "sgd" else optax.adam(0.05)


def train(step, opt, params, x, y, steps=STEPS):
    """``steps`` steps from ``params``; returns (final params, losses, applied flags)."""
    import numpy as np

    import jaxbp

    ts = jaxbp.TrainState(params, opt.init(params))
    losses, applied = [], []
    for _ in range(steps):
        ts, metrics = step(ts, x, y)
        losses.append(float(metrics.loss))
        applied.append(bool(metrics.applied))
    return ts.params, np.array(losses), np.array(applied)


def _flat(params):
    import jax
    import numpy as np

    # Replicated arrays are readable on every process, multi-host included.
    return [np.asarray(leaf) for leaf in jax.tree_util.tree_leaves(params)]


def _record(out, name, params, losses, applied):
    for i, leaf in enumerate(_flat(params)):
        out[f"{name}/leaf{i}"] = leaf
    out[f"{name}/loss"] = losses
    out[f"{name}/applied"] = applied


def _broken_skip(out, mesh, tag):
    """check="skip" with a backward that is wrong only on the last device's examples."""
    import numpy as np

    import jaxbp
    from jaxbp import parallel

    net, params, x, y = broken_net("float64")
    opt = optimizer("sgd")
    step = parallel.make_parallel_train_step(
        net, jaxbp.softmax_cross_entropy, opt, "skip", mesh=mesh
    )
    new_ts, metrics = step(jaxbp.TrainState(params, opt.init(params)), x, y)
    new_params = new_ts.params
    shards = [np.asarray(s.data) for s in metrics.applied.addressable_shards]
    out[f"{tag}broken/applied_shards"] = np.array(shards)
    out[f"{tag}broken/reason"] = np.asarray(metrics.reason)
    out[f"{tag}broken/worst_path"] = np.array(metrics.report.worst_path)
    out[f"{tag}broken/rel_error"] = np.asarray(metrics.rel_error)
    out[f"{tag}broken/unchanged"] = np.array(
        all(np.array_equal(a, b) for a, b in zip(_flat(new_params), _flat(params)))
    )


def run_single(path):
    import jax
    import numpy as np

    import jaxbp
    from jaxbp import parallel

    assert jax.device_count() == 8, jax.devices()
    out = {}
    mesh = parallel.data_parallel_mesh()
    for dtype, opt_name, check in CONFIGS:
        net, params, x, y = problem(dtype)
        opt = optimizer(opt_name)
        step = parallel.make_parallel_train_step(
            net, jaxbp.softmax_cross_entropy, opt, check, mesh=mesh
        )
        _record(out, key_of(dtype, opt_name, check), *train(step, opt, params, x, y))
    # A 4-device mesh out of the 8, and params / batch placed beforehand.
    net, params, x, y = problem("float64")
    opt = optimizer("adam")
    mesh4 = parallel.data_parallel_mesh(4)
    step = parallel.make_parallel_train_step(
        net, jaxbp.softmax_cross_entropy, opt, "report", mesh=mesh4
    )
    xs, ys = parallel.shard_batch(mesh4, x, y)
    out["x_shards"] = np.array([s.data.shape[0] for s in xs.addressable_shards])
    _record(
        out,
        key_of("float64", "adam", "report", "mesh4/"),
        *train(step, opt, parallel.replicate(mesh4, params), xs, ys),
    )
    first = jaxbp.TrainState(params, opt.init(params))
    out["loss_sharding"] = np.array(str(step(first, xs, ys)[1].loss.sharding))

    _broken_skip(out, mesh, "")
    # check="raise": the same global decision, raised on the host; params untouched.
    net, params, x, y = broken_net("float64")
    opt = optimizer("sgd")
    step = parallel.make_parallel_train_step(
        net, jaxbp.softmax_cross_entropy, opt, "raise", mesh=mesh
    )
    try:
        step(jaxbp.TrainState(params, opt.init(params)), x, y)
        out["raise_message"] = np.array("")
    except jaxbp.GradientMismatchError as e:
        out["raise_message"] = np.array(str(e))
    # A batch the device count does not divide.
    try:
        step(jaxbp.TrainState(params, opt.init(params)), x[:30], y[:30])
        out["indivisible_message"] = np.array("")
    except ValueError as e:
        out["indivisible_message"] = np.array(str(e))
    _cli_devices(out, os.path.dirname(os.path.abspath(path)))
    np.savez(path, **out)


def _cli_devices(out, folder):
    """``jaxbp train --devices 4`` and ``--devices 1`` on the same data: the same run."""
    import contextlib
    import io
    import json

    import numpy as np

    from jaxbp.cli import main

    for devices in (1, 4):
        run = os.path.join(folder, f"cli{devices}")
        code = main(
            [
                "train",
                "--dataset",
                "xor",
                "--epochs",
                "3",
                "--batch-size",
                "4",
                "--devices",
                str(devices),
                "--progress",
                "none",
                "--out",
                run,
            ]
        )
        out[f"cli{devices}/code"] = np.array(code)
        with open(os.path.join(run, "metrics.json")) as f:
            metrics = json.load(f)
        out[f"cli{devices}/losses"] = np.array([row["loss"] for row in metrics["history"]])
        out[f"cli{devices}/devices"] = np.array(metrics["config"]["devices"])
    # Convolution, BatchNorm (statistics over the global batch) and a GRU, one call per step.
    model = os.path.join(folder, "conv_bn_gru.json")
    with open(model, "w") as f:
        json.dump(
            {
                "model": {
                    "name": "serial",
                    "layers": [
                        {
                            "name": "Conv1D",
                            "out_channels": 4,
                            "kernel_size": 3,
                            "stride": 2,
                            "padding": 1,
                        },
                        {"name": "BatchNorm"},
                        {"name": "Relu"},
                        {"name": "GRU", "hidden": 3},
                        {"name": "Flatten"},
                        {"name": "Dense", "out_dim": 10},
                    ],
                },
                "input_shape": [40, 1],
                "fused": False,
                "augment": {"shift": 2},
            },
            f,
        )
    for devices in (1, 4):
        run = os.path.join(folder, f"bn{devices}")
        code = main(
            [
                "train",
                "--dataset",
                "mnist1d",
                "--model",
                model,
                "--epochs",
                "1",
                "--batch-size",
                "200",
                "--devices",
                str(devices),
                "--progress",
                "none",
                "--out",
                run,
            ]
        )
        out[f"bn{devices}/code"] = np.array(code)
        with open(os.path.join(run, "metrics.json")) as f:
            metrics = json.load(f)
        out[f"bn{devices}/test_loss"] = np.array(metrics["test_loss"])
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(
            [
                "train",
                "--dataset",
                "xor",
                "--batch-size",
                "3",
                "--devices",
                "4",
                "--progress",
                "none",
                "--out",
                os.path.join(folder, "cli_bad"),
            ]
        )
    out["cli_indivisible"] = np.array([str(code), err.getvalue()])


MULTI_CONFIGS = [
    ("float64", "sgd", "report"),
    ("float64", "adam", "skip"),
    ("float32", "adam", "report"),
]


def run_multi(process_id, port, path):
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}",
        num_processes=2,
        process_id=process_id,
        initialization_timeout=60,
    )
    import numpy as np

    import jaxbp
    from jaxbp import parallel

    assert (jax.process_count(), jax.device_count(), jax.local_device_count()) == (2, 8, 4)
    out = {"process_index": np.array(jax.process_index())}
    mesh = parallel.data_parallel_mesh()
    for dtype, opt_name, check in MULTI_CONFIGS:
        net, params, x, y = problem(dtype)
        opt = optimizer(opt_name)
        step = parallel.make_parallel_train_step(
            net, jaxbp.softmax_cross_entropy, opt, check, mesh=mesh
        )
        _record(out, key_of(dtype, opt_name, check), *train(step, opt, params, x, y))
    # Each host loads only its own half of the batch.
    net, params, x, y = problem("float64")
    opt = optimizer("sgd")
    half = BATCH // 2
    mine = slice(process_id * half, (process_id + 1) * half)
    xl, yl = parallel.shard_local_batch(mesh, np.asarray(x)[mine], np.asarray(y)[mine])
    step = parallel.make_parallel_train_step(
        net, jaxbp.softmax_cross_entropy, opt, "report", mesh=mesh
    )
    _record(out, key_of("float64", "sgd", "report", "local/"), *train(step, opt, params, xl, yl))
    _broken_skip(out, mesh, "")
    np.savez(path, **out)
    jax.distributed.shutdown()


# --------------------------------------------------------------------------------------------
# Sharded parameters (tests/test_sharding.py): the gpt and llama presets, small
# --------------------------------------------------------------------------------------------

SHARD_STEPS = 3
SHARD_MODELS = ("gpt", "llama")


def text_problem(model: str):
    """A one-block ``model`` preset (vocab 16, width 16, 2 heads; llama: 1 key/value head),
    float64 params, and 8 windows of 8 tokens with their next tokens."""
    import jax

    import jaxbp
    from jaxbp.presets import gpt_description, llama_description

    if model == "gpt":
        description = gpt_description(16, layers=1, heads=2, width=16, context=8)
    else:
        description = llama_description(16, layers=1, heads=2, kv_heads=1, width=16, hidden=24)
    net = jaxbp.build(description)
    _, params = net.init(jax.random.key(0), (-1, 8))
    tokens = jax.random.randint(jax.random.key(1), (8, 9), 0, 16)
    return net, params, tokens[:, :-1], tokens[:, 1:]


def _sharded_runs(out, mesh, tag=""):
    """Each model: 3 momentum steps on one device and sharded over ``mesh``, and what each device
    holds of the sharded params and optimizer state."""
    import jax
    import numpy as np
    import optax
    from jax.experimental import multihost_utils

    import jaxbp
    from jaxbp import parallel

    for model in SHARD_MODELS:
        net, params, x, y = text_problem(model)
        # Momentum, not Adam: a gradient that is zero in exact arithmetic (the key bias's:
        # softmax ignores a constant shift) is rounding noise that Adam would scale up to a
        # step of ~lr * noise / eps, which then differs with the order of additions.
        opt = optax.sgd(0.1, momentum=0.9)
        name = f"{tag}{model}"
        one = jaxbp.make_train_step(net, jaxbp.softmax_cross_entropy, opt, "report")
        step = parallel.make_parallel_train_step(
            net, jaxbp.softmax_cross_entropy, opt, "report", mesh=mesh, shard_params=True
        )
        for label, fn, ts in (
            ("one", one, jaxbp.TrainState(params, opt.init(params))),
            ("sharded", step, jaxbp.TrainState(params, opt.init(params))),
        ):
            losses, errors = [], []
            for _ in range(SHARD_STEPS):
                ts, metrics = fn(ts, x, y)
                assert bool(metrics.applied), (name, label)
                losses.append(float(metrics.loss))
                errors.append(float(metrics.rel_error))
            out[f"{name}/{label}/loss"] = np.array(losses)
            out[f"{name}/{label}/rel_error"] = np.array(errors)
            for i, leaf in enumerate(jax.tree_util.tree_leaves((ts.params, ts.opt_state))):
                # Sharded arrays span every process: gather them whole on each (the
                # one-device run's arrays are this process's own already).
                whole = (
                    leaf
                    if leaf.is_fully_addressable
                    else multihost_utils.process_allgather(leaf, tiled=True)
                )
                out[f"{name}/{label}/leaf{i}"] = np.asarray(whole)
        # Measured on the state the step returned: it stays split from step to step.
        for part in ("params", "opt_state"):
            tree = getattr(ts, part)
            held = parallel.bytes_per_device(tree)
            out[f"{name}/{part}/per_device"] = np.array([held[d] for d in sorted(held, key=str)])
            out[f"{name}/{part}/total"] = np.array(
                sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(tree))
            )
        out[f"{name}/specs"] = np.array(
            [str(leaf.sharding.spec) for leaf in jax.tree_util.tree_leaves(ts.params)]
        )


def run_sharded(path):
    import jax
    import numpy as np

    from jaxbp import parallel

    assert jax.device_count() == 8, jax.devices()
    out = {}
    _sharded_runs(out, parallel.data_parallel_mesh())
    _sharded_loops(out)
    _cli_sharded(out, os.path.dirname(os.path.abspath(path)))
    np.savez(path, **out)


def _sharded_loops(out):
    """``make_parallel_loop(shard_params=True)``, fused and per step, against ``make_loop`` on
    one device: 4 steps of the 5-16-3 classifier (its last bias, 3 wide, stays replicated)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    import jaxbp
    from jaxbp import parallel
    from jaxbp.train import make_loop

    net, params, x, y = problem("float64")
    opt = optax.sgd(0.1, momentum=0.9)

    def step(ts, xb, yb):
        return jaxbp.train_step(net, jaxbp.softmax_cross_entropy, opt, ts, xb, yb, check="skip")

    order = jnp.arange(BATCH).reshape(4, 8)
    for fused in (True, False):
        ts = jaxbp.TrainState(params, opt.init(params))
        one, _ = make_loop(step, fused=fused)(ts, (x, y), order)
        run = parallel.make_parallel_loop(step, 8, fused=fused, shard_params=True)
        sharded, metrics = run(ts, (x, y), order)
        out[f"loop{int(fused)}/applied"] = np.asarray(metrics.applied)
        out[f"loop{int(fused)}/diff"] = np.array(
            max(
                float(jnp.max(jnp.abs(a - b)))
                for a, b in zip(jax.tree_util.tree_leaves(one), jax.tree_util.tree_leaves(sharded))
            )
        )
        out[f"loop{int(fused)}/specs"] = np.array(
            [str(leaf.sharding.spec) for leaf in jax.tree_util.tree_leaves(sharded.params)]
        )


def _cli_sharded(out, folder):
    """``jaxbp train --devices 4 --shard-params`` trains as ``--devices 1``; a model with
    nothing to split is refused."""
    import contextlib
    import io
    import json

    import numpy as np

    from jaxbp.cli import main

    common = ["train", "--dataset", "digits", "--hidden", "32", "--epochs", "2"]
    common += ["--batch-size", "64", "--progress", "none"]
    for name, flags in (
        ("one", ["--devices", "1"]),
        ("split", ["--devices", "4", "--shard-params"]),
    ):
        run = os.path.join(folder, f"cli-{name}")
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            out[f"cli-{name}/code"] = np.array(main([*common, *flags, "--out", run]))
        with open(os.path.join(run, "metrics.json")) as f:
            metrics = json.load(f)
        out[f"cli-{name}/losses"] = np.array([row["loss"] for row in metrics["history"]])
        out[f"cli-{name}/shard_params"] = np.array(metrics["config"]["shard_params"])
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(
            [*common[:1], "--dataset", "iris", "--hidden", "3", "--batch-size", "8"]
            + ["--devices", "8", "--shard-params", "--progress", "none"]
            + ["--out", os.path.join(folder, "cli-iris")]
        )
    out["cli-unsplittable"] = np.array([str(code), err.getvalue()])


def run_sharded_multi(process_id, port, path):
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}",
        num_processes=2,
        process_id=process_id,
        initialization_timeout=60,
    )
    import numpy as np

    from jaxbp import parallel

    assert (jax.process_count(), jax.device_count(), jax.local_device_count()) == (2, 8, 4)
    out = {"process_index": np.array(jax.process_index())}
    _sharded_runs(out, parallel.data_parallel_mesh())
    np.savez(path, **out)
    jax.distributed.shutdown()


def main(argv):
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    jax.config.update("jax_enable_x64", True)  # as tests/conftest.py does for the test session
    if argv[0] == "single":
        run_single(argv[1])
    elif argv[0] == "multi":
        run_multi(int(argv[1]), int(argv[2]), argv[3])
    elif argv[0] == "sharded":
        run_sharded(argv[1])
    elif argv[0] == "sharded-multi":
        run_sharded_multi(int(argv[1]), int(argv[2]), argv[3])
    else:
        raise SystemExit(f"unknown mode {argv[0]!r}")


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main(sys.argv[1:])
