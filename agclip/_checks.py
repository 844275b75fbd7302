"""Argument and leaf validation: clear errors, raised before any work is done."""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Sequence
from types import ModuleType
from typing import Any

import array_api_compat as compat
import numpy as np
from array_api_compat import array_namespace

FLOAT64_BYTES = 8


def is_concrete_number(value: Any) -> bool:
    """A host number we can inspect without a device sync (not an array)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _library(xp: ModuleType) -> str:
    return xp.__name__.removeprefix("array_api_compat.")


def host_value(value: Any) -> float | None:
    """The value of a 0-d array that lives on the host (NumPy, a CPU tensor,
    array_api_strict), read for free; ``None`` for device arrays and tracers."""
    if isinstance(value, np.generic) or compat.is_numpy_array(value):
        return float(value)
    if compat.is_torch_array(value):
        return float(value.detach()) if value.device.type == "cpu" else None
    if compat.is_array_api_strict_namespace(compat.array_namespace(value)):
        return float(value)
    return None


def check_threshold(name: str, value: Any, xp: ModuleType | None = None) -> Any:
    """Validate ``max_norm`` / ``clip_value``: a number >= 0, finite except
    ``max_norm = inf`` (as in torch: the norm is measured, nothing is clipped).

    Numbers and 0-d arrays that live on the host are checked and returned as
    a Python float. Device arrays and tracers (a schedule's value under
    ``jax.jit``, a CUDA tensor) pass through unchecked: reading them would
    need a device sync. An array of another library than the gradients'
    (``xp``) is a ``TypeError`` naming the argument.
    """
    if isinstance(value, (bool, str, bytes)) or value is None:
        raise TypeError(f"{name} must be a real number, got {value!r}")
    if is_concrete_number(value):
        return _finite_non_negative(name, float(value), value)
    if getattr(value, "shape", None) != ():
        raise TypeError(f"{name} must be a real number or a 0-d array, got {value!r}")
    if isinstance(value, np.generic) or compat.is_numpy_array(value):
        value_xp = None  # host data: usable with any library's gradients
    else:
        try:
            value_xp = compat.array_namespace(value)
        except TypeError:
            raise TypeError(f"{name} must be a real number or a 0-d array, got {value!r}") from None
    if value_xp is not None and xp is not None and value_xp is not xp:
        raise TypeError(
            f"{name} is a {_library(value_xp)} array but the gradients are {_library(xp)} "
            f"arrays; pass a Python number or a 0-d array of the gradients' library"
        )
    kind = getattr(value, "dtype", None)
    if kind is not None and (str(kind).endswith("bool") or "complex" in str(kind)):
        raise TypeError(f"{name} must be real, got an array of dtype {kind}")
    number = host_value(value)
    if number is None:
        return value
    return _finite_non_negative(name, number, value)


def _finite_non_negative(name: str, number: float, given: Any) -> float:
    if name == "max_norm" and number == math.inf:  # measure only
        return number
    # not math.isfinite: under torch.compile a Python float argument is symbolic
    if not (abs(number) < math.inf) or number < 0:
        allowed = "a number >= 0 (inf: measure only)" if name == "max_norm" else None
        raise ValueError(f"{name} must be {allowed or 'a finite number >= 0'}, got {given!r}")
    return number


def _is_0d_array(value: Any) -> bool:
    return getattr(value, "shape", None) == () and not isinstance(value, str)


def _host_number(value: Any) -> float | None:
    """A number, or the value of a 0-d array that lives on the host; ``None`` for
    anything else (device arrays and tracers included)."""
    if is_concrete_number(value):
        return float(value)
    return host_value(value) if _is_0d_array(value) else None


def check_eps(value: Any, name: str = "eps") -> Any:
    """Validate an epsilon: a finite number >= 0 (host values checked, tracers passed)."""
    number = _host_number(value)
    if number is None and _is_0d_array(value):
        return value  # a traced or device 0-d array (optax.inject_hyperparams)
    if number is None or not math.isfinite(number) or number < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(number)


def check_range(
    name: str,
    value: Any,
    low: float,
    high: float = math.inf,
    *,
    open_low: bool = False,
    open_high: bool = False,
) -> Any:
    """Validate a hyperparameter in ``[low, high]`` (ends open as asked). Host values
    are checked and returned as a float; device arrays and tracers pass unread."""
    number = _host_number(value)
    if number is None and _is_0d_array(value) and not str(value.dtype).endswith("bool"):
        return value  # a traced or device 0-d array (optax.inject_hyperparams)
    inside = (
        number is not None
        and (low < number if open_low else low <= number)
        and (number < high if open_high else number <= high)
    )
    if not inside:
        interval = f"{'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}"
        raise ValueError(f"{name} must be a number in {interval}, got {value!r}")
    return float(number)  # type: ignore[arg-type]


def check_count(name: str, value: Any, low: int = 0) -> Any:
    """Validate an int >= ``low``. A 0-d integer array is checked when it lives on the
    host; a device array (a tracer under ``inject_hyperparams``) passes unread."""
    kind = str(getattr(value, "dtype", ""))
    if _is_0d_array(value) and "int" in kind:
        number = host_value(value)
        if number is None:
            return value
        value = int(number)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return value


def check_size(name: str, value: Any) -> int:
    """Validate a size of a state (an int >= 1). It shapes arrays, so it must be known
    when the state is made: a traced value is a ``TypeError`` saying so."""
    try:
        number = None if isinstance(value, (bool, float)) else operator.index(value)
    except TypeError:
        number = None
    if number is None and "int" in str(getattr(value, "dtype", "")):
        raise TypeError(
            f"{name} sets the size of the state, so it must be known when the state is "
            f"made, not traced: with optax.inject_hyperparams pass static_args=({name!r},)"
        )
    if number is None or number < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return number


def check_ord(value: Any, name: str = "ord") -> float:
    """Validate a norm order: 1, 2, inf or any finite p > 0. Returns a float.

    The order picks the code path, so it must be known on the host: a number
    or a 0-d host array.
    """
    number = _host_number(value)
    if number is None:
        raise ValueError(f"{name} must be a number > 0 (1, 2, inf or any p > 0), got {value!r}")
    p = float(number)
    if math.isnan(p) or p <= 0:
        raise ValueError(f"{name} must be > 0 (1, 2, inf or any p > 0), got {value!r}")
    return p


def check_precision(dtype: Any, label: str) -> None:
    """Reject extended precision (``np.longdouble``): the kernels accumulate in at most
    float64, so its range and digits would be silently lost."""
    if getattr(dtype, "itemsize", 0) > FLOAT64_BYTES:
        raise TypeError(
            f"{label} has dtype {dtype}; extended precision is not supported (convert to float64)"
        )


def leaf_namespace(leaves: Sequence[Any], paths: Sequence[str]) -> ModuleType | None:
    """The one array-API namespace of all leaves; ``TypeError`` naming the bad leaf.

    Leaves must be real floating-point arrays of a single library.
    """
    xp = None
    first_path = ""
    for leaf, path in zip(leaves, paths, strict=True):
        if isinstance(leaf, np.ma.MaskedArray):
            raise TypeError(
                f"leaf {path} is a masked array: its mask would be ignored; pass "
                "leaf.filled(0) (or the values that should count)"
            )
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
                f"{first_path} comes from {_library(xp)}: "
                "one call takes arrays of one library"
            )
        if not xp.isdtype(leaf.dtype, "real floating"):
            raise TypeError(
                f"leaf {path} has dtype {leaf.dtype}; gradients must be real floating point"
            )
        check_precision(leaf.dtype, f"leaf {path}")
    return xp


def choice(name: str, value: Any, allowed: tuple[str, ...]) -> str:
    """One of ``allowed`` (any case)."""
    chosen = value.lower() if isinstance(value, str) else value
    if chosen not in allowed:
        options = " or ".join(map(repr, allowed))
        raise ValueError(f"{name} must be either {options}, got {value!r}")
    return str(chosen)


def check_flag(name: str, value: Any) -> Any:
    """A bool, or a 0-d array (a flag injected under ``optax.inject_hyperparams``)."""
    if isinstance(value, bool) or _is_0d_array(value):
        return value
    raise TypeError(f"{name} must be a bool, got {value!r}")
