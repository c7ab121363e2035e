"""GRU, LSTM and bidirectional: hand-written BPTT against jax.vjp, finite differences, and
PyTorch's equations.

The backward of every configuration (GRU/LSTM, forward/reverse, all steps/final state,
bidirectional) is compared with ``jax.vjp`` of its forward in float64 (1e-10 and tighter) and
float32, with and without ``jit``, on batches, single examples and one-step sequences; with
central differences on tiny cases; over random sizes with hypothesis. The forward is checked
against a numpy transcription of PyTorch's GRU/LSTM equations in PyTorch's own weight layout,
through :func:`from_torch_state_dict` (and against torch itself when it is installed).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.flatten_util import ravel_pytree

import jaxbp
from jaxbp import model
from jaxbp.recurrent import GRU, LSTM, bidirectional, from_torch_state_dict

pytestmark = pytest.mark.filterwarnings("error")

LAYERS = {
    "GRU": GRU(4),
    "GRU_reverse": GRU(4, reverse=True),
    "GRU_last": GRU(4, return_sequences=False),
    "GRU_reverse_last": GRU(4, return_sequences=False, reverse=True),
    "LSTM": LSTM(3),
    "LSTM_reverse_last": LSTM(3, return_sequences=False, reverse=True),
    "bi_GRU": bidirectional(GRU(3)),
    "bi_LSTM_last": bidirectional(LSTM(2, return_sequences=False)),
}
SHAPES = {"batch": (3, 5, 2), "single": (5, 2), "one_step": (2, 1, 2)}
# (rtol, atol) of the direct comparison; atol is relative to each leaf's largest entry.
TOL = {jnp.float64: (1e-12, 1e-12), jnp.float32: (1e-5, 1e-5)}


def draw(layer, key, shape, dtype):
    """Random params, input and cotangent for ``layer``."""
    k_init, k_x, k_dy = jax.random.split(key, 3)
    _, params = layer.init(k_init, shape)
    params = jax.tree_util.tree_map(lambda p: jnp.asarray(p, dtype), params)
    x = jax.random.normal(k_x, shape, dtype)
    y = jax.eval_shape(lambda: layer.forward(params, x)[0])
    return params, x, jax.random.normal(k_dy, y.shape, dtype)


def manual_and_vjp(layer, params, x, dy):
    """``({"params", "x"} from layer.backward, the same from jax.vjp of layer.forward)``."""
    _, cache = layer.forward(params, x)
    dparams, dx = layer.backward(params, cache, dy)
    _, vjp = jax.vjp(lambda p, xx: layer.forward(p, xx)[0], params, x)
    ref_params, ref_x = vjp(dy)
    return {"params": dparams, "x": dx}, {"params": ref_params, "x": ref_x}


def all_manual_and_vjp(key, shape, dtype, names=tuple(LAYERS)):
    return {
        name: manual_and_vjp(layer, *draw(layer, jax.random.fold_in(key, i), shape, dtype))
        for i, (name, layer) in enumerate(LAYERS.items())
        if name in names
    }


# The layers of one test in one compiled program: XLA takes ~1 s of CPU to compile each
# layer's forward, backward and VJP scans, far longer than they run.
_all_manual_and_vjp_jit = jax.jit(all_manual_and_vjp, static_argnums=(1, 2, 3))
# In float32 and eagerly, every scan direction and both outputs, in fewer layers.
FEW = ("GRU_last", "LSTM_reverse_last", "bi_GRU")


def assert_close(manual, reference, rtol, atol, what=""):
    """Leaf by leaf ``|a - b| <= atol * max|b| + rtol * |b|``, on the host.

    ``compare_grads`` says the same, but run eagerly it compiles its statistics per leaf shape,
    which costs more than the recurrences under test.
    """
    paths = jax.tree_util.tree_flatten_with_path(reference)[0]
    assert jax.tree_util.tree_structure(manual) == jax.tree_util.tree_structure(reference), what
    for (path, b), a in zip(paths, jax.tree_util.tree_leaves(manual), strict=True):
        a, b = np.asarray(a), np.asarray(b)
        assert a.shape == b.shape and a.dtype == b.dtype, f"{what}{jax.tree_util.keystr(path)}"
        np.testing.assert_allclose(
            a,
            b,
            rtol=rtol,
            atol=atol * np.max(np.abs(b)),
            err_msg=f"{what}{jax.tree_util.keystr(path)}",
        )


def assert_agree(results, dtype):
    for name, (manual, reference) in results.items():
        for leaf in jax.tree_util.tree_leaves(manual):
            assert leaf.dtype == dtype, name
        assert_close(manual, reference, *TOL[dtype], what=name)


# GRU and GRU_reverse are the two halves of bi_GRU; only the slow test runs them on their own.
FLOAT64 = tuple(name for name in LAYERS if name not in ("GRU", "GRU_reverse"))


@pytest.mark.slow
@pytest.mark.parametrize(
    "dtype, names", [(jnp.float64, FLOAT64), (jnp.float32, FEW)], ids=["f64", "f32"]
)
def test_backward_equals_vjp_jit(dtype, names):
    assert_agree(_all_manual_and_vjp_jit(jax.random.key(1), SHAPES["batch"], dtype, names), dtype)


@pytest.mark.slow
@pytest.mark.parametrize("jit", [False, True], ids=["nojit", "jit"])
@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_backward_equals_vjp_every_layer_shape_dtype(shape, dtype, jit):
    run = _all_manual_and_vjp_jit if jit else all_manual_and_vjp
    assert_agree(run(jax.random.key(1), shape, dtype), dtype)


@pytest.mark.slow
def test_backward_equals_vjp_without_jit():
    """Eagerly, on a one-step sequence and a single example."""
    for name, shape in (("GRU_reverse_last", (2, 1, 3)), ("bi_LSTM_last", (4, 3))):
        layer = LAYERS[name]
        manual, reference = manual_and_vjp(
            layer, *draw(layer, jax.random.key(2), shape, jnp.float64)
        )
        assert_close(manual, reference, *TOL[jnp.float64], what=name)


@jax.jit
def _check_layer_reports():
    layer = LAYERS["bi_LSTM_last"]
    return {
        str(np.dtype(dtype)): jaxbp.check_layer(layer, jax.random.key(4), (2, 4, 3), dtype=dtype)
        for dtype in (jnp.float64, jnp.float32)
    }


@pytest.mark.slow
def test_check_layer_default_tolerances():
    """``jaxbp.check_layer``, the library's own comparison, passes with room to spare."""
    for dtype, report in _check_layer_reports().items():
        assert bool(report.ok), f"{dtype}\n{report}"
        bound = 1e-12 if dtype == "float64" else 1e-5
        assert float(report.worst_rel_error) < bound, f"{dtype}\n{report}"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["GRU_reverse_last", "LSTM"])
def test_finite_differences(name):
    """A third opinion: central differences of <y, dy> on a tiny sequence, params and x."""
    layer = LAYERS[name]
    params, x, dy = draw(layer, jax.random.key(7), (2, 3, 2), jnp.float64)
    _, cache = layer.forward(params, x)
    dparams, dx = layer.backward(params, cache, dy)
    # One flat vector of params and x: one compiled difference quotient instead of one per leaf.
    flat, unflatten = ravel_pytree({"params": params, "x": x})
    fd = jaxbp.finite_difference_grads(
        lambda v: jnp.sum(layer.forward(unflatten(v)["params"], unflatten(v)["x"])[0] * dy), flat
    )
    assert_close({"params": dparams, "x": dx}, unflatten(fd), 1e-7, 1e-8)


@pytest.mark.slow
@settings(max_examples=10, deadline=None)
@given(
    kind=st.sampled_from(["GRU", "LSTM", "bi_GRU"]),
    batch=st.integers(1, 3),
    time=st.integers(1, 5),
    features=st.integers(1, 4),
    hidden=st.integers(1, 5),
    reverse=st.booleans(),
    return_sequences=st.booleans(),
    single=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_random_sizes(kind, batch, time, features, hidden, reverse, return_sequences, single, seed):
    if kind == "bi_GRU":
        layer = bidirectional(GRU(hidden, return_sequences))
    else:
        layer = {"GRU": GRU, "LSTM": LSTM}[kind](hidden, return_sequences, reverse)
    shape = (time, features) if single else (batch, time, features)
    out_shape, _ = layer.init(jax.random.key(0), shape)
    params, x, dy = draw(layer, jax.random.key(seed), shape, jnp.float64)
    assert dy.shape == out_shape
    manual, reference = jax.jit(manual_and_vjp, static_argnums=0)(layer, params, x, dy)
    assert_close(manual, reference, 1e-10, 1e-10)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["LSTM_reverse_last", "bi_GRU"])
def test_vmap_over_single_examples_matches_batch(name):
    layer = LAYERS[name]
    params, x, dy = draw(layer, jax.random.key(3), (4, 5, 2), jnp.float64)

    @jax.jit
    def batch_and_vmapped(x, dy):
        def one(xi, dyi):
            yi, ci = layer.forward(params, xi)
            return (yi, *layer.backward(params, ci, dyi))

        y, cache = layer.forward(params, x)
        y_v, dparams_v, dx_v = jax.vmap(one)(x, dy)
        summed = jax.tree_util.tree_map(lambda g: g.sum(0), dparams_v)
        return (y, *layer.backward(params, cache, dy)), (y_v, summed, dx_v)

    batched, vmapped = batch_and_vmapped(x, dy)
    assert_close(vmapped, batched, 1e-12, 1e-12)


@pytest.mark.slow
def test_init_shapes_dtype_and_range():
    for name, layer in LAYERS.items():
        for shape in [(-1, 5, 2), (5, 2)]:
            out_shape, params = layer.init(jax.random.key(0), shape)
            concrete = tuple(1 if d == -1 else d for d in shape)
            y = jax.eval_shape(lambda: layer.forward(params, jnp.ones(concrete))[0])
            assert tuple(1 if d == -1 else d for d in out_shape) == y.shape, name
    _, p = GRU(6, dtype="float32").init(jax.random.key(0), (2, 3, 5))
    assert {k: (v.shape, v.dtype) for k, v in p.items()} == {
        "Wi": ((5, 18), jnp.float32),
        "Wh": ((6, 18), jnp.float32),
        "bi": ((18,), jnp.float32),
        "bh": ((18,), jnp.float32),
    }
    _, p = LSTM(4).init(jax.random.key(0), (3, 2))
    assert p["Wh"].shape == (4, 16) and p["Wh"].dtype == jnp.float64
    # PyTorch's initialisation: uniform in +-1/sqrt(hidden).
    assert float(jnp.max(jnp.abs(p["Wh"]))) <= 0.5 and float(jnp.max(jnp.abs(p["Wh"]))) > 0.3


@pytest.mark.slow
def test_reverse_is_forward_on_flipped_sequence():
    x = jax.random.normal(jax.random.key(0), (2, 4, 3))
    _, params = GRU(5).init(jax.random.key(1), x.shape)
    y_rev, _ = GRU(5, reverse=True).forward(params, x)
    y_flip, _ = GRU(5).forward(params, x[:, ::-1])
    np.testing.assert_allclose(y_rev, y_flip[:, ::-1], rtol=1e-14, atol=1e-14)


@pytest.mark.slow
def test_inside_a_network_backprop_equals_autodiff():
    net = jaxbp.serial(LSTM(3, return_sequences=False), jaxbp.Dense(2))
    _, params = net.init(jax.random.key(0), (-1, 6, 3))
    x = jax.random.normal(jax.random.key(1), (5, 6, 3))
    y = jax.random.normal(jax.random.key(2), (5, 2))
    value, manual = jaxbp.backprop(net, jaxbp.mse, params, x, y)
    value_ref, auto = jaxbp.autodiff(net, jaxbp.mse, params, x, y)
    np.testing.assert_allclose(value, value_ref, rtol=1e-14)
    assert_close(manual, auto, 1e-12, 1e-12)


def test_describe_build_round_trip():
    for name, layer in LAYERS.items():
        description = model.describe(layer)
        assert model.describe(model.build(description)) == description, name
    assert model.describe(bidirectional(LSTM(2, False, dtype=np.float32))) == {
        "name": "bidirectional",
        "layer": {
            "name": "LSTM",
            "hidden": 2,
            "return_sequences": False,
            "reverse": False,
            "dtype": "float32",
        },
    }
    rebuilt = model.build({"name": "GRU", "hidden": 3, "reverse": True})
    assert dict(rebuilt.config) == {
        "hidden": 3,
        "return_sequences": True,
        "reverse": True,
        "dtype": None,
    }


# --------------------------------------------------------------------------------------------
# PyTorch's equations, in PyTorch's layout, written in numpy
# --------------------------------------------------------------------------------------------


def _sigmoid(a):
    return 1 / (1 + np.exp(-a))


def np_gru_direction(x, w_ih, w_hh, b_ih, b_hh, reverse):
    """torch.nn.GRU, one direction; x is (batch, time, in) as with batch_first=True."""
    batch, time, _ = x.shape
    hidden = w_hh.shape[1]
    h = np.zeros((batch, hidden))
    out = np.zeros((batch, time, hidden))
    for t in reversed(range(time)) if reverse else range(time):
        gi = x[:, t] @ w_ih.T + b_ih
        gh = h @ w_hh.T + b_hh
        r = _sigmoid(gi[:, :hidden] + gh[:, :hidden])
        z = _sigmoid(gi[:, hidden : 2 * hidden] + gh[:, hidden : 2 * hidden])
        n = np.tanh(gi[:, 2 * hidden :] + r * gh[:, 2 * hidden :])
        h = (1 - z) * n + z * h
        out[:, t] = h
    return out, h


def np_lstm_direction(x, w_ih, w_hh, b_ih, b_hh, reverse):
    """torch.nn.LSTM, one direction; returns (output, h_n) (c_n is not compared)."""
    batch, time, _ = x.shape
    hidden = w_hh.shape[1]
    h, c = np.zeros((batch, hidden)), np.zeros((batch, hidden))
    out = np.zeros((batch, time, hidden))
    for t in reversed(range(time)) if reverse else range(time):
        a = x[:, t] @ w_ih.T + b_ih + h @ w_hh.T + b_hh
        i, f, g, o = (a[:, k * hidden : (k + 1) * hidden] for k in range(4))
        c = _sigmoid(f) * c + _sigmoid(i) * np.tanh(g)
        h = _sigmoid(o) * np.tanh(c)
        out[:, t] = h
    return out, h


NP_DIRECTION = {"GRU": np_gru_direction, "LSTM": np_lstm_direction}


def torch_state_dict(kind, rng, features, hidden, *, layers=1, bidirectional=False, bias=True):
    """Random weights named and shaped as torch.nn.GRU/LSTM's state_dict (numpy arrays)."""
    gates = 3 if kind == "GRU" else 4
    suffixes = ["", "_reverse"] if bidirectional else [""]
    state = {}
    for k in range(layers):
        width = features if k == 0 else hidden * len(suffixes)
        for s in suffixes:
            state[f"weight_ih_l{k}{s}"] = rng.uniform(-0.6, 0.6, (gates * hidden, width))
            state[f"weight_hh_l{k}{s}"] = rng.uniform(-0.6, 0.6, (gates * hidden, hidden))
            if bias:
                state[f"bias_ih_l{k}{s}"] = rng.uniform(-0.6, 0.6, gates * hidden)
                state[f"bias_hh_l{k}{s}"] = rng.uniform(-0.6, 0.6, gates * hidden)
    return state


def np_reference(kind, state, x, layer_index, bidirectional):
    """(output (batch, time, H or 2H), final states concatenated) of one torch layer."""
    outs, finals = [], []
    for suffix, reverse in [("", False), ("_reverse", True)] if bidirectional else [("", False)]:
        w = [
            state.get(f"{n}_l{layer_index}{suffix}", 0.0)
            for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
        ]
        out, final = NP_DIRECTION[kind](x, *w, reverse)
        outs.append(out)
        finals.append(final)
    return np.concatenate(outs, -1), np.concatenate(finals, -1)


@pytest.mark.slow
@pytest.mark.parametrize(
    "kind, bidir, bias",
    [("GRU", False, True), ("GRU", True, True), ("LSTM", False, True), ("LSTM", True, False)],
    ids=["GRU", "bi_GRU", "LSTM", "bi_LSTM_no_bias"],
)
def test_from_torch_state_dict_matches_numpy_reference(kind, bidir, bias):
    rng = np.random.default_rng(0)
    state = torch_state_dict(kind, rng, 3, 5, layers=2, bidirectional=bidir, bias=bias)
    x = rng.normal(size=(2, 6, 3))
    for layer_index in (0, 1):
        out, final = np_reference(kind, state, x, layer_index, bidir)
        for return_sequences, expected in ((True, out), (False, final)):
            layer, params = from_torch_state_dict(
                kind, state, layer_index=layer_index, return_sequences=return_sequences
            )
            assert layer.name == ("bidirectional" if bidir else kind)
            y, _ = jax.jit(layer.forward)(params, jnp.asarray(x))
            np.testing.assert_allclose(y, expected, rtol=1e-12, atol=1e-12)
        x = out  # the next layer reads this layer's output


def test_from_torch_state_dict_layout_prefix_and_dtype():
    rng = np.random.default_rng(1)
    state = {f"rnn.{k}": v for k, v in torch_state_dict("LSTM", rng, 2, 3).items()}
    layer, params = from_torch_state_dict("lstm", state, prefix="rnn.", dtype="float32")
    np.testing.assert_array_equal(params["Wi"], state["rnn.weight_ih_l0"].T.astype(np.float32))
    np.testing.assert_array_equal(params["Wh"], state["rnn.weight_hh_l0"].T.astype(np.float32))
    np.testing.assert_array_equal(params["bh"], state["rnn.bias_hh_l0"].astype(np.float32))
    assert params["Wi"].dtype == jnp.float32 and dict(layer.config)["dtype"] == "float32"
    assert dict(layer.config)["hidden"] == 3


def _renamed(state, old, new_value):
    return {**state, old: new_value}


def test_from_torch_state_dict_errors():
    rng = np.random.default_rng(2)
    gru = torch_state_dict("GRU", rng, 5, 6)
    bi = torch_state_dict("GRU", rng, 5, 6, bidirectional=True)
    cases = [
        (
            _renamed(gru, "weight_hh_l0", np.zeros((18, 5))),
            r"^GRU state_dict: weight_hh_l0 has shape \(18, 5\), expected \(18, 6\)$",
        ),
        (
            _renamed(gru, "bias_ih_l0", np.zeros(17)),
            r"^GRU state_dict: bias_ih_l0 has shape \(17,\), expected \(18,\)$",
        ),
        (
            _renamed(gru, "weight_ih_l0", np.zeros((17, 5))),
            r"^GRU state_dict: weight_ih_l0 has shape \(17, 5\), expected \(3 \* hidden, in\)$",
        ),
        (
            {k: v for k, v in gru.items() if k != "weight_hh_l0"},
            r"^GRU state_dict: missing weight_hh_l0; got keys \[",
        ),
        (
            {k: v for k, v in gru.items() if k != "bias_hh_l0"},
            r"^GRU state_dict: missing bias_hh_l0; got keys",
        ),
        (bi, r"^GRU state_dict holds weight_ih_l0_reverse .*pass bidirectional=True$"),
        (
            _renamed(bi, "weight_ih_l0_reverse", np.zeros((18, 4))),
            r"^GRU state_dict: weight_ih_l0_reverse has shape \(18, 4\), expected \(18, 5\)$",
        ),
    ]
    for i, (state, pattern) in enumerate(cases):
        flag = False if i == 5 else None
        with pytest.raises(ValueError, match=pattern):
            from_torch_state_dict("GRU", state, bidirectional=flag)
    with pytest.raises(ValueError, match=r"missing weight_ih_l0_reverse"):
        from_torch_state_dict("GRU", gru, bidirectional=True)
    with pytest.raises(ValueError, match=r"missing weight_ih_l1"):
        from_torch_state_dict("GRU", gru, layer_index=1)
    with pytest.raises(ValueError, match=r"expects kind 'GRU' or 'LSTM', got 'RNN'"):
        from_torch_state_dict("RNN", gru)
    with pytest.raises(ValueError, match=r"proj_size"):
        from_torch_state_dict(
            "LSTM", {**torch_state_dict("LSTM", rng, 2, 3), "weight_hr_l0": np.zeros((2, 3))}
        )


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["GRU", "LSTM"])
def test_against_torch(kind):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    module = getattr(torch.nn, kind)(
        3, 4, num_layers=1, batch_first=True, bidirectional=True
    ).double()
    x = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    out, h_n = module(x)
    h_n = h_n[0] if kind == "LSTM" else h_n
    dy = torch.randn_like(out)
    out.backward(dy)
    layer, params = from_torch_state_dict(kind, module.state_dict())
    y, cache = layer.forward(params, jnp.asarray(x.detach().numpy()))
    np.testing.assert_allclose(y, out.detach().numpy(), rtol=1e-12, atol=1e-12)
    final_layer, _ = from_torch_state_dict(kind, module.state_dict(), return_sequences=False)
    y_final, _ = final_layer.forward(params, jnp.asarray(x.detach().numpy()))
    np.testing.assert_allclose(
        y_final, torch.cat([h_n[0], h_n[1]], -1).detach().numpy(), rtol=1e-12, atol=1e-12
    )
    grads, dx = layer.backward(params, cache, jnp.asarray(dy.numpy()))
    np.testing.assert_allclose(dx, x.grad.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(
        grads["backward"]["Wh"], module.weight_hh_l0_reverse.grad.T, rtol=1e-10, atol=1e-12
    )


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("jit", [False, True], ids=["nojit", "jit"])
def test_input_errors_fire_under_jit(jit):
    layer = GRU(4)
    _, params = layer.init(jax.random.key(0), (2, 3, 5))
    forward = jax.jit(layer.forward) if jit else layer.forward
    with pytest.raises(
        jaxbp.InputShapeError,
        match=r"^GRU expects inputs of shape \(batch, time, features\) or "
        r"\(time, features\) with 5 features, got shape \(2, 3, 4\)",
    ):
        forward(params, jnp.zeros((2, 3, 4)))
    for shape in [(5,), (1, 2, 3, 5)]:
        with pytest.raises(
            ValueError,
            match=rf"^GRU expects inputs of shape .*, got shape "
            rf"\({shape[0]},",
        ):
            forward(params, jnp.zeros(shape))
    with pytest.raises(
        ValueError,
        match=r"^GRU expects at least one time step, got shape "
        r"\(2, 0, 5\)",
    ):
        forward(params, jnp.zeros((2, 0, 5)))
    with pytest.raises(TypeError, match=r"^GRU expects floating-point inputs, got dtype int"):
        forward(params, jnp.zeros((2, 3, 5), jnp.int32))
    _, lstm_params = LSTM(2).init(jax.random.key(0), (3, 2))
    with pytest.raises(ValueError, match=r"^LSTM expects inputs .* with 2 features"):
        (jax.jit(LSTM(2).forward) if jit else LSTM(2).forward)(lstm_params, jnp.zeros((3, 7)))


def test_argument_errors():
    for make in (GRU, LSTM):
        name = make.__name__
        for bad in (0, -3, 2.5, True, "8"):
            with pytest.raises(
                ValueError,
                match=rf"^{name} expects a positive integer hidden "
                rf"size, got {bad!r}$".replace("(", r"\("),
            ):
                make(bad)
        with pytest.raises(
            ValueError,
            match=rf"^{name} expects return_sequences to be True or "
            rf"False, got 'no'$",
        ):
            make(3, return_sequences="no")
        with pytest.raises(
            ValueError,
            match=rf"^{name} expects reverse to be True or False, "
            rf"got 1$",
        ):
            make(3, reverse=1)
        with pytest.raises(jaxbp.ArgumentError, match=rf"^{name} expects dtype .* got 'int32'$"):
            make(3, dtype="int32")
    with pytest.raises(ValueError, match=r"^GRU expects inputs of shape .*, got shape \(4,\)$"):
        GRU(3).init(jax.random.key(0), (4,))
    with pytest.raises(
        ValueError,
        match=r"^bidirectional expects a GRU or LSTM layer, got "
        r"Dense$",
    ):
        bidirectional(jaxbp.Dense(3))
    with pytest.raises(
        ValueError,
        match=r"^bidirectional expects a layer built with "
        r"reverse=False",
    ):
        bidirectional(GRU(3, reverse=True))
    with pytest.raises(ValueError, match=r"^model: GRU expects a positive integer hidden size"):
        model.build({"name": "GRU", "hidden": 0})
