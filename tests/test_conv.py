"""Convolution and pooling layers: hand-written backward vs ``jax.vjp``, vs a numpy reference
written here index by index, vs finite differences; vmap; ties in max-pooling; errors under
``jit``; initialisation; descriptions.

The numpy reference computes the forward and the backward tap by tap (``y += xp[taps] @ W[j]``,
``dxp[taps] += dy @ W[j].T``, ``dW[j] = sum xp[taps] dy``): the index formulas of the module
docstring, not the transposed convolutions the layers use, so the two derivations check each
other.
"""

from __future__ import annotations

import itertools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxbp
from jaxbp import conv
from jaxbp.conv import (
    AvgPool1D,
    AvgPool2D,
    Conv1D,
    Conv2D,
    Flatten,
    GlobalAvgPool,
    MaxPool1D,
    MaxPool2D,
)
from jaxbp.model import build, describe

pytestmark = pytest.mark.filterwarnings("error")

TOL = {jnp.float64: 1e-12, jnp.float32: 1e-5}

# (layer, batched input shape): every layer, strides, dilations, paddings of every form. Kept
# short: on a small machine the compilations, not the arithmetic, are what these tests cost.
LAYERS = {
    "conv1d_same_even_s2_d2": (Conv1D(4, 4, stride=2, padding="SAME", dilation=2), (2, 11, 3)),
    "conv1d_pair_s3_unread": (Conv1D(3, 2, stride=3, padding=(2, 1)), (2, 10, 2)),
    "conv2d_mixed": (
        Conv2D(4, (2, 3), stride=(2, 1), padding=((0, 2), (1, 0)), dilation=(1, 2)),
        (2, 7, 8, 2),
    ),
    "conv2d_int_pad_s2": (Conv2D(3, 3, stride=2, padding=1), (2, 8, 7, 3)),
    "maxpool1d_overlap": (MaxPool1D(3, 1), (2, 8, 3)),
    "maxpool2d": (MaxPool2D(2), (2, 6, 7, 3)),
    "avgpool2d": (AvgPool2D((2, 3), (1, 2)), (2, 6, 7, 3)),
    "globalavgpool": (GlobalAvgPool(2), (2, 5, 6, 3)),
    "flatten": (Flatten(3), (2, 5, 6, 3)),
}
SLOW = pytest.mark.slow


def init_shapes(layer, shape):
    """``layer.init``'s output shape and parameter shapes, traced only (nothing compiled)."""
    box = []
    params = jax.eval_shape(lambda: box.append(layer.init(jax.random.key(0), shape)) or box[0][1])
    return box[0][0], params


def draw(layer, seed, shape, dtype):
    """Random params (numpy: no compilation), input and cotangent for ``layer``."""
    rng = np.random.default_rng(seed)
    out_shape, params = init_shapes(layer, shape)
    params = jax.tree_util.tree_map(
        lambda p: jnp.asarray(rng.normal(size=p.shape) * 0.5, dtype), params
    )
    x = jnp.asarray(rng.normal(size=shape), dtype)
    return params, x, jnp.asarray(rng.normal(size=out_shape), dtype)


def manual_and_vjp(layer, params, x, dy):
    y, cache = layer.forward(params, x)
    grads = layer.backward(params, cache, dy)
    y_ref, vjp = jax.vjp(lambda p, xx: layer.forward(p, xx)[0], params, x)
    return y, y_ref, grads, vjp(dy)


def all_draws(single, dtype):
    return {
        name: draw(layer, i, shape[1:] if single else shape, dtype)
        for i, (name, (layer, shape)) in enumerate(LAYERS.items())
    }


def all_manual_and_vjp(draws):
    return {name: manual_and_vjp(LAYERS[name][0], *args) for name, args in draws.items()}


_all_manual_and_vjp_jit = jax.jit(all_manual_and_vjp)


def assert_close(got, want, tol, what):
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, what
    scale = max(1.0, float(np.max(np.abs(want), initial=0.0)))
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * scale, err_msg=str(what))


def assert_tree_close(got, want, tol, what):
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want), what
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
        assert a.dtype == b.dtype, what
        assert_close(a, b, tol, what)


# --------------------------------------------------------------------------------------------
# Manual backward vs jax.vjp
# --------------------------------------------------------------------------------------------


# A Latin square over (shape, dtype, jit) by default; the rest of the cross product is slow.
@pytest.mark.slow
@pytest.mark.parametrize(
    "single, dtype, jit",
    [
        (False, jnp.float64, False),
        (True, jnp.float32, False),
        (False, jnp.float32, True),
        (True, jnp.float64, True),
        pytest.param(True, jnp.float64, False, marks=SLOW),
        pytest.param(False, jnp.float32, False, marks=SLOW),
        pytest.param(True, jnp.float32, True, marks=SLOW),
        pytest.param(False, jnp.float64, True, marks=SLOW),
    ],
    ids=[
        "batch-f64-nojit",
        "single-f32-nojit",
        "batch-f32-jit",
        "single-f64-jit",
        "single-f64-nojit",
        "batch-f32-nojit",
        "single-f32-jit",
        "batch-f64-jit",
    ],
)
def test_backward_equals_vjp(single, dtype, jit):
    draws = all_draws(single, dtype)
    out = (_all_manual_and_vjp_jit if jit else all_manual_and_vjp)(draws)
    for name, (y, y_ref, (dparams, dx), (ref_params, ref_x)) in out.items():
        x = draws[name][1]
        assert y.dtype == dtype and dx.dtype == dtype and dx.shape == x.shape, name
        assert_close(y, y_ref, TOL[dtype], name)
        assert_tree_close(dparams, ref_params, TOL[dtype], name)
        assert_close(dx, ref_x, TOL[dtype], name)


@pytest.mark.slow
def test_check_layer_reports_agreement():
    """``jaxbp.check_layer`` (float32, its default tolerances) on a conv and both pools."""
    names = ["conv2d_mixed", "maxpool1d_overlap", "avgpool2d"]
    reports = jax.jit(
        lambda key: [
            jaxbp.check_layer(LAYERS[n][0], key, LAYERS[n][1], dtype=jnp.float32) for n in names
        ]
    )(jax.random.key(0))
    for name, report in zip(names, reports, strict=True):
        assert bool(report.ok), (name, report.table())
        assert float(report.worst_rel_error) < 2e-6, (name, report.table())


def test_layers_under_strict_dtype_promotion():
    with jax.numpy_dtype_promotion("strict"):
        for single, dtype in itertools.product((False, True), (jnp.float32, jnp.float64)):
            out = jax.eval_shape(all_manual_and_vjp, all_draws(single, dtype))
            for name, results in out.items():
                assert all(r.dtype == dtype for r in jax.tree_util.tree_leaves(results)), name


@jax.jit
def _vmapped_and_batched(draws):
    out = {}
    for name, (params, x, dy) in draws.items():
        layer = LAYERS[name][0]

        def one(xx, g, layer=layer, params=params):
            yy, c = layer.forward(params, xx)
            return (yy, *layer.backward(params, c, g))

        y, cache = layer.forward(params, x)
        out[name] = ((y, *layer.backward(params, cache, dy)), jax.vmap(one)(x, dy))
    return out


def test_vmap_over_single_examples_matches_batch():
    for name, (batched, vmapped) in _vmapped_and_batched(all_draws(False, jnp.float64)).items():
        (y, dparams, dx), (y1, dparams1, dx1) = batched, vmapped
        assert_close(y1, y, 1e-12, name)
        assert_close(dx1, dx, 1e-12, name)
        summed = jax.tree_util.tree_map(lambda g: jnp.sum(g, axis=0), dparams1)
        assert_tree_close(summed, dparams, 1e-12, name)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(LAYERS))
def test_init_shape_agrees_with_forward(name):
    """The stax test, traced only (eval_shape): init's shape is forward's, batch -1 kept."""
    layer, shape = LAYERS[name]
    for in_shape in ((-1, *shape[1:]), shape, shape[1:]):
        out_shape, params = layer.init(jax.random.key(0), in_shape)
        x = jax.ShapeDtypeStruct(tuple(3 if d == -1 else d for d in in_shape), jnp.float64)
        y = jax.eval_shape(lambda p, xx: layer.forward(p, xx)[0], params, x)
        assert tuple(3 if d == -1 else d for d in out_shape) == y.shape, (name, in_shape)


# --------------------------------------------------------------------------------------------
# A numpy reference, tap by tap
# --------------------------------------------------------------------------------------------


def np_conv(x, w, b, stride, pads, dilation, dy=None):
    """Forward ``y`` and, given ``dy``, ``(dx, dW, db)``, from the index formulas."""
    xp = np.pad(x, [(0, 0), *pads, (0, 0)])
    kernel = w.shape[:-2]
    out = [
        (xp.shape[1 + a] - (k - 1) * d - 1) // s + 1
        for a, (k, d, s) in enumerate(zip(kernel, dilation, stride, strict=True))
    ]

    def taps(j):  # xp[:, o*s + j*d, :] for every output o
        return (
            slice(None),
            *(
                slice(t * d, t * d + (m - 1) * s + 1, s)
                for t, d, m, s in zip(j, dilation, out, stride, strict=True)
            ),
        )

    y = np.zeros((x.shape[0], *out, w.shape[-1])) + b
    for j in np.ndindex(*kernel):
        y += xp[taps(j)] @ w[j]
    if dy is None:
        return y
    dxp, dw = np.zeros_like(xp), np.zeros_like(w)
    for j in np.ndindex(*kernel):
        dxp[taps(j)] += dy @ w[j].T
        dw[j] = xp[taps(j)].reshape(-1, x.shape[-1]).T @ dy.reshape(-1, dy.shape[-1])
    inner = (
        slice(None),
        *(slice(lo, lo + n) for (lo, _), n in zip(pads, x.shape[1:-1], strict=True)),
    )
    return y, dxp[inner], dw, dy.reshape(-1, dy.shape[-1]).sum(0)


def np_pool(x, window, stride, kind, dy):
    """Max or mean pooling and its gradient, window by window (first maximum on ties)."""
    out = [(n - w) // s + 1 for n, w, s in zip(x.shape[1:-1], window, stride, strict=True)]
    y = np.zeros((x.shape[0], *out, x.shape[-1]))
    dx = np.zeros_like(x)
    for b, c in np.ndindex(x.shape[0], x.shape[-1]):
        for o in np.ndindex(*out):
            where = tuple(
                slice(i * s, i * s + w) for i, s, w in zip(o, stride, window, strict=True)
            )
            patch = x[(b, *where, c)]
            if kind == "max":
                j = np.unravel_index(np.argmax(patch), patch.shape)  # row-major: the first max
                y[(b, *o, c)] = patch[j]
                at = (i * s + t for i, s, t in zip(o, stride, j, strict=True))
                dx[(b, *at, c)] += dy[(b, *o, c)]
            else:
                y[(b, *o, c)] = patch.mean()
                dx[(b, *where, c)] += dy[(b, *o, c)] / patch.size
    return y, dx


def _padding_config(rank, draw_int, kind):
    if kind == "VALID" or kind == "SAME":
        return kind
    if kind == "int":
        return draw_int(0, 2)
    pairs = [(draw_int(0, 3), draw_int(0, 3)) for _ in range(rank)]
    return pairs[0] if rank == 1 else pairs


def _vjp_and_lax(layer, lax_padding, stride, dilation):
    """One compiled program per example: manual and vjp gradients, and lax's own forward."""
    rank = len(stride)

    def run(params, x, dy):
        xb = x if x.ndim == rank + 2 else x[None]
        y_lax = jax.lax.conv_general_dilated(
            xb,
            params["W"],
            stride,
            lax_padding,
            rhs_dilation=dilation,
            dimension_numbers=conv._FORWARD_DIMS[rank],
        )
        return manual_and_vjp(layer, params, x, dy), (y_lax + params["b"]).reshape(dy.shape)

    return jax.jit(run)


@pytest.mark.slow
@settings(max_examples=12, deadline=None)
@given(st.data())
def test_conv_random_geometry_vs_vjp_and_numpy(data):
    """Random kernel sizes (even ones too), strides, dilations and paddings, 1-D and 2-D."""
    rank = data.draw(st.sampled_from([1, 2]))
    draw_int = lambda lo, hi: data.draw(st.integers(lo, hi))
    kernel = [draw_int(1, 4) for _ in range(rank)]
    stride = [draw_int(1, 3) for _ in range(rank)]
    dilation = [draw_int(1, 3) for _ in range(rank)]
    kind = data.draw(st.sampled_from(["VALID", "SAME", "int", "pair"]))
    padding = _padding_config(rank, draw_int, kind)
    cin, cout, batch = draw_int(1, 3), draw_int(1, 3), draw_int(0, 2)
    k_eff = [(k - 1) * d + 1 for k, d in zip(kernel, dilation, strict=True)]
    sizes = [k + draw_int(0, 5) for k in k_eff]  # large enough for any padding
    one = (lambda v: v[0]) if rank == 1 else (lambda v: v)
    layer = (Conv1D if rank == 1 else Conv2D)(
        cout, one(kernel), stride=one(stride), padding=padding, dilation=one(dilation)
    )
    shape = (*([batch] if batch else []), *sizes, cin)
    params, x, dy = draw(layer, draw_int(0, 10**6), shape, jnp.float64)
    explicit = conv._padding("t", padding, rank)
    run = _vjp_and_lax(layer, kind if isinstance(padding, str) else explicit, stride, dilation)
    (y, _, (dparams, dx), (ref_params, ref_x)), y_lax = run(params, x, dy)
    what = describe(layer)
    assert_tree_close(dparams, ref_params, 1e-12, what)
    assert_close(dx, ref_x, 1e-12, what)
    assert_close(y, y_lax, 1e-12, what)  # lax's own "SAME"/"VALID" padding rules

    pads = conv._explicit_padding(explicit, sizes, k_eff, stride)
    expand = (lambda a: np.asarray(a)) if batch else (lambda a: np.asarray(a)[None])
    y_np, dx_np, dw_np, db_np = np_conv(
        expand(x),
        np.asarray(params["W"]),
        np.asarray(params["b"]),
        stride,
        pads,
        dilation,
        expand(dy),
    )
    assert_close(expand(y), y_np, 1e-12, what)
    assert_close(expand(dx), dx_np, 1e-12, what)
    assert_close(dparams["W"], dw_np, 1e-12, what)
    assert_close(dparams["b"], db_np, 1e-12, what)


@settings(max_examples=10, deadline=None)
@given(st.data())
def test_pool_random_geometry_vs_vjp_and_numpy(data):
    rank = data.draw(st.sampled_from([1, 2]))
    kind = data.draw(st.sampled_from(["max", "avg"]))
    window = [data.draw(st.integers(1, 3)) for _ in range(rank)]
    stride = [data.draw(st.integers(1, 3)) for _ in range(rank)]
    sizes = [w + data.draw(st.integers(0, 4)) for w in window]
    factory = {
        ("max", 1): MaxPool1D,
        ("max", 2): MaxPool2D,
        ("avg", 1): AvgPool1D,
        ("avg", 2): AvgPool2D,
    }[kind, rank]
    layer = factory(window[0] if rank == 1 else window, stride[0] if rank == 1 else stride)
    _, x, dy = draw(layer, data.draw(st.integers(0, 10**6)), (2, *sizes, 2), jnp.float64)
    x = jnp.round(2 * x)  # plenty of ties inside windows
    y, _, (_, dx), (_, ref_x) = jax.jit(lambda xx, g: manual_and_vjp(layer, (), xx, g))(x, dy)
    assert_close(dx, ref_x, 1e-12, layer.config)
    y_np, dx_np = np_pool(np.asarray(x), window, stride, kind, np.asarray(dy))
    assert_close(y, y_np, 1e-12, layer.config)
    assert_close(dx, dx_np, 1e-12, layer.config)


def test_finite_differences_agree():
    """A third opinion on a small strided, dilated, padded 2-D convolution."""
    layer = Conv2D(2, (2, 3), stride=(2, 1), padding=((1, 0), (0, 2)), dilation=(2, 1))
    params, x, dy = draw(layer, 9, (2, 5, 4, 2), jnp.float64)
    loss = lambda p, xx: jnp.sum(layer.forward(p, xx)[0] * dy)

    @jax.jit
    def grads(params, x):
        return (
            layer.backward(params, layer.forward(params, x)[1], dy),
            jaxbp.finite_difference_grads(lambda p: loss(p, x), params),
            jaxbp.finite_difference_grads(lambda xx: loss(params, xx), x),
        )

    (dparams, dx), fd_params, fd_x = grads(params, x)
    assert_tree_close(dparams, fd_params, 1e-7, "params")
    assert_close(dx, fd_x, 1e-7, "x")


@pytest.mark.slow
def test_network_of_conv_layers_checks():
    """Conv, pool, flatten and Dense in one serial network: every leaf against jax.vjp."""
    net = jaxbp.serial(
        Conv2D(4, 3, padding="SAME"),
        jaxbp.Relu,
        MaxPool2D(2),
        Conv2D(6, 3, stride=2, padding="SAME"),
        jaxbp.Relu,
        GlobalAvgPool(),
        jaxbp.Dense(3),
    )
    report = jax.jit(lambda k: jaxbp.check_layer(net, k, (4, 8, 8, 2)))(jax.random.key(0))
    assert bool(report.ok), report.table()
    assert float(report.worst_rel_error) < 1e-12, report.table()
    assert len(report.paths) == 7  # W, b of three layers with params, and x


# --------------------------------------------------------------------------------------------
# Max-pool ties, SAME, the transposed convolution's unread positions
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "layer",
    [MaxPool2D(2), MaxPool2D(3, 1), MaxPool1D(2, 1)],
    ids=["2d", "2d_overlap", "1d_overlap"],
)
def test_max_pool_ties_route_like_jax_grad(layer):
    """Constant inputs: every window is one big tie; the first element gets the gradient."""
    rank = 2 if layer.name == "MaxPool2D" else 1
    x = jnp.zeros((2, *([6] * rank), 3))
    _, _, dy = draw(layer, 0, x.shape, jnp.float64)

    @jax.jit
    def manual_and_grad(x, dy):
        dx = layer.backward((), layer.forward((), x)[1], dy)[1]
        return dx, jax.grad(lambda xx: jnp.sum(layer.forward((), xx)[0] * dy))(x)

    dx, grad = manual_and_grad(x, dy)
    np.testing.assert_array_equal(dx, grad)
    _, dx_np = np_pool(
        np.asarray(x),
        (layer.config[0][1],) * rank,
        (layer.config[1][1] or layer.config[0][1],) * rank,
        "max",
        np.asarray(dy),
    )
    np.testing.assert_allclose(dx, dx_np, rtol=1e-12, atol=1e-12)


def test_max_pool_forward_equals_reduce_window():
    x = jax.random.normal(jax.random.key(1), (2, 9, 8, 3))
    y, _ = MaxPool2D((3, 2), (2, 3)).forward((), x)
    ref = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 2, 1), (1, 2, 3, 1), "VALID")
    np.testing.assert_array_equal(y, ref)


def test_same_padding_output_sizes():
    """SAME gives ceil(n / stride) outputs, the odd zero at the end, for even kernels too."""
    for n, k, s in itertools.product((5, 6, 7), (2, 3, 4), (1, 2, 3)):
        layer = Conv1D(1, k, stride=s, padding="SAME")
        out_shape, _ = init_shapes(layer, (1, n, 1))
        assert out_shape == (1, math.ceil(n / s), 1), (n, k, s)
    # An even kernel at stride 1: one zero on the left, two on the right of a ones input.
    layer = Conv1D(1, 4, padding="SAME")
    params = {"W": jnp.ones((4, 1, 1)), "b": jnp.zeros(1)}
    y, _ = layer.forward(params, jnp.ones((5, 1)))
    np.testing.assert_array_equal(y[:, 0], [3, 4, 4, 3, 2])


def test_stride_leaves_unread_inputs_with_zero_gradient():
    layer = Conv1D(1, 2, stride=3)  # length 8: outputs read positions 0-1, 3-4, 6-7
    params = {"W": jnp.ones((2, 1, 1)), "b": jnp.zeros(1)}
    x = jnp.arange(9.0).reshape(9, 1)  # position 8 is never read
    y, cache = layer.forward(params, x)
    _, dx = layer.backward(params, cache, jnp.ones_like(y))
    np.testing.assert_array_equal(dx[:, 0], [1, 1, 0, 1, 1, 0, 1, 1, 0])


def test_pytorch_layout_and_numbers():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 11, 3))
    weight = rng.normal(size=(4, 3, 3))  # torch Conv1d: (out, in, k)
    tconv = torch.nn.Conv1d(3, 4, 3, stride=2, padding=2, dilation=2, dtype=torch.float64)
    tconv.weight.data = torch.tensor(weight)
    xt = torch.tensor(x.transpose(0, 2, 1), requires_grad=True)
    yt = tconv(xt)
    yt.backward(torch.ones_like(yt))
    layer = Conv1D(4, 3, stride=2, padding=2, dilation=2)
    params = {"W": jnp.asarray(weight.transpose(2, 1, 0)), "b": jnp.asarray(tconv.bias.data)}
    y, cache = layer.forward(params, jnp.asarray(x))
    dparams, dx = layer.backward(params, cache, jnp.ones_like(y))
    np.testing.assert_allclose(y, yt.detach().numpy().transpose(0, 2, 1), rtol=1e-12)
    np.testing.assert_allclose(dx, xt.grad.numpy().transpose(0, 2, 1), rtol=1e-12)
    np.testing.assert_allclose(
        dparams["W"], tconv.weight.grad.numpy().transpose(2, 1, 0), rtol=1e-12
    )


# --------------------------------------------------------------------------------------------
# Initialisation, dtypes, descriptions
# --------------------------------------------------------------------------------------------


def test_he_and_glorot_initialisation():
    _, params = Conv2D(64, 3).init(jax.random.key(0), (-1, 8, 8, 32))
    fan_in = 3 * 3 * 32
    assert params["W"].shape == (3, 3, 32, 64) and params["W"].dtype == jnp.float64
    assert abs(float(jnp.std(params["W"])) / math.sqrt(2 / fan_in) - 1) < 0.03
    np.testing.assert_array_equal(params["b"], np.zeros(64))
    _, params = Conv1D(16, 5, w_init="glorot", dtype="float32").init(jax.random.key(1), (4, 9, 8))
    limit = math.sqrt(6 / (5 * 8 + 5 * 16))
    assert params["W"].dtype == jnp.float32 and params["b"].dtype == jnp.float32
    assert float(jnp.max(jnp.abs(params["W"]))) <= limit
    assert float(jnp.max(jnp.abs(params["W"]))) > 0.9 * limit
    custom = Conv1D(2, 3, w_init=lambda key, shape, dtype: jnp.full(shape, 0.5, dtype))
    assert float(custom.init(jax.random.key(0), (4, 3))[1]["W"][0, 0, 0]) == 0.5


ALL_LAYERS = [layer for layer, _ in LAYERS.values()] + [
    Conv1D(3, 2, dtype=jnp.float32),
    Conv2D(2, [2, 3], padding=[[1, 0], [0, 1]], w_init="glorot"),
    GlobalAvgPool(),
    Flatten(),
    MaxPool2D([2, 3], [1, 2]),
    jaxbp.serial(Conv1D(4, 3), jaxbp.Relu, AvgPool1D(2), Flatten(), jaxbp.Dense(2)),
]


@pytest.mark.parametrize("layer", ALL_LAYERS, ids=lambda layer: layer.name)
def test_describe_build_round_trip(layer):
    description = describe(layer)
    description = json.loads(json.dumps(description))  # JSON-able, and as read back from a file
    rebuilt = build(description)
    assert describe(rebuilt) == description
    assert rebuilt.name == layer.name
    shape = (
        (2, 6, 6, 2)
        if "2D" in layer.name or layer.name in ("GlobalAvgPool", "Flatten")
        else (2, 8, 3)
    )
    s1, p1 = init_shapes(layer, shape)
    s2, p2 = init_shapes(rebuilt, shape)
    assert s1 == s2 and p1 == p2, layer.name


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


def _forward(layer, params, x, jit):
    return (jax.jit(layer.forward) if jit else layer.forward)(params, x)


@pytest.mark.parametrize("jit", [False, True], ids=["nojit", "jit"])
def test_shape_errors_name_layer_and_shapes(jit):
    layer = Conv1D(4, 5, dilation=2)
    _, params = layer.init(jax.random.key(0), (2, 12, 3))
    with pytest.raises(
        ValueError,
        match=r"^Conv1D: kernel 5 \(dilated to 9\) is larger than "
        r"the padded input length 7",
    ):
        _forward(layer, params, jnp.ones((2, 7, 3)), jit)
    with pytest.raises(
        ValueError,
        match=r"^Conv1D expects inputs of shape \(batch, length, "
        r"channels\) with 3 channels, got shape \(8, 40, 4\)",
    ):
        _forward(layer, params, jnp.ones((8, 40, 4)), jit)
    with pytest.raises(
        ValueError,
        match=r"^Conv1D expects inputs of shape \(batch, length, "
        r"channels\) or \(length, channels\), got shape \(8,\)",
    ):
        _forward(layer, params, jnp.ones((8,)), jit)
    with pytest.raises(ValueError, match=r"no empty dimension, got shape \(2, 0, 3\)"):
        _forward(layer, params, jnp.ones((2, 0, 3)), jit)
    with pytest.raises(
        ValueError,
        match=r"^Conv2D: kernel \(3, 3\) is larger than the padded "
        r"input size \(2, 5\)",
    ):
        _forward(Conv2D(2, 3, padding=(0, 1)), None, jnp.ones((2, 3, 1)), jit)
    with pytest.raises(
        ValueError,
        match=r"^MaxPool2D: window \(2, 3\) is larger than the "
        r"input size \(4, 2\)",
    ):
        _forward(MaxPool2D((2, 3)), (), jnp.ones((1, 4, 2, 1)), jit)
    with pytest.raises(
        ValueError,
        match=r"GlobalAvgPool expects inputs of shape \(batch, "
        r"\*spatial, channels\) with at least one spatial axis",
    ):
        _forward(GlobalAvgPool(), (), jnp.ones((4, 3)), jit)
    with pytest.raises(ValueError, match=r"Flatten expects inputs of 3 axes per example"):
        _forward(Flatten(3), (), jnp.ones((4, 3)), jit)
    with pytest.raises(TypeError, match=r"MaxPool1D expects floating-point inputs"):
        _forward(MaxPool1D(2), (), jnp.ones((4, 3), jnp.int32), jit)


@pytest.mark.parametrize("jit", [False, True], ids=["nojit", "jit"])
def test_param_errors(jit):
    layer = Conv2D(4, 3)
    good = {"W": jnp.ones((3, 3, 2, 4)), "b": jnp.ones(4)}
    x = jnp.ones((2, 5, 5, 2))
    with pytest.raises(
        ValueError,
        match=r"^Conv2D expects W of shape \(3, 3, in, out\), got "
        r"shape \(3, 2, 2, 4\)",
    ):
        _forward(layer, {**good, "W": jnp.ones((3, 2, 2, 4))}, x, jit)
    with pytest.raises(ValueError, match=r"^Conv2D expects b of shape \(4,\)"):
        _forward(layer, {**good, "b": jnp.ones(3)}, x, jit)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: Conv1D(0, 3), r"^Conv1D expects a positive integer out_channels, got 0$"),
        (lambda: Conv1D(4, -1), r"^Conv1D expects a positive integer kernel_size, got -1$"),
        (lambda: Conv2D(4, (3, 0)), r"^Conv2D expects a positive integer kernel_size, got 0$"),
        (lambda: Conv1D(4, 3, stride=0), r"positive integer stride, got 0"),
        (lambda: Conv2D(4, 3, dilation=(1, 0)), r"positive integer dilation, got 0"),
        (lambda: Conv1D(4, 3, padding=-1), r"non-negative integer padding, got -1"),
        (lambda: Conv1D(4, 3, padding=(1, -2)), r"non-negative integer padding, got -2"),
        (
            lambda: Conv1D(4, 3, padding="same-ish"),
            r"^Conv1D padding must be 'VALID', 'SAME', an int or a pair \(lo, hi\), "
            r"got 'same-ish'$",
        ),
        (lambda: Conv2D(4, 3, padding="FULL"), r"^Conv2D padding must be 'VALID', 'SAME'"),
        (lambda: Conv2D(4, 3, padding=(1, 2, 3)), r"^Conv2D padding must be"),
        (lambda: Conv1D(4, 3.0), r"^Conv1D expects kernel_size to be a positive integer, got 3.0$"),
        (lambda: Conv1D(4, True), r"kernel_size to be a positive integer, got True"),
        (lambda: Conv2D(4, (3, 3, 3)), r"kernel_size to be a positive integer or 2 of them"),
        (lambda: Conv1D("4", 3), r"^Conv1D expects a positive integer out_channels, got '4'$"),
        (lambda: Conv1D(4, 3, w_init="lecun"), r"w_init must be 'glorot', 'he' or a function"),
        (lambda: Conv1D(4, 3, w_init=3), r"w_init must be 'glorot', 'he' or a function"),
        (lambda: Conv1D(4, 3, dtype="int32"), r"floating dtype"),
        (lambda: MaxPool2D(0), r"^MaxPool2D expects a positive integer window, got 0$"),
        (lambda: AvgPool1D(2, stride=-1), r"^AvgPool1D expects a positive integer stride"),
        (lambda: GlobalAvgPool(0), r"positive integer spatial_dims"),
        (lambda: Flatten(1.5), r"positive integer example_ndim"),
    ],
)
def test_construction_errors(make, message):
    # One class for every bad argument (jaxbp.errors.ArgumentError, a TypeError and a
    # ValueError), whether the mistake is in the type or the value.
    with pytest.raises(jaxbp.ArgumentError, match=message):
        make()


def test_errors_through_build_name_the_place():
    with pytest.raises(ValueError, match=r"model\.layers\[0\]: Conv1D padding must be"):
        build(
            {
                "name": "serial",
                "layers": [
                    {"name": "Conv1D", "out_channels": 2, "kernel_size": 3, "padding": "full"}
                ],
            }
        )
