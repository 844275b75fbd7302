"""The many-leaves JAX benchmark measures what it says, at toy size."""

from __future__ import annotations

import math

import pytest

pytest.importorskip("optax")

import bench_jax_compile as bench  # benchmarks/ is on the pytest pythonpath


@pytest.mark.slow
@pytest.mark.parametrize("which", ["agclip", "optax"])
def test_a_measurement_has_its_fields(which: str) -> None:
    result = bench.measure(20, which)
    assert set(result) == {"seconds", "megabytes", "error", "naive"}
    assert all(math.isfinite(value) and value >= 0 for value in result.values())
    assert result["seconds"] > 0
    assert result["error"] < 1e-6
