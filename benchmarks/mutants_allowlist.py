"""The mutants of jaxbp's backward passes that no gradient check can (or should) catch.

``python -m benchmarks.mutants`` counts these apart from the survivors. Each entry is
``(file, function, mutation, reason)``, the mutation exactly as the tool prints it (one entry
covers every place in that function where the same mutation reads the same).
"""

_KINK = (
    "differs only where x == 0 exactly, where the function has a kink and no derivative: every "
    "value between the two slopes is a subgradient there, and the mutant picks the other end. "
    "The checks' inputs are continuous random numbers, never exactly 0; elsewhere it is the "
    "same function."
)

_STRICT = (
    "zip(..., strict=True) -> strict=False: strict only raises when the sequences differ in "
    "length, and here they have one entry per spatial axis by "
    "construction."
)
_CLAMPED = (
    "dx[0] -> dx[1] of the batch of one a single example was lifted to: JAX clamps an "
    "out-of-bounds index on retrieval, so dx[1] reads dx[0]."
)

EQUIVALENT: list[tuple[str, str, str, str]] = [
    ("layers.py", "_relu_backward", "x > 0 -> x >= 0", _KINK),
    ("layers.py", "LeakyRelu.backward", "x > 0 -> x >= 0", _KINK),
    ("conv.py", "_conv_backward_pads", "True -> False", _STRICT),
    ("conv.py", "_window_untap", "True -> False", _STRICT),
    ("conv.py", "_conv_backward", "0 -> 1", _CLAMPED),
    ("conv.py", "_pool.backward", "0 -> 1", _CLAMPED),
]
