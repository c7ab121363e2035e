"""The seed tutorial's stated numbers, checked against the trace of its own example."""

from __future__ import annotations

__all__ = ["seed_values", "seed_errata", "SEED_PRINTED_TOLERANCE"]

# The seed prints 4 places: a stated number matches when it is the correct one rounded.
SEED_PRINTED_TOLERANCE = 0.5e-4 + 1e-12


def seed_values(trace) -> dict:
    """The correct value of every quantity the seed states (the keys of ``SEED_STATED``).

    Only meaningful for the seed's 2-2-2 example.
    """
    hidden, output = trace.layers
    grad_w7 = float(output.grad_weights[1, 0])  # W7 joins hidden 2 to output 1
    return {
        "in_h1": float(hidden.net[0, 0]),
        "in_h2": float(hidden.net[0, 1]),
        "out_h1": float(hidden.out[0, 0]),
        "out_h2": float(hidden.out[0, 1]),
        "in_o1": float(output.net[0, 0]),
        "in_o2": float(output.net[0, 1]),
        "out_o1": float(output.out[0, 0]),
        "out_o2": float(output.out[0, 1]),
        "E_o1": float(trace.errors[0]),
        "E_o2": float(trace.errors[1]),
        "E_total": float(trace.loss),
        "dE/dW7": grad_w7,
        "W7_new": float(
            trace.config.layers[1].weights[1, 0] - trace.config.learning_rate * grad_w7
        ),
    }


def seed_errata(trace) -> list[dict] | None:
    """For the seed's example: each number the seed states, the correct value, and whether
    they agree to the 4 places the seed prints. ``None`` for any other config."""
    if not trace.config.is_seed:
        return None
    from ..seed import SEED_STATED

    correct = seed_values(trace)
    return [
        {
            "quantity": name,
            "seed_states": stated,
            "correct": correct[name],
            "matches": abs(stated - correct[name]) <= SEED_PRINTED_TOLERANCE,
        }
        for name, stated in SEED_STATED.items()
    ]
