"""Functional clipping over pytrees: by global norm, by per-leaf norm, by value."""

from __future__ import annotations

import numpy as np

from ._checks import check_eps, check_ord, check_threshold
from ._dispatch import flatten_arrays
from ._pipeline import (
    clip_each_leaf,
    clip_leaves_by_global_norm,
    clip_leaves_by_value,
    global_norm_of_leaves,
)
from ._typing import Array, ArrayTree, Scalar


def _empty_norm() -> Array:
    # No leaves, so no library to answer in: a NumPy 0-d float32 zero.
    return np.zeros((), dtype=np.float32)


def global_norm(tree: ArrayTree, *, ord: float = 2) -> Array:
    """The p-norm of all leaves of ``tree`` taken together.

    Accurate (float32 gradients: relative error ~1e-8 against float64), never
    squares 16-bit values in their own dtype, and overflow-safe: finite leaves
    whose squares overflow still give the right finite norm.

    Args:
        tree: a pytree (list, tuple, dict, namedtuple, JAX-registered node...)
            of real floating-point arrays of one array-API library; ``None``
            leaves are skipped.
        ord: 2 (default), 1, ``inf`` or any finite p > 0.

    Returns:
        A 0-d array of the leaves' library and device, float32 for 16- and
        32-bit leaves, float64 when any leaf is float64. An empty tree gives a
        NumPy float32 zero.

    Examples:
        >>> import numpy as np, agclip
        >>> float(agclip.global_norm([np.array([3.0, 4.0]), None]))
        5.0

    References:
        Pascanu, Mikolov and Bengio, "On the difficulty of training recurrent
        neural networks", ICML 2013.
    """
    p = check_ord(ord)
    flat, k = flatten_arrays(tree)
    if k is None:
        return _empty_norm()
    return k.run(global_norm_of_leaves, flat.leaves, p=p)


def clip_by_global_norm(
    tree: ArrayTree, max_norm: Scalar, *, ord: float = 2, eps: float = 1e-6
) -> tuple[ArrayTree, Array]:
    """Scale all leaves by ``min(1, max_norm / (norm + eps))``, norm taken over all leaves.

    The same rule as ``torch.nn.utils.clip_grad_norm_``, branch-free: it runs
    under ``jax.jit``, on CUDA without a host sync and on torch's ``meta``
    device. 16-bit leaves are scaled in float32 and cast back.

    Args:
        tree: a pytree of real floating-point arrays (``None`` leaves kept).
        max_norm: the largest norm allowed, a number >= 0 (or a 0-d array);
            ``inf`` measures the norm and clips nothing.
        ord: 2 (default), 1, ``inf`` or any finite p > 0.
        eps: added to the norm before dividing; >= 0.

    Returns:
        The pair ``(clipped, norm)``, a new tree of the same structure and dtypes and
        the pre-clip global norm (see ``agclip.global_norm``).

    Examples:
        >>> import numpy as np, agclip
        >>> clipped, norm = agclip.clip_by_global_norm([np.array([3.0, 4.0])], 1.0)
        >>> float(norm), clipped[0].round(4).tolist()
        (5.0, [0.6, 0.8])

    References:
        Pascanu, Mikolov and Bengio, "On the difficulty of training recurrent
        neural networks", ICML 2013.
    """
    p, eps = check_ord(ord), check_eps(eps)
    flat, k = flatten_arrays(tree)
    max_norm = check_threshold("max_norm", max_norm, k.xp if k else None)
    if k is None:
        return tree, _empty_norm()
    clipped, norm = k.run(clip_leaves_by_global_norm, flat.leaves, max_norm, eps, p=p)
    return flat.unflatten(clipped), norm


def clip_by_norm(
    tree: ArrayTree, max_norm: Scalar, *, ord: float = 2, eps: float = 1e-6
) -> ArrayTree:
    """Scale each leaf on its own by ``min(1, max_norm / (norm(leaf) + eps))``.

    Args:
        tree: a pytree of real floating-point arrays (``None`` leaves kept).
        max_norm: the largest norm allowed per leaf, a number >= 0 (``inf``:
            clip nothing).
        ord: 2 (default), 1, ``inf`` or any finite p > 0.
        eps: added to each norm before dividing; >= 0.

    Returns:
        A new tree of the same structure and dtypes.

    Examples:
        >>> import numpy as np, agclip
        >>> out = agclip.clip_by_norm({"a": np.array([3.0, 4.0]), "b": np.array([0.1])}, 1.0)
        >>> out["a"].round(4).tolist(), out["b"].tolist()
        ([0.6, 0.8], [0.1])

    References:
        Pascanu, Mikolov and Bengio, ICML 2013 (norm clipping applied per tensor).
    """
    p, eps = check_ord(ord), check_eps(eps)
    flat, k = flatten_arrays(tree)
    max_norm = check_threshold("max_norm", max_norm, k.xp if k else None)
    if k is None:
        return tree
    return flat.unflatten(k.run(clip_each_leaf, flat.leaves, max_norm, eps, p=p))


def clip_by_value(tree: ArrayTree, clip_value: Scalar) -> ArrayTree:
    """Clip every element into ``[-clip_value, clip_value]``.

    Args:
        tree: a pytree of real floating-point arrays (``None`` leaves kept).
        clip_value: a finite number >= 0.

    Returns:
        A new tree of the same structure and dtypes. NaN stays NaN.

    Examples:
        >>> import numpy as np, agclip
        >>> agclip.clip_by_value([np.array([-3.0, 0.5, 7.0])], 1.0)[0].tolist()
        [-1.0, 0.5, 1.0]

    References:
        Mikolov, "Statistical language models based on neural networks", 2012
        (element-wise gradient clipping).
    """
    flat, k = flatten_arrays(tree)
    clip_value = check_threshold("clip_value", clip_value, k.xp if k else None)
    if k is None:
        return tree
    return flat.unflatten(k.run(clip_leaves_by_value, flat.leaves, clip_value))
