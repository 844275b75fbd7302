"""Clipping inside a fused optimizer step: the coefficient rides on the step's gradient scale.

torch's fused optimizers (Adam, AdamW, SGD with ``fused=True``) read two
tensors before their step, ``optimizer.grad_scale`` (every gradient is divided
by it inside the fused kernel) and ``optimizer.found_inf`` (the whole step is
skipped when it is nonzero); ``torch.amp.GradScaler`` uses the same pair. A clip
that hands ``1 / coefficient`` and ``norm is not finite`` to that step needs no
scale pass of its own, and no host sync.

A pending coefficient never leaks into a later step: a second clip replaces
it, the step consumes it, and a step whose gradients are not the ones that
were clipped (``zero_grad()`` then a new backward) drops it. On CPU a clip
with nothing to scale hands nothing over (the step runs as it would alone).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from .._kernels import Batch


def amp_scale(scaler: Any, optimizer: Any) -> torch.Tensor | None:
    """The loss scale still on the gradients: ``None`` once ``scaler.unscale_(optimizer)``
    ran, or when the scaler is disabled. Read on the device (no sync)."""
    if not scaler.is_enabled():
        return None
    state = scaler._per_optimizer_states.get(id(optimizer), {})
    if getattr(state.get("stage"), "name", "") == "UNSCALED":
        return None
    loss_scale: torch.Tensor | None = scaler._scale  # on the gradients' device; None before scale()
    return None if loss_scale is None else loss_scale.double()


def fuses_gradient_scaling(optimizer: Any) -> bool:
    """Whether ``optimizer.step()`` applies ``grad_scale`` / ``found_inf`` itself."""
    fused = bool(getattr(optimizer, "defaults", {}).get("fused"))
    return fused and bool(getattr(optimizer, "_step_supports_amp_scaling", False))


@dataclass
class _Pending:
    found_inf: torch.Tensor  # ours: if the attribute still holds it, nobody replaced it
    first_grad: weakref.ref[torch.Tensor]  # the gradients that were clipped


_pending: weakref.WeakKeyDictionary[Any, _Pending] = weakref.WeakKeyDictionary()
_hooked: weakref.WeakSet[Any] = weakref.WeakSet()


def hand_over_to(optimizer: Any, batch: Batch) -> Callable[[Any, Any], None] | None:
    """The pipeline's ``hand_over`` for ``optimizer``: ``None`` (scale the gradients
    here) unless it is a fused optimizer and there are gradients to clip."""
    if optimizer is None or not batch or not fuses_gradient_scaling(optimizer):
        return None
    return partial(hand_to_step, optimizer, batch)


def hand_to_step(optimizer: Any, batch: Batch, factor: torch.Tensor, norm: torch.Tensor) -> None:
    """Leave the clip to ``optimizer``'s next step: scale by ``factor``, skip when the
    norm is not finite. On CPU, where reading the factor is free, a step with
    nothing to clip gets no scale at all: the fused CPU kernel would otherwise
    write every gradient back unchanged."""
    device = batch.leaves[0].device
    if device.type == "cpu" and bool(factor == 1) and bool(torch.isfinite(norm)):
        pending = _pending.pop(optimizer, None)
        if pending is not None and _ours(optimizer, pending):
            _remove_scale(optimizer)  # a second clip replaces the first
        return
    grad_scale = (1.0 / factor).to(device=device, dtype=torch.float32)
    found_inf = (~torch.isfinite(norm)).to(device=device, dtype=torch.float32)
    optimizer.grad_scale = grad_scale
    optimizer.found_inf = found_inf
    _pending[optimizer] = _Pending(found_inf, weakref.ref(batch.leaves[0]))
    if optimizer not in _hooked:
        optimizer.register_step_pre_hook(_drop_if_stale)
        optimizer.register_step_post_hook(_consumed)
        _hooked.add(optimizer)


def _ours(optimizer: Any, pending: _Pending) -> bool:
    return getattr(optimizer, "found_inf", None) is pending.found_inf


def _drop_if_stale(optimizer: Any, args: Any, kwargs: Any) -> None:
    pending = _pending.get(optimizer)
    if pending is None or not _ours(optimizer, pending):
        return
    first = next(
        (p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None),
        None,
    )
    if first is not pending.first_grad():  # new gradients since the clip
        del _pending[optimizer]
        _remove_scale(optimizer)


def _consumed(optimizer: Any, args: Any, kwargs: Any) -> None:
    pending = _pending.pop(optimizer, None)
    if pending is not None and _ours(optimizer, pending):
        _remove_scale(optimizer)  # (a GradScaler replaced them otherwise, and deletes them itself)


def _remove_scale(optimizer: Any) -> None:
    del optimizer.grad_scale, optimizer.found_inf
