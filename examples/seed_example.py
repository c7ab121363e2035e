"""The seed tutorial's worked example through jaxbp's Python API.

The seed's 2-2-2 network (inputs 0.1, 0.05; targets 0.02, 0.98; shared biases 0.3 and 0.9;
sigmoid everywhere; E = sum 1/2 (target - out)^2; learning rate 0.5) in its four steps:
forward pass, error, backward pass, update. Then the same update the seed's numpy program
makes, checked number for number.

Run:  python examples/seed_example.py
"""

import jax

jax.config.update("jax_enable_x64", True)  # the worked numbers are float64

import numpy as np
import optax

import jaxbp

net, params, x, y, lr = jaxbp.seed_problem()

# Step 1: forward pass. `net` is serial(Dense, Sigmoid, Dense, Sigmoid); each layer's forward
# returns its output and the cache its backward will need.
out, caches = net.forward(params, x)
hidden = caches[2]  # the second Dense layer's cache is its input: out_h1, out_h2
print("out_h1, out_h2 =", np.round(hidden, 4))  # [0.5866 0.5812]
print("out_o1, out_o2 =", np.round(out, 4))  # [0.8401 0.7922]

# Step 2: the error.
loss = jaxbp.half_sse
print("E_total =", round(float(loss(out, y)), 4))  # 0.354

# Step 3: backward pass: dE/dout from the loss, then every layer's hand-written backward.
value, grads = jaxbp.backprop(net, loss, params, x, y)
print("dE/dW7 =", round(float(grads[2]["W"][1, 0]), 4))  # 0.064  (W7: hidden 2 -> output 1)

# ...and jax.grad agrees, leaf by leaf.
_, grads_ad = jaxbp.autodiff(net, loss, params, x, y)
report = jaxbp.compare_grads(grads, grads_ad)
print(report)

# Step 4: update. The seed's code updates weights only, so freeze the biases.
optimizer = jaxbp.freeze(jaxbp.sgd(lr), jaxbp.biases)
updates, _ = optimizer.update(grads, optimizer.init(params), params)
new = optax.apply_updates(params, updates)
print("W7_new =", round(float(new[2]["W"][1, 0]), 4))  # 0.568

# The seed's numpy program, verbatim in substance: the same numbers to the last bit.
sig = lambda z: 1 / (1 + np.exp(-z))
w_ih = np.array([[0.25, 0.2], [0.5, 0.15]])
w_ho = np.array([[0.7, 0.4], [0.6, 0.35]])
i = np.array([[0.1, 0.05]])
h = sig(i @ w_ih + 0.3)
o = sig(h @ w_ho + 0.9)
delta_o = (np.array([[0.02, 0.98]]) - o) * o * (1 - o)
delta_h = delta_o @ w_ho.T * h * (1 - h)
w_ho += lr * h.T @ delta_o
w_ih += lr * i.T @ delta_h
assert np.allclose(new[0]["W"], w_ih, rtol=0, atol=1e-12)
assert np.allclose(new[2]["W"], w_ho, rtol=0, atol=1e-12)
print("jaxbp's update equals the seed's numpy program:")
print(np.round(np.asarray(new[0]["W"]), 8))
print(np.round(np.asarray(new[2]["W"]), 8))

# Every number, in the seed's notation: `jaxbp trace` (or jaxbp.trace.trace().to_text()).
