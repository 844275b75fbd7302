"""ZClip: clip the global norm when it is an outlier of its own recent history.

The first ``warmup_steps`` finite norms only build the mean and variance
(clipping at ``max_grad_norm`` if one is given). After that the norm's EMA
mean and variance (smoothing ``alpha``) give a z-score; a norm with
``z > z_thresh`` is a spike and is clipped to ``mean + z_thresh**2 * std / z``
(``clip_option="adaptive_scaling"``, the paper's rule, times ``clip_factor``)
or to ``mean`` (``"mean"``). ``mode="percentile"`` clips every norm above
``mean + z_thresh * std`` to that value. The moments then take in the clipped
value (not at all with ``skip_update_on_spike``).

Differences from the zclip package: no hidden fixed cap (``max_grad_norm=None``
by default; the package's 1.0 makes it never looser than a fixed clip at 1);
a NaN or inf norm leaves the moments untouched, is counted in
``state.nonfinite`` and passes the gradients unchanged (the package's moments
turn NaN for good); a zero norm stays out of the statistics, and the warm-up
goes on until the norms show a spread (std > 1e-6 of the mean), so a warm-up of
all-zero or constant norms cannot make every later norm a spike (the package
then clips every gradient to zero, or to the constant, for good).

Args:
    alpha: EMA smoothing of the norm's mean and variance, in [0, 1).
    z_thresh: the z-score above which a norm is a spike (> 0).
    max_grad_norm: an optional fixed cap on the threshold, or ``None``.
    std_eps: added to the standard deviation in the z-score (``eps``: the same).
    warmup_steps: finite norms collected before clipping adaptively (>= 1).
    mode: ``"zscore"`` or ``"percentile"``.
    clip_option: ``"adaptive_scaling"`` (the paper's) or ``"mean"`` (z-score mode).
    clip_factor: multiplies the adaptive-scaling threshold (> 0).
    skip_update_on_spike: keep spikes out of the statistics.

References:
    Kumar, Owen, Roy Chowdhury and Güra, "ZClip: Adaptive Spike Mitigation for
    LLM Pre-Training", 2025 (arXiv:2504.02507).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

from ._checks import check_count, check_eps, check_flag, check_range, check_threshold, choice
from ._kernels import Kernels
from ._rule import RuleSpec, as_flag, counted, scalars

# Statistics without spread (constant norms) cannot tell an outlier: every larger norm
# would score as a spike and be clipped to the mean, which then never moves again.
SPREAD = 1e-6  # the smallest std, relative to the mean, that ends the warm-up


class ZClipState(NamedTuple):
    """ZClip's state: the norm's running moments and counters (0-d arrays).

    Attributes:
        count: finite norms taken into the moments (int32); warm-up ends at
            ``warmup_steps``.
        mean: the norm's mean: a plain mean during warm-up, an EMA after.
        var: the norm's variance, likewise (population variance during warm-up).
        norm: the last pre-clip norm.
        threshold: the last threshold in force (``inf``: none).
        spikes: steps clipped by the adaptive threshold (int32).
        nonfinite: steps whose norm was NaN or inf (int32): the gradients passed unchanged.
    """

    count: Any
    mean: Any
    var: Any
    norm: Any
    threshold: Any
    spikes: Any
    nonfinite: Any


def _check(h: dict[str, Any]) -> dict[str, Any]:
    mode = choice("mode", h["mode"], ("zscore", "percentile"))
    option = choice("clip_option", h["clip_option"], ("adaptive_scaling", "mean"))
    cap = h["max_grad_norm"]
    return {
        "alpha": check_range("alpha", h["alpha"], 0.0, 1.0, open_high=True),
        "z_thresh": check_range("z_thresh", h["z_thresh"], 0.0, open_low=True, open_high=True),
        "max_grad_norm": math.inf if cap is None else check_threshold("max_grad_norm", cap),
        "std_eps": check_eps(h["std_eps"], "std_eps"),
        "warmup_steps": check_count("warmup_steps", h["warmup_steps"], low=1),
        "mode": mode,
        "clip_option": option if mode == "zscore" else "adaptive_scaling",  # as the package
        "clip_factor": check_range("clip_factor", h["clip_factor"], 0.0, open_low=True),
        "skip_update_on_spike": check_flag("skip_update_on_spike", h["skip_update_on_spike"]),
    }


def _new_state(k: Kernels, like: Any, dtype: Any, keys: list[str], window: Any) -> ZClipState:
    return ZClipState(
        **scalars(k, like, dtype, mean=0.0, var=0.0, norm=0.0, threshold=math.inf),
        **scalars(k, like, k.xp.int32, count=0, spikes=0, nonfinite=0),
    )


def _thresholds(
    k: Kernels,
    norms: Any,
    norm: Any,
    state: ZClipState,
    cfg: dict[str, Any],
    *,
    mode: str,
    clip_option: str,
) -> tuple[Any, None, Any]:
    xp = k.xp
    mean, var = state.mean, state.var
    x = xp.astype(norm, mean.dtype)
    finite = xp.isfinite(x)
    std = xp.sqrt(var)
    warm = (state.count < cfg["warmup_steps"]) | ~(std > SPREAD * mean)
    z_thresh = cfg["z_thresh"]
    with k.quiet():
        if mode == "percentile":
            clip_val = mean + z_thresh * std
            spike = x > clip_val
        else:
            z = (x - mean) / (std + cfg["std_eps"])
            spike = z > z_thresh
            if clip_option == "mean":
                clip_val = mean
            else:  # the paper's reciprocal rule: mean + z_thresh * std / (z / z_thresh)
                clip_val = (mean + z_thresh * z_thresh * std / z) * cfg["clip_factor"]
        spike = spike & finite & ~warm
        capped = xp.full_like(x, cfg["max_grad_norm"])
        threshold = xp.minimum(xp.where(spike, clip_val, xp.full_like(x, math.inf)), capped)
        # Warm-up: the plain mean and population variance, online (Welford).
        n = xp.astype(state.count + 1, x.dtype)
        delta = x - mean
        warm_mean = mean + delta / n
        warm_var = (var * (n - 1.0) + delta * (x - warm_mean)) / n
        # After: EMAs of the norm, or of the clip value on a spike (var with the new mean).
        alpha = cfg["alpha"]
        seen = xp.where(spike, clip_val, x)
        ema_mean = alpha * mean + (1.0 - alpha) * seen
        ema_var = alpha * var + (1.0 - alpha) * (seen - ema_mean) ** 2
    # A zero norm carries nothing to learn (all-zero warm-ups would otherwise set a
    # zero mean that clips every later gradient to zero): it stays out, as NaN does.
    update = finite & (x > 0) & ~(spike & as_flag(k, cfg["skip_update_on_spike"]))
    new = ZClipState(
        count=counted(k, update, state.count),
        mean=xp.where(update, xp.where(warm, warm_mean, ema_mean), mean),
        var=xp.where(update, xp.where(warm, warm_var, ema_var), var),
        norm=x,
        threshold=threshold,
        spikes=counted(k, spike, state.spikes),
        nonfinite=counted(k, ~finite, state.nonfinite),
    )
    return threshold, None, lambda factor: new


ZCLIP = RuleSpec(
    title="ZClip",
    doc=__doc__,
    state_type=ZClipState,
    defaults={
        "alpha": 0.97,
        "z_thresh": 2.5,
        "max_grad_norm": None,
        "std_eps": 1e-6,
        "warmup_steps": 25,
        "mode": "zscore",
        "clip_option": "adaptive_scaling",
        "clip_factor": 1.0,
        "skip_update_on_spike": False,
    },
    check=_check,
    new_state=_new_state,
    thresholds=_thresholds,
    static=("mode", "clip_option"),
    aliases={"eps": "std_eps"},
    views={  # the zclip package's attributes
        "initialized": lambda state, h: state is not None and state.count >= h["warmup_steps"],
        "clip_option": lambda state, h: None if h["mode"] == "percentile" else h["clip_option"],
        "max_grad_norm": lambda state, h: (
            None if h["max_grad_norm"] == math.inf else h["max_grad_norm"]
        ),
    },
)
