"""Handwritten digits: a real network, every step checked against jax.grad.

scikit-learn ships 1797 8x8 images of digits (no download). We train a 64-256-10 ReLU network
with Adam, first by hand from the pieces (a verified train step inside one compiled lax.scan
per epoch), then with the library trainer behind `jaxbp train`, which adds checkpoints,
metrics.json and curves.

Run:  python examples/digits.py        (about half a minute on a laptop)
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxbp
from jaxbp.data import load_dataset
from jaxbp.training import TrainConfig, train

# 1. Data: pixels scaled to [0, 1], a stratified 75/25 split, kept on the device.
data = load_dataset("digits", seed=0)
x_train, y_train = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
x_test, y_test = jnp.asarray(data.x_test), jnp.asarray(data.y_test)
print(
    f"digits: {len(x_train)} training and {len(x_test)} test images of "
    f"{data.num_features} pixels, {data.num_classes} classes"
)

# 2. The network: each layer carries its own hand-derived backward pass.
net = jaxbp.serial(jaxbp.Dense(256), jaxbp.Relu, jaxbp.Dense(10))
_, params = net.init(jax.random.key(0), (-1, data.num_features))
loss = jaxbp.softmax_cross_entropy
optimizer = optax.adam(1e-3)
ts = jaxbp.init_train_state(net, optimizer, params)  # params + optimizer state (+ layer state)

# 3. Train: jaxbp.fit runs all the verified steps in one compiled lax.scan (shuffled batches,
#    epoch after epoch). With check="report" every step computes the manual gradients *and*
#    jax.grad's and compares them leaf by leaf; history holds each step's numbers.
batch, epochs = 64, 60
steps = epochs * (len(x_train) // batch)
result = jaxbp.fit(
    net,
    loss,
    optimizer,
    ts,
    x_train,
    y_train,
    steps=steps,
    batch_size=batch,
    key=jax.random.key(1),
    check="report",
)
ts, history = result
params = ts.params
losses = np.asarray(history.loss)
for t in (0, steps // 4, steps // 2, steps - 1):
    print(f"step {t:5d}  loss {losses[t]:.4f}")
print(
    f"worst manual-vs-autodiff relative error over {steps} steps: "
    f"{float(jnp.max(history.rel_error)):.1e}; all applied: "
    f"{bool(jnp.all(history.applied))}"
)


def accuracy(params, x, y):
    return float(jnp.mean(jnp.argmax(jaxbp.forward(net, params, x), axis=-1) == y))


print(f"test accuracy {accuracy(params, x_test, y_test):.2%}")

# 4. The per-parameter verdict for one batch, as the train step sees it.
_, manual = jaxbp.backprop(net, loss, params, x_test, y_test)
_, auto = jaxbp.autodiff(net, loss, params, x_test, y_test)
print(jaxbp.compare_grads(manual, auto).table())

# 5. The same, in one call: what `jaxbp train` runs (data order, checkpoint, metrics.json and
#    curves.png in runs/digits-example; run it twice with resume=True and it continues).
result = train(TrainConfig(dataset="digits", out="runs/digits-example"), progress="auto")
m = result.metrics
print(
    f"trainer: test accuracy {m['test_accuracy']:.2%}, worst gradient disagreement "
    f"{m['max_grad_rel_error']:.1e} over {m['steps']} checked steps, {m['seconds']:.1f}s"
)
assert np.isfinite(m["final_loss"])
