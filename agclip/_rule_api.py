"""Adaptive clipping rules as pure functions of (gradients, state): ZClip, AutoClip, AdaGC.

Each rule has an ``*_init(grads)`` that builds its state (a NamedTuple of
arrays on the gradients' device) and a step ``(grads, state) -> (clipped,
state)``. The step is the usual pipeline with a threshold taken from the
state; it is branch-free, so it runs under ``jax.jit`` (compiled once for
all hyperparameter values), on CUDA without a host sync and on torch's
``meta`` device.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar, cast

import array_api_compat.numpy as np_compat
import numpy as np

from ._checks import check_count, check_ord
from ._dispatch import flatten_arrays, kernels_for
from ._kernels import Kernels
from ._pipeline import LOCAL, clip_by_rule, clip_by_tensor_rule
from ._rules import (
    COEFFICIENT_EPS,
    AdaGCState,
    AutoClipState,
    ZClipState,
    adagc_config,
    adagc_rule,
    adagc_state,
    autoclip_rule,
    autoclip_state,
    check_percentile,
    zclip_config,
    zclip_rule,
    zclip_state,
)
from ._typing import ArrayTree, Scalar

S = TypeVar("S")


def _init(grads: ArrayTree, make: Callable[[Kernels, Any, Any, int], Any]) -> Any:
    """``make(k, like, dtype, tensors)`` for the gradients' library, device and
    accumulator dtype; NumPy float32 for an empty tree."""
    flat, k = flatten_arrays(grads)
    if k is None:
        return make(kernels_for(np_compat), np.zeros((), np.float32), np.float32, 0)
    return make(k, flat.leaves[0], k.accumulator(k.prepare(flat.leaves)), len(flat.leaves))


def zclip_init(grads: ArrayTree) -> ZClipState:
    """ZClip's initial state for gradients like ``grads`` (only their library, device
    and dtypes are used): zero moments and counters, no threshold yet."""
    return _init(grads, lambda k, like, dtype, _: zclip_state(k, like, dtype))  # type: ignore[no-any-return]


def zclip(
    grads: ArrayTree,
    state: ZClipState,
    *,
    alpha: Scalar = 0.97,
    z_thresh: Scalar = 2.5,
    max_grad_norm: Scalar | None = None,
    eps: Scalar = 1e-6,
    warmup_steps: int = 25,
    mode: str = "zscore",
    clip_option: str = "adaptive_scaling",
    clip_factor: Scalar = 1.0,
    skip_update_on_spike: bool = False,
    ord: float = 2,
) -> tuple[ArrayTree, ZClipState]:
    """ZClip: clip the global norm when it is an outlier of its own recent history.

    The first ``warmup_steps`` finite norms only build the mean and variance
    (clipping at ``max_grad_norm`` if one is given). After that the norm's
    EMA mean and variance (smoothing ``alpha``) give a z-score; a norm with
    ``z > z_thresh`` is a spike and is clipped to ``mean + z_thresh**2 * std / z``
    (``clip_option="adaptive_scaling"``, the paper's rule, times
    ``clip_factor``) or to ``mean`` (``"mean"``). ``mode="percentile"`` clips
    every norm above ``mean + z_thresh * std`` to that value. The moments then
    take in the clipped value (not at all with ``skip_update_on_spike``).

    Differences from the zclip package: no hidden fixed cap
    (``max_grad_norm=None`` by default; the package's default of 1.0 makes it
    never looser than a fixed clip at 1); a NaN or inf norm leaves the
    moments untouched, is counted in ``state.nonfinite`` and passes the
    gradients unchanged (the package's moments turn NaN for good).

    Args:
        grads: a pytree of gradient arrays.
        state: the previous state (``zclip_init(grads)`` at first).
        alpha: EMA smoothing, in [0, 1).
        z_thresh: the z-score above which a norm is a spike (> 0).
        max_grad_norm: an optional fixed cap on the threshold, or ``None``.
        eps: added to the standard deviation in the z-score.
        warmup_steps: finite norms collected before clipping adaptively (>= 1).
        mode: ``"zscore"`` or ``"percentile"``.
        clip_option: ``"adaptive_scaling"`` or ``"mean"`` (z-score mode).
        clip_factor: multiplies the adaptive-scaling threshold (> 0).
        skip_update_on_spike: keep spikes out of the moments.
        ord: the norm's order: 2 (default), 1, ``inf`` or any p > 0.

    Returns:
        The pair ``(clipped, state)``; ``state.norm`` is the pre-clip norm and
        ``state.threshold`` the threshold in force (``inf``: none).

    Examples:
        >>> import numpy as np, agclip
        >>> grads = [np.ones(4)]
        >>> state = agclip.zclip_init(grads)
        >>> for _ in range(30):
        ...     _, state = agclip.zclip(grads, state)
        >>> clipped, state = agclip.zclip([np.full(4, 50.0)], state)
        >>> float(state.norm), float(np.linalg.norm(clipped[0])) < 2.1
        (100.0, True)

    References:
        Kumar, Owen, Roy Chowdhury and Güra, "ZClip: Adaptive Spike Mitigation
        for LLM Pre-Training", 2025 (arXiv:2504.02507).
    """
    config, modes = zclip_config(
        alpha=alpha,
        z_thresh=z_thresh,
        max_grad_norm=max_grad_norm,
        eps=eps,
        warmup_steps=warmup_steps,
        mode=mode,
        clip_option=clip_option,
        clip_factor=clip_factor,
        skip_update_on_spike=skip_update_on_spike,
    )
    return _step(grads, state, _by_rule, zclip_rule, config, p=check_ord(ord), **modes)


def autoclip_init(grads: ArrayTree, *, history: int = 10_000) -> AutoClipState:
    """AutoClip's initial state: an empty ring buffer for the last ``history`` norms."""
    window = check_count("history", history, low=1)
    return _init(grads, lambda k, like, dtype, _: autoclip_state(k, like, dtype, window))  # type: ignore[no-any-return]


def autoclip(
    grads: ArrayTree, state: AutoClipState, *, percentile: Scalar = 10, ord: float = 2
) -> tuple[ArrayTree, AutoClipState]:
    """AutoClip: clip the global norm at the ``percentile`` of the norms seen so far.

    The current norm joins the history first, then the threshold is the
    percentile (linear interpolation, as ``np.percentile``) of the last
    ``len(state.history)`` finite norms. Non-finite norms stay out of the
    history, are counted and pass unchanged.

    Args:
        grads: a pytree of gradient arrays.
        state: the previous state (``autoclip_init(grads, history=N)`` at first).
        percentile: in [0, 100]; the paper recommends 10.
        ord: the norm's order: 2 (default), 1, ``inf`` or any p > 0.

    Returns:
        The pair ``(clipped, state)``.

    References:
        Seetharaman, Wichern, Pardo and Le Roux, "AutoClip: Adaptive Gradient
        Clipping for Source Separation Networks", MLSP 2020.
    """
    return _step(
        grads, state, _by_rule, autoclip_rule, check_percentile(percentile), p=check_ord(ord)
    )


def adagc_init(grads: ArrayTree) -> AdaGCState:
    """AdaGC's initial state: one EMA norm per gradient tensor (leaf), all unset."""
    return _init(grads, adagc_state)  # type: ignore[no-any-return]


def adagc(
    grads: ArrayTree,
    state: AdaGCState,
    *,
    lambda_abs: Scalar = 1.0,
    lambda_rel: Scalar = 1.05,
    beta: Scalar = 0.98,
    warmup_steps: int = 100,
    eps: Scalar = 1e-6,
    ord: float = 2,
) -> tuple[ArrayTree, AdaGCState]:
    """AdaGC: clip each tensor at ``lambda_rel`` times the EMA of its own clipped norm.

    For the first ``warmup_steps`` steps the gradients are clipped globally at
    ``lambda_abs`` and each tensor's ``gamma`` is the smallest clipped norm
    seen; then each tensor is scaled by ``min(1, lambda_rel * gamma / (norm +
    eps))`` and ``gamma`` follows its clipped norm with smoothing ``beta``. A
    tensor with only zero gradients so far is not clipped. A non-finite global
    norm leaves ``gamma`` untouched and passes the gradients unchanged.

    Args:
        grads: a pytree of gradient arrays (one threshold per leaf).
        state: the previous state (``adagc_init(grads)`` at first).
        lambda_abs: the global threshold during warm-up (>= 0).
        lambda_rel: the allowed ratio to a tensor's EMA norm (> 0).
        beta: EMA smoothing, in [0, 1).
        warmup_steps: steps of global clipping first (>= 0).
        eps: added to each norm before dividing.
        ord: the norm's order: 2 (default), 1, ``inf`` or any p > 0.

    Returns:
        The pair ``(clipped, state)``; ``state.norm`` is the global pre-clip norm.

    References:
        Wang et al., "AdaGC: Improving Training Stability for Large Language
        Model Pretraining", 2025 (arXiv:2502.11034).
    """
    config = adagc_config(
        lambda_abs=lambda_abs,
        lambda_rel=lambda_rel,
        beta=beta,
        warmup_steps=warmup_steps,
        eps=eps,
    )
    return _step(grads, state, _by_tensor_rule, adagc_rule, config, p=check_ord(ord))


def _step(
    grads: ArrayTree, state: S, work: Any, rule: Any, *args: Any, p: float, **static: Any
) -> tuple[ArrayTree, S]:
    """Run one rule step as one compiled call on JAX: hyperparameters are traced
    arguments (no recompiling when they change), options static."""
    flat, k = flatten_arrays(grads)
    if k is None:
        return grads, state
    clipped, new_state = k.run(work, flat.leaves, state, *args, p=p, rule=rule, **static)
    return flat.unflatten(clipped), cast(S, new_state)


def _by_rule(
    k: Kernels, leaves: list[Any], state: Any, *args: Any, p: float, rule: Any, **static: Any
) -> Any:
    threshold = rule(k, *args, **static)
    clipped, _, state = clip_by_rule(k, k.prepare(leaves), threshold, state, COEFFICIENT_EPS, p=p)
    return clipped, state


def _by_tensor_rule(
    k: Kernels, leaves: list[Any], state: Any, config: Any, *, p: float, rule: Any
) -> Any:
    units = [(k.prepare([leaf]), LOCAL) for leaf in leaves]
    return clip_by_tensor_rule(k, units, rule(k, config), state, config.eps, p=p)
