"""``python -m benchmarks``: the whole suite (``make bench``).

On some machines OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE are set to work around old OpenBLAS
builds; they slow a current numpy and so would flatter jaxbp. This command re-runs itself
with both unset (this process only; pass --keep-blas-env to keep them) and records which
OpenBLAS kernel numpy then runs (threadpoolctl) in the JSON.
"""

import argparse
import os
import sys

_BLAS_VARS = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--keep-blas-env" in argv:
        argv.remove("--keep-blas-env")
    elif any(v in os.environ for v in _BLAS_VARS):
        env = {k: v for k, v in os.environ.items() if k not in _BLAS_VARS}
        os.execve(sys.executable, [sys.executable, "-m", "benchmarks", *argv], env)
    # The options and their checks are jaxbp bench's own: one definition for both commands.
    from jaxbp.cli import UsageError
    from jaxbp.commands.bench import add_arguments, run

    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except UsageError as e:
        parser.error(str(e))


if __name__ == "__main__":
    sys.exit(main())
