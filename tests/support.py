"""Test support: the backends every test body runs on, assertion helpers that
check library, dtype, shape and device on both sides (after SciPy's
xp_assert_close), the float64 reference norm and the array makers."""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import array_api_compat as compat
import numpy as np

ALL = ("numpy", "array_api_strict", "torch", "torch_cuda", "jax", "jax_jit")


@dataclass
class Backend:
    name: str
    library: str  # the importable module
    jit: bool = False
    device: Any = None
    skip_reason: str | None = None
    _xp: Any = field(default=None, repr=False)

    def __str__(self) -> str:
        return self.name

    # -- making arrays ----------------------------------------------------
    @property
    def xp(self) -> Any:
        if self._xp is None:
            self._xp = compat.array_namespace(self.asarray(np.zeros(1)))
        return self._xp

    def has_dtype(self, dtype: str) -> bool:
        if dtype == "bfloat16":
            return self.library not in ("numpy", "array_api_strict")
        if dtype == "float16":
            return self.library != "array_api_strict"  # the standard has no float16
        if dtype == "float64" and self.library == "jax":
            import jax

            return bool(jax.config.read("jax_enable_x64"))
        return True

    def require(self, *dtypes: str) -> None:
        """Skip the test, with the reason, when this backend lacks a dtype."""
        import pytest

        for dtype in dtypes:
            if not self.has_dtype(dtype):
                pytest.skip(f"{self.name} has no {dtype} (here)")

    def asarray(self, values: Any, dtype: str = "float32") -> Any:
        values = np.asarray(values, dtype=np.float64)
        if self.library == "numpy":
            return values.astype(dtype)
        if self.library == "array_api_strict":
            import array_api_strict as xs

            return xs.asarray(values.astype(dtype), dtype=getattr(xs, dtype))
        if self.library == "torch":
            import torch

            tensor = torch.from_numpy(values).to(getattr(torch, dtype))
            return tensor.to(self.device) if self.device else tensor
        import jax.numpy as jnp

        return jnp.asarray(values, dtype=getattr(jnp, dtype))

    def to_numpy(self, x: Any) -> np.ndarray:
        """float64 NumPy copy of an array of this backend."""
        if self.library == "torch":
            import torch

            x = x.detach().cpu()
            return np.asarray((x.to(torch.float64) if x.dtype.is_floating_point else x).numpy())
        if self.library == "array_api_strict":
            return np.from_dlpack(x).astype(np.float64) if _is_float(x) else np.from_dlpack(x)
        array = np.asarray(x.astype("float32") if str(x.dtype) == "bfloat16" else x)
        return array.astype(np.float64) if np.issubdtype(array.dtype, np.floating) else array

    # -- running ----------------------------------------------------------
    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)``, compiled with ``jax.jit`` on the jax_jit backend
        (arrays traced, keyword options static)."""
        if not self.jit:
            return fn(*args, **kwargs)
        import jax

        return jax.jit(lambda *a: fn(*a, **kwargs))(*args)


def _is_float(x: Any) -> bool:
    return "float" in str(x.dtype)


def _missing(module: str) -> str | None:
    if importlib.util.find_spec(module) is None:
        return f"{module} is not installed"
    return None


def make_backends() -> dict[str, Backend]:
    cuda_reason = _missing("torch")
    if cuda_reason is None:
        import torch

        if not torch.cuda.is_available():
            cuda_reason = "no CUDA device visible to torch"
    return {
        "numpy": Backend("numpy", "numpy"),
        "array_api_strict": Backend(
            "array_api_strict", "array_api_strict", skip_reason=_missing("array_api_strict")
        ),
        "torch": Backend("torch", "torch", device="cpu", skip_reason=_missing("torch")),
        "torch_cuda": Backend("torch_cuda", "torch", device="cuda", skip_reason=cuda_reason),
        "jax": Backend("jax", "jax", skip_reason=_missing("jax")),
        "jax_jit": Backend("jax_jit", "jax", jit=True, skip_reason=_missing("jax")),
    }


# -- assertions ---------------------------------------------------------------
def assert_array(actual: Any, backend: Backend, *, dtype: str, shape: tuple[int, ...]) -> None:
    """``actual`` is an array of the backend's library and device, with this dtype and shape."""
    xp = compat.array_namespace(actual)
    assert xp is backend.xp, f"library: got {xp.__name__}, expected {backend.xp.__name__}"
    assert str(actual.dtype).rsplit(".", 1)[-1] == dtype, f"dtype: got {actual.dtype}, want {dtype}"
    assert tuple(actual.shape) == shape, f"shape: got {actual.shape}, want {shape}"
    if backend.device is not None:
        assert compat.device(actual).type == backend.device, f"device: {compat.device(actual)}"


def assert_close(
    actual: Any,
    desired: Any,
    backend: Backend,
    *,
    dtype: str,
    rtol: float = 1e-6,
    atol: float = 0.0,
) -> None:
    """Check library, dtype, shape and device of ``actual``, then its values against
    ``desired`` (NumPy, compared in float64)."""
    desired = np.asarray(desired, dtype=np.float64)
    assert_array(actual, backend, dtype=dtype, shape=desired.shape)
    np.testing.assert_allclose(backend.to_numpy(actual), desired, rtol=rtol, atol=atol)


# -- references and makers ------------------------------------------------------
def reference_norm(arrays: Any, p: float) -> float:
    """The float64 p-norm of all arrays together (NumPy)."""
    flat = np.concatenate([np.asarray(a, np.float64).ravel() for a in arrays] or [np.zeros(0)])
    if math.isinf(p):
        return float(np.max(np.abs(flat), initial=0.0))
    return float(np.sum(np.abs(flat) ** p) ** (1 / p))


def sample(shape: int | tuple[int, ...], seed: int, scale: float = 1.0) -> np.ndarray:
    """Standard normal float64 values times ``scale``, reproducible by ``seed``."""
    return np.random.default_rng(seed).standard_normal(shape) * scale


def grad_of(tensor: Any) -> Any:
    """``tensor.grad``, which must exist (PyTorch tests)."""
    assert tensor.grad is not None, "expected a gradient"
    return tensor.grad
