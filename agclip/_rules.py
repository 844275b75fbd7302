"""Adaptive thresholds as pure functions of (norm, state): ZClip, AutoClip and AdaGC.

A rule turns this step's norm and its state into a threshold and a new state;
the pipeline (``_pipeline.clip_by_rule``) does the rest, so the norm, the
coefficient and the scale are the ones every other clip uses. States are
NamedTuples of arrays on the gradients' device, and every step is branch-free
(``where``, never ``if`` on a value): it runs under ``jax.jit`` (compiled once),
on CUDA without a host sync and on torch's ``meta`` device.

One robustness rule holds for all three: a non-finite norm leaves the
statistics untouched and is counted in ``nonfinite``; the pipeline then passes
the gradients unchanged, so that a finite check downstream still sees them.
(The reference ZClip lets one NaN poison its moments for good, and turns an
inf norm into NaN gradients.)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

from ._checks import check_count, check_eps, check_range, check_threshold
from ._kernels import Kernels, quiet

MODES = ("zscore", "percentile")
CLIP_OPTIONS = ("adaptive_scaling", "mean")


class ZClipState(NamedTuple):
    """ZClip's state: the norm's running moments and counters (0-d arrays)."""

    count: Any
    """Finite norms taken into the moments (int32); warm-up ends at ``warmup_steps``."""
    mean: Any
    """The norm's mean: a plain mean during warm-up, an EMA after."""
    var: Any
    """The norm's variance, likewise (population variance during warm-up)."""
    norm: Any
    """The last pre-clip norm."""
    threshold: Any
    """The last threshold in force (``inf``: none)."""
    spikes: Any
    """Steps clipped by the adaptive threshold (int32)."""
    nonfinite: Any
    """Steps whose norm was NaN or inf (int32): the gradients passed unchanged."""


class ZClipConfig(NamedTuple):
    """ZClip's hyperparameters: numbers or 0-d arrays (injectable under jit)."""

    alpha: Any
    z_thresh: Any
    max_grad_norm: Any  # inf: no fixed cap
    eps: Any
    warmup_steps: Any
    clip_factor: Any
    skip_update_on_spike: Any


class AutoClipState(NamedTuple):
    """AutoClip's state: a ring buffer of the last finite norms and counters."""

    count: Any
    """Finite norms seen (int32)."""
    history: Any
    """The last ``len(history)`` finite norms, oldest overwritten first; unused slots hold inf."""
    norm: Any
    """The last pre-clip norm."""
    threshold: Any
    """The last threshold: the percentile of the history, the current norm included."""
    spikes: Any
    """Steps whose norm was above the threshold (int32)."""
    nonfinite: Any
    """Steps whose norm was NaN or inf (int32)."""


class AdaGCState(NamedTuple):
    """AdaGC's state: one EMA norm per gradient tensor, and counters."""

    count: Any
    """Steps with a finite norm (int32); warm-up ends at ``warmup_steps``."""
    gamma: Any
    """Each tensor's EMA of its clipped norm, shape ``[tensors]``."""
    norm: Any
    """The last global pre-clip norm."""
    threshold: Any
    """Each tensor's last threshold, ``lambda_rel * gamma`` (``lambda_abs``, the global
    threshold, during warm-up)."""
    spikes: Any
    """Steps after warm-up in which some tensor was clipped (int32)."""
    nonfinite: Any
    """Steps whose norm was NaN or inf (int32)."""


class AdaGCConfig(NamedTuple):
    lambda_abs: Any
    lambda_rel: Any
    beta: Any
    warmup_steps: Any
    eps: Any


# -- state construction ----------------------------------------------------------
def _scalars(k: Kernels, like: Any, dtype: Any, **values: float) -> dict[str, Any]:
    xp, where = k.xp, k.placement(like)
    return {name: xp.full((), value, dtype=dtype, **where) for name, value in values.items()}


def _counters(k: Kernels, like: Any, *names: str) -> dict[str, Any]:
    return _scalars(k, like, k.xp.int32, **dict.fromkeys(names, 0))


def zclip_state(k: Kernels, like: Any, dtype: Any) -> ZClipState:
    return ZClipState(
        **_scalars(k, like, dtype, mean=0.0, var=0.0, norm=0.0, threshold=math.inf),
        **_counters(k, like, "count", "spikes", "nonfinite"),
    )


def autoclip_state(k: Kernels, like: Any, dtype: Any, window: int) -> AutoClipState:
    xp = k.xp
    history = xp.full((window,), math.inf, dtype=dtype, **k.placement(like))
    return AutoClipState(
        history=history,
        **_scalars(k, like, dtype, norm=0.0, threshold=math.inf),
        **_counters(k, like, "count", "spikes", "nonfinite"),
    )


def adagc_state(k: Kernels, like: Any, dtype: Any, tensors: int) -> AdaGCState:
    xp, where = k.xp, k.placement(like)
    return AdaGCState(
        gamma=xp.zeros((tensors,), dtype=dtype, **where),
        threshold=xp.full((tensors,), math.inf, dtype=dtype, **where),
        **_scalars(k, like, dtype, norm=0.0),
        **_counters(k, like, "count", "spikes", "nonfinite"),
    )


# -- helpers -----------------------------------------------------------------------
def _like(k: Kernels, value: Any, like: Any) -> Any:
    """``value`` (a number or a 0-d array) as an array of ``like``'s dtype and device."""
    xp = k.xp
    if isinstance(value, (int, float)):
        return xp.full_like(like, float(value))
    return xp.astype(k.on_device_of(value, like), like.dtype)


def _flag(k: Kernels, value: Any) -> Any:
    """A Python bool as it is; an injected array as a bool array."""
    return value if isinstance(value, bool) else k.xp.astype(value, k.xp.bool)


def _count(k: Kernels, flag: Any, counter: Any) -> Any:
    return counter + k.xp.astype(flag, counter.dtype)


# -- ZClip -------------------------------------------------------------------------
def zclip_threshold(
    k: Kernels, norm: Any, state: ZClipState, cfg: ZClipConfig, *, mode: str, clip_option: str
) -> tuple[Any, ZClipState]:
    """This step's threshold and the new state (Kumar et al., 2025; the zclip package's
    rules, warm-up moments computed online instead of from a buffer)."""
    xp = k.xp
    mean, var = state.mean, state.var
    x = xp.astype(norm, mean.dtype)
    finite = xp.isfinite(x)
    warm = state.count < cfg.warmup_steps
    std = xp.sqrt(var)
    with quiet():
        if mode == "percentile":
            clip_val = mean + cfg.z_thresh * std
            spike = x > clip_val
        else:
            z = (x - mean) / (std + cfg.eps)
            spike = z > cfg.z_thresh
            if clip_option == "mean":
                clip_val = mean
            else:  # the paper's reciprocal rule: mean + z_thresh * std / (z / z_thresh)
                clip_val = (mean + cfg.z_thresh * cfg.z_thresh * std / z) * cfg.clip_factor
        spike = spike & finite & ~warm
        inf = xp.full_like(x, math.inf)
        threshold = xp.minimum(xp.where(spike, clip_val, inf), _like(k, cfg.max_grad_norm, x))
        # Warm-up: the plain mean and population variance, online (Welford).
        n = xp.astype(state.count + 1, x.dtype)
        delta = x - mean
        warm_mean = mean + delta / n
        warm_var = (var * (n - 1.0) + delta * (x - warm_mean)) / n
        # After: EMAs of the norm, or of the clip value on a spike (var with the new mean).
        seen = xp.where(spike, clip_val, x)
        ema_mean = cfg.alpha * mean + (1.0 - cfg.alpha) * seen
        ema_var = cfg.alpha * var + (1.0 - cfg.alpha) * (seen - ema_mean) ** 2
    update = finite & ~(spike & _flag(k, cfg.skip_update_on_spike))
    return threshold, ZClipState(
        count=_count(k, update, state.count),
        mean=xp.where(update, xp.where(warm, warm_mean, ema_mean), mean),
        var=xp.where(update, xp.where(warm, warm_var, ema_var), var),
        norm=x,
        threshold=threshold,
        spikes=_count(k, spike, state.spikes),
        nonfinite=_count(k, ~finite, state.nonfinite),
    )


# -- AutoClip ----------------------------------------------------------------------
def autoclip_threshold(
    k: Kernels, norm: Any, state: AutoClipState, percentile: Any
) -> tuple[Any, AutoClipState]:
    """This step's threshold, the ``percentile`` of the norms in the history with the
    current one included (Seetharaman et al., 2020), interpolated as ``np.percentile``
    does; and the new state."""
    xp = k.xp
    history = state.history
    x = xp.astype(norm, history.dtype)
    finite = xp.isfinite(x)
    window = history.shape[0]
    slots = xp.arange(window, dtype=state.count.dtype, **k.placement(history))
    history = xp.where((slots == state.count % window) & finite, x, history)
    count = _count(k, finite, state.count)
    held = xp.minimum(count, xp.full_like(count, window))
    last = xp.maximum(held - 1, xp.zeros_like(held))
    ordered = xp.sort(history)  # unused slots (inf) sort last
    position = _like(k, percentile, x) / 100.0 * xp.astype(last, x.dtype)
    low = xp.minimum(xp.astype(xp.floor(position), last.dtype), last)
    high = xp.minimum(low + 1, last)
    below = xp.take(ordered, xp.reshape(low, (1,)))[0]
    above = xp.take(ordered, xp.reshape(high, (1,)))[0]
    with quiet():
        found = below + (above - below) * (position - xp.astype(low, x.dtype))
    threshold = xp.where(held > 0, found, xp.full_like(x, math.inf))
    spike = finite & (x > threshold)
    return threshold, AutoClipState(
        count=count,
        history=history,
        norm=x,
        threshold=threshold,
        spikes=_count(k, spike, state.spikes),
        nonfinite=_count(k, ~finite, state.nonfinite),
    )


# -- AdaGC -------------------------------------------------------------------------
def adagc_thresholds(
    k: Kernels, norms: Any, total: Any, state: AdaGCState, cfg: AdaGCConfig
) -> tuple[Any, Any, Callable[[Any], AdaGCState]]:
    """The thresholds for this step: one for the global norm ``total``, one per
    tensor norm in ``norms`` (each tensor's factor is the product of the two
    coefficients); and the state update, given the factors (Wang et al., 2025).

    Warm-up: one global clip at ``lambda_abs``, and ``gamma`` the smallest clipped
    norm seen. After: each tensor clipped at ``lambda_rel * gamma``, and ``gamma``
    an EMA of its clipped norm. A tensor whose ``gamma`` is still 0 (only zero
    gradients so far) is not clipped, and its ``gamma`` starts from its first
    nonzero norm: a zero threshold would silence it for good.
    """
    xp = k.xp
    gamma = state.gamma
    norms = xp.astype(norms, gamma.dtype)
    total = xp.astype(total, gamma.dtype)
    finite = xp.isfinite(total)
    warm = state.count < cfg.warmup_steps
    unset = gamma == 0
    inf = xp.full_like(total, math.inf)
    global_threshold = xp.where(warm, _like(k, cfg.lambda_abs, total), inf)
    own = cfg.lambda_rel * gamma
    each_threshold = xp.where(warm | unset, xp.full_like(gamma, math.inf), own)

    def update(factors: Any) -> AdaGCState:
        with quiet():
            clipped = xp.astype(factors, gamma.dtype) * norms
            warm_gamma = xp.minimum(gamma, clipped)
            ema_gamma = cfg.beta * gamma + (1.0 - cfg.beta) * clipped
            new_gamma = xp.where(unset, clipped, xp.where(warm, warm_gamma, ema_gamma))
        spike = finite & ~warm & xp.any(norms > each_threshold)
        shown = xp.where(warm, xp.full_like(gamma, 1.0) * global_threshold, own)
        return AdaGCState(
            count=_count(k, finite, state.count),
            gamma=xp.where(finite, new_gamma, gamma),
            norm=total,
            threshold=xp.where(finite, shown, state.threshold),
            spikes=_count(k, spike, state.spikes),
            nonfinite=_count(k, ~finite, state.nonfinite),
        )

    return global_threshold, each_threshold, update


# -- validated configurations --------------------------------------------------
COEFFICIENT_EPS = 1e-6  # torch's and the zclip package's max_norm / (norm + 1e-6)


def zclip_config(
    *,
    alpha: Any,
    z_thresh: Any,
    max_grad_norm: Any,
    eps: Any,
    warmup_steps: Any,
    mode: Any,
    clip_option: Any,
    clip_factor: Any,
    skip_update_on_spike: Any,
) -> tuple[ZClipConfig, dict[str, str]]:
    """ZClip's checked hyperparameters and its static options (``mode``, ``clip_option``)."""
    modes = {"mode": _choice("mode", mode, MODES)}
    modes["clip_option"] = (
        _choice("clip_option", clip_option, CLIP_OPTIONS)
        if modes["mode"] == "zscore"
        else "adaptive_scaling"  # ignored in percentile mode, as in the zclip package
    )
    cap = math.inf if max_grad_norm is None else check_threshold("max_grad_norm", max_grad_norm)
    config = ZClipConfig(
        alpha=check_range("alpha", alpha, 0.0, 1.0, open_high=True),
        z_thresh=check_range("z_thresh", z_thresh, 0.0, open_low=True, open_high=True),
        max_grad_norm=cap,
        eps=check_eps(eps),
        warmup_steps=check_count("warmup_steps", warmup_steps, low=1),
        clip_factor=check_range("clip_factor", clip_factor, 0.0, open_low=True, open_high=True),
        skip_update_on_spike=_check_flag("skip_update_on_spike", skip_update_on_spike),
    )
    return config, modes


def adagc_config(
    *, lambda_abs: Any, lambda_rel: Any, beta: Any, warmup_steps: Any, eps: Any
) -> AdaGCConfig:
    """AdaGC's checked hyperparameters."""
    return AdaGCConfig(
        lambda_abs=check_threshold("lambda_abs", lambda_abs),
        lambda_rel=check_range("lambda_rel", lambda_rel, 0.0, open_low=True, open_high=True),
        beta=check_range("beta", beta, 0.0, 1.0, open_high=True),
        warmup_steps=check_count("warmup_steps", warmup_steps, low=0),
        eps=check_eps(eps),
    )


def check_percentile(value: Any) -> Any:
    return check_range("percentile", value, 0.0, 100.0)


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> str:
    chosen = value.lower() if isinstance(value, str) else value
    if chosen not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")
    return str(chosen)


def _check_flag(name: str, value: Any) -> Any:
    if isinstance(value, bool) or (
        getattr(value, "shape", None) == () and not isinstance(value, str)
    ):
        return value
    raise TypeError(f"{name} must be a bool, got {value!r}")


# -- the rules as the pipeline takes them ----------------------------------------
def zclip_rule(
    k: Kernels, config: ZClipConfig, *, mode: str, clip_option: str
) -> Callable[..., Any]:
    return partial(zclip_threshold, k, cfg=config, mode=mode, clip_option=clip_option)


def autoclip_rule(k: Kernels, percentile: Any) -> Callable[..., Any]:
    return partial(autoclip_threshold, k, percentile=percentile)


def adagc_rule(k: Kernels, config: AdaGCConfig) -> Callable[..., Any]:
    return partial(adagc_thresholds, k, cfg=config)
