"""One clip in PyTorch, as plain steps: decide (the norm, then the factor: from a fixed
threshold or an adaptive rule), then apply it in place or hand it to the optimizer
step that follows in the same call (``clip_and_step``). Nothing outlives the call.

torch's fused optimizers (Adam, AdamW, SGD with ``fused=True``) read two tensors
in their step, ``grad_scale`` (every gradient is divided by it inside the fused
kernel) and ``found_inf`` (the whole step is skipped when it is exactly 1);
``torch.amp.GradScaler`` uses the same pair. A clip that sets ``1 / factor``
and ``norm is not finite`` right before that step, and removes them right
after, needs no scale pass of its own and no host sync.
"""

from __future__ import annotations

import inspect
import math
import types
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.optim.optimizer as torch_optimizer

from .._kernels import Batch, Kernels
from .._pipeline import apply_factor, apply_per_unit, clip_coefficient, needs_scaling, total_norm
from ._torch_distributed import distributed_batch
from ._torch_grads import EPS, collect_grads, grad_names, kernels, result_norm, warn_if_no_gradients
from ._torch_kernels import host_readable

FLOAT32_MAX = torch.finfo(torch.float32).max


@dataclass
class Decision:
    """What one clip decided: the pre-clip norm (the accumulator dtype), the factor
    (0-d, or one per unit for a per-tensor rule) and what it applies to."""

    norm: torch.Tensor
    factor: torch.Tensor
    batch: Batch  # the gradients (their local shards, for DTensors)
    units: list[Batch] | None = None  # per-tensor rules: one batch per tensor

    def returned_norm(self, k: Kernels) -> torch.Tensor:
        return result_norm(k, self.norm, self.batch)

    def clipped(self) -> torch.Tensor:
        """Whether this step clipped anything (a 0-d bool tensor, on the device); a
        step whose norm is NaN or inf is not a clip (it is skipped, or warned of)."""
        return (self.factor < 1).any() & torch.isfinite(self.norm)

    def apply(self, k: Kernels) -> None:
        """Scale the gradients in place (no pass where the factor is known to be 1)."""
        if self.units is None:
            apply_factor(k, self.batch, self.factor, in_place=True)
        else:
            apply_per_unit(k, self.units, self.factor, in_place=True)


@dataclass(frozen=True)
class FixedThreshold:
    """A constant rule: every step clips the global norm at ``max_norm``."""

    max_norm: Any
    norm_type: float

    def decide(
        self,
        k: Kernels,
        grads: Batch,
        names: Callable[[], list[str]],
        process_group: Any,
        *,
        check: Callable[[torch.Tensor], None] | None = None,
        divisor: torch.Tensor | None = None,
    ) -> Decision:
        batch, reduce = distributed_batch(k, grads, process_group)
        norm = total_norm(k, batch, self.norm_type, reduce)
        if divisor is not None:  # gradients still multiplied by a loss scale
            norm = norm / divisor
        if check is not None:
            check(norm)
        factor = clip_coefficient(k, norm, self.max_norm, EPS)
        return Decision(norm, factor, batch)


# -- the optimizer step -------------------------------------------------------------
def real_optimizer(optimizer: Any) -> Any:
    """The ``torch.optim.Optimizer`` inside trainer wrappers (Lightning's
    ``LightningOptimizer``, accelerate's ``AcceleratedOptimizer``: ``.optimizer``)."""
    seen = {id(optimizer)}
    while (inner := getattr(optimizer, "optimizer", None)) is not None and id(inner) not in seen:
        if not hasattr(inner, "param_groups"):
            break
        seen.add(id(inner))
        optimizer = inner
    if not hasattr(optimizer, "param_groups"):
        raise TypeError(f"optimizer must be a torch optimizer, got {type(optimizer).__name__}")
    return optimizer


def optimizer_params(optimizer: Any) -> list[Any]:
    """Every parameter of every group, once each."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if len({id(p) for p in params}) == len(params):  # ids: a tensor's hash runs in Python
        return params
    return list(dict.fromkeys(params))


def optimizer_names(optimizer: Any, params: list[Any]) -> list[str] | None:
    """The names of ``params`` where the optimizer was built from named parameters
    (``AdamW(model.named_parameters())`` keeps them in each group), else ``None``."""
    names = {
        id(param): name
        for group in optimizer.param_groups
        for param, name in zip(group["params"], group.get("param_names", ()), strict=False)
    }
    return [names[id(p)] for p in params] if all(id(p) in names for p in params) else None


def check_steps_without_closure(optimizer: Any) -> None:
    """An optimizer whose ``step`` needs an argument (LBFGS's closure re-evaluates the
    loss inside it) cannot be stepped after a clip: said before anything is clipped."""
    step = optimizer.step
    if getattr(step, "__wrapped__", None) is getattr(type(optimizer), "step", None):
        # The class's step, wrapped on the instance (an LR scheduler counts its calls so)
        step = types.MethodType(type(optimizer).step, optimizer)
    method = getattr(step, "__func__", None)  # a step defined by the class: remembered
    known = isinstance(method, types.FunctionType)  # (reading a signature is slow)
    needs = _METHOD_NEEDS_ARGUMENT.get(method) if known else None
    if needs is None:
        needs = _needs_argument(step)
        if known:
            _METHOD_NEEDS_ARGUMENT[method] = needs
    if needs:
        raise TypeError(
            f"{type(optimizer).__name__}.step needs an argument (a closure, which "
            "re-evaluates the loss and its gradients): clip inside that closure "
            "(clip_grad_norm_ after backward()) and call optimizer.step(closure) yourself"
        )


_METHOD_NEEDS_ARGUMENT: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()


def _needs_argument(step: Callable[..., Any]) -> bool:
    try:
        inspect.signature(step).bind()
    except TypeError:
        return True
    except ValueError:  # no signature to read (a builtin): the step will tell
        pass
    return False


def check_names_for(rule: Any, names: list[str] | None) -> None:
    """A rule with per-tensor state (AdaGC) keys it by name: each tensor needs its
    own, or tensors would share (or swap) their thresholds."""
    spec: Any = getattr(rule, "spec", None)
    if not getattr(spec, "per_tensor", None):
        return
    if names is None:
        raise ValueError(
            f"{spec.title} keeps a threshold per tensor, keyed by its name, and this "
            "optimizer does not know its parameters' names (their order in its groups "
            "can change when it is rebuilt): build it from model.named_parameters(), or "
            "use rule.step(model) then optimizer.step()"
        )
    twice = next((name for name in names if names.count(name) > 1), None)
    if twice is not None:
        raise ValueError(
            f"{spec.title} keeps a threshold per tensor, keyed by its name, and the "
            f"optimizer names two parameters {twice!r}: build it from the whole model's "
            "named_parameters(), whose names are unique"
        )


def loss_scale(scaler: Any, optimizer: Any) -> torch.Tensor | None:
    """The loss scale still on the gradients: ``None`` once ``scaler.unscale_(optimizer)``
    ran, or when the scaler is off. Read on the device (no sync)."""
    if scaler is None or not scaler.is_enabled():
        return None
    state = scaler._per_optimizer_states.get(id(optimizer), {})
    if getattr(state.get("stage"), "name", "") == "UNSCALED":
        return None
    scale: torch.Tensor | None = scaler._scale  # None before the first scaler.scale()
    return None if scale is None else scale.double()


def fuses_scaling(optimizer: Any, params: list[Any]) -> bool:
    """Whether ``optimizer.step()`` applies ``grad_scale`` / ``found_inf`` itself, and
    neither is set already (a GradScaler's or the caller's). Not where the step would
    not see them as set here: a group not fused (its step refuses them), a step
    pre-hook (it would read the gradients unclipped), a compiled caller (the traced
    step does not see attributes set just before it), or a parameter listed twice
    (``params`` holds each once: its gradient would be divided twice)."""
    groups = optimizer.param_groups
    fused = all(group.get("fused") for group in groups)
    once = len(params) == sum(len(group["params"]) for group in groups)
    supports = bool(getattr(optimizer, "_step_supports_amp_scaling", False))
    free = not (hasattr(optimizer, "grad_scale") or hasattr(optimizer, "found_inf"))
    hooked = bool(getattr(optimizer, "_optimizer_step_pre_hooks", None)) or bool(
        getattr(torch_optimizer, "_global_optimizer_pre_hooks", None)
    )
    return (
        fused
        and once
        and supports
        and free
        and not hooked
        and not torch.compiler.is_compiling()
        and not _first_momentum_step(optimizer)
    )


def _first_momentum_step(optimizer: Any) -> bool:
    """Fused SGD with momentum leaves its momentum buffers unset when its very first
    step is skipped through ``found_inf``: that step takes the plain path."""
    return any(
        "momentum_buffer" not in optimizer.state.get(p, {})
        for group in optimizer.param_groups
        if group.get("momentum", 0)
        for p in group["params"]
        if p.grad is not None
    )


def wrapper_scaler(optimizer: Any) -> Any:
    """The GradScaler a trainer's optimizer wrapper steps through, if any (accelerate's
    ``AcceleratedOptimizer.scaler``; Lightning's precision plugin)."""
    scaler = getattr(optimizer, "scaler", None)
    if scaler is None:
        plugin = getattr(getattr(optimizer, "_strategy", None), "precision_plugin", None)
        scaler = getattr(plugin, "scaler", None)
    return scaler if scaler is not None and scaler.is_enabled() else None


def step_after(
    k: Kernels, decision: Decision, optimizer: Any, inner: Any, scaler: Any, params: list[Any]
) -> None:
    """Apply the decision and step, once: the factor inside a fused step where it can
    ride there, else the gradients scaled here.

    A non-finite norm skips the step. Where a loss scaler is in play (``scaler``, or
    the wrapper's own) it decides the skip as it would without agclip, and lowers its
    scale; otherwise the step is not taken at all (read on the host: free on the CPU,
    one sync elsewhere, as GradScaler's own skip), or, in a fused step off the CPU,
    skipped inside the kernel through ``found_inf`` (no sync).
    """
    factor, norm = decision.factor, decision.norm
    scaled = (scaler is not None and scaler.is_enabled()) or wrapper_scaler(optimizer) is not None
    fused = decision.units is None and fuses_scaling(inner, params)
    readable = host_readable(norm)
    # Read on the host where free, or where the skip must be decided here (one sync).
    finite = math.isfinite(float(norm)) if readable or not (fused or scaled) else None
    if fused and finite and float(factor) < 1 / FLOAT32_MAX:
        fused = False  # 1 / factor beyond float32: scale here instead
    if not scaled and finite is False:
        return  # skipped: parameters, optimizer state and gradients untouched
    if not fused:
        decision.apply(k)
        _step(optimizer, scaler)
        return
    if not needs_scaling(k, factor):
        _step(optimizer, scaler)  # nothing to clip: the step runs as it would alone
        return
    device = decision.batch.leaves[0].device
    ours = {"grad_scale": (1.0 / factor).clamp(max=FLOAT32_MAX).to(device, torch.float32)}
    # found_inf skips a non-finite step inside the kernel: a GradScaler sets its own,
    # and a norm read on the host is finite here (a non-finite one returned above).
    if not (scaled or readable):
        ours["found_inf"] = (~torch.isfinite(norm)).to(device, torch.float32)
    for name, value in ours.items():
        setattr(inner, name, value)
    try:
        _step(optimizer, scaler)
    finally:
        for name, value in ours.items():
            if getattr(inner, name, None) is value:
                delattr(inner, name)


def _step(optimizer: Any, scaler: Any) -> None:
    if scaler is not None:
        scaler.step(optimizer)
    else:
        optimizer.step()


def no_check(grads: Batch, labels: Any) -> None:
    """No check between the norm and the first write."""


def decide_for(
    k: Kernels,
    params: list[Any],
    names: list[str] | None,
    rule: Any,
    process_group: Any,
    *,
    check_for: Callable[[Batch, Any], Any] = no_check,
    divisor: torch.Tensor | None = None,
) -> Decision | None:
    """The clip of the gradients of ``params`` by ``rule``, decided (nothing written):
    ``None``, with a warning, where none has a gradient (a rank of a pipeline given
    ``process_group`` still joins the norm's collective). ``check_for(grads, labels)``
    gives the check that runs between the norm and the first write."""
    grads, labels = collect_grads(k, params, names)
    if not grads and process_group is None:
        warn_if_no_gradients(params)
        return None
    check = check_for(grads, labels)
    decision: Decision = rule.decide(
        k, grads, lambda: grad_names(params, names), process_group, check=check, divisor=divisor
    )
    return decision


def syncs_gradients(optimizer: Any) -> bool:
    """False mid-way through accelerate's gradient accumulation (its optimizer's
    ``step`` then does nothing)."""
    return bool(getattr(getattr(optimizer, "gradient_state", None), "sync_gradients", True))


def clip_then_step(
    optimizer: Any,
    rule: Any,
    *,
    scaler: Any,
    foreach: bool | None,
    process_group: Any,
    check_for: Callable[[Batch, Any], Any],
    names_for: Callable[[list[Any]], list[str] | None] | None = None,
) -> tuple[Kernels, Decision | None]:
    """Clip the gradients of every parameter of ``optimizer`` (all groups, any order)
    by ``rule`` and take the step, in one call. The parameters are named by
    ``names_for``, else by the optimizer (built from named parameters)."""
    inner, k = real_optimizer(optimizer), kernels(foreach)
    for stepped in (optimizer, inner) if optimizer is not inner else (inner,):
        check_steps_without_closure(stepped)  # the wrapper's step is the one called
    params = optimizer_params(inner)
    names = optimizer_names(inner, params) if names_for is None else names_for(params)
    check_names_for(rule, names)
    divisor = loss_scale(scaler if scaler is not None else wrapper_scaler(optimizer), inner)
    syncing = syncs_gradients(optimizer)
    if not syncing:  # accelerate, mid-accumulation: its step does nothing yet, so nothing
        rule = FixedThreshold(math.inf, rule.norm_type)  # is clipped (nor seen by a rule)
        check_for = no_check  # and it is not a step to count
    decision = decide_for(
        k, params, names, rule, process_group, check_for=check_for, divisor=divisor
    )
    if decision is None or not syncing:
        _step(optimizer, scaler)
    else:
        step_after(k, decision, optimizer, inner, scaler, params)
    return k, decision
