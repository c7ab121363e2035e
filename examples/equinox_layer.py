"""A jaxbp layer inside an Equinox model, trained with optax.

``jaxbp.as_custom_vjp(block)`` turns a jaxbp network into a plain ``jax.custom_vjp`` function
``apply(params, x)``. An ``eqx.Module`` holds the block's params as an ordinary pytree field
(trainable like any other array) and the function as a static field. Equinox layers act on one
example and the model is ``vmap``-ed over the batch, so the block's hand-written backward runs
under ``vmap`` too.

We check that the gradients through the hand-written backward equal autodiff's (the same
model with the block's plain forward), then train on a small regression problem.

Run:  python examples/equinox_layer.py
"""

from collections.abc import Callable

import jax

jax.config.update("jax_enable_x64", True)

import equinox as eqx
import jax.numpy as jnp
import optax

import jaxbp
from jaxbp.interop import as_custom_vjp

BLOCK = jaxbp.serial(jaxbp.Dense(16), jaxbp.Tanh, jaxbp.Dense(16), jaxbp.Gelu)


class Model(eqx.Module):
    """eqx.nn.Linear -> jaxbp block (hand-written backward) -> eqx.nn.Linear, one example."""

    encode: eqx.nn.Linear
    block: tuple  # the jaxbp params: a pytree of arrays, trained like any other field
    decode: eqx.nn.Linear
    apply_block: Callable = eqx.field(static=True)

    def __init__(self, key, hand_written: bool = True):
        k1, k2, k3 = jax.random.split(key, 3)
        self.encode = eqx.nn.Linear(2, 8, key=k1)
        self.block = BLOCK.init(k2, (8,))[1]
        self.decode = eqx.nn.Linear(16, 1, key=k3)
        self.apply_block = as_custom_vjp(BLOCK) if hand_written else _plain_forward

    def __call__(self, x):
        return self.decode(self.apply_block(self.block, jax.nn.relu(self.encode(x))))


def _plain_forward(params, x):
    return BLOCK.forward(params, x)[0]  # autodiff of the same forward, to compare


def _arrays_by_path(model) -> dict:
    leaves = jax.tree_util.tree_leaves_with_path(eqx.filter(model, eqx.is_array))
    return {jax.tree_util.keystr(path): leaf for path, leaf in leaves}


def mse(model, x, y):
    return jnp.mean((jax.vmap(model)(x) - y) ** 2)


def main():
    kx = jax.random.key(0)
    x = jax.random.uniform(kx, (256, 2), minval=-2, maxval=2)
    y = jnp.sin(x[:, :1]) * jnp.cos(x[:, 1:])

    manual, reference = Model(jax.random.key(1)), Model(jax.random.key(1), hand_written=False)
    g_manual = eqx.filter_grad(mse)(manual, x, y)
    g_auto = eqx.filter_grad(mse)(reference, x, y)
    # The two models differ in a static field (the block function): compare their arrays by path.
    report = jaxbp.compare_grads(_arrays_by_path(g_manual), _arrays_by_path(g_auto))
    print(
        f"gradients through the hand-written backward vs autodiff: "
        f"{'all leaves agree' if bool(report.ok) else 'MISMATCH'} "
        f"({len(report.paths)} leaves, worst relative error "
        f"{float(report.worst_rel_error):.1e})"
    )

    optimizer = optax.adam(1e-2)
    opt_state = optimizer.init(eqx.filter(manual, eqx.is_array))

    @eqx.filter_jit
    def train_step(model, opt_state, x, y):
        loss, grads = eqx.filter_value_and_grad(mse)(model, x, y)
        updates, opt_state = optimizer.update(grads, opt_state, eqx.filter(model, eqx.is_array))
        return eqx.apply_updates(model, updates), opt_state, loss

    first = float(mse(manual, x, y))
    model = manual
    for _ in range(300):
        model, opt_state, _ = train_step(model, opt_state, x, y)
    final = float(mse(model, x, y))
    print(f"equinox model with a jaxbp block: mse {first:.4f} -> {final:.4f} after 300 adam steps")
    print("trained" if final < first / 5 else "did not train")


if __name__ == "__main__":
    main()
