"""JAX kernels: the range guard as ``lax.cond``, so the common path stays one fused pass."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from functools import cache, partial
from typing import Any

import jax
import jax.numpy as jnp

from .._kernels import BLOCK, Batch, Kernels, pow_abs, weighted_leaves

SMALL = 16 * BLOCK  # leaves up to this size are reduced together, as one concatenation


class JaxKernels(Kernels):
    def quiet(self) -> Any:
        return contextlib.nullcontext()  # XLA warns about no overflow

    def accumulator(self, batch: Batch) -> Any:
        # Without x64, float64 does not exist: accumulate in float32, blocked.
        x64 = jax.config.read("jax_enable_x64")
        return jnp.float64 if x64 else jnp.float32

    def sum_of_powers(self, batch: Batch, p: float, acc: Any, divisor: Any = None) -> Any:
        # The partial sums meet in a compensated pairwise sum: a float32 sum of
        # thousands of them would drift by ~1e-5.
        parts = []
        for weight, leaves in _by_weight(batch):
            for x in _pieces(leaves, acc):
                part = jnp.sum(pow_abs(jnp, x if divisor is None else x / divisor, p))
                parts.append(part if weight == 1.0 else part * weight)
        return _compensated_sum(jnp.stack(parts)) if parts else jnp.zeros((), acc)

    def max_abs(self, batch: Batch, acc: Any) -> Any:
        peaks = [jnp.max(jnp.abs(x), initial=0.0) for x in _pieces(batch.leaves, acc)]
        return jnp.max(jnp.stack(peaks))  # NaN propagates through XLA's max

    def stack(self, parts: Sequence[Any]) -> Any:
        return jnp.stack(list(parts))

    def run(self, fn: Callable[..., Any], *arrays: Any, **static: Any) -> Any:
        # Eager calls run compiled too: op-by-op dispatch and an eager lax.cond
        # are slow; jit caches per tree structure, shapes and dtypes.
        return _compiled(fn, self, tuple(sorted(static.items())))(*arrays)

    def differentiable(self, x: Any) -> bool:
        return True  # under jit, a grad's tracers look like any other

    def constant(self, x: Any) -> Any:
        return jax.lax.stop_gradient(x)

    def select(self, keep: Any, value: Callable[[], Any], fallback: Callable[[], Any]) -> Any:
        return jax.lax.cond(keep, value, fallback)

    def on_device_of(self, value: Any, like: Any) -> Any:
        return value  # XLA places scalars; tracers have no device to ask

    def placement(self, like: Any) -> dict[str, Any]:
        return {}  # XLA places new arrays; tracers have no device to ask


@cache
def _compiled(
    fn: Callable[..., Any], kernels: Kernels, static: tuple[tuple[str, Any], ...]
) -> Callable[..., Any]:
    return jax.jit(partial(fn, kernels, **dict(static)))


def _pieces(leaves: Sequence[Any], acc: Any) -> list[Any]:
    """Large leaves one by one (XLA fuses each reduction into one pass), the small ones
    as one concatenation: the graph, and its compile time, stays small however many
    leaves there are."""
    small = [jnp.ravel(leaf).astype(acc) for leaf in leaves if leaf.size <= SMALL]
    large = [leaf.astype(acc) for leaf in leaves if leaf.size > SMALL]
    return large + ([jnp.concatenate(small)] if small else [])


def _by_weight(batch: Batch) -> list[tuple[float, list[Any]]]:
    groups: dict[float, list[Any]] = {}
    for weight, leaf in weighted_leaves(batch):
        groups.setdefault(weight, []).append(leaf)
    return list(groups.items())


def _compensated_sum(values: Any) -> Any:
    """A pairwise sum whose rounding errors are kept (TwoSum) and added back: about
    float64's accuracy for float32 values, in log2(n) vector steps."""
    error = jnp.zeros((), values.dtype)
    while values.shape[0] > 1:
        if values.shape[0] % 2:
            values = jnp.concatenate([values, jnp.zeros(1, values.dtype)])
        a, b = values[0::2], values[1::2]
        values = a + b
        b_part = values - a
        error = error + jnp.sum((a - (values - b_part)) + (b - b_part))
    return values[0] + error
