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
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from .layers import Layer, concat, glorot_uniform, output_shape, residual, serial
from .model import build, describe, factory, register_layer
from .train import freeze

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

RULES = ("bp", "fa", "kp", "sign", "dfa")
RULE_NAMES = {
    "bp": "backprop",
    "fa": "feedback alignment",
    "kp": "Kolen-Pollack",
    "sign": "sign symmetry",
    "dfa": "direct feedback alignment",
}
FEEDBACK_LAYERS = ("Dense", "Conv1D", "Conv2D")
_RULE_LAYERS = ("FeedbackAlignment", "KolenPollack", "SignSymmetry", "DirectFeedbackAlignment")
_RELU_LIKE = ("Relu", "LeakyRelu", "Gelu")


def check_rule(rule: str) -> str:
    """``rule`` if it is one of :data:`RULES`, else a ``ValueError`` naming them."""
    if rule not in RULES:
        raise ValueError(f"unknown learning rule {rule!r}; expected one of: {', '.join(RULES)}")
    return rule


# --------------------------------------------------------------------------------------------
# Per-layer rules: FA, KP, sign symmetry
# --------------------------------------------------------------------------------------------


def _check_wrappable(layer, who: str) -> None:
    if not isinstance(layer, Layer):
        raise TypeError(f"{who} expects a jaxbp Layer, got {layer!r}")
    if layer.name not in FEEDBACK_LAYERS:
        raise ValueError(
            f"{who} is not defined for layer {layer.name}; expected one of: "
            f"{', '.join(FEEDBACK_LAYERS)} (a layer whose dE/dx is linear in W)"
        )


def _check_params(params, who: str, keys=("B", "W", "b")) -> None:
    if not isinstance(params, dict) or sorted(params) != sorted(keys):
        got = sorted(params) if isinstance(params, dict) else type(params).__name__
        raise ValueError(f"{who} expects params with keys {', '.join(sorted(keys))}, got {got}")


def _without_b(params) -> dict:
    return {k: v for k, v in params.items() if k != "B"}


def _feedback_init(layer: Layer, key, input_shape):
    # W from the key itself (backprop's weights); B with the layer's own initialiser from an
    # independent key, so it has W's distribution and no relation to W.
    shape, params = layer.init(key, input_shape)
    _, other = layer.init(jax.random.fold_in(key, 1), input_shape)
    return shape, {**params, "B": other["W"]}


def _feedback_layer(layer: Layer, name: str, learn_b: bool) -> Layer:
    _check_wrappable(layer, name)

    def init(key, input_shape):
        return _feedback_init(layer, key, input_shape)

    def forward(params, x):
        _check_params(params, name)
        return layer.forward(_without_b(params), x)

    def backward(params, cache, dy):
        grads, _ = layer.backward(_without_b(params), cache, dy)
        # The same backward with B in W's place: for Dense dx = dy @ B.T (its dW is unused and
        # compiled away).
        _, dx = layer.backward({**_without_b(params), "W": params["B"]}, cache, dy)
        db = grads["W"] if learn_b else jnp.zeros_like(params["B"])
        return {**grads, "B": db}, dx

    backward.__doc__ = _KP_DOC if learn_b else _FA_DOC
    return Layer(init, forward, backward, name, (("layer", layer),))


_FA_DOC = """Feedback alignment: ``dE/dx = dy @ B.T`` (a convolution: the transposed convolution
    of ``dy`` with ``B``), ``B`` fixed and random, not ``W``; ``dE/dW = x.T @ dy`` and
    ``dE/db = sum_n dy[n]`` as the wrapped layer's; ``dE/dB = 0`` (``B`` never changes)."""

_KP_DOC = """Kolen-Pollack: ``dE/dx = dy @ B.T``; ``dE/dW = x.T @ dy``, ``dE/db = sum_n dy[n]``;
    ``dE/dB = dE/dW`` (``B`` gets ``W``'s update and ``W``'s weight decay, so ``B - W`` only
    decays: ``B_t - W_t = (1 - lr * wd)^t (B_0 - W_0)`` under SGD)."""


def FeedbackAlignment(layer: Layer) -> Layer:
    """``layer`` (a ``Dense``, ``Conv1D`` or ``Conv2D``) learning by feedback alignment.

    Params: the layer's plus ``"B"`` (``W``'s shape): ``dE/dx = dy @ B.T`` (module docstring).
    """
    return _feedback_layer(layer, "FeedbackAlignment", learn_b=False)


def KolenPollack(layer: Layer) -> Layer:
    """``layer`` learning by Kolen-Pollack: FA whose ``B`` gets ``W``'s update and decay."""
    return _feedback_layer(layer, "KolenPollack", learn_b=True)


def SignSymmetry(layer: Layer) -> Layer:
    """``layer`` learning by sign symmetry: ``dE/dx = dy @ sign(W).T``; no extra params."""
    _check_wrappable(layer, "SignSymmetry")

    def backward(params, cache, dy):
        """Sign symmetry: ``dE/dx = dy @ sign(W).T`` (a convolution: the transposed convolution
        of ``dy`` with ``sign(W)``); ``dE/dW = x.T @ dy``, ``dE/db = sum_n dy[n]`` as the
        wrapped layer's."""
        grads, _ = layer.backward(params, cache, dy)
        _, dx = layer.backward({**params, "W": jnp.sign(params["W"])}, cache, dy)
        return grads, dx

    return Layer(layer.init, layer.forward, backward, "SignSymmetry", (("layer", layer),))


# --------------------------------------------------------------------------------------------
# Direct feedback alignment: a combinator over a whole serial network
# --------------------------------------------------------------------------------------------


def _with_params(params) -> list[int]:
    return [i for i, p in enumerate(params) if jax.tree_util.tree_leaves(p)]


def _check_dfa_network(layer) -> tuple:
    if not isinstance(layer, Layer):
        raise TypeError(f"DirectFeedbackAlignment expects a jaxbp Layer, got {layer!r}")
    if layer.name != "serial":
        raise ValueError(
            f"direct feedback alignment is not defined for layer {layer.name}; "
            f"it expects a serial network (the output error reaches each of its "
            f"hidden layers directly)"
        )
    for i, child in enumerate(layer.children):
        if child.has_state:
            raise ValueError(
                f"layer {i} ({child.name}): direct feedback alignment is not "
                f"defined for a layer with state or randomness"
            )
    return layer.children


def DirectFeedbackAlignment(layer: Layer) -> Layer:
    """A serial network trained by direct feedback alignment (Nøkland 2016).

    The network is cut into blocks, each starting at a layer with parameters (a ``Dense``
    with the activation after it). Params: ``{"net": the network's params, "B": (B_1, ...)}``,
    one fixed random ``B_k`` of shape ``(outputs, features of block k's output)`` per hidden
    block (every block but the last).
    """
    children = _check_dfa_network(layer)

    def init(key, input_shape):
        shape, net_params = layer.init(key, input_shape)
        starts = _with_params(net_params)
        _check_dfa_layers(children, starts)
        shapes = [tuple(input_shape)]
        for child in children:
            shapes.append(output_shape(child, shapes[-1]))
        batch_rank, outputs = len(shape) - 1, int(shape[-1])
        keys = jax.random.split(jax.random.fold_in(key, 1), max(len(starts) - 1, 1))
        feedback = []
        for j, end in enumerate(starts[1:]):
            dtype = jax.tree_util.tree_leaves(net_params[starts[j]])[0].dtype
            size = math.prod(shapes[end][batch_rank:])
            feedback.append(glorot_uniform(keys[j], (outputs, size), dtype))
        return shape, {"net": net_params, "B": tuple(feedback)}

    def forward(params, x):
        _check_params(params, "DirectFeedbackAlignment", keys=("B", "net"))
        caches, outs, h = [], [], x
        for i, (child, p) in enumerate(zip(children, params["net"])):
            try:
                h, c = child.forward(p, h)
            except (ValueError, TypeError) as e:
                raise type(e)(f"layer {i} ({child.name}): {e}") from None
            caches.append(c)
            outs.append(h)
        return h, (x, tuple(caches), tuple(outs))

    def backward(params, cache, dy):
        """Direct feedback alignment: with the output error ``e = dy``, hidden block ``k``
        gets ``dE/dh_k = e @ B_k`` (reshaped to its output ``h_k``) and runs its own backward
        (``da_k = dE/dh_k * f'(a_k)``, ``dE/dW_k = x_k.T @ da_k``, ``dE/db_k = sum_n da_k``);
        the last block gets ``e`` through its ordinary backward. No error flows from a block
        to the one below it, so ``dE/dx = 0``; ``dE/dB_k = 0`` (fixed)."""
        x, caches, outs = cache
        net_params = params["net"]
        starts = _with_params(net_params)
        grads = [jax.tree_util.tree_map(jnp.zeros_like, p) for p in net_params]
        errors = dy.reshape(-1, dy.shape[-1])
        for j, (start, end) in enumerate(zip(starts, starts[1:] + [len(children)])):
            d = (
                dy
                if end == len(children)
                else ((errors @ params["B"][j]).reshape(jnp.shape(outs[end - 1])))
            )
            for i in reversed(range(start, end)):
                grads[i], d = children[i].backward(net_params[i], caches[i], d)
        feedback = tuple(jnp.zeros_like(b) for b in params["B"])
        return {"net": tuple(grads), "B": feedback}, jnp.zeros_like(x)

    return Layer(init, forward, backward, "DirectFeedbackAlignment", (("layer", layer),))


def _check_dfa_layers(children, starts) -> None:
    if not starts:
        raise ValueError(
            "direct feedback alignment needs a network with at least one layer with parameters"
        )
    for i in starts:
        if children[i].name not in FEEDBACK_LAYERS:
            raise ValueError(
                f"layer {i} ({children[i].name}): direct feedback alignment is "
                f"not defined for this layer; expected {', '.join(FEEDBACK_LAYERS)}"
                f" and parameter-free layers"
            )


# --------------------------------------------------------------------------------------------
# A rule applied to a whole network
# --------------------------------------------------------------------------------------------

_WRAPPERS = {"fa": FeedbackAlignment, "kp": KolenPollack, "sign": SignSymmetry}


def _has_params(layer: Layer, input_shape) -> bool:
    found = []

    def params_only():
        _, params = layer.init(jax.random.key(0), tuple(input_shape))
        found.append(bool(jax.tree_util.tree_leaves(params)))
        return params

    jax.eval_shape(params_only)
    return found[0]


def _resolved(children) -> list:
    """``serial``'s ``w_init="auto"`` choice made explicit (He before a ReLU-like activation,
    else Glorot): a wrapper hides the layer's config from ``serial``, which resolves it."""
    out = list(children)
    for i, child in enumerate(children):
        config = dict(child.config or ())
        if config.get("w_init") == "auto":
            following = children[i + 1].name if i + 1 < len(children) else None
            config["w_init"] = "he" if following in _RELU_LIKE else "glorot"
            out[i] = factory(child.name)(**config)
    return out


def _wrap(layer: Layer, rule: str, shape, where: str) -> Layer:
    if layer.name in _RULE_LAYERS:  # a layer given its own rule keeps it
        return layer
    if layer.name in ("serial", "residual"):
        children, new = _resolved(layer.children), []
        for i, child in enumerate(children):
            new.append(_wrap(child, rule, shape, f"{where}.layers[{i}]"))
            shape = output_shape(child, shape)
        return (serial if layer.name == "serial" else residual)(*new)
    if layer.name == "concat":
        return concat(
            *[_wrap(c, rule, shape, f"{where}.layers[{i}]") for i, c in enumerate(layer.children)]
        )
    if layer.name in FEEDBACK_LAYERS:
        return _WRAPPERS[rule](layer)
    if not _has_params(layer, shape):
        return layer
    raise ValueError(
        f"{where}: learning rule {rule} ({RULE_NAMES[rule]}) is not defined for "
        f"layer {layer.name}; it is defined for {', '.join(FEEDBACK_LAYERS)} and "
        f"parameter-free layers"
    )


def apply_rule(net: Layer, rule: str, input_shape) -> Layer:
    """``net`` learning by ``rule`` (one of :data:`RULES`) on inputs of ``input_shape``.

    ``"bp"`` returns ``net``; ``"fa"``, ``"kp"``, ``"sign"`` wrap every ``Dense``/``Conv``
    layer (inside ``serial``, ``residual``, ``concat``); ``"dfa"`` wraps the whole serial
    network. A layer with parameters that the rule is not defined for is a ``ValueError``
    naming it; a layer already wrapped by a rule keeps its own.
    """
    check_rule(rule)
    if not isinstance(net, Layer):
        raise TypeError(f"apply_rule expects a jaxbp Layer, got {net!r}")
    shape = tuple(input_shape)
    if rule == "bp":
        return net
    if rule != "dfa":
        return _wrap(net, rule, shape, "model")
    if net.name == "DirectFeedbackAlignment":
        return net
    _check_dfa_network(net)
    dfa = DirectFeedbackAlignment(serial(*_resolved(net.children)))
    try:
        output_shape(dfa, shape)  # the per-layer checks need the params
    except ValueError as e:
        raise ValueError(f"model: {e}") from None
    return dfa


def apply_rule_to_description(description: dict, rule: str, input_shape) -> dict:
    """:func:`apply_rule` on a model description: the description of the result."""
    return describe(apply_rule(build(description), rule, input_shape))


def step_check(check: str, rule: str) -> str:
    """The check mode a verified step runs with under ``rule``: a rule other than backprop
    always disagrees with ``jax.grad`` by design, so ``"skip"`` and ``"raise"`` become
    ``"report"`` (the update is applied and measured); the non-finite guard still refuses a
    NaN or inf step in every mode."""
    return "report" if check_rule(rule) != "bp" and check in ("skip", "raise") else check


# --------------------------------------------------------------------------------------------
# The optimizer: fixed feedback stays fixed
# --------------------------------------------------------------------------------------------


def _mask(layer: Layer, params):
    false = jax.tree_util.tree_map(lambda _: False, params)
    if layer.name == "FeedbackAlignment":
        return {**false, "B": True}
    if layer.name == "DirectFeedbackAlignment":
        inner = dict(layer.config)["layer"]
        return {
            "net": _mask(inner, params["net"]),
            "B": jax.tree_util.tree_map(lambda _: True, params["B"]),
        }
    if layer.name in ("serial", "residual", "concat") and isinstance(params, (tuple, list)):
        return tuple(_mask(c, p) for c, p in zip(layer.children, params))
    return false


def fixed_feedback(net: Layer, params):
    """A mask pytree shaped like ``params``: ``True`` for the fixed feedback matrices (the
    ``B`` of every ``FeedbackAlignment`` and ``DirectFeedbackAlignment``)."""
    return _mask(net, params)


def _has_fixed_feedback(layer: Layer) -> bool:
    if layer.name in ("FeedbackAlignment", "DirectFeedbackAlignment"):
        return True
    return any(_has_fixed_feedback(c) for c in layer.children)


def optimizer(opt, net: Layer):
    """``opt`` with the fixed feedback matrices of ``net`` frozen: no update, no weight decay
    (:func:`jaxbp.freeze`). KP's ``B`` is trained like ``W``; ``opt`` itself is returned when
    ``net`` has no fixed feedback. The same object for the same arguments (compiled once)."""
    try:
        return _frozen_optimizer(opt, net)
    except TypeError:  # something unhashable in the layer's config: no cache
        return _frozen_optimizer.__wrapped__(opt, net)


@functools.lru_cache(maxsize=32)
def _frozen_optimizer(opt, net: Layer):
    if not _has_fixed_feedback(net):
        return opt
    return freeze(opt, functools.partial(fixed_feedback, net))


# --------------------------------------------------------------------------------------------
# Alignment: the angle between the rule's update and the gradient, per layer
# --------------------------------------------------------------------------------------------


def _weight_leaves(paths) -> list[tuple[int, str]]:
    suffix = "['W']"
    return [(i, p[: -len(suffix)] or "<root>") for i, p in enumerate(paths) if p.endswith(suffix)]


def _finite_or_none(v: float):
    return float(v) if math.isfinite(v) else None


def layer_alignment(report, keep=None) -> dict:
    """Per layer (each weight leaf ``W``): ``{"angle": degrees, "norm_ratio": ratio}`` between
    the rule's update and ``jax.grad``'s, from a :class:`~jaxbp.GradReport`.

    ``angle = degrees(arccos(cosine))`` (0: the gradient's direction; 90: orthogonal);
    ``norm_ratio = ||rule|| / ||grad||``. A stacked report (a loop's, one row per step) gives
    the mean over the rows where ``keep`` is true (say, the finite steps). Non-finite values
    (no comparison ran: ``check="off"``) read ``None``.
    """
    cosine = np.asarray(report.cosine, np.float64)
    ratio = (
        np.full_like(cosine, np.nan)
        if report.norm_ratio is None
        else np.asarray(report.norm_ratio, np.float64)
    )
    cosine, ratio = np.atleast_2d(cosine), np.atleast_2d(ratio)
    if keep is not None:
        rows = np.asarray(keep, bool).reshape(-1)
        cosine, ratio = cosine[rows], ratio[rows]
    angles = np.degrees(np.arccos(np.clip(cosine, -1.0, 1.0)))
    out = {}
    for i, label in _weight_leaves(report.paths):
        a = float(np.mean(angles[:, i])) if len(angles) else math.nan
        r = float(np.mean(ratio[:, i])) if len(ratio) else math.nan
        out[label] = {"angle": _finite_or_none(a), "norm_ratio": _finite_or_none(r)}
    return out


for _name, _factory in (
    ("FeedbackAlignment", FeedbackAlignment),
    ("KolenPollack", KolenPollack),
    ("SignSymmetry", SignSymmetry),
    ("DirectFeedbackAlignment", DirectFeedbackAlignment),
):
    register_layer(_name, _factory)
