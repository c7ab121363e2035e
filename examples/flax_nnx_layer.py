"""A jaxbp block inside a Flax NNX model, trained with optax.

``jaxbp.as_custom_vjp(block)`` turns a jaxbp network into a plain ``jax.custom_vjp`` function
``apply(params, x)``. Inside an ``nnx.Module`` its params are ordinary ``nnx.Param``s; when
``nnx.value_and_grad`` differentiates the whole model, JAX runs the block's hand-written
backward (each layer's chain rule) in place of autodiff, and Flax's own layers around it are
differentiated as usual.

We check that the gradients through the hand-written backward equal autodiff's (the same
model with the block's plain forward), then train on a small regression problem.

Run:  python examples/flax_nnx_layer.py
"""

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp
import optax
from flax import nnx

import jaxbp
from jaxbp.interop import as_custom_vjp

BLOCK = jaxbp.serial(jaxbp.Dense(16), jaxbp.Tanh, jaxbp.Dense(16), jaxbp.Gelu)


class Model(nnx.Module):
    """Flax Linear -> jaxbp block (hand-written backward) -> Flax Linear."""

    def __init__(self, rngs: nnx.Rngs, hand_written: bool = True):
        self.encode = nnx.Linear(2, 8, rngs=rngs)
        _, params = BLOCK.init(rngs.params(), (-1, 8))
        # Each jaxbp leaf becomes an nnx.Param, so nnx.Optimizer and nnx.grad see it.
        self.block = nnx.data(jax.tree.map(nnx.Param, params))
        self.decode = nnx.Linear(16, 1, rngs=rngs)
        self.apply_block = (
            as_custom_vjp(BLOCK) if hand_written else (lambda p, x: BLOCK.forward(p, x)[0])
        )  # autodiff of the same forward, to compare

    def __call__(self, x):
        params = jax.tree.map(
            lambda v: v[...], self.block, is_leaf=lambda v: isinstance(v, nnx.Variable)
        )
        return self.decode(self.apply_block(params, nnx.relu(self.encode(x))))


def mse(model, x, y):
    return jnp.mean((model(x) - y) ** 2)


def main():
    kx = jax.random.key(0)
    x = jax.random.uniform(kx, (256, 2), minval=-2, maxval=2)
    y = jnp.sin(x[:, :1]) * jnp.cos(x[:, 1:])

    manual = Model(nnx.Rngs(1))
    reference = Model(nnx.Rngs(1), hand_written=False)
    _, g_manual = nnx.value_and_grad(mse)(manual, x, y)
    _, g_auto = nnx.value_and_grad(mse)(reference, x, y)
    report = jaxbp.compare_grads(nnx.state(g_manual, nnx.Param), nnx.state(g_auto, nnx.Param))
    print(
        f"gradients through the hand-written backward vs autodiff: "
        f"{'all leaves agree' if bool(report.ok) else 'MISMATCH'} "
        f"({len(report.paths)} leaves, worst relative error "
        f"{float(report.worst_rel_error):.1e})"
    )

    optimizer = nnx.Optimizer(manual, optax.adam(1e-2), wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, x, y):
        loss, grads = nnx.value_and_grad(mse)(model, x, y)
        optimizer.update(model, grads)
        return loss

    first = float(mse(manual, x, y))
    for _ in range(300):
        train_step(manual, optimizer, x, y)
    final = float(mse(manual, x, y))
    print(f"flax nnx model with a jaxbp block: mse {first:.4f} -> {final:.4f} after 300 adam steps")
    print("trained" if final < first / 5 else "did not train")


if __name__ == "__main__":
    main()
