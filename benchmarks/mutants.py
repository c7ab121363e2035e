"""``python -m benchmarks.mutants``: plant one bug at a time in jaxbp's backward passes and count
which check catches it (``make mutants``, before a release; minutes, not part of ``make test``).

A gradient checker is worth what it catches. This enumerates single-point mutations (an
operator swapped, a minus dropped, a transpose removed, a constant changed, an axis or
``keepdims`` dropped, a comparison loosened, ``sum`` for ``mean``) in every backward function
of jaxbp's layer modules (nested scan bodies included) and in every loss gradient, applies each
one in memory (the module's source is parsed with :mod:`ast`, mutated, compiled, and the
enclosing top-level function's ``__code__`` replaced; nothing is written to disk), and runs the
checks that execute the mutated line:

- ``step``: the checked train step's comparison, as :func:`jaxbp.backprop_and_autodiff` and
  :func:`jaxbp.compare_grads` make it: manual vs ``jax.grad`` for the parameters and the
  input gradient, over two SGD steps from the initial parameters (so the parameters move off
  their initial values), then one step with frozen statistics (``train=False``) for a layer
  with state;
- ``check_layer``: :func:`jaxbp.check_layer` (random parameters and running state; also
  ``train=False`` for a layer with state).

Which (case, check) pairs execute which source lines is measured once, on the unmutated code
(``sys.settrace``); that baseline must pass every check, or nothing is run. A mutant is then
killed by a mismatch (the check reported it), killed by a crash (the check raised), or it
survived; a check that executes no line of the mutation has nothing to say (``-``). Survivors
are either equivalent mutants, listed with the reason in ``benchmarks/mutants_allowlist.py``,
or blind spots of the checks, and the exit code is 1 while any blind spot remains.

The per-layer probe of the train step (``make_train_step(..., probe=k)``) gets its own column
once that parameter exists: one more entry of :data:`CHECKS`.

Options: ``--files layers conv ...`` (modules of ``jaxbp``), ``--match TEXT`` (mutations
whose text contains it), ``--limit N`` with ``--seed S`` (a random sample), ``--workers W``
(processes; 0 runs in this process), ``--list`` (print the mutants, run nothing).
"""

from __future__ import annotations

import argparse
import ast
import concurrent.futures
import functools
import importlib
import inspect
import multiprocessing
import os
import random
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

FILES = ("layers", "conv", "norm", "recurrent", "attention", "losses")
# Helpers that only backward passes call, though their names do not say so.
BACKWARD_HELPERS = {"conv": ("_window_untap",), "attention": ("_sum_to_last",)}
KILLED_MISMATCH, KILLED_CRASH, SURVIVED, NOT_RUN = "mismatch", "crash", "survived", "-"
BASELINE_FAILURES: list[str] = []  # (problem, check) pairs the real code fails, of the last run
LEARNING_RATE = 0.5
TRAIN_STEPS = 2

# --------------------------------------------------------------------------------------------
# Enumerating mutations
# --------------------------------------------------------------------------------------------

_BINOPS: dict[type, type] = {
    ast.Add: ast.Sub,
    ast.Sub: ast.Add,
    ast.Mult: ast.Div,
    ast.Div: ast.Mult,
    ast.MatMult: ast.Mult,
    ast.Pow: ast.Mult,
}
_COMPARES: dict[type, type] = {
    ast.Gt: ast.GtE,
    ast.GtE: ast.Gt,
    ast.Lt: ast.LtE,
    ast.LtE: ast.Lt,
    ast.Eq: ast.NotEq,
    ast.NotEq: ast.Eq,
    ast.Is: ast.IsNot,
    ast.IsNot: ast.Is,
}
_NAMES = {"sum": "mean", "mean": "sum", "zeros_like": "ones_like", "ones_like": "zeros_like"}
_DROPPED_KEYWORDS = ("axis", "keepdims", "reverse")


class Mutant(NamedTuple):
    """One single-point mutation: where it is and what it does (``text``)."""

    file: str  # module name inside jaxbp: "norm"
    function: str  # "Dense.backward", "_gru_scan_backward"
    position: int  # in the module's enumeration (what a worker applies)
    first_line: int
    last_line: int
    text: str  # "dy * params['scale'] -> dy / params['scale']"

    @property
    def where(self) -> str:
        return f"{self.file}.py:{self.first_line} {self.function}"


def _replacements(node: ast.AST) -> Iterator[ast.AST]:
    """Every single-point mutation of ``node`` itself (not of its children)."""
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        yield ast.BinOp(node.left, _BINOPS[type(node.op)](), node.right)
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        yield node.operand
    elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
        if node.attr == "T":
            yield node.value
        elif node.attr in _NAMES:
            yield ast.Attribute(node.value, _NAMES[node.attr], ast.Load())
    elif isinstance(node, ast.Constant):
        if isinstance(node.value, bool):
            yield ast.Constant(not node.value)
        elif isinstance(node.value, (int, float)):
            yield ast.Constant(node.value + 1)
    elif isinstance(node, ast.Compare) and len(node.ops) == 1 and type(node.ops[0]) in _COMPARES:
        yield ast.Compare(node.left, [_COMPARES[type(node.ops[0])]()], node.comparators)
    elif isinstance(node, ast.Call):
        for i, kw in enumerate(node.keywords):
            if kw.arg in _DROPPED_KEYWORDS:
                yield ast.Call(node.func, node.args, node.keywords[:i] + node.keywords[i + 1 :])


def _children(node: ast.AST) -> Iterator[tuple[ast.AST, str, int | None, ast.AST]]:
    """``(parent, field, index, child)`` for every node below ``node``, depth first, in a
    fixed order (the enumeration must be the same in every process)."""
    for field, value in ast.iter_fields(node):
        if isinstance(value, list):
            for i, item in enumerate(value):
                if isinstance(item, ast.AST):
                    yield node, field, i, item
                    yield from _children(item)
        elif isinstance(value, ast.AST):
            yield node, field, None, value
            yield from _children(value)


def _is_target(file: str, name: str) -> bool:
    if file == "losses":
        return name.endswith("_grad")
    return "backward" in name or name in BACKWARD_HELPERS.get(file, ())


def _targets(tree: ast.Module, file: str) -> Iterator[tuple[str, str, ast.FunctionDef]]:
    """``(top-level function name, qualified name, node)`` of every target function; a target
    nested in a target (a scan body) is mutated as part of the outer one."""

    def walk(node, top, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef):
                name = f"{prefix}{child.name}"
                if _is_target(file, child.name):
                    yield top or child.name, name, child
                else:
                    yield from walk(child, top or child.name, name + ".")
            elif not isinstance(child, ast.ClassDef):
                yield from walk(child, top, prefix)

    yield from walk(tree, None, "")


def _docstring(function: ast.FunctionDef) -> ast.AST | None:
    first = function.body[0]
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
        return first
    return None


def _module_sites(tree: ast.Module, file: str):
    """Every mutation site of the module: ``(top, function, parent, field, index, node, new)``."""
    for top, function, node in _targets(tree, file):
        skip = _docstring(node)
        for parent, field, index, child in _children(node):
            if child is skip or (parent is node and field in ("args", "returns", "decorator_list")):
                continue
            for new in _replacements(child):
                yield top, function, parent, field, index, child, new


@functools.cache
def _source(file: str) -> tuple[str, str]:
    """``(path, text)`` of ``jaxbp/<file>.py``, read once per process, as it was imported."""
    module = importlib.import_module(f"jaxbp.{file}")
    path = module.__file__
    assert path is not None
    return path, Path(path).read_text()


def _mutation_text(node: ast.AST, new: ast.AST) -> str:
    return f"{ast.unparse(node)} -> {ast.unparse(ast.fix_missing_locations(new))}"


def enumerate_mutants(files=FILES) -> list[Mutant]:
    """Every mutant of the backward functions of ``files``, in a fixed order."""
    mutants = []
    for file in files:
        _, text = _source(file)
        tree = ast.parse(text)
        for i, (_, function, _, _, _, node, new) in enumerate(_module_sites(tree, file)):
            last = node.end_lineno or node.lineno
            text = _mutation_text(node, new)
            mutants.append(Mutant(file, function, i, node.lineno, last, text))
    return mutants


class applied:
    """``with applied(mutant):`` the mutated function in place of the real one, in this
    process (the enclosing top-level function's ``__code__`` swapped; restored on exit)."""

    def __init__(self, mutant: Mutant):
        self.mutant = mutant

    def __enter__(self):
        path, text = _source(self.mutant.file)
        tree = ast.parse(text)
        sites = list(_module_sites(tree, self.mutant.file))
        top, _, parent, field, index, node, new = sites[self.mutant.position]
        if _mutation_text(node, new) != self.mutant.text:  # not the source it was found in
            raise RuntimeError(
                f"jaxbp/{self.mutant.file}.py changed while the mutants ran; run them again"
            )
        if index is None:
            setattr(parent, field, new)
        else:
            getattr(parent, field)[index] = new
        code = compile(ast.fix_missing_locations(tree), path, "exec")
        module = importlib.import_module(f"jaxbp.{self.mutant.file}")
        self.function = getattr(module, top)
        self.original = self.function.__code__
        (new_code,) = [
            c for c in code.co_consts if getattr(c, "co_name", None) == top and c.co_filename
        ]
        self.function.__code__ = new_code
        return self

    def __exit__(self, *exc):
        self.function.__code__ = self.original
        return False


# --------------------------------------------------------------------------------------------
# The problems: each layer and loss, tiny, float64; built after a mutation is in place
# --------------------------------------------------------------------------------------------


class Case(NamedTuple):
    """A layer (built by ``build()``, after the mutation), its input shape and the loss of the
    step check; ``ids`` > 0: the inputs are token ids below it; ``target``: how ``y`` is drawn
    (``"normal"``, ``"labels"``, ``"soft"`` (positive, rows not summing to 1), ``"unit"``);
    ``single``: the input is one example without a batch axis."""

    name: str
    build: Callable[[], Any]
    shape: tuple
    loss: str = "mse"
    ids: int = 0
    target: str = "normal"
    single: bool = False  # one example, no batch axis: the real train step needs a batch


def _activation(name: str):
    import jax
    import jax.numpy as jnp

    from jaxbp import layers as L

    fns = {
        "Sigmoid": (jax.nn.sigmoid, L._sigmoid_backward, True),
        "Tanh": (jnp.tanh, L._tanh_backward, True),
        "Relu": (L._relu, L._relu_backward, False),
        "Gelu": (L._gelu, L._gelu_backward, False),
        "Softplus": (lambda x: jnp.logaddexp(x, 0), L._softplus_backward, False),
        "Identity": (lambda x: x, L._identity_backward, False),
    }
    fn, backward, cache_output = fns[name]
    # Built anew, not the module's ready-made Tanh: that one's closure predates the mutation.
    return L.elementwise(name, fn, backward, cache_output=cache_output)


def _activation_case(name: str) -> Case:
    return Case(name, lambda: _activation(name), (3, 3))


def cases() -> list[Case]:
    import jaxbp as J

    # Square shapes where the layer allows: a transpose dropped then computes wrong numbers
    # (a mismatch) instead of failing on a shape.
    dense = [
        Case("Dense", lambda: J.Dense(3), (3, 3)),
        Case("Dense shared bias", lambda: J.Dense(3, shared_bias=True), (3, 3)),
        Case("LeakyRelu", lambda: J.LeakyRelu(0.1), (3, 3)),
        *(
            _activation_case(name)
            for name in ("Sigmoid", "Tanh", "Relu", "Gelu", "Softplus", "Identity")
        ),
        Case("serial", lambda: J.serial(J.Dense(3), _activation("Tanh"), J.Dense(3)), (3, 3)),
        Case("residual", lambda: J.residual(J.Dense(3), _activation("Tanh")), (3, 3)),
        Case("concat", lambda: J.concat(J.Dense(2), J.Dense(1)), (3, 3)),
    ]
    losses = [
        Case("half_sse", lambda: J.Dense(3), (3, 3), "half_sse"),
        Case("mse loss", lambda: J.Dense(3), (3, 3), "mse"),
        Case("softmax CE labels", lambda: J.Dense(3), (3, 3), "softmax_cross_entropy", 0, "labels"),
        Case("softmax CE soft", lambda: J.Dense(3), (3, 3), "softmax_cross_entropy", 0, "soft"),
        Case("sigmoid BCE", lambda: J.Dense(3), (3, 3), "sigmoid_binary_cross_entropy", 0, "unit"),
    ]
    conv = [
        Case("Conv1D stride SAME", lambda: J.Conv1D(2, 3, stride=2, padding="SAME"), (2, 7, 2)),
        Case("Conv1D dilated", lambda: J.Conv1D(2, 2, dilation=2, padding=(1, 0)), (2, 6, 2)),
        Case("Conv1D example", lambda: J.Conv1D(2, 2), (5, 2), single=True),
        Case("Conv2D", lambda: J.Conv2D(2, (2, 2), stride=(2, 1), padding=1), (2, 5, 4, 2)),
        Case("MaxPool1D overlapping", lambda: J.MaxPool1D(2, 1), (2, 5, 2)),
        Case("MaxPool1D example", lambda: J.MaxPool1D(2), (4, 2), single=True),
        Case("MaxPool2D", lambda: J.MaxPool2D(2), (2, 4, 4, 2)),
        Case("AvgPool1D", lambda: J.AvgPool1D(3, 2), (2, 7, 2)),
        Case("AvgPool2D", lambda: J.AvgPool2D((2, 1)), (2, 4, 3, 2)),
        Case("GlobalAvgPool", lambda: J.GlobalAvgPool(), (2, 4, 3)),
        Case(
            "GlobalAvgPool example",
            lambda: J.GlobalAvgPool(spatial_dims=1),
            (4, 3),
            single=True,
        ),
        Case("Flatten", lambda: J.Flatten(), (2, 3, 2)),
    ]
    norm = [
        Case("BatchNorm", lambda: J.BatchNorm(), (4, 3)),
        Case("BatchNorm 3-d", lambda: J.BatchNorm(), (2, 3, 3)),
        Case("Dropout", lambda: J.Dropout(0.5), (4, 3)),
    ]
    recurrent = [
        Case("GRU", lambda: J.GRU(3), (2, 4, 3)),
        Case("GRU last reverse", lambda: J.GRU(3, return_sequences=False, reverse=True), (2, 4, 3)),
        Case("GRU example", lambda: J.GRU(3), (4, 3), single=True),
        Case("LSTM", lambda: J.LSTM(3), (2, 4, 3)),
        Case("LSTM last", lambda: J.LSTM(3, return_sequences=False), (2, 4, 3)),
        Case("LSTM example reverse", lambda: J.LSTM(3, reverse=True), (4, 3), single=True),
        Case("bidirectional GRU", lambda: J.bidirectional(J.GRU(2)), (2, 4, 3)),
        Case(
            "bidirectional LSTM last",
            lambda: J.bidirectional(J.LSTM(2, return_sequences=False)),
            (2, 4, 3),
        ),
    ]
    attention = [
        Case("Embedding", lambda: J.Embedding(5, 3), (2, 4), ids=5),
        Case("PositionalEmbedding", lambda: J.PositionalEmbedding(6, 4), (2, 4, 4)),
        Case("LayerNorm", lambda: J.LayerNorm(), (2, 3, 4)),
        Case("MultiHeadAttention", lambda: J.MultiHeadAttention(2), (2, 4, 4)),
        Case("MultiHeadAttention causal", lambda: J.MultiHeadAttention(2, causal=True), (2, 4, 4)),
        Case("MultiHeadAttention example", lambda: J.MultiHeadAttention(2), (4, 4), single=True),
        Case(
            "MultiHeadAttention GQA RoPE",
            lambda: J.MultiHeadAttention(2, num_kv_heads=1, rope=True),
            (2, 4, 4),
        ),
        Case(
            "MultiHeadAttention flash causal",
            lambda: J.MultiHeadAttention(2, causal=True, block_size=2),
            (2, 4, 4),
        ),
        Case(
            "MultiHeadAttention flash no bias",
            lambda: J.MultiHeadAttention(2, bias=False, block_size=2),
            (4, 4),
            single=True,
        ),
    ]
    return dense + losses + conv + norm + recurrent + attention


# --------------------------------------------------------------------------------------------
# The checks: each returns True (agreement) or False (a mismatch); an exception is a crash
# --------------------------------------------------------------------------------------------


def _inputs(case: Case, key):
    import jax
    import jax.numpy as jnp

    if case.ids:
        return jax.random.randint(key, case.shape, 0, case.ids)
    return jax.random.normal(key, case.shape, jnp.float64)


def _targets_for(case: Case, out_shape, key):
    import jax
    import jax.numpy as jnp

    if case.target == "labels":
        return jax.random.randint(key, out_shape[:-1], 0, out_shape[-1])
    if case.target == "soft":
        return jax.random.uniform(key, out_shape, jnp.float64, 0.1, 1.0)
    if case.target == "unit":
        return jax.random.uniform(key, out_shape, jnp.float64)
    return jax.random.normal(key, out_shape, jnp.float64)


def step_check(case: Case, key) -> bool:
    """The checked step's comparison (parameters and input gradient) over ``TRAIN_STEPS`` SGD
    steps from the initial parameters, then one with frozen statistics (a layer with state)."""
    import jax

    import jaxbp

    layer = case.build()
    k_init, k_x, k_y, k_step = jax.random.split(key, 4)
    out_shape, params = layer.init(k_init, case.shape)
    x = _inputs(case, k_x)
    y = _targets_for(case, out_shape, k_y)
    state = jaxbp.init_state(layer, case.shape)
    wrt_inputs = not case.ids
    modes = [True] * TRAIN_STEPS + ([False] if layer.has_state else [])
    for i, train in enumerate(modes):
        _, manual, auto, new_state = jaxbp.backprop_and_autodiff(
            layer,
            case.loss,
            params,
            x,
            y,
            state=state,
            key=jax.random.fold_in(k_step, i),
            train=train,
            # The step checks its inputs once, before it traces; this one is a single example
            # at times, which check_params would read as a batch.
            validate=False,
            wrt_inputs=wrt_inputs,
        )
        if wrt_inputs:
            report = jaxbp.compare_grads(manual[0], auto[0], inputs=(manual[1], auto[1]))
        else:
            report = jaxbp.compare_grads(manual, auto)
        if not bool(report.ok):
            return False
        reference = auto[0] if wrt_inputs else auto
        params = jax.tree_util.tree_map(lambda p, g: p - LEARNING_RATE * g, params, reference)
        state = new_state
    return True


def layer_check(case: Case, key) -> bool:
    """:func:`jaxbp.check_layer`, and with ``train=False`` too for a layer with state."""
    import jaxbp

    layer = case.build()
    x = _inputs(case, key) if case.ids else None
    for train in (True, False) if layer.has_state else (True,):
        if not bool(jaxbp.check_layer(layer, key, case.shape, x=x, train=train).ok):
            return False
    return True


def probe_check(case: Case, key) -> bool | None:
    """The real train step with the per-layer probe, ``probe=1``, for ``3 N`` steps (``N``
    nodes: each is probed at least 3 times); a mismatch counts only on a step without the full
    comparison (step 0 runs it), so this column is the probe's alone. ``None`` for a single
    example (the step takes batches). A layer without parameters trains behind a Dense (the
    step needs something to update)."""
    import jax

    import jaxbp
    from jaxbp.probe import nodes

    if case.single:
        return None
    layer = case.build()
    k_init, k_x, k_y, k_step = jax.random.split(key, 4)
    out_shape, params = layer.init(k_init, case.shape)
    if not jax.tree_util.tree_leaves(params):
        layer = jaxbp.serial(jaxbp.Dense(case.shape[-1]), layer)
        out_shape, params = layer.init(k_init, case.shape)
    x, y = _inputs(case, k_x), _targets_for(case, out_shape, k_y)
    optimizer = jaxbp.sgd(LEARNING_RATE)
    steps = 3 * len(nodes(layer))
    step = jaxbp.make_train_step(layer, case.loss, optimizer, "report", probe=1)
    ts = jaxbp.init_train_state(
        layer, optimizer, params, input_shape=case.shape, key=k_step, verify=True
    )
    for _ in range(steps):
        ts, metrics = step(ts, x, y)
        # Not ok: a mismatch, or a gradient the step refused as non-finite (a wrong backward
        # that divides by a dropped unit's zero); either way the step reported it.
        if not bool(metrics.ok) and not bool(metrics.full):
            return False
    return True


def _has_probe() -> bool:
    import jaxbp

    return "probe" in inspect.signature(jaxbp.make_train_step).parameters


CHECKS: dict[str, Callable[[Case, Any], bool | None]] = {
    "step": step_check,
    # Only where the train step has the per-layer probe (make_train_step(..., probe=k)).
    **({"probe": probe_check} if _has_probe() else {}),
    "check_layer": layer_check,
}


def run_check(check: str, case: Case, seed: int) -> tuple[str, str]:
    """``(outcome, the exception's first line if it crashed)``."""
    import jax

    key = jax.random.fold_in(jax.random.key(seed), sum(map(ord, case.name)))
    try:
        agreed = CHECKS[check](case, key)
    except Exception as e:
        return KILLED_CRASH, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return (NOT_RUN if agreed is None else SURVIVED if agreed else KILLED_MISMATCH), ""


# --------------------------------------------------------------------------------------------
# The baseline: every check passes on the real code, and which lines each one executes
# --------------------------------------------------------------------------------------------


def trace_case(case_name: str, files, seed: int) -> tuple[list[str], dict]:
    """``(failures, {check: {(file, line), ...}})`` of one problem on the unmutated code: the
    lines of ``files`` each check executes, and the checks that do not pass there."""
    case = next(c for c in cases() if c.name == case_name)
    paths = {_source(f)[0]: f for f in files}
    failures, covered = [], {}
    for check in CHECKS:
        lines: set[tuple[str, int]] = set()

        def local(frame, event, arg, lines=lines):
            if event == "line":
                lines.add((paths[frame.f_code.co_filename], frame.f_lineno))
            return local

        def tracer(frame, event, arg):
            return local if frame.f_code.co_filename in paths else None

        sys.settrace(tracer)
        try:
            outcome, error = run_check(check, case, seed)
        finally:
            sys.settrace(None)
        if outcome not in (SURVIVED, NOT_RUN):
            failures.append(f"{case.name} / {check}: {outcome} {error}")
        covered[check] = lines if outcome == SURVIVED else set()
    return failures, covered


def _pairs_for(mutant: Mutant, covered) -> list[tuple[str, str]]:
    lines = {(mutant.file, n) for n in range(mutant.first_line, mutant.last_line + 1)}
    return [pair for pair, executed in covered.items() if lines & executed]


# --------------------------------------------------------------------------------------------
# Running the mutants
# --------------------------------------------------------------------------------------------


def _setup_jax() -> None:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    jax.config.update("jax_enable_x64", True)


_MAX_MAPPINGS = 20_000  # a third of Linux's vm.max_map_count: each XLA program keeps ~20


def _release_memory_mappings() -> None:
    try:
        with open("/proc/self/maps", "rb") as maps:
            count = maps.read().count(b"\n")
    except OSError:
        return
    if count > _MAX_MAPPINGS:
        import jax

        jax.clear_caches()


def run_mutant(mutant: Mutant, pairs: list[tuple[str, str]], seed: int) -> dict[str, str]:
    """``{check: outcome}`` of one mutant over the (case, check) pairs that reach it: a
    mismatch anywhere beats a crash anywhere beats survival."""
    by_name = {c.name: c for c in cases()}
    outcomes: dict[str, list[str]] = {check: [] for check in CHECKS}
    with applied(mutant):
        for case_name, check in pairs:
            if KILLED_MISMATCH not in outcomes[check]:
                outcomes[check].append(run_check(check, by_name[case_name], seed)[0])
    _release_memory_mappings()
    order = (KILLED_MISMATCH, KILLED_CRASH, SURVIVED)
    return {
        check: next((o for o in order if o in found), NOT_RUN) for check, found in outcomes.items()
    }


def load_allowlist() -> dict[tuple[str, str, str], str]:
    """``{(file, function, mutation text): reason}`` of the mutants shown equivalent
    (``benchmarks/mutants_allowlist.py``)."""
    from .mutants_allowlist import EQUIVALENT

    return {(file, function, text): reason for file, function, text, reason in EQUIVALENT}


class Result(NamedTuple):
    mutant: Mutant
    outcomes: dict[str, str]


def run(
    files=FILES,
    *,
    match: str | None = None,
    limit: int | None = None,
    seed: int = 0,
    workers: int = 2,
    case_names=None,
    log: Callable[[str], None] = lambda _: None,
) -> list[Result]:
    """Enumerate, select and run the mutants; the results in enumeration order.

    ``case_names``: run only these problems (by :class:`Case` name; default all)."""
    mutants = enumerate_mutants(files)
    if match:
        mutants = [m for m in mutants if match in m.text]
    if limit is not None and limit < len(mutants):
        mutants = sorted(random.Random(seed).sample(mutants, limit), key=lambda m: m[:3])
    names = [c.name for c in cases() if case_names is None or c.name in case_names]
    if workers == 0:
        return _run_all(mutants, names, files, seed, log, lambda fn, *a: _Done(fn(*a)))
    context = multiprocessing.get_context("spawn")  # a forked JAX runtime is not safe
    with concurrent.futures.ProcessPoolExecutor(
        workers, mp_context=context, initializer=_setup_jax
    ) as pool:
        return _run_all(mutants, names, files, seed, log, pool.submit)


class _Done(NamedTuple):
    """A finished "future", for running without a process pool."""

    value: Any

    def result(self):
        return self.value


def _run_all(mutants, names, files, seed, log, submit) -> list[Result]:
    """The baseline (every problem's checks pass on the real code, and the lines each one
    executes), then every mutant against the (problem, check) pairs that execute its lines."""
    start = time.perf_counter()
    covered, failures = {}, []
    for name, future in [(n, submit(trace_case, n, files, seed)) for n in names]:
        failed, lines = future.result()
        failures += failed
        covered.update({(name, check): found for check, found in lines.items()})
    for failure in failures:
        # That pair executes nothing below: it cannot tell a mutant from the real code.
        log(f"BASELINE FAILS, left out: {failure}")
    BASELINE_FAILURES[:] = failures
    took = time.perf_counter() - start
    log(f"baseline: {len(covered)} (problem, check) pairs pass ({took:.0f} s)")
    jobs = [(m, _pairs_for(m, covered)) for m in mutants]
    futures = [submit(run_mutant, m, pairs, seed) for m, pairs in jobs]
    results = []
    for i, ((m, _), future) in enumerate(zip(jobs, futures), 1):
        results.append(Result(m, future.result()))
        log(f"[{i}/{len(jobs)}] {m.where}: {_short(m.text, 60)} {results[-1].outcomes}")
    return results


# --------------------------------------------------------------------------------------------
# The kill table
# --------------------------------------------------------------------------------------------


def kill_table(results: list[Result], allowed: dict) -> str:
    """Per file and check: killed by a mismatch / by a crash / survived (equivalent ones
    apart) / not reached by that check; then every survivor, allowed or not."""
    columns = list(CHECKS)
    head = f"{'file':<14}{'mutants':>8}{'equiv.':>7}" + "".join(
        f"  {c + ': mism/crash/surv/-':>32}" for c in columns
    )
    rows = [head, "-" * len(head)]
    files = sorted({r.mutant.file for r in results}, key=lambda f: (FILES + (f,)).index(f))
    totals = {"all": [r for r in results]}
    for file in [*files, "all"]:
        mine = totals["all"] if file == "all" else [r for r in results if r.mutant.file == file]
        equivalent = [r for r in mine if _key(r.mutant) in allowed]
        counted = [r for r in mine if _key(r.mutant) not in allowed]
        cells = []
        for c in columns:
            n = {
                o: sum(r.outcomes[c] == o for r in counted)
                for o in (KILLED_MISMATCH, KILLED_CRASH, SURVIVED, NOT_RUN)
            }
            cells.append(
                f"{n[KILLED_MISMATCH]:>8}/{n[KILLED_CRASH]}/{n[SURVIVED]}/{n[NOT_RUN]}".rjust(32)
            )
        label = f"{file}.py" if file != "all" else "all"
        rows.append(
            f"{label:<14}{len(mine):>8}{len(equivalent):>7}" + "".join(f"  {c}" for c in cells)
        )
    lines = ["\n".join(rows)]
    for title, keep in (
        ("survivors (blind spots)", lambda r: _key(r.mutant) not in allowed),
        ("equivalent (allow-list)", lambda r: _key(r.mutant) in allowed),
    ):
        found = [r for r in results if _survived(r) and keep(r)]
        lines.append(f"\n{title}: {len(found)}")
        for r in found:
            reason = allowed.get(_key(r.mutant), "")
            lines.append(f"  {r.mutant.where}: {_short(r.mutant.text)}  {r.outcomes}")
            if reason:
                lines.append(f"      {reason}")
    unreached = [r for r in results if all(o == NOT_RUN for o in r.outcomes.values())]
    lines.append(f"\nreached by no check (a case is missing): {len(unreached)}")
    lines += [f"  {r.mutant.where}: {_short(r.mutant.text)}" for r in unreached]
    return "\n".join(lines)


def _key(m: Mutant) -> tuple[str, str, str]:
    return (f"{m.file}.py", m.function, m.text)


def _survived(r: Result) -> bool:
    return any(o == SURVIVED for o in r.outcomes.values())


def _short(text: str, width: int = 110) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def blind_spots(results: list[Result], allowed: dict) -> list[Result]:
    """The survivors that are not shown equivalent, and the mutants no check reaches."""
    return [
        r
        for r in results
        if _key(r.mutant) not in allowed
        and (_survived(r) or all(o == NOT_RUN for o in r.outcomes.values()))
    ]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.mutants", description=__doc__)
    parser.add_argument("--files", nargs="+", choices=FILES, default=list(FILES))
    parser.add_argument("--match", help="only mutations whose text contains this")
    parser.add_argument("--limit", type=int, help="a random sample of this many mutants")
    parser.add_argument("--seed", type=int, default=0, help="the sample's and the checks' seed")
    parser.add_argument("--workers", type=int, default=2, help="processes (0: this one)")
    parser.add_argument("--cases", nargs="+", help="only these problems (Case names)")
    parser.add_argument("--list", action="store_true", help="print the mutants, run nothing")
    parser.add_argument("--verbose", action="store_true", help="one line per mutant")
    args = parser.parse_args(argv)
    if args.list:
        for m in enumerate_mutants(args.files):
            print(f"{m.where}: {m.text}")
        return 0
    _setup_jax()
    start = time.perf_counter()
    allowed = load_allowlist()
    results = run(
        args.files,
        match=args.match,
        limit=args.limit,
        seed=args.seed,
        workers=args.workers,
        case_names=None if args.cases is None else set(args.cases),
        log=(lambda line: print(line, flush=True)) if args.verbose else lambda _: None,
    )
    print(kill_table(results, allowed))
    for failure in BASELINE_FAILURES:
        print(f"the real code fails (left out): {failure}")
    print(f"\n{len(results)} mutants in {time.perf_counter() - start:.0f} s")
    return 1 if blind_spots(results, allowed) or BASELINE_FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
