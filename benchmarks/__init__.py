"""jaxbp's benchmark suite: manual backprop vs autodiff vs numpy (vs PyTorch), as ratios.

Run it with ``make bench`` (``python -m benchmarks``) or ``jaxbp bench``; see
docs/benchmarks.md. Workloads live one per module (``w0_seed``, ``w1_mnist``, ``w2_wide``,
``w3_per_example``, the networks ``w4_resnet``, ``w5_conv2d``, ``w6_gru``, ``w7_gpt`` on
``networks``); the baselines in ``reference``; timing in ``harness``; the table, targets
and JSON in ``suite``.
"""

from .suite import WORKLOADS, run_suite, targets

__all__ = ["WORKLOADS", "run_suite", "targets"]
