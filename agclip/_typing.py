"""Public type aliases.

The array API standard has no common array type that every library's arrays
(and JAX tracers) satisfy, so these are documented aliases of ``Any``: they
say what a value is, and mypy checks everything around it.
"""

from __future__ import annotations

from typing import Any, TypeAlias

Array: TypeAlias = Any
"""An array of one array-API library: ``numpy.ndarray``, ``torch.Tensor``,
``jax.Array`` (or a tracer), ``array_api_strict`` arrays, ..."""

ArrayTree: TypeAlias = Any
"""A pytree of arrays: nested lists, tuples, dicts, namedtuples, ``None``
leaves, and JAX-registered nodes when the leaves are JAX arrays."""

Scalar: TypeAlias = Any
"""A threshold: a Python number or a 0-d array (host arrays are checked)."""
