"""agclip.backends.numpy: in place on lists of ndarrays."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

import agclip
from agclip.backends.numpy import clip_by_global_norm_, clip_by_value_


def grads(seed: int = 0, dtype: type[np.floating[Any]] = np.float32) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(dtype) for s in [(64, 32), (32,), (5, 5, 5)]]


@pytest.mark.parametrize("ord", [2, 1, math.inf, 3])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_in_place_matches_functional_core(ord: float, dtype: type[np.floating[Any]]) -> None:
    arrays = grads(dtype=dtype)
    want, want_norm = agclip.clip_by_global_norm(arrays, 2.0, ord=ord)
    ids = [id(a) for a in arrays]
    norm = clip_by_global_norm_([*arrays, None], 2.0, ord=ord)
    assert isinstance(norm, float)
    assert math.isclose(norm, float(want_norm), rel_tol=1e-6)
    assert [id(a) for a in arrays] == ids
    for got, w in zip(arrays, want, strict=True):
        assert got.dtype == dtype
        np.testing.assert_allclose(got, w, rtol=1e-3 if dtype == np.float16 else 1e-6)


def test_nothing_is_written_when_no_clipping_is_needed() -> None:
    arrays = grads()
    for a in arrays:
        a.flags.writeable = False
    with pytest.raises(ValueError, match=r"arrays\[0\] is read-only"):
        clip_by_global_norm_(arrays, 1.0)  # would need to write
    for a in arrays:
        a.flags.writeable = True
    before = [a.copy() for a in arrays]
    big = float(agclip.global_norm(arrays)) * 2
    clip_by_global_norm_(arrays, big)
    for a, b in zip(arrays, before, strict=True):
        np.testing.assert_array_equal(a, b)


def test_huge_finite_values_are_clipped_not_zeroed() -> None:
    arrays = [np.full(10, 1e20, dtype=np.float32)]
    norm = clip_by_global_norm_(arrays, 1.0)
    assert math.isclose(norm, math.sqrt(10) * 1e20, rel_tol=1e-6)
    np.testing.assert_allclose(arrays[0], np.full(10, 1 / math.sqrt(10)), rtol=1e-6)


def test_clip_by_value_in_place() -> None:
    arrays = [np.array([-5.0, 0.5, 5.0], dtype=np.float32), None]
    clip_by_value_(arrays, 1.0)
    np.testing.assert_array_equal(arrays[0], [-1.0, 0.5, 1.0])


@pytest.mark.parametrize(
    ("arrays", "kwargs", "error", "match"),
    [
        (lambda: [np.ones(3, np.float32)], {"max_norm": -1.0}, ValueError, "max_norm"),
        (lambda: [np.ones(3, np.float32)], {"max_norm": math.nan}, ValueError, "max_norm"),
        (lambda: [np.ones(3, np.float32)], {"max_norm": 1.0, "ord": 0}, ValueError, "ord"),
        (
            lambda: [np.ones(3, np.float32), np.ones(2, int)],
            {"max_norm": 1.0},
            TypeError,
            r"arrays\[1\] has dtype int",
        ),
        (
            lambda: [np.ones(3, np.float32), [1.0]],
            {"max_norm": 1.0},
            TypeError,
            r"arrays\[1\] is a list",
        ),
    ],
)
def test_bad_input_raises_before_anything_is_modified(
    arrays: Any, kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    arrays = arrays()
    first = arrays[0].copy() * 100
    arrays[0][...] = first
    with pytest.raises(error, match=match):
        clip_by_global_norm_(arrays, **kwargs)
    np.testing.assert_array_equal(arrays[0], first)


def test_clip_by_value_rejects_bad_clip_value_untouched() -> None:
    arrays = [np.array([5.0])]
    with pytest.raises(ValueError, match="clip_value"):
        clip_by_value_(arrays, -1.0)
    assert arrays[0][0] == 5.0


@pytest.mark.parametrize("bad", [np.array(-1.0), np.float32(np.nan), np.array(-np.inf)])
def test_bad_0d_thresholds_raise_before_any_change(bad: Any) -> None:
    arrays = [np.full(3, 4.0, np.float32), np.full(2, 3.0)]
    with pytest.raises(ValueError, match="max_norm"):
        clip_by_global_norm_(arrays, bad)
    with pytest.raises(ValueError, match="clip_value"):
        clip_by_value_(arrays, bad)
    assert arrays[0].tolist() == [4.0] * 3
    assert arrays[1].tolist() == [3.0] * 2


def test_0d_thresholds_and_float16_beyond_range() -> None:
    arrays: list[np.ndarray] = [np.full(2, 2e5, np.float32), np.array([np.inf, -3.0], np.float16)]
    clip_by_value_(arrays, np.array(1e5))
    assert arrays[0].tolist() == [1e5, 1e5]
    assert arrays[1].tolist() == [65504.0, -3.0]
    assert clip_by_global_norm_([np.array([3.0, 4.0])], np.array(1.0)) == 5.0


def test_an_array_given_twice_counts_and_scales_once() -> None:
    """Tied weights listed twice, or the same view twice: each buffer once."""
    tied = np.array([3.0, 4.0], np.float32)
    assert clip_by_global_norm_([tied, tied, tied[:]], 1.0) == pytest.approx(5.0)
    np.testing.assert_allclose(tied, [0.6, 0.8], rtol=1e-6)


def test_overlapping_arrays_are_refused_before_any_write() -> None:
    buffer = np.arange(1.0, 9.0, dtype=np.float32)
    before = buffer.copy()
    with pytest.raises(ValueError, match=r"arrays\[0\] and arrays\[1\] overlap in memory"):
        clip_by_global_norm_([buffer[:5], buffer[3:]], 1.0)
    np.testing.assert_array_equal(buffer, before)
    evens, odds = buffer[::2], buffer[1::2]  # interleaved: their bounds cross, no element does
    norm = clip_by_global_norm_([evens, odds], 1.0)
    assert norm == pytest.approx(float(np.linalg.norm(before)), rel=1e-6)
    assert float(np.linalg.norm(buffer)) == pytest.approx(1.0, rel=1e-5)


@pytest.mark.parametrize("clip", [clip_by_global_norm_, clip_by_value_])
def test_masked_arrays_are_refused(clip: Any) -> None:
    """A masked-out 1e30 would enter the norm and the visible data be scaled to 3e-30."""
    masked = np.ma.masked_array([1.0, 1e30], mask=[False, True])
    with pytest.raises(TypeError, match="masked array"):
        clip([masked], 1.0)
    with pytest.raises(TypeError, match=r"leaf \[0\] is a masked array"):
        agclip.global_norm([masked])
