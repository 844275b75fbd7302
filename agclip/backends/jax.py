"""JAX adapter: optax-style gradient transformations (``init`` / ``update``).

Each function returns an ``optax.GradientTransformation`` when optax is
installed (so it composes in ``optax.chain``) and an equivalent
``GradientTransformation`` NamedTuple otherwise. Compared with optax's clippers:

- ``clip_by_global_norm`` keeps the pre-clip norm in its state (log it);
- 16-bit gradients accumulate in float32, float32 in blocks (accurate);
- finite-but-huge gradients are clipped, not zeroed (``lax.cond`` guard: the
  common path stays one fused pass);
- ``max_norm=0`` with zero gradients gives zeros, not NaN; gradients through
  the clip are finite, at norm 0 too;
- eager (un-jitted) calls run a cached compiled update;
- ``eps`` (default 1e-6, torch's rule ``max_norm / (norm + eps)``) differs from
  optax, which divides by the norm itself: pass ``eps=0.0`` for optax's numbers.

Examples:
    >>> import jax.numpy as jnp, optax
    >>> from agclip.backends.jax import clip_by_global_norm
    >>> tx = optax.chain(clip_by_global_norm(1.0), optax.sgd(0.1))
    >>> params = {"w": jnp.ones(3)}
    >>> state = tx.init(params)
    >>> updates, state = tx.update({"w": jnp.full(3, 10.0)}, state, params)
    >>> round(float(state[0].norm), 3)
    17.321
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from .._adaptive import adaptive_grad_clip as agc
from .._adaptive import check_layout
from .._checks import check_count, check_eps, check_threshold, leaf_namespace
from .._dispatch import kernels_for
from .._kernels import Kernels
from .._pipeline import (
    Reduction,
    clip_each_leaf,
    clip_leaves_by_global_norm,
    clip_leaves_by_value,
    leaves_all_finite,
    zero_nonfinite_leaves,
)
from .._tree import flatten
from .._typing import Array, Scalar
from ._jax_adaptive import adagc, autoclip, zclip
from ._jax_axes import reduction_for
from ._jax_transform import (
    EmptyState,
    GradientTransformation,
    empty_state,
    order,
    transformation,
)

__all__ = [
    "ApplyIfFiniteState",
    "ClipByGlobalNormState",
    "EmptyState",
    "GradientTransformation",
    "adagc",
    "adaptive_grad_clip",
    "apply_if_finite",
    "autoclip",
    "clip_by_global_norm",
    "clip_by_norm",
    "clip_by_value",
    "zclip",
    "zero_nonfinite",
]


class ClipByGlobalNormState(NamedTuple):
    norm: jax.Array
    """The pre-clip global norm of the last update (float32 scalar)."""


class ApplyIfFiniteState(NamedTuple):
    notfinite_count: jax.Array
    last_finite: jax.Array
    total_notfinite: jax.Array
    inner_state: Any


def _kernels() -> Kernels:
    return kernels_for(jnp)


def _apply(updates: Any, fn: Any, *args: Any, **static: Any) -> tuple[Any, Any]:
    """Validate and flatten ``updates``, run ``fn`` compiled; (new leaves, flat tree)."""
    flat = flatten(updates)
    leaf_namespace(flat.leaves, flat.paths)
    if not flat.leaves:
        return None, flat
    return _kernels().run(fn, flat.leaves, *args, **static), flat


def _clip_keeping_norm(
    k: Kernels, leaves: list[Any], max_norm: Any, eps: Any, *, p: float, reduce: Reduction
) -> tuple[list[Any], Any]:
    clipped, norm = clip_leaves_by_global_norm(k, leaves, max_norm, eps, p=p, reduce=reduce)
    return clipped, norm.astype(jnp.float32)  # the state's dtype, whatever the leaves'


def clip_by_global_norm(
    max_norm: Scalar,
    *,
    ord: float | None = None,
    eps: Scalar = 1e-6,
    axis_name: Any = None,
    specs: Any = None,
) -> GradientTransformation:
    """Scale updates by ``min(1, max_norm / (global_norm + eps))``; the state keeps the norm.

    Args:
        max_norm: the largest global norm allowed, a finite number >= 0 (or a
            0-d array, e.g. a schedule's value).
        ord: ``None`` (default: 2), 1, ``inf`` or any p > 0. It picks the code
            path, so it is static: under ``optax.inject_hyperparams`` pass
            ``static_args=("ord",)`` to set it (the default needs nothing).
        eps: added to the norm before dividing (``0.0`` reproduces optax);
            injectable.
        axis_name: inside ``shard_map`` (or ``pmap``) over updates that are
            *partitioned* across devices: the axis name, or a tuple of them, to
            reduce the norm over. Leave it ``None`` under ``jit`` with sharded
            arrays (GSPMD already computes the global norm, single- or
            multi-host) and for gradients that are already identical on every
            device (``pmap`` after ``lax.pmean``).
        specs: with ``axis_name``, the ``PartitionSpec`` of each update leaf (a
            tree like the updates, or one spec for all, as in ``shard_map``'s
            ``in_specs``). A leaf not partitioned over some named axis is a copy
            there and is counted once. ``None``: every leaf is partitioned over
            every named axis.

    References:
        Pascanu, Mikolov and Bengio, "On the difficulty of training recurrent
        neural networks", ICML 2013.
    """
    max_norm = check_threshold("max_norm", max_norm, jnp)
    p, eps = order(ord), check_eps(eps)
    if specs is not None and axis_name is None:
        raise ValueError("specs describe a shard_map layout: pass axis_name with them")

    def init(params: Any) -> ClipByGlobalNormState:
        del params
        return ClipByGlobalNormState(norm=jnp.zeros((), jnp.float32))

    def update(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        del params
        reduce = reduction_for(axis_name, specs, updates)
        out, flat = _apply(updates, _clip_keeping_norm, max_norm, eps, p=p, reduce=reduce)
        if out is None:
            return updates, ClipByGlobalNormState(norm=jnp.zeros((), jnp.float32))
        clipped, norm = out
        return flat.unflatten(clipped), ClipByGlobalNormState(norm=norm)

    return transformation(init, update)


def _stateless(fn: Any, *args: Any, **static: Any) -> GradientTransformation:
    def init(params: Any) -> Any:
        del params
        return empty_state()

    def update(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        del params
        out, flat = _apply(updates, fn, *args, **static)
        return (updates if out is None else flat.unflatten(out)), state

    return transformation(init, update)


def clip_by_norm(
    max_norm: Scalar, *, ord: float | None = None, eps: Scalar = 1e-6
) -> GradientTransformation:
    """Scale each update leaf on its own by ``min(1, max_norm / (norm(leaf) + eps))``.

    Args:
        max_norm: the largest norm allowed per leaf, a finite number >= 0 (or a
            0-d array); injectable.
        ord: ``None`` (default: 2), 1, ``inf`` or any p > 0; static (see
            [`clip_by_global_norm`][agclip.backends.jax.clip_by_global_norm]).
        eps: added to each norm before dividing; injectable.

    References:
        Pascanu, Mikolov and Bengio, ICML 2013 (norm clipping applied per tensor).
    """
    max_norm = check_threshold("max_norm", max_norm, jnp)
    return _stateless(clip_each_leaf, max_norm, check_eps(eps), p=order(ord))


def clip_by_value(clip_value: Scalar) -> GradientTransformation:
    """Clip every update element into ``[-clip_value, clip_value]``.

    Args:
        clip_value: a finite number >= 0 (or a 0-d array); injectable.

    References:
        Mikolov, "Statistical language models based on neural networks", 2012.
    """
    return _stateless(clip_leaves_by_value, check_threshold("clip_value", clip_value, jnp))


def zero_nonfinite() -> GradientTransformation:
    """Replace NaN, +inf and -inf in the updates with 0 (optax's zero_nans only handles NaN).

    Takes no arguments and keeps no state (``optax.EmptyState``): unlike
    optax's ``zero_nans``, it does not record which leaves held NaN.

    Returns:
        An optax ``GradientTransformation`` whose ``update`` returns the cleaned
        updates and the unchanged state.

    Examples:
        >>> import jax.numpy as jnp
        >>> from agclip.backends.jax import zero_nonfinite
        >>> tx = zero_nonfinite()
        >>> updates, _ = tx.update({"w": jnp.array([1.0, jnp.nan, jnp.inf])}, tx.init(None))
        >>> updates["w"].tolist()
        [1.0, 0.0, 0.0]
    """
    return _stateless(zero_nonfinite_leaves)


def apply_if_finite(
    inner: GradientTransformation, max_consecutive_errors: int | Array
) -> GradientTransformation:
    """Apply ``inner`` only when the updates are all finite (optax's semantics).

    A non-finite step yields zero updates and leaves ``inner``'s state as it
    was; after more than ``max_consecutive_errors`` such steps in a row, the
    update is applied anyway. The state counts consecutive and total failures.

    Args:
        inner: the transformation to guard (an optax ``GradientTransformation``).
        max_consecutive_errors: an int >= 0 (or a 0-d integer array: it works
            under ``optax.inject_hyperparams``).

    References:
        Micikevicius et al., "Mixed Precision Training", ICLR 2018 (skipping
        steps with non-finite gradients).
    """
    check_count("max_consecutive_errors", max_consecutive_errors)

    def init(params: Any) -> ApplyIfFiniteState:
        return ApplyIfFiniteState(
            notfinite_count=jnp.zeros((), jnp.int32),
            last_finite=jnp.array(True),
            total_notfinite=jnp.zeros((), jnp.int32),
            inner_state=inner.init(params),
        )

    def update(updates: Any, state: ApplyIfFiniteState, params: Any = None) -> tuple[Any, Any]:
        flat = flatten(updates)
        leaf_namespace(flat.leaves, flat.paths)
        finite = leaves_all_finite(_kernels(), flat.leaves) if flat.leaves else jnp.asarray(True)
        inner_updates, inner_state = inner.update(updates, state.inner_state, params)
        count = jnp.where(finite, 0, state.notfinite_count + 1)
        apply = finite | (count > max_consecutive_errors)

        def pick(new: Any, old: Any) -> Any:
            return jnp.where(apply, new, old)

        new_updates = jax.tree_util.tree_map(lambda u: pick(u, jnp.zeros_like(u)), inner_updates)
        new_state = ApplyIfFiniteState(
            notfinite_count=count,
            last_finite=finite,
            total_notfinite=state.total_notfinite + (~finite).astype(jnp.int32),
            inner_state=jax.tree_util.tree_map(pick, inner_state, state.inner_state),
        )
        return new_updates, new_state

    return transformation(init, update)


def adaptive_grad_clip(
    clipping: Scalar,
    eps: Scalar = 1e-3,
    *,
    layout: Any = "flax",
    exclude: Any = (),
) -> GradientTransformation:
    """Adaptive gradient clipping (AGC) as an optax transform; needs ``params`` in ``update``.

    Each unit's update is scaled so that its norm is at most ``clipping *
    max(norm of the unit's parameters, eps)``. The default ``layout="flax"``
    (output axis last) gives ``optax.adaptive_grad_clip``'s results on Flax
    parameters; ``layout="torch"`` (output axis first) gives timm's on
    PyTorch-layout weights, which the Flax rule would cut across. ``exclude``
    skips leaves by key path (fnmatch patterns such as ``"*head*"``, or a
    predicate). Stateless, jit-friendly, usable under ``inject_hyperparams``
    (``clipping`` and ``eps`` are injectable).

    References:
        Brock, De, Smith and Simonyan, "High-Performance Large-Scale Image
        Recognition Without Normalization", ICML 2021.
    """
    clipping = check_threshold("clipping", clipping, jnp)
    eps = check_eps(eps)
    layout = check_layout(layout)

    def init(params: Any) -> Any:
        del params
        return empty_state()

    def update(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        if params is None:
            raise ValueError("adaptive_grad_clip needs params: call update(updates, state, params)")
        clipped = agc(updates, params, clipping, layout=layout, eps=eps, exclude=exclude)
        return clipped, state

    return transformation(init, update)
