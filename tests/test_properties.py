"""Property-based tests against a float64 NumPy reference, on every backend."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import Backend, assert_close, reference_norm

import agclip

pytestmark = pytest.mark.slow  # hypothesis / large arrays: seconds per test

SETTINGS = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

# Gradient lists of 1-4 float32 arrays spanning magnitudes 1e-12 .. 1e15 (and
# zeros). Smaller values have p-th powers that underflow float32 accumulators:
# a norm below ~1e-19 reads as 0 (documented; it never changes a clip).
magnitudes = st.integers(min_value=-8, max_value=15).map(lambda k: 10.0**k)
arrays = st.lists(st.floats(-1.0, 1.0, allow_nan=False, width=32), min_size=1, max_size=40).map(
    lambda xs: np.asarray([x if abs(x) >= 1e-4 else 0.0 for x in xs], dtype=np.float32)
)
grad_lists = st.tuples(st.lists(arrays, min_size=1, max_size=4), magnitudes).map(
    lambda t: [(a * np.float32(t[1])).astype(np.float32) for a in t[0]]
)
# Zero, or 1e-8 .. 1e6: a smaller max_norm against a 1e15 norm makes the
# coefficient a float32 subnormal (< 1.2e-38), which has too few bits for 2e-6.
max_norms = st.just(0.0) | st.floats(1e-8, 1e6)
ords = st.sampled_from([2, 1, math.inf, 3])


@SETTINGS
@given(grads=grad_lists, p=ords)
def test_norm_matches_reference(backend: Backend, grads: Any, p: float) -> None:
    norm = backend.call(agclip.global_norm, [backend.asarray(g) for g in grads], ord=p)
    assert_close(norm, reference_norm(grads, p), backend, dtype="float32", rtol=2e-6)


@SETTINGS
@given(grads=grad_lists, max_norm=max_norms, p=ords)
def test_clipping_is_bounded_and_keeps_direction(
    backend: Backend, grads: Any, max_norm: float, p: float
) -> None:
    tree = [backend.asarray(g) for g in grads]
    clipped, _ = backend.call(agclip.clip_by_global_norm, tree, max_norm=max_norm, ord=p)
    out = [backend.to_numpy(c) for c in clipped]
    # bounded
    assert reference_norm(out, p) <= max_norm * (1 + 1e-6) + 1e-30
    # direction kept: one common non-negative factor, the reference coefficient
    coef = min(1.0, max_norm / (reference_norm(grads, p) + 1e-6))
    for got, g in zip(out, grads, strict=True):
        np.testing.assert_allclose(got, g.astype(np.float64) * coef, rtol=2e-6, atol=1e-37)


@SETTINGS
@given(grads=grad_lists, max_norm=max_norms.filter(lambda m: m > 0), p=ords)
def test_clipping_twice_equals_clipping_once(
    backend: Backend, grads: Any, max_norm: float, p: float
) -> None:
    # With eps > 0 a second clip shrinks by another eps/max_norm (torch's rule
    # too), so idempotence is a property of eps=0.
    once, _ = backend.call(
        agclip.clip_by_global_norm,
        [backend.asarray(g) for g in grads],
        max_norm=max_norm,
        ord=p,
        eps=0.0,
    )
    twice, _ = backend.call(agclip.clip_by_global_norm, once, max_norm=max_norm, ord=p, eps=0.0)
    for a, b in zip(twice, once, strict=True):
        np.testing.assert_allclose(backend.to_numpy(a), backend.to_numpy(b), rtol=2e-6, atol=1e-37)


@SETTINGS
@given(grads=grad_lists, p=ords, slack=st.floats(1.001, 100.0))
def test_below_threshold_nothing_changes(
    backend: Backend, grads: Any, p: float, slack: float
) -> None:
    max_norm = reference_norm(grads, p) * slack + 1e-3
    clipped, _ = backend.call(
        agclip.clip_by_global_norm, [backend.asarray(g) for g in grads], max_norm=max_norm, ord=p
    )
    for got, g in zip(clipped, grads, strict=True):
        np.testing.assert_array_equal(backend.to_numpy(got), g.astype(np.float64))
