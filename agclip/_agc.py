"""Adaptive gradient clipping (AGC): each unit's gradient norm bounded by a share of
its parameter's norm, with an explicit unit layout and exclusion by key path."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable
from typing import Any

from ._checks import check_eps, check_ord, check_threshold
from ._dispatch import flatten_arrays
from ._pipeline import clip_units_by_params
from ._tree import flatten
from ._typing import ArrayTree, Scalar

Layout = str | Callable[[Any], tuple[int, ...]]
LAYOUTS = ("torch", "flax", "optax")
OPTAX_AXES = {2: (0,), 3: (0,), 4: (0, 1, 2)}  # optax's unitwise_norm, by rank


def unit_axes(leaf: Any, layout: Layout, path: str = "") -> tuple[int, ...]:
    """The axes a unit's norm reduces over. Scalars and vectors are one unit.

    ``"torch"``: the output axis is first (``nn.Linear``, ``nn.ConvNd``
    weights), so every other axis is reduced; ``"flax"``: the output axis is
    last; ``"optax"``: ``optax.adaptive_grad_clip``'s rule (a leaf that is a
    vector once squeezed is one unit, ranks 2 and 3 reduce axis 0, rank 4 axes
    0-2); a callable returns the axes for a leaf.
    """
    shape = tuple(leaf.shape)
    ndim = len(shape)
    if callable(layout):
        return tuple(layout(leaf))
    if ndim <= 1 or (layout == "optax" and sum(size != 1 for size in shape) <= 1):
        return tuple(range(ndim))
    if layout == "optax":
        if ndim not in OPTAX_AXES:
            raise ValueError(
                f"layout='optax' takes leaves of rank <= 4, as optax; leaf {path} has shape {shape}"
            )
        return OPTAX_AXES[ndim]
    return tuple(range(1, ndim)) if layout == "torch" else tuple(range(ndim - 1))


def check_layout(layout: Any) -> Layout:
    if callable(layout) or layout in LAYOUTS:
        return layout  # type: ignore[no-any-return]
    raise ValueError(
        f"layout must be 'torch' (output axis first), 'flax' (output axis last), 'optax' "
        f"(optax's rule) or a callable giving a leaf's unit axes, got {layout!r}"
    )


def excluded(exclude: Callable[[str], bool] | Iterable[str]) -> Callable[[str], bool]:
    """A predicate on key paths: a callable as it is, or any of fnmatch patterns."""
    if callable(exclude):
        return exclude
    patterns = [exclude] if isinstance(exclude, str) else list(exclude)
    return lambda path: any(fnmatch.fnmatchcase(path, pattern) for pattern in patterns)


def adaptive_grad_clip(
    grads: ArrayTree,
    params: ArrayTree,
    clipping: Scalar = 0.01,
    *,
    layout: Layout,
    eps: Scalar = 1e-3,
    ord: float = 2,
    exclude: Callable[[str], bool] | Iterable[str] = (),
) -> ArrayTree:
    """Adaptive gradient clipping: scale each unit's gradient so that its norm is at
    most ``clipping * max(norm of the unit's parameters, eps)``.

    A unit is an output channel of a weight: the slice along its output axis,
    which is why the layout must be named. Leaves whose key path matches
    ``exclude`` (the classifier head, as the paper advises) pass unchanged.

    Args:
        grads: a pytree of gradient arrays.
        params: the parameters, a pytree of the same structure.
        clipping: the largest gradient-to-parameter norm ratio (>= 0).
        layout: ``"torch"`` (output axis first: timm's rule), ``"flax"``
            (output axis last), ``"optax"`` (``optax.adaptive_grad_clip``'s rule:
            equal to it on every shape it takes) or a callable ``leaf -> axes``.
        eps: the smallest parameter norm used (zero-initialised parameters).
        ord: 2 (default), 1, ``inf`` or any p > 0.
        exclude: fnmatch patterns on key paths (``"*head*"``) or a predicate.

    Returns:
        A new tree of the gradients' structure and dtypes.

    Examples:
        >>> import numpy as np, agclip
        >>> grads = {"w": np.array([[3.0, 4.0], [0.3, 0.4]])}
        >>> params = {"w": np.array([[1.0, 0.0], [1.0, 0.0]])}
        >>> agclip.adaptive_grad_clip(grads, params, 0.1, layout="torch")["w"].round(3).tolist()
        [[0.06, 0.08], [0.06, 0.08]]

    References:
        Brock, De, Smith and Simonyan, "High-Performance Large-Scale Image
        Recognition Without Normalization", ICML 2021.
    """
    layout = check_layout(layout)
    p = check_ord(ord)
    eps = check_eps(eps)
    flat, k = flatten_arrays(grads)
    clipping = check_threshold("clipping", clipping, k.xp if k else None)
    if k is None:
        return grads
    params_flat = flatten(params)
    for index, (path, grad) in enumerate(zip(flat.paths, flat.leaves, strict=False)):
        there = params_flat.paths[index] if index < len(params_flat.paths) else "nothing"
        if there != path or tuple(params_flat.leaves[index].shape) != tuple(grad.shape):
            shape = "" if there != path else f" of shape {tuple(params_flat.leaves[index].shape)}"
            raise ValueError(
                f"params must have the structure and shapes of grads: grads' leaf {path} has "
                f"shape {tuple(grad.shape)}, params has {there}{shape} there"
            )
    if len(params_flat.leaves) != len(flat.leaves):
        raise ValueError(
            f"params must have the structure of grads: params has {len(params_flat.leaves)} "
            f"leaves, grads {len(flat.leaves)}"
        )
    skip = excluded(exclude)
    static = {
        "p": p,
        "axes": tuple(
            unit_axes(leaf, layout, path)
            for leaf, path in zip(flat.leaves, flat.paths, strict=True)
        ),
        "skip": tuple(skip(path) for path in flat.paths),
    }
    new = k.run(clip_units_by_params, flat.leaves, params_flat.leaves, clipping, eps, **static)
    return flat.unflatten(new)
