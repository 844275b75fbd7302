"""Every backend kernel override agrees with the generic array-API kernels."""

from __future__ import annotations

import math
from typing import Any

import array_api_compat.numpy
import numpy as np
import pytest
from support import reference_norm

from agclip._dispatch import kernels_for
from agclip._kernels import BLOCK, Kernels
from agclip._pipeline import apply_factor

# Sizes straddle the block sizes (rows, tails, the small/large split, whole rows).
SIZES = [0, 1, 7, BLOCK - 1, BLOCK, 5 * BLOCK + 1, 16 * BLOCK, 16 * BLOCK + 1, 20 * BLOCK + 3]


def _leaves(make: Any, dtype: str) -> Any:
    rng = np.random.default_rng(0)
    return [make(rng.standard_normal(n) * (i + 1), dtype) for i, n in enumerate(SIZES)]


def _lib_cases() -> Any:
    cases = [pytest.param("numpy", id="numpy")]
    for lib in ("torch", "jax"):
        cases.append(
            pytest.param(
                lib,
                id=lib,
                marks=pytest.mark.skipif(
                    __import__("importlib").util.find_spec(lib) is None,
                    reason=f"{lib} not installed",
                ),
            )
        )
    return cases


def _maker(lib: str) -> Any:
    if lib == "numpy":
        return array_api_compat.numpy, lambda v, d: v.astype(d)
    if lib == "torch":
        import torch
        from array_api_compat import torch as compat_torch

        return compat_torch, lambda v, d: torch.from_numpy(v).to(getattr(torch, d))
    import jax.numpy as jnp

    return jnp, lambda v, d: jnp.asarray(v, dtype=getattr(jnp, d))


def _f64(x: Any) -> Any:
    return float(np.asarray(x.cpu() if hasattr(x, "cpu") else x, dtype=np.float64))


@pytest.mark.parametrize("lib", _lib_cases())
@pytest.mark.parametrize("p", [2.0, 1.0, 3.0])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_sum_of_powers_override_matches_generic(lib: str, p: float, dtype: str) -> None:
    xp, make = _maker(lib)
    fast, generic = kernels_for(xp), Kernels(xp)
    assert type(fast) is not Kernels, "this library should have an override"
    leaves = _leaves(make, dtype)
    ours, theirs = fast.prepare(leaves), generic.prepare(leaves)
    acc = fast.accumulator(ours)
    # Tensors up to 65,536 values are summed in one float32 pass (torch's CPU norm):
    # within ~1e-6 of float64's, a little more for p = 3.
    want = _f64(generic.sum_of_powers(theirs, p, acc))
    assert math.isclose(_f64(fast.sum_of_powers(ours, p, acc)), want, rel_tol=2e-6)
    divisor = xp.asarray(4.0, dtype=acc)
    want_scaled = _f64(generic.sum_of_powers(theirs, p, acc, divisor=divisor))
    got_scaled = _f64(fast.sum_of_powers(ours, p, acc, divisor=divisor))
    assert math.isclose(got_scaled, want_scaled, rel_tol=2e-6)


@pytest.mark.parametrize("shape", [(5, 20 * BLOCK), (20 * BLOCK + 3, 7)])
def test_torch_sum_of_powers_of_non_contiguous_tensors(shape: tuple[int, int]) -> None:
    """Transposed and strided gradients reach the CPU row kernel (as a copy of their rows)."""
    torch = pytest.importorskip("torch")
    from array_api_compat import torch as compat_torch

    base = torch.from_numpy(np.random.default_rng(1).standard_normal(shape)).float()
    leaves = [base.t(), base[:, ::2]]
    assert not any(leaf.is_contiguous() for leaf in leaves)
    k = kernels_for(compat_torch)
    got = _f64(k.sum_of_powers(k.prepare(leaves), 2.0, torch.float64))
    assert math.isclose(got, reference_norm(leaves, 2.0) ** 2, rel_tol=1e-6)


@pytest.mark.parametrize("lib", _lib_cases())
def test_max_abs_and_guard_overrides_match_generic(lib: str) -> None:
    xp, make = _maker(lib)
    fast, generic = kernels_for(xp), Kernels(xp)
    leaves = _leaves(make, "float32")
    ours, theirs = fast.prepare(leaves), generic.prepare(leaves)
    acc = fast.accumulator(ours)
    assert _f64(fast.max_abs(ours, acc)) == _f64(generic.max_abs(theirs, acc))
    value = lambda: xp.asarray(2.0, dtype=acc)  # noqa: E731
    fallback = lambda: xp.asarray(7.0, dtype=acc)  # noqa: E731
    for keep in (xp.asarray(True), xp.asarray(False)):
        assert _f64(fast.select(keep, value, fallback)) == _f64(
            generic.select(keep, value, fallback)
        )


@pytest.mark.parametrize("lib", ["numpy", "torch"])
@pytest.mark.parametrize("dtype", ["float32", "float16", "float64"])
@pytest.mark.parametrize("factor", [0.37, 1.0])
def test_in_place_scale_override_matches_generic(lib: str, dtype: str, factor: float) -> None:
    pytest.importorskip(lib)
    xp, make = _maker(lib)
    fast, generic = kernels_for(xp), Kernels(xp)
    ours, theirs = _leaves(make, dtype), _leaves(make, dtype)
    fast.scale_(fast.prepare(ours), xp.asarray(factor, dtype=xp.float64))
    generic.scale_(generic.prepare(theirs), xp.asarray(factor, dtype=xp.float64))
    for a, b in zip(ours, theirs, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("foreach", [None, False])
def test_torch_scales_by_a_factor_below_float32s_range_without_losing_it(foreach: Any) -> None:
    """The clip of a norm beyond float32's range: the factor, rounded to float32, would
    lose its digits (3e-41) or become 0 (3e-49); the values it gives are in range."""
    torch = pytest.importorskip("torch")
    k = kernels_for(torch, foreach=foreach)
    for factor in (3e-41, 3e-49):
        leaves = [torch.tensor([3.0e38, -1.5e38, 7.0e30, 0.0])]
        expected = (leaves[0].double() * factor).float()
        k.scale_(k.prepare(leaves), torch.tensor(factor, dtype=torch.float64))
        torch.testing.assert_close(leaves[0], expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("lib", [case for case in _lib_cases() if case.id != "jax"])
def test_nothing_is_written_when_the_factor_is_one(lib: str) -> None:
    xp, make = _maker(lib)
    k = kernels_for(xp)
    leaf = make(np.ones(4), "float32")
    if lib == "numpy":
        leaf.flags.writeable = False  # any write would raise
    version = getattr(leaf, "_version", None)  # torch counts in-place writes
    apply_factor(k, k.prepare([leaf]), xp.asarray(1.0, dtype=xp.float64), in_place=True)
    assert getattr(leaf, "_version", None) == version


@pytest.mark.parametrize("p", [1.0, 2.0, 3.0, 40.0, math.inf])
def test_torch_off_cpu_guard_check_matches_the_generic_one(p: float) -> None:
    torch = pytest.importorskip("torch")
    from agclip._kernels import Kernels

    dtypes = (torch.float16, torch.float32, torch.float16, torch.float64)
    tensors = [torch.empty(5, 7, dtype=d, device="meta") for d in dtypes]
    torch_kernels = kernels_for(array_api_compat.array_namespace(torch.ones(1)))
    for leaves in (tensors, tensors[:3], tensors[1:2]):
        batch = torch_kernels.prepare(leaves)
        generic = Kernels.needs_guard(torch_kernels, batch, p, torch.float64)
        assert torch_kernels.needs_guard(batch, p, torch.float64) == generic


@pytest.mark.parametrize("lib", ["numpy", "torch"])
@pytest.mark.parametrize("dtype", ["float32", "float16", "float64"])
@pytest.mark.parametrize("foreach", [None, False])
def test_in_place_value_clip_override_matches_generic(
    lib: str, dtype: str, foreach: bool | None
) -> None:
    pytest.importorskip(lib)
    xp, make = _maker(lib)
    fast: Any = kernels_for(xp, foreach=foreach)  # NumPy's or PyTorch's: both write in place
    generic = Kernels(xp)
    ours, theirs = _leaves(make, dtype), _leaves(make, dtype)
    fast.clip_values_(fast.prepare(ours), 0.5)
    want = generic.clip_values(generic.prepare(theirs), 0.5)
    for a, b in zip(ours, want, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_torch_cpu_norm_is_accurate_on_large_and_strided_tensors() -> None:
    """Rows of BLOCK reduced in float32, combined in float64: float64's answer to 1e-6
    on heavy-tailed values, tails and a non-contiguous tensor included."""
    torch = pytest.importorskip("torch")
    from array_api_compat import torch as compat_torch

    rng = np.random.default_rng(3)
    sizes = [4 * BLOCK + 1, 70 * BLOCK + 17, 1 << 20]
    leaves = [rng.standard_normal(n) * np.exp(rng.normal(0, 3, n)) for n in sizes]
    tensors = [torch.from_numpy(v).float() for v in leaves]
    tensors.append(torch.from_numpy(rng.standard_normal((513, 1021))).float().t())
    k = kernels_for(compat_torch)
    for p, tolerance in ((2.0, 1e-6), (1.0, 1e-5), (3.0, 1e-5)):  # the contract is for L2
        got = _f64(k.sum_of_powers(k.prepare(tensors), p, torch.float64))
        want = reference_norm([t.double().numpy() for t in tensors], p) ** p
        assert math.isclose(got, want, rel_tol=tolerance), p
