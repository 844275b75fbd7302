"""agclip: framework-agnostic gradient clipping over the Python array API.

The math is written once, as pure functions over array-API arrays in any
pytree; adapters in ``agclip.backends`` give PyTorch, JAX/optax and NumPy
users the interface their ecosystem expects. ``import agclip`` imports no
framework.
"""

from ._adagc import ADAGC, AdaGCState
from ._agc import adaptive_grad_clip
from ._autoclip import AUTOCLIP, AutoClipState
from ._clip import clip_by_global_norm, clip_by_norm, clip_by_value, global_norm
from ._finite import all_finite, nonfinite_paths, zero_nonfinite
from ._rule_front import functional_front
from ._typing import Array, ArrayTree, Scalar
from ._zclip import ZCLIP, ZClipState

__version__ = "0.2.0"

zclip_init, zclip = functional_front(ZCLIP)
autoclip_init, autoclip = functional_front(AUTOCLIP)
adagc_init, adagc = functional_front(ADAGC)

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
