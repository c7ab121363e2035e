"""Pytree helpers: how two pytrees differ, in words a person can act on (not two PyTreeDefs),
and whether a tree is all finite."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _paths(tree) -> list[str]:
    return [
        jax.tree_util.keystr(p) or "<root>"
        for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]
    ]


def tree_difference(expected, got, *, limit: int = 3) -> str:
    """``"got no leaf [2]['b']; got unexpected leaf [3]['W']"``, or the containers that differ.

    Only meant for two trees already known to differ in structure.
    """
    want, have = _paths(expected), _paths(got)
    if want and not have:
        return f"got {'None' if got is None else type(got).__name__}, which holds no arrays"
    missing = [p for p in want if p not in set(have)]
    extra = [p for p in have if p not in set(want)]
    parts = []
    for label, items in (("got no", missing), ("got unexpected", extra)):
        if items:
            more = f" and {len(items) - limit} more" if len(items) > limit else ""
            parts.append(
                f"{label} {'leaves' if len(items) > 1 else 'leaf'} {', '.join(items[:limit])}{more}"
            )
    if parts:
        return "; ".join(parts)
    # The same leaf paths in different containers: a list for a tuple, a dict for a custom node.
    where = _container_difference(expected, got, "")
    if where:
        return where
    return (
        f"the same leaves in different containers: expected "
        f"{jax.tree_util.tree_structure(expected)}, got {jax.tree_util.tree_structure(got)}"
    )


_CONTAINERS = (list, tuple, dict)


def _container_difference(expected, got, path: str) -> str | None:
    """The first place where a list, tuple or dict of one tree is another type in the other."""
    if not isinstance(expected, _CONTAINERS) and not isinstance(got, _CONTAINERS):
        return None  # two leaves (or custom nodes): nothing to say here
    if type(expected) is not type(got):
        return (
            f"got a {type(got).__name__} at {path or 'the top level'}, expected a "
            f"{type(expected).__name__}"
        )
    if isinstance(expected, dict):
        pairs = [(f"{path}[{k!r}]", expected[k], got[k]) for k in expected if k in got]
    else:
        pairs = [(f"{path}[{i}]", e, g) for i, (e, g) in enumerate(zip(expected, got))]
    for sub, e, g in pairs:
        found = _container_difference(e, g, sub)
        if found:
            return found
    return None


def all_finite(tree):
    """Is every entry of every leaf of ``tree`` finite? (one scalar bool; True when empty)"""
    leaves = jax.tree_util.tree_leaves(tree)
    if not leaves:
        return jnp.array(True)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in leaves]))
