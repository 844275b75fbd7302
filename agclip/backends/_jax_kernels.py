"""JAX kernels: the range guard as ``lax.cond``, so the common path stays one fused pass."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from functools import cache, partial
from typing import Any

import jax
import jax.numpy as jnp

from .._kernels import Batch, Kernels, pow_abs


class JaxKernels(Kernels):
    def quiet(self) -> Any:
        return contextlib.nullcontext()  # XLA warns about no overflow

    def accumulator(self, batch: Batch) -> Any:
        # Without x64, float64 does not exist: accumulate in float32, blocked.
        x64 = jax.config.read("jax_enable_x64")
        return jnp.float64 if x64 else jnp.float32

    def _leaf_sum(self, x: Any, p: float, acc: Any, scale: Any) -> Any:
        # XLA already reduces in a tree: a plain sum is as accurate as the
        # generic row blocking, and faster, since the blocked reshape defeats
        # XLA's fused reduction.
        x = x.astype(acc)
        return jnp.sum(pow_abs(jnp, x if scale is None else x * scale, p))

    def stack(self, parts: Sequence[Any]) -> Any:
        return jnp.stack(list(parts))

    def run(self, fn: Callable[..., Any], *arrays: Any, **static: Any) -> Any:
        # Eager calls run compiled too: op-by-op dispatch and an eager lax.cond
        # are slow; jit caches per tree structure, shapes and dtypes.
        return _compiled(fn, self, tuple(sorted(static.items())))(*arrays)

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
