"""AdaGC: clip each tensor at ``lambda_rel`` times the EMA of its own clipped norm.

For the first ``warmup_steps`` steps the gradients are clipped globally at
``lambda_abs`` and each tensor's ``gamma`` is the smallest clipped norm seen;
then each tensor is scaled by ``min(1, lambda_rel * gamma / (norm + eps))``
and ``gamma`` follows its clipped norm with smoothing ``beta``. A tensor with
only zero gradients so far is not clipped. A non-finite global norm leaves
``gamma`` untouched and passes the gradients unchanged. The state keeps one
entry per tensor, keyed by the tensor: gradients of other tensors than the
state's are a ``ValueError`` naming the first that differs.

Args:
    lambda_abs: the global threshold during warm-up (>= 0).
    lambda_rel: the allowed ratio to a tensor's EMA norm (> 0).
    beta: EMA smoothing, in [0, 1).
    warmup_steps: steps of global clipping first (>= 0).
    eps: added to each norm before dividing (>= 0).

References:
    Wang et al., "AdaGC: Improving Training Stability for Large Language Model
    Pretraining", 2025 (arXiv:2502.11034).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

from ._checks import check_count, check_eps, check_range, check_threshold
from ._kernels import Kernels
from ._rule import RuleSpec, counted, like_value, scalars


class AdaGCState(NamedTuple):
    """AdaGC's state: one EMA norm per gradient tensor, and counters.

    Attributes:
        count: steps with a finite norm (int32); warm-up ends at ``warmup_steps``.
        gamma: each tensor's EMA of its clipped norm: a dict keyed by the tensor (its
            key path and shape, or its parameter name).
        norm: the last global pre-clip norm.
        threshold: each tensor's last threshold, ``lambda_rel * gamma``
            (``lambda_abs``, the global threshold, during warm-up), keyed like ``gamma``.
        spikes: steps after warm-up in which some tensor was clipped (int32).
        nonfinite: steps whose norm was NaN or inf (int32).
    """

    count: Any
    gamma: Any
    norm: Any
    threshold: Any
    spikes: Any
    nonfinite: Any


def _check(h: dict[str, Any]) -> dict[str, Any]:
    return {
        "lambda_abs": check_threshold("lambda_abs", h["lambda_abs"]),
        "lambda_rel": check_range(
            "lambda_rel", h["lambda_rel"], 0.0, open_low=True, open_high=True
        ),
        "beta": check_range("beta", h["beta"], 0.0, 1.0, open_high=True),
        "warmup_steps": check_count("warmup_steps", h["warmup_steps"], low=0),
        "eps": check_eps(h["eps"]),
    }


def _new_state(k: Kernels, like: Any, dtype: Any, keys: list[str], window: Any) -> AdaGCState:
    def each(value: float) -> dict[str, Any]:
        return {key: k.xp.full((), value, dtype=dtype, **k.placement(like)) for key in keys}

    return AdaGCState(
        gamma=each(0.0),
        threshold=each(math.inf),
        **scalars(k, like, dtype, norm=0.0),
        **scalars(k, like, k.xp.int32, count=0, spikes=0, nonfinite=0),
    )


def _thresholds(
    k: Kernels, norms: Any, total: Any, state: AdaGCState, cfg: dict[str, Any]
) -> tuple[Any, Any, Any]:
    """A threshold for the global norm, one per tensor, and the state update given the
    factors. A tensor whose ``gamma`` is still 0 (only zero gradients so far) is not
    clipped, and its ``gamma`` starts from its first nonzero norm: a zero threshold
    would silence it for good."""
    xp = k.xp
    gamma = state.gamma  # a vector here: one entry per tensor, in the gradients' order
    norms = xp.astype(norms, gamma.dtype)
    total = xp.astype(total, gamma.dtype)
    finite = xp.isfinite(total)
    warm = state.count < cfg["warmup_steps"]
    unset = gamma == 0
    inf = xp.full_like(total, math.inf)
    global_threshold = xp.where(warm, like_value(k, cfg["lambda_abs"], total), inf)
    own = cfg["lambda_rel"] * gamma
    each_threshold = xp.where(warm | unset, xp.full_like(gamma, math.inf), own)

    def update(factors: Any) -> AdaGCState:
        with k.quiet():
            clipped = xp.astype(factors, gamma.dtype) * norms
            warm_gamma = xp.minimum(gamma, clipped)
            ema_gamma = cfg["beta"] * gamma + (1.0 - cfg["beta"]) * clipped
            new_gamma = xp.where(unset, clipped, xp.where(warm, warm_gamma, ema_gamma))
        spike = finite & ~warm & xp.any(norms > each_threshold)
        shown = xp.where(warm, xp.full_like(gamma, 1.0) * global_threshold, own)
        return AdaGCState(
            count=counted(k, finite, state.count),
            gamma=xp.where(finite, new_gamma, gamma),
            norm=total,
            threshold=xp.where(finite, shown, state.threshold),
            spikes=counted(k, spike, state.spikes),
            nonfinite=counted(k, ~finite, state.nonfinite),
        )

    return global_threshold, each_threshold, update


ADAGC = RuleSpec(
    title="AdaGC",
    doc=__doc__,
    state_type=AdaGCState,
    defaults={
        "lambda_abs": 1.0,
        "lambda_rel": 1.05,
        "beta": 0.98,
        "warmup_steps": 100,
        "eps": 1e-6,
    },
    check=_check,
    new_state=_new_state,
    thresholds=_thresholds,
    per_tensor=("gamma", "threshold"),
    coefficient_eps="eps",
)
