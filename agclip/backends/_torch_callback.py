"""GradientClipCallback: clip after every backward pass, and warn early about bad gradients."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import torch
from torch.nn.modules.module import (
    register_module_module_registration_hook,
    register_module_parameter_registration_hook,
)

from .._checks import check_count
from .._kernels import Batch, Kernels
from .._typing import Scalar
from ._torch_clip import (
    Decision,
    FixedThreshold,
    clip_then_step,
    decide_for,
    loss_scale,
    optimizer_params,
    real_optimizer,
    syncs_gradients,
    wrapper_scaler,
)
from ._torch_distributed import distributed_batch
from ._torch_grads import (
    Labels,
    LastClipped,
    empty_norm,
    kernels,
    nonfinite_labels,
    norm_type_arg,
    raise_if_nonfinite,
    threshold,
    unzip_named,
    warn_at_caller,
    warn_if_unsynchronised,
)
from ._torch_rules import AdaptiveRule


class _Registrations:
    """How many modules and parameters were registered anywhere in this process (torch's
    global registration hooks): a model's parameters are read again only after one."""

    count = 0

    @classmethod
    def counted(cls, *_: Any) -> None:
        cls.count += 1


register_module_module_registration_hook(_Registrations.counted)
register_module_parameter_registration_hook(_Registrations.counted)


class NonFiniteGradientWarning(RuntimeWarning):
    """Gradients held NaN or inf at a step (the callback names the parameters)."""


class GradientClipCallback:
    """Clip a model's gradients after each backward pass and keep statistics.

    Call ``set_model`` once, then ``on_after_backward`` after every
    ``loss.backward()`` (after ``scaler.unscale_(optimizer)`` with AMP) and
    before ``optimizer.step()``; or ``clip_and_step(optimizer)`` instead of both
    the clip and the step (a fused optimizer then takes the coefficient inside
    its step: no scale pass).

    It is also an early-warning system: when gradients go non-finite it names
    the parameters (``head.weight``) in a ``NonFiniteGradientWarning``, or
    raises ``RuntimeError`` before touching anything with
    ``error_if_nonfinite=True``. On CPU the check is free. On other devices it
    reads one flag every ``check_every`` steps (default 1); raise it to avoid a
    per-step host sync: the flag accumulates on the device in between.

    Statistics (``steps``, ``clipped_steps``, ``clip_rate``, ``last_norm``)
    accumulate on the device; reading them syncs, stepping does not.

    Args:
        max_norm: the largest total gradient norm allowed (default 1.0), or an
            adaptive rule (``ZClip()``, ``AutoClip()``, ``AdaGC()``) that sets the
            threshold each step; ``clipped_steps`` then counts the steps it clipped.
        norm_type: 2.0 (default), 1, ``inf`` or any p > 0 (a rule has its own).
        error_if_nonfinite: raise instead of warning on NaN/inf gradients.
        warn_nonfinite: warn on NaN/inf gradients (set False under a
            ``GradScaler``, which expects and skips such steps itself).
        check_every: off-CPU, how many steps between non-finite checks.
        foreach: passed to the scale kernels, as in ``clip_grad_norm_``.
        process_group: as in ``clip_grad_norm_``: the group over which plain
            gradients are partitioned (DTensor gradients need none).

    Examples:
        >>> import torch
        >>> from agclip.backends.torch import GradientClipCallback
        >>> model = torch.nn.Linear(4, 2)
        >>> cb = GradientClipCallback(max_norm=1.0)
        >>> cb.set_model(model)
        >>> model(torch.randn(8, 4)).pow(2).sum().mul(100).backward()
        >>> norm = cb.on_after_backward()
        >>> cb.steps, cb.clipped_steps
        (1, 1)

    References:
        Pascanu, Mikolov and Bengio, "On the difficulty of training recurrent
        neural networks", ICML 2013.
    """

    def __init__(
        self,
        max_norm: Scalar | AdaptiveRule = 1.0,
        norm_type: float | str = 2.0,
        error_if_nonfinite: bool = False,
        *,
        warn_nonfinite: bool = True,
        check_every: int = 1,
        foreach: bool | None = None,
        process_group: Any = None,
    ):
        if not isinstance(check_every, int) or check_every < 1:
            raise ValueError(f"check_every must be an int >= 1, got {check_every!r}")
        self.max_norm, self.norm_type = max_norm, norm_type_arg(norm_type)
        self.rule: Any = max_norm
        if not isinstance(max_norm, AdaptiveRule):
            self.rule = FixedThreshold(threshold("max_norm", max_norm), self.norm_type)
        self.error_if_nonfinite, self.warn_nonfinite = error_if_nonfinite, warn_nonfinite
        self.check_every, self.foreach, self.process_group = check_every, foreach, process_group
        self._model: torch.nn.Module | None = None  # until set_model
        # The model's parameters, names and names by id, and when they were read.
        self._named: tuple[int, list[Any], list[str], dict[int, str]] | None = None
        self._last = LastClipped()
        self.steps = 0
        self._clipped: Any = 0  # tensors on the device once stepping
        self._nonfinite: Any = False
        self.last_norm: torch.Tensor | None = None
        self.last_clipped: torch.Tensor | None = None  # whether the last step clipped

    def set_model(self, model: torch.nn.Module) -> None:
        """Clip this model's parameters (named as in ``model.named_parameters()``; layers
        replaced or built later count too)."""
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self._model, self._named = model, None

    @torch.no_grad()
    def on_after_backward(self, optimizer: Any = None, *, scaler: Any = None) -> torch.Tensor:
        """Clip the gradients in place; returns the pre-clip total norm.

        Args:
            optimizer: clip only this optimizer's parameters (a trainer with several
                optimizers steps each one on its own); its wrapper's GradScaler, if
                any, is found as in ``clip_and_step``.
            scaler: a ``torch.amp.GradScaler`` whose gradients may still be scaled
                (not yet ``unscale_``-d for ``optimizer``): the norm and the clip are
                then those of the unscaled gradients, and the scaler's later
                unscale (inside a fused step, or its own ``step``) finishes the job.

        A step counts once it has succeeded: with ``error_if_nonfinite=True``
        a step that raises leaves ``steps`` and the gradients as they were.
        """
        inner = None if optimizer is None else real_optimizer(optimizer)
        if inner is None:
            params, names, _ = self._named_params()
            if params and all(p.grad is None for p in params):  # replaced without a hook
                params, names, _ = self._named_params(again=True)  # (``to_empty``)?
        else:
            params = optimizer_params(inner)
            names = self._named_like(params)
        k = kernels(self.foreach)
        divisor = loss_scale(scaler if scaler is not None else wrapper_scaler(optimizer), inner)
        decision = decide_for(
            k,
            params,
            names,
            self.rule,
            self.process_group,
            check_for=partial(self._observer, k),
            divisor=divisor,
        )
        if decision is not None:
            decision.apply(k)
        return self._recorded(k, decision)

    @torch.no_grad()
    def clip_and_step(self, optimizer: Any, *, scaler: Any = None) -> torch.Tensor:
        """Clip the gradients of ``optimizer``'s parameters and take its step, in one
        call (see ``agclip.backends.torch.clip_and_step``), with this callback's
        threshold, statistics and warnings. Parameters of the model set with
        ``set_model`` are named in messages."""
        syncing = syncs_gradients(optimizer)
        k, decision = clip_then_step(
            optimizer,
            self.rule,
            scaler=scaler,
            foreach=self.foreach,
            process_group=self.process_group,
            check_for=partial(self._observer, kernels(self.foreach)),
            names_for=self._named_like,
        )
        if not syncing:  # mid-way through accelerate's accumulation: no step, none counted
            return empty_norm() if decision is None else decision.returned_norm(k)
        return self._recorded(k, decision)

    def _named_params(self, again: bool = False) -> tuple[list[Any], list[str], dict[int, str]]:
        """The model's parameters, names and names by id, read again after any module or
        parameter is registered: a layer replaced since ``set_model``, or built after it
        (Lightning's ``configure_model``), counts too."""
        if self._model is None:
            raise RuntimeError("call set_model(model) before clipping")
        named = self._named
        if again or named is None or named[0] != _Registrations.count:
            params, names = unzip_named(self._model.named_parameters())
            by_id = {id(param): name for param, name in zip(params, names, strict=True)}
            named = (_Registrations.count, params, names, by_id)
            if not torch.compiler.is_compiling():  # a trace restarts: it keeps nothing
                self._named = named
        return named[1:]

    def _named_like(self, params: list[Any]) -> list[str]:
        """The model's names of ``params`` (an optimizer may hold others)."""
        by_id = self._named_params()[2]
        if any(id(p) not in by_id for p in params):  # replaced without a hook (``to_empty``)?
            by_id = self._named_params(again=True)[2]
        return [by_id.get(id(p), f"optimizer parameter {i}") for i, p in enumerate(params)]

    def _observer(self, k: Kernels, grads: Batch, labels: Labels) -> Callable[[Any], None]:
        """The check between the norm and the first write: refuse (``error_if_nonfinite``),
        then count the step and warn about non-finite gradients. Made once the
        gradients are collected, when a clip in the wrong place can be told."""
        warn_if_unsynchronised(self._model)
        self._last.warn_if_same(grads.leaves)
        # Messages read the local shards: every rank can do that on its own.
        local, _ = distributed_batch(k, grads, self.process_group)
        refuse = raise_if_nonfinite(k, local, labels) if self.error_if_nonfinite else None

        def observe(norm: torch.Tensor) -> None:
            if refuse is not None:
                refuse(norm)
            self.steps += 1
            self._nonfinite = self._nonfinite | ~torch.isfinite(norm)
            if self.warn_nonfinite and self._should_check(norm):
                self._warn_if_nonfinite(local, labels)

        return observe

    def _recorded(self, k: Kernels, decision: Decision | None) -> torch.Tensor:
        """Record the step's norm and whether it clipped (no gradients: a step of 0)."""
        norm, clipped = empty_norm(), torch.tensor(False)
        if decision is None:
            self.steps += 1
        else:
            self._last.remember(decision.batch.leaves)
            norm, clipped = decision.returned_norm(k), decision.clipped()
        self.last_norm, self.last_clipped = norm, clipped
        self._clipped = self._clipped + clipped
        return norm

    def _should_check(self, norm: torch.Tensor) -> bool:
        return norm.device.type == "cpu" or self.steps % self.check_every == 0

    def _warn_if_nonfinite(self, grads: Batch, labels: Labels) -> None:
        if not bool(self._nonfinite):
            return
        self._nonfinite = False
        bad = nonfinite_labels(grads, labels) or ["(none at this step; earlier since last check)"]
        warn_at_caller(
            f"non-finite gradients at step {self.steps} in: {', '.join(bad)}",
            NonFiniteGradientWarning,
        )

    @property
    def clipped_steps(self) -> int:
        """How many steps clipped (reading it syncs)."""
        return int(self._clipped)

    @property
    def clip_rate(self) -> float:
        """The share of steps that clipped (reading it syncs)."""
        return self.clipped_steps / self.steps if self.steps else 0.0

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to go on as if uninterrupted: the statistics and the
        rule's state (tensors; reading ``clipped_steps`` syncs)."""
        adaptive = isinstance(self.rule, AdaptiveRule)
        return {
            "threshold": self._threshold_kind(),
            "steps": self.steps,
            "clipped_steps": self.clipped_steps,
            "rule": self.rule.state_dict() if adaptive else {},
        }

    def _threshold_kind(self) -> str:
        return type(self.rule).__name__ if isinstance(self.rule, AdaptiveRule) else "fixed"

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore what ``state_dict()`` saved (tensors, or plain numbers from JSON)."""
        mine = self._threshold_kind()
        missing = {"threshold", "steps", "clipped_steps", "rule"} - set(state_dict)
        if missing:
            raise ValueError(f"GradientClipCallback.load_state_dict: no {sorted(missing)}")
        if state_dict["threshold"] != mine:
            raise ValueError(
                f"GradientClipCallback.load_state_dict: the state is of a {state_dict['threshold']}"
                f" threshold, this callback's is {mine}"
            )
        steps = check_count("steps", state_dict["steps"])
        clipped = check_count("clipped_steps", state_dict["clipped_steps"])
        if clipped > steps:
            raise ValueError(f"clipped_steps ({clipped}) is more than steps ({steps})")
        if isinstance(self.rule, AdaptiveRule):
            self.rule.load_state_dict(state_dict["rule"])
        self.steps, self._clipped = steps, clipped

    def stats(self) -> dict[str, float | int | None]:
        """Steps, clipped steps, clip rate and last norm, as Python numbers."""
        return {
            "steps": self.steps,
            "clipped_steps": self.clipped_steps,
            "clip_rate": self.clip_rate,
            "last_norm": None if self.last_norm is None else float(self.last_norm),
        }
