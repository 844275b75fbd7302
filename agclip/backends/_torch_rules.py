"""Adaptive clipping objects for PyTorch: ``ZClip``, ``AutoClip`` and ``AdaGC``.

Each wraps a rule of ``agclip._rules``: ``step(model)`` clips the gradients in
place and returns the pre-clip norm. The state lives on the gradients' device
as tensors (no ``.item()``, no host sync per step), is saved with
``state_dict()`` and restored with ``load_state_dict()``. ``process_group``
makes the norm global as in ``clip_grad_norm_``; the objects also plug into
``GradientClipCallback`` (``GradientClipCallback(max_norm=ZClip())``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from .._checks import check_count
from .._kernels import Batch, Kernels
from .._pipeline import LOCAL, clip_by_rule, clip_by_tensor_rule
from .._rules import (
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
from .._typing import Scalar
from ._torch_distributed import distributed_batch
from ._torch_fused import hand_over_to
from ._torch_grads import (
    collect_grads,
    empty_norm,
    kernels,
    norm_type_arg,
    result_norm,
    unzip_named,
)

AUTOCLIP_FIRST_CAPACITY = 256  # an unbounded history starts here and doubles


class AdaptiveRule:
    """What the three rules share: ``step``, the state on the gradients' device,
    ``state_dict`` / ``load_state_dict``."""

    _state_type: Any  # the rule's state NamedTuple

    def __init__(self, norm_type: float | str, foreach: bool | None, process_group: Any):
        self.norm_type = norm_type_arg(norm_type)
        self.foreach = foreach
        self.process_group = process_group
        self.state: Any = None  # a NamedTuple of tensors, made at the first step

    @torch.no_grad()
    def step(self, model: torch.nn.Module | Any) -> torch.Tensor:
        """Clip the gradients of ``model`` (a module, or an iterable of parameters) in
        place; returns the pre-clip norm, a 0-d float32 tensor (float64 for float64
        gradients) on the gradients' device. Call it after ``backward()`` (after
        ``scaler.unscale_(optimizer)`` with AMP) and before ``optimizer.step()``."""
        names: list[str] | None = None
        if isinstance(model, torch.nn.Module):
            params, names = unzip_named(model.named_parameters())
        else:
            params = list(model)
        k = kernels(self.foreach)
        grads, _ = collect_grads(k, params, names)
        if not grads and self.process_group is None:
            return empty_norm()
        norm, _ = self.clip_batch(k, grads, self.process_group)
        return norm

    def clip_batch(
        self,
        k: Kernels,
        grads: Batch,
        process_group: Any,
        *,
        check: Any = None,
        optimizer: Any = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Clip a batch of gradients in place: the pre-clip norm (as returned) and
        whether this step clipped (a 0-d bool tensor). ``check(norm)`` runs before
        the first write; a fused ``optimizer`` takes the coefficient where the rule
        has a single one."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """The state as tensors, for a checkpoint (empty before the first step)."""
        return {} if self.state is None else {"state": dict(self.state._asdict())}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a state saved by ``state_dict()``. Tensors move to the gradients'
        device at the next step."""
        if not state_dict:
            self.state = None
            return
        saved = state_dict.get("state", {})
        fields = self._state_type._fields
        if set(saved) != set(fields):
            raise ValueError(
                f"{type(self).__name__}.load_state_dict: expected the state fields "
                f"{', '.join(fields)}, got {', '.join(sorted(saved)) or 'none'}"
            )
        self.state = self._state_type(**{name: torch.as_tensor(saved[name]) for name in fields})

    def _state_on(self, like: torch.Tensor, make: Any) -> Any:
        if self.state is None:
            self.state = make()
        elif self.state.count.device != like.device:
            self.state = type(self.state)(*(t.to(like.device) for t in self.state))
        return self.state


class _GlobalNormRule(AdaptiveRule):
    """A rule with one threshold for the global norm: the pipeline with ``clip_by_rule``."""

    def clip_batch(
        self,
        k: Kernels,
        grads: Batch,
        process_group: Any,
        *,
        check: Any = None,
        optimizer: Any = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        batch, reduce = distributed_batch(k, grads, process_group)
        like = batch.leaves[0] if batch else torch.zeros(())
        state = self._state_on(like, lambda: self._new_state(k, like, k.accumulator(batch)))
        _, norm, self.state = clip_by_rule(
            k,
            batch,
            self._rule(k),
            state,
            COEFFICIENT_EPS,
            p=self.norm_type,
            in_place=True,
            reduce=reduce,
            check=check,
            hand_over=hand_over_to(optimizer, batch),
        )
        clipped = torch.isfinite(norm) & (norm > self.state.threshold)
        return result_norm(k, norm, batch), clipped

    def _new_state(self, k: Kernels, like: torch.Tensor, dtype: torch.dtype) -> Any:
        raise NotImplementedError

    def _rule(self, k: Kernels) -> Any:
        raise NotImplementedError


class ZClip(_GlobalNormRule):
    """ZClip: clip the global norm when it is a z-score outlier of its EMA statistics.

    A drop-in for the ``zclip`` package's ``ZClip``: the same arguments with the
    same meaning, and ``step(model)`` after ``backward()``. The deliberate
    differences: ``max_grad_norm=None`` by default (the package's 1.0 adds a
    hidden fixed clip at 1); a NaN or inf norm leaves the statistics untouched,
    passes the gradients unchanged and is counted (the package's statistics
    turn NaN for good); ``step`` returns the norm as a tensor, not a float (no
    host sync); the state lives in ``state`` and survives ``state_dict()``.
    See [`agclip.zclip`][agclip.zclip] for the rule.

    Args:
        alpha: EMA smoothing of the norm's mean and variance, in [0, 1).
        z_thresh: the z-score above which a norm is a spike.
        max_grad_norm: an optional fixed cap on the threshold (``None``: none).
        eps: added to the standard deviation in the z-score.
        warmup_steps: finite norms collected before clipping adaptively.
        mode: ``"zscore"`` or ``"percentile"``.
        clip_option: ``"adaptive_scaling"`` (the paper's) or ``"mean"``.
        clip_factor: multiplies the adaptive-scaling threshold.
        skip_update_on_spike: keep spikes out of the statistics.
        norm_type: the norm's order (2.0 default, 1, ``inf``, any p > 0).
        foreach: as in ``clip_grad_norm_``.
        process_group: as in ``clip_grad_norm_``: the norm is global.

    Examples:
        >>> import torch
        >>> from agclip.backends.torch import ZClip
        >>> model = torch.nn.Linear(4, 1)
        >>> zclip = ZClip(warmup_steps=5)
        >>> for scale in [1.0] * 10 + [100.0]:
        ...     model.zero_grad()
        ...     model(torch.ones(2, 4)).sum().mul(scale).backward()
        ...     norm = zclip.step(model)
        >>> int(zclip.state.spikes), round(float(norm))
        (1, 632)
    """

    _state_type = ZClipState

    def __init__(
        self,
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
        norm_type: float | str = 2.0,
        foreach: bool | None = None,
        process_group: Any = None,
    ):
        super().__init__(norm_type, foreach, process_group)
        self.config, self.modes = zclip_config(
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

    def _new_state(self, k: Kernels, like: torch.Tensor, dtype: torch.dtype) -> Any:
        return zclip_state(k, like, dtype)

    def _rule(self, k: Kernels) -> Any:
        return zclip_rule(k, self.config, **self.modes)


class AutoClip(_GlobalNormRule):
    """AutoClip: clip the global norm at a percentile of the norms seen so far.

    Args:
        percentile: in [0, 100]; the paper's recommendation is 10.
        history: ``None`` keeps every norm, as the paper does (the buffer on
            the device doubles when full); ``N`` keeps the last N, the current
            one included (a fixed ring buffer).
        norm_type: the norm's order (2.0 default, 1, ``inf``, any p > 0).
        foreach: as in ``clip_grad_norm_``.
        process_group: as in ``clip_grad_norm_``: the norm is global.

    Unlike the paper's code, no norm is read on the host (it reads one per
    parameter per step) and the percentile is taken on the device.
    See [`agclip.autoclip`][agclip.autoclip] for the rule.
    """

    _state_type = AutoClipState

    def __init__(
        self,
        percentile: Scalar = 10,
        history: int | None = None,
        *,
        norm_type: float | str = 2.0,
        foreach: bool | None = None,
        process_group: Any = None,
    ):
        super().__init__(norm_type, foreach, process_group)
        self.percentile = check_percentile(percentile)
        self.history = None if history is None else check_count("history", history, low=1)
        self._steps = 0  # steps taken: a host-side bound on the norms held

    def clip_batch(self, k: Kernels, grads: Batch, process_group: Any, **options: Any) -> Any:
        if self.history is None and self.state is not None:
            self._grow_if_full()
        self._steps += 1
        return super().clip_batch(k, grads, process_group, **options)

    def _grow_if_full(self) -> None:
        history = self.state.history
        if self._steps >= history.shape[0]:  # keep every norm: double the buffer
            more = torch.full_like(history, float("inf"))
            self.state = self.state._replace(history=torch.cat([history, more]))

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        if self.state is None:
            self._steps = 0
            return
        # Read once here (not per step): how many norms the buffer holds.
        held, count = self.state.history.shape[0], int(self.state.count)
        if self.history is not None and held != self.history:
            raise ValueError(
                f"AutoClip(history={self.history}).load_state_dict: the state holds a "
                f"history of {held} norms; load it into AutoClip(history={held})"
            )
        if self.history is None and count > held:
            raise ValueError(
                f"AutoClip(history=None).load_state_dict: the state saw {count} norms but "
                f"kept only the last {held}; load it into AutoClip(history={held})"
            )
        self._steps = count

    def _new_state(self, k: Kernels, like: torch.Tensor, dtype: torch.dtype) -> Any:
        return autoclip_state(k, like, dtype, self.history or AUTOCLIP_FIRST_CAPACITY)

    def _rule(self, k: Kernels) -> Any:
        return autoclip_rule(k, self.percentile)


class AdaGC(AdaptiveRule):
    """AdaGC: clip each gradient tensor at a multiple of the EMA of its own norm.

    One threshold per parameter tensor, so the set of parameters with
    gradients must stay the same from step to step. The per-tensor factors
    cannot ride on a fused optimizer step: with the callback's ``optimizer``,
    the gradients are scaled here. With ``process_group`` or DTensor
    gradients, each tensor's norm is reduced across ranks (one all-reduce per
    tensor), so every rank must hold a part of every tensor (FSDP2, TP, FSDP1
    or ZeRO shards; checked at the first step). Pipeline stages, which hold
    different tensors, are refused: use ZClip or AutoClip there. See
    [`agclip.adagc`][agclip.adagc] for the rule.

    Args:
        lambda_abs: the global threshold during warm-up.
        lambda_rel: the allowed ratio to a tensor's EMA norm.
        beta: EMA smoothing, in [0, 1).
        warmup_steps: steps of global clipping first.
        eps: added to each norm before dividing.
        norm_type: the norm's order (2.0 default, 1, ``inf``, any p > 0).
        foreach: as in ``clip_grad_norm_``.
        process_group: as in ``clip_grad_norm_``.
    """

    _state_type = AdaGCState

    def __init__(
        self,
        lambda_abs: Scalar = 1.0,
        lambda_rel: Scalar = 1.05,
        beta: Scalar = 0.98,
        warmup_steps: int = 100,
        eps: Scalar = 1e-6,
        *,
        norm_type: float | str = 2.0,
        foreach: bool | None = None,
        process_group: Any = None,
    ):
        super().__init__(norm_type, foreach, process_group)
        self.config = adagc_config(
            lambda_abs=lambda_abs,
            lambda_rel=lambda_rel,
            beta=beta,
            warmup_steps=warmup_steps,
            eps=eps,
        )

    def clip_batch(
        self,
        k: Kernels,
        grads: Batch,
        process_group: Any,
        *,
        check: Any = None,
        optimizer: Any = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        del optimizer  # one factor per tensor: scaled here
        units = [distributed_batch(k, k.prepare([grad]), process_group) for grad in grads.leaves]
        if self.state is None and any(reduce is not LOCAL for _, reduce in units):
            _check_every_rank_holds(len(units))
        like = grads.leaves[0] if grads else torch.zeros(())
        state = self._state_on(like, lambda: adagc_state(k, like, k.accumulator(grads), len(units)))
        if state.gamma.shape[0] != len(units):
            raise ValueError(
                f"AdaGC keeps one threshold per gradient tensor: its state has "
                f"{state.gamma.shape[0]}, this step has {len(units)} gradients"
            )
        spikes = state.spikes
        _, self.state = clip_by_tensor_rule(
            k,
            units,
            adagc_rule(k, self.config),
            state,
            self.config.eps,
            p=self.norm_type,
            in_place=True,
            check=check,
        )
        return result_norm(k, self.state.norm, grads), self.state.spikes > spikes


def _check_every_rank_holds(tensors: int) -> None:
    """Per-tensor norms reduce across ranks tensor by tensor, so every rank must hold a
    part of every tensor (FSDP, TP, FSDP1 / ZeRO shards). Checked once, at the first
    step, with one all-reduce: pipeline stages would otherwise wait on each other's
    collectives."""
    nccl = dist.get_backend() == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    extremes = torch.tensor([tensors, -tensors], dtype=torch.float64, device=device)
    dist.all_reduce(extremes, op=dist.ReduceOp.MAX)  # the most and (negated) the fewest
    most, fewest = int(extremes[0]), -int(extremes[1])
    if most != fewest:
        raise ValueError(
            "AdaGC across ranks needs every rank to hold a part of every gradient tensor "
            f"(FSDP, tensor parallel, FSDP1 or ZeRO shards); the ranks hold between {fewest} "
            f"and {most} tensors (pipeline stages?). Use ZClip or AutoClip there: they need "
            "only the global norm."
        )
