"""``jaxbp bench``: the benchmark suite of ``benchmarks/`` (the same as ``make bench``).

The suite ships with the source tree, not with the installed package: this command finds it
next to the ``jaxbp`` package (an editable install or a checkout) and runs it in-process.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from jaxbp.cli import UsageError

# The suite's workloads, listed here so that `jaxbp bench --help` imports nothing heavy (a test
# checks they match benchmarks.suite.WORKLOADS): W0-W3 the MLPs, W4-W7 the networks.
WORKLOADS = ("W0", "W1", "W2", "W3", "W4", "W5", "W6", "W7")


def _suite():
    try:
        return importlib.import_module("benchmarks.suite")
    except ImportError:
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        if not os.path.isfile(os.path.join(root, "benchmarks", "suite.py")):
            raise UsageError(
                "the benchmark suite ships with the jaxbp source tree "
                "(benchmarks/); run this from a checkout or an editable install"
            ) from None
        sys.path.insert(0, root)
        return importlib.import_module("benchmarks.suite")


def add_arguments(parser) -> None:
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny sizes and few steps: a smoke test (1-2 minutes on 2 cores, mostly "
        "compiling; the numbers mean nothing and no target is judged)",
    )
    parser.add_argument(
        "--short",
        action="store_true",
        help="full sizes, fewer rounds (about half the time of a full run)",
    )
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # = --quick
    parser.add_argument(
        "--workloads",
        nargs="+",
        metavar="W",
        default=list(WORKLOADS),
        help=f"which workloads, e.g. W0,W1 or W0 W1 (default: all of {','.join(WORKLOADS)})",
    )
    parser.add_argument(
        "--json",
        metavar="PATH",
        default=None,
        help="where to write the results (default: benchmarks/results/latest.json)",
    )


def run(args) -> int:
    suite = _suite()
    workloads = suite.split_workloads(args.workloads)
    unknown = [w for w in workloads if w not in WORKLOADS]
    if unknown or not workloads:
        raise UsageError(
            f"unknown workload(s) {', '.join(unknown) or '(none given)'}; "
            f"expected some of {','.join(WORKLOADS)}"
        )
    tiny = args.quick or args.tiny
    suite.run_suite(
        workloads, quick=tiny or args.short, tiny=tiny, json_path=args.json or suite.DEFAULT_JSON
    )
    return 0
