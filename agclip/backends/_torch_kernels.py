"""PyTorch kernels: grouped by device and dtype, foreach where it pays, no host sync off-CPU.

CPU: large tensors are reduced in short rows whose float32 partial results are
combined in float64 (relative error ~3e-9 on 1e8 values). Float32 L2 takes the
rows' sums of squares from the diagonal of batched 2x2 Gram matrices (~1.05x the
time of a plain ``sum``); other cases take row norms (``vector_norm`` over rows
of ``BLOCK``, ~1.15x); small tensors go through one ``_foreach_norm``. Values can
be read for free, so the overflow guard is a host check and the scale pass is
skipped when nothing needs clipping.

Other devices (CUDA, meta, ...): ``_foreach_norm(dtype=float64)`` accumulates
in float64 inside one fused pass, which cannot overflow for 16/32-bit
gradients with p in {1, 2}; no value is read on the host.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from .._kernels import BLOCK, L2, Batch, Kernels

# Tensors up to this many elements are reduced by one _foreach_norm call (their
# float32 sums are short enough to stay accurate).
SMALL = 4 * BLOCK

# Float32 L2 on CPU: every pair of adjacent rows of PAIR elements is one 2x2 Gram
# matrix of a batched matmul, whose diagonal holds the two rows' sums of squares.
# The BLAS kernel reads the two rows as two streams: ~1.05x the time of a plain
# `sum` over 1e8 values, where the row norm (one FMA chain per row) takes ~1.15x.
# Smaller tensors keep the row norm: read from cache, the matmul's ~2 us more per
# call outweighs its speed.
PAIR = 2 * BLOCK
GRAM_MIN = 1 << 18


def _float32_matmul_exact() -> bool:
    """Whether CPU float32 matmuls compute in float32 (the default). A user may allow
    bf16 or tf32 for them (``torch.set_float32_matmul_precision``, the backends'
    ``fp32_precision``), which would cost a norm its digits."""
    if not torch.backends.mkl.is_available():  # the Gram path is measured on MKL only
        return False
    precision = getattr(getattr(torch.backends.mkldnn, "matmul", None), "fp32_precision", None)
    if precision is None:  # pragma: no cover - a torch before the fp32_precision API
        return bool(torch.get_float32_matmul_precision() == "highest")
    return precision in ("none", "ieee")


_torch_grouping: Any
try:  # torch's own C++ grouping (what clip_grad_norm_ uses): ~2x faster than a Python loop
    from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype as _torch_grouping
except ImportError:  # pragma: no cover - a torch without the private helper
    _torch_grouping = None


def _group(tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    if _torch_grouping is not None and tensors:
        return [list(lists[0]) for lists, _ in _torch_grouping([tensors]).values()]
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for tensor in tensors:
        groups.setdefault((tensor.device, tensor.dtype), []).append(tensor)
    return list(groups.values())


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; 16- and 32-bit gradients are reduced and scaled in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class TorchKernels(Kernels):
    # Device questions are asked of one tensor per group: a loop over thousands
    # of small gradients would cost more than their norm.
    def prepare(self, leaves: Sequence[Any]) -> Batch:
        """Group by device and dtype once per call (one C++ call, as torch does)."""
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
        size = sum(tensor.numel() for tensor in batch.leaves)
        dtypes = {group[0].dtype for group in batch.groups}
        return self.overflow_possible(dtypes, size, p, acc) or self.underflow_possible(
            dtypes, p, acc
        )

    def sum_of_powers(self, batch: Batch, p: float, acc: Any, scale: Any = None) -> Any:
        parts = []
        weights = batch.weights or [1.0] * len(batch.groups)
        for group, weight in zip(batch.groups, weights, strict=True):
            tensors = group if scale is None else [t.to(acc) * scale.to(t.device) for t in group]
            if tensors[0].is_cpu:
                part = self._cpu_sum(tensors, p, acc)
            else:
                part = self._device_sum(tensors, p, acc)
            parts.append(part if weight == 1.0 else part * weight)
        if not parts:
            return torch.zeros((), dtype=acc, device=batch.leaves[0].device if batch else None)
        return parts[0] if len(parts) == 1 else self.stack(parts).sum()

    def _cpu_sum(self, group: list[torch.Tensor], p: float, acc: Any) -> torch.Tensor:
        # Two passes: every view first, then the reductions back to back. A
        # reduction streams megabytes through the caches, and a torch call made
        # between two of them runs cold (~10 us instead of ~1): at GPT-2 sizes,
        # views made in between cost ~4% of the whole norm.
        rows_dtype = _work_dtype(group[0].dtype)
        gram_ok = p == L2 and group[0].dtype == torch.float32 and _float32_matmul_exact()
        small: list[torch.Tensor] = []  # reduced by one _foreach_norm
        row_blocks: list[torch.Tensor] = []  # (rows, BLOCK) views
        pairs: list[tuple[torch.Tensor, torch.Tensor]] = []  # (rows, 2, PAIR) views, transposed
        copies: list[torch.Tensor] = []
        for tensor in group:
            size = tensor.numel()
            if size <= SMALL:
                small.append(tensor)
                continue
            if not tensor.is_contiguous():  # copied when reduced, one at a time
                copies.append(tensor)
                continue
            gram = gram_ok and size >= GRAM_MIN
            block = 2 * PAIR if gram else BLOCK
            rows, tail = divmod(size, block)
            body = tensor
            if tail:  # the tail joins the small tensors
                flat = tensor.view(-1)
                body = flat[: rows * block]
                small.append(flat[rows * block :])
            if gram:
                view = body.view(rows, 2, PAIR)
                pairs.append((view, view.mT))
            else:
                row_blocks.append(body.view(rows, BLOCK))
        parts = [self._cpu_sum([tensor.contiguous()], p, acc) for tensor in copies]
        if small:  # first: little to read, and torch's code is still in cache
            norms = torch.stack(torch._foreach_norm(small, p, dtype=rows_dtype))
            parts.append(norms.to(acc).pow(p).sum())
        row_norms = [
            torch.linalg.vector_norm(rows, p, dim=1, dtype=rows_dtype) for rows in row_blocks
        ]
        grams = [torch.bmm(view, transposed) for view, transposed in pairs]
        if row_norms:
            parts.append(torch.cat(row_norms).to(acc).pow(p).sum())
        if grams:  # the diagonals: the rows' sums of squares
            parts.append(torch.cat(grams).diagonal(dim1=1, dim2=2).sum(dtype=acc))
        return sum(parts[1:], parts[0])

    def _device_sum(self, group: list[torch.Tensor], p: float, acc: Any) -> torch.Tensor:
        if p in (1.0, 2.0):
            norms = list(torch._foreach_norm(group, p, dtype=acc))
        else:
            norms = [torch.linalg.vector_norm(t, p, dtype=acc) for t in group]
        return torch.stack(norms).pow(p).sum()

    def max_abs(self, batch: Batch, acc: Any) -> Any:
        parts = [
            torch.stack(list(torch._foreach_norm(nonempty, float("inf")))).max().to(acc)
            for group in batch.groups
            if (nonempty := [t for t in group if t.numel()])
        ]
        if not parts:
            return torch.zeros((), dtype=acc)
        return self.stack(parts).max()

    def stack(self, parts: Sequence[Any]) -> Any:
        device = parts[0].device
        return torch.stack([part.to(device) for part in parts])

    def host_scalar(self, x: Any) -> float | None:
        if x.is_cpu and x.dtype == torch.float64 and x.ndim == 0 and not x.requires_grad:
            return float(x)
        return None

    def from_host(self, value: float, like: Any) -> Any:
        return torch.full((), value, dtype=like.dtype, device=like.device)

    def select(self, keep: Any, value: Any, fallback: Callable[[], Any]) -> Any:
        if keep.is_cpu:
            return value if bool(keep) else fallback()
        return torch.where(keep, value, fallback())

    def scale_(self, batch: Batch, factor: Any) -> None:
        """In place; on CPU no pass at all when the factor is exactly 1."""
        if factor.is_cpu and float(factor) == 1:
            return
        for group in batch.groups:
            device = group[0].device
            local = factor.to(device=device, dtype=_work_dtype(group[0].dtype))
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
