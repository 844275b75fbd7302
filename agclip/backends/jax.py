"""JAX adapter: optax gradient transformations (``init`` / ``update``) that compose in
``optax.chain``, run under ``jit`` and take ``optax.inject_hyperparams``.

Compared with optax's clippers:

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

import inspect
import warnings
from functools import partial
from typing import Any, NamedTuple

from .._missing import missing

try:
    import jax
    import jax.numpy as jnp
    import optax
except ImportError as error:
    raise missing("jax", error) from error

from .._adagc import ADAGC
from .._agc import adaptive_grad_clip as agc
from .._agc import check_layout
from .._autoclip import AUTOCLIP
from .._checks import check_count, check_eps, check_ord, check_threshold, leaf_namespace
from .._dispatch import kernels_for
from .._pipeline import (
    Reduction,
    clip_each_leaf,
    clip_leaves_by_global_norm,
    clip_leaves_by_value,
    zero_nonfinite_leaves,
)
from .._rule import RuleSpec
from .._rule_front import functional_init, functional_step
from .._tree import flatten
from .._typing import Array, Scalar
from .._zclip import ZCLIP
from ._jax_axes import reduction_for

__all__ = [
    "ClipByGlobalNormState",
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


def order(ord: Any) -> float:
    """The norm order; ``None`` is 2. (A ``None`` default, unlike a number, is left
    static by ``optax.inject_hyperparams``.)"""
    return 2.0 if ord is None else check_ord(ord)


def _apply(updates: Any, fn: Any, *args: Any, **static: Any) -> tuple[Any, Any]:
    """Validate and flatten ``updates``, run ``fn`` compiled; (new leaves, flat tree)."""
    flat = flatten(updates)
    leaf_namespace(flat.leaves, flat.paths)
    if not flat.leaves:
        return None, flat
    return kernels_for(jnp).run(fn, flat.leaves, *args, **static), flat


def _clip_keeping_norm(
    k: Any, leaves: list[Any], max_norm: Any, eps: Any, *, p: float, reduce: Reduction
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
) -> Any:
    """Scale updates by ``min(1, max_norm / (global_norm + eps))``; the state keeps the norm.

    Args:
        max_norm: the largest global norm allowed, a number >= 0 (or a 0-d
            array, e.g. a schedule's value); ``inf`` clips nothing.
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
    _check_specs(axis_name, specs)

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

    return optax.GradientTransformation(init, update)


def _check_specs(axis_name: Any, specs: Any) -> None:
    if specs is not None and axis_name is None:
        raise ValueError("specs describe a shard_map layout: pass axis_name with them")


def _stateless(fn: Any, *args: Any, **static: Any) -> Any:
    def init(params: Any) -> Any:
        del params
        return optax.EmptyState()

    def update(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        del params
        out, flat = _apply(updates, fn, *args, **static)
        return (updates if out is None else flat.unflatten(out)), state

    return optax.GradientTransformation(init, update)


def clip_by_norm(max_norm: Scalar, *, ord: float | None = None, eps: Scalar = 1e-6) -> Any:
    """Scale each update leaf on its own by ``min(1, max_norm / (norm(leaf) + eps))``.

    Args:
        max_norm: the largest norm allowed per leaf, a number >= 0 (or a
            0-d array); injectable.
        ord: ``None`` (default: 2), 1, ``inf`` or any p > 0; static (see
            ``clip_by_global_norm``).
        eps: added to each norm before dividing; injectable.

    References:
        Pascanu, Mikolov and Bengio, ICML 2013 (norm clipping applied per tensor).
    """
    max_norm = check_threshold("max_norm", max_norm, jnp)
    return _stateless(clip_each_leaf, max_norm, check_eps(eps), p=order(ord))


def clip_by_value(clip_value: Scalar) -> Any:
    """Clip every update element into ``[-clip_value, clip_value]``.

    Args:
        clip_value: a finite number >= 0 (or a 0-d array); injectable.

    References:
        Mikolov, "Statistical language models based on neural networks", 2012.
    """
    return _stateless(clip_leaves_by_value, check_threshold("clip_value", clip_value, jnp))


def zero_nonfinite() -> Any:
    """Replace NaN, +inf and -inf in the updates with 0 (optax's zero_nans only handles NaN).

    Takes no arguments and keeps no state (``optax.EmptyState``): unlike
    optax's ``zero_nans``, it does not record which leaves held NaN.

    Examples:
        >>> import jax.numpy as jnp
        >>> from agclip.backends.jax import zero_nonfinite
        >>> tx = zero_nonfinite()
        >>> updates, _ = tx.update({"w": jnp.array([1.0, jnp.nan, jnp.inf])}, tx.init(None))
        >>> updates["w"].tolist()
        [1.0, 0.0, 0.0]
    """
    return _stateless(zero_nonfinite_leaves)


def apply_if_finite(inner: Any, max_consecutive_errors: int | Array) -> Any:
    """``optax.apply_if_finite``, with its argument checked up front: apply ``inner``
    only when the updates are all finite.

    A non-finite step yields zero updates and leaves ``inner``'s state as it
    was; after more than ``max_consecutive_errors`` such steps in a row, the
    update is applied anyway. What this adds to optax's: a negative or non-integer
    ``max_consecutive_errors`` is a ``ValueError`` naming it here, not a silent
    misbehaviour later (a 0-d integer array is accepted, as under
    ``optax.inject_hyperparams``). The state is ``optax.ApplyIfFiniteState``.

    References:
        Micikevicius et al., "Mixed Precision Training", ICLR 2018 (skipping
        steps with non-finite gradients).
    """
    check_count("max_consecutive_errors", max_consecutive_errors)
    return optax.apply_if_finite(inner, max_consecutive_errors)


def adaptive_grad_clip(
    clipping: Scalar = 0.01,
    eps: Scalar = 1e-3,
    *,
    layout: Any = "optax",
    ord: float | None = None,
    exclude: Any = (),
) -> Any:
    """Adaptive gradient clipping (AGC) as an optax transform; needs ``params`` in ``update``.

    Each unit's update is scaled so that its norm is at most ``clipping *
    max(norm of the unit's parameters, eps)``. The default ``layout="optax"``
    gives ``optax.adaptive_grad_clip``'s results on every shape optax takes;
    ``"flax"`` makes every output unit (last axis) of a weight a unit,
    ``"torch"`` every first-axis slice (PyTorch-layout weights), or pass a
    callable ``leaf -> axes``. ``exclude`` skips leaves by key path (fnmatch
    patterns such as ``"*head*"``, or a predicate). Stateless, jit-friendly,
    ``clipping`` and ``eps`` injectable.

    References:
        Brock, De, Smith and Simonyan, "High-Performance Large-Scale Image
        Recognition Without Normalization", ICML 2021.
    """
    clipping = check_threshold("clipping", clipping, jnp)
    eps = check_eps(eps)
    layout = check_layout(layout)
    p = order(ord)

    def init(params: Any) -> Any:
        del params
        return optax.EmptyState()

    def update(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        if params is None:
            raise ValueError("adaptive_grad_clip needs params: call update(updates, state, params)")
        clipped = agc(updates, params, clipping, layout=layout, eps=eps, ord=p, exclude=exclude)
        return clipped, state

    return optax.GradientTransformation(init, update)


def optax_rule(spec: RuleSpec) -> Any:
    """The optax transform factory of an adaptive rule: its hyperparameters (traced:
    injectable, no recompiling when they change), ``ord``, and the ``axis_name`` /
    ``specs`` of ``clip_by_global_norm`` for ``shard_map``."""

    def factory(
        *args: Any, ord: Any = None, axis_name: Any = None, specs: Any = None, **kwargs: Any
    ) -> Any:
        window = spec.window_of(kwargs)
        config, static, _ = spec.configure(args, kwargs, spec.name)
        p = order(ord)
        _check_specs(axis_name, specs)

        def update(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
            del params
            reduce = reduction_for(axis_name, specs, updates)
            return functional_step(spec, updates, state, config, static, ord=p, reduce=reduce)

        return optax.GradientTransformation(partial(functional_init, spec, window=window), update)

    keyword, window = inspect.Parameter.KEYWORD_ONLY, [spec.window] if spec.window else []
    extra = [*window, ("ord", None), ("axis_name", None), ("specs", None)]
    factory.__signature__ = spec.signature(  # type: ignore[attr-defined]
        [], [inspect.Parameter(name, keyword, default=value) for name, value in extra]
    )
    sizes = "".join(
        f"    {name}: the last norms kept (the state's size: static).\n" for name, _ in window
    )
    factory.__doc__ = spec.docstring(
        f"{spec.title} as an optax transform: {spec.doc.splitlines()[0].split(': ', 1)[-1]}",
        "",
        sizes
        + "".join(
            f"    {name}: as in ``clip_by_global_norm`` (static).\n"
            for name in ("ord", "axis_name", "specs")
        ),
        "Returns:\n    An ``optax.GradientTransformation`` whose state is the rule's (log\n"
        "    ``norm``, ``threshold``, the counters). A non-finite norm passes the updates\n"
        "    unchanged: compose with ``apply_if_finite`` to skip such steps.\n",
    )
    factory.__name__ = factory.__qualname__ = spec.name
    factory.__module__ = __name__
    return factory


zclip = optax_rule(ZCLIP)
autoclip = optax_rule(AUTOCLIP)
adagc = optax_rule(ADAGC)


def __getattr__(name: str) -> Any:
    if name in ("GradientTransformation", "EmptyState", "ApplyIfFiniteState"):
        warnings.warn(
            f"agclip.backends.jax.{name} is optax's own {name}: use optax.{name}",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(optax, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
