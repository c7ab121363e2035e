"""Property tests over random networks: manual backprop == autodiff == finite differences.

Random architectures (1 to 4 Dense layers, widths 1 to 16, any activation after each, any loss,
batch 1 to 8), float64. Each example compiles one function that returns the manual gradient,
``jax.grad``'s, and the loss at ``params +- h v`` for a random direction ``v``: the central
difference along ``v`` must equal ``<grad, v>`` (a finite-difference check of every entry at
once, two evaluations instead of two per parameter). The per-leaf finite differences of
``jaxbp.finite_difference_grads`` are checked on a fixed small network at the end.
"""

import jax
import jax.numpy as jnp
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import jaxbp

pytestmark = pytest.mark.filterwarnings("error")

ACTS = sorted(jaxbp.ACTIVATIONS)
LOSS_NAMES = sorted(jaxbp.LOSSES)
KINKED = {"Relu", "LeakyRelu"}
H = 1e-6

architectures = st.fixed_dictionaries(
    {
        "widths": st.lists(st.integers(1, 16), min_size=1, max_size=4),
        "acts": st.lists(st.sampled_from(ACTS), min_size=4, max_size=4),
        "shared": st.lists(st.booleans(), min_size=4, max_size=4),
        "in_dim": st.integers(1, 16),
        "batch": st.integers(1, 8),
        "seed": st.integers(0, 2**31 - 1),
    }
)


def build(arch):
    layers = []
    for width, act, shared in zip(arch["widths"], arch["acts"], arch["shared"]):
        layers += [jaxbp.Dense(width, shared_bias=shared), jaxbp.activation(act)]
    return jaxbp.serial(*layers)


def draw(arch, net):
    return _draw_impl(
        net, arch["loss"], arch["in_dim"], arch["batch"], jax.random.key(arch["seed"])
    )


def _draw_impl(net, loss, in_dim, n, key):
    k_init, k_x, k_y, k_v = jax.random.split(key, 4)
    out_shape, params = net.init(k_init, (-1, in_dim))
    out_dim = out_shape[-1]
    x = jax.random.normal(k_x, (n, in_dim), jnp.float64)
    if loss == "softmax_cross_entropy":
        y = jax.random.randint(k_y, (n,), 0, out_dim)
    elif loss == "sigmoid_binary_cross_entropy":
        y = jax.random.uniform(k_y, (n, out_dim), jnp.float64)
    else:
        y = jax.random.normal(k_y, (n, out_dim), jnp.float64)
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(k_v, max(len(leaves), 1))
    v = jax.tree_util.tree_unflatten(
        treedef, [jax.random.normal(k, l.shape, l.dtype) for k, l in zip(keys, leaves)]
    )
    return params, x, y, v


# Two halves of 13 examples each (26 in all), one per loss group, so that pytest-xdist can run
# them on both cores.
@pytest.mark.slow
@pytest.mark.parametrize("losses", [LOSS_NAMES[:2], LOSS_NAMES[2:]], ids=["part1", "part2"])
@settings(
    max_examples=13, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
@given(arch=architectures, data=st.data())
def test_backprop_equals_autodiff_and_finite_differences(losses, arch, data):
    loss = arch["loss"] = data.draw(st.sampled_from(losses), label="loss")
    net = build(arch)
    # One compiled function per example, draws included: eager dispatch would compile every op
    # for each new shape, which costs more than compiling the whole check once.
    value, value_ad, report, fd, dot, norm, vnorm, kink = _case(
        net, loss, arch["in_dim"], arch["batch"], jax.random.key(arch["seed"])
    )
    # Central differences are wrong across a kink: keep ReLU pre-activations away from 0.
    assume(float(kink) > 1e-3)
    assert float(value) == pytest.approx(float(value_ad), rel=1e-12, abs=1e-14)
    assert bool(report.ok), report.table()
    assert float(report.worst_rel_error) < 1e-10, report.table()
    # Truncation O(h^2) plus round-off O(eps |f| / h), relative to |grad| |v|.
    assert abs(float(fd) - float(dot)) <= (
        1e-6 * float(norm) * float(vnorm) + 1e-8 * max(1.0, abs(float(value)))
    ), (fd, dot)


def _case_impl(net, loss, in_dim, n, key):
    params, x, y, v = _draw_impl(net, loss, in_dim, n, key)
    value, manual = jaxbp.backprop(net, loss, params, x, y)
    value_ad, auto = jaxbp.autodiff(net, loss, params, x, y)
    report = jaxbp.compare_grads(manual, auto)
    f = jaxbp.loss_fn(net, loss)
    shift = lambda s: jax.tree_util.tree_map(lambda p, d: p + s * d, params, v)
    # Directional derivative: (f(p + h v) - f(p - h v)) / 2h == <grad, v>.
    fd = (f(shift(H), x, y) - f(shift(-H), x, y)) / (2 * H)
    dot = sum(
        jnp.vdot(g, d)
        for g, d in zip(jax.tree_util.tree_leaves(manual), jax.tree_util.tree_leaves(v))
    )
    sq = lambda t: jnp.sqrt(sum(jnp.vdot(a, a) for a in jax.tree_util.tree_leaves(t)))
    _, caches = net.forward(params, x)
    kink = jnp.asarray(jnp.inf)
    for layer, cache in zip(net.children, caches):
        if layer.name in KINKED:
            kink = jnp.minimum(kink, jnp.min(jnp.abs(cache)))
    return value, value_ad, report, fd, dot, sq(manual), sq(v), kink


# Tiny programs: XLA's backend optimisations cost more compile time than they save.
_case = jax.jit(
    _case_impl,
    static_argnums=(0, 1, 2, 3),
    compiler_options={
        "xla_backend_optimization_level": 0,
        "xla_llvm_disable_expensive_passes": True,
    },
)


@pytest.mark.slow
@pytest.mark.parametrize("loss", LOSS_NAMES)
def test_per_leaf_finite_differences_agree(loss):
    arch = {
        "widths": [4, 3],
        "acts": ["gelu", "sigmoid", "tanh", "tanh"],
        "shared": [False, True, False, False],
        "in_dim": 3,
        "batch": 5,
        "loss": loss,
        "seed": 7,
    }
    net = build(arch)
    params, x, y, _ = draw(arch, net)
    check = jaxbp.check_grads(net, loss, params, x, y)
    assert check.ok, "\n".join(str(r) for r in check)
    assert float(check.manual_vs_autodiff.worst_rel_error) < 1e-10
