"""Global and per-leaf norms: accurate, overflow-safe, any order p > 0."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from ._kernels import Kernels, quiet


def _same(x: Any) -> Any:
    return x


def root(k: Kernels, total: Any, p: float) -> Any:
    """total ** (1/p), with a finite derivative at 0 (for jax.grad through the clip)."""
    xp = k.xp
    zero = total == 0  # not `> 0`: NaN and inf must flow through
    safe = xp.where(zero, xp.ones_like(total), total)
    return xp.where(zero, xp.zeros_like(total), safe ** (1.0 / p))


def underflow_floor(size: int) -> float:
    """Below this, a sum of ``size`` p-th powers may have lost digits to underflow.

    A power computed in float32 that falls under float32's normal range keeps
    at most ~2^-149 absolute precision; ``size`` of them can shift the sum by
    ``size * 2^-149``. A sum at least ``size * 2^-122`` is therefore within
    ~1e-8 of the exact one. (Kernels that compute powers in float64 are even
    safer; a sum under the floor only costs them a second, rescaled pass.)
    """
    return max(size, 1) * 2.0**-122


def norm_of_leaves(
    k: Kernels,
    leaves: Sequence[Any],
    p: float,
    *,
    sum_across: Callable[[Any], Any] = _same,
    max_across: Callable[[Any], Any] = _same,
) -> Any:
    """The p-norm of all leaves together, as a 0-d array of the accumulator dtype.

    Fast path: one accurate pass of sum(|x|**p). Only when that sum can leave
    the accumulator's range for finite inputs (a static check on dtypes,
    sizes and p) is the result guarded: if it overflowed (not finite) or may
    have underflowed (under ``underflow_floor``), the norm is recomputed
    on inputs divided by their largest magnitude, which can do neither. How
    the guard branches is the kernels' business (host ``if``, ``lax.cond`` or
    ``where``).

    ``sum_across`` / ``max_across`` combine partial results over devices
    (``lax.psum`` / ``lax.pmax`` over a named axis in the JAX adapter).
    """
    xp = k.xp
    acc = k.accumulator(leaves)
    if math.isinf(p):
        return max_across(k.max_abs(leaves, acc))
    total = sum_across(k.sum_of_powers(leaves, p, acc))
    fast = root(k, total, p)
    if not k.needs_guard(leaves, p, acc):
        return fast

    def rescaled() -> Any:
        peak = max_across(k.max_abs(leaves, acc))
        usable = xp.isfinite(peak) & (peak > 0)
        divisor = xp.where(usable, peak, xp.ones_like(peak))
        scaled_total = sum_across(k.sum_of_powers(leaves, p, acc, scale=1.0 / divisor))
        norm = divisor * root(k, scaled_total, p)
        # Non-finite inputs keep the fast result (inf or NaN), as torch does;
        # all-zero inputs keep 0.
        return xp.where(usable, norm, fast)

    size = sum(math.prod(leaf.shape) for leaf in leaves)
    in_range = xp.isfinite(total) & (total >= underflow_floor(size))
    return k.select(in_range, fast, rescaled)


def clip_coefficient(k: Kernels, norm: Any, max_norm: Any, eps: float) -> Any:
    """min(1, max_norm / (norm + eps)), branch-free, in the norm's dtype.

    The denominator is floored at the dtype's smallest normal number, so a
    zero norm with ``eps=0`` gives 1 (or 0 for ``max_norm=0``), never NaN.
    """
    xp = k.xp
    floor = xp.full_like(norm, float(xp.finfo(norm.dtype).smallest_normal))
    with quiet():  # max_norm / floor may overflow to inf, which min() turns into 1
        return xp.minimum(xp.ones_like(norm), max_norm / xp.maximum(norm + eps, floor))
