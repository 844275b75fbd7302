"""Cases a new user found quietly wrong (issue 9), on every backend they apply to:
host thresholds, thresholds from another library, extended precision,
underflowing norms, value clips beyond a dtype's range, and trees that must
flatten the same whether or not JAX was imported."""

from __future__ import annotations

import collections
import math
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from support import Backend, assert_close

import agclip
from agclip._tree import flatten

CLIPPERS: list[tuple[Callable[..., Any], str]] = [
    (agclip.clip_by_global_norm, "max_norm"),
    (agclip.clip_by_norm, "max_norm"),
    (agclip.clip_by_value, "clip_value"),
]


def _host_thresholds(backend: Backend, value: Any) -> Any:
    """0-d arrays holding ``value`` that live on the host for this backend."""
    values = [np.array(value), np.float32(value)]
    if backend.library in ("numpy", "array_api_strict") or backend.name == "torch":
        values.append(backend.asarray(value, "float32"))
    return values


@pytest.mark.parametrize("bad", [-1.0, math.nan, math.inf])
def test_0d_host_thresholds_are_validated_like_numbers(library: Backend, bad: Any) -> None:
    grads = [library.asarray([3.0, -4.0])]
    for threshold in _host_thresholds(library, bad):
        for fn, name in CLIPPERS:
            if bad == math.inf and name == "max_norm":
                continue  # measure only (next test)
            with pytest.raises(ValueError, match=name):
                fn(grads, threshold)


def test_an_infinite_max_norm_measures_and_clips_nothing(library: Backend) -> None:
    """torch's idiom for logging the norm: ``clip_grad_norm_(params, inf)``."""
    grads = [library.asarray([3.0, -4.0])]
    for threshold in [math.inf, *_host_thresholds(library, math.inf)]:
        clipped, norm = agclip.clip_by_global_norm(grads, threshold)
        assert_close(clipped[0], [3.0, -4.0], library, dtype="float32")
        assert_close(norm, 5.0, library, dtype="float32", rtol=1e-6)
        assert_close(
            agclip.clip_by_norm(grads, threshold)[0], [3.0, -4.0], library, dtype="float32"
        )


def test_0d_host_thresholds_clip_like_numbers(library: Backend) -> None:
    grads = [library.asarray([3.0, -4.0])]
    for threshold in _host_thresholds(library, 1.0):
        clipped, _ = agclip.clip_by_global_norm(grads, threshold)
        assert_close(clipped[0], [0.6, -0.8], library, dtype="float32", rtol=1e-5)
        assert_close(
            agclip.clip_by_value(grads, threshold)[0], [1.0, -1.0], library, dtype="float32"
        )


class _ShapedButNotAnArray:
    shape = ()


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (None, "must be a real number"),
        (True, "must be a real number"),
        ("1.0", "must be a real number"),
        (np.ones(2, np.float32), "must be a real number or a 0-d array"),
        (_ShapedButNotAnArray(), "must be a real number or a 0-d array"),
        (np.array(True), "must be real, got an array of dtype bool"),
        (np.array(1 + 0j), "must be real, got an array of dtype complex"),
    ],
    ids=["None", "bool", "str", "1-d", "not-an-array", "bool-0d", "complex-0d"],
)
def test_thresholds_of_the_wrong_kind_are_type_errors_naming_the_argument(
    bad: Any, message: str
) -> None:
    grads = [np.array([3.0, -4.0], np.float32)]
    for fn, name in CLIPPERS:
        with pytest.raises(TypeError, match=rf"{name} {message}"):
            fn(grads, bad)
    assert grads[0].tolist() == [3.0, -4.0]


def test_threshold_from_another_library_is_a_type_error_naming_it(library: Backend) -> None:
    if library.library == "torch":
        other = pytest.importorskip("array_api_strict").asarray(1.0)
    else:
        other = pytest.importorskip("torch").tensor(1.0)
    grads = [library.asarray([3.0, 4.0])]
    for fn, name in CLIPPERS:
        with pytest.raises(TypeError, match=rf"{name} is a .* array but the gradients are"):
            fn(grads, other)


def test_extended_precision_is_rejected_naming_the_dtype() -> None:
    if np.dtype(np.longdouble).itemsize <= 8:
        pytest.skip("np.longdouble is float64 on this platform")
    from agclip.backends.numpy import clip_by_global_norm_, clip_by_value_

    tree = {"w": np.full(3, 1e300, dtype=np.longdouble)}
    for call in (
        lambda: agclip.global_norm(tree),
        lambda: agclip.clip_by_global_norm(tree, 1.0),
        lambda: agclip.clip_by_value(tree, 1.0),
    ):
        with pytest.raises(TypeError, match=r"leaf \['w'\] has dtype float(96|128); extended"):
            call()
    arrays: list[np.ndarray] = [np.ones(2, np.float32), np.full(3, 1e300, dtype=np.longdouble)]
    for fn in (clip_by_global_norm_, clip_by_value_):
        with pytest.raises(TypeError, match=r"arrays\[1\] has dtype float(96|128)"):
            fn(arrays, 0.5)
    assert arrays[0].tolist() == [1.0, 1.0]
    assert float(arrays[1][0]) == 1e300


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_large_order_norm_does_not_underflow(backend: Backend, dtype: str) -> None:
    backend.require(dtype)
    grads = [backend.asarray(np.full(100, 0.01), dtype)]
    want = 0.01 * 100 ** (1 / 50)  # 0.0110
    assert_close(backend.call(agclip.global_norm, grads, ord=50), want, backend, dtype=dtype)
    clipped, norm = backend.call(agclip.clip_by_global_norm, grads, 0.005, ord=50, eps=0.0)
    assert_close(norm, want, backend, dtype=dtype)
    assert_close(clipped[0], np.full(100, 0.01 * 0.005 / want), backend, dtype=dtype, rtol=1e-5)


@pytest.mark.parametrize("scale", [1e-30, 1e-20])
def test_tiny_float32_gradients_give_an_accurate_norm_and_clip(
    backend: Backend, scale: float
) -> None:
    _check_tiny_norm_and_clip(backend, scale)


@pytest.mark.skip_backends(
    "jax", "jax_jit", reason="XLA on CPU flushes subnormal float32 values to zero"
)
def test_subnormal_float32_gradients_give_an_accurate_norm_and_clip(backend: Backend) -> None:
    _check_tiny_norm_and_clip(backend, 3e-39)


def _check_tiny_norm_and_clip(backend: Backend, scale: float) -> None:
    values = np.random.default_rng(0).standard_normal(5000) * scale
    values32 = values.astype(np.float32).astype(np.float64)
    want = float(np.sqrt(np.sum(values32**2)))
    grads = [backend.asarray(values[:1000]), backend.asarray(values[1000:])]
    assert_close(backend.call(agclip.global_norm, grads), want, backend, dtype="float32")
    clipped, norm = backend.call(agclip.clip_by_global_norm, grads, want / 2, eps=0.0)
    assert_close(norm, want, backend, dtype="float32")
    got = np.concatenate([backend.to_numpy(leaf) for leaf in clipped])
    np.testing.assert_allclose(np.sqrt(np.sum(got**2)), want / 2, rtol=1e-4)


def test_all_zero_gradients_keep_a_zero_norm(backend: Backend) -> None:
    grads = [backend.asarray(np.zeros(10)), backend.asarray(np.zeros(3))]
    assert_close(backend.call(agclip.global_norm, grads), 0.0, backend, dtype="float32")
    assert_close(backend.call(agclip.global_norm, grads, ord=50), 0.0, backend, dtype="float32")


def test_value_clip_beyond_float16_range_clips_the_rest(backend: Backend) -> None:
    backend.require("float16")
    tree = {
        "wide": backend.asarray([2e5, -3.0, -2e5], "float32"),
        "half": backend.asarray([np.inf, 3.0, -np.inf], "float16"),
    }
    out = backend.call(agclip.clip_by_value, tree, 1e5)
    assert_close(out["wide"], [1e5, -3.0, -1e5], backend, dtype="float32")
    assert_close(out["half"], [65504.0, 3.0, -65504.0], backend, dtype="float16")


# -- trees: the same leaves, paths and errors with or without JAX --------------
Point = collections.namedtuple("Point", "x y")


def _trees() -> Any:
    a, b, c = np.ones(2), np.zeros(3), np.full(1, 2.0)
    return {
        "deque": collections.deque([a, None, b]),
        "mixed keys": {"w": a, 1: b, (2, "t"): c},
        "nested": {"layers": [Point(a, None), {"z": b, "a": c}], "head": (c,)},
        "ordered": collections.OrderedDict([("z", a), ("a", b)]),
        "leaf": a,
        "empty": [None, (), {}],
    }


@pytest.mark.parametrize("name", list(_trees()))
def test_both_flatteners_give_the_same_leaves_and_paths(name: str) -> None:
    pytest.importorskip("jax")
    tree = _trees()[name]
    with_jax, without = flatten(tree, bridge_jax=True), flatten(tree, bridge_jax=False)
    assert with_jax.paths == without.paths
    assert [id(x) for x in with_jax.leaves] == [id(x) for x in without.leaves]
    rebuilt = with_jax.unflatten(with_jax.leaves)
    assert flatten(rebuilt, bridge_jax=False).paths == without.paths


@pytest.mark.slow
def test_tree_results_do_not_depend_on_whether_jax_was_imported() -> None:
    """The same script run with and without ``import jax`` first prints the same."""
    script = """
import collections, sys, numpy as np
if sys.argv[1] == "jax":
    import jax
import agclip
from agclip._tree import flatten
tree = {"w": collections.deque([np.ones(2), np.full(3, 2.0)]), 1: np.ones(1)}
print(flatten(tree).paths, float(agclip.global_norm(tree)))
try:
    agclip.global_norm({"a": np.ones(1), 2: "oops"})
except TypeError as error:
    print(error)
"""
    pytest.importorskip("jax")
    outputs = [
        subprocess.run(
            [sys.executable, "-c", script, mode], capture_output=True, text=True, check=True
        ).stdout
        for mode in ("plain", "jax")
    ]
    assert outputs[0] == outputs[1]
    assert "['w'][0]" in outputs[0]
    assert "leaf [2] is a str" in outputs[0]


def test_jax_registered_nodes_are_flattened_with_their_keys() -> None:
    jax = pytest.importorskip("jax")
    jnp = pytest.importorskip("jax.numpy")

    @jax.tree_util.register_pytree_with_keys_class
    class Layer:
        def __init__(self, w: Any, extra: Any) -> None:
            self.w, self.extra = w, extra

        def tree_flatten_with_keys(self) -> Any:
            keys = (jax.tree_util.GetAttrKey("w"), jax.tree_util.GetAttrKey("extra"))
            return tuple(zip(keys, (self.w, self.extra), strict=True)), None

        @classmethod
        def tree_unflatten(cls, aux: Any, children: Any) -> Any:
            return cls(*children)

    tree = {"layer": Layer(jnp.full(4, 3.0), collections.deque([jnp.full(4, 4.0), None]))}
    assert flatten(tree).paths == ["['layer'].w", "['layer'].extra[0]"]
    clipped, norm = agclip.clip_by_global_norm(tree, 1.0)
    assert isinstance(clipped["layer"], Layer)
    assert clipped["layer"].extra[1] is None
    np.testing.assert_allclose(float(norm), 10.0, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(clipped["layer"].w), np.full(4, 0.3), rtol=1e-5)
