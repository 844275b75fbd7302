"""Shared by the PyTorch adapter and its callback: collecting gradients, the total
norm with a clear non-finite error, and the in-place scale."""

from __future__ import annotations

import types
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from array_api_compat import torch as compat_torch

from .._checks import check_ord, check_threshold
from .._kernels import kernels_for
from .._norms import clip_coefficient, norm_of_leaves
from ._torch_kernels import GroupedTensors, TorchKernels, group_by_device_and_dtype

TensorOrTensors = torch.Tensor | Iterable[torch.Tensor]
EPS = 1e-6  # torch's


def _kernels() -> TorchKernels:
    kernels = kernels_for(compat_torch)
    assert isinstance(kernels, TorchKernels)
    return kernels


def norm_type_arg(norm_type: Any) -> float:
    try:
        value = float(norm_type)  # torch accepts "inf" and ints
    except (TypeError, ValueError):
        raise ValueError(f"norm_type must be a number > 0 or 'inf', got {norm_type!r}") from None
    return check_ord(value, name="norm_type")


def as_list(tensors: TensorOrTensors) -> list[Any]:
    return [tensors] if isinstance(tensors, torch.Tensor) else list(tensors)


def parameters_list(parameters: TensorOrTensors) -> list[Any]:
    """The parameters as a list, warning like torch when handed an empty generator
    (usually one already consumed by an earlier call)."""
    params = as_list(parameters)
    if not params and isinstance(parameters, types.GeneratorType):
        warnings.warn(
            "`parameters` is an empty generator, no gradient clipping will occur.",
            stacklevel=4,
        )
    return params


def threshold(name: str, value: Any) -> Any:
    """``check_threshold`` for torch gradients (a CPU tensor is checked like a number)."""
    return check_threshold(name, value, compat_torch)


def check_tensor(tensor: Any, label: str) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{label} is a {type(tensor).__name__}, not a torch.Tensor")
    if not tensor.is_floating_point():
        raise TypeError(f"{label} has dtype {tensor.dtype}; gradients must be floating point")


class Labels:
    """Names of the gradients for messages, built only when a message needs one
    (formatting thousands of labels per step would cost more than the clip).

    ``indices[k]`` is the position in ``owners`` of the k-th gradient; by
    default, the owners that have a ``.grad``.
    """

    def __init__(
        self,
        owners: list[Any],
        indices: list[int] | None = None,
        names: list[str] | None = None,
        kind: str = "parameters",
    ):
        self._owners, self._indices, self._names, self._kind = owners, indices, names, kind

    def __getitem__(self, position: int) -> str:
        if self._indices is None:
            self._indices = [i for i, owner in enumerate(self._owners) if owner.grad is not None]
        index = self._indices[position]
        if self._names:
            return self._names[index]
        return f"{self._kind}[{index}] (shape {tuple(self._owners[index].shape)})"


def grouped_floats(tensors: Iterable[Any], explain: Callable[[], None]) -> GroupedTensors:
    """The tensors, grouped by device and dtype in one C++ call.

    Types are checked per group, not per tensor (that loop would cost as much
    as clipping thousands of small gradients); when a check fails, ``explain()``
    walks the input and raises an error naming the offending entry.
    """
    try:
        tensors = GroupedTensors(tensors)
        groups = tensors.groups
    except (AttributeError, TypeError):
        explain()
        raise
    if not all(group[0].is_floating_point() for group in groups):
        explain()
    return tensors


def _explain_parameters(params: list[Any], names: list[str] | None) -> None:
    for index, param in enumerate(params):
        if not isinstance(param, torch.Tensor):
            raise TypeError(f"parameters[{index}] is a {type(param).__name__}, not a torch.Tensor")
        if param.grad is not None:
            check_tensor(param.grad, f"the gradient of {Labels(params, [index], names)[0]}")


def collect_grads(
    parameters: TensorOrTensors, names: list[str] | None = None
) -> tuple[GroupedTensors, Labels]:
    """The ``.grad`` of each parameter that has one, and their labels for messages."""
    params = as_list(parameters)
    grads = grouped_floats(
        (grad for param in params if (grad := param.grad) is not None),
        lambda: _explain_parameters(params, names),
    )
    return grads, Labels(params, names=names)


def result_norm(norm: torch.Tensor, grads: list[torch.Tensor]) -> torch.Tensor:
    return norm.to(_kernels().result_dtype(grads))


def empty_norm() -> torch.Tensor:
    return torch.tensor(0.0)


def nonfinite_labels(grads: list[torch.Tensor], labels: Labels) -> list[str]:
    """Labels of the gradients holding NaN or inf (reads values: syncs)."""
    return [labels[i] for i, g in enumerate(grads) if not bool(g.isfinite().all())]


def _raise_if_nonfinite(norm: torch.Tensor, grads: list[torch.Tensor], labels: Labels) -> None:
    # The returned norm is checked too: finite gradients can have a norm beyond
    # float32's range (four values of 3.4e38), which would come back as inf.
    returned = result_norm(norm, grads)
    if bool(torch.isfinite(returned)):
        return
    if bool(torch.isfinite(norm)):
        raise RuntimeError(
            f"The total norm of the gradients is {float(norm):.6g}, beyond the range of the "
            f"{returned.dtype} it is returned in (it would read inf). Nothing was clipped. "
            "Set error_if_nonfinite=False to clip anyway (the clip itself uses the exact norm)."
        )
    bad = nonfinite_labels(grads, labels)
    raise RuntimeError(
        f"The total norm of the gradients is {float(norm)}; non-finite gradients in: "
        f"{', '.join(bad) or 'none (the norm itself overflowed)'}. Nothing was clipped. "
        "Set error_if_nonfinite=False to clip anyway (non-finite values then stay non-finite)."
    )


def total_norm_of(
    grads: list[torch.Tensor], labels: Labels, p: float, error_if_nonfinite: bool
) -> torch.Tensor:
    """The accurate total norm (accumulator dtype); raises before anything is touched."""
    norm = norm_of_leaves(_kernels(), grads, p)
    if error_if_nonfinite:
        _raise_if_nonfinite(norm, grads, labels)
    return norm


def scale_grads_(
    grads: list[torch.Tensor], max_norm: Any, norm: torch.Tensor, foreach: bool | None
) -> None:
    kernels = _kernels()
    kernels.scale_(grads, clip_coefficient(kernels, norm, max_norm, EPS), foreach=foreach)


def clamp_grads_(grads: GroupedTensors, clip_value: Any, foreach: bool | None) -> None:
    """Clip every element into ``[-clip_value, clip_value]`` in place.

    The bounds of every dtype group are computed before the first write (a
    bound beyond float16's range is capped), so no group can fail after
    another was clipped.
    """
    kernels = _kernels()
    groups = group_by_device_and_dtype(grads)
    bounds = [_bound_for(kernels, group, clip_value) for group in groups]
    for group, bound in zip(groups, bounds, strict=True):
        if foreach is False:
            for grad in group:
                grad.clamp_(-bound, bound)
        elif isinstance(bound, float):
            torch._foreach_clamp_min_(group, -bound)
            torch._foreach_clamp_max_(group, bound)
        else:  # a device tensor bound: foreach takes scalars only
            for grad in group:
                torch.clamp(grad, -bound, bound, out=grad)


def _bound_for(kernels: TorchKernels, group: list[torch.Tensor], clip_value: Any) -> Any:
    bound = kernels.value_bound(group[0].dtype, clip_value)
    return bound if isinstance(bound, float) else bound.to(group[0].device)
