"""Which kernels for which arrays: the one place that knows the backends.

It sits above both the generic kernels (``_kernels``) and the backend
overrides (``backends/_*_kernels``), which import only ``_kernels``; the
overrides are imported here on first use, so ``import agclip`` imports no
framework.
"""

from __future__ import annotations

from functools import cache
from types import ModuleType
from typing import Any

import array_api_compat as compat

from ._checks import leaf_namespace
from ._kernels import Kernels
from ._tree import FlatTree, flatten


@cache
def kernels_for(xp: ModuleType, *, foreach: bool | None = None) -> Kernels:
    """The kernels for namespace ``xp``: a backend override or the generic ones."""
    if compat.is_numpy_namespace(xp):
        from .backends._numpy_kernels import NumpyKernels

        return NumpyKernels(xp, foreach=foreach)
    if compat.is_torch_namespace(xp):
        from .backends._torch_kernels import TorchKernels

        return TorchKernels(xp, foreach=foreach)
    if compat.is_jax_namespace(xp):
        from .backends._jax_kernels import JaxKernels

        return JaxKernels(xp, foreach=foreach)
    return Kernels(xp, foreach=foreach)


def flatten_arrays(tree: Any) -> tuple[FlatTree, Kernels | None]:
    """Flatten ``tree``, validate its leaves and pick their kernels (``None`` for an
    empty tree)."""
    flat = flatten(tree)
    xp = leaf_namespace(flat.leaves, flat.paths)
    return flat, (kernels_for(xp) if xp is not None else None)
