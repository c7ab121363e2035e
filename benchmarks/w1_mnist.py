"""W1 mnist-shaped: 784-256-256-10, ReLU, softmax cross-entropy, batch 128."""

from .mlp import run_mlp


def run(*, quick: bool = False, tiny: bool = False) -> dict:
    sizes, batch = ((16, 8, 8, 4), 8) if tiny else ((784, 256, 256, 10), 128)
    return run_mlp(
        "W1",
        "mnist-shaped 784-256-256-10, ReLU, softmax CE, batch 128",
        sizes,
        "relu",
        "softmax_cross_entropy",
        batch,
        steps=5 if tiny else 50,
        rounds=2 if tiny else (4 if quick else 9),
    )
