"""Learning rules beyond backpropagation, measured against it.

A learning rule is a backward pass that is deliberately not the gradient. In jaxbp the backward
is explicit, and the verified step computes ``jax.grad`` beside it, so a rule is simply another
layer (the same contract, registered, described and checkpointed like any other) whose distance
from the true gradient the step reports every step::

    net = jaxbp.serial(jaxbp.Dense(64), jaxbp.Relu, jaxbp.Dense(10))
    fa = jaxbp.rules.apply_rule(net, "fa", (-1, 64))     # every Dense -> FeedbackAlignment
    opt = jaxbp.rules.optimizer(optax.adam(1e-3), fa)    # B stays fixed (no decay either)
    step = jaxbp.make_train_step(fa, "softmax_cross_entropy", opt, check="report")
    # metrics.report.cosine / .norm_ratio per leaf: jaxbp.rules.layer_alignment(report)

Rules (:data:`RULES`):

- ``"bp"``: backpropagation, the layers' own backward.
- ``"fa"``: feedback alignment (Lillicrap et al. 2016), :func:`FeedbackAlignment`: each
  ``Dense`` sends ``dE/dx = dy @ B.T`` back through a fixed random ``B`` instead of ``W``.
- ``"kp"``: Kolen-Pollack (Akrout et al. 2019), :func:`KolenPollack`: as FA, but ``B``
  learns with ``W``'s update (``dE/dB := dE/dW``) and ``W``'s weight decay, so with decay
  ``B - W`` shrinks by the decay factor every step and the two converge.
- ``"sign"``: sign symmetry (Liao et al. 2016), :func:`SignSymmetry`: ``dy @ sign(W).T``.
- ``"dfa"``: direct feedback alignment (Nøkland 2016), :func:`DirectFeedbackAlignment`: the
  output error ``e`` reaches every hidden block ``k`` directly as ``e @ B_k``; no error flows
  from one block to the one below it. This cannot be a per-layer ``custom_vjp`` (the error
  reaching a layer has another shape than its output's cotangent), so it wraps the whole serial
  network.

FA, KP and sign symmetry are defined for the layers whose input gradient is linear in their
weights ``W`` (:data:`FEEDBACK_LAYERS`: ``Dense``, ``Conv1D``, ``Conv2D``; for a convolution
``dE/dx`` is the transposed convolution of ``dy`` with ``B`` or ``sign(W)``); parameter-free
layers pass through; any other layer with parameters is an error naming it.

Feedback matrices ``B`` are parameters of the wrapper: drawn with the wrapped layer's own
initialiser from ``fold_in(key, 1)`` of the layer's init key (the weights ``W`` come from the
key itself, so a rule starts from exactly backprop's weights), and checkpointed with the
params. ``jax.grad``'s gradient for ``B`` is 0 (``B`` does not touch the forward); the rule's is
0 for FA and DFA (fixed: :func:`optimizer` also keeps weight decay off them) and ``dE/dW`` for
KP. The report compares the rule's gradients with ``jax.grad``'s leaf by leaf;
:func:`layer_alignment` turns that into the angle between the two updates of each ``W``
(``degrees(arccos(cosine))``) and the norm ratio ``||rule|| / ||grad||``.

The package, one purpose per module: :mod:`~jaxbp.rules.check` (the rules' names, and the check
mode a step runs under each), :mod:`~jaxbp.rules.feedback` (the rules as layers),
:mod:`~jaxbp.rules.apply` (a rule applied to a network or its description),
:mod:`~jaxbp.rules.optimizer` (fixed feedback stays fixed) and :mod:`~jaxbp.rules.alignment`
(the angle between a rule's update and the gradient).
"""

from __future__ import annotations

from .alignment import layer_alignment
from .apply import apply_rule, apply_rule_to_description
from .check import RULE_NAMES, RULES, check_rule, step_check
from .feedback import (
    FEEDBACK_LAYERS,
    DirectFeedbackAlignment,
    FeedbackAlignment,
    KolenPollack,
    SignSymmetry,
)
from .optimizer import fixed_feedback, optimizer

__all__ = [
    "RULES",
    "RULE_NAMES",
    "FEEDBACK_LAYERS",
    "FeedbackAlignment",
    "KolenPollack",
    "SignSymmetry",
    "DirectFeedbackAlignment",
    "apply_rule",
    "apply_rule_to_description",
    "check_rule",
    "step_check",
    "fixed_feedback",
    "optimizer",
    "layer_alignment",
]
