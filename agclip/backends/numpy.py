"""NumPy adapter: clip lists of ndarrays in place.

Reductions are BLAS dot products over 256 KiB blocks (accurate and without
full-size temporaries); scaling is one in-place multiply, skipped entirely
when no clipping is needed.

Examples:
    >>> import numpy as np
    >>> from agclip.backends.numpy import clip_by_global_norm_
    >>> grads = [np.array([3.0, 4.0], dtype=np.float32), None]
    >>> clip_by_global_norm_(grads, 1.0)
    5.0
    >>> [round(float(g), 4) for g in grads[0]]
    [0.6, 0.8]
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, cast

import numpy as np
from array_api_compat import numpy as compat_numpy

from .._checks import check_eps, check_ord, check_precision, check_threshold
from .._dispatch import kernels_for
from .._pipeline import apply_factor, clip_coefficient, total_norm
from .._typing import Scalar
from ._numpy_kernels import NumpyKernels

__all__ = ["clip_by_global_norm_", "clip_by_value_"]

# The NumPy overrides, shared with the functional core.
_kernels = cast(NumpyKernels, kernels_for(compat_numpy))


def _writable_arrays(arrays: Iterable[np.ndarray | None]) -> list[np.ndarray]:
    """The non-None arrays, checked to be writable floating ndarrays that do not
    overlap in memory (nothing modified). An array given twice (the same object, or
    the same view of the same memory: tied weights listed twice) counts once."""
    checked: dict[tuple[Any, ...], tuple[int, np.ndarray]] = {}
    for index, array in enumerate(arrays):
        if array is None:
            continue
        if not isinstance(array, np.ndarray) or isinstance(array, np.ma.MaskedArray):
            raise TypeError(
                f"arrays[{index}] is a {type(array).__name__}, not a plain numpy.ndarray "
                "(a masked array's mask would be ignored: pass array.filled(0))"
            )
        if not np.issubdtype(array.dtype, np.floating):
            raise TypeError(
                f"arrays[{index}] has dtype {array.dtype}; gradients must be floating point"
            )
        check_precision(array.dtype, f"arrays[{index}]")
        if not array.flags.writeable:
            raise ValueError(f"arrays[{index}] is read-only; it cannot be clipped in place")
        key = (array.__array_interface__["data"][0], array.shape, array.strides, array.dtype.str)
        checked.setdefault(key, (index, array))
    _check_no_overlap(list(checked.values()))
    return [array for _, array in checked.values()]


def _check_no_overlap(arrays: list[tuple[int, np.ndarray]]) -> None:
    """Distinct arrays that share memory would be counted and scaled twice where they
    meet: a ``ValueError`` naming both, before any write."""
    spans = sorted((*_bounds(array), index, array) for index, array in arrays)
    open_spans: list[tuple[int, int, int, np.ndarray]] = []
    for span in spans:
        open_spans = [other for other in open_spans if other[1] > span[0]]
        for other in open_spans:
            if np.shares_memory(other[3], span[3]):
                raise ValueError(
                    f"arrays[{other[2]}] and arrays[{span[2]}] overlap in memory: each value "
                    "would count twice in the norm and be scaled twice; pass each buffer once"
                )
        open_spans.append(span)


def _bounds(array: np.ndarray) -> tuple[int, int]:
    """The first and one-past-last byte addresses ``array`` spans."""
    low = high = array.__array_interface__["data"][0]
    for size, stride in zip(array.shape, array.strides, strict=True):
        low, high = low + min(0, stride * (size - 1)), high + max(0, stride * (size - 1))
    return low, high + array.itemsize


def clip_by_global_norm_(
    arrays: Iterable[np.ndarray | None], max_norm: Scalar, *, ord: float = 2, eps: float = 1e-6
) -> float:
    """Scale the arrays in place so their global p-norm is at most ``max_norm``.

    Same rule as ``agclip.clip_by_global_norm``:
    ``coef = min(1, max_norm / (norm + eps))``; when ``coef`` is 1 nothing is
    written at all.

    Args:
        arrays: floating-point ndarrays (``None`` entries skipped). An array given
            twice counts once; arrays that otherwise share memory are a
            ``ValueError``; masked arrays a ``TypeError``.
        max_norm: a number >= 0 (``inf``: measure only).
        ord: 2 (default), 1, ``inf`` or any finite p > 0.
        eps: added to the norm before dividing; >= 0.

    Returns:
        The pre-clip global norm, as a Python float.

    References:
        Pascanu, Mikolov and Bengio, "On the difficulty of training recurrent
        neural networks", ICML 2013.
    """
    max_norm = check_threshold("max_norm", max_norm, compat_numpy)
    p, eps = check_ord(ord), check_eps(eps)
    batch = _kernels.prepare(_writable_arrays(arrays))
    norm = total_norm(_kernels, batch, p)
    apply_factor(_kernels, batch, clip_coefficient(_kernels, norm, max_norm, eps), in_place=True)
    return float(norm)


def clip_by_value_(arrays: Iterable[np.ndarray | None], clip_value: Scalar) -> None:
    """Clip every element of the arrays into ``[-clip_value, clip_value]``, in place.

    References:
        Mikolov, "Statistical language models based on neural networks", 2012.
    """
    clip_value = check_threshold("clip_value", clip_value, compat_numpy)
    _kernels.clip_values_(_kernels.prepare(_writable_arrays(arrays)), clip_value)
