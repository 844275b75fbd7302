"""PyTorch adapter: a drop-in for ``torch.nn.utils`` gradient clipping.

Same names, signatures and semantics as ``torch.nn.utils``
(``clip_grad_norm_``, ``clip_grad_norm``, ``clip_grad_value_``,
``get_total_norm``, ``clip_grads_with_norm_``), with agclip's numerics:

- accurate: float32 norms within ~1e-8 of float64 on CPU (torch: ~3e-3 at 4e7 values);
- overflow-safe: finite gradients whose squares overflow are clipped, not zeroed;
- 16-bit gradients accumulate in float32 (float64 off-CPU) and the norm is
  float32 (float64 if any gradient is float64), never a float16 ``inf``;
- no host-device sync off-CPU (``error_if_nonfinite=True`` syncs, as torch's does);
- on CPU, no scale pass at all when nothing needs clipping;
- ``torch.compile(fullgraph=True)`` traces them whole.

``clip_and_step(optimizer, max_norm)`` clips and steps in one call: a fused
optimizer takes the coefficient inside its step (no scale pass).

Examples:
    >>> import torch
    >>> from agclip.backends.torch import clip_grad_norm_, get_total_norm
    >>> model = torch.nn.Linear(3, 1)
    >>> model(torch.ones(2, 3)).sum().mul(100).backward()
    >>> before = clip_grad_norm_(model.parameters(), max_norm=1.0)
    >>> round(float(get_total_norm([p.grad for p in model.parameters()])), 4)
    1.0
"""

from __future__ import annotations

from functools import partial
from typing import Any

from .._missing import missing

try:
    import torch
except ImportError as error:
    raise missing("torch", error) from error

from .._adagc import ADAGC
from .._agc import adaptive_grad_clip, excluded
from .._autoclip import AUTOCLIP
from .._pipeline import apply_factor, clip_coefficient, total_norm
from .._typing import Scalar
from .._zclip import ZCLIP
from ._torch_callback import GradientClipCallback, NonFiniteGradientWarning
from ._torch_clip import FixedThreshold, clip_then_step, decide_for, no_check
from ._torch_distributed import distributed_batch
from ._torch_grads import (
    EPS,
    ClipPlacementWarning,
    Labels,
    TensorOrTensors,
    as_list,
    batch_of_floats,
    check_tensor,
    collect_grads,
    empty_norm,
    kernels,
    named_parameters,
    norm_type_arg,
    parameters_list,
    raise_if_nonfinite,
    result_norm,
    threshold,
    warn_if_no_gradients,
)
from ._torch_rules import AdaptiveRule

__all__ = [
    "AdaGC",
    "AdaptiveRule",
    "AutoClip",
    "ClipPlacementWarning",
    "GradientClipCallback",
    "NonFiniteGradientWarning",
    "ZClip",
    "adaptive_clip_grad_",
    "clip_and_step",
    "clip_grad_norm",
    "clip_grad_norm_",
    "clip_grad_value_",
    "clip_grads_with_norm_",
    "get_total_norm",
]


class ZClip(AdaptiveRule):
    """A drop-in for the ``zclip`` package's ``ZClip``: the same arguments,
    ``step(model)`` after ``backward()``, and its attributes (``mean``, ``var``,
    ``initialized``, the hyperparameters) as read-only views; ``step`` returns the
    norm as a tensor (no host sync).

    Examples:
        >>> import torch
        >>> from agclip.backends.torch import ZClip
        >>> model = torch.nn.Linear(4, 1)
        >>> zclip = ZClip(warmup_steps=5)
        >>> for scale in [1.0, 1.1] * 5 + [100.0]:
        ...     model.zero_grad()
        ...     model(torch.ones(2, 4)).sum().mul(scale).backward()
        ...     norm = zclip.step(model)
        >>> int(zclip.spikes), round(float(norm))
        (1, 447)
    """

    spec = ZCLIP


class AutoClip(AdaptiveRule):
    """Unlike the paper's code, no norm is read on the host (it reads one per
    parameter per step) and the percentile is taken on the device."""

    spec = AUTOCLIP


class AdaGC(AdaptiveRule):
    """With ``process_group`` or DTensor gradients, each tensor's norm is reduced
    across ranks, so every rank must hold a part of every tensor (FSDP2, TP, FSDP1
    or ZeRO shards; checked at every step, the same error on every rank). Pipeline
    stages, which hold different tensors, are refused: use ZClip or AutoClip there.
    The per-tensor factors cannot ride on a fused optimizer step: ``clip_and_step``
    scales the gradients first."""

    spec = ADAGC


def _rule(max_norm: Any, norm_type: Any) -> Any:
    if isinstance(max_norm, AdaptiveRule):
        return max_norm
    return FixedThreshold(threshold("max_norm", max_norm), norm_type_arg(norm_type))


@torch.no_grad()
def clip_grad_norm_(
    parameters: TensorOrTensors,
    max_norm: Scalar,
    norm_type: float | str = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
    *,
    process_group: Any = None,
) -> torch.Tensor:
    """Clip the gradients of ``parameters`` in place to a total norm of ``max_norm``.

    Drop-in for ``torch.nn.utils.clip_grad_norm_``: gradients are scaled by
    ``min(1, max_norm / (total_norm + 1e-6))``; parameters without ``.grad``
    are skipped; no gradients gives ``tensor(0.)`` (and a ``ClipPlacementWarning``
    when parameters were given: the clip ran before ``backward()``).

    Args:
        parameters: a Tensor or an iterable of Tensors (a generator is fine).
        max_norm: the largest total norm allowed; a number >= 0 (``inf``
            measures the norm and clips nothing, as in torch).
        norm_type: 2.0 (default), 1, ``inf`` / ``"inf"``, or any p > 0.
        error_if_nonfinite: raise ``RuntimeError`` naming the non-finite
            gradients (before any is modified) when the total norm is NaN/inf.
        foreach: ``None`` picks the fastest path; ``False`` forces per-tensor
            kernels; ``True`` foreach kernels.
        process_group: for plain-tensor gradients partitioned across ranks
            (pipeline stages, FSDP1 ``use_orig_params`` or ZeRO shards): the
            ``ProcessGroup`` (or 1-D ``DeviceMesh``) of the ranks among which they
            are distinct. The norm is then the norm over those ranks' gradients:
            one all-reduce over that group of one float64 pair, which every rank
            in it joins, one without gradients too. DTensor gradients (FSDP2,
            HSDP, TP, any number of meshes, mixed with plain tensors) need no
            argument. See the "Distributed training" guide.

    Returns:
        The pre-clip total norm, a plain 0-d float32 tensor (float64 if any
        gradient is float64) on the first gradient's device; with distributed
        gradients, the same global value on every rank.

    References:
        Pascanu, Mikolov and Bengio, "On the difficulty of training recurrent
        neural networks", ICML 2013.
    """
    rule = FixedThreshold(threshold("max_norm", max_norm), norm_type_arg(norm_type))
    k = kernels(foreach)
    check_for = partial(raise_if_nonfinite, k) if error_if_nonfinite else no_check
    decision = decide_for(
        k, parameters_list(parameters), None, rule, process_group, check_for=check_for
    )
    if decision is None:
        return empty_norm()
    decision.apply(k)
    return decision.returned_norm(k)


clip_grad_norm = clip_grad_norm_


@torch.no_grad()
def clip_and_step(
    optimizer: Any,
    max_norm: Scalar | AdaptiveRule,
    norm_type: float | str = 2.0,
    *,
    scaler: Any = None,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
    process_group: Any = None,
) -> torch.Tensor:
    """Clip the gradients of every parameter of ``optimizer`` and take its step, in
    one call, with no state left between calls.

    The result equals ``clip_grad_norm_`` over the optimizer's parameters (all
    its groups, in any order; parameters without ``.grad`` skipped) followed by
    ``optimizer.step()``. Torch's fused optimizers (``Adam``, ``AdamW``, ``SGD``
    with ``fused=True``) take the coefficient inside their fused step (no scale
    pass over the gradients); any other optimizer gets its gradients scaled in
    place first. A non-finite norm skips the step: parameters and optimizer
    state stay as they were (on the CPU nothing is read to know it; elsewhere a
    fused step skips inside its kernel, with no sync, and other optimizers
    cost one host read, as ``GradScaler``'s own skip).

    Args:
        optimizer: a ``torch.optim.Optimizer``, or a trainer's wrapper holding one
            in ``.optimizer`` (Lightning's ``LightningOptimizer``, accelerate's
            ``AcceleratedOptimizer``): the parameters and the fused coefficient go
            to the real optimizer, the step through the wrapper, so the trainer's
            bookkeeping runs (and accelerate's gradient accumulation: mid-way
            through it nothing is clipped).
        max_norm: the largest total norm allowed (a number >= 0), or an
            adaptive rule (``ZClip()``, ``AutoClip()``, ``AdaGC()``).
        norm_type: as in ``clip_grad_norm_`` (a rule has its own).
        scaler: a ``torch.amp.GradScaler`` whose ``scaler.scale(loss).backward()``
            made the gradients: the norm is the unscaled gradients', the step is
            ``scaler.step(optimizer)`` (which skips non-finite steps as usual); call
            ``scaler.update()`` after, as usual. ``scaler.unscale_(optimizer)``
            before the call is fine, not needed. A wrapper's own scaler (accelerate,
            Lightning's ``16-mixed``) is found without this argument.
        error_if_nonfinite: raise ``RuntimeError`` naming the non-finite gradients,
            before anything changes, when the norm is NaN/inf.
        foreach: as in ``clip_grad_norm_``.
        process_group: as in ``clip_grad_norm_``.

    Returns:
        The pre-clip total norm of the (unscaled) gradients, as ``clip_grad_norm_``.

    Examples:
        >>> import torch
        >>> from agclip.backends.torch import clip_and_step
        >>> model = torch.nn.Linear(8, 4)
        >>> optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
        >>> model(torch.randn(16, 8)).pow(2).mean().mul(100).backward()
        >>> norm = clip_and_step(optimizer, max_norm=1.0)  # clipped inside the fused step
        >>> optimizer.zero_grad()

    References:
        Pascanu, Mikolov and Bengio, "On the difficulty of training recurrent
        neural networks", ICML 2013.
    """
    k = kernels(foreach)
    _, decision = clip_then_step(
        optimizer,
        _rule(max_norm, norm_type),
        scaler=scaler,
        foreach=foreach,
        process_group=process_group,
        check_for=partial(raise_if_nonfinite, k) if error_if_nonfinite else no_check,
    )
    return empty_norm() if decision is None else decision.returned_norm(k)


@torch.no_grad()
def get_total_norm(
    tensors: TensorOrTensors,
    norm_type: float | str = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
    *,
    process_group: Any = None,
) -> torch.Tensor:
    """The norm of the norms of ``tensors`` (like ``torch.nn.utils.get_total_norm``).

    Takes the tensors themselves (usually gradients), not parameters.
    ``None`` entries are skipped. ``foreach`` is accepted for compatibility.
    DTensors and ``process_group`` work as in ``clip_grad_norm_``: the norm
    is global, a plain tensor equal on every rank.
    """
    p = norm_type_arg(norm_type)
    given = as_list(tensors)
    present = [index for index, tensor in enumerate(given) if tensor is not None]

    def explain() -> None:
        for index in present:
            check_tensor(given[index], f"tensors[{index}]")

    k = kernels(foreach)
    batch = batch_of_floats(k, (given[index] for index in present), explain)
    if not batch and process_group is None:
        if given:
            warn_if_no_gradients(given)  # [p.grad for p in params], all None
        return empty_norm()
    batch, reduce = distributed_batch(k, batch, process_group)
    norm = total_norm(k, batch, p, reduce)
    if error_if_nonfinite:
        raise_if_nonfinite(k, batch, Labels(given, present, kind="tensors"))(norm)
    return result_norm(k, norm, batch)


@torch.no_grad()
def clip_grads_with_norm_(
    parameters: TensorOrTensors,
    max_norm: Scalar,
    total_norm: torch.Tensor,
    foreach: bool | None = None,
) -> None:
    """Scale gradients by ``min(1, max_norm / (total_norm + 1e-6))`` in place
    (like ``torch.nn.utils.clip_grads_with_norm_``)."""
    max_norm = threshold("max_norm", max_norm)
    k = kernels(foreach)
    grads, _ = collect_grads(k, as_list(parameters))
    if grads:
        norm = torch.as_tensor(total_norm, dtype=torch.float64)
        apply_factor(k, grads, clip_coefficient(k, norm, max_norm, EPS), in_place=True)


@torch.no_grad()
def clip_grad_value_(
    parameters: TensorOrTensors, clip_value: Scalar, foreach: bool | None = None
) -> None:
    """Clip every gradient element into ``[-clip_value, clip_value]`` in place
    (like ``torch.nn.utils.clip_grad_value_``).

    References:
        Mikolov, "Statistical language models based on neural networks", 2012.
    """
    clip_value = threshold("clip_value", clip_value)
    k = kernels(foreach)
    grads, _ = collect_grads(k, as_list(parameters))
    k.clip_values_(grads, clip_value)


@torch.no_grad()
def adaptive_clip_grad_(
    parameters: TensorOrTensors,
    clip_factor: Scalar = 0.01,
    eps: float = 1e-3,
    norm_type: float | str = 2.0,
    *,
    exclude: Any = (),
) -> None:
    """Adaptive gradient clipping in place, timm's signature and results.

    Each output unit's gradient (the slice along the first axis of a weight:
    ``nn.Linear`` and ``nn.ConvNd`` layout) is scaled so that its norm is at most
    ``clip_factor * max(norm of the unit's weights, eps)``; biases and other
    vectors are one unit. Every new gradient is computed before the first write.

    Args:
        parameters: a Tensor or an iterable of Tensors (``model.named_parameters()``
            too: then ``exclude`` matches the names), or a module (named).
        clip_factor: the largest gradient-to-parameter norm ratio (``clipping`` in
            the functional and optax forms).
        eps: the smallest parameter norm used (zero-initialised weights).
        norm_type: 2.0 (default), 1, ``inf`` or any p > 0.
        exclude: with named parameters, fnmatch patterns on the names (or a
            predicate) to leave alone, e.g. ``"head.*"`` for the classifier;
            never by position: unnamed parameters with ``exclude`` are a
            ``ValueError``.

    References:
        Brock, De, Smith and Simonyan, "High-Performance Large-Scale Image
        Recognition Without Normalization", ICML 2021.
    """
    params, names = named_parameters(parameters)
    if names is None and exclude not in ((), [], None, ""):
        raise ValueError(
            "adaptive_clip_grad_ excludes parameters by name: pass model.named_parameters() "
            "(or the module) with exclude=..."
        )
    labels = names or [str(i) for i in range(len(params))]
    for index, param in enumerate(params):
        if not isinstance(param, torch.Tensor):
            raise TypeError(f"parameters[{index}] is a {type(param).__name__}, not a torch.Tensor")
    keep = [i for i, param in enumerate(params) if param.grad is not None]
    if not keep:
        warn_if_no_gradients(params)
        return
    skip = excluded(exclude or ())
    new = adaptive_grad_clip(
        {labels[i]: params[i].grad for i in keep},
        {labels[i]: params[i].detach() for i in keep},
        clip_factor,
        layout="torch",
        eps=eps,
        ord=norm_type_arg(norm_type),
        exclude=lambda path: skip(path[2:-2]),  # paths read ['name']
    )
    for i in keep:
        params[i].grad.copy_(new[labels[i]])
