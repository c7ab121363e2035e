"""W6 recurrent: the MNIST-1D bidirectional GRU preset (hidden 6, batch 100), and a GRU of
hidden 256 over 64 steps of 256 features at batch 64; backpropagation through time written
out as a reverse scan, in the verified step. Reported per sequence. Beside jaxbp's variants, the
PyTorch eager twin of each (:mod:`benchmarks.torch_nets`: ``torch.nn.GRU`` with the same
weights, the same SGD step, float32)."""

from jaxbp.presets import mnist1d_rnn

from .networks import run_network
from .torch_nets import torch_baseline


def gru_last_state(hidden: int, num_outputs: int) -> dict:
    """A GRU whose final state feeds a Dense (the large model: hidden 256)."""
    return {
        "name": "serial",
        "layers": [
            {"name": "GRU", "hidden": hidden, "return_sequences": False},
            {"name": "Dense", "out_dim": num_outputs},
        ],
    }


def run(*, quick: bool = False, tiny: bool = False) -> dict:
    rounds = 2 if tiny else (3 if quick else 5)
    small = run_network(
        "W6",
        "MNIST-1D bidirectional GRU(6) preset, batch 100",
        mnist1d_rnn(10, hidden=2 if tiny else 6),
        (40, 1),
        8 if tiny else 100,
        "softmax_cross_entropy",
        10,
        steps=2 if tiny else 20,
        rounds=rounds,
        baselines=torch_baseline,
    )
    time_steps, width, batch = (4, 8, 4) if tiny else (64, 256, 64)
    model = gru_last_state(8 if tiny else 256, 10)
    large = run_network(
        "W6",
        f"GRU(256) over {time_steps} steps of {width}, batch {batch}",
        model,
        (time_steps, width),
        batch,
        "softmax_cross_entropy",
        10,
        steps=2 if tiny else 3,
        rounds=rounds,
        baselines=torch_baseline,
    )
    # One section, two models: variants of the large model carry a suffix.
    suffix = " [GRU(256) T=64]"
    small["variants"].update({f"{k}{suffix}": v for k, v in large["variants"].items()})
    small["skipped"].update({f"{k}{suffix}": v for k, v in large["skipped"].items()})
    small["description"] += f"; and {large['description']}"
    return small
