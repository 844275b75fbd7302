"""PyTorch kernels: grouped by device and dtype, foreach where it pays, no host sync off-CPU.

CPU: a large tensor is reduced in rows of ``BLOCK`` (``vector_norm`` over each
row), and the rows' float32 results are combined in float64: the relative error
stays ~1e-8 where one float32 reduction over 1e8 values drifts by ~1e-3. Small
tensors go through one ``_foreach_norm``. Values on the CPU can be read for free,
so the overflow guard is a host check and the scale pass is skipped when nothing
needs clipping.

Other devices (CUDA, meta, ...): ``_foreach_norm(dtype=float64)`` accumulates
in float64 inside one fused pass, which cannot overflow for 16/32-bit
gradients with p in {1, 2}; no value is read on the host.

Under ``torch.compile`` nothing is read on the host either: the graph stays whole.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype

from .._kernels import BLOCK, L2, Batch, Kernels

# Tensors up to this many elements are reduced together by one _foreach_norm call: a
# call per tensor would cost a small model more than reading its gradients. Their
# float32 sums stay within ~1e-6 of float64's on random values (and the errors of
# many tensors average out); rows of BLOCK would hold ~1e-7, at a call each.
SMALL = 16 * BLOCK


def _group(tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Tensors grouped by device and dtype: torch's own C++ grouping, which
    ``clip_grad_norm_`` uses and ``torch.compile`` traces."""
    if not tensors:
        return []
    grouped = _group_tensors_by_device_and_dtype([cast(list[torch.Tensor | None], tensors)])
    return [cast(list[torch.Tensor], list(lists[0])) for lists, _ in grouped.values()]


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; 16- and 32-bit gradients are reduced and scaled in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _factors_for(
    like: torch.Tensor, factor: torch.Tensor, halves: tuple[float, ...] | None
) -> list[torch.Tensor]:
    """The 0-d factor on ``like``'s device in its work dtype: the multiply rounds it
    to that dtype anyway, and a float64 factor makes a CPU multiply of float32 values
    slower. Where float32 cannot hold it, its ``halves`` (``Kernels._halves``)."""
    work = _work_dtype(like.dtype)
    if halves is not None and work == torch.float32:
        return [torch.tensor(half, dtype=work, device=like.device) for half in halves]
    return [factor.to(like.device, work)]


def host_readable(x: torch.Tensor) -> bool:
    """Whether reading ``x`` costs nothing: CPU memory, outside autograd and compilation."""
    return x.is_cpu and not x.requires_grad and not torch.compiler.is_compiling()


class TorchKernels(Kernels):
    def quiet(self) -> Any:
        return contextlib.nullcontext()  # torch warns about no overflow

    # Device questions are asked of one tensor per group: a loop over thousands
    # of small gradients would cost more than their norm.
    def prepare(self, leaves: Sequence[Any]) -> Batch:
        """Group by device and dtype once per call."""
        tensors = list(leaves)
        return Batch(tensors, _group(tensors))

    def accumulator(self, batch: Batch) -> Any:
        if any(group[0].is_mps for group in batch.groups):
            return torch.float32  # MPS has no float64
        return torch.float64

    def result_dtype(self, batch: Batch) -> Any:
        wide = any(group[0].dtype == torch.float64 for group in batch.groups)
        return torch.float64 if wide else torch.float32

    def needs_guard(self, batch: Batch, p: float, acc: Any) -> bool:
        # CPU rows are summed in float32, and the guard there is a free host check.
        if any(group[0].is_cpu for group in batch.groups):
            return True
        dtypes = {group[0].dtype for group in batch.groups}
        return self.overflow_possible(dtypes, batch.size, p, acc) or self.underflow_possible(
            dtypes, p, acc
        )

    def sum_of_powers(self, batch: Batch, p: float, acc: Any, divisor: Any = None) -> Any:
        parts = []
        weights = batch.weights or [1.0] * len(batch.groups)
        for group, weight in zip(batch.groups, weights, strict=True):
            tensors = (
                group if divisor is None else [t.to(acc) / divisor.to(t.device) for t in group]
            )
            if tensors[0].is_cpu:
                part = self._cpu_sum(tensors, p, acc)
            else:
                part = self._device_sum(tensors, p, acc)
            parts.append(part if weight == 1.0 else part * weight)
        if not parts:
            return torch.zeros((), dtype=acc, device=batch.leaves[0].device if batch else None)
        return parts[0] if len(parts) == 1 else self.stack(parts).sum()

    def _cpu_sum(self, group: list[torch.Tensor], p: float, acc: Any) -> torch.Tensor:
        rows_dtype = _work_dtype(group[0].dtype)
        small: list[torch.Tensor] = []  # reduced together by one _foreach_norm
        rows: list[torch.Tensor] = []  # norms of rows of BLOCK, then of the small tensors
        for tensor in group:
            size = tensor.numel()
            if size <= SMALL:
                small.append(tensor)
                continue
            body = tensor.reshape(-1)  # a view when contiguous
            if size % BLOCK:
                body, tail = body[: size - size % BLOCK], body[size - size % BLOCK :]
                small.append(tail)
            rows.append(torch.linalg.vector_norm(body.view(-1, BLOCK), p, dim=1, dtype=rows_dtype))
        if small:
            rows.append(torch.stack(torch._foreach_norm(small, p, dtype=rows_dtype)))
        norms = (rows[0] if len(rows) == 1 else torch.cat(rows)).to(acc)
        return norms.dot(norms) if p == L2 else norms.pow(p).sum()

    def _device_sum(self, group: list[torch.Tensor], p: float, acc: Any) -> torch.Tensor:
        if p in (1.0, 2.0):
            norms = list(torch._foreach_norm(group, p, dtype=acc))
        else:
            norms = [torch.linalg.vector_norm(t, p, dtype=acc) for t in group]
        return torch.stack(norms).pow(p).sum()

    def max_abs(self, batch: Batch, acc: Any) -> Any:
        parts = []
        for group in batch.groups:
            nonempty = [t for t in group if t.numel()]
            if nonempty:
                norms = torch._foreach_norm(nonempty, float("inf"))
                parts.append(torch.stack(list(norms)).max().to(acc))
        if not parts:
            return torch.zeros((), dtype=acc)
        return self.stack(parts).max()

    def stack(self, parts: Sequence[Any]) -> Any:
        device = parts[0].device
        return torch.stack([part.to(device) for part in parts])

    # Tensors answer device questions themselves (array_api_compat's helpers are cached
    # functions, which torch.compile traces with a warning).
    def placement(self, like: Any) -> dict[str, Any]:
        return {"device": like.device}

    def on_device_of(self, value: Any, like: Any) -> Any:
        return value.to(like.device)

    def differentiable(self, x: Any) -> bool:
        return bool(x.requires_grad)

    def constant(self, x: Any) -> Any:
        return x.detach()

    def peek(self, x: Any) -> float | None:
        return float(x) if host_readable(x) else None

    def select(self, keep: Any, value: Callable[[], Any], fallback: Callable[[], Any]) -> Any:
        if torch.compiler.is_compiling():  # one branch runs, no graph break
            # (a branch may not hand back one of its inputs as it is: copies)
            return torch.cond(keep, lambda: value().clone(), lambda: fallback().clone())
        return super().select(keep, value, fallback)

    def scale_(self, batch: Batch, factor: Any) -> None:
        halves = self._halves(factor)
        for group in batch.groups:
            for local in _factors_for(group[0], factor, halves):
                if self.foreach is False:
                    for tensor in group:
                        tensor.mul_(local)
                else:
                    torch._foreach_mul_(group, local)

    def clip_values_(self, batch: Batch, clip_value: Any) -> None:
        """In place, per group; every group's bound computed before the first write."""
        bounds = [self._bound(group, clip_value) for group in batch.groups]
        for group, bound in zip(batch.groups, bounds, strict=True):
            if self.foreach is False or not isinstance(bound, float):
                for tensor in group:  # foreach clamps take Python numbers only
                    torch.clamp(tensor, -bound, bound, out=tensor)
            else:
                torch._foreach_clamp_min_(group, -bound)
                torch._foreach_clamp_max_(group, bound)

    def _bound(self, group: list[torch.Tensor], clip_value: Any) -> Any:
        bound = self.value_bound(group[0].dtype, clip_value)
        return bound if isinstance(bound, float) else bound.to(group[0].device)
