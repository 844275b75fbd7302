"""AutoClip: clip the global norm at a percentile of the norms seen so far.

The current norm joins the history first, then the threshold is the
``percentile`` (linear interpolation, as ``np.percentile``) of the last
``history`` finite norms. Non-finite norms stay out of the history, are counted
in ``state.nonfinite`` and pass the gradients unchanged.

Args:
    percentile: in [0, 100]; the paper recommends 10.

References:
    Seetharaman, Wichern, Pardo and Le Roux, "AutoClip: Adaptive Gradient Clipping
    for Source Separation Networks", MLSP 2020.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

from ._checks import check_range
from ._kernels import Kernels
from ._rule import RuleSpec, counted, like_value, scalars


class AutoClipState(NamedTuple):
    """AutoClip's state: a ring buffer of the last finite norms and counters.

    Attributes:
        count: finite norms seen (int32).
        history: the last ``len(history)`` finite norms, oldest overwritten first;
            unused slots hold inf.
        norm: the last pre-clip norm.
        threshold: the last threshold: the percentile of the history, the current
            norm included.
        spikes: steps whose norm was above the threshold (int32).
        nonfinite: steps whose norm was NaN or inf (int32).
    """

    count: Any
    history: Any
    norm: Any
    threshold: Any
    spikes: Any
    nonfinite: Any


def _new_state(k: Kernels, like: Any, dtype: Any, keys: list[str], window: int) -> AutoClipState:
    history = k.xp.full((window,), math.inf, dtype=dtype, **k.placement(like))
    return AutoClipState(
        history=history,
        **scalars(k, like, dtype, norm=0.0, threshold=math.inf),
        **scalars(k, like, k.xp.int32, count=0, spikes=0, nonfinite=0),
    )


def _thresholds(
    k: Kernels, norms: Any, norm: Any, state: AutoClipState, cfg: dict[str, Any]
) -> tuple[Any, None, Any]:
    """The percentile of the history with the current norm included, interpolated as
    ``np.percentile`` does."""
    xp = k.xp
    history = state.history
    x = xp.astype(norm, history.dtype)
    finite = xp.isfinite(x)
    window = history.shape[0]
    slots = xp.arange(window, dtype=state.count.dtype, **k.placement(history))
    history = xp.where((slots == state.count % window) & finite, x, history)
    count = counted(k, finite, state.count)
    held = xp.minimum(count, xp.full_like(count, window))
    last = xp.maximum(held - 1, xp.zeros_like(held))
    ordered = xp.sort(history)  # unused slots (inf) sort last
    position = like_value(k, cfg["percentile"], x) / 100.0 * xp.astype(last, x.dtype)
    low = xp.minimum(xp.astype(xp.floor(position), last.dtype), last)
    high = xp.minimum(low + 1, last)
    below = xp.take(ordered, xp.reshape(low, (1,)))[0]
    above = xp.take(ordered, xp.reshape(high, (1,)))[0]
    with k.quiet():
        found = below + (above - below) * (position - xp.astype(low, x.dtype))
    threshold = xp.where(held > 0, found, xp.full_like(x, math.inf))
    new = AutoClipState(
        count=count,
        history=history,
        norm=x,
        threshold=threshold,
        spikes=counted(k, finite & (x > threshold), state.spikes),
        nonfinite=counted(k, ~finite, state.nonfinite),
    )
    return threshold, None, lambda factor: new


AUTOCLIP = RuleSpec(
    title="AutoClip",
    doc=__doc__,
    state_type=AutoClipState,
    defaults={"percentile": 10},
    check=lambda h: {"percentile": check_range("percentile", h["percentile"], 0.0, 100.0)},
    new_state=_new_state,
    thresholds=_thresholds,
    window=("history", 10_000),
)
