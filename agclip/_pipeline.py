"""The math, written once over the kernel contract.

:func:`clip_by_total_norm` is *the* pipeline: total norm -> coefficient ->
scale, functional or in place, with the cross-device / cross-rank reduction
as a parameter. The functional core, the NumPy and PyTorch adapters and the
JAX transforms all call it; the per-leaf, value and finite operations sit
beside it. Everything here takes validated arguments and a :class:`Batch`
(or leaves) and is safe to trace under ``jax.jit``.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ._kernels import L2, Batch, Kernels, pow_abs, quiet


@dataclass(frozen=True)
class Reduction:
    """How partial results combine across devices or ranks. This one is local
    (nothing to combine); the JAX adapter reduces over a named axis. Frozen
    and hashable: it is a static argument of compiled functions."""

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

    def sum_and_count(self, total: Any, count: int) -> tuple[Any, Any]:
        """Combine partial sums and the element counts behind them. Ranks that hold
        different amounts of data override this to reduce both in one collective,
        so that every rank takes the same branch of the range guard."""
        return self.sum(total), count


LOCAL = Reduction()


def root(k: Kernels, total: Any, p: float) -> Any:
    """total ** (1/p), with a finite derivative at 0 (for jax.grad through the clip)."""
    xp = k.xp
    zero = total == 0  # not `> 0`: NaN and inf must flow through
    safe = xp.where(zero, xp.ones_like(total), total)
    return xp.where(zero, xp.zeros_like(total), safe ** (1.0 / p))


def underflow_floor(size: Any) -> Any:
    """Below this, a sum of ``size`` p-th powers may have lost digits to underflow.

    A power computed in float32 that falls under float32's normal range keeps
    at most ~2^-149 absolute precision; ``size`` of them can shift the sum by
    ``size * 2^-149``. A sum at least ``size * 2^-122`` is therefore within
    ~1e-8 of the exact one. (Kernels that compute powers in float64 are even
    safer; a sum under the floor only costs them a second, rescaled pass.)
    """
    return size * 2.0**-122  # an empty sum (size 0) is exact: 0 >= 0


def total_norm(k: Kernels, batch: Batch, p: float, reduce: Reduction = LOCAL) -> Any:
    """The p-norm of all leaves together, as a 0-d array of the accumulator dtype.

    Fast path: one accurate pass of sum(|x|**p). Only when that sum can leave
    the accumulator's range for finite inputs (``k.needs_guard``: a static
    check on dtypes, sizes and p) is the result guarded: if it overflowed (not
    finite) or may have underflowed (under ``underflow_floor``), the norm is
    recomputed on inputs divided by their largest magnitude, which can do
    neither. How the guard branches is the kernels' business (``k.select``).
    """
    xp = k.xp
    acc = k.accumulator(batch)
    if math.isinf(p):
        return reduce.max(k.max_abs(batch, acc))
    count = batch.size  # before the pass over the data, which evicts the leaves' list
    total, count = reduce.sum_and_count(k.sum_of_powers(batch, p, acc), count)
    value = k.host_scalar(total)
    if value is not None and math.isfinite(value) and value >= underflow_floor(count):
        # In range, on the host: no guard to take, and the root without array
        # calls (each costs ~10 us on caches that the pass has just emptied).
        return k.from_host(math.sqrt(value) if p == L2 else value ** (1.0 / p), total)
    fast = root(k, total, p)
    if not reduce.needs_guard(k.needs_guard(batch, p, acc)):
        return fast

    def rescaled() -> Any:
        # Non-finite inputs keep the fast result (inf or NaN), as torch does;
        # all-zero inputs keep 0.
        return by_largest(
            k,
            reduce.max(k.max_abs(batch, acc)),
            lambda divisor: root(
                k, reduce.sum(k.sum_of_powers(batch, p, acc, scale=1.0 / divisor)), p
            ),
            otherwise=fast,
        )

    in_range = xp.isfinite(total) & (total >= underflow_floor(count))
    return k.select(in_range, fast, rescaled)


def by_largest(k: Kernels, peak: Any, norm_of_scaled: Callable[[Any], Any], otherwise: Any) -> Any:
    """``peak * norm_of_scaled(peak)``: a norm taken on values divided by their largest
    magnitude ``peak``, so that no power overflows or underflows; ``otherwise`` where
    ``peak`` is no usable divisor (0, inf or NaN)."""
    xp = k.xp
    usable = xp.isfinite(peak) & (peak > 0)
    divisor = xp.where(usable, peak, xp.ones_like(peak))
    return xp.where(usable, divisor * norm_of_scaled(divisor), otherwise)


def clip_coefficient(k: Kernels, norm: Any, max_norm: Any, eps: Any) -> Any:
    """min(1, max_norm / (norm + eps)), branch-free, in the norm's dtype.

    The denominator is floored at the dtype's smallest normal number, so a
    zero norm with ``eps=0`` gives 1 (or 0 for ``max_norm=0``), never NaN.
    A finite float64 norm on the host, with numbers for ``max_norm`` and
    ``eps``, is done in Python floats: the same IEEE operations, no array calls.
    """
    value = k.host_scalar(norm)
    if value is not None and math.isfinite(value) and _numbers(max_norm, eps):
        return k.from_host(min(1.0, max_norm / max(value + eps, sys.float_info.min)), norm)
    xp = k.xp
    floor = xp.full_like(norm, float(xp.finfo(norm.dtype).smallest_normal))
    with quiet():  # max_norm / floor may overflow to inf, which min() turns into 1
        return xp.minimum(xp.ones_like(norm), max_norm / xp.maximum(norm + eps, floor))


def _numbers(*values: Any) -> bool:
    """Python ints and floats only (not ``is_concrete_number``): a NumPy float32
    scalar would make the host arithmetic round in float32."""
    return all(isinstance(value, (int, float)) for value in values)


def apply_factor(k: Kernels, batch: Batch, factor: Any, *, in_place: bool) -> list[Any]:
    """The batch times ``factor``: new leaves, or the batch's own leaves scaled in place."""
    if in_place:
        k.scale_(batch, factor)
        return batch.leaves
    return k.scale(batch, factor)


def scale_by_norm(
    k: Kernels, batch: Batch, norm: Any, max_norm: Any, eps: Any, *, in_place: bool
) -> list[Any]:
    """Scale the batch by the coefficient for ``norm``: new leaves, or the batch's
    own leaves scaled in place."""
    return apply_factor(k, batch, clip_coefficient(k, norm, max_norm, eps), in_place=in_place)


def clip_by_total_norm(
    k: Kernels,
    batch: Batch,
    max_norm: Any,
    eps: Any,
    *,
    p: float,
    in_place: bool = False,
    reduce: Reduction = LOCAL,
    check: Callable[[Any], None] | None = None,
    hand_over: Callable[[Any, Any], None] | None = None,
    norm_divisor: Any = None,
) -> tuple[list[Any], Any]:
    """The pipeline: total norm -> ``check(norm)`` -> coefficient -> scale.

    Returns the clipped leaves (new arrays, or the batch's own leaves when
    ``in_place``) and the pre-clip norm in the accumulator dtype. ``check``
    runs between the norm and the first write: an error it raises leaves
    every leaf untouched. ``hand_over(coefficient, norm)``, when given,
    receives the coefficient instead of the leaves being scaled (a fused
    optimizer step applies it). ``norm_divisor`` divides the norm first (the
    loss scale of gradients that are still scaled).
    """
    norm = total_norm(k, batch, p, reduce)
    if norm_divisor is not None:
        norm = norm / norm_divisor
    if check is not None:
        check(norm)
    return _finish(k, batch, clip_coefficient(k, norm, max_norm, eps), norm, in_place, hand_over)


def _finish(
    k: Kernels,
    batch: Batch,
    factor: Any,
    norm: Any,
    in_place: bool,
    hand_over: Callable[[Any, Any], None] | None,
) -> tuple[list[Any], Any]:
    if hand_over is not None:
        hand_over(factor, norm)
        return batch.leaves, norm
    return apply_factor(k, batch, factor, in_place=in_place), norm


def clip_by_rule(
    k: Kernels,
    batch: Batch,
    rule: Callable[[Any, Any], tuple[Any, Any]],
    state: Any,
    eps: Any,
    *,
    p: float,
    in_place: bool = False,
    reduce: Reduction = LOCAL,
    check: Callable[[Any], None] | None = None,
    hand_over: Callable[[Any, Any], None] | None = None,
) -> tuple[list[Any], Any, Any]:
    """The pipeline with an adaptive threshold: total norm -> ``check(norm)`` ->
    ``rule(norm, state)`` gives the threshold and the new state -> coefficient -> scale.

    A non-finite norm gets coefficient 1: the leaves pass unchanged (scaling
    them could only turn inf into NaN), and a hand-over's step is skipped.
    Returns the leaves, the pre-clip norm (accumulator dtype) and the new state.
    """
    xp = k.xp
    norm = total_norm(k, batch, p, reduce)
    if check is not None:
        check(norm)
    max_norm, state = rule(norm, state)
    factor = clip_coefficient(k, norm, xp.astype(max_norm, norm.dtype), eps)
    factor = xp.where(xp.isfinite(norm), factor, xp.ones_like(factor))
    leaves, norm = _finish(k, batch, factor, norm, in_place, hand_over)
    return leaves, norm, state


def clip_by_tensor_rule(
    k: Kernels,
    units: Sequence[tuple[Batch, Reduction]],
    rule: Callable[[Any, Any, Any], tuple[Any, Any, Callable[[Any], Any]]],
    state: Any,
    eps: Any,
    *,
    p: float,
    in_place: bool = False,
    check: Callable[[Any], None] | None = None,
) -> tuple[list[Any], Any]:
    """Per-tensor adaptive clipping: each unit's norm (a tensor, with the reduction
    that makes it global) and their total -> ``check(total)`` -> ``rule(norms,
    total, state)`` gives a threshold for the total, one per unit, and the state
    update -> each unit scaled by the product of its two coefficients (1 when
    the total is not finite). Returns the leaves and the new state."""
    xp = k.xp
    norms = k.stack([total_norm(k, batch, p, reduce) for batch, reduce in units])
    total = norm_of_norms(k, norms, p)
    if check is not None:
        check(total)
    for_total, for_each, update = rule(norms, total, state)
    factors = clip_coefficient(k, total, xp.astype(for_total, total.dtype), eps)
    factors = factors * clip_coefficient(k, norms, xp.astype(for_each, norms.dtype), eps)
    factors = xp.where(xp.isfinite(total), factors, xp.ones_like(factors))
    leaves = []
    for index, (batch, _) in enumerate(units):
        leaves += apply_factor(k, batch, factors[index], in_place=in_place)
    return leaves, update(factors)


def norm_of_norms(k: Kernels, norms: Any, p: float) -> Any:
    """The p-norm of a vector of p-norms (the norm of all their elements), computed
    on the norms divided by the largest, so that no power overflows."""
    xp = k.xp
    peak = xp.max(norms)
    if math.isinf(p):
        return peak
    with quiet():
        return by_largest(
            k, peak, lambda divisor: root(k, xp.sum(pow_abs(xp, norms / divisor, p)), p), peak
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
    clipped, norm = clip_by_total_norm(k, batch, max_norm, eps, p=p, reduce=reduce)
    return clipped, k.xp.astype(norm, k.result_dtype(batch))


def clip_each_leaf(
    k: Kernels, leaves: list[Any], max_norm: Any, eps: Any, *, p: float
) -> list[Any]:
    """Each leaf clipped by its own norm."""
    return [clip_by_total_norm(k, k.prepare([leaf]), max_norm, eps, p=p)[0][0] for leaf in leaves]


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
    """The p-norm of each unit of ``x`` (reduced over ``axes``, dimensions kept)."""
    xp = k.xp
    if math.isinf(p):
        return xp.max(xp.abs(x), axis=axes, keepdims=True)
    return root(k, xp.sum(pow_abs(xp, x, p), axis=axes, keepdims=True), p)


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
        with quiet():
            floor = xp.full_like(g_norm, 1e-6)
            factor = xp.where(
                g_norm > max_norm, max_norm / xp.maximum(g_norm, floor), xp.ones_like(g_norm)
            )
        out.append(xp.astype(wide * factor, grad.dtype))
    return out
