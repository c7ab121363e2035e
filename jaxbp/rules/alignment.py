"""Alignment: the angle between a rule's update and the gradient, per layer."""

from __future__ import annotations

import math

import numpy as np

__all__ = ["layer_alignment"]


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
