"""Argument and leaf validation: clear errors, raised before any work is done."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from types import ModuleType
from typing import Any

from array_api_compat import array_namespace

from ._kernels import Kernels, kernels_for
from ._tree import FlatTree, flatten


def is_concrete_number(value: Any) -> bool:
    """A host number we can inspect without a device sync (not an array)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_threshold(name: str, value: Any) -> Any:
    """Validate ``max_norm`` / ``clip_value``: a finite number >= 0.

    Arrays (for example a traced schedule under ``jax.jit``) pass through
    unchecked: checking them would need a device sync.
    """
    if isinstance(value, (bool, str, bytes)):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    if is_concrete_number(value):
        number = float(value)
        if not math.isfinite(number) or number < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        return number
    if getattr(value, "shape", None) == ():
        return value
    raise TypeError(f"{name} must be a real number or a 0-d array, got {value!r}")


def check_eps(value: Any) -> float:
    if not is_concrete_number(value) or not math.isfinite(value) or value < 0:
        raise ValueError(f"eps must be a finite number >= 0, got {value!r}")
    return float(value)


def check_ord(value: Any, name: str = "ord") -> float:
    """Validate a norm order: 1, 2, inf or any finite p > 0. Returns a float."""
    if not is_concrete_number(value):
        raise ValueError(f"{name} must be a number > 0 (1, 2, inf or any p > 0), got {value!r}")
    p = float(value)
    if math.isnan(p) or p <= 0:
        raise ValueError(f"{name} must be > 0 (1, 2, inf or any p > 0), got {value!r}")
    return p


def leaf_namespace(leaves: Sequence[Any], paths: Sequence[str]) -> ModuleType | None:
    """The one array-API namespace of all leaves; ``TypeError`` naming the bad leaf.

    Leaves must be real floating-point arrays of a single library.
    """
    xp = None
    first_path = ""
    for leaf, path in zip(leaves, paths, strict=True):
        try:
            leaf_xp = array_namespace(leaf)
        except TypeError:
            raise TypeError(
                f"leaf {path} is a {type(leaf).__name__}, not an array; "
                "gradient trees hold arrays (or None)"
            ) from None
        if xp is None:
            xp, first_path = leaf_xp, path
        elif leaf_xp is not xp:
            raise TypeError(
                f"leaf {path} is a {type(leaf).__module__}.{type(leaf).__name__} but leaf "
                f"{first_path} comes from {xp.__name__.removeprefix('array_api_compat.')}: "
                "one call takes arrays of one library"
            )
        if not xp.isdtype(leaf.dtype, "real floating"):
            raise TypeError(
                f"leaf {path} has dtype {leaf.dtype}; gradients must be real floating point"
            )
    return xp


def flatten_arrays(tree: Any) -> tuple[FlatTree, Kernels | None]:
    """Flatten ``tree`` and validate its leaves; ``None`` kernels for an empty tree."""
    flat = flatten(tree)
    xp = leaf_namespace(flat.leaves, flat.paths)
    return flat, (kernels_for(xp) if xp is not None else None)
