"""The learning rules by name, and the check mode a verified step runs with under each."""

from __future__ import annotations

__all__ = ["RULES", "RULE_NAMES", "check_rule", "step_check"]

RULES = ("bp", "fa", "kp", "sign", "dfa")
RULE_NAMES = {
    "bp": "backprop",
    "fa": "feedback alignment",
    "kp": "Kolen-Pollack",
    "sign": "sign symmetry",
    "dfa": "direct feedback alignment",
}


def check_rule(rule: str) -> str:
    """``rule`` if it is one of :data:`RULES`, else a ``ValueError`` naming them."""
    if rule not in RULES:
        raise ValueError(f"unknown learning rule {rule!r}; expected one of: {', '.join(RULES)}")
    return rule


def step_check(check: str, rule: str) -> str:
    """The check mode a verified step runs with under ``rule``: a rule other than backprop
    always disagrees with ``jax.grad`` by design, so ``"skip"`` and ``"raise"`` become
    ``"report"`` (the update is applied and measured); the non-finite guard still refuses a
    NaN or inf step in every mode."""
    return "report" if check_rule(rule) != "bp" and check in ("skip", "raise") else check
