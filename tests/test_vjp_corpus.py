"""check_vjp on the custom_vjp functions people already have (issue 23).

Two parts. Static arguments: ``nondiff_argnums`` holding strings, dtypes, dimension numbers,
numbers and callables, in ``check_vjp``, ``check_vjp_fd``, ``from_custom_vjp`` and
``jaxbp check --vjp --static``. The corpus: custom_vjp functions written in the common styles
and real ones from optax, Flax (fp8) and Equinox, each with the verdict per argument and
whether that verdict is right (docs/interop.md lists the same table). A library that is not
installed skips its rows with the reason.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jaxbp.commands.check_vjp import parse_static, random_arguments
from jaxbp.gradcheck import check_layer, compare_grads
from jaxbp.interop import check_vjp, check_vjp_fd, from_custom_vjp, vjp_verdicts

F64 = jnp.float64
X = jax.random.normal(jax.random.key(1), (4, 3), F64)
W = jax.random.normal(jax.random.key(2), (3, 5), F64) / 2


def verdicts(fn, *args, **kwargs) -> dict:
    """``{argument: verdict}`` of ``check_vjp(fn, *args)``."""
    report = check_vjp(fn, *args, **kwargs)
    return dict(zip(report.paths, vjp_verdicts(report)))


# --------------------------------------------------------------------------------------------
# custom_vjp functions written in the common styles
# --------------------------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def act(x, mode):
    """A string mode: the case that failed inside JAX before (issue 23)."""
    return jnp.tanh(x) if mode == "tanh" else jax.nn.softplus(x)


def _act_fwd(x, mode):
    return act(x, mode), x


def _act_bwd(mode, x, g):
    slope = 1 - jnp.tanh(x) ** 2 if mode == "tanh" else jax.nn.sigmoid(x)
    return (g * slope,)


act.defvjp(_act_fwd, _act_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def power(x, n):
    """A number (or an array) in nondiff_argnums."""
    return x**n


power.defvjp(lambda x, n: (x**n, x), lambda n, x, g: (g * n * x ** (n - 1),))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def softmax_in(x, dtype):
    """A dtype in nondiff_argnums: the softmax computed in ``dtype``, returned in x's."""
    return jax.nn.softmax(x.astype(dtype), axis=-1).astype(x.dtype)


def _softmax_fwd(x, dtype):
    p = softmax_in(x, dtype)
    return p, p


def _softmax_bwd(dtype, p, g):
    return (p * (g - jnp.sum(g * p, axis=-1, keepdims=True)),)


softmax_in.defvjp(_softmax_fwd, _softmax_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def dot(x, w, dimension_numbers):
    """Dimension numbers (a nested tuple) in nondiff_argnums, as lax.dot_general takes them."""
    return lax.dot_general(x, w, dimension_numbers)


def _dot_bwd(dimension_numbers, res, g):
    x, w = res
    assert dimension_numbers == (((1,), (0,)), ((), ())), "this bwd knows x @ w only"
    return g @ w.T, x.T @ g


dot.defvjp(lambda x, w, dn: (dot(x, w, dn), (x, w)), _dot_bwd)
DOT_DIMS = (((1,), (0,)), ((), ()))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def apply_fn(f, x):
    """A callable in nondiff_argnums: the pattern of JAX's own custom_vjp tutorial."""
    return f(x)


def _apply_fwd(f, x):
    return f(x), x


def _apply_bwd(f, x, g):
    return jax.vjp(f, x)[1](g)


apply_fn.defvjp(_apply_fwd, _apply_bwd)


@jax.custom_vjp
def affine_tree(params, x):
    """Pytree input and output: ``{"y": W x + b, "norm": |y|^2 / 2}``."""
    y = x @ params["w"] + params["b"]
    return {"y": y, "norm": 0.5 * jnp.sum(y * y)}


def _affine_fwd(params, x):
    out = affine_tree(params, x)
    return out, (params, x, out["y"])


def _affine_bwd(res, g):
    params, x, y = res
    dy = g["y"] + g["norm"] * y
    return {"w": x.T @ dy, "b": jnp.sum(dy, axis=0)}, dy @ params["w"].T


affine_tree.defvjp(_affine_fwd, _affine_bwd)


@jax.custom_vjp
def clip_gradient(lo, hi, x):
    """JAX's documented example: identity forward, clipped cotangent, ``None`` for lo and hi."""
    return x


clip_gradient.defvjp(
    lambda lo, hi, x: (x, (lo, hi)), lambda res, g: (None, None, jnp.clip(g, *res))
)


@jax.custom_vjp
def softplus(x):
    """Defined with ``symbolic_zeros=False`` spelled out (the default)."""
    return jnp.logaddexp(x, 0.0)


softplus.defvjp(
    lambda x: (softplus(x), x), lambda x, g: (g * jax.nn.sigmoid(x),), symbolic_zeros=False
)


@jax.custom_vjp
def grad_reverse(x):
    """Gradient reversal (domain-adversarial training): deliberately ``-g``."""
    return x


grad_reverse.defvjp(lambda x: (x, None), lambda _, g: (-g,))


@jax.custom_vjp
def ste_round(x):
    """A straight-through estimator: ``round`` forward, identity backward, deliberately."""
    return jnp.round(x)


ste_round.defvjp(lambda x: (jnp.round(x), None), lambda _, g: (g,))


# (function, arguments, expected verdict per argument); "agrees" rows are right by agreeing.
COMMON = {
    "nondiff string": (act, (X, "tanh"), {"x": "agrees"}),
    "nondiff string, other mode": (act, (X, "softplus"), {"x": "agrees"}),
    "nondiff number": (power, (X, 3), {"x": "agrees"}),
    "nondiff array": (power, (X, jnp.asarray(3.0, F64)), {"x": "agrees"}),
    "nondiff dtype": (softmax_in, (X, jnp.float64), {"x": "agrees"}),
    "nondiff dimension numbers": (dot, (X, W, DOT_DIMS), {"x": "agrees", "w": "agrees"}),
    "nondiff callable": (apply_fn, (jnp.sin, X), {"x": "agrees"}),
    "pytree in and out": (
        affine_tree,
        ({"w": W, "b": W[0]}, X),
        {"params['b']": "agrees", "params['w']": "agrees", "x": "agrees"},
    ),
    "symbolic_zeros=False": (softplus, (X,), {"x": "agrees"}),
}


@pytest.mark.parametrize("case", list(COMMON))
def test_common_styles_agree(case):
    fn, args, expected = COMMON[case]
    assert verdicts(fn, *args) == expected


def test_deliberate_rules_are_named_by_what_they_do():
    # None cotangents read as zero, and the primal ignores lo and hi: those agree. The clipped
    # cotangent of x is not the gradient (the whole point): with |g| up to ~2 and the clip at
    # 0.5 it is a plain mismatch, not a factor.
    clipped = verdicts(clip_gradient, jnp.asarray(-0.5, F64), jnp.asarray(0.5, F64), X)
    assert clipped["lo"] == clipped["hi"] == "agrees"
    assert clipped["x"].startswith("differs: cosine 0.")
    reversed_ = verdicts(grad_reverse, X)
    assert reversed_ == {"x": "looks like: a constant factor -1.000 (the sign is flipped)"}
    # jax.vjp of round is zero: the straight-through cotangent is "another value".
    assert verdicts(ste_round, X)["x"].startswith("jax.vjp of the primal is zero")


def test_static_arguments_under_jit_and_in_check_vjp_fd():
    jitted = jax.jit(check_vjp, static_argnums=(0, 2))
    report = jitted(act, X, "softplus")
    assert bool(report.ok) and report.paths == ("x",)
    assert float(report.rel_error[0]) < 1e-12
    # The dimension numbers and the dtype are closed over; only the arrays are traced.
    report = jax.jit(lambda x, w: check_vjp(dot, x, w, DOT_DIMS))(X, W)
    assert bool(report.ok) and report.paths == ("x", "w")
    three = check_vjp_fd(softmax_in, X[:2], jnp.float64)
    assert three.ok and three.manual_vs_fd.paths == ("x",)
    assert float(three.autodiff_vs_fd.worst_rel_error) < 1e-6


def test_from_custom_vjp_with_a_static_constant():
    init = lambda key, shape: {"w": jax.random.normal(key, (shape[-1], 2), F64)}
    layer = from_custom_vjp(dot, init, constants={"dimension_numbers": DOT_DIMS})
    report = check_layer(layer, jax.random.key(0), (4, 3), dtype=F64)
    assert bool(report.ok) and float(report.worst_rel_error) < 1e-12
    layer = from_custom_vjp(act, lambda key, shape: {}, constants={"mode": "tanh"})
    x = jax.random.normal(jax.random.key(3), (3, 2), F64)
    y, cache = layer.forward({}, x)
    np.testing.assert_allclose(y, np.tanh(np.asarray(x)), rtol=1e-14)
    _, dx = layer.backward({}, cache, jnp.ones_like(y))
    np.testing.assert_allclose(dx, 1 - np.tanh(np.asarray(x)) ** 2, rtol=1e-14)


# --------------------------------------------------------------------------------------------
# Bad input: one line naming the argument
# --------------------------------------------------------------------------------------------


def _one_line(exc, match, fn, *args):
    with pytest.raises(exc, match=match) as info:
        check_vjp(fn, *args)
    assert "\n" not in str(info.value)


def test_a_nondiff_argument_changed_between_primal_and_bwd():
    @functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
    def scaled(x, options):
        return x * options["scale"]

    def fwd(x, options):
        options["scale"] = 3.0  # the slip: fwd mutates what the primal read
        return x * 2.0, None

    scaled.defvjp(fwd, lambda options, _, g: (g * options["scale"],))
    _one_line(
        ValueError,
        r"scaled's fwd changed its nondiff argument 'options' from \{'scale': 2.0\} to "
        r"\{'scale': 3.0\}; the bwd must see the value the primal was called with",
        scaled,
        X,
        {"scale": 2.0},
    )

    @functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
    def tagged(x, log):
        return x

    def bwd(log, _, g):
        log.append("bwd ran")
        return (g,)

    tagged.defvjp(lambda x, log: (x, None), bwd)
    _one_line(ValueError, r"tagged's bwd changed its nondiff argument 'log'", tagged, X, [])


def test_a_cotangent_for_a_static_argument_or_the_wrong_count():
    wrong = jax.custom_vjp(act.fun, nondiff_argnums=(1,))
    wrong.defvjp(_act_fwd, lambda mode, x, g: (_act_bwd(mode, x, g)[0], None))
    _one_line(
        ValueError,
        r"act's bwd returned 2 cotangents, one for every argument, but 'mode' is in "
        r"nondiff_argnums and gets none \(bwd receives it first instead\); return 1 \(one per "
        r"differentiable argument: x\)",
        wrong,
        X,
        "tanh",
    )
    short = jax.custom_vjp(dot.fun, nondiff_argnums=(2,))
    short.defvjp(lambda x, w, dn: (dot(x, w, dn), (x, w)), lambda dn, res, g: (g @ res[1].T,))
    _one_line(
        ValueError,
        r"dot's bwd returned 1 cotangents, expected 2 \(one per differentiable argument: x, w\)",
        short,
        X,
        W,
        DOT_DIMS,
    )


def test_a_primal_jax_cannot_differentiate_is_one_clear_line():
    def host_sin(x):
        return jax.pure_callback(np.sin, jax.ShapeDtypeStruct(x.shape, x.dtype), x)

    opaque = jax.custom_vjp(host_sin)
    opaque.defvjp(lambda x: (host_sin(x), x), lambda x, g: (g * jnp.cos(x),))
    _one_line(
        ValueError,
        r"check_vjp: host_sin's primal cannot be differentiated by JAX, so there is no "
        r"reference for its bwd \(reverse mode: .*; forward mode: ",
        opaque,
        X,
    )


# --------------------------------------------------------------------------------------------
# The words for a disagreement, from the report's statistics
# --------------------------------------------------------------------------------------------


def test_vjp_verdicts_read_the_statistics():
    b = jnp.asarray([[1.0, -2.0], [0.5, 3.0]], F64)
    noise = jnp.asarray([[0.05, 0.0], [0.0, -0.1]], F64)
    manual = (b, 2 * b, -b, jnp.zeros_like(b), b, b + noise, b.T, b.at[0, 0].set(jnp.nan))
    reference = (b, b, b, b, jnp.zeros_like(b), b, b, b)
    words = vjp_verdicts(compare_grads(manual, reference))
    assert words[:5] == (
        "agrees",
        "looks like: a constant factor 2.000",
        "looks like: a constant factor -1.000 (the sign is flipped)",
        "bwd returns zero where jax.vjp of the primal does not: the rule drops this gradient",
        "jax.vjp of the primal is zero (the primal does not depend on it here) but bwd is not: "
        "the rule passes another value back through this cotangent, not a gradient",
    )
    assert words[5].startswith("close, not equal: cosine 0.99")
    assert words[6].startswith("differs: cosine 0.")
    assert words[7] == "not finite: bwd or jax.vjp holds a NaN or an inf"
    # float32: a scaled copy is still recognised through float32 rounding.
    b32 = b.astype(jnp.float32)
    words = vjp_verdicts(compare_grads((0.25 * b32,), (b32,)))
    assert words == ("looks like: a constant factor 0.250",)


# --------------------------------------------------------------------------------------------
# The corpus from libraries: optax, Flax, Equinox
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
def test_optax_gradient_scaler_is_a_constant_factor(dtype):
    utils = pytest.importorskip("optax._src.utils", reason="optax is not installed")
    scaler = getattr(utils, "_scale_gradient", None)
    if scaler is None:
        pytest.skip("this optax has no _scale_gradient")
    x = X.astype(dtype)
    # Its backward is g * scale by design: a mismatch of exactly the factor, scale untouched.
    assert verdicts(scaler, x, jnp.asarray(2.0, dtype)) == {
        "inputs": "looks like: a constant factor 2.000",
        "scale": "agrees",
    }
    tree = verdicts(scaler, {"a": x, "b": x[0]}, jnp.asarray(0.5, dtype))
    assert tree["inputs['a']"] == tree["inputs['b']"] == "looks like: a constant factor 0.500"


DROPS = "bwd returns zero where jax.vjp of the primal does not: the rule drops this gradient"
CARRIES = "jax.vjp of the primal is zero (the primal does not depend on it here) but bwd is not"


@pytest.fixture(scope="module")
def fp8():
    return pytest.importorskip("flax.linen.fp8_ops", reason="flax (the interop extra) is missing")


def test_flax_fp8_in_qdq_out_qdq_carry_scales_through_cotangents(fp8):
    scale, history = jnp.asarray(0.5, F64), jnp.asarray([1.0, 3.0, 2.0], F64)
    # in_qdq: bwd passes g straight through; jax.vjp rounds the cotangent to float8 (the
    # transpose of the cast): both straight-through, close. Its scale and history slots carry
    # the updated fp8 metadata, not gradients.
    words = verdicts(fp8.in_qdq, jnp.float64, jnp.float8_e4m3fn, X, scale, history)
    assert words["inp"].startswith("close, not equal: cosine 0.99")
    assert words["scale"].startswith(CARRIES)
    assert words["amax_history"].startswith("differs: cosine")
    # out_qdq: the primal is the identity; bwd quantizes g to float8 and sends the new scale
    # and history back in the cotangents of scale and amax_history.
    words = verdicts(fp8.out_qdq, jnp.float64, jnp.float8_e5m2, X, scale, history)
    assert words["out"].startswith("close, not equal: cosine 0.99")
    assert words["scale"].startswith(CARRIES)
    assert words["amax_history"].startswith(CARRIES)


def test_flax_fp8_out_dq_and_quantized_dot(fp8):
    # out_dq (a dtype as its nondiff argument): primal out * lhs * rhs, bwd passes g unscaled:
    # a constant factor 1 / (0.5 * 3) for out; the scales' gradients are dropped.
    words = verdicts(fp8.out_dq, jnp.float64, jnp.asarray(0.5, F64), jnp.asarray(3.0, F64), X)
    assert words == {
        "lhs_scale": DROPS,
        "rhs_scale": DROPS,
        "out": "looks like: a constant factor 0.667",
    }
    # quantized_dot (dimension numbers and a dtype nondiff): the primal multiplies q_lhs and
    # q_rhs, bwd sends the straight-through gradients to lhs and rhs and the new fp8 metadata
    # through out_grad_scale and out_grad_amax_history.
    one, scale, history = jnp.asarray(1.0, F64), jnp.asarray(0.5, F64), jnp.ones((3,), F64)
    args = (X, X, one, W, W, one, scale, history, DOT_DIMS, jnp.float64)
    words = verdicts(fp8.quantized_dot, *args)
    assert {k: v[: len(CARRIES)] for k, v in words.items()} == {
        "lhs": CARRIES,
        "q_lhs": DROPS[: len(CARRIES)],
        "lhs_scale": "agrees",
        "rhs": CARRIES,
        "q_rhs": DROPS[: len(CARRIES)],
        "rhs_scale": "agrees",
        "out_grad_scale": CARRIES,
        "out_grad_amax_history": CARRIES,
    }


@pytest.fixture(scope="module")
def eqx():
    return pytest.importorskip("equinox", reason="equinox (the interop extra) is missing")


def test_equinox_filter_custom_vjp_written_by_a_user(eqx):
    @eqx.filter_custom_vjp
    def layer(vjp_arg, activation, repeat):
        x, w, steps = vjp_arg  # steps: an int leaf equinox does not differentiate
        for _ in range(repeat):
            x = activation(x @ w) * steps
        return x

    @layer.def_fwd
    def layer_fwd(perturbed, vjp_arg, activation, repeat):
        del perturbed
        return layer.fn(vjp_arg, activation, repeat), None

    @layer.def_bwd
    def layer_bwd(residuals, g, perturbed, vjp_arg, activation, repeat):
        x, w, steps = vjp_arg
        dx, dw = jnp.zeros_like(x), jnp.zeros_like(w)
        xs = [x]
        for _ in range(repeat):
            xs.append(activation(xs[-1] @ w) * steps)
        for step in reversed(range(repeat)):
            dz = g * steps * (1 - jnp.tanh(xs[step] @ w) ** 2)
            dw, g = dw + xs[step].T @ dz, dz @ w.T
        dx = g
        return dx, dw, None

    w = jax.random.normal(jax.random.key(4), (3, 3), F64) / 2
    report = check_vjp(layer, (X, w, 2), jnp.tanh, 2)
    assert report.paths == ("vjp_arg[0]", "vjp_arg[1]")
    assert bool(report.ok) and float(report.worst_rel_error) < 1e-12
    jitted = jax.jit(lambda x, w: check_vjp(layer, (x, w, 2), jnp.tanh, 2))(X, w)
    assert bool(jitted.ok)
    with pytest.raises(TypeError, match="layer is an equinox.filter_custom_vjp"):
        from_custom_vjp(layer, lambda key, shape: {})
    # The command line: vjp_arg takes the random array, the rest --static values.
    args = random_arguments(layer, [(4, 3)], 0, F64, {"activation": "tanh", "repeat": 2})
    assert args[0].shape == (4, 3) and args[1:] == ("tanh", 2)


@pytest.mark.slow
def test_equinox_backward_nan_and_checkpointed_while_loop(eqx, capfd):
    try:
        from equinox.debug._backward_nan import _backward_nan
        from equinox.internal._loop.checkpointed import _checkpointed_while_loop
        from equinox.internal._loop.common import common_rewrite
    except ImportError as e:  # private modules: they may move in another equinox
        pytest.skip(f"this equinox lays its internals out differently: {e}")
    # backward_nan: the identity, whose bwd prints the cotangent (and checks it for NaN).
    assert verdicts(_backward_nan, X, None, False) == {"x": "agrees"}
    assert "cotangents=" in capfd.readouterr().out
    # The checkpointed while loop: its primal is a lax.while_loop, which reverse mode cannot
    # differentiate, so the reference is forward mode. vjp_arg is (carry, body function).
    w = jax.random.normal(jax.random.key(5), (3, 3), F64) / 2
    init = (X[0], jnp.asarray(0))
    cond, body, carry, buffers = common_rewrite(
        lambda c: c[1] < 4,
        lambda c: (jnp.tanh(w @ c[0]), c[1] + 1),
        init,
        4,
        None,
        makes_false_steps=False,
    )
    cond = eqx.filter_closure_convert(cond, carry)
    body = eqx.filter_closure_convert(body, carry)
    report = check_vjp(_checkpointed_while_loop, (carry, body), cond, 2, buffers, 4)
    assert bool(report.ok) and len(report.paths) == 2  # the initial x, and w inside body
    assert float(report.worst_rel_error) < 1e-12


# --------------------------------------------------------------------------------------------
# The command line: --static
# --------------------------------------------------------------------------------------------


def test_parse_static():
    import argparse

    assert parse_static("mode=tanh") == ("mode", "tanh")
    assert parse_static("mode='relu'") == ("mode", "relu")
    assert parse_static("n=3") == ("n", 3) and parse_static("s=0.5") == ("s", 0.5)
    assert parse_static("dims=(((1,), (0,)), ((), ()))") == ("dims", DOT_DIMS)
    assert parse_static("q=dtype:float8_e4m3fn")[1] == jnp.float8_e4m3fn
    assert parse_static("flag=None") == ("flag", None)
    for bad in ("tanh", "=3", "1x=3", "q=dtype:nonsense"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_static(bad)


def test_random_arguments_take_static_values():
    args = random_arguments(dot, [(4, 3), (3, 2)], 0, F64, {"dimension_numbers": DOT_DIMS})
    assert args[0].shape == (4, 3) and args[1].shape == (3, 2) and args[2] == DOT_DIMS
    with pytest.raises(ValueError, match=r"give its value with --static mode=VALUE"):
        random_arguments(act, [(3,)], 0, F64)
    with pytest.raises(ValueError, match=r"act has no argument 'mod' \(its arguments: x, mode\)"):
        random_arguments(act, [(3,)], 0, F64, {"mod": "tanh"})
    with pytest.raises(ValueError, match=r"argument 'x' of act is differentiated"):
        random_arguments(act, [(3,)], 0, F64, {"x": 1.0, "mode": "tanh"})


@pytest.mark.slow
def test_check_command_with_static_values(run_cli):
    run = run_cli("check", "--vjp", f"{__name__}:act", "--shapes", "3,2", "--static", "mode=tanh")
    assert run.code == 0, run.err
    assert "nondiff mode='tanh'" in run.out and "all arguments agree" in run.out
    dims = "dimension_numbers=(((1,), (0,)), ((), ()))"
    run = run_cli("check", "--vjp", f"{__name__}:dot", "--shapes", "4,3", "3,2", "--static", dims)
    assert run.code == 0, run.err
    run = run_cli("check", "--vjp", f"{__name__}:grad_reverse", "--shapes", "3", "--format", "json")
    assert run.code == 1
    assert '"looks_like": "looks like: a constant factor -1.000 (the sign is flipped)"' in run.out
    for argv, message in [
        (("--static", "mode=tanh"), "--static needs --vjp"),
        (("--vjp", f"{__name__}:act", "--shapes", "3"), "give its value with --static mode="),
        (
            (
                "--vjp",
                f"{__name__}:act",
                "--shapes",
                "3",
                "--static",
                "mode=a",
                "--static",
                "mode=b",
            ),
            "--static mode=... is given twice",
        ),
    ]:
        run = run_cli("check", *argv)
        assert run.code == 2 and message in run.err and run.err.count("\n") == 1, run.err
