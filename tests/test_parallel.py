"""Data parallelism (jaxbp.parallel): 8 simulated devices and 2 processes match one device.

The pytest process has one CPU device; the many-device runs happen in subprocesses
(tests/parallel_worker.py) started with ``XLA_FLAGS=--xla_force_host_platform_device_count``,
and their results are compared here with ``jaxbp.make_train_step`` on one device.

Tolerances: the sharded step sums each device's partial gradient and then all-reduces, so only
the order of floating-point additions differs from one device. float64: 1e-12 (measured
~1e-16). float32: 2e-6 relative + 2e-6 absolute on params and losses after 3 steps
(measured ~2e-7).
"""

from __future__ import annotations

import functools
import importlib.util
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxbp
from jaxbp import parallel

HERE = Path(__file__).resolve().parent
WORKER = HERE / "parallel_worker.py"
TIMEOUT = 240  # seconds, per subprocess: generous, the machine is shared

_spec = importlib.util.spec_from_file_location("parallel_worker", WORKER)
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)

TOL = {"float64": dict(rtol=1e-12, atol=1e-12), "float32": dict(rtol=2e-6, atol=2e-6)}


_env = worker.subprocess_env


@functools.cache
def _reference(dtype, opt_name, check, steps=worker.STEPS):
    """The one-device run of the same problem with jaxbp.make_train_step."""
    net, params, x, y = worker.problem(dtype)
    opt = worker.optimizer(opt_name)
    step = jaxbp.make_train_step(net, jaxbp.softmax_cross_entropy, opt, check)
    params, losses, applied = worker.train(step, opt, params, x, y, steps)
    return [np.asarray(leaf) for leaf in jax.tree_util.tree_leaves(params)], losses, applied


def _assert_matches(result, name, dtype, opt_name, check):
    leaves, losses, applied = _reference(dtype, opt_name, check)
    tol = TOL[dtype]
    np.testing.assert_allclose(result[f"{name}/loss"], losses, **tol, err_msg=name)
    np.testing.assert_array_equal(result[f"{name}/applied"], applied, err_msg=name)
    assert applied.all()
    for i, leaf in enumerate(leaves):
        got = result[f"{name}/leaf{i}"]
        assert got.dtype == leaf.dtype == np.dtype(dtype)
        np.testing.assert_allclose(got, leaf, **tol, err_msg=f"{name} leaf {i}")
    # Training did something: params moved and the loss went down.
    initial = jax.tree_util.tree_leaves(worker.problem(dtype)[1])
    assert any(not np.allclose(a, b) for a, b in zip(leaves, initial))
    assert losses[-1] < losses[0]


def _assert_broken_skipped(result, devices):
    # The manual gradient is wrong only for the last example (on the last device): the global
    # comparison catches it, every device holds the same "not applied", nothing changed.
    shards = result["broken/applied_shards"]
    assert shards.shape == (devices,) and not shards.any()
    assert int(result["broken/reason"]) == jaxbp.REASON_MISMATCH
    assert bool(result["broken/unchanged"])
    assert str(result["broken/worst_path"]).startswith("[2]")  # the forgetful last layer
    assert float(result["broken/rel_error"]) > 1e-3


# --------------------------------------------------------------------------------------------
# 8 simulated devices in one process
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def eight(tmp_path_factory):
    out = tmp_path_factory.mktemp("parallel") / "eight.npz"
    proc = subprocess.run(
        [sys.executable, str(WORKER), "single", str(out)],
        env=_env(8),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return dict(np.load(out))


# One test per subprocess: pytest-xdist runs a module-scoped fixture once per worker, so tests
# split across workers would start the subprocess twice.
@pytest.mark.slow
def test_eight_devices_match_one(eight):
    for dtype, opt_name, check in worker.CONFIGS:
        _assert_matches(eight, worker.key_of(dtype, opt_name, check), dtype, opt_name, check)
    # A 4-device mesh out of the 8, with params and batch placed beforehand.
    assert eight["x_shards"].tolist() == [8, 8, 8, 8]  # 32 examples, 8 per device
    assert "spec=P()" in str(eight["loss_sharding"])  # metrics are replicated
    _assert_matches(eight, "mesh4/float64-adam-report", "float64", "adam", "report")
    # skip and raise: one global decision.
    _assert_broken_skipped(eight, 8)
    message = str(eight["raise_message"])
    # make_train_step's error, culprit located: the parallel step is that step.
    assert message.startswith("layer serial[2] (Dense): db disagrees with jax.vjp")
    assert "MISMATCH: worst leaf [2]['b']" in message
    assert "nothing was updated" in message
    # A batch the device count does not divide.
    message = str(eight["indivisible_message"])
    assert "data parallel over 8 devices: a batch of 30 examples" in message
    assert "multiple of 8, such as 24 or 32" in message
    # The CLI: `jaxbp train --devices 4` trains exactly as --devices 1 (float32 trainer).
    for devices in (1, 4):
        assert int(eight[f"cli{devices}/code"]) == 0
        assert int(eight[f"cli{devices}/devices"]) == devices
    np.testing.assert_allclose(eight["cli4/losses"], eight["cli1/losses"], **TOL["float32"])
    assert eight["cli1/losses"][-1] < eight["cli1/losses"][0]
    # A conv + BatchNorm + GRU model file: BatchNorm's statistics are the global batch's, so
    # 4 devices train exactly as 1.
    for devices in (1, 4):
        assert int(eight[f"bn{devices}/code"]) == 0
    np.testing.assert_allclose(eight["bn4/test_loss"], eight["bn1/test_loss"], rtol=1e-5)
    code, err = eight["cli_indivisible"]
    assert code == "2"
    assert err.startswith("jaxbp train: error: data parallel over 4 devices: a batch of 3")


# --------------------------------------------------------------------------------------------
# 2 processes x 4 devices, joined through jax.distributed on the loopback address
# --------------------------------------------------------------------------------------------


_free_port = worker.free_port


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multiprocess")
    port = _free_port()
    outs = [tmp / f"process{i}.npz" for i in range(2)]
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), "multi", str(i), str(port), str(outs[i])],
            env=_env(4),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=TIMEOUT)[0])
    finally:
        for p in procs:  # a process stuck waiting for its peer must not outlive the test
            if p.poll() is None:
                p.kill()
                p.communicate()
    for i, p in enumerate(procs):
        assert p.returncode == 0, f"process {i}:\n{logs[i][-4000:] if i < len(logs) else ''}"
    return [dict(np.load(out)) for out in outs]


@pytest.mark.slow
def test_two_processes_match_one_device(two_processes):
    for result in two_processes:
        _assert_broken_skipped(result, 4)  # each process sees its own 4 devices' copies
    for i, result in enumerate(two_processes):
        assert int(result["process_index"]) == i
        for dtype, opt_name, check in worker.MULTI_CONFIGS:
            _assert_matches(result, worker.key_of(dtype, opt_name, check), dtype, opt_name, check)
        # Each process passed only its own half of the batch: the same global batch.
        _assert_matches(result, "local/float64-sgd-report", "float64", "sgd", "report")
    # Both hosts hold bit-identical replicated params.
    a, b = two_processes
    for key in a:
        if key != "process_index" and "shards" not in key:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


# --------------------------------------------------------------------------------------------
# In this process: one device, the API and its errors
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mesh1():
    return parallel.data_parallel_mesh()


def test_default_mesh_spans_all_devices(mesh1):
    assert mesh1.axis_names == ("batch",)
    assert mesh1.size == jax.device_count() == 1
    assert parallel.batch_sharding(mesh1).spec == jax.sharding.PartitionSpec("batch")
    assert parallel.replicated_sharding(mesh1).spec == jax.sharding.PartitionSpec()


@pytest.mark.slow
@pytest.mark.parametrize("dtype,check", [("float64", "skip"), ("float32", "report")])
def test_one_device_mesh_is_bitwise_make_train_step(mesh1, dtype, check):
    net, params, x, y = worker.problem(dtype)
    opt = optax.adam(0.05)
    ref = jaxbp.make_train_step(net, jaxbp.softmax_cross_entropy, opt, check)
    par = parallel.make_parallel_train_step(
        net, jaxbp.softmax_cross_entropy, opt, check, mesh=mesh1
    )
    ref_params, ref_losses, _ = worker.train(ref, opt, params, x, y, steps=2)
    par_params, par_losses, _ = worker.train(par, opt, params, x, y, steps=2)
    np.testing.assert_array_equal(par_losses, ref_losses)
    for a, b in zip(jax.tree_util.tree_leaves(par_params), jax.tree_util.tree_leaves(ref_params)):
        assert a.dtype == b.dtype == jnp.dtype(dtype)
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_metrics_and_outputs_are_replicated(mesh1):
    net, params, x, y = worker.problem("float64")
    opt = jaxbp.sgd(0.5)
    step = parallel.make_parallel_train_step(net, "softmax_cross_entropy", opt, mesh=mesh1)
    new_ts, metrics = step(jaxbp.TrainState(params, opt.init(params)), x, y)
    assert step.mesh is mesh1
    rep = parallel.replicated_sharding(mesh1)
    for leaf in jax.tree_util.tree_leaves((new_ts, metrics)):
        assert leaf.sharding.is_equivalent_to(rep, leaf.ndim)
    assert isinstance(metrics, jaxbp.StepMetrics)
    assert bool(metrics.ok) and float(metrics.rel_error) < 1e-12


@pytest.mark.slow  # make_train_step's raise locates the culprit layer: ~6 s of compiling
def test_raise_on_one_device_names_the_leaf(mesh1):
    net, params, x, y = worker.broken_net("float64")
    opt = jaxbp.sgd(0.5)
    step = parallel.make_parallel_train_step(
        net, jaxbp.softmax_cross_entropy, opt, "raise", mesh=mesh1
    )
    with pytest.raises(jaxbp.GradientMismatchError) as info:
        step(jaxbp.TrainState(params, opt.init(params)), x, y)
    assert info.value.report.worst_path.startswith("[2]")


def test_donate_reuses_buffers(mesh1):
    net, params, x, y = worker.problem("float64")
    opt = jaxbp.sgd(0.5)
    ref = jaxbp.make_train_step(net, jaxbp.softmax_cross_entropy, opt, "off")
    step = parallel.make_parallel_train_step(
        net, jaxbp.softmax_cross_entropy, opt, "off", mesh=mesh1, donate=True
    )
    expected = ref(jaxbp.TrainState(params, opt.init(params)), x, y)[0].params
    placed = parallel.replicate(mesh1, jaxbp.TrainState(params, opt.init(params)))
    new_params = step(placed, x, y)[0].params
    assert jax.tree_util.tree_leaves(placed)[0].is_deleted()
    for a, b in zip(jax.tree_util.tree_leaves(new_params), jax.tree_util.tree_leaves(expected)):
        np.testing.assert_array_equal(a, b)


def test_shard_batch_and_replicate_place_on_the_mesh(mesh1):
    x = np.ones((4, 3), np.float32)
    xs, ys = parallel.shard_batch(mesh1, x, np.zeros(4, np.int32))
    assert xs.sharding == parallel.batch_sharding(mesh1) and xs.dtype == np.float32
    assert ys.shape == (4,)
    assert parallel.shard_batch(mesh1, xs, ys)[0] is xs  # already placed: no copy
    tree = parallel.replicate(mesh1, {"W": np.eye(2), "count": 3})
    assert tree["W"].sharding == parallel.replicated_sharding(mesh1)
    xl, _ = parallel.shard_local_batch(mesh1, x, x)
    np.testing.assert_array_equal(xl, x)


def test_errors(mesh1):
    with pytest.raises(
        ValueError,
        match="asked for 2 devices, but JAX sees only 1 .*xla_force_host_platform_device_count=2",
    ):
        parallel.data_parallel_mesh(2)
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="num_devices must be a positive integer"):
            parallel.data_parallel_mesh(bad)
    with pytest.raises(TypeError, match="mesh must be a jax.sharding.Mesh"):
        parallel.make_parallel_train_step(jaxbp.Dense(2), "mse", jaxbp.sgd(0.1), mesh="cpu")
    with pytest.raises(ValueError, match="unknown check mode 'always'"):
        parallel.make_parallel_train_step(
            jaxbp.Dense(2), "mse", jaxbp.sgd(0.1), "always", mesh=mesh1
        )
    with pytest.raises(TypeError, match="optimizer must be an optax GradientTransformation"):
        parallel.make_parallel_train_step(jaxbp.Dense(2), "mse", 0.1, mesh=mesh1)
    with pytest.raises(ValueError, match="x is a scalar; it needs a leading batch axis"):
        parallel.shard_batch(mesh1, 1.0, 1.0)


def test_cli_devices_beyond_what_jax_sees(tmp_path, capsys):
    from jaxbp.cli import main

    code = main(
        [
            "train",
            "--dataset",
            "xor",
            "--devices",
            "2",
            "--progress",
            "none",
            "--out",
            str(tmp_path / "run"),
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith(
        "jaxbp train: error: data_parallel_mesh: asked for 2 devices, but JAX sees only 1 (cpu)"
    )
    assert "XLA_FLAGS=--xla_force_host_platform_device_count=2" in err
    assert main(["train", "--devices", "0"]) == 2  # argparse: a positive integer
