"""Finite checks: all_finite, nonfinite_paths, zero_nonfinite."""

from __future__ import annotations

import numpy as np

from ._dispatch import flatten_arrays
from ._pipeline import leaves_all_finite, zero_nonfinite_leaves
from ._typing import Array, ArrayTree


def all_finite(tree: ArrayTree) -> Array:
    """Whether every element of every leaf is finite, as a 0-d bool array.

    Branch-free: usable under ``jax.jit`` and without a host sync on CUDA.
    An empty tree gives a NumPy ``True``.

    Examples:
        >>> import numpy as np, agclip
        >>> bool(agclip.all_finite({"w": np.array([1.0, np.inf])}))
        False
    """
    flat, k = flatten_arrays(tree)
    if k is None:
        return np.asarray(True)
    return k.run(leaves_all_finite, flat.leaves)


def nonfinite_paths(tree: ArrayTree) -> list[str]:
    """Key paths of the leaves holding NaN or inf, for error messages and logs.

    Reads values on the host, so it is not for use under ``jax.jit``.

    Examples:
        >>> import numpy as np, agclip
        >>> agclip.nonfinite_paths({"layers": [np.ones(2), {"a": np.array([np.nan])}]})
        ["['layers'][1]['a']"]
    """
    flat, k = flatten_arrays(tree)
    if k is None:
        return []
    xp = k.xp
    return [
        path
        for leaf, path in zip(flat.leaves, flat.paths, strict=True)
        if not bool(xp.all(xp.isfinite(leaf)))
    ]


def zero_nonfinite(tree: ArrayTree) -> ArrayTree:
    """Replace NaN, +inf and -inf with 0 in every leaf (a new tree).

    Examples:
        >>> import numpy as np, agclip
        >>> agclip.zero_nonfinite([np.array([1.0, np.nan, -np.inf])])[0].tolist()
        [1.0, 0.0, 0.0]
    """
    flat, k = flatten_arrays(tree)
    if k is None:
        return tree
    return flat.unflatten(k.run(zero_nonfinite_leaves, flat.leaves))
