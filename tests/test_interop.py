"""jaxbp.interop: custom_vjp functions checked and used as layers; layers as custom_vjp functions.

References: ``jax.vjp`` of the undecorated primal (float64, 1e-12), central finite differences,
and small numpy gradients written out here.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxbp
from jaxbp.commands.check_vjp import parse_shape, random_arguments, run_vjp
from jaxbp.interop import argument_names, as_custom_vjp, check_vjp, check_vjp_fd, from_custom_vjp
from jaxbp.model import build, describe

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
F64 = jnp.float64


# --------------------------------------------------------------------------------------------
# custom_vjp functions under test
# --------------------------------------------------------------------------------------------


@jax.custom_vjp
def scaled_tanh(x, w, s):
    """``s * tanh(x @ w)``; works on a batch and on one example."""
    return s * jnp.tanh(x @ w)


def _st_fwd(x, w, s):
    t = jnp.tanh(x @ w)
    return s * t, (x, w, s, t)


def _st_bwd(res, dy):
    x, w, s, t = res
    dz = dy * s * (1 - t * t)
    return dz @ w.T, x.reshape(-1, w.shape[0]).T @ dz.reshape(-1, w.shape[1]), jnp.sum(dy * t)


def _st_bwd_no_transpose(res, dy):
    x, w, s, t = res
    dz = dy * s * (1 - t * t)
    return dz @ w.T, dz.T @ x, jnp.sum(dy * t)  # the slip: dz.T @ x, not x.T @ dz


scaled_tanh.defvjp(_st_fwd, _st_bwd)


@jax.custom_vjp
def scaled_tanh_buggy(x, w, s):
    return s * jnp.tanh(x @ w)


scaled_tanh_buggy.defvjp(_st_fwd, _st_bwd_no_transpose)


def init_scaled_tanh(key, input_shape):
    n = input_shape[-1]
    return {"w": jax.random.normal(key, (n, 3)) / np.sqrt(n), "s": jnp.asarray(1.2)}


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def poly_tree(x, power, params):
    """Pytree argument, a nondiff int, a pytree output; residuals a nested dict."""
    y = params["a"] * x**power + params["lin"]["b"] @ x
    return {"y": y, "pair": (jnp.sum(y), x * params["a"])}


def _poly_fwd(x, power, params):
    return poly_tree(x, power, params), {"x": x, "p": params, "stats": (x**power,)}


def _poly_bwd(power, res, g):
    x, p, (xp,) = res["x"], res["p"], res["stats"]
    gy = g["y"] + g["pair"][0]
    gx = gy * p["a"] * power * x ** (power - 1) + p["lin"]["b"].T @ gy + g["pair"][1] * p["a"]
    da = jnp.sum(gy * xp) + jnp.sum(g["pair"][1] * x)
    return gx, {"a": da, "lin": {"b": jnp.outer(gy, x)}}


poly_tree.defvjp(_poly_fwd, _poly_bwd)


@jax.custom_vjp
def swish_forgot_term(x, beta):
    """``x * sigmoid(beta x)`` whose bwd forgets the product rule's second term in dx."""
    return x * jax.nn.sigmoid(beta * x)


def _sw_fwd(x, beta):
    s = jax.nn.sigmoid(beta * x)
    return x * s, (x, beta, s)


def _sw_bwd(res, g):
    x, beta, s = res
    return g * s, jnp.sum(g * x * x * s * (1 - s))


swish_forgot_term.defvjp(_sw_fwd, _sw_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def poly_tree_array(x, power, a):
    """``a * x ** power`` with a nondiff power."""
    return a * x**power


poly_tree_array.defvjp(
    lambda x, p, a: (a * x**p, (x, a)),
    lambda p, res, g: (g * res[1] * p * res[0] ** (p - 1), jnp.sum(g * res[0] ** p)),
)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def scaled_power(x, a, power=3):
    """``a * x ** power``: a nondiff argument with a default, as the command line needs."""
    return a * x**power


scaled_power.defvjp(
    lambda x, a, p: (a * x**p, (x, a)),
    lambda p, res, g: (g * res[1] * p * res[0] ** (p - 1), jnp.sum(g * res[0] ** p)),
)


def _with_bwd(bwd, name="bad"):
    """``scaled_tanh`` with another bwd."""
    fn = jax.custom_vjp(lambda x, w, s: s * jnp.tanh(x @ w))
    fn.__name__ = name
    fn.defvjp(_st_fwd, bwd)
    return fn


def _problem(key=0, n=5, d=4, out=3):
    kx, kw = jax.random.split(jax.random.key(key))
    return (
        jax.random.normal(kx, (n, d), F64),
        jax.random.normal(kw, (d, out), F64) / 2,
        jnp.asarray(1.5, F64),
    )


def _numpy_scaled_tanh_grads(x, w, s, dy):
    """The VJP of ``s * tanh(x @ w)`` in numpy: an independent reference."""
    x, w, s, dy = (np.asarray(a, np.float64) for a in (x, w, s, dy))
    t = np.tanh(x @ w)
    dz = dy * s * (1 - t**2)
    return dz @ w.T, x.T @ dz, np.sum(dy * t)


check_vjp_jit = jax.jit(check_vjp, static_argnums=0)


# --------------------------------------------------------------------------------------------
# check_vjp
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("jit", [False, True])
def test_check_vjp_passes_a_correct_rule_per_argument(jit):
    args = _problem()
    report = (check_vjp_jit if jit else check_vjp)(scaled_tanh, *args)
    assert report.paths == ("x", "w", "s")
    assert bool(report.ok)
    assert float(np.max(report.rel_error)) < 1e-12


@pytest.mark.slow
def test_check_vjp_manual_equals_a_numpy_reference():
    # The cotangent drawn by check_vjp goes through a numpy VJP written out independently.
    x, w, s = _problem()
    dy = jax.random.normal(jax.random.key(7), (5, 3), F64)
    _, res = _st_fwd(x, w, s)
    manual = _st_bwd(res, dy)
    for got, want in zip(manual, _numpy_scaled_tanh_grads(x, w, s, dy)):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    assert bool(check_vjp(scaled_tanh, x, w, s, cotangent=dy).ok)


@pytest.mark.slow
@pytest.mark.parametrize("jit", [False, True])
def test_check_vjp_names_the_argument_with_a_missing_transpose(jit):
    x, w, s = _problem(d=4, out=4)  # square w: the wrong gradient has the right shape
    report = (check_vjp_jit if jit else check_vjp)(scaled_tanh_buggy, x, w, s)
    assert not bool(report.ok)
    assert report.worst_path == "w"
    assert [bool(v) for v in report.leaf_ok] == [True, False, True]
    assert "MISMATCH: worst leaf w" in report.table()


def test_check_vjp_names_a_forgotten_product_rule_term():
    x = jax.random.normal(jax.random.key(1), (6,), F64)
    report = check_vjp(swish_forgot_term, x, jnp.asarray(0.7, F64))
    assert report.paths == ("x", "beta")
    assert report.worst_path == "x"
    assert bool(report.leaf_ok[1])


@pytest.mark.slow
def test_check_vjp_pytree_arguments_outputs_residuals_and_nondiff_argnums():
    x = jax.random.normal(jax.random.key(2), (4,), F64)
    params = {
        "a": jnp.asarray(0.3, F64),
        "lin": {"b": jax.random.normal(jax.random.key(3), (4, 4), F64)},
    }
    report = check_vjp(poly_tree, x, 3, params)
    assert report.paths == ("x", "params['a']", "params['lin']['b']")
    assert bool(report.ok), report.table()
    assert float(np.max(report.rel_error)) < 1e-12
    jitted = jax.jit(check_vjp, static_argnums=(0, 2))(poly_tree, x, 3, params)
    assert bool(jitted.ok)


@pytest.mark.slow
def test_check_vjp_fd_three_opinions():
    args = _problem(n=3, d=3, out=2)
    good = check_vjp_fd(scaled_tanh, *args)
    assert good.ok
    assert good.manual_vs_fd.paths == ("x", "w", "s")
    assert float(np.max(good.manual_vs_fd.rel_error)) < 1e-8
    bad = check_vjp_fd(scaled_tanh_buggy, *_problem(n=3, d=3, out=3))
    assert not bool(bad.manual_vs_autodiff.ok) and not bool(bad.manual_vs_fd.ok)
    assert bool(bad.autodiff_vs_fd.ok)  # the reference and finite differences agree
    assert bad.manual_vs_fd.worst_path == "w"


def test_check_vjp_accepts_none_as_a_zero_cotangent():
    fn = _with_bwd(lambda res, dy: (None, *_st_bwd(res, dy)[1:]), "no_dx")
    report = check_vjp(fn, *_problem())
    assert [bool(v) for v in report.leaf_ok] == [False, True, True]
    assert report.worst_path == "x"


@pytest.mark.slow
def test_check_vjp_float32_tolerances():
    x, w, s = (a.astype(jnp.float32) for a in _problem())
    report = check_vjp(scaled_tanh, x, w, s)
    assert bool(report.ok)
    assert float(np.max(report.rel_error)) < 1e-5
    assert not bool(
        check_vjp(scaled_tanh_buggy, *(a.astype(jnp.float32) for a in _problem(d=4, out=4))).ok
    )


# --------------------------------------------------------------------------------------------
# Bad input: one line naming the argument and what was expected, under jit too
# --------------------------------------------------------------------------------------------


def _raises(exc, match, fn, *args, jit=False):
    call = jax.jit(check_vjp, static_argnums=0) if jit else check_vjp
    with pytest.raises(exc, match=match) as info:
        call(fn, *args)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("jit", [False, True])
def test_errors_name_the_argument_and_the_expected_shape(jit):
    x, w, s = _problem(d=4, out=3)
    wrong_shape = _with_bwd(
        lambda res, dy: (_st_bwd(res, dy)[0], dy.T @ res[0], _st_bwd(res, dy)[2]), "transposed"
    )
    _raises(
        ValueError,
        r"transposed's bwd returned a cotangent of shape \(3, 4\) for "
        r"argument 'w', expected shape \(4, 3\)",
        wrong_shape,
        x,
        w,
        s,
        jit=jit,
    )
    too_few = _with_bwd(lambda res, dy: _st_bwd(res, dy)[:2], "two")
    _raises(
        ValueError,
        r"two's bwd returned 2 cotangents, expected 3 \(one per "
        r"differentiable argument: x, w, s\)",
        too_few,
        x,
        w,
        s,
        jit=jit,
    )
    not_tuple = _with_bwd(lambda res, dy: _st_bwd(res, dy)[0], "single")
    _raises(ValueError, "single's bwd must return a tuple", not_tuple, x, w, s, jit=jit)
    _raises(
        TypeError,
        "argument x of scaled_tanh has dtype int",
        scaled_tanh,
        jnp.ones((5, 4), jnp.int32),
        w,
        s,
        jit=jit,
    )


def test_error_on_a_cotangent_tree_of_the_wrong_structure():
    x = jnp.ones((4,), F64)
    params = {"a": jnp.asarray(0.3, F64), "lin": {"b": jnp.eye(4, dtype=F64)}}
    fn = jax.custom_vjp(poly_tree.fun, nondiff_argnums=(1,))
    fn.defvjp(_poly_fwd, lambda p, res, g: (_poly_bwd(p, res, g)[0], {"a": 0.0}))
    with pytest.raises(
        ValueError,
        match=r"argument 'params' that does not match the "
        r"argument: got no leaf \['lin'\]\['b'\]",
    ):
        check_vjp(fn, x, 3, params)


def test_errors_on_what_is_not_a_checkable_custom_vjp():
    x = jnp.ones((3,), F64)
    with pytest.raises(TypeError, match=r"expects a jax.custom_vjp function"):
        check_vjp(jnp.sin, x)
    jvp_fn = jax.custom_jvp(lambda v: v)
    with pytest.raises(TypeError, match="custom_jvp function"):
        check_vjp(jvp_fn, x)
    no_rule = jax.custom_vjp(lambda v: v)
    with pytest.raises(ValueError, match=r"has no rule yet; call .*defvjp\(fwd, bwd\)"):
        check_vjp(no_rule, x)
    with pytest.raises(TypeError, match="scaled_tanh missing a required argument: 's'"):
        check_vjp(scaled_tanh, x, jnp.ones((3, 2)))


def test_argument_names():
    assert argument_names(scaled_tanh) == ("x", "w", "s")
    assert argument_names(jax.custom_vjp(lambda *args: args[0]), 2) == ("args[0]", "args[1]")


# --------------------------------------------------------------------------------------------
# from_custom_vjp: a user's rule as a jaxbp layer
# --------------------------------------------------------------------------------------------


CELL = from_custom_vjp(scaled_tanh, init_scaled_tanh)
check_layer = jax.jit(jaxbp.check_layer, static_argnums=(0, 2), static_argnames="dtype")


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(5, 4), (4,)])
def test_from_custom_vjp_passes_check_layer_float64(shape):
    report = check_layer(CELL, jax.random.key(0), shape)
    assert report.paths == ("['params']['s']", "['params']['w']", "['x']")
    assert bool(report.ok)
    assert float(np.max(report.rel_error)) < 1e-12


def test_from_custom_vjp_check_layer_float32():
    report = check_layer(CELL, jax.random.key(0), (5, 4), dtype=jnp.float32)
    assert bool(report.ok)
    assert float(np.max(report.rel_error)) < 1e-5


def test_from_custom_vjp_output_shape_and_single_example():
    out_shape, params = CELL.init(jax.random.key(0), (-1, 4))
    assert out_shape == (-1, 3)
    x = jnp.arange(4.0)
    y, _ = CELL.forward(params, x)
    np.testing.assert_allclose(y, params["s"] * np.tanh(np.asarray(x) @ params["w"]), rtol=1e-14)


def _net(cell_fn):
    return jaxbp.serial(jaxbp.Dense(4), from_custom_vjp(cell_fn, init_scaled_tanh), jaxbp.Dense(1))


def _regression(n=16):
    x = jax.random.normal(jax.random.key(4), (n, 3), F64)
    return x, jnp.sin(x.sum(axis=1, keepdims=True))


@pytest.mark.slow
def test_verified_train_step_checks_a_custom_vjp_every_step():
    x, y = _regression()
    optimizer = optax.adam(1e-2)
    net = _net(scaled_tanh)
    _, params = net.init(jax.random.key(1), (-1, 3))
    step = jaxbp.make_train_step(net, "mse", optimizer, check="raise")
    ts = jaxbp.init_train_state(net, optimizer, params)
    losses = []
    for _ in range(30):
        ts, metrics = step(ts, x, y)
        losses.append(float(metrics.loss))
    assert losses[-1] < 0.5 * losses[0]
    assert metrics.report.paths[2:4] == ("[1]['s']", "[1]['w']")
    assert float(metrics.rel_error) < 1e-12


@pytest.mark.slow
def test_verified_train_step_names_the_wrong_leaf_of_a_buggy_custom_vjp():
    x, y = _regression()
    net = jaxbp.serial(
        jaxbp.Dense(4),
        from_custom_vjp(
            scaled_tanh_buggy,
            lambda k, s: {"w": jax.random.normal(k, (4, 4)) / 2, "s": jnp.asarray(1.0)},
        ),
        jaxbp.Dense(1),
    )
    _, params = net.init(jax.random.key(1), (-1, 3))
    optimizer = jaxbp.sgd(0.1)
    step = jaxbp.make_train_step(net, "mse", optimizer, check="raise")
    with pytest.raises(jaxbp.GradientMismatchError, match=r"worst leaf \[1\]\['w'\]"):
        step(jaxbp.init_train_state(net, optimizer, params), x, y)


@pytest.mark.slow
def test_from_custom_vjp_three_opinions_in_a_network():
    x, y = _regression(n=4)
    net = _net(scaled_tanh)
    _, params = net.init(jax.random.key(1), (-1, 3))
    result = jax.jit(jaxbp.check_grads, static_argnums=(0, 1))(net, "mse", params, x, y)
    assert result.ok


def test_from_custom_vjp_with_nondiff_constants_and_named_input():
    layer = from_custom_vjp(
        poly_tree_array, lambda k, s: {"a": jnp.asarray(0.5)}, input_arg="x", constants={"power": 3}
    )
    report = check_layer(layer, jax.random.key(0), (4,))
    assert bool(report.ok) and report.paths == ("['params']['a']", "['x']")


def test_describe_build_round_trip():
    layer = from_custom_vjp(f"{__name__}:scaled_tanh", f"{__name__}:init_scaled_tanh")
    d = describe(layer)
    assert d == {
        "name": "CustomVJP",
        "fn": f"{__name__}:scaled_tanh",
        "init": f"{__name__}:init_scaled_tanh",
        "input_arg": 0,
        "constants": [],
    }
    # A description resolves its references only inside the modules the reader allows.
    here = [__name__]
    assert describe(build(json.loads(json.dumps(d)), modules=here)) == d
    with_constants = from_custom_vjp(
        poly_tree_array, f"{__name__}:init_scaled_tanh", constants={"power": 2}
    )
    d2 = describe(with_constants)
    assert d2["fn"] == f"{__name__}:poly_tree_array"
    assert describe(build(json.loads(json.dumps(d2)), modules=here)) == d2
    net = jaxbp.serial(jaxbp.Dense(4), layer)
    assert describe(build(describe(net), modules=here)) == describe(net)
    with pytest.raises(ValueError, match=rf"model.layers\[1\].fn: .* --import {__name__}"):
        build(describe(net))


def test_from_custom_vjp_errors():
    with pytest.raises(ValueError, match="has no argument 'z'; its arguments are x, w, s"):
        from_custom_vjp(scaled_tanh, init_scaled_tanh, input_arg="z")
    with pytest.raises(
        ValueError,
        match=r"constants must give exactly the nondiff arguments "
        r"of poly_tree_array \(power\); missing \['power'\]",
    ):
        from_custom_vjp(poly_tree_array, init_scaled_tanh)
    with pytest.raises(ValueError, match="is in nondiff_argnums"):
        from_custom_vjp(poly_tree_array, init_scaled_tanh, input_arg=1, constants={"power": 2})
    with pytest.raises(ValueError, match="module 'no_such_module', which is not imported"):
        from_custom_vjp("no_such_module:f", init_scaled_tanh)
    with pytest.raises(TypeError, match="expects a jax.custom_vjp function"):
        from_custom_vjp(jnp.tanh, init_scaled_tanh)
    bad_init = from_custom_vjp(scaled_tanh, lambda k, s: {"W": jnp.ones((4, 3))})
    with pytest.raises(ValueError, match=r"init's result must be a dict with keys \('s', 'w'\)"):
        bad_init.init(jax.random.key(0), (-1, 4))
    _, params = CELL.init(jax.random.key(0), (-1, 4))
    with pytest.raises(ValueError, match="params must be a dict with keys"):
        jax.jit(CELL.forward)({"w": params["w"]}, jnp.ones((2, 4)))
    with pytest.raises(TypeError, match="argument x of scaled_tanh has dtype int"):
        jax.jit(CELL.forward)(params, jnp.ones((2, 4), jnp.int32))


# --------------------------------------------------------------------------------------------
# as_custom_vjp: a jaxbp network as a plain custom_vjp function
# --------------------------------------------------------------------------------------------


NET = jaxbp.serial(jaxbp.Dense(5), jaxbp.Tanh, jaxbp.Dense(3), jaxbp.Gelu, jaxbp.Dense(2))
APPLY = as_custom_vjp(NET)


def _half_sse_via(apply):
    return lambda p, x, y: 0.5 * jnp.sum((apply(p, x) - y) ** 2)


@jax.jit
def _grads_through_apply(params, x, y):
    return jax.grad(_half_sse_via(APPLY), argnums=(0, 1))(params, x, y)


@jax.jit
def _grads_by_backprop(params, x, y):
    out, cache = NET.forward(params, x)
    return NET.backward(params, cache, out - y)


def _net_problem(batch, key=0, width=4):
    k1, k2, k3 = jax.random.split(jax.random.key(key), 3)
    _, params = NET.init(k1, (-1, width))
    return (
        params,
        jax.random.normal(k2, (batch, width), F64),
        jax.random.normal(k3, (batch, 2), F64),
    )


@pytest.mark.slow
def test_as_custom_vjp_is_a_custom_vjp_using_the_hand_written_backward():
    assert isinstance(APPLY, jax.custom_vjp) and APPLY.layer is NET
    # A buggy backward shows through: jax.grad really runs the layer's backward.
    broken = NET._replace(
        backward=lambda p, c, dy: jax.tree_util.tree_map(jnp.zeros_like, NET.backward(p, c, dy))
    )
    params, x, y = _net_problem(3)
    grads = jax.grad(_half_sse_via(as_custom_vjp(broken)))(params, x, y)
    assert all(float(jnp.max(jnp.abs(g))) == 0 for g in jax.tree_util.tree_leaves(grads))


@pytest.mark.slow
@pytest.mark.parametrize("jit", [False, True])
def test_jax_grad_through_as_custom_vjp_equals_backprop(jit):
    params, x, y = _net_problem(6)
    grad_fn = _grads_through_apply if jit else jax.grad(_half_sse_via(APPLY), argnums=(0, 1))
    got = grad_fn(params, x, y)
    want = _grads_by_backprop(params, x, y)
    report = jaxbp.compare_grads(got, want, rtol=1e-13, atol=1e-13)
    assert bool(report.ok), report.table()
    auto = jax.grad(_half_sse_via(lambda p, xx: NET.forward(p, xx)[0]))(params, x, y)
    assert bool(jaxbp.compare_grads(got[0], auto, rtol=1e-12, atol=1e-12).ok)


@functools.partial(jax.jit, static_argnums=1)
def _apply_vs_backprop(seed, batch):
    # One compiled program per batch size: problem, both gradients and the comparison.
    params, x, y = _net_problem(batch, key=seed)
    return jaxbp.compare_grads(
        jax.grad(_half_sse_via(APPLY), argnums=(0, 1))(params, x, y),
        _grads_by_backprop(params, x, y),
        rtol=1e-12,
        atol=1e-12,
    )


@pytest.mark.slow
@settings(max_examples=10, deadline=None)
@given(batch=st.sampled_from([1, 6]), seed=st.integers(0, 2**16))  # two shapes: two compiles
def test_as_custom_vjp_property_random_batches(batch, seed):
    report = _apply_vs_backprop(seed, batch)
    assert bool(report.ok), report.table()


@pytest.mark.slow
def test_as_custom_vjp_under_vmap_per_example_gradients():
    params, x, y = _net_problem(4)
    per_example = jax.jit(jax.vmap(jax.grad(_half_sse_via(APPLY)), in_axes=(None, 0, 0)))
    got = per_example(params, x, y)
    for i in range(4):
        want = _grads_by_backprop(params, x[i], y[i])[0]
        one = jax.tree_util.tree_map(lambda g: g[i], got)
        assert bool(jaxbp.compare_grads(one, want, rtol=1e-12, atol=1e-12).ok)


@pytest.mark.slow
def test_as_custom_vjp_inside_lax_scan():
    # A recurrence h_{t+1} = cell(p, h_t) + x_t through lax.scan, differentiated end to end.
    cell = jaxbp.serial(jaxbp.Dense(3), jaxbp.Tanh)
    _, params = cell.init(jax.random.key(0), (-1, 3))
    xs = jax.random.normal(jax.random.key(1), (5, 2, 3), F64)

    def unroll(apply):
        def loss(p):
            def body(h, x_t):
                h = apply(p, h) + x_t
                return h, jnp.sum(h**2)

            _, per_step = jax.lax.scan(body, jnp.zeros((2, 3), F64), xs)
            return jnp.sum(per_step)

        return loss

    got = jax.jit(jax.grad(unroll(as_custom_vjp(cell))))(params)
    want = jax.jit(jax.grad(unroll(lambda p, h: cell.forward(p, h)[0])))(params)
    assert bool(jaxbp.compare_grads(got, want, rtol=1e-12, atol=1e-12).ok)


def test_as_custom_vjp_of_a_custom_vjp_layer_round_trips():
    apply = as_custom_vjp(CELL)
    _, params = CELL.init(jax.random.key(0), (-1, 4))
    x = jax.random.normal(jax.random.key(1), (5, 4), F64)
    got = jax.grad(lambda p: jnp.sum(apply(p, x) ** 2))(params)
    want = jax.grad(lambda p: jnp.sum(scaled_tanh.fun(x, p["w"], p["s"]) ** 2))(params)
    assert bool(jaxbp.compare_grads(got, want, rtol=1e-12, atol=1e-12).ok)


def test_as_custom_vjp_rejects_what_is_not_a_layer():
    with pytest.raises(TypeError, match=r"did you forget to call it, e.g. Dense\(10\)"):
        as_custom_vjp(jaxbp.Dense)


# --------------------------------------------------------------------------------------------
# The command-line check: run_vjp (the lead wires it into `jaxbp check --vjp`)
# --------------------------------------------------------------------------------------------

BUGGY = str(EXAMPLES / "buggy_custom_vjp.py")


@pytest.mark.slow
def test_run_vjp_exit_codes_and_table(capsys):
    assert run_vjp(f"{BUGGY}:recurrent_cell_fixed", [(5, 4), (4, 4), ()], seed=0) == 0
    out = capsys.readouterr().out
    assert "recurrent_cell_fixed(x, W, s)" in out and "scalar" in out
    assert "all arguments agree" in out
    assert run_vjp(f"{BUGGY}:recurrent_cell", [(5, 4), (4, 4), ()], seed=3) == 1
    out = capsys.readouterr().out
    assert "MISMATCH: worst argument W" in out
    rows = [line for line in out.splitlines() if line.startswith("│")]
    assert [r.split("│")[1].strip() for r in rows] == ["x", "W", "s"]
    assert [r.split("│")[-2].strip() for r in rows] == ["yes", "NO", "yes"]


@pytest.mark.slow
def test_run_vjp_json_and_module_target(capsys):
    code = run_vjp(f"{__name__}:scaled_power", [(3,), ()], seed=1, format="json")
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and result["ok"]
    assert [row["argument"] for row in result["arguments"]] == ["x", "a"]


@pytest.mark.parametrize(
    "target, shapes, exc, match",
    [
        ("nomodule:f", [(3,)], ValueError, "cannot import module 'nomodule'"),
        ("no_colon", [(3,)], ValueError, "expects MODULE:NAME"),
        (f"{BUGGY}:nothing", [(3,)], ValueError, "has no 'nothing'"),
        (f"{BUGGY}:init_cell", [(3,)], TypeError, "expects a jax.custom_vjp function"),
        (
            f"{BUGGY}:recurrent_cell",
            [(5, 4)],
            ValueError,
            r"recurrent_cell takes 3 array arguments \(x, W, s\), got 1 shape",
        ),
        (f"{BUGGY}:recurrent_cell", [(5, 4), (3, 4), ()], (TypeError, ValueError), "."),
        (f"{BUGGY}:recurrent_cell", None, ValueError, "needs --shapes"),
    ],
)
def test_run_vjp_bad_input_is_one_line(target, shapes, exc, match):
    with pytest.raises(exc, match=match) as info:
        run_vjp(target, shapes)
    assert "\n" not in str(info.value)


def test_parse_shape_and_nondiff_defaults():
    assert parse_shape("4,3") == (4, 3) and parse_shape("scalar") == () and parse_shape("7") == (7,)
    import argparse

    for bad in ("4,x", "0,3", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_shape(bad)
    fn = jax.custom_vjp(lambda x, n=2: x * n, nondiff_argnums=(1,))
    args = random_arguments(fn, [(3,)], 0, F64)
    assert args[0].shape == (3,) and args[1] == 2


# --------------------------------------------------------------------------------------------
# The examples (each in its own interpreter, as a reader runs them)
# --------------------------------------------------------------------------------------------


def _run_example(name: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
    env["JAX_PLATFORMS"] = "cpu"
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / name)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=EXAMPLES.parent,
    )
    assert result.returncode == 0, f"{name} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.mark.slow
def test_example_buggy_custom_vjp():
    out = _run_example("buggy_custom_vjp.py")
    assert "AssertionError: Not equal to tolerance" in out  # what check_grads says
    assert "-> the wrong argument is W" in out
    assert "fixed: all arguments agree" in out
    assert (
        "buggy: caught: layer serial[1] (CustomVJP): dW disagrees with jax.vjp of its forward; "
        "looks like: transposed" in out
    )
    assert "fixed: 50 steps, every one checked" in out


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, model", [("flax_nnx_layer.py", "flax nnx"), ("equinox_layer.py", "equinox")]
)
def test_example_framework_models(name, model):
    out = _run_example(name)
    assert "hand-written backward vs autodiff: all leaves agree (8 leaves" in out
    assert f"{model} model with a jaxbp block: mse" in out
    assert out.strip().endswith("trained") and "did not train" not in out


@pytest.mark.slow
@pytest.mark.parametrize("name, code", [("recurrent_cell", 1), ("recurrent_cell_fixed", 0)])
def test_check_vjp_command_exit_codes(name, code):
    """``jaxbp check --vjp FILE:NAME --shapes ...``: exit 1 names W for the buggy cell, 0 when
    fixed; --shapes without --vjp is a usage error (exit 2, one line)."""
    target = f"{EXAMPLES / 'buggy_custom_vjp.py'}:{name}"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "jaxbp.cli",
            "check",
            "--vjp",
            target,
            "--shapes",
            "5,4",
            "4,4",
            "scalar",
            "--format",
            "json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == code, result.stderr
    report = json.loads(result.stdout)
    verdicts = {row["argument"]: row["ok"] for row in report["arguments"]}
    assert verdicts == {"x": True, "W": code == 0, "s": True}
    assert report["ok"] is (code == 0)
    bad = subprocess.run(
        [sys.executable, "-m", "jaxbp.cli", "check", "--shapes", "3"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1
    assert "--shapes needs --vjp" in bad.stderr
