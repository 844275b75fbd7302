"""Shared by the PyTorch adapter and its callback: collecting gradients into a
batch, labels for messages, and the clear non-finite error."""

from __future__ import annotations

import os
import sys
import types
import warnings
import weakref
from collections.abc import Callable, Iterable
from typing import Any, cast

import torch
from array_api_compat import torch as compat_torch

from .._checks import check_ord, check_threshold
from .._dispatch import kernels_for
from .._kernels import Batch, Kernels
from ._torch_kernels import TorchKernels

TensorOrTensors = torch.Tensor | Iterable[torch.Tensor]
EPS = 1e-6  # torch's


# Made once: a plain lookup per call (which torch.compile traces without a cache wrapper).
_KERNELS = {foreach: kernels_for(compat_torch, foreach=foreach) for foreach in (None, False, True)}


def kernels(foreach: bool | None = None) -> TorchKernels:
    """The PyTorch kernels, with ``foreach`` as given to the public function."""
    return cast(TorchKernels, _KERNELS[foreach])


def norm_type_arg(norm_type: Any) -> float:
    try:
        value = float(norm_type)  # torch accepts "inf" and ints
    except (TypeError, ValueError):
        raise ValueError(f"norm_type must be a number > 0 or 'inf', got {norm_type!r}") from None
    return check_ord(value, name="norm_type")


def threshold(name: str, value: Any) -> Any:
    """``check_threshold`` for torch gradients (a CPU tensor is checked like a number)."""
    return check_threshold(name, value, compat_torch)


def as_list(tensors: TensorOrTensors) -> list[Any]:
    """The tensors as a list, each once: a tensor listed twice (tied weights) would
    count twice in the norm and be scaled twice, as in torch."""
    if isinstance(tensors, torch.Tensor):
        return [tensors]
    given = list(tensors)
    return given if len(set(map(id, given))) == len(given) else list(dict.fromkeys(given))


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


def unzip_named(named: Iterable[tuple[str, Any]]) -> tuple[list[Any], list[str]]:
    """``named_parameters()`` pairs as (parameters, names)."""
    pairs = list(named)
    return [param for _, param in pairs], [name for name, _ in pairs]


def named_parameters(model: Any) -> tuple[list[Any], list[str] | None]:
    """The parameters of a module (with their names), or of an iterable (with names
    when it holds ``named_parameters()`` pairs)."""
    if isinstance(model, torch.nn.Module):
        return unzip_named(model.named_parameters())
    given = as_list(model)
    if given and all(isinstance(item, tuple) for item in given):
        return unzip_named(given)
    return given, None


def grad_names(params: list[Any], names: list[str] | None) -> list[str]:
    """The name of each parameter that has a gradient (its position when unnamed)."""
    labels = names or [f"parameters[{index}]" for index in range(len(params))]
    return [label for label, param in zip(labels, params, strict=True) if param.grad is not None]


class ClipPlacementWarning(UserWarning):
    """A clip that cannot have done its job where it was called: before ``backward()``
    (no gradients), twice on the same gradients, or inside DDP's ``no_sync()``."""


def warn_at_caller(message: str, category: type[Warning] = ClipPlacementWarning) -> None:
    """Warn, pointing at the first caller outside agclip (and torch's decorators)."""
    if torch.compiler.is_compiling():
        return  # no graph break for a message
    frame, level = sys._getframe(1), 2  # stacklevel 2: the caller of this function
    while frame is not None and _ours(frame.f_code.co_filename):
        frame, level = frame.f_back, level + 1  # type: ignore[assignment]
    warnings.warn(message, category, stacklevel=level)


def _ours(filename: str) -> bool:
    return filename.startswith(_PACKAGE) or filename.endswith(_TORCH_DECORATORS)


_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TORCH_DECORATORS = os.path.join("torch", "utils", "_contextlib.py")


class LastClipped:
    """The gradients a clip left behind: clipping exactly those again (same tensors,
    unwritten since, as their version counters tell) is a second clip of one step's
    gradients, or a clip in a loop without a new backward."""

    def __init__(self) -> None:
        self._seen: tuple[tuple[weakref.ref[torch.Tensor], int], ...] = ()

    def warn_if_same(self, grads: list[torch.Tensor]) -> None:
        seen = self._seen
        if seen and len(seen) == len(grads) and not torch.compiler.is_compiling():
            pairs = zip(seen, grads, strict=True)
            if all(ref() is grad and grad._version == version for (ref, version), grad in pairs):
                warn_at_caller(
                    "these are the gradients the last clip left, unwritten since: a second "
                    "clip of the same step (after optimizer.step()?), or no backward() between "
                    "two clips. (agclip.backends.torch.ClipPlacementWarning)"
                )

    def remember(self, grads: list[torch.Tensor]) -> None:
        if not torch.compiler.is_compiling():
            self._seen = tuple((weakref.ref(grad), grad._version) for grad in grads)


def warn_if_unsynchronised(model: Any) -> None:
    """DDP inside ``no_sync()``: this backward's gradients are not all-reduced yet."""
    if getattr(model, "require_backward_grad_sync", True) is False:
        warn_at_caller(
            "the model is a DistributedDataParallel inside no_sync(): its gradients are not "
            "all-reduced yet, and each rank would clip its own. Clip after the last "
            "micro-batch's backward, outside no_sync(). "
            "(agclip.backends.torch.ClipPlacementWarning)"
        )


def warn_if_no_gradients(params: list[Any]) -> None:
    """Parameters were given but none has a gradient: the clip ran before backward()."""
    if params:
        warn_at_caller(
            "no parameter has a gradient: is the clip before backward()? Nothing was "
            "clipped. (agclip.backends.torch.ClipPlacementWarning)"
        )


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


def batch_of_floats(k: Kernels, tensors: Iterable[Any], explain: Callable[[], None]) -> Batch:
    """The tensors as a batch, grouped by device and dtype in one C++ call.

    Types are checked per group, not per tensor (that loop would cost as much
    as clipping thousands of small gradients); when a check fails, ``explain()``
    walks the input and raises an error naming the offending entry.
    """
    try:
        batch = k.prepare(list(tensors))
    except (AttributeError, TypeError):
        explain()
        raise
    if not all(group[0].is_floating_point() for group in batch.groups):
        explain()
    return batch


def _explain_parameters(params: list[Any], names: list[str] | None) -> None:
    for index, param in enumerate(params):
        if not isinstance(param, torch.Tensor):
            raise TypeError(f"parameters[{index}] is a {type(param).__name__}, not a torch.Tensor")
        if param.grad is not None:
            check_tensor(param.grad, f"the gradient of {Labels(params, [index], names)[0]}")


def collect_grads(
    k: Kernels, params: list[Any], names: list[str] | None = None
) -> tuple[Batch, Labels]:
    """The ``.grad`` of each parameter that has one, and their labels for messages."""
    grads = batch_of_floats(
        k,
        (grad for param in params if (grad := param.grad) is not None),
        lambda: _explain_parameters(params, names),
    )
    return grads, Labels(params, names=names)


def result_norm(k: Kernels, norm: torch.Tensor, batch: Batch) -> torch.Tensor:
    """The norm as returned: float32, or float64 when a gradient is float64."""
    return norm.to(k.result_dtype(batch))


def empty_norm() -> torch.Tensor:
    return torch.tensor(0.0)


def nonfinite_labels(batch: Batch, labels: Labels) -> list[str]:
    """Labels of the gradients holding NaN or inf (reads values: syncs)."""
    return [labels[i] for i, g in enumerate(batch.leaves) if not bool(g.isfinite().all())]


def raise_if_nonfinite(k: Kernels, batch: Batch, labels: Labels) -> Callable[[Any], None]:
    """A pipeline ``check``: raise, before anything is written, when the norm is not
    finite or does not fit the dtype it is returned in."""

    def check(norm: torch.Tensor) -> None:
        # The returned norm is checked too: finite gradients can have a norm
        # beyond float32's range (four values of 3.4e38), which would read inf.
        returned = result_norm(k, norm, batch)
        if bool(torch.isfinite(returned)):
            return
        if bool(torch.isfinite(norm)):
            raise RuntimeError(
                f"The total norm of the gradients is {float(norm):.6g}, beyond the range of "
                f"the {returned.dtype} it is returned in (it would read inf). Nothing was "
                "clipped. Set error_if_nonfinite=False to clip anyway (the clip itself uses "
                "the exact norm)."
            )
        bad = nonfinite_labels(batch, labels)
        raise RuntimeError(
            f"The total norm of the gradients is {float(norm)}; non-finite gradients in: "
            f"{', '.join(bad) or 'none here (the norm overflowed, or another rank holds them)'}. "
            "Nothing was clipped. "
            "Set error_if_nonfinite=False to clip anyway (non-finite values then stay "
            "non-finite)."
        )

    return check
