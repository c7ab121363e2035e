"""Checkpoints: atomic, self-describing, validated on load.

Format
======

A checkpoint is one uncompressed NumPy ``.npz`` file (``np.load`` opens it; nothing else is
needed to read it):

- ``header``: a 0-d array holding a UTF-8 JSON document: the format name and version, the
  network description (:func:`jaxbp.describe`), whatever the caller adds (the training config,
  step, epoch, metrics history, ...), one entry per stored leaf (``group``, ``path``, ``shape``,
  ``dtype``) and ``sha256``.
- ``leaf_00000``, ``leaf_00001``, ...: the array leaves of the stored pytrees, in header order.

``sha256`` is the digest of the header's JSON (written with ``sha256`` left out, sorted keys)
followed by every leaf's shape, dtype and raw bytes, so any flipped bit or missing byte is
caught on load, whether in the header or in an array.

Writes are atomic: the file is written to a temporary file in the same directory, flushed and
``fsync``-ed, then moved over the old checkpoint with ``os.replace`` (and the directory is
``fsync``-ed), so a reader, or a process killed at any moment, sees either the old checkpoint or
the new one, never a mix.

On load, :func:`load_checkpoint` checks the checksum, and, when given templates (``like``) and
the expected network description, that the checkpoint was written for the same network: every
problem is a :class:`CheckpointError` (a ``ValueError``) naming the file and what is wrong.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from .errors import ArgumentError

__all__ = [
    "CheckpointError",
    "Checkpoint",
    "FORMAT",
    "VERSION",
    "atomic_write",
    "write_json",
    "save_checkpoint",
    "load_checkpoint",
    "read_header",
    "train_state_groups",
    "restore_train_state",
]

FORMAT = "jaxbp-checkpoint"
VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, truncated, corrupted or for another network."""


class Checkpoint(NamedTuple):
    """A loaded checkpoint: ``state`` maps each group name to its pytree; ``header`` is the JSON
    header (format, network, the caller's metadata, leaves, sha256)."""

    state: dict
    header: dict


def _tree_util():
    # JAX is imported lazily: reading a header (e.g. to inspect a run) needs only NumPy.
    import jax

    return jax.tree_util


def _flatten(state: Mapping[str, Any]):
    tu = _tree_util()
    entries, arrays = [], []
    for group in state:
        for path, leaf in tu.tree_flatten_with_path(state[group])[0]:
            arr = np.asarray(leaf)
            if arr.dtype == object:
                raise ArgumentError(
                    f"checkpoint: leaf {group}{tu.keystr(path)} is not an array "
                    f"(got {type(leaf).__name__})"
                )
            entries.append(
                {
                    "group": group,
                    "path": tu.keystr(path),
                    "shape": list(arr.shape),
                    "dtype": arr.dtype.str,
                }
            )
            arrays.append(np.asarray(arr, order="C"))  # (ascontiguousarray makes 0-d 1-d)
    return entries, arrays


def _digest(header: dict, arrays) -> str:
    h = hashlib.sha256()
    body = {k: v for k, v in header.items() if k != "sha256"}
    h.update(json.dumps(body, sort_keys=True, allow_nan=True).encode())
    for arr in arrays:
        h.update(f"{arr.shape}|{arr.dtype.str}|".encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def save_checkpoint(
    path, state: Mapping[str, Any], header: Mapping[str, Any] | None = None
) -> Path:
    """Write ``state`` (group name -> pytree of arrays) and ``header`` to ``path``, atomically.

    ``header`` is any JSON-serialisable mapping (conventionally with a ``"network"`` entry,
    ``jaxbp.describe(net)``); the keys ``format``, ``version``, ``leaves`` and ``sha256`` are
    filled in here. Returns the path written.
    """
    path = Path(path)
    entries, arrays = _flatten(state)
    full = dict(header or {})
    full.update(format=FORMAT, version=VERSION, leaves=entries)
    full["sha256"] = _digest(full, arrays)
    text = json.dumps(full, sort_keys=True, allow_nan=True)
    # Any: numpy's stub types **kwds of savez like its own allow_pickle flag.
    members: dict[str, Any] = {"header": np.array(text)}
    members.update({f"leaf_{i:05d}": a for i, a in enumerate(arrays)})
    # A file object: savez adds no ".npz".
    return atomic_write(path, lambda f: np.savez(f, **members))


def _umask() -> int:
    # The process's umask can only be read by setting it; set it straight back.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path, write: Callable[[Any], None], *, text: bool = False) -> Path:
    """Write a file atomically: ``write(f)`` fills a temporary file in the same folder, which
    is flushed, ``fsync``-ed and moved over ``path`` (``os.replace``); the folder is then
    ``fsync``-ed. A reader, or a process killed at any moment, sees the old file or the new
    one, never a mix. The one writer of jaxbp's files (checkpoints, metrics, cached data)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp: str | None = tmp_name  # None once it has been moved over path
    try:
        # mkstemp makes the file 0600; give it the mode any other new file gets (0644 under
        # the usual umask), as the PNGs beside it have.
        if hasattr(os, "fchmod"):  # POSIX only
            os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "w", encoding="utf-8") if text else os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
        tmp = None
        _fsync_dir(path.parent)
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
    return path


def write_json(path, obj, *, indent: int | None = 2, allow_nan: bool = False) -> Path:
    """``obj`` as JSON, written with :func:`atomic_write` (strict JSON, no NaN, unless
    ``allow_nan``)."""

    def write(f):
        json.dump(obj, f, indent=indent, allow_nan=allow_nan)
        f.write("\n")

    return atomic_write(path, write, text=True)


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; not possible on every platform (e.g. Windows).
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _read(path: Path):
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        with np.load(path, allow_pickle=False) as f:
            names = set(f.files)
            if "header" not in names:
                raise CheckpointError(f"checkpoint {path} has no header: not a jaxbp checkpoint")
            header = json.loads(str(f["header"][()]))
            if not isinstance(header, dict) or header.get("format") != FORMAT:
                found = header.get("format") if isinstance(header, dict) else None
                raise CheckpointError(f"{path} is not a jaxbp checkpoint (format {found!r})")
            if header.get("version") != VERSION:
                raise CheckpointError(
                    f"checkpoint {path} has format version "
                    f"{header.get('version')!r}; this jaxbp reads version "
                    f"{VERSION}"
                )
            leaves = header.get("leaves", [])
            arrays = []
            for i in range(len(leaves)):
                name = f"leaf_{i:05d}"
                if name not in names:
                    raise CheckpointError(
                        f"checkpoint {path} is incomplete: array {name} "
                        f"({leaves[i].get('path')}) is missing"
                    )
                arrays.append(f[name])
    except CheckpointError:
        raise
    except (
        zipfile.BadZipFile,
        EOFError,
        ValueError,
        OSError,
        KeyError,
        UnicodeDecodeError,
        json.JSONDecodeError,
    ) as e:
        size = path.stat().st_size if path.exists() else 0
        raise CheckpointError(
            f"checkpoint {path} is truncated or corrupted ({size} bytes; "
            f"{type(e).__name__}: {' '.join(str(e).split()) or 'unreadable'})"
        ) from None
    if header.get("sha256") != _digest(header, arrays):
        raise CheckpointError(
            f"checkpoint {path} is corrupted: its sha256 checksum does not match its contents"
        )
    return header, arrays


def read_header(path) -> dict:
    """The validated header of the checkpoint at ``path`` (checksum included)."""
    return _read(Path(path))[0]


def _network_difference(want, got, where="network") -> str | None:
    """A short description of the first difference between two network descriptions."""
    if isinstance(want, dict) and isinstance(got, dict):
        for key in sorted(set(want) | set(got)):
            if key not in got:
                return f"{where}.{key} is missing from the checkpoint"
            if key not in want:
                return f"{where}.{key} is unexpected"
            diff = _network_difference(want[key], got[key], f"{where}.{key}")
            if diff:
                return diff
        return None
    if isinstance(want, list) and isinstance(got, list):
        if len(want) != len(got):
            return f"{where} has {len(got)} entries in the checkpoint, expected {len(want)}"
        for i, (w, g) in enumerate(zip(want, got)):
            diff = _network_difference(w, g, f"{where}[{i}]")
            if diff:
                return diff
        return None
    if want != got:
        return f"{where} is {got!r} in the checkpoint, expected {want!r}"
    return None


def _normalise(value):
    # Tuples and lists both become lists, as they do after a round trip through JSON.
    return json.loads(json.dumps(value))


def load_checkpoint(
    path, like: Mapping[str, Any] | None = None, *, network: dict | None = None
) -> Checkpoint:
    """Read and validate the checkpoint at ``path``.

    Always checks that the file is complete and its checksum matches. With ``network``
    (``jaxbp.describe(net)``), checks the checkpoint was written for that network. With
    ``like`` (group name -> template pytree, e.g. ``{"params": params, "opt_state": state}``,
    arrays or ``jax.ShapeDtypeStruct``), checks every leaf's path, shape and dtype and returns
    the state in the templates' tree structure; without it each group comes back as a dict
    ``leaf path -> array``.
    """
    path = Path(path)
    header, arrays = _read(path)
    if network is not None:
        diff = _network_difference(_normalise(network), header.get("network"))
        if diff:
            raise CheckpointError(f"checkpoint {path} was written for a different network: {diff}")
    entries = header["leaves"]
    by_group: dict[str, list] = {}
    for entry, arr in zip(entries, arrays):
        by_group.setdefault(entry["group"], []).append((entry, arr))
    if like is None:
        state = {g: {e["path"]: a for e, a in items} for g, items in by_group.items()}
        return Checkpoint(state, header)

    tu = _tree_util()
    state = {}
    for group, template in like.items():
        stored = by_group.get(group, [])
        expected, treedef = tu.tree_flatten_with_path(template)
        if len(stored) != len(expected):
            raise CheckpointError(
                f"checkpoint {path} does not match this run: {group} has {len(stored)} arrays "
                f"in the checkpoint, expected {len(expected)} (a different network or "
                f"optimizer?)"
            )
        leaves = []
        for (tpath, tleaf), (entry, arr) in zip(expected, stored):
            name = tu.keystr(tpath)
            want_shape = tuple(np.shape(tleaf))
            want_dtype = np.dtype(getattr(tleaf, "dtype", np.asarray(tleaf).dtype))
            if entry["path"] != name or tuple(arr.shape) != want_shape:
                raise CheckpointError(
                    f"checkpoint {path} does not match this run: {group} leaf "
                    f"{entry['path']} has shape {tuple(arr.shape)}, expected leaf {name} of "
                    f"shape {want_shape}"
                )
            if arr.dtype != want_dtype:
                raise CheckpointError(
                    f"checkpoint {path} does not match this run: {group} leaf {name} has "
                    f"dtype {arr.dtype}, expected {want_dtype}"
                )
            leaves.append(arr)
        state[group] = tu.tree_unflatten(treedef, leaves)
    extra = sorted(set(by_group) - set(like))
    if extra:
        raise CheckpointError(f"checkpoint {path} holds unexpected groups: {', '.join(extra)}")
    return Checkpoint(state, header)


# --------------------------------------------------------------------------------------------
# A jaxbp.TrainState as checkpoint groups, and back
# --------------------------------------------------------------------------------------------


def train_state_groups(ts) -> dict:
    """``ts`` (a :class:`jaxbp.TrainState`) as checkpoint groups: ``params``, ``opt_state``,
    ``state`` (layer state, e.g. BatchNorm's running statistics) and ``key`` (the PRNG key as
    its raw ``key_data``: typed keys are not NumPy arrays). A network without state or
    randomness stores nothing in the last two, so such a checkpoint reads like an old one."""
    import jax

    key = () if ts.key is None else {"key_data": jax.random.key_data(ts.key)}
    return {"params": ts.params, "opt_state": ts.opt_state, "state": ts.state, "key": key}


def restore_train_state(path, like, *, network: dict | None = None):
    """The :class:`jaxbp.TrainState` stored at ``path`` by :func:`train_state_groups`, shaped
    like the template ``like`` (a fresh TrainState of the same run), with the checkpoint.

    Returns ``(train_state, checkpoint)``; every mismatch is a :class:`CheckpointError`."""
    import jax
    import jax.numpy as jnp

    ckpt = load_checkpoint(path, train_state_groups(like), network=network)
    st = jax.tree_util.tree_map(jnp.asarray, ckpt.state)
    key = None if like.key is None else jax.random.wrap_key_data(st["key"]["key_data"])
    return like._replace(
        params=st["params"], opt_state=st["opt_state"], state=st["state"], key=key
    ), ckpt
