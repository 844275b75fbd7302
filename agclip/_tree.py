"""Pytree flattening with readable key paths.

JAX-registered nodes exist only once JAX is imported, so ``jax.tree_util`` is
used when JAX is loaded; otherwise ``optree``. Both treat ``None`` as an empty
node (it survives the round trip and contributes nothing) and both write key
paths the same way (``['layers'][1].a``), so messages do not depend on which
library flattened the tree.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

ROOT = "<root>"


@dataclass(frozen=True)
class FlatTree:
    """The leaves of a pytree, their key paths, and the way back."""

    leaves: list[Any]
    paths: list[str]
    _rebuild: Callable[[list[Any]], Any]

    def unflatten(self, leaves: Sequence[Any]) -> Any:
        return self._rebuild(list(leaves))


def flatten(tree: Any) -> FlatTree:
    if "jax" in sys.modules:
        import jax

        keyed, treedef = jax.tree_util.tree_flatten_with_path(tree)
        paths = [jax.tree_util.keystr(path) or ROOT for path, _ in keyed]
        leaves = [leaf for _, leaf in keyed]
        return FlatTree(leaves, paths, lambda new: jax.tree_util.tree_unflatten(treedef, new))

    import optree

    accessors, leaves, treedef = optree.tree_flatten_with_accessor(tree, none_is_leaf=False)
    paths = [accessor.codify("") or ROOT for accessor in accessors]
    return FlatTree(leaves, paths, lambda new: optree.tree_unflatten(treedef, new))
