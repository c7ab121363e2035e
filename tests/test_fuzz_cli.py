"""Fuzz the command line: every bad input gives one line, exit code 2, and never a traceback.

Hypothesis builds malformed ``jaxbp trace --config`` files (from random *valid* networks, each
broken in one way: missing keys, ragged or mismatched weights, wrong types, non-finite or
out-of-range numbers, unknown names, broken JSON, bad files) and bad flags for ``train``,
``check``, ``lr-sweep`` and ``trace``. Each runs in-process through ``jaxbp.cli.main`` and must

- return exit code 2,
- write exactly one line to stderr, starting with ``jaxbp <command>: error:``,
- never let an exception escape (which a user would see as a traceback).

Every flag combination starts from cheap settings (the XOR data set, one epoch), so an input
wrongly accepted shows up as a failed exit-code assertion, not as a long training run.
``FUZZ_COUNTS`` counts the inputs tried; a module teardown checks (and prints) the total.
"""

import collections
import json
import os
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxbp import cli
from jaxbp.layers import ACTIVATIONS
from jaxbp.losses import LOSSES

FUZZ_COUNTS = collections.Counter()
EXAMPLES = 200  # per flag test; the config test runs 2x: ~1000 inputs, a few seconds
SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture(scope="module", autouse=True)
def fuzz_summary():
    os.environ.pop("JAXBP_DEBUG", None)  # it turns one-line errors back into tracebacks
    yield FUZZ_COUNTS
    bad = FUZZ_COUNTS.pop("FAILED", 0)
    total = sum(FUZZ_COUNTS.values()) + bad
    sys.__stderr__.write(
        f"\ntest_fuzz_cli: {total} bad inputs tried, {bad} broke the contract "
        f"(one line, exit code 2, no traceback); by kind: "
        f"{dict(sorted(FUZZ_COUNTS.items()))}\n"
    )


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


def assert_one_line_error(capsys, command, argv, kind):
    """Run ``jaxbp <argv>`` in-process and check the contract of a bad input."""
    FUZZ_COUNTS["FAILED"] += 1  # until it passed
    try:
        code = cli.main(argv)
    except BaseException as e:  # whatever escapes is what the user would see
        pytest.fail(
            f"jaxbp {' '.join(map(repr, argv))}: {type(e).__name__} escaped main() "
            f"(a traceback for the user): {str(e)[:300]}"
        )
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err, (argv, err)
    lines = err.splitlines()
    assert len(lines) == 1, (argv, err)
    assert lines[0].startswith(f"jaxbp {command}: error: "), (argv, err)
    assert code == 2, (argv, code, err)
    FUZZ_COUNTS["FAILED"] -= 1
    FUZZ_COUNTS[kind] += 1
    return lines[0]


# --------------------------------------------------------------------------------------------
# jaxbp trace --config: broken configs
# --------------------------------------------------------------------------------------------

finite = st.floats(-3, 3, allow_nan=False, allow_infinity=False)
non_finite = st.sampled_from([float("nan"), float("inf"), -float("inf")])
not_a_number = st.one_of(
    st.text(max_size=5), st.none(), st.booleans(), st.just([1.0]), st.just({"x": 1})
)
bad_name = st.one_of(
    st.text(max_size=12).filter(lambda s: s not in ACTIVATIONS and s not in LOSSES),
    st.integers(),
    st.none(),
    st.just(["tanh"]),
)


@st.composite
def valid_configs(draw):
    """A well-formed config of a small random network (the thing each mutation breaks)."""
    widths = draw(st.lists(st.integers(1, 3), min_size=2, max_size=4))
    batch = draw(st.sampled_from([None, 1, 3]))

    def vec(n):
        return [draw(finite) for _ in range(n)]

    def examples(n):
        return vec(n) if batch is None else [vec(n) for _ in range(batch)]

    layers = []
    for fan_in, fan_out in zip(widths, widths[1:]):
        layer = {
            "weights": [vec(fan_out) for _ in range(fan_in)],
            "activation": draw(st.sampled_from(sorted(ACTIVATIONS))),
        }
        bias = draw(st.sampled_from(["shared", "per-neuron", "none"]))
        if bias == "shared":
            layer["bias"] = draw(finite)
        elif bias == "per-neuron":
            layer["bias"] = vec(fan_out)
        layers.append(layer)
    config = {"inputs": examples(widths[0]), "targets": examples(widths[-1]), "layers": layers}
    if draw(st.booleans()):
        config["loss"] = draw(st.sampled_from(["half_sse", "mse"]))
    if draw(st.booleans()):
        config["learning_rate"] = draw(st.floats(1e-3, 2))
    return config


def _pick_layer(draw, config):
    return config["layers"][draw(st.integers(0, len(config["layers"]) - 1))]


def _first_numbers(value):
    """The innermost list of numbers in an example/targets value."""
    return value[0] if isinstance(value[0], list) else value


# Each mutation takes (draw, config) and breaks the config in place (or returns raw text).
def m_missing_key(draw, c):
    del c[draw(st.sampled_from(["inputs", "targets", "layers"]))]


def m_unknown_key(draw, c):
    c[draw(st.sampled_from(["input", "target", "Layers", "lr", "epochs", ""]))] = 1


def m_not_an_object(draw, c):
    return json.dumps(
        draw(
            st.one_of(
                st.lists(st.integers(), max_size=3),
                st.integers(),
                st.text(max_size=5),
                st.none(),
                st.booleans(),
            )
        )
    )


def m_bad_examples(draw, c):
    key = draw(st.sampled_from(["inputs", "targets"]))
    c[key] = draw(
        st.sampled_from(
            [[], "0.1, 0.2", {}, None, 0.5, [[]], [1.0, [2.0]], [[1.0, 2.0], [1.0]], [[1.0], []]]
        )
    )


def m_examples_bad_number(draw, c):
    key = draw(st.sampled_from(["inputs", "targets"]))
    row = _first_numbers(c[key])
    row[draw(st.integers(0, len(row) - 1))] = draw(st.one_of(non_finite, not_a_number))


def m_targets_width(draw, c):
    row = _first_numbers(c["targets"])
    if draw(st.booleans()) or len(row) == 1:
        row.append(0.5)
    else:
        row.pop()
    if isinstance(c["targets"][0], list):  # keep the batch rectangular: the width is wrong
        for other in c["targets"][1:]:
            other[:] = list(row)


def m_examples_count(draw, c):
    # One example in inputs, several in targets (or the other way round).
    c["targets"] = (
        [c["targets"]] * 2
        if not isinstance(c["targets"][0], list)
        else c["targets"] + [c["targets"][0]]
    )


def m_bad_layers(draw, c):
    c["layers"] = draw(st.sampled_from([[], {}, "dense", None, [1], [{}], [[]]]))


def m_layer_missing_key(draw, c):
    layer = _pick_layer(draw, c)
    del layer[draw(st.sampled_from(["weights", "activation"]))]


def m_layer_unknown_key(draw, c):
    _pick_layer(draw, c)[draw(st.sampled_from(["W", "biases", "act", "units"]))] = 1


def m_weights_ragged(draw, c):
    layer = _pick_layer(draw, c)
    rows = layer["weights"]
    row = rows[draw(st.integers(0, len(rows) - 1))]
    if len(rows) > 1 and draw(st.booleans()):
        row.append(0.1)  # one row too long
    elif len(rows) > 1:
        row.pop()  # one row too short (or empty)
    else:
        rows.append(row + [0.1])  # a second row of another length; also too many rows


def m_weights_rows(draw, c):
    # Rows that do not match the previous layer's width (or the inputs').
    layer = _pick_layer(draw, c)
    rows = layer["weights"]
    if len(rows) > 1 and draw(st.booleans()):
        rows.pop()
    else:
        rows.append(list(rows[0]))


def m_weights_shape(draw, c):
    _pick_layer(draw, c)["weights"] = draw(
        st.sampled_from([[], [[]], [0.1, 0.2], 0.1, "[[0.1]]", None, {"0": [0.1]}, [[[0.1]]]])
    )


def m_weights_number(draw, c):
    rows = _pick_layer(draw, c)["weights"]
    row = rows[draw(st.integers(0, len(rows) - 1))]
    row[draw(st.integers(0, len(row) - 1))] = draw(st.one_of(non_finite, not_a_number))


def m_bias(draw, c):
    layer = _pick_layer(draw, c)
    width = len(layer["weights"][0])
    layer["bias"] = draw(
        st.one_of(
            non_finite,
            st.text(max_size=4),
            st.none(),
            st.booleans(),
            st.just([]),
            st.just([0.1] * (width + 1)),
            st.just([[0.1] * width]),
            st.just([float("nan")] * width),
        )
    )


def m_activation(draw, c):
    _pick_layer(draw, c)["activation"] = draw(bad_name)


def m_loss(draw, c):
    c["loss"] = draw(bad_name)


def m_learning_rate(draw, c):
    c["learning_rate"] = draw(
        st.one_of(
            st.sampled_from([0, 0.0, -0.5, -1, 10**400]),
            non_finite,
            not_a_number,
            st.floats(max_value=0, allow_nan=False),
        )
    )


def m_huge_integer(draw, c):
    # A JSON integer beyond float range: valid JSON, but no float64 can hold it.
    rows = _pick_layer(draw, c)["weights"]
    rows[0][0] = 10 ** draw(st.integers(309, 2000))


def m_truncated(draw, c):
    text = json.dumps(c)
    return text[: draw(st.integers(0, len(text) - 1))]


def m_garbage(draw, c):
    return draw(
        st.sampled_from(
            [
                json.dumps(c).replace(":", "=", 1),
                json.dumps(c) + "}",
                json.dumps(c) + " extra",
                json.dumps(c).replace('"', "'"),
                "{inputs: [1]}",
                "",
                "   ",
                "\x00",
                "[" * 100_000 + "]" * 100_000,  # nested deeper than Python's recursion limit
                '{"inputs": ' * 50_000 + "1" + "}" * 50_000,
            ]
        )
    )


MUTATIONS = [
    m_missing_key,
    m_unknown_key,
    m_not_an_object,
    m_bad_examples,
    m_examples_bad_number,
    m_targets_width,
    m_examples_count,
    m_bad_layers,
    m_layer_missing_key,
    m_layer_unknown_key,
    m_weights_ragged,
    m_weights_rows,
    m_weights_shape,
    m_weights_number,
    m_bias,
    m_activation,
    m_loss,
    m_learning_rate,
    m_huge_integer,
    m_truncated,
    m_garbage,
]


@pytest.mark.slow
@pytest.mark.parametrize("mutation", MUTATIONS, ids=lambda m: m.__name__[2:])
@settings(SETTINGS, max_examples=EXAMPLES // 8)
@given(
    config=valid_configs(),
    data=st.data(),
    flags=st.sampled_from([[], ["--steps", "2"], ["--format", "json"], ["--freeze-bias"]]),
)
def test_trace_broken_config(mutation, config, data, flags, capsys, workdir):
    text = mutation(data.draw, config)
    path = workdir / f"config-{mutation.__name__}.json"
    path.write_text(json.dumps(config) if text is None else text, encoding="utf-8")
    line = assert_one_line_error(
        capsys,
        "trace",
        ["trace", "--config", str(path), *flags],
        f"trace config ({mutation.__name__})",
    )
    assert "config" in line


@settings(
    max_examples=30,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(kind=st.sampled_from(["missing", "directory", "not utf-8", "empty"]))
def test_trace_bad_config_file(kind, capsys, workdir):
    path = workdir / f"file-{kind.replace(' ', '-')}"
    if kind == "directory":
        path.mkdir(exist_ok=True)
    elif kind == "not utf-8":
        path.write_bytes(b'\xff\xfe{"inputs": [1]}')
    elif kind == "empty":
        path.write_bytes(b"")
    assert_one_line_error(capsys, "trace", ["trace", "--config", str(path)], f"trace file ({kind})")


def test_the_valid_configs_are_valid(workdir):
    """The mutations start from well-formed configs: the generator itself is checked once."""
    from jaxbp.trace import parse_config

    @settings(max_examples=25, deadline=None, derandomize=True)
    @given(valid_configs())
    def check(config):
        parse_config(json.loads(json.dumps(config)))

    check()


# --------------------------------------------------------------------------------------------
# Bad flags: train, check, lr-sweep, trace
# --------------------------------------------------------------------------------------------

text_value = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=10
)
not_positive_number = st.one_of(
    st.sampled_from(
        ["0", "-1", "-0.5", "nan", "inf", "-inf", "NaN", "1e999", "", "0x10", "1,5", "one"]
    ),
    st.floats(max_value=0, allow_nan=False).map(repr),
)
not_positive_int = st.one_of(
    st.sampled_from(["0", "-1", "-3", "1.5", "2e3", "", "ten", "nan", "inf", "0x3", "1,2"]),
    st.integers(max_value=0).map(str),
)
bad_seed = st.sampled_from(
    ["-1", "abc", "1.5", "", str(2**32), str(2**70), "-99999999999999", "99999999999999999999999"]
)
bad_hidden = st.one_of(
    st.sampled_from(
        ["", ",", "3,,4", "0", "-1", "a", "3.5", "3;4", "128 128", "4,0", "1e2", "[3]", "-", "3,-3"]
    ),
    st.lists(st.integers(-5, 0), min_size=1, max_size=3).map(lambda v: ",".join(map(str, v))),
)


def _not_in(choices):
    return text_value.filter(lambda s: s not in choices)


TRAIN_BASE = ["train", "--dataset", "xor", "--epochs", "1", "--progress", "none"]
TRAIN_FLAGS = {
    "--dataset": _not_in({"xor", "seed", "digits", "iris", "breast_cancer", "mnist1d"}),
    "--activation": _not_in(ACTIVATIONS),
    "--output-activation": _not_in({"auto", *ACTIVATIONS}),
    "--loss": _not_in(LOSSES),
    "--optimizer": _not_in({"sgd", "momentum", "adam"}),
    "--schedule": _not_in({"constant", "cosine", "warmup_cosine"}),
    "--check": _not_in({"off", "report", "skip", "raise"}),
    "--progress": _not_in({"auto", "bar", "lines", "none"}),
    "--lr": not_positive_number,
    "--weight-decay": st.sampled_from(["-1", "-1e-3", "nan", "inf", "", "x", "-inf"]),
    "--epochs": not_positive_int,
    "--batch-size": st.one_of(not_positive_int, st.just("5")),  # xor has 4 training examples
    "--max-bad-steps": not_positive_int,
    "--checkpoint-every": not_positive_int,
    "--seed": bad_seed,
    "--hidden": bad_hidden,
    "--model": st.sampled_from(
        [
            "no-such-preset",
            "missing.json",
            "{not json",
            '{"name": "Conv9D"}',
            '{"name": "Dense", "out_dim": 0}',
            '{"name": "serial", "layers": [{"name": "Dense", "out_dim": 7}]}',
            '{"model": {"name": "Tanh"}, "colour": 1}',
            "",
        ]
    ),
    "--devices": not_positive_int,
    "--shard-params": text_value,  # a switch: any value given to it is a mistake
}

CHECK_BASE = ["check", "--layers", "2,2"]
CHECK_FLAGS = {
    "--layers": st.one_of(bad_hidden, st.sampled_from(["3", "2,0,2", "2,,2"])),
    "--activation": _not_in(ACTIVATIONS),
    "--output-activation": _not_in(ACTIVATIONS),
    "--loss": _not_in(LOSSES),
    "--batch": not_positive_int,
    "--dtype": _not_in({"float64", "float32"}),
    "--format": _not_in({"text", "json"}),
    "--eps": not_positive_number,
    "--seed": bad_seed,
    "--entries": st.sampled_from(["", "x", "1.5", "nan"]),
}

LR_SWEEP_BASE = ["lr-sweep", "--dataset", "xor", "--steps", "2"]
LR_SWEEP_FLAGS = {
    "--dataset": _not_in({"seed", "xor"}),
    "--lrs": st.one_of(
        st.sampled_from(
            ["", ",", "0", "-1", "nan", "inf", "a,b", "0.1,,x", "0.5,-0.5", "0.1;0.2", "1e999"]
        ),
        st.lists(
            not_positive_number.filter(lambda s: "," not in s and s.strip()), min_size=1, max_size=3
        ).map(lambda v: ",".join(["0.1", *v])),
    ),
    "--steps": not_positive_int,
    "--format": _not_in({"text", "json"}),
    "--seed": bad_seed,
    "--model": st.sampled_from(["missing.json", "{not json", '{"name": "Conv9D"}']),
}

TRACE_FLAGS = {
    "--steps": not_positive_int,
    "--format": _not_in({"text", "markdown", "json"}),
    "--plot": st.sampled_from(["out.txt", "out", "/nonexistent-folder/out.png", "plot.jpg"]),
}


def _flag_cases(base, flags):
    """A bad value for one flag (given last, so it wins), or a structural mistake."""
    value_case = st.sampled_from(sorted(flags)).flatmap(
        lambda flag: flags[flag].map(lambda value: (flag, [*base, f"{flag}={value}"]))
    )
    structural = st.sampled_from(
        [
            ("unknown flag", [*base, "--bogus"]),
            ("unknown flag", [*base, "--lr-rate", "0.1"]),
            ("missing value", [*base, sorted(flags)[0]]),
            ("stray argument", [*base, "extra"]),
            ("stray argument", [*base, "two\nlines"]),
        ]
    )
    return st.one_of(value_case, structural)


def _flag_test(command, base, flags, capsys, workdir, case):
    name, argv = case
    if command in ("train", "lr-sweep") and not any(a.startswith("--out") for a in argv):
        argv = [*argv[:1], "--out", str(workdir / f"out-{command}"), *argv[1:]]
    assert_one_line_error(capsys, command, argv, f"{command} {name}")


@SETTINGS
@given(case=_flag_cases(TRAIN_BASE, TRAIN_FLAGS))
def test_train_bad_flags(case, capsys, workdir):
    _flag_test("train", TRAIN_BASE, TRAIN_FLAGS, capsys, workdir, case)


@SETTINGS
@given(case=_flag_cases(CHECK_BASE, CHECK_FLAGS))
def test_check_bad_flags(case, capsys, workdir):
    _flag_test("check", CHECK_BASE, CHECK_FLAGS, capsys, workdir, case)


@SETTINGS
@given(case=_flag_cases(LR_SWEEP_BASE, LR_SWEEP_FLAGS))
def test_lr_sweep_bad_flags(case, capsys, workdir):
    _flag_test("lr-sweep", LR_SWEEP_BASE, LR_SWEEP_FLAGS, capsys, workdir, case)


@settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(case=_flag_cases(["trace"], TRACE_FLAGS))
def test_trace_bad_flags(case, capsys, workdir):
    _flag_test("trace", ["trace"], TRACE_FLAGS, capsys, workdir, case)


STRUCTURAL = [["--bogus"], ["--lr-rate", "0.1"], ["extra"], ["two\nlines"]]


@pytest.mark.parametrize(
    "base", [TRAIN_BASE, CHECK_BASE, LR_SWEEP_BASE, ["trace"]], ids=lambda b: b[0]
)
def test_structural_mistakes_every_command(base, capsys, workdir):
    """A fixed table, so this asserts the contract on every run, whichever tests ran before."""
    kind = f"{base[0]} structural"
    before = FUZZ_COUNTS[kind]
    for extra in STRUCTURAL:
        _flag_test(base[0], base, {}, capsys, workdir, ("structural", [*base, *extra]))
    assert FUZZ_COUNTS[kind] - before == len(STRUCTURAL)
    assert FUZZ_COUNTS["FAILED"] == 0


# --------------------------------------------------------------------------------------------
# Model files with conv / recurrent layers that are wrong: train --model and check --model
# --------------------------------------------------------------------------------------------


def _net(*layers):
    return {
        "name": "serial",
        "layers": [*layers, {"name": "Flatten"}, {"name": "Dense", "out_dim": 10}],
    }


def _conv1d(**arguments):
    return {"name": "Conv1D", "out_channels": 2, "kernel_size": 3, **arguments}


def _gru(**arguments):
    return {"name": "GRU", "hidden": 4, "return_sequences": False, **arguments}


@pytest.mark.parametrize("devices", [[], ["--devices", "1"]])
def test_train_shard_params_on_one_device(devices, capsys, workdir):
    # A model with nothing to split needs 2+ devices to reach: tests/test_sharding.py runs it
    # on 8 simulated devices.
    argv = [*TRAIN_BASE, "--out", str(workdir / "out-shard"), "--shard-params", *devices]
    line = assert_one_line_error(capsys, "train", argv, "train --shard-params")
    assert "shard_params (--shard-params) needs devices >= 2" in line


# (case, description, check --input-shape or None, train's input_shape or None (mnist1d flat),
#  what the one line must say). check runs when its shape is given; train always runs.
BAD_LAYER_MODELS = [
    (
        "conv kernel > padded input",
        _net(_conv1d(kernel_size=45, padding=2)),
        "40,1",
        [40, 1],
        "Conv1D: kernel 45 is larger than the padded input length 44",
    ),
    (
        "conv kernel > input",
        _net(_conv1d(kernel_size=41)),
        "40,1",
        [40, 1],
        "Conv1D: kernel 41 is larger than the padded input length 40",
    ),
    (
        "conv out_channels 0",
        _net(_conv1d(out_channels=0)),
        "40,1",
        [40, 1],
        "Conv1D expects a positive integer out_channels, got 0",
    ),
    (
        "conv kernel_size -1",
        _net(_conv1d(kernel_size=-1)),
        "40,1",
        [40, 1],
        "Conv1D expects a positive integer kernel_size, got -1",
    ),
    (
        "conv without channel axis",
        _net(_conv1d()),
        None,
        None,
        "Conv1D expects inputs of shape (batch, length, channels) or (length, channels), got "
        "shape (-1, 40): a batch whose examples lack an axis",
    ),
    (
        "conv2d on 1-D data",
        _net({"name": "Conv2D", "out_channels": 2, "kernel_size": 3}),
        "40,1",
        [40, 1],
        "Conv2D expects inputs of shape (batch, height, width, channels) or "
        "(height, width, channels), got shape (-1, 40, 1)",
    ),
    (
        "conv2d on flat data",
        _net({"name": "Conv2D", "out_channels": 2, "kernel_size": 3}),
        None,
        None,
        "Conv2D expects inputs of shape (batch, height, width, channels) or "
        "(height, width, channels), got shape (-1, 40)",
    ),
    (
        "dropout rate 1.5",
        _net(_conv1d(), {"name": "Dropout", "rate": 1.5}),
        "40,1",
        [40, 1],
        "Dropout expects rate in [0, 1), got 1.5",
    ),
    (
        "unknown layer Conv3D",
        _net({"name": "Conv3D", "out_channels": 2}),
        "40,1",
        [40, 1],
        "unknown layer 'Conv3D'; expected one of: ",
    ),
    (
        "wrong argument name",
        _net({"name": "Conv1D", "out_channels": 2, "kernel": 3}),
        "40,1",
        [40, 1],
        "Conv1D got an unexpected keyword argument 'kernel'",
    ),
    (
        "gru hidden 0",
        _net(_gru(hidden=0)),
        "40,1",
        [40, 1],
        "GRU expects a positive integer hidden size, got 0",
    ),
    (
        "lstm hidden -2",
        _net({"name": "LSTM", "hidden": -2}),
        "40,1",
        [40, 1],
        "LSTM expects a positive integer hidden size, got -2",
    ),
    (
        "gru sequence of rank 4",
        _net(_gru()),
        "40,1,1",
        [40, 1, 1],
        "GRU expects inputs of shape (batch, time, features) or (time, features), got shape "
        "(-1, 40, 1, 1)",
    ),
    (
        "gru on flat vectors",
        _net(_gru()),
        None,
        None,
        "GRU expects inputs of shape (batch, time, features) or (time, features), got shape "
        "(-1, 40): a batch of vectors",
    ),
    (
        "bidirectional of a reversed gru",
        _net({"name": "bidirectional", "layer": _gru(reverse=True)}),
        "40,1",
        [40, 1],
        "bidirectional expects a layer built with reverse=False",
    ),
    # A PyTorch state_dict is read by jaxbp.from_torch_state_dict only (no CLI flag): no row.
]


@pytest.mark.parametrize(
    "case, description, check_shape, train_shape, fragment",
    BAD_LAYER_MODELS,
    ids=[row[0] for row in BAD_LAYER_MODELS],
)
def test_bad_layer_model_files(
    case, description, check_shape, train_shape, fragment, capsys, workdir
):
    path = workdir / f"model-{case.replace(' ', '-')}.json"
    runs = []
    if check_shape is not None:
        path.write_text(json.dumps(description))
        runs.append(("check", ["check", "--model", str(path), "--input-shape", check_shape]))
    train_file = workdir / f"train-{case.replace(' ', '-')}.json"
    wrapped = (
        description if train_shape is None else {"model": description, "input_shape": train_shape}
    )
    train_file.write_text(json.dumps(wrapped))
    runs.append(
        (
            "train",
            [
                "train",
                "--out",
                str(workdir / "out-layers"),
                "--model",
                str(train_file),
                "--dataset",
                "mnist1d",
                "--epochs",
                "1",
                "--progress",
                "none",
            ],
        )
    )
    for command, argv in runs:
        line = assert_one_line_error(capsys, command, argv, f"{command} layer model ({case})")
        assert fragment in line, (argv, line)


# --------------------------------------------------------------------------------------------
# Text models and jaxbp generate: bad files, bad models, bad checkpoints and prompts
# --------------------------------------------------------------------------------------------


def _tiny_gpt(vocab: int, *, max_len: int = 8, heads: int = 2, width: int = 8) -> dict:
    return {
        "name": "serial",
        "layers": [
            {"name": "Embedding", "vocab_size": vocab, "dim": width},
            {"name": "PositionalEmbedding", "max_len": max_len, "dim": width},
            {
                "name": "residual",
                "layers": [
                    {"name": "LayerNorm"},
                    {"name": "MultiHeadAttention", "num_heads": heads, "causal": True},
                ],
            },
            {"name": "LayerNorm"},
            {"name": "Dense", "out_dim": vocab},
        ],
    }


@pytest.fixture(scope="module")
def text_runs(workdir):
    """A small UTF-8 text, a tiny GPT trained on it for one epoch, and an xor run."""
    corpus = workdir / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    vocab = len(set(corpus.read_text()))
    model = workdir / "tiny-gpt.json"
    model.write_text(json.dumps({"model": _tiny_gpt(vocab), "input_shape": [8]}))
    text_run, xor_run = workdir / "text-run", workdir / "xor-run"
    one_epoch = "train --epochs 1 --progress none".split()
    text = ["--dataset", "text", "--text", str(corpus), "--model", str(model), "--batch-size", "8"]
    assert cli.main(one_epoch + text + ["--out", str(text_run)]) == 0
    assert cli.main(one_epoch + ["--dataset", "xor", "--out", str(xor_run)]) == 0
    return corpus, vocab, text_run, xor_run


@pytest.mark.slow
def test_bad_text_inputs_and_generate(text_runs, capsys, workdir):
    corpus, vocab, text_run, xor_run = text_runs
    capsys.readouterr()
    empty, latin1 = workdir / "empty.txt", workdir / "latin1.txt"
    empty.write_text("")
    latin1.write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    models = {"long": _tiny_gpt(vocab, max_len=4), "heads": _tiny_gpt(vocab, heads=3, width=8)}
    for name, model in models.items():
        (workdir / f"gpt-{name}.json").write_text(json.dumps({"model": model, "input_shape": [8]}))
    train = "train --dataset text --epochs 1 --progress none".split()
    train += ["--out", str(workdir / "text-bad")]
    cases = [
        (train + ["--text", str(empty)], "train", "empty"),
        (train + ["--text", str(latin1)], "train", "UTF-8"),
        (
            train + ["--text", str(corpus), "--model", str(workdir / "gpt-long.json")],
            "train",
            "PositionalEmbedding",
        ),
        (
            train + ["--text", str(corpus), "--model", str(workdir / "gpt-heads.json")],
            "train",
            "num_heads 3 does not divide",
        ),
        (["generate", "--checkpoint", str(xor_run)], "generate", "not a text model"),
        (["generate", "--checkpoint", str(text_run), "--prompt", "\u2603"], "generate", "\u2603"),
        (["generate", "--checkpoint", str(workdir / "missing")], "generate", "missing"),
    ]
    for argv, command, fragment in cases:
        line = assert_one_line_error(capsys, command, argv, f"{command} text input")
        assert fragment in line, (argv, line)
    assert not (workdir / "text-bad" / "checkpoint.npz").exists()  # nothing written half-way
    # And the good path: a sample of the requested length from the trained checkpoint.
    generate = ["generate", "--checkpoint", str(text_run), "--prompt", "the "]
    assert cli.main(generate + ["--length", "20", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("the ") and len(out.rstrip("\n")) == 24


# --------------------------------------------------------------------------------------------
# --import and the code a description names: never imported unless the user said so
# --------------------------------------------------------------------------------------------

MARKING_MODULE = """
import pathlib
pathlib.Path({mark!r}).write_text("imported")
import jax

@jax.custom_vjp
def f(x):
    return x

f.defvjp(lambda x: (x, None), lambda _, dy: (dy,))

def init(key, shape):
    return {{}}
"""


@pytest.fixture
def user_modules(tmp_path, monkeypatch):
    """A module that leaves a file when imported, one that raises, and a model naming the
    first's code; all on sys.path."""
    mark = tmp_path / "imported"
    (tmp_path / "fuzz_marks_on_import.py").write_text(MARKING_MODULE.format(mark=str(mark)))
    (tmp_path / "fuzz_fails_on_import.py").write_text("raise RuntimeError('boom at import')\n")
    model = {
        "name": "serial",
        "layers": [
            {
                "name": "CustomVJP",
                "fn": "fuzz_marks_on_import:f",
                "init": "fuzz_marks_on_import:init",
            },
            {"name": "Dense", "out_dim": 2},
        ],
    }
    (tmp_path / "model.json").write_text(json.dumps(model))
    (tmp_path / "trace.json").write_text(json.dumps({"model": model["layers"][0]}))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path, mark
    for name in ("fuzz_marks_on_import", "fuzz_fails_on_import"):
        sys.modules.pop(name, None)


IMPORT_COMMANDS = {
    "train": ["train", "--dataset", "xor", "--epochs", "1", "--progress", "none"],
    "check": ["check", "--layers", "2,2"],
    "trace": ["trace"],
    "generate": ["generate", "--checkpoint", "no-such-run"],
    "lr-sweep": ["lr-sweep", "--dataset", "xor", "--steps", "2"],
}


IMPORT_CASES = [
    ("not given", ["--model", "{dir}/{model}"], "--import fuzz_marks_on_import"),
    ("fails on import", ["--import", "fuzz_fails_on_import"], "RuntimeError: boom at import"),
    ("does not exist", ["--import", "fuzz_no_such_module"], "was not found"),
    ("not a module name", ["--import", "{dir}/fuzz_marks_on_import.py"], "module name"),
]


# generate reads its model from a checkpoint only (test_untrusted_input covers a header).
@pytest.mark.parametrize(
    "command, case, extra, fragment",
    [
        (command, *case)
        for command in sorted(IMPORT_COMMANDS)
        for case in IMPORT_CASES
        if not (command == "generate" and case[0] == "not given")
    ],
)
def test_import_bad_input(command, case, extra, fragment, user_modules, capsys, workdir):
    folder, mark = user_modules
    model = "trace.json" if command == "trace" else "model.json"
    argv = [*IMPORT_COMMANDS[command], *(a.format(dir=folder, model=model) for a in extra)]
    if command in ("train", "lr-sweep"):
        argv += ["--out", str(workdir / f"out-import-{command}")]
    line = assert_one_line_error(capsys, command, argv, f"--import {case}")
    if command != "trace" or case != "not given":  # trace refuses a CustomVJP before building
        assert fragment in line, (argv, line)
    assert not mark.exists(), f"{argv}: the module named by the description was imported"
