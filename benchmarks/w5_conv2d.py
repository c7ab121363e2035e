"""W5 a Conv2D stack on 32x32 images with 32 channels: three 3x3 SAME convolutions with
ReLU, 2x2 max-pooling, global average pooling, Dense 10; batch 32. Beside jaxbp's variants,
the PyTorch eager twin (:mod:`benchmarks.torch_nets`: ``F.conv2d``, ``F.max_pool2d``, the
same weights, the same SGD step, float32)."""

from .networks import run_network
from .torch_nets import torch_baseline


def conv2d_stack(channels: int, num_outputs: int) -> dict:
    conv = {"name": "Conv2D", "out_channels": channels, "kernel_size": 3, "padding": "SAME"}
    return {
        "name": "serial",
        "layers": [
            conv,
            {"name": "Relu"},
            conv,
            {"name": "Relu"},
            {"name": "MaxPool2D", "window": 2},
            conv,
            {"name": "Relu"},
            {"name": "GlobalAvgPool"},
            {"name": "Dense", "out_dim": num_outputs},
        ],
    }


def run(*, quick: bool = False, tiny: bool = False) -> dict:
    side, channels, batch = (8, 4, 4) if tiny else (32, 32, 32)
    return run_network(
        "W5",
        f"Conv2D stack {side}x{side}x{channels}, batch {batch}",
        conv2d_stack(channels, 10),
        (side, side, channels),
        batch,
        "softmax_cross_entropy",
        10,
        steps=2 if tiny else 5,
        rounds=2 if tiny else (3 if quick else 5),
        baselines=torch_baseline,
    )
