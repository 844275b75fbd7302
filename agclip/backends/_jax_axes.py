"""How the norm of JAX updates is reduced across devices: nothing under ``jit``
(GSPMD already sees global arrays), a psum over named axes inside ``shard_map``,
with leaves that are copies along an axis counted once (``specs``)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jax
from jax.sharding import PartitionSpec

from .._kernels import Batch, Kernels
from .._pipeline import LOCAL, Reduction


@dataclass(frozen=True)
class AxisReduction(Reduction):
    """Partial sums and maxima combined over the devices of named axes
    (``shard_map`` / ``pmap``): the pipeline's reduction parameter.

    ``replicated``, per leaf, names the axes over which that leaf is *not*
    partitioned (its devices hold copies): its sum of powers counts for
    ``1 / copies``, so the psum counts it once. ``None``: every leaf is
    partitioned over every axis.
    """

    axis_name: Any
    replicated: tuple[tuple[Any, ...], ...] | None = None

    def prepare(self, k: Kernels, leaves: Sequence[Any]) -> Batch:
        if self.replicated is None:
            return k.prepare(leaves)
        copies = [math.prod(_axis_size(name) for name in names) for names in self.replicated]
        return Batch(list(leaves), [[leaf] for leaf in leaves], [1.0 / c for c in copies])

    def sum(self, x: Any) -> Any:
        return jax.lax.psum(_varying(x, self.axis_name), self.axis_name)

    def max(self, x: Any) -> Any:
        return jax.lax.pmax(_varying(x, self.axis_name), self.axis_name)


def _varying(x: Any, axis_name: Any) -> Any:
    """``x`` typed as varying over every axis of ``axis_name``. Under ``shard_map``'s
    type checks (``check_vma``), a partial result of leaves replicated along an axis
    is invariant there, and a collective over that axis refuses it; the copies are
    already weighted (``prepare``), so summing them is what is meant."""
    axes = axis_name if isinstance(axis_name, tuple) else (axis_name,)
    aval = jax.typeof(x) if hasattr(jax, "typeof") else None
    kind = getattr(aval, "manual_axis_type", None)  # newer JAX; ``aval.vma`` before
    varying = getattr(kind, "varying", None) if kind is not None else getattr(aval, "vma", None)
    # Nothing varying: no type checks here (vmap, pmap, check_vma=False), or a value
    # invariant along every axis, which the collectives take as it is.
    missing = tuple(a for a in axes if a not in varying) if varying else ()
    if not missing:
        return x
    if hasattr(jax.lax, "pcast"):
        return jax.lax.pcast(x, missing, to="varying")
    return jax.lax.pvary(x, missing)  # type: ignore[attr-defined]  # JAX before pcast


def _axis_size(name: Any) -> int:
    """The number of devices along a named axis (``lax.axis_size``, or a psum of 1 on
    JAX versions without it: a static number either way)."""
    if hasattr(jax.lax, "axis_size"):
        return int(jax.lax.axis_size(name))
    return int(jax.lax.psum(1, name))


def reduction_for(axis_name: Any, specs: Any, updates: Any) -> Reduction:
    """How the norm of ``updates`` is reduced across devices (see ``AxisReduction``)."""
    if axis_name is None:
        return LOCAL
    if specs is None:
        return AxisReduction(axis_name)
    axes = axis_name if isinstance(axis_name, tuple) else (axis_name,)
    structure: Any = jax.tree_util.tree_structure(updates)  # PyTreeDef: untyped methods
    if isinstance(specs, PartitionSpec):
        per_leaf = [specs] * structure.num_leaves
    else:
        try:
            per_leaf = structure.flatten_up_to(specs)
        except (ValueError, TypeError) as error:
            raise ValueError(f"specs must have the structure of the updates: {error}") from None
    return AxisReduction(
        axis_name, tuple(tuple(a for a in axes if a not in _axes_of(s)) for s in per_leaf)
    )


def _axes_of(spec: Any) -> set[Any]:
    """The mesh axes a PartitionSpec partitions over (None: a replicated leaf)."""
    used: set[Any] = set()
    for entry in () if spec is None else tuple(spec):
        if isinstance(entry, tuple):
            used.update(entry)
        elif entry is not None:
            used.add(entry)
    return used
