"""The progress display of a training run: a callback the training loop calls each epoch.

:func:`jaxbp.training.run` knows nothing of displays: it calls ``on_epoch(row)`` after every
epoch. :class:`Progress` is the display ``jaxbp train`` and :func:`jaxbp.training.train`
(``progress="auto"``) hand it: a rich bar on a terminal, about ten plain lines otherwise.
"""

from __future__ import annotations

import math
import sys

__all__ = ["Progress", "format_value", "PROGRESS_MODES"]

PROGRESS_MODES = ("auto", "bar", "lines", "none")


def format_value(v, spec: str = ".4f") -> str:
    """``v`` formatted with ``spec``; ``"-"`` for a missing or NaN value."""
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


class Progress:
    """A rich progress bar on a terminal; plain lines (about ten per run) otherwise."""

    def __init__(self, mode: str, total: int, start: int, title: str, stream=None):
        self.stream = stream or sys.stderr
        if mode == "auto":
            mode = "bar" if getattr(self.stream, "isatty", lambda: False)() else "lines"
        self.mode, self.total, self.title = mode, total, title
        self.every = max(1, total // 10)
        self.bar = self._start_bar(start) if mode == "bar" else None

    def _start_bar(self, start: int):
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        bar = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=Console(file=self.stream),
            transient=False,
        )
        self.task = bar.add_task(self.title, total=self.total, completed=start, stats="")
        bar.start()
        return bar

    def update(self, row: dict) -> None:
        # Which accuracy is which, in words: a text run's held-out split is its validation set.
        held_out = "val" if self.title == "text" else "test"
        stats = (
            f"loss {format_value(row['loss'])}  acc train "
            f"{format_value(row['train_accuracy'], '.3f')} {held_out} "
            f"{format_value(row['test_accuracy'], '.3f')}  grad err "
            f"{format_value(row['max_grad_rel_error'], '.1e')}"
        )
        if row["skipped_nonfinite"] or row["skipped_mismatch"]:
            stats += f"  skipped {row['skipped_nonfinite']}+{row['skipped_mismatch']}"
        if self.mode == "bar":
            assert self.bar is not None, "Progress.update after close"
            self.bar.update(self.task, completed=row["epoch"], stats=stats)
        elif self.mode == "lines":
            e = row["epoch"]
            if e % self.every == 0 or e == self.total or row["skipped_nonfinite"]:
                print(f"{self.title} epoch {e}/{self.total}  {stats}", file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None
