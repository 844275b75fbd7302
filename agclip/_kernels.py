"""The kernel contract: the primitives a backend may override, with generic versions.

The pipeline (``_pipeline``) talks only to a :class:`Kernels` object through the
methods below; a backend subclass (``backends/_numpy_kernels``,
``_torch_kernels``, ``_jax_kernels``) overrides any of them **with the same
signature**. Per-call options (``foreach``) are constructor arguments;
backend data computed once per call (PyTorch's device/dtype groups) rides on
the :class:`Batch` that :meth:`Kernels.prepare` returns. This module imports
no backend: ``_dispatch.kernels_for`` picks the subclass.

The contract, in one place:

=====================  ===============================================================
``prepare(leaves)``    a :class:`Batch` of the leaves, once per call
``accumulator``        dtype partial sums combine in
``result_dtype``       dtype of a returned norm
``needs_guard``        whether a norm needs the overflow/underflow guard (static)
``sum_of_powers``      sum(|x / divisor|**p) over the batch (times each group's weight)
``max_abs``            max(|x|) over the batch (NaN propagates)
``stack``              stack 0-d arrays onto one device
``quiet``              a context without overflow warnings
``constant``           a value autodiff treats as a constant
``differentiable``     whether autodiff may run through a value
``peek``               a 0-d array's value where reading it is free (host, untraced)
``select``             value() if keep else fallback() (the guard's branch)
``on_device_of``       an array moved to another array's device
``placement``          keyword arguments creating an array on another's device
``run``                run the array work of one call (JAX: compiled, cached)
``scale`` / ``scale_``  multiply every leaf by a 0-d factor (new arrays / in place)
``clip_values`` / ``clip_values_``  clip every element into [-v, v] (in place: NumPy, PyTorch)
=====================  ===============================================================
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import array_api_compat as compat
import numpy as np

# Reductions run over rows of this many elements, then over the row sums: two
# short sums instead of one long one keep float32 rounding error ~1e-8.
BLOCK = 4096
L1, L2 = 1.0, 2.0  # the norm orders with cheap power forms


def quiet() -> np.errstate:
    """Silence NumPy's overflow, invalid and divide-by-zero warnings (NumPy-backed
    libraries too): an overflowing fast path is expected, and handled by the norm's
    guard; a z-score over a zero spread may divide by zero, and is handled too."""
    return np.errstate(over="ignore", invalid="ignore", divide="ignore")


def at_least_zero(xp: ModuleType, threshold: Any) -> Any:
    """A threshold as given: a Python number (checked on the way in) as it is; an array
    (traced, or on a device: used unread, so unchecked) clipped at 0, since a schedule's
    rounding can dip below 0, and a negative threshold would flip the gradients' sign."""
    return threshold if isinstance(threshold, (int, float)) else xp.clip(threshold, min=0.0)


def pow_abs(xp: ModuleType, x: Any, p: float) -> Any:
    """|x|**p with the cheap forms for p = 1 and p = 2."""
    if p == L2:
        return x * x
    if p == L1:
        return xp.abs(x)
    return xp.abs(x) ** p


@dataclass(frozen=True)
class Batch:
    """The leaves of one call, as the kernels prepared them.

    ``groups`` holds the leaves in groups of one device and dtype when the
    backend needs them (PyTorch); the generic kernels leave it empty.
    ``weights``, when given (one per group), is what each group's sum of
    powers counts for in a norm: ``1 / replication`` for a shard that other
    ranks hold copies of (PyTorch's distributed norm).
    """

    leaves: list[Any]
    groups: list[list[Any]] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.leaves)

    @property
    def size(self) -> int:
        """The number of elements of all leaves together."""
        return sum(math.prod(leaf.shape) for leaf in self.leaves)


class Kernels:
    """Generic array-API kernels. Pure functions; no in-place writes unless named ``_``.

    Args:
        xp: the array-API namespace of the leaves.
        foreach: use fused multi-tensor kernels where the library has them
            (``None``: where they are faster; ``False``: one tensor at a time).
    """

    def __init__(self, xp: ModuleType, *, foreach: bool | None = None):
        self.xp = xp
        self.foreach = foreach

    def quiet(self) -> Any:
        """A context without overflow warnings: NumPy's (and NumPy-backed libraries')
        are silenced; libraries that warn about nothing need no context (and a
        compiler tracing them meets none)."""
        return quiet()

    # -- preparing ----------------------------------------------------------
    def prepare(self, leaves: Sequence[Any]) -> Batch:
        """The leaves of one call as a :class:`Batch` (backend data computed once)."""
        return Batch(list(leaves))

    # -- dtypes -----------------------------------------------------------
    def accumulator(self, batch: Batch) -> Any:
        """The dtype partial sums are combined in: float64 where the library has it."""
        return self.xp.float64

    def result_dtype(self, batch: Batch) -> Any:
        """float64 when a leaf is float64, else float32 (the numerics contract)."""
        xp = self.xp
        if any(leaf.dtype == xp.float64 for leaf in batch.leaves):
            return xp.float64
        return xp.float32

    def needs_guard(self, batch: Batch, p: float, acc: Any) -> bool:
        """Whether the norm needs the range guard: sum(|x|**p) of finite leaves could
        overflow or underflow ``acc`` (a static check on dtypes, sizes and p)."""
        dtypes = {leaf.dtype for leaf in batch.leaves}
        return self.overflow_possible(dtypes, batch.size, p, acc) or self.underflow_possible(
            dtypes, p, acc
        )

    def overflow_possible(self, dtypes: Iterable[Any], size: int, p: float, acc: Any) -> bool:
        """Whether ``size`` finite values of ``dtypes`` can overflow ``acc`` in sum(|x|**p)."""
        if math.isinf(p):
            return False
        finfo = self.xp.finfo
        worst = max((math.log10(float(finfo(dtype).max)) for dtype in dtypes), default=0.0)
        acc_digits = math.log10(float(finfo(acc).max))
        return p * worst + math.log10(max(size, 1)) >= acc_digits

    def underflow_possible(self, dtypes: Iterable[Any], p: float, acc: Any) -> bool:
        """Whether |x|**p of the tiniest nonzero value of ``dtypes`` falls below ``acc``'s
        normal range (its digits, or all of it, lost)."""
        if math.isinf(p):
            return False
        finfo = self.xp.finfo
        tiniest = min((_log10_tiniest(finfo(dtype)) for dtype in dtypes), default=0.0)
        return p * tiniest < math.log10(float(finfo(acc).smallest_normal))

    # -- reductions -------------------------------------------------------
    def sum_of_powers(self, batch: Batch, p: float, acc: Any, divisor: Any = None) -> Any:
        """sum over leaves of sum(|x / divisor|**p), accumulated in ``acc``; a 0-d array.
        (The caller keeps ``1 / divisor`` a normal number: XLA may multiply by it.)"""
        xp = self.xp
        with self.quiet():
            parts = []
            for weight, leaf in weighted_leaves(batch):
                if _size(leaf):
                    part = self._leaf_sum(leaf, p, acc, divisor)
                    parts.append(part if weight == 1.0 else part * weight)
            if not parts:
                return xp.zeros((), dtype=acc)
            return xp.sum(self.stack(parts))

    def _leaf_sum(self, x: Any, p: float, acc: Any, divisor: Any) -> Any:
        xp = self.xp
        flat = xp.astype(xp.reshape(x, (-1,)), acc, copy=False)
        if divisor is not None:
            flat = flat / divisor
        n = flat.shape[0]
        rows = n // BLOCK
        total = xp.zeros((), dtype=acc)
        if rows:
            body = xp.reshape(flat[: rows * BLOCK], (rows, BLOCK))
            total = xp.sum(xp.sum(pow_abs(xp, body, p), axis=1))
        if n % BLOCK:
            total = total + xp.sum(pow_abs(xp, flat[rows * BLOCK :], p))
        return total

    def max_abs(self, batch: Batch, acc: Any) -> Any:
        """max over leaves of max(|x|) as ``acc``; 0 for no elements; NaN propagates."""
        xp = self.xp
        parts = [xp.astype(xp.max(xp.abs(leaf)), acc) for leaf in batch.leaves if _size(leaf)]
        if not parts:
            return xp.zeros((), dtype=acc)
        stacked = self.stack(parts)
        # max() may drop NaN on some libraries; carry it explicitly.
        return xp.where(xp.any(xp.isnan(stacked)), xp.asarray(xp.nan, dtype=acc), xp.max(stacked))

    def stack(self, parts: Sequence[Any]) -> Any:
        """Stack 0-d arrays into one 1-d array on the first one's device."""
        xp = self.xp
        device = compat.device(parts[0])
        return xp.stack([compat.to_device(part, device) for part in parts])

    # -- control flow -----------------------------------------------------
    def run(self, fn: Callable[..., Any], *arrays: Any, **static: Any) -> Any:
        """``fn(self, *arrays, **static)``; JAX compiles it (once per options and shapes)."""
        return fn(self, *arrays, **static)

    def constant(self, x: Any) -> Any:
        """``x``, seen by automatic differentiation as a constant (``stop_gradient``);
        libraries without autodiff return it as it is."""
        return x

    def differentiable(self, x: Any) -> bool:
        """Whether automatic differentiation may run through ``x``."""
        return False

    def peek(self, x: Any) -> float | None:
        """The value of the 0-d array ``x`` where reading it costs nothing (host
        memory, not traced, not compiled); ``None`` elsewhere. It only steers
        control flow (skip a pass, take a branch), never the arithmetic."""
        return None

    def select(self, keep: Any, value: Callable[[], Any], fallback: Callable[[], Any]) -> Any:
        """``value()`` where ``keep`` (a bool, or a 0-d bool array) holds, else
        ``fallback()``: one branch when ``keep`` can be read for free, else both
        computed (``where``)."""
        known = keep if isinstance(keep, bool) else self.peek(keep)
        if known is not None:
            return value() if known else fallback()
        return self.xp.where(keep, value(), fallback())

    # -- scaling ----------------------------------------------------------
    def scale(self, batch: Batch, factor: Any) -> list[Any]:
        """Each leaf times ``factor`` (a 0-d array), as new arrays of the leaf's dtype.

        16-bit leaves are multiplied in float32: a small factor cast to float16
        first would lose its digits or flush to zero.
        """
        with self.quiet():
            halves = self._halves(factor)
            return [self._scaled(leaf, factor, halves) for leaf in batch.leaves]

    def _halves(self, factor: Any) -> tuple[float, ...] | None:
        """A factor below float32's normal range as two within it, where it can be read
        for free (``split``); ``None`` for any other."""
        known = self.peek(factor)
        halves = None if known is None else split(known)
        return halves if halves is not None and len(halves) > 1 else None

    def _scaled(self, leaf: Any, factor: Any, halves: tuple[float, ...] | None) -> Any:
        xp = self.xp
        work = xp.float64 if leaf.dtype == xp.float64 else xp.float32
        product = leaf if leaf.dtype == work else xp.astype(leaf, work)
        if halves is not None and work == xp.float32:
            for half in halves:
                product = product * xp.asarray(half, dtype=work, **self.placement(leaf))
        else:
            product = product * xp.astype(self.on_device_of(factor, leaf), work)
        return product if leaf.dtype == work else xp.astype(product, leaf.dtype)

    def scale_(self, batch: Batch, factor: Any) -> None:
        """Multiply each leaf by ``factor`` in place (libraries with item assignment)."""
        with self.quiet():
            halves = self._halves(factor)
            for leaf in batch.leaves:
                leaf[...] = self._scaled(leaf, factor, halves)

    def placement(self, like: Any) -> dict[str, Any]:
        """Keyword arguments that create an array on ``like``'s device."""
        return {"device": compat.device(like)}

    def on_device_of(self, value: Any, like: Any) -> Any:
        """``value`` (an array) moved to ``like``'s device when it is elsewhere."""
        device = compat.device(like)
        return value if compat.device(value) == device else compat.to_device(value, device)

    # -- value clipping ---------------------------------------------------
    def value_bound(self, dtype: Any, clip_value: Any) -> Any:
        """``clip_value`` within [0, ``dtype``'s largest finite value].

        A bound beyond the dtype's range clips nothing finite; capping it keeps
        the cast from overflowing (float16 has no 1e5), so one dtype group can
        never fail after another was already clipped.
        """
        top = float(self.xp.finfo(dtype).max)
        if isinstance(clip_value, float):
            return min(clip_value, top)
        return self.xp.astype(self.xp.minimum(at_least_zero(self.xp, clip_value), top), dtype)

    def clip_values(self, batch: Batch, clip_value: Any) -> list[Any]:
        """Each leaf clipped into ``[-clip_value, clip_value]`` (new arrays); NaN stays NaN."""
        xp = self.xp
        bounds = [self.value_bound(leaf.dtype, clip_value) for leaf in batch.leaves]
        return [xp.clip(leaf, -b, b) for leaf, b in zip(batch.leaves, bounds, strict=True)]


FLOAT32_TINY = float(np.finfo(np.float32).tiny)


def split(factor: float) -> tuple[float, ...]:
    """A factor below float32's normal range (the clip of a norm beyond float32's), as
    two within it whose product it is: rounded to float32 it would lose its digits, or
    become 0, though the values it gives are in range. Any other factor as itself."""
    if 0 < factor < FLOAT32_TINY:
        first = math.sqrt(factor)
        return (first, factor / first)
    return (factor,)


def weighted_leaves(batch: Batch) -> list[tuple[float, Any]]:
    """(weight, leaf) pairs: the batch's group weights, or 1 for every leaf."""
    if not batch.weights:
        return [(1.0, leaf) for leaf in batch.leaves]
    return [
        (weight, leaf)
        for group, weight in zip(batch.groups, batch.weights, strict=True)
        for leaf in group
    ]


def _log10_tiniest(finfo: Any) -> float:
    """log10 of the smallest positive subnormal of a floating dtype."""
    return math.log10(float(finfo.smallest_normal)) + math.log10(float(finfo.eps))


def _size(x: Any) -> int:
    return math.prod(x.shape)
