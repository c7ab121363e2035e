"""`jaxbp trace`, `jaxbp check` and `jaxbp lr-sweep` through their real entry points:
jaxbp.cli.main([...]) in-process, and the installed console script in a subprocess."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jaxbp import layers

JAXBP = Path(sys.executable).parent / "jaxbp"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_one_line_error(code, err, *fragments):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


# --------------------------------------------------------------------------------------------
# --help for every teaching command
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "command, flags",
    [
        ("trace", ["--config", "--steps", "--freeze-bias", "--format", "--plot"]),
        ("check", ["--layers", "--activation", "--loss", "--batch", "--seed", "--dtype"]),
        ("lr-sweep", ["--dataset", "--lrs", "--steps", "--plot", "--out"]),
    ],
)
def test_help(run_cli, command, flags):
    code, out, _ = run_cli(command, "--help")
    assert code == 0
    for flag in flags:
        assert flag in out


# --------------------------------------------------------------------------------------------
# trace
# --------------------------------------------------------------------------------------------


def test_trace_default_is_the_seed_with_errata(run_cli):
    code, out, _ = run_cli("trace")
    assert code == 0
    assert "in_h1 = W1*i1 + W3*i2 + b1*1 = 0.25*0.1 + 0.5*0.05 + 0.3*1 = 0.3500" in out
    assert (
        "dE/dW7 = dE/dout_o1 * dout_o1/din_o1 * din_o1/dW7 = 0.8201 * 0.1343 * 0.5812 = 0.0640"
        in out
    )
    assert "Errata" in out
    assert "dE/dW7    0.0745       0.0640   NO" in out
    assert "out_h2    0.5812       0.5812   yes" in out


def test_trace_json(run_cli):
    code, out, _ = run_cli("trace", "--format", "json")
    assert code == 0
    data = json.loads(out)
    assert set(data) == {
        "layers",
        "errors",
        "loss",
        "gradients",
        "updated",
        "autodiff_max_abs_diff",
    }
    assert data["layers"][1]["out"][0] == pytest.approx(0.8401, abs=5e-5)
    assert data["loss"] == pytest.approx(0.3540, abs=5e-5)
    assert data["gradients"][1]["weights"][1][0] == pytest.approx(0.0640, abs=5e-5)
    assert data["updated"][1]["weights"][1][0] == pytest.approx(0.5680, abs=5e-5)
    assert data["autodiff_max_abs_diff"] < 1e-15


def test_trace_freeze_bias_matches_the_seeds_numpy_program(run_cli):
    code, out, _ = run_cli("trace", "--freeze-bias", "--format", "json")
    assert code == 0
    updated = json.loads(out)["updated"]
    np.testing.assert_allclose(
        updated[0]["weights"], [[0.24921513, 0.1993274], [0.49960756, 0.1496637]], atol=1e-8
    )
    np.testing.assert_allclose(
        updated[1]["weights"], [[0.66769329, 0.40907027], [0.56799435, 0.35898575]], atol=1e-8
    )
    assert updated[0]["bias"] == 0.3 and updated[1]["bias"] == 0.9


def test_trace_steps_history_decreases(run_cli):
    code, out, _ = run_cli("trace", "--steps", "10", "--format", "json")
    assert code == 0
    history = json.loads(out)["history"]
    assert len(history) == 11
    assert history[0] == pytest.approx(0.3539608534, abs=1e-10)
    assert np.all(np.diff(history) < 0)


def test_trace_markdown_and_plot(run_cli, tmp_path):
    plot = tmp_path / "net.png"
    code, out, err = run_cli("trace", "--format", "markdown", "--plot", str(plot))
    assert code == 0
    assert out.startswith("# The seed's 2-2-2 example")
    assert "| dE/dW7 | 0.0745 | 0.0640 | NO |" in out
    assert plot.read_bytes()[:8] == PNG_MAGIC and plot.stat().st_size > 20_000
    assert str(plot) in err


@pytest.mark.slow
def test_trace_config_file(run_cli, tmp_path):
    config = {
        "inputs": [[0, 0], [0, 1], [1, 0], [1, 1]],
        "targets": [[0], [1], [1], [0]],
        "layers": [
            {"weights": [[0.5, -0.3], [0.4, 0.6]], "bias": [0.1, -0.1], "activation": "tanh"},
            {"weights": [[0.7], [-0.6]], "bias": 0.0, "activation": "sigmoid"},
        ],
        "loss": "half_sse",
        "learning_rate": 2.0,
    }
    path = tmp_path / "xor.json"
    path.write_text(json.dumps(config))
    code, out, _ = run_cli("trace", "--config", str(path), "--steps", "3", "--format", "json")
    assert code == 0
    data = json.loads(out)
    assert np.shape(data["layers"][0]["out"]) == (4, 2)
    assert len(data["history"]) == 4
    # independent forward pass
    x = np.asarray(config["inputs"], float)
    h = np.tanh(x @ np.asarray(config["layers"][0]["weights"]) + [0.1, -0.1])
    o = 1 / (1 + np.exp(-(h @ np.asarray(config["layers"][1]["weights"]))))
    np.testing.assert_allclose(data["layers"][1]["out"], o, rtol=1e-13)
    assert data["loss"] == pytest.approx(np.mean(0.5 * (o - config["targets"]) ** 2 * 1), rel=1e-13)
    code, out, _ = run_cli("trace", "--config", str(path))
    assert "w[0][1][0]" in out and "Errata" not in out and "[example 4]" in out


@pytest.mark.parametrize(
    "content, fragments",
    [
        (
            '{"inputs": [0.1, 0.05], "targets": [0.02, 0.98], "layers": '
            '[{"weights": [[0.25, 0.2], [0.5, 0.15]], "activation": "sigmoid"}, '
            '{"weights": [[0.7, 0.4], [0.6, 0.35], [1, 1]], "activation": "sigmoid"}]}',
            ["layers[1].weights has 3 rows", "expected 2 rows"],
        ),
        ('{"inputs": [0.1, 0.05], "targets": [0.02, 0.98]}', ["missing key 'layers'"]),
        (
            '{"inputs": [0.1, 0.05], "targets": [0.02], "layers": [{"weights": [[1, 2], [3, 4]], '
            '"activation": "softmax"}]}',
            ['layers[0].activation is "softmax"', "expected one of"],
        ),
        (
            '{"inputs": [0.1, 0.05], "targets": [0.02, 0.98], "learning_rate": -1, "layers": '
            '[{"weights": [[1, 2], [3, 4]], "activation": "tanh"}]}',
            ["learning_rate is -1"],
        ),
        ('{"inputs": [0.1, 0.05] "targets"}', ["is not valid JSON", "line 1 column"]),
    ],
)
def test_trace_bad_config_one_line_exit_2(run_cli, tmp_path, content, fragments):
    path = tmp_path / "bad.json"
    path.write_text(content)
    code, out, err = run_cli("trace", "--config", str(path))
    assert out == ""
    assert_one_line_error(code, err, "jaxbp trace: error:", *fragments)


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["trace", "--config", "/nonexistent/x.json"], "not found"),
        (["trace", "--steps", "0"], "--steps: expected a positive integer"),
        (["trace", "--steps", "many"], "--steps: expected a positive integer"),
        (["trace", "--format", "xml"], "invalid choice: 'xml'"),
        (["trace", "--bogus"], "unrecognized arguments: --bogus"),
        (["trace", "--plot", "/nonexistent/dir/net.png"], "does not exist"),
        (["trace", "--plot", "net.jpgg"], "--plot expects a file name ending in .png"),
    ],
)
def test_trace_bad_flags(run_cli, argv, fragment):
    code, _, err = run_cli(*argv)
    assert_one_line_error(code, err, fragment)


# --------------------------------------------------------------------------------------------
# check
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_check_default_agrees(run_cli):
    code, out, _ = run_cli("check")
    assert code == 0
    assert "network 2-3-2, tanh hidden, identity output, loss mse, batch 4, float64" in out
    for leaf in ("[0]['W']", "[0]['b']", "[2]['W']", "[2]['b']"):
        assert leaf in out
    assert "[2]['W'][2,1]" in out  # the per-entry table of a 17-parameter network
    assert "all 17 parameters agree" in out


@pytest.mark.slow
def test_check_json_float32(run_cli):
    code, out, _ = run_cli(
        "check",
        "--layers",
        "3,5,4",
        "--activation",
        "sigmoid",
        "--loss",
        "softmax_cross_entropy",
        "--dtype",
        "float32",
        "--batch",
        "6",
        "--entries",
        "50",
        "--format",
        "json",
    )
    assert code == 0
    data = json.loads(out)
    assert data["ok"] is True and data["dtype"] == "float32"
    assert data["parameters"] == 3 * 5 + 5 + 5 * 4 + 4
    assert len(data["entries"]) == data["parameters"]
    for leaf in data["leaves"]:
        assert leaf["manual_vs_autodiff"] < 2e-3 and leaf["manual_vs_fd"] < 3e-2
    entry = data["entries"][0]
    assert entry["manual"] == pytest.approx(entry["jax_grad"], rel=2e-3, abs=1e-6)


@pytest.mark.slow
def test_check_catches_a_wrong_backward(run_cli, monkeypatch):
    import jax.numpy as jnp

    from jaxbp.model import register_layer

    # a tanh whose backward forgets the derivative: dE/dx = dy; registered, so --model builds it
    broken = layers.elementwise("ForgetfulTanh", jnp.tanh, lambda y, dy: dy, cache_output=True)
    register_layer("ForgetfulTanh", broken)
    model = (
        '{"name": "serial", "layers": [{"name": "Dense", "out_dim": 4}, '
        '{"name": "ForgetfulTanh"}, {"name": "Dense", "out_dim": 1}]}'
    )
    code, out, _ = run_cli("check", "--model", model, "--input-shape", "2", "--entries", "0")
    assert code == 1
    assert "MISMATCH: worst leaf [0]['" in out
    assert "NO" in out
    assert "every entry" not in out


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["check", "--layers", "2"], "at least two positive widths"),
        (["check", "--layers", "2,0,1"], "at least two positive widths"),
        (["check", "--dtype", "float16"], "invalid choice: 'float16'"),
        (["check", "--loss", "hinge"], "invalid choice: 'hinge'"),
        (["check", "--batch", "-1"], "--batch: expected a positive integer"),
        (["check", "--layers", "3,1", "--loss", "softmax_cross_entropy"], "at least 2 outputs"),
    ],
)
def test_check_bad_flags(run_cli, argv, fragment):
    code, _, err = run_cli(*argv)
    assert_one_line_error(code, err, fragment)


# --------------------------------------------------------------------------------------------
# lr-sweep
# --------------------------------------------------------------------------------------------


def test_lr_sweep_seed(run_cli, tmp_path):
    code, out, _ = run_cli("lr-sweep", "--out", str(tmp_path), "--steps", "60")
    assert code == 0
    png = tmp_path / "lr_sweep.png"
    assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 20_000
    for lr in ("0.05", "0.5", "500"):
        assert f"│ {lr:>4} │" in out  # the table has one row per learning rate
    record = json.loads((tmp_path / "lr_sweep.json").read_text())
    runs = {r["lr"]: r for r in record["runs"]}
    assert sorted(runs) == [0.05, 0.5, 5.0, 50.0, 500.0]
    assert all(len(r["losses"]) == 61 for r in runs.values())
    assert runs[0.05]["verdict"] == "slow"
    assert runs[50.0]["verdict"] == "overshoots, then converges"
    assert runs[500.0]["verdict"] == "stuck higher"  # saturated, finite: not diverging
    # the largest rate overshoots on its first step and ends worse than it started
    assert runs[500.0]["after_1_step"] > runs[500.0]["start"]
    assert runs[500.0]["final"] > runs[500.0]["start"]
    # the seed's own rate reproduces `jaxbp trace --steps`: the same SGD
    assert runs[0.5]["losses"][0] == pytest.approx(0.3539608534, abs=1e-10)
    assert runs[0.5]["losses"][1] == pytest.approx(0.3457952203, abs=1e-9)


def test_lr_sweep_xor_json(run_cli, tmp_path):
    plot = tmp_path / "xor.png"
    code, out, _ = run_cli(
        "lr-sweep",
        "--dataset",
        "xor",
        "--lrs",
        "1,100",
        "--steps",
        "300",
        "--out",
        str(tmp_path),
        "--plot",
        str(plot),
        "--format",
        "json",
    )
    assert code == 0
    data = json.loads(out)
    verdicts = {r["lr"]: r["verdict"] for r in data["runs"]}
    assert verdicts[100.0] == "stuck higher"
    assert verdicts[1.0] in ("slow", "converges")
    assert plot.read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["lr-sweep", "--lrs", "0.1,abc"], "--lrs: expected comma-separated learning rates"),
        (["lr-sweep", "--lrs", "0.1,-1"], "positive finite numbers"),
        (["lr-sweep", "--dataset", "mnist"], "invalid choice: 'mnist'"),
        (["lr-sweep", "--steps", "0"], "--steps: expected a positive integer"),
    ],
)
def test_lr_sweep_bad_flags(run_cli, argv, fragment):
    code, _, err = run_cli(*argv)
    assert_one_line_error(code, err, fragment)


def test_lr_sweep_bad_out_and_plot_folder_fail_before_anything_is_written(run_cli, tmp_path):
    out = tmp_path / "sweep"
    code, _, err = run_cli(
        "lr-sweep", "--out", str(out), "--plot", str(tmp_path / "missing" / "curves.png")
    )
    assert_one_line_error(code, err, "folder")
    assert "does not exist" in err and not out.exists()
    f = tmp_path / "file"
    f.write_text("x")
    code, _, err = run_cli("lr-sweep", "--out", str(f))
    assert_one_line_error(code, err, "is a file; expected a folder")


def test_lr_sweep_bad_plot_name(run_cli, tmp_path):
    code, _, err = run_cli(
        "lr-sweep", "--out", str(tmp_path), "--plot", str(tmp_path / "curves.txt")
    )
    assert_one_line_error(code, err, "--plot expects a file name ending in .png")


# --------------------------------------------------------------------------------------------
# The installed console script
# --------------------------------------------------------------------------------------------


def _script(*argv, cwd=None):
    env = {k: v for k, v in os.environ.items() if k != "JAXBP_DEBUG"}
    return subprocess.run(
        [str(JAXBP), *argv], capture_output=True, text=True, timeout=120, cwd=cwd, env=env
    )


@pytest.mark.slow
@pytest.mark.skipif(not JAXBP.exists(), reason="console script not installed")
def test_console_script_trace_json():
    result = _script("trace", "--format", "json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["layers"][0]["net"] == pytest.approx([0.35, 0.3275], abs=1e-12)
    assert data["errors"] == pytest.approx([0.3363, 0.0176], abs=5e-5)


@pytest.mark.skipif(not JAXBP.exists(), reason="console script not installed")
def test_console_script_bad_config(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(
        '{"inputs": [1, 2], "targets": [1], "layers": [{"weights": [[1], [2, 3]], '
        '"activation": "relu"}]}'
    )
    result = _script("trace", "--config", str(path))
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        "jaxbp trace: error: config: layers[0].weights is ragged: row 1 has 2 entries but "
        "row 0 has 1; expected every row to have one entry per neuron"
    ]


# --------------------------------------------------------------------------------------------
# jaxbp.plots.plot_training_curves (used by `jaxbp train`)
# --------------------------------------------------------------------------------------------


def test_plot_training_curves(tmp_path):
    from jaxbp.plots import plot_training_curves

    history = {
        "loss": np.linspace(2.3, 0.1, 300),  # per step
        "epoch": np.arange(1, 11),  # x axis of the per-epoch series
        "train_accuracy": np.linspace(0.3, 0.99, 10),
        "test_accuracy": np.linspace(0.3, 0.97, 10),
        "max_grad_rel_error": np.full(10, 1e-7),
        "dataset": "digits",  # not numeric: ignored
    }
    path = plot_training_curves(history, tmp_path / "curves.png", title="digits")
    assert Path(path).read_bytes()[:8] == PNG_MAGIC
    with pytest.raises(ValueError, match="no numeric series"):
        plot_training_curves({"dataset": "digits"}, tmp_path / "none.png")
    with pytest.raises(OSError, match="does not exist"):
        plot_training_curves(history, tmp_path / "missing" / "curves.png")


def test_lr_sweep_verdicts_tell_stuck_from_diverging():
    from jaxbp.commands.lr_sweep import VERDICTS, verdict

    assert verdict([0.35, 0.48, 0.48]) == "stuck higher"  # saturated: finite, no lower
    assert verdict([0.35, 0.35]) == "stuck higher"
    assert verdict([0.35, 1e3, float("nan")]) == "diverges"
    assert verdict([0.35, float("inf")]) == "diverges"
    assert verdict([0.35, 0.5, 0.01]) == "overshoots, then converges"
    assert verdict([0.35, 0.3, 0.2]) == "slow" and verdict([0.35, 0.1, 0.01]) == "converges"
    assert set(VERDICTS) == {
        "slow",
        "converges",
        "overshoots, then converges",
        "stuck higher",
        "diverges",
    }


def test_short_run_curves_tick_whole_epochs_and_name_an_all_zero_error(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from jaxbp import plots

    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig) or str(path))
    history = {
        "epoch": [1, 2, 3],
        "train_loss": [1.0, 0.5, 0.25],
        "max_grad_rel_error": [0.0, 0.0, 0.0],
    }
    plots.plot_training_curves(history, tmp_path / "c.png")
    loss_ax, error_ax = figures[0].axes
    for ax in (loss_ax, error_ax):
        ticks = [t for t in ax.get_xticks() if 1 <= t <= 3]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
    assert [t.get_text() for t in error_ax.texts] == ["0 at every point"]
    assert not loss_ax.texts
