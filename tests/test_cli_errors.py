"""The command line tells the user's mistakes (one line, exit 2) from jaxbp's bugs (exit 1).

In process, with a command's ``run`` replaced: the dispatcher's handling is what is tested.
"""

from __future__ import annotations

import importlib

import pytest

from jaxbp import cli
from jaxbp.errors import ArgumentError, InputShapeError

COMMAND = "bench"


def _run_raising(monkeypatch, capsys, error):
    module = importlib.import_module(cli.COMMANDS[COMMAND][0])

    def run(args):
        raise error

    monkeypatch.setattr(module, "run", run)
    code = cli.main([COMMAND])
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    "error",
    [
        cli.UsageError("--epochs must be positive"),
        ArgumentError("Dense expects a positive integer out_dim, got 2.5"),
        InputShapeError("Dense expects inputs of width 2, got shape (4, 3)"),
        ValueError("model file 'x.json' does not exist"),
        FileNotFoundError(2, "No such file or directory"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_a_user_mistake_is_one_line_and_exit_2(monkeypatch, capsys, error):
    monkeypatch.delenv("JAXBP_DEBUG", raising=False)
    code, err = _run_raising(monkeypatch, capsys, error)
    assert code == 2
    assert err.startswith(f"jaxbp {COMMAND}: error: ")
    assert err.count("\n") == 1 and "bug" not in err


@pytest.mark.parametrize(
    "error",
    [
        KeyError("name"),
        TypeError("'int' object is not callable"),
        AttributeError("x"),
        IndexError(),
    ],
    ids=lambda e: type(e).__name__,
)
def test_anything_else_is_a_bug_and_says_so(monkeypatch, capsys, error):
    monkeypatch.delenv("JAXBP_DEBUG", raising=False)
    code, err = _run_raising(monkeypatch, capsys, error)
    assert code == 1
    assert err.startswith(f"jaxbp {COMMAND}: internal error (a bug in jaxbp, please report it): ")
    assert type(error).__name__ in err and "JAXBP_DEBUG=1" in err
    assert err.count("\n") == 1


def test_jaxbp_debug_shows_the_traceback(monkeypatch, capsys):
    monkeypatch.setenv("JAXBP_DEBUG", "1")
    with pytest.raises(KeyError, match="name"):
        _run_raising(monkeypatch, capsys, KeyError("name"))
    with pytest.raises(ArgumentError):
        _run_raising(monkeypatch, capsys, ArgumentError("bad"))


def test_usage_error_is_a_user_error():
    from jaxbp.errors import UserError

    assert issubclass(cli.UsageError, UserError)


def test_a_conv_model_file_without_input_shape_says_to_add_it(tmp_path, capsys):
    model = tmp_path / "conv.json"
    model.write_text(
        '{"name": "serial", "layers": [{"name": "Conv1D", "out_channels": 2, "kernel_size": 3},'
        ' {"name": "Flatten"}, {"name": "Dense", "out_dim": 3}]}'
    )
    code = cli.main(["train", "--model", str(model), "--dataset", "iris", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2
    assert "got shape (-1, 4): a batch whose examples lack an axis" in err
    assert 'add "input_shape" to the model file' in err and '"input_shape": [4, 1]' in err
    assert not (tmp_path / "metrics.json").exists()


def test_a_missing_text_file_is_named(tmp_path, capsys):
    missing = tmp_path / "missing.txt"
    code = cli.main(["train", "--dataset", "text", "--text", str(missing), "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2
    assert f"text file '{missing}' cannot be read: No such file or directory" in err
    assert "Errno" not in err


def test_train_help_explains_model_epochs_batch_size_and_loss(capsys):
    from jaxbp.presets import preset_names

    assert cli.main(["train", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    for name in preset_names():
        assert name in out, name
    assert "passes over the training set (default: the dataset's or the preset's own)" in out
    assert "examples per step (default" in out and "the loss (default" in out


@pytest.mark.slow  # two one-epoch runs
def test_notes_are_shown_with_progress_none(tmp_path, capsys):
    args = ["train", "--dataset", "xor", "--epochs", "1", "--out", str(tmp_path)]
    assert cli.main([*args, "--progress", "none"]) == 0
    capsys.readouterr()
    assert cli.main([*args, "--progress", "none"]) == 0  # a second run replaces the first
    err = capsys.readouterr().err
    assert f"note: starting a new run in {tmp_path}: its old checkpoint will be replaced" in err


@pytest.mark.parametrize("dataset, held_out", [("digits", "test"), ("text", "val")])
def test_progress_lines_label_each_accuracy(dataset, held_out):
    import io

    from jaxbp.training.progress import Progress

    stream = io.StringIO()
    bar = Progress("lines", 2, 0, dataset, stream=stream)
    row = {"epoch": 2, "loss": 0.5, "train_accuracy": 0.75, "test_accuracy": 0.625}
    bar.update(row | {"max_grad_rel_error": 1e-7, "skipped_nonfinite": 0, "skipped_mismatch": 0})
    bar.close()
    assert f"acc train 0.750 {held_out} 0.625" in stream.getvalue()
