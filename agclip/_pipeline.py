"""The math, written once over the kernel contract, as plain steps that callers compose:

    norm = total_norm(k, batch, p, reduce)     # accurate, overflow- and underflow-safe
    factor = clip_coefficient(k, norm, max_norm, eps)   # or a rule's (``_rule``)
    leaves = apply_factor(k, batch, factor, in_place=...)   # or a fused step takes it

The cross-device or cross-rank reduction is a parameter (``Reduction``). The
per-leaf, value and finite operations of the public functions sit beside them.
Everything here takes validated arguments and is safe to trace under ``jax.jit``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ._kernels import Batch, Kernels, at_least_zero, pow_abs


@dataclass(frozen=True)
class Reduction:
    """How partial results combine across devices or ranks. This one is local
    (nothing to combine); the JAX adapter reduces over a named axis, the PyTorch
    one over a process group. Frozen and hashable: a static argument of compiled
    functions."""

    def sum(self, x: Any) -> Any:
        """Combine partial sums of powers."""
        return x

    def max(self, x: Any) -> Any:
        """Combine partial maxima."""
        return x

    def prepare(self, k: Kernels, leaves: Sequence[Any]) -> Batch:
        """The batch to reduce. A layout in which devices hold copies of some leaves
        weights them (``1 / copies``), so that the reduced sum counts each once."""
        return k.prepare(leaves)

    def needs_guard(self, needed_here: bool) -> bool:
        """Whether to take the range guard, given this device's static answer. The
        guard's fallback reduces again, so every participant must decide alike."""
        return needed_here

    def sum_and_count(self, total: Any, batch: Batch) -> tuple[Any, Any]:
        """Combine partial sums and the element counts behind them (ranks that hold
        different amounts of data reduce both at once: every rank then takes the same
        branch of the range guard); the count is ``None`` where it is this batch's."""
        return self.sum(total), None


LOCAL = Reduction()


def root(k: Kernels, total: Any, p: float) -> Any:
    """total ** (1/p), with a finite derivative at 0 (for jax.grad through the clip)."""
    xp = k.xp
    if not k.differentiable(total):
        return total ** (1.0 / p)
    zero = total == 0  # not `> 0`: NaN and inf must flow through
    safe = xp.where(zero, xp.ones_like(total), total)
    return xp.where(zero, xp.zeros_like(total), safe ** (1.0 / p))


def underflow_floor(size: Any) -> Any:
    """Below this, a sum of ``size`` p-th powers may have lost digits to underflow.

    A power computed in float32 that falls under float32's normal range keeps
    at most ~2^-149 absolute precision; ``size`` of them can shift the sum by
    ``size * 2^-149``. A sum at least ``size * 2^-122`` is therefore within
    ~1e-8 of the exact one.
    """
    return size * 2.0**-122  # an empty sum (size 0) is exact: 0 >= 0


UNDERFLOW_BOUND = underflow_floor(2**64)  # above any count's floor


def total_norm(k: Kernels, batch: Batch, p: float, reduce: Reduction = LOCAL) -> Any:
    """The p-norm of all leaves together, as a 0-d array of the accumulator dtype.

    Fast path: one accurate pass of sum(|x|**p). Only when that sum can leave
    the accumulator's range for finite inputs (``k.needs_guard``: a static
    check on dtypes, sizes and p) is the result guarded: if it overflowed (not
    finite) or may have underflowed (under ``underflow_floor``), the norm is
    recomputed on inputs divided by their largest magnitude, which can do
    neither. Both branches compute from their inputs inside the branch, so a
    gradient through the taken one never meets the other's inf or 0.
    """
    xp = k.xp
    acc = k.accumulator(batch)
    if math.isinf(p):
        return reduce.max(k.max_abs(batch, acc))
    total, count = reduce.sum_and_count(k.sum_of_powers(batch, p, acc), batch)
    if not reduce.needs_guard(k.needs_guard(batch, p, acc)):
        return root(k, total, p)

    def floor() -> Any:
        return underflow_floor(batch.size if count is None else count)

    def rescaled() -> Any:
        # Non-finite inputs keep the plain result (inf or NaN), as torch does;
        # all-zero inputs keep 0.
        return by_largest(
            k,
            reduce.max(k.max_abs(batch, acc)),
            lambda divisor: root(k, reduce.sum(k.sum_of_powers(batch, p, acc, divisor=divisor)), p),
            otherwise=lambda: root(k, total, p),
        )

    known = k.peek(total)
    if known is not None:  # free to read: no array calls (no size count either, mostly)
        in_range = math.isfinite(known) and (known >= UNDERFLOW_BOUND or known >= floor())
    else:
        in_range = xp.isfinite(total) & (total >= floor())
    return k.select(in_range, lambda: root(k, total, p), rescaled)


def by_largest(
    k: Kernels, peak: Any, norm_of_scaled: Callable[[Any], Any], otherwise: Callable[[], Any]
) -> Any:
    """``peak * norm_of_scaled(peak)``: a norm taken on values divided by their largest
    magnitude ``peak``, so that no power overflows or underflows; ``otherwise()``
    where ``peak`` is no usable divisor (0, inf or NaN).

    The norm is homogeneous, so its derivative through the divisor is zero: the
    divisor is a constant to autodiff, whose chain through ``1 / peak`` would meet
    the very overflow (or underflow) this avoids, and turn 0 * inf into NaN. It is
    kept within [smallest normal, 1 / smallest normal] (exact powers of two): XLA
    turns ``x / d`` into ``x * (1 / d)``, and flushes a subnormal ``1 / d`` to 0.
    """
    xp = k.xp
    usable = xp.isfinite(peak) & (peak > 0)
    tiny = float(xp.finfo(peak.dtype).smallest_normal)
    divisor = k.constant(xp.clip(xp.where(usable, peak, xp.ones_like(peak)), tiny, 1 / tiny))
    return k.select(usable, lambda: divisor * norm_of_scaled(divisor), otherwise)


def clip_coefficient(k: Kernels, norm: Any, max_norm: Any, eps: Any) -> Any:
    """min(1, max_norm / (norm + eps)), branch-free, in the norm's dtype.

    With ``eps=0`` the denominator is floored at the dtype's smallest normal
    number, so a zero norm gives 1 (or 0 for ``max_norm=0``), never NaN.
    """
    xp = k.xp
    max_norm = at_least_zero(xp, max_norm)
    numerator, denominator = max_norm, norm + eps
    tiny = float(xp.finfo(norm.dtype).smallest_normal)
    if not (isinstance(eps, (int, float)) and eps >= tiny):  # eps may be 0, tiny, traced
        denominator = xp.maximum(denominator, xp.full_like(norm, tiny))
    if k.differentiable(norm):
        # The derivative of 1 / d is -1 / d**2, which leaves float32 at norms ~1e20
        # (and drops the norm's own term): divide both sides by a constant copy of d
        # first, so that autodiff only ever meets numbers near 1 / d and 1. Only where
        # the factor is below 1 (elsewhere d is 1 here: max_norm / a tiny d, clipped
        # to 1, would still pass 0 * inf = NaN back), and with d capped at 1 / the
        # smallest normal number (a subnormal 1 / d, which XLA flushes to 0, made 0 / 0).
        # NaN, and inf / inf (NaN in the plain form), included: they flow through.
        clipping = ~(denominator <= max_norm) | xp.isinf(denominator)
        d = xp.where(clipping, denominator, xp.ones_like(denominator))
        finite = xp.where(xp.isfinite(d), d, xp.ones_like(d))
        unit = k.constant(1.0 / xp.clip(finite, max=1 / tiny))
        return xp.where(clipping, (max_norm * unit) / (d * unit), xp.ones_like(d))
    with k.quiet():  # max_norm / tiny may overflow to inf, which the clip turns into 1
        return xp.clip(numerator / denominator, max=1.0)


def needs_scaling(k: Kernels, factor: Any) -> bool:
    """False only where the factor is known, for free, to be exactly 1: then there is
    nothing to clip and no pass over the gradients at all."""
    return k.peek(factor) != 1.0


def apply_factor(k: Kernels, batch: Batch, factor: Any, *, in_place: bool) -> list[Any]:
    """The batch times ``factor``: new leaves, or the batch's own leaves scaled in place."""
    if not in_place:
        return k.scale(batch, factor)
    if needs_scaling(k, factor):
        k.scale_(batch, factor)
    return batch.leaves


def apply_per_unit(
    k: Kernels, units: Sequence[Batch], factors: Any, *, in_place: bool
) -> list[Any]:
    """Each unit (a batch) times its own entry of ``factors``."""
    leaves = []
    for index, unit in enumerate(units):
        leaves += apply_factor(k, unit, factors[index], in_place=in_place)
    return leaves


def units_of(k: Kernels, leaves: Sequence[Any], reduce: Reduction = LOCAL) -> list[Batch]:
    """One batch per leaf, each weighted as ``reduce`` weights it among all leaves."""
    batch = reduce.prepare(k, leaves)
    if not batch.weights:
        return [k.prepare([leaf]) for leaf in leaves]
    return [
        Batch([leaf], [[leaf]], [weight])
        for leaf, weight in zip(leaves, batch.weights, strict=True)
    ]


def norm_of_norms(k: Kernels, norms: Any, p: float) -> Any:
    """The p-norm of a vector of p-norms (the norm of all their elements), computed
    on the norms divided by the largest, so that no power overflows."""
    xp = k.xp
    peak = xp.max(norms)
    if math.isinf(p):
        return peak
    with k.quiet():
        return by_largest(
            k,
            peak,
            lambda divisor: root(k, xp.sum(pow_abs(xp, norms / divisor, p)), p),
            lambda: peak,
        )


# -- the array work of the public functions (run through ``Kernels.run``) ------
def global_norm_of_leaves(
    k: Kernels, leaves: list[Any], *, p: float, reduce: Reduction = LOCAL
) -> Any:
    """The global norm in the result dtype."""
    batch = reduce.prepare(k, leaves)
    return k.xp.astype(total_norm(k, batch, p, reduce), k.result_dtype(batch))


def clip_leaves_by_global_norm(
    k: Kernels, leaves: list[Any], max_norm: Any, eps: Any, *, p: float, reduce: Reduction = LOCAL
) -> tuple[list[Any], Any]:
    """New clipped leaves and the pre-clip norm in the result dtype."""
    batch = reduce.prepare(k, leaves)
    norm = total_norm(k, batch, p, reduce)
    clipped = apply_factor(k, batch, clip_coefficient(k, norm, max_norm, eps), in_place=False)
    return clipped, k.xp.astype(norm, k.result_dtype(batch))


def clip_each_leaf(
    k: Kernels, leaves: list[Any], max_norm: Any, eps: Any, *, p: float
) -> list[Any]:
    """Each leaf clipped by its own norm."""
    units = [k.prepare([leaf]) for leaf in leaves]
    factors = [clip_coefficient(k, total_norm(k, unit, p), max_norm, eps) for unit in units]
    return [k.scale(unit, factor)[0] for unit, factor in zip(units, factors, strict=True)]


def clip_leaves_by_value(k: Kernels, leaves: list[Any], clip_value: Any) -> list[Any]:
    """Each leaf clipped into ``[-clip_value, clip_value]``."""
    return k.clip_values(k.prepare(leaves), clip_value)


def leaves_all_finite(k: Kernels, leaves: list[Any]) -> Any:
    """A 0-d bool array: whether every element of every leaf is finite."""
    xp = k.xp
    return xp.all(k.stack([xp.all(xp.isfinite(leaf)) for leaf in leaves]))


def zero_nonfinite_leaves(k: Kernels, leaves: list[Any]) -> list[Any]:
    """Each leaf with NaN and ±inf replaced by 0."""
    xp = k.xp
    return [xp.where(xp.isfinite(leaf), leaf, xp.zeros_like(leaf)) for leaf in leaves]


def unit_norms(k: Kernels, x: Any, axes: tuple[int, ...], p: float) -> Any:
    """The p-norm of each unit of ``x`` (reduced over ``axes``, dimensions kept), taken
    on the unit divided by its largest magnitude: no power overflows or underflows
    (finite gradients of 1e20 would otherwise read an inf norm, and be zeroed)."""
    xp = k.xp
    peak = xp.max(xp.abs(x), axis=axes, keepdims=True)
    if math.isinf(p):
        return peak
    usable = xp.isfinite(peak) & (peak > 0)
    tiny = float(xp.finfo(x.dtype).smallest_normal)
    # A constant to autodiff (the norm is homogeneous), kept where 1 / divisor is normal.
    divisor = k.constant(xp.clip(xp.where(usable, peak, xp.ones_like(peak)), tiny, 1 / tiny))
    with k.quiet():
        scaled = xp.sum(pow_abs(xp, x / divisor, p), axis=axes, keepdims=True)
    return divisor * root(k, scaled, p)


def clip_units_by_params(
    k: Kernels,
    grads: list[Any],
    params: list[Any],
    clipping: Any,
    eps: Any,
    *,
    p: float,
    axes: tuple[tuple[int, ...], ...],
    skip: tuple[bool, ...],
) -> list[Any]:
    """Adaptive gradient clipping: every unit's gradient norm at most
    ``clipping * max(its parameter norm, eps)``; ``skip``ped leaves pass unchanged.
    Norms and the scale are computed in float32 (float64 for float64 leaves)."""
    xp = k.xp
    clipping = at_least_zero(xp, clipping)
    out = []
    for grad, param, unit_axes, passed in zip(grads, params, axes, skip, strict=True):
        if passed:
            out.append(grad)
            continue
        work = xp.float64 if grad.dtype == xp.float64 else xp.float32
        wide = xp.astype(grad, work)
        g_norm = unit_norms(k, wide, unit_axes, p)
        p_norm = unit_norms(k, xp.astype(param, work), unit_axes, p)
        max_norm = clipping * xp.maximum(p_norm, xp.full_like(p_norm, eps))
        with k.quiet():
            floor = xp.full_like(g_norm, 1e-6)
            factor = xp.where(
                g_norm > max_norm, max_norm / xp.maximum(g_norm, floor), xp.ones_like(g_norm)
            )
        out.append(xp.astype(wide * factor, grad.dtype))
    return out
