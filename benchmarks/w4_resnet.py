"""W4 the MNIST-1D ResNet preset (stride-2 stem, 4 residual blocks with BatchNorm, 26k
params), batch 128: convolutions and layer state in the verified step. Beside jaxbp's
variants, the PyTorch eager twin (:mod:`benchmarks.torch_nets`: ``F.conv1d``,
``F.batch_norm``, the same weights, the same SGD step, float32)."""

from jaxbp.presets import mnist1d_resnet

from .networks import run_network
from .torch_nets import torch_baseline


def run(*, quick: bool = False, tiny: bool = False) -> dict:
    model = mnist1d_resnet(10, channels=4, blocks=1) if tiny else mnist1d_resnet(10)
    batch = 8 if tiny else 128
    return run_network(
        "W4",
        f"MNIST-1D ResNet preset, batch {batch}",
        model,
        (40, 1),
        batch,
        "softmax_cross_entropy",
        10,
        steps=3 if tiny else 20,
        rounds=2 if tiny else (4 if quick else 7),
        baselines=torch_baseline,
    )
