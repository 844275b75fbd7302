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

# Sizes straddle the block sizes (rows, tails, the small/large split, whole rows).
SIZES = [0, 1, 7, BLOCK - 1, BLOCK, 3 * BLOCK + 5, 5 * BLOCK, 5 * BLOCK + 1, (1 << 16) + 3]


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
    want = _f64(generic.sum_of_powers(theirs, p, acc))
    assert math.isclose(_f64(fast.sum_of_powers(ours, p, acc)), want, rel_tol=1e-6)
    scale = xp.asarray(0.25, dtype=acc)
    want_scaled = _f64(generic.sum_of_powers(theirs, p, acc, scale=scale))
    got_scaled = _f64(fast.sum_of_powers(ours, p, acc, scale=scale))
    assert math.isclose(got_scaled, want_scaled, rel_tol=1e-6)


@pytest.mark.parametrize("shape", [(5, BLOCK), (BLOCK + 3, 7)])
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
    value = xp.asarray(2.0, dtype=acc)
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


def test_numpy_scale_writes_nothing_when_factor_is_one() -> None:
    leaf = np.ones(4, dtype=np.float32)
    leaf.flags.writeable = False  # any write would raise
    kernels = kernels_for(array_api_compat.numpy)
    kernels.scale_(kernels.prepare([leaf]), np.asarray(1.0))


def test_torch_grouping_matches_the_python_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    torch = pytest.importorskip("torch")
    from agclip.backends import _torch_kernels

    tensors = [torch.ones(2, dtype=d) for d in (torch.float32, torch.float16, torch.float32)]
    tensors.append(torch.ones(3, device="meta"))
    fast = _torch_kernels._group(tensors)
    monkeypatch.setattr(_torch_kernels, "_torch_grouping", None)
    slow = _torch_kernels._group(tensors)

    def as_ids(groups: list[list[Any]]) -> list[list[int]]:
        return sorted([id(t) for t in g] for g in groups)

    assert as_ids(fast) == as_ids(slow)
    assert len(slow) == 3


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
    fast, generic = kernels_for(xp, foreach=foreach), Kernels(xp)
    ours, theirs = _leaves(make, dtype), _leaves(make, dtype)
    fast.clip_values_(fast.prepare(ours), 0.5)
    want = generic.clip_values(generic.prepare(theirs), 0.5)
    for a, b in zip(ours, want, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _torch_kernels_counting_bmm(monkeypatch: pytest.MonkeyPatch) -> tuple[Any, list[int]]:
    """The torch kernels, with ``torch.bmm`` calls counted (the CPU Gram path's op)."""
    torch = pytest.importorskip("torch")
    from array_api_compat import torch as compat_torch

    calls = [0]
    bmm = torch.bmm

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return bmm(*args, **kwargs)

    monkeypatch.setattr(torch, "bmm", counted)
    return kernels_for(compat_torch), calls


def _gram_leaves() -> list[Any]:
    """float32 tensors on both sides of the Gram path's limits: under GRAM_MIN (row
    norms), whole row pairs, a tail, a non-contiguous one; values over 12 decades."""
    import torch

    from agclip.backends._torch_kernels import GRAM_MIN

    rng = np.random.default_rng(3)
    sizes = [GRAM_MIN - 1, GRAM_MIN, GRAM_MIN + 5, 3 * GRAM_MIN + 4097]
    leaves = [rng.standard_normal(n) * np.exp(rng.normal(0, 3, n)) for n in sizes]
    tensors = [torch.from_numpy(v).float() for v in leaves]
    tensors.append(torch.from_numpy(rng.standard_normal((513, 1021))).float().t())
    return [*tensors, torch.ones(7)]


def _assert_exact_sum_of_squares(k: Kernels) -> None:
    """The kernels' float32 sum of squares of the Gram leaves equals float64's."""
    import torch

    leaves = _gram_leaves()
    got = _f64(k.sum_of_powers(k.prepare(leaves), 2.0, torch.float64))
    assert math.isclose(got, reference_norm(leaves, 2.0) ** 2, rel_tol=1e-6)


def test_torch_cpu_gram_path_matches_float64(monkeypatch: pytest.MonkeyPatch) -> None:
    k, calls = _torch_kernels_counting_bmm(monkeypatch)
    _assert_exact_sum_of_squares(k)
    assert calls[0] == 4, "the four tensors of GRAM_MIN elements or more take the Gram path"


@pytest.mark.parametrize(
    "reduced",
    [
        pytest.param(("legacy", "medium"), id="set_float32_matmul_precision-medium"),
        pytest.param(("legacy", "high"), id="set_float32_matmul_precision-high"),
        pytest.param(("mkldnn.matmul", "bf16"), id="mkldnn.matmul.fp32_precision-bf16"),
        pytest.param(("root", "tf32"), id="backends.fp32_precision-tf32"),
    ],
)
def test_torch_cpu_gram_path_is_off_when_matmuls_may_round(
    monkeypatch: pytest.MonkeyPatch, reduced: tuple[str, str]
) -> None:
    """A user who lets float32 matmuls run in bf16 or tf32 still gets an exact norm."""
    k, calls = _torch_kernels_counting_bmm(monkeypatch)
    import torch

    where, value = reduced
    root: Any = torch.backends  # the fp32_precision settings are not in torch's stubs
    matmul = root.mkldnn.matmul
    saved = [(owner, owner.fp32_precision) for owner in (root, matmul)]
    legacy = torch.get_float32_matmul_precision()
    try:
        if where == "legacy":
            torch.set_float32_matmul_precision(value)
        elif where == "root":
            matmul.fp32_precision = "none"  # inherit from the root, as in a fresh process
            root.fp32_precision = value
        else:
            matmul.fp32_precision = value
        _assert_exact_sum_of_squares(k)
    finally:
        torch.set_float32_matmul_precision(legacy)
        for owner, before in saved:
            owner.fp32_precision = before
    assert calls[0] == 0
    assert torch.get_float32_matmul_precision() == legacy, "the test restored the setting"


def test_torch_cpu_gram_path_needs_mkl(monkeypatch: pytest.MonkeyPatch) -> None:
    """Builds without MKL (its speed measured nowhere else) keep the row norm."""
    k, calls = _torch_kernels_counting_bmm(monkeypatch)
    import torch

    monkeypatch.setattr(torch.backends.mkl, "is_available", lambda: False)
    _assert_exact_sum_of_squares(k)
    assert calls[0] == 0


def test_torch_host_scalar_is_only_for_plain_cpu_float64() -> None:
    """The pipeline does its 0-d arithmetic in Python floats only where that is
    exact and invisible: float64, on the CPU, outside autograd."""
    torch = pytest.importorskip("torch")
    from array_api_compat import torch as compat_torch

    k = kernels_for(compat_torch)
    assert k.host_scalar(torch.tensor(2.5, dtype=torch.float64)) == 2.5
    for other in (
        torch.tensor(2.5),  # float32: its arithmetic would round differently
        torch.tensor(2.5, dtype=torch.float64, requires_grad=True),
        torch.tensor([2.5], dtype=torch.float64),
        torch.empty((), dtype=torch.float64, device="meta"),
    ):
        assert k.host_scalar(other) is None, other


def test_torch_host_path_equals_array_path() -> None:
    """Root, range check and clip coefficient computed as Python floats give the
    array path's values bit for bit (p=1, 2) or to the last digits (other p)."""
    torch = pytest.importorskip("torch")
    from array_api_compat import torch as compat_torch

    from agclip._pipeline import clip_coefficient, total_norm

    fast = kernels_for(compat_torch)

    class ArraysOnly(type(fast)):  # type: ignore[misc]
        def host_scalar(self, x: Any) -> float | None:
            return None

    arrays = ArraysOnly(compat_torch)
    rng = np.random.default_rng(7)
    leaf_sets = [
        [torch.from_numpy(rng.standard_normal(n)).float() for n in (3, 70_000, 300_000)],
        [torch.zeros(10), torch.zeros(3, 3)],
        [torch.full((5,), 1e-30)],  # under the range: the guard recomputes
        [torch.full((10,), 1e20)],  # squares overflow float32: the guard recomputes
    ]
    for leaves in leaf_sets:
        for p in (1.0, 2.0, 3.0):
            want = float(total_norm(arrays, arrays.prepare(leaves), p))
            got = float(total_norm(fast, fast.prepare(leaves), p))
            assert math.isclose(got, want, rel_tol=0 if p in (1.0, 2.0) else 1e-15), (p, got, want)
    for norm in (0.0, 1e-300, 0.5, 1.0, 3.0, 1e300, math.inf, math.nan):
        for max_norm in (0.0, 1.0, 1e300):
            for eps in (0.0, 1e-6):
                value = torch.tensor(norm, dtype=torch.float64)
                want = float(clip_coefficient(arrays, value, max_norm, eps))
                got = float(clip_coefficient(fast, value, max_norm, eps))
                assert got == want or (math.isnan(got) and math.isnan(want)), (norm, max_norm, eps)


def test_torch_tensors_that_require_grad_keep_the_array_path() -> None:
    """Tensors that require grad keep the array path, whose root has a finite
    derivative at 0."""
    torch = pytest.importorskip("torch")
    import agclip

    zeros = torch.zeros(5, dtype=torch.float64, requires_grad=True)
    agclip.global_norm([zeros]).backward()
    assert zeros.grad is not None
    assert torch.equal(zeros.grad, torch.zeros(5, dtype=torch.float64))
    values = torch.tensor([3.0, 4.0], dtype=torch.float64, requires_grad=True)
    agclip.global_norm([values]).backward()
    assert values.grad is not None
    assert torch.allclose(values.grad, torch.tensor([0.6, 0.8], dtype=torch.float64))
