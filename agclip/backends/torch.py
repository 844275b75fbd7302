"""PyTorch adapter: a drop-in for ``torch.nn.utils`` gradient clipping.

Same names, signatures and semantics as ``torch.nn.utils``
(``clip_grad_norm_``, ``clip_grad_norm``, ``clip_grad_value_``,
``get_total_norm``, ``clip_grads_with_norm_``), with agclip's numerics:

- accurate: float32 norms within ~1e-8 of float64 on CPU (torch: ~3e-3 at 4e7 values);
- overflow-safe: finite gradients whose squares overflow are clipped, not zeroed;
- 16-bit gradients accumulate in float32 (float64 off-CPU) and the norm is
  float32 (float64 if any gradient is float64), never a float16 ``inf``;
- no host-device sync off-CPU (``error_if_nonfinite=True`` syncs, as torch's does);
- on CPU, no scale pass at all when nothing needs clipping.

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

from typing import Any

import torch

from .._adaptive import adaptive_grad_clip, excluded
from .._pipeline import clip_by_total_norm, scale_by_norm, total_norm
from .._typing import Scalar
from ._torch_callback import GradientClipCallback, NonFiniteGradientWarning
from ._torch_distributed import distributed_batch
from ._torch_fused import amp_scale, hand_over_to
from ._torch_grads import (
    EPS,
    Labels,
    TensorOrTensors,
    as_list,
    batch_of_floats,
    check_tensor,
    collect_grads,
    empty_norm,
    kernels,
    norm_type_arg,
    parameters_list,
    raise_if_nonfinite,
    result_norm,
    threshold,
    unzip_named,
)
from ._torch_rules import AdaGC, AdaptiveRule, AutoClip, ZClip

__all__ = [
    "AdaGC",
    "AdaptiveRule",
    "AutoClip",
    "GradientClipCallback",
    "NonFiniteGradientWarning",
    "ZClip",
    "adaptive_clip_grad_",
    "clip_grad_norm",
    "clip_grad_norm_",
    "clip_grad_value_",
    "clip_grads_with_norm_",
    "get_total_norm",
]


@torch.no_grad()
def clip_grad_norm_(
    parameters: TensorOrTensors,
    max_norm: Scalar,
    norm_type: float | str = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
    *,
    process_group: Any = None,
    optimizer: Any = None,
    scaler: Any = None,
) -> torch.Tensor:
    """Clip the gradients of ``parameters`` in place to a total norm of ``max_norm``.

    Drop-in for ``torch.nn.utils.clip_grad_norm_``: gradients are scaled by
    ``min(1, max_norm / (total_norm + 1e-6))``; parameters without ``.grad``
    are skipped; no gradients gives ``tensor(0.)``.

    Args:
        parameters: a Tensor or an iterable of Tensors (a generator is fine).
        max_norm: the largest total norm allowed; a finite number >= 0.
        norm_type: 2.0 (default), 1, ``inf`` / ``"inf"``, or any p > 0.
        error_if_nonfinite: raise ``RuntimeError`` naming the non-finite
            gradients (before any is modified) when the total norm is NaN/inf.
        foreach: ``None`` picks the fastest path; ``False`` forces per-tensor
            kernels; ``True`` foreach kernels.
        process_group: for plain-tensor gradients partitioned across ranks
            (pipeline stages, FSDP1 ``use_orig_params`` or ZeRO shards): the
            ``ProcessGroup`` or ``DeviceMesh`` over which they are distinct.
            The norm is then global: one all-reduce of one float64 pair, which
            every rank joins, one without gradients too. DTensor gradients
            (FSDP2, HSDP, TP, any number of meshes, mixed with plain tensors)
            need no argument. See the "Distributed training" guide.
        optimizer: the optimizer whose next ``step()`` follows. A fused one
            (``Adam``/``AdamW``/``SGD`` with ``fused=True``) applies the
            coefficient inside its fused kernel: no scale pass here, and a
            non-finite norm skips that step (parameters and state unchanged),
            without a host sync. Any other optimizer: the gradients are scaled
            here, as without it.
        scaler: with ``optimizer``, a ``torch.amp.GradScaler`` whose scaled
            gradients were not unscaled: the norm is taken unscaled and the
            scaler's ``step`` applies its scale and the coefficient together.

    Returns:
        The pre-clip total norm, a plain 0-d float32 tensor (float64 if any
        gradient is float64) on the first gradient's device; with distributed
        gradients, the same global value on every rank.

    References:
        Pascanu, Mikolov and Bengio, "On the difficulty of training recurrent
        neural networks", ICML 2013.
    """
    max_norm = threshold("max_norm", max_norm)
    p = norm_type_arg(norm_type)
    k = kernels(foreach)
    grads, labels = collect_grads(k, parameters_list(parameters))
    if not grads and process_group is None:
        return empty_norm()
    batch, reduce = distributed_batch(k, grads, process_group)
    check = raise_if_nonfinite(k, batch, labels) if error_if_nonfinite else None
    _, norm = clip_by_total_norm(
        k,
        batch,
        max_norm,
        EPS,
        p=p,
        in_place=True,
        reduce=reduce,
        check=check,
        hand_over=hand_over_to(optimizer, batch),
        norm_divisor=amp_scale(scaler, optimizer) if scaler is not None else None,
    )
    return result_norm(k, norm, batch)


clip_grad_norm = clip_grad_norm_


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
        scale_by_norm(k, grads, norm, max_norm, EPS, in_place=True)


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
            too: then ``exclude`` matches the names).
        clip_factor: the largest gradient-to-parameter norm ratio.
        eps: the smallest parameter norm used (zero-initialised weights).
        norm_type: 2.0 (default), 1, ``inf`` or any p > 0.
        exclude: with named parameters, fnmatch patterns on the names (or a
            predicate) to leave alone, e.g. ``"head.*"`` for the classifier;
            never by position.

    References:
        Brock, De, Smith and Simonyan, "High-Performance Large-Scale Image
        Recognition Without Normalization", ICML 2021.
    """
    given = as_list(parameters)
    named = bool(given) and all(isinstance(item, tuple) for item in given)
    params, names = unzip_named(given) if named else (given, [str(i) for i in range(len(given))])
    for index, param in enumerate(params):
        if not isinstance(param, torch.Tensor):
            raise TypeError(f"parameters[{index}] is a {type(param).__name__}, not a torch.Tensor")
    keep = [i for i, param in enumerate(params) if param.grad is not None]
    grads = {names[i]: params[i].grad for i in keep}
    weights = {names[i]: params[i].detach() for i in keep}
    if not grads:
        return
    skip = excluded(exclude) if named else (lambda path: False)
    new = adaptive_grad_clip(
        grads,
        weights,
        clip_factor,
        layout="torch",
        eps=eps,
        ord=norm_type_arg(norm_type),
        exclude=lambda path: skip(path[2:-2]),  # paths read ['name']
    )
    for i in keep:
        params[i].grad.copy_(new[names[i]])
