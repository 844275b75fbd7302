"""The functional core on every backend: values, dtypes, trees, edge cases."""

from __future__ import annotations

import collections
import math
from typing import Any

import numpy as np
import pytest
from support import Backend, assert_array, assert_close, reference_norm, sample

import agclip

ORDS = [2, 1, math.inf, 3, 0.5]


@pytest.mark.parametrize("ord", ORDS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_global_norm_matches_float64_reference(backend: Backend, ord: float, dtype: str) -> None:
    backend.require(dtype)
    values = [sample((3, 4), 0), sample(7, 1), sample((2, 2, 2), 2)]
    tree = {
        "w": [backend.asarray(values[0], dtype), None],
        "b": backend.asarray(values[1], dtype),
        "c": (backend.asarray(values[2], dtype),),
    }
    cast = [np.asarray(v, dtype) for v in values]
    norm = backend.call(agclip.global_norm, tree, ord=ord)
    assert_close(norm, reference_norm(cast, ord), backend, dtype=dtype, rtol=2e-6)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_low_precision_norm_is_float32_and_never_squares_in_16_bits(
    backend: Backend, dtype: str
) -> None:
    backend.require(dtype)
    grads = [backend.asarray(np.full(100_000, 300.0), dtype)]
    norm = backend.call(agclip.global_norm, grads)
    assert_close(norm, 300.0 * math.sqrt(100_000), backend, dtype="float32", rtol=1e-6)


def test_norm_is_float64_when_any_leaf_is_float64(backend: Backend) -> None:
    backend.require("float64", "float16")
    tree = [backend.asarray([3.0], "float16"), backend.asarray([4.0], "float64")]
    assert_close(backend.call(agclip.global_norm, tree), 5.0, backend, dtype="float64")


@pytest.mark.parametrize("ord", ORDS)
def test_clip_by_global_norm_scales_to_max_norm(backend: Backend, ord: float) -> None:
    values = [sample((5, 3), 3, scale=10), sample(4, 4, scale=10)]
    tree = [backend.asarray(v) for v in values]
    clipped, norm = backend.call(agclip.clip_by_global_norm, tree, max_norm=1.5, ord=ord)
    cast = [np.asarray(v, np.float32) for v in values]
    before = reference_norm(cast, ord)
    assert_close(norm, before, backend, dtype="float32", rtol=2e-6)
    coef = min(1.0, 1.5 / (before + 1e-6))
    for got, want in zip(clipped, cast, strict=True):
        assert_close(got, want * coef, backend, dtype="float32", rtol=2e-6, atol=1e-7)
    assert reference_norm([backend.to_numpy(c) for c in clipped], ord) <= 1.5 * (1 + 1e-6)


def test_clip_by_global_norm_leaves_small_gradients_unchanged(backend: Backend) -> None:
    values = [sample(6, 5, scale=0.01)]
    clipped, _ = backend.call(
        agclip.clip_by_global_norm, [backend.asarray(values[0])], max_norm=1.0
    )
    assert_close(clipped[0], np.float32(values[0]), backend, dtype="float32", rtol=1e-7)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_low_precision_leaves_keep_dtype_and_are_scaled_in_float32(
    backend: Backend, dtype: str
) -> None:
    backend.require(dtype)
    grads = [backend.asarray(np.full(100_000, 300.0), dtype)]
    clipped, norm = backend.call(agclip.clip_by_global_norm, grads, max_norm=100.0)
    assert_array(norm, backend, dtype="float32", shape=())
    # 300 * 100 / 94868.3 = 0.3162: a float16 scale factor (1.05e-3) would be coarse.
    assert_close(clipped[0], np.full(100_000, 0.31622776), backend, dtype=dtype, rtol=4e-3)


def test_huge_finite_gradients_are_clipped_not_zeroed(backend: Backend) -> None:
    grads = {"w": backend.asarray(np.full(10, 1e20)), "b": backend.asarray([3e19, -4e19])}
    clipped, norm = backend.call(agclip.clip_by_global_norm, grads, max_norm=1.0)
    want = math.sqrt(10 * 1e40 + 25e38)
    assert_close(norm, want, backend, dtype="float32", rtol=1e-6)
    assert_close(clipped["w"], np.full(10, 1e20 / want), backend, dtype="float32", rtol=1e-6)
    assert_close(clipped["b"], np.array([3e19, -4e19]) / want, backend, dtype="float32", rtol=1e-6)


def test_huge_finite_float64_gradients_are_overflow_safe(backend: Backend) -> None:
    backend.require("float64")
    grads = [backend.asarray(np.full(4, 1e200), "float64")]
    norm = backend.call(agclip.global_norm, grads)
    assert_close(norm, 2e200, backend, dtype="float64", rtol=1e-12)


@pytest.mark.parametrize("ord", [2, 3])
def test_huge_finite_gradients_any_ord(backend: Backend, ord: float) -> None:
    grads = [backend.asarray(np.full(8, 1e30))]
    norm = backend.call(agclip.global_norm, grads, ord=ord)
    assert_close(norm, 1e30 * 8 ** (1 / ord), backend, dtype="float32", rtol=2e-6)


def test_gradients_near_float32s_largest_give_their_norm(backend: Backend) -> None:
    """Ten values of 1e38: their norm (3.2e38) fits float32, 1 / 1e38 is subnormal.
    (A float32 accumulator, JAX's without x64, flushed it to 0: the norm read 0, and
    the clip at max_norm 1 made 0 / 0.)"""
    grads = [backend.asarray(np.full(10, 1e38))]
    want = math.sqrt(10) * 1e38
    assert_close(backend.call(agclip.global_norm, grads), want, backend, dtype="float32", rtol=1e-6)
    clipped, norm = backend.call(agclip.clip_by_global_norm, grads, max_norm=10.0)
    assert_close(norm, want, backend, dtype="float32", rtol=1e-6)
    assert_close(clipped[0], np.full(10, math.sqrt(10)), backend, dtype="float32", rtol=1e-6)
    clipped, _ = backend.call(agclip.clip_by_global_norm, grads, max_norm=1.0)
    assert np.isfinite(backend.to_numpy(clipped[0])).all()


def test_an_infinite_norm_with_an_infinite_max_norm_is_nan_on_every_path(backend: Backend) -> None:
    """min(1, inf / inf) is NaN: the autodiff-safe form (JAX, torch autograd) agrees."""
    grads = [backend.asarray([math.inf, 1.0])]
    clipped, _ = backend.call(agclip.clip_by_global_norm, grads, max_norm=math.inf)
    assert np.isnan(backend.to_numpy(clipped[0])).all()


@pytest.mark.skip_backends(
    "array_api_strict",
    "jax",
    "jax_jit",
    reason="the factor is not read on the host there (and JAX without x64 computes it "
    "in float32): one below float32's normal range is rounded to float32",
)
def test_a_factor_below_float32s_range_still_clips(backend: Backend) -> None:
    """Clipped to 1e-10, ten values of 1e38 take a factor of 3e-49, which float32
    cannot hold; the values it gives (3.2e-11) it can."""
    grads = [backend.asarray(np.full(10, 1e38))]
    clipped, _ = backend.call(agclip.clip_by_global_norm, grads, max_norm=1e-10)
    want = np.full(10, 1e-10 / math.sqrt(10))
    assert_close(clipped[0], want, backend, dtype="float32", rtol=1e-6)


@pytest.mark.parametrize(("bad", "want"), [(np.nan, np.nan), (np.inf, np.inf)])
@pytest.mark.parametrize("ord", [2, 1, math.inf])
def test_nonfinite_gradients_give_nonfinite_norm(
    backend: Backend, bad: Any, want: Any, ord: float
) -> None:
    grads = [backend.asarray([1.0, bad, 2.0]), backend.asarray([1e20])]
    norm = backend.call(agclip.global_norm, grads, ord=ord)
    got = backend.to_numpy(norm)
    assert np.isnan(got) if np.isnan(want) else got == want, got


def test_empty_tree_and_none_leaves_give_zero_norm() -> None:
    trees: list[Any] = [[], {}, None, [None, {"a": None}]]
    for tree in trees:
        clipped, norm = agclip.clip_by_global_norm(tree, 1.0)
        assert clipped == tree
        assert float(norm) == 0.0
        assert float(agclip.global_norm(tree)) == 0.0
        assert bool(agclip.all_finite(tree))
        assert agclip.nonfinite_paths(tree) == []
        assert agclip.clip_by_norm(tree, 1.0) == tree
        assert agclip.clip_by_value(tree, 1.0) == tree
        assert agclip.zero_nonfinite(tree) == tree
        assert agclip.adaptive_grad_clip(tree, tree, 0.01, layout="torch") == tree


@pytest.mark.parametrize("ord", [math.inf, 3])
def test_size_zero_leaves_give_a_zero_norm(backend: Backend, ord: float) -> None:
    grads = [backend.asarray(np.zeros(0)), backend.asarray(np.zeros((2, 0)))]
    norm = backend.call(agclip.global_norm, grads, ord=ord)
    assert backend.to_numpy(norm) == 0.0


def test_tree_structure_is_kept(backend: Backend) -> None:
    Pair = collections.namedtuple("Pair", "w b")
    tree = {
        "layers": [
            Pair(backend.asarray([3.0]), None),
            Pair(backend.asarray([4.0]), backend.asarray([0.0])),
        ]
    }
    clipped, norm = backend.call(agclip.clip_by_global_norm, tree, max_norm=1.0)
    assert isinstance(clipped["layers"][0], Pair)
    assert clipped["layers"][0].b is None
    assert_close(norm, 5.0, backend, dtype="float32")
    assert_close(clipped["layers"][1].w, [0.8], backend, dtype="float32", rtol=1e-5)


def test_zero_size_leaves_are_allowed(backend: Backend) -> None:
    tree = [backend.asarray(np.zeros((0, 3))), backend.asarray([3.0, 4.0])]
    for ord in (2, math.inf):
        clipped, norm = backend.call(agclip.clip_by_global_norm, tree, max_norm=1.0, ord=ord)
        assert_array(clipped[0], backend, dtype="float32", shape=(0, 3))
        assert_close(norm, 5.0 if ord == 2 else 4.0, backend, dtype="float32")


def test_max_norm_zero_gives_zeros_not_nan(backend: Backend) -> None:
    grads = [backend.asarray(np.zeros(3))]
    clipped, norm = backend.call(agclip.clip_by_global_norm, grads, max_norm=0.0)
    assert_close(clipped[0], np.zeros(3), backend, dtype="float32")
    assert_close(norm, 0.0, backend, dtype="float32")


@pytest.mark.parametrize("ord", [2, 1, math.inf])
def test_clip_by_norm_clips_each_leaf_alone(backend: Backend, ord: float) -> None:
    values = {"big": sample(10, 6, scale=5), "small": sample(3, 7, scale=1e-3)}
    tree = {k: backend.asarray(v) for k, v in values.items()}
    out = backend.call(agclip.clip_by_norm, tree, max_norm=1.0, ord=ord)
    for key, raw in values.items():
        value = np.float32(raw)
        coef = min(1.0, 1.0 / (reference_norm([value], ord) + 1e-6))
        assert_close(out[key], value * coef, backend, dtype="float32", rtol=2e-6, atol=1e-9)


def test_clip_by_value(backend: Backend) -> None:
    tree = {"a": backend.asarray([-3.0, -0.5, 0.25, 9.0]), "b": None}
    out = backend.call(agclip.clip_by_value, tree, clip_value=1.0)
    assert out["b"] is None
    assert_close(out["a"], [-1.0, -0.5, 0.25, 1.0], backend, dtype="float32")


def test_all_finite_and_zero_nonfinite(backend: Backend) -> None:
    good = [backend.asarray([1.0, 2.0])]
    bad = {"x": backend.asarray([1.0, np.nan]), "y": [backend.asarray([np.inf, -np.inf, 3.0])]}
    assert_array(backend.call(agclip.all_finite, good), backend, dtype="bool", shape=())
    assert bool(backend.to_numpy(backend.call(agclip.all_finite, good)))
    assert not bool(backend.to_numpy(backend.call(agclip.all_finite, bad)))
    clean = backend.call(agclip.zero_nonfinite, bad)
    assert_close(clean["x"], [1.0, 0.0], backend, dtype="float32")
    assert_close(clean["y"][0], [0.0, 0.0, 3.0], backend, dtype="float32")


def test_nonfinite_paths_names_the_leaves(library: Backend) -> None:
    tree = {
        "layers": [library.asarray([1.0]), {"a": library.asarray([np.nan])}],
        "head": library.asarray([np.inf]),
    }
    assert agclip.nonfinite_paths(tree) == ["['head']", "['layers'][1]['a']"]
    assert agclip.nonfinite_paths(library.asarray([np.nan])) == ["<root>"]


# -- bad input ---------------------------------------------------------------
@pytest.mark.parametrize("bad", [-1.0, math.nan, -math.inf])  # inf measures only: test_hardening
def test_bad_max_norm_is_a_value_error_naming_it(library: Backend, bad: Any) -> None:
    grads = [library.asarray([1.0])]
    for fn, name in (
        (agclip.clip_by_global_norm, "max_norm"),
        (agclip.clip_by_norm, "max_norm"),
        (agclip.clip_by_value, "clip_value"),
    ):
        with pytest.raises(ValueError, match=name):
            fn(grads, bad)


@pytest.mark.parametrize("bad", [0, -2, math.nan, "inf", "fro", None, True])
def test_bad_ord_is_a_value_error_naming_it(bad: Any) -> None:
    # Checked before the leaves are looked at: one library is enough.
    with pytest.raises(ValueError, match="ord"):
        agclip.global_norm([np.ones(1)], ord=bad)
    with pytest.raises(ValueError, match="ord"):
        agclip.clip_by_global_norm([np.ones(1)], 1.0, ord=bad)


def test_integer_and_non_array_leaves_are_type_errors_naming_the_path(library: Backend) -> None:
    with pytest.raises(TypeError, match=r"leaf \['x'\]\[1\] .*int"):
        agclip.global_norm({"x": [library.asarray([1.0]), library.xp.asarray([1, 2])]})
    with pytest.raises(TypeError, match=r"leaf \['b'\] is a str"):
        agclip.clip_by_global_norm({"a": library.asarray([1.0]), "b": "oops"}, 1.0)
    with pytest.raises(TypeError, match=r"leaf \[1\] is a float"):
        agclip.clip_by_value([library.asarray([1.0]), 2.0], 1.0)


@pytest.mark.skip_backends("numpy", reason="needs a second library; numpy is the other one")
def test_leaves_from_two_libraries_are_a_type_error(library: Backend) -> None:
    with pytest.raises(TypeError, match=r"leaf \[1\] .* one library"):
        agclip.global_norm([library.asarray([1.0]), np.ones(2)])
