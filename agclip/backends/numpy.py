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

import numpy as np
from array_api_compat import numpy as compat_numpy

from .._checks import check_eps, check_ord, check_precision, check_threshold
from .._dispatch import kernels_for
from .._pipeline import clip_by_total_norm
from .._typing import Scalar

__all__ = ["clip_by_global_norm_", "clip_by_value_"]

_kernels = kernels_for(compat_numpy)  # the NumPy overrides, shared with the functional core


def _writable_arrays(arrays: Iterable[np.ndarray | None]) -> list[np.ndarray]:
    """The non-None arrays, checked to be writable floating ndarrays (nothing modified)."""
    checked = []
    for index, array in enumerate(arrays):
        if array is None:
            continue
        if not isinstance(array, np.ndarray):
            raise TypeError(f"arrays[{index}] is a {type(array).__name__}, not a numpy.ndarray")
        if not np.issubdtype(array.dtype, np.floating):
            raise TypeError(
                f"arrays[{index}] has dtype {array.dtype}; gradients must be floating point"
            )
        check_precision(array.dtype, f"arrays[{index}]")
        if not array.flags.writeable:
            raise ValueError(f"arrays[{index}] is read-only; it cannot be clipped in place")
        checked.append(array)
    return checked


def clip_by_global_norm_(
    arrays: Iterable[np.ndarray | None], max_norm: Scalar, *, ord: float = 2, eps: float = 1e-6
) -> float:
    """Scale the arrays in place so their global p-norm is at most ``max_norm``.

    Same rule as [`agclip.clip_by_global_norm`][agclip.clip_by_global_norm]:
    ``coef = min(1, max_norm / (norm + eps))``; when ``coef`` is 1 nothing is
    written at all.

    Args:
        arrays: floating-point ndarrays (``None`` entries skipped).
        max_norm: a finite number >= 0.
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
    _, norm = clip_by_total_norm(_kernels, batch, max_norm, eps, p=p, in_place=True)
    return float(norm)


def clip_by_value_(arrays: Iterable[np.ndarray | None], clip_value: Scalar) -> None:
    """Clip every element of the arrays into ``[-clip_value, clip_value]``, in place.

    References:
        Mikolov, "Statistical language models based on neural networks", 2012.
    """
    clip_value = check_threshold("clip_value", clip_value, compat_numpy)
    _kernels.clip_values_(_kernels.prepare(_writable_arrays(arrays)), clip_value)
