"""agclip: framework-agnostic gradient clipping over the Python array API.

The math is written once, as pure functions over array-API arrays in any
pytree; adapters in ``agclip.backends`` give PyTorch, JAX/optax and NumPy
users the interface their ecosystem expects. ``import agclip`` imports no
framework.
"""

from ._adaptive import adaptive_grad_clip
from ._clip import clip_by_global_norm, clip_by_norm, clip_by_value, global_norm
from ._finite import all_finite, nonfinite_paths, zero_nonfinite
from ._rule_api import adagc, adagc_init, autoclip, autoclip_init, zclip, zclip_init
from ._rules import AdaGCState, AutoClipState, ZClipState
from ._typing import Array, ArrayTree, Scalar

__version__ = "0.1.0"

__all__ = [
    "AdaGCState",
    "Array",
    "ArrayTree",
    "AutoClipState",
    "Scalar",
    "ZClipState",
    "__version__",
    "adagc",
    "adagc_init",
    "adaptive_grad_clip",
    "all_finite",
    "autoclip",
    "autoclip_init",
    "clip_by_global_norm",
    "clip_by_norm",
    "clip_by_value",
    "global_norm",
    "nonfinite_paths",
    "zclip",
    "zclip_init",
    "zero_nonfinite",
]
