"""Per-example gradients with jax.vmap over jaxbp's manual backward pass.

Every jaxbp layer works on one example of shape (features,) as well as on a batch, so
`jax.vmap` of `jaxbp.backprop` over single examples gives one gradient per example, with no
per-example code in any layer. This is what differentially private SGD clips, and what
influence and data-attribution methods read. Checked against jax.vmap(jax.grad), and against
the batch gradient (the batch loss is the mean over examples, so its gradient is their mean).

Run:  python examples/per_example_grads.py
"""

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp
import numpy as np

import jaxbp

key_init, key_x, key_y = jax.random.split(jax.random.key(0), 3)
net = jaxbp.serial(jaxbp.Dense(16), jaxbp.Gelu, jaxbp.Dense(3))
_, params = net.init(key_init, (-1, 5))
x = jax.random.normal(key_x, (8, 5))
labels = jax.random.randint(key_y, (8,), 0, 3)
loss = jaxbp.softmax_cross_entropy


@jax.jit
def per_example_manual(params, x, labels):
    # One example at a time: x[n] has shape (5,), labels[n] is a scalar label.
    one = lambda xn, yn: jaxbp.backprop(net, loss, params, xn, yn)[1]
    return jax.vmap(one)(x, labels)


@jax.jit
def per_example_autodiff(params, x, labels):
    one = lambda xn, yn: jax.grad(jaxbp.loss_fn(net, loss))(params, xn, yn)
    return jax.vmap(one)(x, labels)


# compare_grads is jit-safe; compiled once it is much faster than op by op.
compare = jax.jit(jaxbp.compare_grads)

grads = per_example_manual(params, x, labels)
print(
    "per-example gradient shapes:", jax.tree_util.tree_map(lambda g: g.shape, grads)
)  # a leading axis of 8 on every leaf

# 1. The manual per-example gradients equal jax.grad's, example by example.
report = compare(grads, per_example_autodiff(params, x, labels))
print(report)
assert bool(report.ok)

# 2. Their mean is the batch gradient.
_, batch_grads = jax.jit(jaxbp.backprop, static_argnums=(0, 1))(net, loss, params, x, labels)
mean = jax.tree_util.tree_map(lambda g: g.mean(axis=0), grads)
assert bool(compare(mean, batch_grads).ok)
print("mean of the per-example gradients == the batch gradient")


# 3. What they are for: per-example norms, and clipping each example's gradient to norm 1
#    before averaging (the DP-SGD step, without its noise).
@jax.jit
def clipped_mean(grads, max_norm=1.0):
    norms = jnp.sqrt(
        sum(
            jnp.sum(g.reshape(g.shape[0], -1) ** 2, axis=1)
            for g in jax.tree_util.tree_leaves(grads)
        )
    )
    scale = jnp.minimum(1.0, max_norm / norms)
    mean = jax.tree_util.tree_map(
        lambda g: (g * scale.reshape((-1,) + (1,) * (g.ndim - 1))).mean(axis=0), grads
    )
    return norms, mean


norms, clipped = clipped_mean(grads)
print("per-example gradient norms:", np.round(np.asarray(norms), 3))
clipped_norm = np.sqrt(sum(np.sum(np.asarray(g) ** 2) for g in jax.tree_util.tree_leaves(clipped)))
print(f"clipped mean gradient norm: {float(clipped_norm):.3f} (at most 1)")
assert float(clipped_norm) <= 1.0 + 1e-12
