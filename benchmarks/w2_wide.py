"""W2 wide: 1024-1024-1024-1024, ReLU, MSE, batch 1024 (matmul-bound)."""

from .mlp import run_mlp


def run(*, quick: bool = False, tiny: bool = False) -> dict:
    sizes, batch = ((32, 32, 32, 32), 16) if tiny else ((1024, 1024, 1024, 1024), 1024)
    return run_mlp(
        "W2",
        "wide 1024-1024-1024-1024, ReLU, MSE, batch 1024",
        sizes,
        "relu",
        "mse",
        batch,
        steps=2 if tiny else 4,
        rounds=2 if tiny else (3 if quick else 7),
    )
