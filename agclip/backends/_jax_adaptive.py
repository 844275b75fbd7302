"""optax transforms for the adaptive rules: ``zclip``, ``autoclip``, ``adagc``.

Each is the functional rule (``agclip.zclip`` ...) as ``init`` / ``update``; the
optax state is the rule's state (a NamedTuple of arrays: ``norm``,
``threshold``, counters), so it can be logged, jitted (compiled once: the
hyperparameters are traced) and injected with ``optax.inject_hyperparams``.
"""

from __future__ import annotations

from typing import Any

from .. import _rule_api as rules
from .._checks import check_count
from .._rules import adagc_config, check_percentile, zclip_config
from .._typing import Scalar
from ._jax_transform import GradientTransformation, order, transformation


def zclip(
    alpha: Scalar = 0.97,
    z_thresh: Scalar = 2.5,
    max_grad_norm: Scalar | None = None,
    eps: Scalar = 1e-6,
    warmup_steps: int = 25,
    mode: str = "zscore",
    clip_option: str = "adaptive_scaling",
    clip_factor: Scalar = 1.0,
    skip_update_on_spike: bool = False,
    *,
    ord: float | None = None,
) -> GradientTransformation:
    """ZClip as an optax transform: the keywords of ``agclip.backends.torch.ZClip``.

    The state is an ``agclip.ZClipState``: ``norm`` (pre-clip), ``threshold``,
    ``mean``, ``var`` and the ``spikes`` / ``nonfinite`` counters. A non-finite
    norm passes the updates unchanged: compose with ``apply_if_finite`` to
    skip such steps. See [`agclip.zclip`][agclip.zclip] for the rule.

    Examples:
        >>> import jax.numpy as jnp, optax
        >>> from agclip.backends.jax import zclip
        >>> tx = optax.chain(zclip(warmup_steps=5), optax.sgd(0.1))
        >>> state = tx.init({"w": jnp.zeros(3)})
        >>> for scale in [1.0] * 10 + [100.0]:
        ...     _, state = tx.update({"w": jnp.full(3, scale)}, state)
        >>> int(state[0].spikes), round(float(state[0].norm), 1)
        (1, 173.2)
    """
    options = {
        "alpha": alpha,
        "z_thresh": z_thresh,
        "max_grad_norm": max_grad_norm,
        "eps": eps,
        "warmup_steps": warmup_steps,
        "mode": mode,
        "clip_option": clip_option,
        "clip_factor": clip_factor,
        "skip_update_on_spike": skip_update_on_spike,
    }
    zclip_config(**options)  # errors at construction, not at the first update
    p = order(ord)

    def update(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        del params
        return rules.zclip(updates, state, ord=p, **options)

    return transformation(rules.zclip_init, update)


def autoclip(
    percentile: Scalar = 10, history: int = 10_000, *, ord: float | None = None
) -> GradientTransformation:
    """AutoClip as an optax transform: clip at the ``percentile`` of the last
    ``history`` global norms (a ring buffer in the state; ``history`` sets its
    shape, so under ``inject_hyperparams`` pass ``static_args=("history",)``).
    See [`agclip.autoclip`][agclip.autoclip] for the rule."""
    check_percentile(percentile)
    window = check_count("history", history, low=1)
    p = order(ord)

    def init(params: Any) -> Any:
        return rules.autoclip_init(params, history=window)

    def update(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        del params
        return rules.autoclip(updates, state, percentile=percentile, ord=p)

    return transformation(init, update)


def adagc(
    lambda_abs: Scalar = 1.0,
    lambda_rel: Scalar = 1.05,
    beta: Scalar = 0.98,
    warmup_steps: int = 100,
    eps: Scalar = 1e-6,
    *,
    ord: float | None = None,
) -> GradientTransformation:
    """AdaGC as an optax transform: one EMA threshold per update leaf (``state.gamma``).
    See [`agclip.adagc`][agclip.adagc] for the rule."""
    options = {
        "lambda_abs": lambda_abs,
        "lambda_rel": lambda_rel,
        "beta": beta,
        "warmup_steps": warmup_steps,
        "eps": eps,
    }
    adagc_config(**options)
    p = order(ord)

    def update(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        del params
        return rules.adagc(updates, state, ord=p, **options)

    return transformation(rules.adagc_init, update)
