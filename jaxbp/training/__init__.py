"""The training run behind ``jaxbp train``, as a library (see :mod:`.session`).

::

    result = jaxbp.training.train(TrainConfig(dataset="digits", out="runs/digits"))
    result.metrics["test_accuracy"]
"""

from __future__ import annotations

from .config import (
    OPTIMIZERS,
    OUTPUT_ACTIVATIONS,
    SCHEDULES,
    TrainConfig,
    build_optimizer,
    check_seed,
    resolve_config,
)
from .session import (
    CHECKPOINT_FILE,
    CURVES_FILE,
    METRICS_FILE,
    Session,
    TrainResult,
    finish,
    prepare,
    run,
    train,
)

__all__ = [
    "TrainConfig",
    "TrainResult",
    "Session",
    "OPTIMIZERS",
    "SCHEDULES",
    "OUTPUT_ACTIVATIONS",
    "CHECKPOINT_FILE",
    "METRICS_FILE",
    "CURVES_FILE",
    "resolve_config",
    "build_optimizer",
    "check_seed",
    "prepare",
    "run",
    "finish",
    "train",
]
