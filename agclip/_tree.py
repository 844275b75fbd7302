"""Pytree flattening with readable key paths.

One flattener, ``optree``, whatever else the process has imported: the same
tree gives the same leaves, paths and errors with or without JAX loaded
(``jax.tree_util`` alone would turn a ``deque`` into one leaf and fail on a
dict with mixed key types). Nodes that only JAX knows (Flax structs, custom
``register_pytree_node`` classes) are bridged into agclip's own optree
namespace the first time such an object is met, when JAX is loaded; their
children are then flattened by optree like any other node.

``None`` is an empty node (it survives the round trip and contributes
nothing). Paths read like Python accessors: ``['layers'][1].a``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import optree

ROOT = "<root>"
NAMESPACE = "agclip"

# Types already asked whether JAX registered them as nodes: True once bridged.
_jax_node_types: dict[type, bool] = {}


@dataclass(frozen=True)
class FlatTree:
    """The leaves of a pytree, their key paths, and the way back."""

    leaves: list[Any]
    paths: list[str]
    _rebuild: Callable[[list[Any]], Any]

    def unflatten(self, leaves: Sequence[Any]) -> Any:
        return self._rebuild(list(leaves))


def flatten(tree: Any, *, bridge_jax: bool | None = None) -> FlatTree:
    """Flatten ``tree`` into leaves and key paths.

    ``bridge_jax`` (default: whether JAX is imported) expands nodes that only
    JAX knows; the tests turn it off to compare both ways.
    """
    if bridge_jax is None:
        bridge_jax = "jax" in sys.modules
    while True:
        accessors, leaves, spec = optree.tree_flatten_with_accessor(
            tree, none_is_leaf=False, namespace=NAMESPACE if bridge_jax else ""
        )
        if not (bridge_jax and _bridge_jax_nodes(leaves)):
            break
    paths = [accessor.codify("") or ROOT for accessor in accessors]
    return FlatTree(leaves, paths, lambda new: optree.tree_unflatten(spec, new))


def _bridge_jax_nodes(leaves: list[Any]) -> bool:
    """Register with optree every leaf type that JAX treats as a node; whether any was new."""
    new = False
    for leaf in leaves:
        kind = type(leaf)
        known = _jax_node_types.get(kind)
        if known is None:
            known = _jax_node_types[kind] = _is_jax_node(leaf)
            if known:
                _register_jax_node(kind)
                new = True
    return new


def _is_jax_node(obj: Any) -> bool:
    import jax

    return not jax.tree_util.treedef_is_leaf(jax.tree_util.tree_structure(obj))


def _register_jax_node(kind: type) -> None:
    import jax

    def children(obj: Any) -> tuple[list[Any], Any, list[Any]]:
        # One level: every child is a leaf to JAX here, and optree goes on from it.
        keyed, treedef = jax.tree_util.tree_flatten_with_path(obj, is_leaf=lambda x: x is not obj)
        return [child for _, child in keyed], treedef, [path[0] for path, _ in keyed]

    def rebuild(treedef: Any, new: Any) -> Any:
        return jax.tree_util.tree_unflatten(treedef, list(new))

    optree.register_pytree_node(
        kind, children, rebuild, path_entry_type=_JaxKeyEntry, namespace=NAMESPACE
    )


class _JaxKeyEntry(optree.PyTreeEntry):
    """A path entry holding a JAX key (``.name``, ``['key']``, ``[0]``): agclip reads
    paths only to name leaves, so it spells them and does not index with them."""

    def codify(self, /, node: str = "") -> str:
        import jax

        return node + jax.tree_util.keystr((self.entry,))
