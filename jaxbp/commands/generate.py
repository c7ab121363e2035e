"""``jaxbp generate``: print a sample from a character-level model trained with
``jaxbp train --dataset text``.

::

    jaxbp generate --checkpoint runs/text --prompt "The for statement" --length 300

The checkpoint's header holds the model description and the vocabulary (written by the
trainer for text runs), so the network and the characters come from the checkpoint alone.
Each character is drawn from ``softmax(logits / temperature)`` with ``jax.random``
(``--temperature 0``: always the most likely character); ``--seed`` makes it repeatable.

Exit codes: 0 done; 2 a bad flag, a missing or unusable checkpoint, a checkpoint that is not a
text model, or a prompt with characters outside the model's vocabulary (one line, nothing
printed to stdout).
"""

from __future__ import annotations

import argparse

from . import args as types

__all__ = ["add_arguments", "load_text_model", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint",
        required=True,
        metavar="DIR",
        help="a run folder of jaxbp train --dataset text (or its checkpoint.npz)",
    )
    parser.add_argument(
        "--prompt", default=None, metavar="TEXT", help="text to continue (default: a newline)"
    )
    parser.add_argument(
        "--length",
        type=types.positive_int,
        default=500,
        metavar="N",
        help="characters to generate (default 500)",
    )
    parser.add_argument(
        "--temperature",
        type=types.nonnegative_number,
        default=1.0,
        metavar="T",
        help="softmax temperature; 0 takes the most likely character (default 1)",
    )
    parser.add_argument(
        "--seed", type=types.seed, default=0, metavar="N", help="sampling seed (default 0)"
    )
    types.add_import_argument(parser)


def _checkpoint_file(path: str):
    from pathlib import Path

    from ..training import CHECKPOINT_FILE

    p = Path(path)
    p = p / CHECKPOINT_FILE if p.is_dir() else p
    if not p.is_file():
        raise ValueError(
            f"no checkpoint at {str(p)!r}; expected a run folder of jaxbp train "
            f"--dataset text (holding {CHECKPOINT_FILE}) or the file itself"
        )
    return p


def load_text_model(path: str, modules=()):
    """``(net, params, vocabulary, context)`` of the text model checkpointed at ``path`` (a
    run folder or its checkpoint file); ``ValueError`` if it is not a text model. The
    network's references to code resolve only inside ``modules`` (``--import``)."""
    import jax

    from ..checkpoint import load_checkpoint
    from ..model import build
    from ..text import check_vocabulary

    file = _checkpoint_file(path)
    ckpt = load_checkpoint(file)
    text = ckpt.header.get("text")
    if not isinstance(text, dict) or "vocabulary" not in text:
        raise ValueError(
            f"checkpoint {file} is not a text model (it was trained on dataset "
            f"{ckpt.header.get('dataset')!r}); jaxbp generate needs a checkpoint "
            f"of jaxbp train --dataset text"
        )
    vocabulary = check_vocabulary(text["vocabulary"], f"checkpoint {file}: the vocabulary")
    context = int(text["context"])
    net = build(ckpt.header["network"], modules=modules)
    _, template = net.init(jax.random.key(0), (1, context))
    return net, _params_like(template, ckpt.state.get("params", {}), file), vocabulary, context


def _params_like(template, stored: dict, file):
    import jax
    import jax.numpy as jnp

    tu = jax.tree_util
    leaves, treedef = tu.tree_flatten_with_path(template)
    out = []
    for path, leaf in leaves:
        name = tu.keystr(path)
        if name not in stored or tuple(stored[name].shape) != tuple(leaf.shape):
            raise ValueError(
                f"checkpoint {file}: params leaf {name} is missing or not of "
                f"shape {tuple(leaf.shape)}"
            )
        out.append(jnp.asarray(stored[name], leaf.dtype))
    return tu.tree_unflatten(treedef, out)


def run(args) -> int:
    import jax

    from ..text import decode, encode, sample

    net, params, vocabulary, context = load_text_model(args.checkpoint, args.imports)
    prompt = (
        args.prompt if args.prompt is not None else ("\n" if "\n" in vocabulary else vocabulary[0])
    )
    if not prompt:
        raise ValueError("--prompt is empty; give at least one character (or leave it out)")
    ids = encode(prompt, vocabulary, what="--prompt")
    out = sample(
        net,
        params,
        ids,
        args.length,
        context=context,
        temperature=args.temperature,
        key=jax.random.key(args.seed),
    )
    print(prompt + decode(out, vocabulary))
    return 0
