"""The training run behind ``jaxbp train``: this name is kept for existing imports; the code
lives in :mod:`jaxbp.training` (config, model choice, compiled pieces, prepare/run/finish)."""

from __future__ import annotations

from .training import *  # noqa: F403
from .training import __all__  # noqa: F401
