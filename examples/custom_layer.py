"""Add a layer of your own, and prove its backward pass right.

A jaxbp layer is three pure functions (see jaxbp/layers.py):

    init(key, input_shape)      -> (output_shape, params)
    forward(params, x)          -> (y, cache)
    backward(params, cache, dy) -> (dparams, dx)

Here: Swish with a learnable slope per feature, y = x * sigmoid(beta * x). Its chain rule,
with s = sigmoid(beta * x):

    dy/dx    = s + beta * x * s * (1 - s)
    dy/dbeta = x^2 * s * (1 - s)

so backward returns dbeta = sum over the batch of dy * x^2 s (1 - s) and dx = dy * dy/dx.
We check it three ways: the layer alone against jax.vjp (jaxbp.check_layer), a network using it
against jax.grad and finite differences (jaxbp.check_grads), and then train with every step
checked (check="raise" stops at the first disagreement). A deliberately wrong backward is caught.

Run:  python examples/custom_layer.py
"""

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp
import numpy as np
import optax

import jaxbp


def Swish(beta_init: float = 1.0, wrong: bool = False) -> jaxbp.Layer:
    """``y = x * sigmoid(beta * x)`` with one learnable ``beta`` per feature."""

    def init(key, input_shape):
        return tuple(input_shape), {"beta": jnp.full(input_shape[-1:], beta_init)}

    def forward(params, x):
        s = jax.nn.sigmoid(params["beta"] * x)
        return x * s, (x, s)  # the cache: what backward needs

    def backward(params, cache, dy):
        x, s = cache
        beta = params["beta"]
        ds = s * (1 - s)
        dx = dy * (s + beta * x * ds)
        if wrong:  # a typical slip: forgetting the product rule's second term
            dx = dy * s
        dbeta = jnp.sum((dy * x * x * ds).reshape(-1, x.shape[-1]), axis=0)
        return {"beta": dbeta}, dx

    # name and config: Swish(**dict(config)) rebuilds this layer, so once registered it can be
    # written into a model description (jaxbp.describe) and built back (jaxbp.build).
    return jaxbp.Layer(
        init, forward, backward, "Swish", (("beta_init", beta_init), ("wrong", wrong))
    )


jaxbp.register_layer("Swish", Swish)


# The checks are jit-safe; compiled, they run much faster than op by op.
check_layer = jax.jit(jaxbp.check_layer, static_argnums=(0, 2))
check_grads = jax.jit(jaxbp.check_grads, static_argnums=(0, 1))

# 1. The layer alone: its backward against jax.vjp of its forward, for params and input.
report = check_layer(Swish(0.7), jax.random.key(0), (5, 4))
print("Swish alone vs jax.vjp:\n" + report.table())
assert bool(report.ok)

# 2. In a network: manual vs jax.grad vs finite differences.
net = jaxbp.serial(jaxbp.Dense(8), Swish(), jaxbp.Dense(3))
_, params = net.init(jax.random.key(1), (-1, 4))
x = jax.random.normal(jax.random.key(2), (32, 4))
labels = (x[:, 0] > 0).astype(jnp.int32) + (x[:, 1] > 0.5).astype(jnp.int32)
checks = check_grads(net, jaxbp.softmax_cross_entropy, params, x, labels)
print("\nIn a network, manual vs finite differences:\n" + checks.manual_vs_fd.table())
assert checks.ok

# 3. Train it, every step verified against jax.grad before the update: 200 steps of Adam in
#    one compiled loop; check="raise" would stop at the first step whose gradients disagree.
optimizer = optax.adam(0.03)
result = jaxbp.fit(
    net,
    jaxbp.softmax_cross_entropy,
    optimizer,
    jaxbp.init_train_state(net, optimizer, params),
    x,
    labels,
    steps=200,
    check="raise",
)
params = result.state.params
accuracy = float(jnp.mean(jnp.argmax(jaxbp.forward(net, params, x), -1) == labels))
beta = np.round(np.asarray(params[1]["beta"]), 2)
print(
    f"\ntrained 200 checked steps: loss {float(result.history.loss[-1]):.4f}, "
    f"training accuracy {accuracy:.2f}, learned beta {beta}"
)
assert accuracy > 0.9

# 4. A wrong backward does not get past the check.
bad = check_layer(Swish(0.7, wrong=True), jax.random.key(0), (5, 4))
print("\nThe wrong backward:\n" + bad.table())
assert not bool(bad.ok) and bad.worst_path == "['x']"
print("caught: the input gradient ['x'] is wrong, the parameter gradient is right")

# 5. Registered, the layer is part of the model description: written out and built back.
description = jaxbp.describe(net)
print(f"\nthe network as a description: {description}")
assert jaxbp.describe(jaxbp.build(description)) == description
