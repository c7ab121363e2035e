"""The seed tutorial's 2-2-2 sigmoid network, exactly as its code sets it up.

Inputs ``i1 = 0.1, i2 = 0.05``, targets ``0.02, 0.98``, one shared bias per layer
(``b1 = 0.3``, ``b2 = 0.9``), half-SSE, learning rate 0.5, and the weight matrices of the seed's
numpy program, in its layout ``W[i, j]`` = input ``i`` to neuron ``j``::

    W_input_hidden  = [[0.25, 0.2 ],     W1 = [0,0]  W2 = [0,1]
                       [0.5 , 0.15]]     W3 = [1,0]  W4 = [1,1]
    W_hidden_output = [[0.7 , 0.4 ],     W5 = [0,0]  W6 = [0,1]
                       [0.6 , 0.35]]     W7 = [1,0]  W8 = [1,1]

so ``in_h1 = W1*i1 + W3*i2 + b1`` and W7 joins hidden 2 to output 1, as in the slides.

The slides' first numbers (``in_h1``, ``in_h2``, ``out_h1``, ``out_h2``) follow from these weights;
later ones do not. :data:`SEED_STATED` lists every number the seed states; the correct values
come from running the network (see ``jaxbp trace``).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from .layers import Dense, Sigmoid, serial

__all__ = [
    "SeedProblem",
    "seed_problem",
    "seed_network",
    "SEED_STATED",
    "SEED_WEIGHT_NAMES",
    "SEED_LEARNING_RATE",
]

SEED_INPUTS = [0.1, 0.05]
SEED_TARGETS = [0.02, 0.98]
SEED_W_INPUT_HIDDEN = [[0.25, 0.2], [0.5, 0.15]]
SEED_W_HIDDEN_OUTPUT = [[0.7, 0.4], [0.6, 0.35]]
SEED_BIASES = (0.3, 0.9)
SEED_LEARNING_RATE = 0.5

# The seed's names for each weight: (layer, row i, column j) -> name.
SEED_WEIGHT_NAMES = {
    (0, 0, 0): "W1",
    (0, 0, 1): "W2",
    (0, 1, 0): "W3",
    (0, 1, 1): "W4",
    (1, 0, 0): "W5",
    (1, 0, 1): "W6",
    (1, 1, 0): "W7",
    (1, 1, 1): "W8",
}

# Every number the seed's slides state, as printed there (4 places). The first four are right;
# the rest do not follow from the seed's own weights (its in_h2 line also multiplies i1 by 0.25
# where W2 is 0.2, though its stated result 0.3275 is the correct one).
SEED_STATED = {
    "in_h1": 0.35,
    "in_h2": 0.3275,
    "out_h1": 0.5866,
    "out_h2": 0.5812,
    "in_o1": 1.345,
    "in_o2": 1.1546,
    "out_o1": 0.7927,
    "out_o2": 0.7927,
    "E_o1": 0.2985,
    "E_o2": 0.0241,
    "E_total": 0.3226,
    "dE/dW7": 0.0745,
    "W7_new": 0.5628,
}


class SeedProblem(NamedTuple):
    net: object
    params: tuple
    x: jax.Array
    y: jax.Array
    learning_rate: float


def seed_network():
    """The 2-2-2 network with shared biases:
    ``Dense(2, shared) -> Sigmoid -> Dense(2, shared) -> Sigmoid``."""
    return serial(Dense(2, shared_bias=True), Sigmoid, Dense(2, shared_bias=True), Sigmoid)


def seed_problem(dtype=None) -> SeedProblem:
    """The seed's network, its exact weights, its one example and its learning rate.

    ``dtype`` defaults to float64 when ``jax_enable_x64`` is on (the worked numbers are checked
    in float64), else float32.
    """
    dtype = dtype or jax.dtypes.canonicalize_dtype(jnp.float64)
    params = (
        {"W": jnp.asarray(SEED_W_INPUT_HIDDEN, dtype), "b": jnp.asarray(SEED_BIASES[0], dtype)},
        (),
        {"W": jnp.asarray(SEED_W_HIDDEN_OUTPUT, dtype), "b": jnp.asarray(SEED_BIASES[1], dtype)},
        (),
    )
    return SeedProblem(
        seed_network(),
        params,
        jnp.asarray(SEED_INPUTS, dtype),
        jnp.asarray(SEED_TARGETS, dtype),
        SEED_LEARNING_RATE,
    )
