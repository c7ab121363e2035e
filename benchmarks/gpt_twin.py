"""The default text GPT trained by jaxbp and by its PyTorch twin, side by side: the same
initial weights, the same batches, the same AdamW and learning-rate schedule; both validation
losses (nats per character over the whole validation split) and wall times.

::

    python -m benchmarks.gpt_twin                          # the default run: 10 epochs, seed 0
    python -m benchmarks.gpt_twin --steps 50 --seeds 0 1 2

jaxbp's side is the run ``jaxbp train --dataset text`` makes: :func:`jaxbp.training.prepare`
resolves the gpt preset and ``TEXT_DEFAULTS``, and each epoch is the session's compiled loop
(the checked step, ``check="report"`` by default) over the order
:func:`jaxbp.training.compiled.epoch_order` draws, evaluated by the session's evaluator: the
calls :func:`jaxbp.training.run` makes, so a run without ``--steps`` ends at the validation
loss ``jaxbp train`` reports (the tests check this). The twin replays it:

- weights: copied from the session's step-0 train state (:class:`benchmarks.torch_gpt.TorchGPT`);
- batches: the very windows jaxbp's loop trains on, cut by the same
  :func:`jaxbp.training.compiled.window_batch_fn` from the same order;
- optimizer: ``torch.optim.AdamW`` (b1 0.9, b2 0.999, eps 1e-8) as ``optax.adamw``: decay on
  every leaf but the Dense biases named ``'b'`` (jaxbp's mask), the learning rate of step
  ``t`` (0-based) set before it from :func:`learning_rate`;
- validation: the summed cross-entropy over every position of the validation split (its
  windows padded with label -1, ignored), divided by their number.

``--steps N`` stops both after N steps in all; the schedule still spans every epoch, so these
are the first N steps of the full run. PyTorch gets as many threads as the process has cores.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxbp.commands.args import positive_int
from jaxbp.commands.args import seed as seed_type
from jaxbp.training import TrainConfig, prepare
from jaxbp.training import compiled as training_compiled
from jaxbp.training.config import WARMUP_FRACTION

from .networks import torch_threads
from .torch_gpt import TorchGPT, gpt_heads

B1, B2, EPS = 0.9, 0.999, 1e-8  # optax.adamw's defaults, which build_optimizer keeps


def learning_rate(schedule: str, lr: float, total_steps: int, step: int) -> float:
    """Step ``step``'s learning rate, as :func:`jaxbp.training.build_optimizer`'s optax
    schedules give it (written out; ``total`` = epochs * steps per epoch):

    - ``constant``: ``lr``;
    - ``cosine``: ``lr * (1 + cos(pi * min(step, total) / total)) / 2``;
    - ``warmup_cosine``: ``w = max(1, round(0.05 total))``, ``D = max(total, w + 1)``;
      ``lr * step / w`` for ``step < w``, then ``lr * (1 + cos(pi * min(step - w, D - w) /
      (D - w))) / 2``.
    """
    if schedule == "constant":
        return lr
    if schedule == "cosine":
        total = max(total_steps, 1)
        return lr * 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
    if schedule != "warmup_cosine":
        raise ValueError(
            f"unknown schedule {schedule!r}; expected constant, cosine or warmup_cosine"
        )
    warmup = max(1, int(round(WARMUP_FRACTION * total_steps)))
    decay = max(total_steps, warmup + 1) - warmup
    if step < warmup:
        return lr * step / warmup
    return lr * 0.5 * (1 + math.cos(math.pi * min(step - warmup, decay) / decay))


class Epoch(NamedTuple):
    """One epoch of both runs: steps trained so far, the validation losses, seconds."""

    epoch: int
    steps: int
    jaxbp_loss: float
    torch_loss: float
    jaxbp_s: float
    torch_s: float


class TwinRun(NamedTuple):
    """One seed's comparison: an :class:`Epoch` per epoch trained, and the run's settings."""

    seed: int
    epochs: list
    settings: dict

    @property
    def jaxbp_loss(self) -> float:
        return self.epochs[-1].jaxbp_loss

    @property
    def torch_loss(self) -> float:
        return self.epochs[-1].torch_loss


def _adamw(model: TorchGPT, weight_decay: float):
    import torch

    groups = [
        {
            "params": [w for w, d in zip(model.leaves, model.decays) if d == decay],
            "weight_decay": wd,
        }
        for decay, wd in ((True, weight_decay), (False, 0.0))
    ]
    return torch.optim.AdamW(groups, lr=0.0, betas=(B1, B2), eps=EPS)


def torch_validation(model: TorchGPT, x, t, chunk: int = 32) -> float:
    """Nats per token over every position of ``(x, t)`` whose label is >= 0."""
    import torch

    x, t = np.asarray(x), np.asarray(t)
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(x), chunk):
            end = start + chunk
            total += float(model.loss(x[start:end], t[start:end], reduction="sum"))
    return total / int(np.sum(t >= 0))


def compare(
    seed: int = 0,
    *,
    epochs: int | None = None,
    steps: int | None = None,
    text: str | None = None,
    model=None,
    check: str = "report",
    on_epoch=None,
) -> TwinRun:
    """Train ``model`` (default the gpt preset) on ``text`` (default the reference text) with
    jaxbp and with the PyTorch twin; ``steps`` limits both runs to their first ``steps``."""
    import torch

    if check not in ("off", "report"):
        raise ValueError(f"check must be 'off' or 'report' (every step applied), got {check!r}")
    if steps is not None and steps < 1:
        raise ValueError(f"steps must be a positive integer or None, got {steps!r}")
    session = prepare(
        TrainConfig(dataset="text", model=model, text=text, epochs=epochs, seed=seed, check=check)
    )
    cfg, d = session.cfg, session.data
    assert cfg.epochs is not None and cfg.batch_size is not None  # resolve_config filled them
    if cfg.optimizer != "adam":
        raise ValueError(f"the twin mirrors AdamW: the run's optimizer is {cfg.optimizer!r}")
    torch.set_num_threads(torch_threads())
    twin = TorchGPT(session.ts.params, gpt_heads(session.description))
    opt = _adamw(twin, float(cfg.weight_decay or 0.0))
    per_epoch = session.steps_per_epoch
    total = cfg.epochs * per_epoch
    limit = total if steps is None else min(steps, total)
    cut = jax.jit(jax.vmap(training_compiled.window_batch_fn(d.context), in_axes=(None, 0)))
    settings = {
        "seed": seed,
        "epochs": cfg.epochs,
        "steps_per_epoch": per_epoch,
        "steps": limit,
        "batch_size": cfg.batch_size,
        "context": d.context,
        "lr": cfg.lr,
        "schedule": cfg.schedule,
        "weight_decay": cfg.weight_decay,
        "check": cfg.check,
        "num_params": sum(int(np.size(a)) for a in jax.tree_util.tree_leaves(session.ts.params)),
        "dtype": str(jax.tree_util.tree_leaves(session.ts.params)[0].dtype),
        "torch_threads": torch.get_num_threads(),
    }
    rows: list[Epoch] = []
    done, jaxbp_s, torch_s = 0, 0.0, 0.0
    for epoch in range(cfg.epochs):
        if done >= limit:
            break
        order = training_compiled.epoch_order(
            session.data_key, jnp.asarray(epoch, jnp.int32), d.n_train, cfg.batch_size, True
        )[: limit - done]
        xs, ys = jax.device_get(cut(d.loop_data, order))
        # The run's first step apart, when the loop is one jitted call per step: it compiles
        # jaxbp's step (splitting the order changes nothing but the timing). A fused loop
        # (the gpt preset's) compiles once per epoch length, so its first epoch stays whole
        # and "first step" is that whole first call.
        split = done == 0 and not session.preset.fused
        for part in (order[:1], order[1:]) if split else (order,):
            if not len(part):
                continue
            start = time.perf_counter()
            session.ts, metrics = session.loop(session.ts, d.loop_data, part)
            jax.block_until_ready(session.ts.params)
            jaxbp_s += time.perf_counter() - start
            settings.setdefault("jaxbp_first_step_s", jaxbp_s)
            settings.setdefault("jaxbp_first_call_steps", len(part))
            if not bool(np.all(np.asarray(metrics.applied))):
                raise RuntimeError(f"epoch {epoch + 1}: jaxbp refused a step (non-finite values)")
        start = time.perf_counter()
        for i in range(len(order)):
            for group in opt.param_groups:
                group["lr"] = learning_rate(cfg.schedule, cfg.lr, total, done + i)
            opt.zero_grad(set_to_none=True)
            twin.loss(xs[i], ys[i]).backward()
            opt.step()
            if done + i == 0:
                settings["torch_first_step_s"] = time.perf_counter() - start
        torch_s += time.perf_counter() - start
        done += len(order)
        ts = session.ts
        jaxbp_loss = float(session.evaluate(ts.params, ts.state, d.x_test, d.t_test, d.y_test)[0])
        row = Epoch(
            epoch + 1,
            done,
            jaxbp_loss,
            torch_validation(twin, d.x_test, d.t_test),
            jaxbp_s,
            torch_s,
        )
        rows.append(row)
        if on_epoch is not None:
            on_epoch(row)
    return TwinRun(seed, rows, settings)


def _print_row(row: Epoch) -> None:
    diff = row.torch_loss - row.jaxbp_loss
    print(
        f"{row.epoch:6d} {row.steps:6d} {row.jaxbp_loss:10.4f} {row.torch_loss:10.4f} "
        f"{diff:+9.4f} {row.jaxbp_s:9.1f} {row.torch_s:9.1f}",
        flush=True,
    )


def _spread(values, spec: str = ".4f") -> str:
    if len(values) < 2:
        return format(values[0], spec)
    mean, sd = statistics.mean(values), statistics.stdev(values)
    return f"{format(mean, spec)} +- {format(sd, spec)} (sd)"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpt_twin", description=__doc__)
    parser.add_argument(
        "--epochs", type=positive_int, metavar="N", help="default: the preset's (10)"
    )
    parser.add_argument(
        "--steps", type=positive_int, metavar="N", help="stop both runs after N steps"
    )
    parser.add_argument("--seeds", type=seed_type, nargs="+", default=[0], metavar="S")
    parser.add_argument("--text", metavar="FILE", help="default: the reference text")
    parser.add_argument(
        "--model", metavar="FILE", help="a GPT model file, as jaxbp train's (default: gpt)"
    )
    parser.add_argument("--check", choices=("report", "off"), default="report")
    args = parser.parse_args(argv)
    import torch

    runs = []
    for seed in args.seeds:
        print(f"seed {seed}", flush=True)
        print(
            f"{'epoch':>6} {'steps':>6} {'jaxbp val':>10} {'torch val':>10} {'diff':>9} "
            f"{'jaxbp s':>9} {'torch s':>9}",
            flush=True,
        )
        run = compare(
            seed,
            epochs=args.epochs,
            steps=args.steps,
            text=args.text,
            model=args.model,
            check=args.check,
            on_epoch=_print_row,
        )
        runs.append(run)
    s = runs[0].settings
    print(
        f"GPT {s['num_params']:,} params ({s['dtype']}), {s['steps']} of "
        f"{s['epochs'] * s['steps_per_epoch']} steps ({s['epochs']} epochs x "
        f"{s['steps_per_epoch']}), batch {s['batch_size']} x {s['context']}, AdamW lr {s['lr']:g} "
        f"{s['schedule']}, weight decay {s['weight_decay']:g}; jaxbp check={s['check']}; "
        f"torch {torch.__version__}, "
        f"{s['torch_threads']} threads"
    )
    print(
        "validation loss (nats per character) over seeds: jaxbp "
        f"{_spread([r.jaxbp_loss for r in runs])}, PyTorch {_spread([r.torch_loss for r in runs])}"
        f"; PyTorch - jaxbp {_spread([r.torch_loss - r.jaxbp_loss for r in runs])}"
    )
    print(
        "training wall time (s): jaxbp "
        f"{_spread([r.epochs[-1].jaxbp_s for r in runs], '.1f')} (first call, compiling: "
        f"{_spread([r.settings['jaxbp_first_step_s'] for r in runs], '.1f')}), PyTorch "
        f"{_spread([r.epochs[-1].torch_s for r in runs], '.1f')}"
    )
    if all(r.epochs[-1].steps > r.settings["jaxbp_first_call_steps"] for r in runs):
        print(
            "seconds per step after the first: jaxbp "
            f"{_spread([_steady(r, 'jaxbp') for r in runs], '.3f')}, PyTorch "
            f"{_spread([_steady(r, 'torch') for r in runs], '.3f')}"
        )
    return 0


def _steady(run: TwinRun, side: str) -> float:
    last = run.epochs[-1]
    seconds = last.jaxbp_s if side == "jaxbp" else last.torch_s
    first = run.settings["jaxbp_first_call_steps"] if side == "jaxbp" else 1
    return (seconds - run.settings[f"{side}_first_step_s"]) / (last.steps - first)


if __name__ == "__main__":
    sys.exit(main())
