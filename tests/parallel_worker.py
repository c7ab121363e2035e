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


def main(argv):
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    jax.config.update("jax_enable_x64", True)  # as tests/conftest.py does for the test session
    if argv[0] == "single":
        run_single(argv[1])
    elif argv[0] == "multi":
        run_multi(int(argv[1]), int(argv[2]), argv[3])
    else:
        raise SystemExit(f"unknown mode {argv[0]!r}")


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main(sys.argv[1:])
