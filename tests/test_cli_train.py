"""`jaxbp train` through its real entry points: flags, files, exit codes, kill and resume.

In-process runs use ``jaxbp.cli.main``; the fault tests (SIGKILL, Ctrl-C) run the real command
in a subprocess, on xor.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import jaxbp
from jaxbp import cli
from jaxbp.checkpoint import CheckpointError, load_checkpoint, read_header


def one_line_error(err):
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("jaxbp train: error: "), err
    assert "Traceback" not in err
    return lines[0]


# --------------------------------------------------------------------------------------------
# A small real run, in process
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def iris_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("iris")
    code = cli.main(
        ["train", "--dataset", "iris", "--epochs", "4", "--out", str(out), "--progress", "lines"]
    )
    return code, out


@pytest.mark.slow
def test_run_writes_metrics_curves_checkpoint(iris_run):
    code, out = iris_run
    assert code == 0
    m = json.loads((out / "metrics.json").read_text())
    for key in (
        "train_accuracy",
        "test_accuracy",
        "final_loss",
        "max_grad_rel_error",
        "steps",
        "seconds",
    ):
        assert key in m, key
    assert 0.5 <= m["test_accuracy"] <= 1.0 and 0.5 <= m["train_accuracy"] <= 1.0
    assert m["steps"] == 4 * m["steps_per_epoch"] and m["epochs"] == 4
    assert 0.0 <= m["max_grad_rel_error"] < 2e-3 and m["check"] == "report"
    assert m["final_loss"] > 0 and m["seconds"] > 0
    assert m["config"]["hidden"] == [16] and m["config"]["activation"] == "tanh"  # iris defaults
    assert (out / "curves.png").stat().st_size > 1000
    assert read_header(out / "checkpoint.npz")["epoch"] == 4


@pytest.mark.slow
def test_output_lines(run_cli, tmp_path):
    code, out, err = run_cli(
        "train", "--dataset", "xor", "--epochs", "30", "--out", str(tmp_path), "--progress", "lines"
    )
    assert code == 0
    assert "test accuracy" in out and "manual vs jax.grad: worst relative error" in out
    # not a terminal: plain lines, about ten, not one per epoch
    progress = [l for l in err.splitlines() if l.startswith("xor epoch")]
    assert 3 <= len(progress) <= 11, err
    assert progress[-1].startswith("xor epoch 30/30")
    assert f"wrote {tmp_path}/metrics.json, curves.png, checkpoint.npz" in out


@pytest.mark.slow
def test_without_matplotlib_no_plot_is_claimed(run_cli, tmp_path, monkeypatch):
    """matplotlib is an optional extra: the run completes and says what it did write."""
    monkeypatch.setitem(sys.modules, "jaxbp.plots", None)  # ``from ..plots import`` fails
    code, out, err = run_cli("train", "--dataset", "xor", "--epochs", "2", "--out", tmp_path)
    assert code == 0, err
    assert f"wrote {tmp_path}/metrics.json, checkpoint.npz" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.npz", "metrics.json"]


@pytest.mark.slow
def test_resume_finished_run_and_contradicting_flags(run_cli, iris_run):
    _, out = iris_run
    code, text, err = run_cli("train", "--resume", "--out", str(out), "--progress", "none")
    assert code == 0, err  # nothing left to do; the run's own settings were used
    assert "iris" in text
    code, _, err = run_cli("train", "--resume", "--out", str(out), "--hidden", "32")
    assert code == 2
    assert "--resume: hidden is 32 but the checkpoint's run used 16" in one_line_error(err)


@pytest.mark.slow
def test_corrupted_checkpoint_is_one_line(run_cli, tmp_path):
    ck = tmp_path / "checkpoint.npz"
    assert run_cli("train", "--dataset", "xor", "--epochs", "2", "--out", tmp_path).code == 0
    data = bytearray(ck.read_bytes())
    ck.write_bytes(bytes(data[:-40]))
    code, _, err = run_cli("train", "--resume", "--out", str(tmp_path))
    assert code == 2
    assert f"checkpoint {ck} is truncated or corrupted" in one_line_error(err)


@pytest.mark.slow
def test_blow_up_stops_with_exit_3(run_cli, tmp_path):
    code, _, err = run_cli(
        "train",
        "--dataset",
        "iris",
        "--optimizer",
        "sgd",
        "--lr",
        "1e38",
        "--epochs",
        "20",
        "--max-bad-steps",
        "3",
        "--out",
        str(tmp_path),
        "--progress",
        "none",
    )
    assert code == 3
    assert "stopped after" in err and "--max-bad-steps 3" in err
    assert "last good checkpoint (epoch 0)" in err
    ck = load_checkpoint(tmp_path / "checkpoint.npz")
    assert all(np.all(np.isfinite(a)) for a in ck.state["params"].values())


# --------------------------------------------------------------------------------------------
# Bad flags: one line, exit 2
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args,expect",
    [
        (["--dataset", "cifar"], "invalid choice: 'cifar'"),
        (["--hidden", "0"], "expected comma-separated positive layer widths"),
        (["--hidden", "12,a"], "expected comma-separated positive layer widths"),
        (["--hidden", ""], "expected comma-separated positive layer widths"),
        (["--activation", "swish"], "invalid choice: 'swish'"),
        (["--output-activation", "softmax"], "invalid choice: 'softmax'"),
        (["--loss", "hinge"], "invalid choice: 'hinge'"),
        (["--optimizer", "rmsprop"], "invalid choice: 'rmsprop'"),
        (["--lr", "0"], "expected a positive finite number, got '0'"),
        (["--lr", "-1"], "expected a positive finite number"),
        (["--lr", "nan"], "expected a positive finite number"),
        (["--lr", "inf"], "expected a positive finite number"),
        (["--lr", "fast"], "expected a number, got 'fast'"),
        (["--schedule", "step"], "invalid choice: 'step'"),
        (["--weight-decay", "-0.1"], "expected a finite number >= 0"),
        (["--epochs", "0"], "expected a positive integer, got '0'"),
        (["--epochs", "2.5"], "expected a positive integer, got '2.5'"),
        (["--batch-size", "-3"], "expected a positive integer"),
        (["--seed", "-1"], r"expected a seed in [0, 2**32)"),
        (["--seed", "x"], "expected an integer seed"),
        (["--check", "maybe"], "invalid choice: 'maybe'"),
        (["--max-bad-steps", "0"], "expected a positive integer"),
        (["--checkpoint-every", "0"], "expected a positive integer"),
        (["--progress", "fancy"], "invalid choice: 'fancy'"),
        (["--bogus"], "unrecognized arguments: --bogus"),
        (
            ["--dataset", "iris", "--batch-size", "500"],
            "batch_size must be between 1 and the number of training examples (",
        ),
        (
            ["--dataset", "seed", "--loss", "softmax_cross_entropy"],
            "loss softmax_cross_entropy needs a classification dataset",
        ),
    ],
)
def test_bad_flag_is_one_line_exit_2(run_cli, tmp_path, args, expect):
    code, out, err = run_cli("train", *args, "--out", str(tmp_path / "o"), "--progress", "none")
    assert code == 2
    assert expect in one_line_error(err)


def test_out_that_is_a_file_is_one_line(run_cli, tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    code, _, err = run_cli("train", "--dataset", "xor", "--epochs", "1", "--out", str(f))
    assert code == 2
    assert f"the output folder {str(f)!r} is a file; expected a folder" in one_line_error(err)
    assert f.read_text() == "x"


def test_flag_choices_match_the_library():
    import argparse

    from jaxbp.commands import train as cmd
    from jaxbp.data import DATASETS, SEQUENCE_DATASETS
    from jaxbp.training import OPTIMIZERS, SCHEDULES

    p = argparse.ArgumentParser()
    cmd.add_arguments(p)
    choices = {a.dest: a.choices for a in p._actions if a.choices}
    assert sorted(choices["dataset"]) == sorted(DATASETS + SEQUENCE_DATASETS)
    assert sorted(choices["activation"]) == sorted(jaxbp.ACTIVATIONS)
    assert sorted(choices["loss"]) == sorted(jaxbp.LOSSES)
    assert sorted(choices["check"]) == sorted(jaxbp.CHECK_MODES)
    assert tuple(choices["optimizer"]) == OPTIMIZERS
    assert tuple(choices["schedule"]) == SCHEDULES


def test_help_lists_every_flag(capsys):
    assert cli.main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    for flag in (
        "--dataset",
        "--hidden",
        "--activation",
        "--loss",
        "--optimizer",
        "--lr",
        "--epochs",
        "--batch-size",
        "--seed",
        "--check",
        "--out",
        "--resume",
        "--max-bad-steps",
        "--checkpoint-every",
    ):
        assert flag in out


# --------------------------------------------------------------------------------------------
# Faults in a real process: SIGKILL at random moments, Ctrl-C
# --------------------------------------------------------------------------------------------


def _command():
    script = Path(sys.executable).parent / "jaxbp"  # the installed console script
    return [str(script)] if script.exists() else [sys.executable, "-m", "jaxbp.cli"]


def _env():
    env = dict(os.environ)
    env.pop("JAXBP_DEBUG", None)
    return env


def _xor_command(out, epochs=100, *flags):
    """``jaxbp train`` on xor for ``epochs`` epochs into ``out``, a checkpoint every epoch."""
    args = f"train --dataset xor --epochs {epochs} --checkpoint-every 1 --progress lines".split()
    return _command() + args + ["--out", str(out), *flags]


def _run_to_the_end(command):
    proc = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr


def _params_bytes(path):
    ck = load_checkpoint(path)
    return {k: v.tobytes() for k, v in ck.state["params"].items()}, {
        k: v.tobytes() for k, v in ck.state["opt_state"].items()
    }


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run, in its own process like the interrupted ones."""
    out = tmp_path_factory.mktemp("reference")
    _run_to_the_end(_xor_command(out))
    assert read_header(out / "checkpoint.npz")["epoch"] == 100
    return _params_bytes(out / "checkpoint.npz")


def _wait_for_epoch(path, above, proc, timeout=120):
    """Poll until the checkpoint at ``path`` is past epoch ``above`` (or the process ends)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if read_header(path)["epoch"] > above:
                return True
        except CheckpointError:  # not there yet (never a partial one: see the assert below)
            assert not path.exists() or read_header(path)
        time.sleep(0.01)
    return False


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_is_bit_identical(reference, tmp_path):
    ck = tmp_path / "checkpoint.npz"
    rng = random.Random(1234)
    seen = []
    for _ in range(3):
        proc = subprocess.Popen(
            _xor_command(tmp_path, 100, "--resume"),
            env=_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            last = read_header(ck)["epoch"] if ck.exists() else -1
            _wait_for_epoch(ck, last, proc)
            time.sleep(rng.uniform(0.0, 0.15))  # somewhere in the next epochs, maybe mid-write
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=60)
        header = read_header(ck)  # whatever the moment, the checkpoint on disk loads
        load_checkpoint(ck)
        seen.append(header["epoch"])
    assert seen == sorted(seen) and seen[-1] > 0, seen
    print(f"SIGKILLed at checkpoint epochs {seen}")  # shown with pytest -s
    _run_to_the_end(_xor_command(tmp_path, 100, "--resume"))
    assert read_header(ck)["epoch"] == 100
    assert _params_bytes(ck) == reference  # params and optimizer state, bit for bit
    assert not list(tmp_path.glob(".checkpoint.npz.*.tmp"))  # stale temporaries cleaned up


@pytest.mark.slow
def test_ctrl_c_saves_checkpoint_exit_130_and_resumes_identically(reference, tmp_path):
    # 100000 epochs: the run cannot finish before the signal lands, so this tests every time.
    ck = tmp_path / "checkpoint.npz"
    proc = subprocess.Popen(
        _xor_command(tmp_path, 100000),
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert _wait_for_epoch(ck, 0, proc), "training never reached epoch 1"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted at epoch" in err and f"continue with --resume --out {tmp_path}" in err
    stopped = read_header(ck)["epoch"]
    assert 1 <= stopped < 100000
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["status"] == "interrupted" and m["epochs"] == stopped
    # A constant learning rate does not depend on the number of epochs: resume to 100 (or
    # just past where it stopped) and compare with an uninterrupted run of that length.
    end = max(100, stopped + 1)
    if end == 100:
        expected = reference
    else:
        _run_to_the_end(_xor_command(tmp_path / "ref", end))
        expected = _params_bytes(tmp_path / "ref" / "checkpoint.npz")
    _run_to_the_end(_xor_command(tmp_path, end, "--resume"))
    assert read_header(ck)["epoch"] == end
    assert _params_bytes(ck) == expected


# --------------------------------------------------------------------------------------------
# --model: presets, description files, and the checkpoint's description on resume
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_model_file_trains_and_resume_rebuilds_from_checkpoint(run_cli, tmp_path):
    model = {
        "name": "serial",
        "layers": [
            {"name": "Dense", "out_dim": 6},
            {"name": "BatchNorm"},
            {"name": "Tanh"},
            {"name": "Dropout", "rate": 0.1},
            {"name": "Dense", "out_dim": 2},
        ],
    }
    path = tmp_path / "model.json"
    path.write_text(json.dumps(model))
    out = tmp_path / "run"
    code, text, err = run_cli(
        "train",
        "--dataset",
        "xor",
        "--model",
        str(path),
        "--epochs",
        "3",
        "--out",
        str(out),
        "--progress",
        "none",
    )
    assert code == 0, err
    m = json.loads((out / "metrics.json").read_text())
    assert m["preset"] == "file" and m["fused"] is True and m["augment"] is None
    assert [l["name"] for l in m["network"]["layers"]] == [
        "Dense",
        "BatchNorm",
        "Tanh",
        "Dropout",
        "Dense",
    ]
    assert 0.0 <= m["max_grad_rel_error"] < 2e-3
    ck = load_checkpoint(out / "checkpoint.npz")
    assert set(ck.state) == {"params", "opt_state", "state", "key"}  # BatchNorm, Dropout key
    path.unlink()  # resume needs nothing but the checkpoint
    code, _, err = run_cli(
        "train", "--resume", "--out", str(out), "--epochs", "5", "--progress", "none"
    )
    assert code == 0, err
    assert read_header(out / "checkpoint.npz")["epoch"] == 5
    # the same 5 epochs without interruption: bit-identical state, layer state and key
    again = tmp_path / "again.json"
    again.write_text(json.dumps(model))
    code, _, err = run_cli(
        "train",
        "--dataset",
        "xor",
        "--model",
        str(again),
        "--epochs",
        "5",
        "--out",
        str(tmp_path / "straight"),
        "--progress",
        "none",
    )
    assert code == 0, err
    a = load_checkpoint(out / "checkpoint.npz").state
    b = load_checkpoint(tmp_path / "straight" / "checkpoint.npz").state
    for group in a:
        assert {k: v.tobytes() for k, v in a[group].items()} == {
            k: v.tobytes() for k, v in b[group].items()
        }, group


@pytest.mark.slow
def test_preset_file_names_its_data_set(run_cli, tmp_path, monkeypatch):
    """A preset file's ``"dataset"`` chooses the data set (and so the default ``--out``);
    ``--dataset`` still wins."""
    from jaxbp.training import TrainConfig
    from jaxbp.training.model import dataset_name

    net = {"name": "serial", "layers": [{"name": "Dense", "out_dim": 8}, {"name": "Tanh"}]}
    net["layers"].append({"name": "Dense", "out_dim": 3})
    path = tmp_path / "iris_model.json"
    path.write_text(json.dumps({"model": net, "dataset": "iris", "epochs": 2}))
    assert dataset_name(TrainConfig(model=str(path))) == "iris"
    assert dataset_name(TrainConfig(model=str(path), dataset="digits")) == "digits"
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli("train", "--model", path.name, "--progress", "none")
    assert code == 0, err
    assert out.startswith("iris: 'iris_model.json', adam") and ", 2 epochs," in out.splitlines()[0]
    assert json.loads(Path("runs/iris/metrics.json").read_text())["dataset"] == "iris"
    path.write_text(json.dumps({"model": net, "dataset": 3}))
    code, _, err = run_cli("train", "--model", path.name, "--out", tmp_path / "bad")
    assert code == 2
    assert "model 'iris_model.json': \"dataset\" must be a data set name, got 3" in one_line_error(
        err
    )
    # The MLP's fields would shape nothing here: the description is the network.
    path.write_text(json.dumps({"model": net, "dataset": "iris", "hidden": [5]}))
    code, _, err = run_cli("train", "--model", path.name, "--out", tmp_path / "bad")
    assert code == 2
    assert (
        "model 'iris_model.json': hidden belongs to the mlp preset and would change nothing"
        in one_line_error(err)
    )


@pytest.mark.slow
def test_model_errors_are_one_line(run_cli, tmp_path):
    code, _, err = run_cli(
        "train", "--dataset", "xor", "--model", "nope", "--out", str(tmp_path / "a")
    )
    expected = "unknown model 'nope'; expected a preset (cnn, gpt, gru, llama, lstm, mlp, resnet)"
    assert code == 2 and expected in one_line_error(err)
    code, _, err = run_cli(
        "train",
        "--dataset",
        "xor",
        "--model",
        "mlp",
        "--hidden",
        "3",
        "--epochs",
        "1",
        "--out",
        str(tmp_path / "b"),
        "--progress",
        "none",
    )
    assert code == 0, err  # --hidden shapes the mlp preset
    code, _, err = run_cli(
        "train",
        "--dataset",
        "xor",
        "--model",
        '{"name": "Tanh"}',
        "--hidden",
        "3",
        "--out",
        str(tmp_path / "c"),
    )
    assert code == 2 and "hidden shapes the default MLP" in one_line_error(err)


def test_missing_extra_is_one_line_exit_2(run_cli, monkeypatch, tmp_path):
    import builtins

    real_import = builtins.__import__

    def no_sklearn(name, *args, **kwargs):
        if name.startswith("sklearn"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_sklearn)
    code, _, err = run_cli("train", "--dataset", "digits", "--out", str(tmp_path))
    assert code == 2
    assert (
        err.strip() == "jaxbp train --dataset digits needs scikit-learn: pip install 'jaxbp[data]'"
    )


@pytest.mark.parametrize(
    "dataset, model, expected",
    [
        (None, None, "digits"),
        (None, "gpt", "text"),
        (None, "resnet", "mnist1d"),
        ("iris", None, "iris"),
        ("digits", "cnn", "digits"),
        (None, "model.json", "digits"),
        (None, "no-such-preset", "digits"),  # prepare() then names the unknown preset
    ],
)
def test_default_out_folder_is_the_data_set_trained_on(dataset, model, expected):
    from jaxbp.training import TrainConfig
    from jaxbp.training.model import dataset_name

    assert dataset_name(TrainConfig(dataset=dataset, model=model)) == expected
