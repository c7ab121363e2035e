"""A buggy jax.custom_vjp, and which argument is wrong: jax.test_util.check_grads vs jaxbp.

A recurrent cell ``h = s * tanh(x @ W)`` with a square ``W`` (hidden-to-hidden weights), and a
hand-written backward with a classic slip: ``dW = dz.T @ x`` instead of ``x.T @ dz``. ``W`` is
square, so the wrong gradient has the right shape and nothing in JAX complains; training just
goes wrong.

- ``jax.grad`` of the function uses the buggy rule itself, so it cannot serve as a reference.
- ``jax.test_util.check_grads`` compares against finite differences along one random direction
  and says "not close" about the function as a whole.
- ``jaxbp.check_vjp`` compares the rule against ``jax.vjp`` of the undecorated primal argument
  by argument, and names ``W``; ``jaxbp.check_vjp_fd`` adds finite differences as a third
  opinion; ``jaxbp.from_custom_vjp`` makes the function a layer whose every train step is
  checked.

Run:  python examples/buggy_custom_vjp.py
Also: jaxbp check --vjp examples/buggy_custom_vjp.py:recurrent_cell --shapes 5,4 4,4 scalar
"""

import jax
import jax.numpy as jnp


@jax.custom_vjp
def recurrent_cell(x, W, s):
    """``h = s * tanh(x @ W)``."""
    return s * jnp.tanh(x @ W)


def _cell_fwd(x, W, s):
    t = jnp.tanh(x @ W)
    return s * t, (x, W, s, t)


def _cell_bwd_buggy(residuals, dh):
    x, W, s, t = residuals
    dz = dh * s * (1 - t * t)  # through s * tanh(z)
    dW = dz.T @ x  # the slip: should be x.T @ dz
    return dz @ W.T, dW, jnp.sum(dh * t)


recurrent_cell.defvjp(_cell_fwd, _cell_bwd_buggy)


@jax.custom_vjp
def recurrent_cell_fixed(x, W, s):
    """The same cell, with ``dW = x.T @ dz``."""
    return s * jnp.tanh(x @ W)


def _cell_bwd(residuals, dh):
    """``dz = dh * s * (1 - t^2)``, ``dx = dz @ W.T``, ``dW = x.T @ dz``, ``ds = sum(dh * t)``."""
    x, W, s, t = residuals
    dz = dh * s * (1 - t * t)
    x2, dz2 = x.reshape(-1, W.shape[0]), dz.reshape(-1, W.shape[1])  # batch or one example
    return dz @ W.T, x2.T @ dz2, jnp.sum(dh * t)


recurrent_cell_fixed.defvjp(_cell_fwd, _cell_bwd)


def init_cell(key, input_shape):
    """Parameters of the cell as a jaxbp layer: a square W and a scale s."""
    n = input_shape[-1]
    return {"W": jax.random.normal(key, (n, n)) / jnp.sqrt(n), "s": jnp.asarray(1.0)}


def main():
    import optax
    from jax.test_util import check_grads

    import jaxbp
    from jaxbp.interop import check_vjp, check_vjp_fd, from_custom_vjp

    # The checks are jit-safe (the function is static); compiled, they run in milliseconds.
    check_vjp = jax.jit(check_vjp, static_argnums=0)
    check_vjp_fd = jax.jit(check_vjp_fd, static_argnums=0)

    kx, kw = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (5, 4))
    W = jax.random.normal(kw, (4, 4)) / 2
    s = jnp.asarray(1.5)

    print("jax.test_util.check_grads(recurrent_cell, (x, W, s), order=1, modes=['rev']):")
    try:
        check_grads(recurrent_cell, (x, W, s), order=1, modes=["rev"])
        print("  passed")
    except AssertionError as e:
        lines = [line for line in str(e).strip().splitlines() if line.strip()]
        print("  AssertionError: " + "\n  ".join(lines[:4]))

    print("\njaxbp.check_vjp(recurrent_cell, x, W, s):")
    report = check_vjp(recurrent_cell, x, W, s)
    print(report)
    print(f"-> the wrong argument is {report.worst_path}")

    print("\nfixed, with finite differences as a third opinion (jaxbp.check_vjp_fd):")
    three = check_vjp_fd(recurrent_cell_fixed, x, W, s)
    for name, r in zip(three._fields[:3], three[:3]):  # the three pairwise reports
        print(f"  {name:<20} worst {r.worst_path}: {float(r.worst_rel_error):.1e}")
    print("fixed:", "all arguments agree" if three.ok else "MISMATCH")

    print("\nthe buggy cell as a jaxbp layer, in a train step checked every step:")
    for label, cell in (("buggy", recurrent_cell), ("fixed", recurrent_cell_fixed)):
        net = jaxbp.serial(jaxbp.Dense(4), from_custom_vjp(cell, init_cell), jaxbp.Dense(1))
        _, params = net.init(jax.random.key(1), (-1, 3))
        optimizer = optax.adam(1e-2)
        step = jaxbp.make_train_step(net, "mse", optimizer, check="raise")
        xs = jax.random.normal(jax.random.key(2), (32, 3))
        ys = jnp.sin(xs.sum(axis=1, keepdims=True))
        ts = jaxbp.init_train_state(net, optimizer, params)
        try:
            for _ in range(50):
                ts, metrics = step(ts, xs, ys)
            print(f"  {label}: 50 steps, every one checked; loss {float(metrics.loss):.4f}")
        except jaxbp.GradientMismatchError as e:
            print(f"  {label}: caught: {str(e).splitlines()[0]}")


if __name__ == "__main__":
    jax.config.update("jax_enable_x64", True)
    main()
