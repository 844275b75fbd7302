"""Adaptive gradient clipping (AGC): a float64 reference on every backend, timm's
``adaptive_clip_grad`` and ``optax.adaptive_grad_clip`` as references, both layouts,
and exclusion by key path."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from support import Backend, assert_close

import agclip


def reference(
    grad: np.ndarray, param: np.ndarray, clipping: float, eps: float, axes: tuple[int, ...]
) -> np.ndarray:
    g_norm = np.sqrt(np.sum(grad.astype(np.float64) ** 2, axis=axes, keepdims=True))
    p_norm = np.sqrt(np.sum(param.astype(np.float64) ** 2, axis=axes, keepdims=True))
    max_norm = clipping * np.maximum(p_norm, eps)
    scale = np.where(g_norm > max_norm, max_norm / np.maximum(g_norm, 1e-6), 1.0)
    return grad * scale


def _tree(seed: int = 0) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    shapes = {"conv": (4, 3, 3, 3), "dense": (5, 7), "bias": (5,), "head": (2, 5)}
    grads = {k: rng.standard_normal(s) * 10 for k, s in shapes.items()}
    params = {k: rng.standard_normal(s) for k, s in shapes.items()}
    params["bias"] = np.zeros(5)  # zero-initialised: eps keeps it clippable
    return grads, params


def _output_axis_first(leaf: Any) -> tuple[int, ...]:
    """A callable layout: the torch layout, spelled out."""
    return tuple(range(1, leaf.ndim)) or (0,)


@pytest.mark.parametrize("layout", ["torch", "flax", "callable"])
def test_matches_the_float64_reference_on_every_backend(backend: Backend, layout: str) -> None:
    grads, params = _tree()
    out = backend.call(
        agclip.adaptive_grad_clip,
        {k: backend.asarray(v) for k, v in grads.items()},
        {k: backend.asarray(v) for k, v in params.items()},
        0.05,
        layout=_output_axis_first if layout == "callable" else layout,
        exclude="*head*",
    )
    for key, grad in grads.items():
        ndim = grad.ndim
        axes = tuple(range(ndim - 1)) if layout == "flax" else tuple(range(1, ndim))
        axes = axes if ndim > 1 else (0,)
        want = (
            grad
            if key == "head"
            else reference(grad.astype(np.float32), params[key], 0.05, 1e-3, axes)
        )
        assert_close(out[key], want, backend, dtype="float32", rtol=2e-6, atol=1e-7)


def test_gradients_whose_squares_overflow_float32_are_clipped_not_zeroed(
    backend: Backend,
) -> None:
    """Squares of 1e20 overflow float32: the unit norms read inf, and the gradients
    were zeroed (the parameters' norms too: their units were left unclipped)."""
    grads, params = _tree()
    grads = {k: (v * 1e20).astype(np.float32) for k, v in grads.items()}
    params = {k: (v * 1e20).astype(np.float32) for k, v in params.items()}
    out = backend.call(
        agclip.adaptive_grad_clip,
        {k: backend.asarray(v) for k, v in grads.items()},
        {k: backend.asarray(v) for k, v in params.items()},
        0.05,
        eps=0.0,
        layout="torch",
    )
    for key, grad in grads.items():
        axes = tuple(range(1, grad.ndim)) or (0,)
        want = reference(grad, params[key], 0.05, 0.0, axes)
        assert_close(out[key], want, backend, dtype="float32", rtol=2e-6, atol=0)


def test_bad_arguments_are_clear_errors() -> None:
    grads, params = _tree()
    with pytest.raises(ValueError, match="layout must be"):
        agclip.adaptive_grad_clip(grads, params, 0.1, layout="nchw")
    with pytest.raises(ValueError, match="clipping"):
        agclip.adaptive_grad_clip(grads, params, -1.0, layout="torch")
    with pytest.raises(ValueError, match="params must have the structure"):
        agclip.adaptive_grad_clip(grads, {"conv": params["conv"]}, 0.1, layout="torch")


def _timm_agc() -> Any:
    """timm's ``adaptive_clip_grad``, loaded from its own file in the installed timm
    (``import timm`` itself needs torchvision, which has no build for this torch)."""
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("timm is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / "utils" / "agc.py"
    module_spec = importlib.util.spec_from_file_location("timm_agc", path)
    assert module_spec is not None
    assert module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.adaptive_clip_grad


def _conv_net() -> Any:
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(8 * 4 * 4, 10),
    )
    model(torch.randn(4, 3, 6, 6)).pow(2).sum().mul(1e3).backward()
    return model


@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf])
def test_torch_matches_timm(norm_type: float) -> None:
    torch = pytest.importorskip("torch")
    from agclip.backends.torch import adaptive_clip_grad_

    timm_agc = _timm_agc()
    ours, theirs = _conv_net(), _conv_net()
    adaptive_clip_grad_(ours.parameters(), 0.01, norm_type=norm_type)
    timm_agc(theirs.parameters(), 0.01, norm_type=norm_type)
    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        assert a.grad is not None
        assert b.grad is not None
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-8)


def test_torch_excludes_by_name_not_by_position() -> None:
    model = _conv_net()
    from agclip.backends.torch import adaptive_clip_grad_

    before = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    adaptive_clip_grad_(model.named_parameters(), 0.01, exclude="3.*")  # the Linear head
    after = {name: p.grad for name, p in model.named_parameters()}
    assert after["3.weight"] is not None
    assert (after["3.weight"] == before["3.weight"]).all()
    assert not (after["0.weight"] == before["0.weight"]).all()  # the conv was clipped


def test_jax_flax_layout_matches_optax_and_torch_layout_matches_timm() -> None:
    jax = pytest.importorskip("jax")
    optax = pytest.importorskip("optax")
    jnp = jax.numpy
    from agclip.backends.jax import adaptive_grad_clip

    grads, params = _tree()
    grads = {k: jnp.asarray(v, jnp.float32) for k, v in grads.items()}
    params = {k: jnp.asarray(v, jnp.float32) for k, v in params.items()}
    ours, theirs = adaptive_grad_clip(0.05), optax.adaptive_grad_clip(0.05)
    got, _ = jax.jit(ours.update)(grads, ours.init(params), params)
    want, _ = theirs.update(grads, theirs.init(params), params)
    for key in grads:
        np.testing.assert_allclose(
            np.asarray(got[key]), np.asarray(want[key]), rtol=2e-6, atol=1e-7
        )
    # A PyTorch-layout weight: the flax rule cuts across its units, the torch one does not.
    torch_layout = adaptive_grad_clip(0.05, layout="torch")
    got, _ = torch_layout.update(grads, torch_layout.init(params), params)
    for key, grad in grads.items():
        axes = tuple(range(1, grad.ndim)) if grad.ndim > 1 else (0,)
        want_np = reference(np.asarray(grad), np.asarray(params[key]), 0.05, 1e-3, axes)
        np.testing.assert_allclose(np.asarray(got[key]), want_np, rtol=2e-6, atol=1e-7)
    with pytest.raises(ValueError, match="needs params"):
        ours.update(grads, ours.init(params))


OPTAX_SHAPES = [(), (7,), (1, 9), (9, 1), (6, 4), (5, 3, 4), (3, 3, 2, 4), (1, 1, 1, 6)]


def test_the_optax_layout_equals_optax_on_every_rank_it_takes() -> None:
    """optax reduces ranks 2 and 3 over axis 0 only (3-D attention kernels), ranks 4
    over axes 0-2, and makes a leaf that is a vector once squeezed one unit."""
    jax = pytest.importorskip("jax")
    optax = pytest.importorskip("optax")
    from agclip.backends.jax import adaptive_grad_clip

    rng = np.random.default_rng(5)
    grads = {str(s): jax.numpy.asarray(rng.standard_normal(s) * 3, "float32") for s in OPTAX_SHAPES}
    params = {
        k: jax.numpy.asarray(rng.standard_normal(v.shape), "float32") for k, v in grads.items()
    }
    ours, theirs = adaptive_grad_clip(0.05), optax.adaptive_grad_clip(0.05)
    got, _ = jax.jit(ours.update)(grads, ours.init(params), params)
    want, _ = theirs.update(grads, theirs.init(params), params)
    for key in grads:
        np.testing.assert_allclose(
            np.asarray(got[key]), np.asarray(want[key]), rtol=2e-6, atol=1e-7
        )
    functional = agclip.adaptive_grad_clip(
        {k: np.asarray(v) for k, v in grads.items()},
        {k: np.asarray(v) for k, v in params.items()},
        0.05,
        layout="optax",
    )
    for key in grads:
        np.testing.assert_allclose(functional[key], np.asarray(want[key]), rtol=2e-6, atol=1e-7)
    with pytest.raises(ValueError, match=r"rank <= 4.*\['big'\] has shape \(2, 2, 2, 2, 2\)"):
        agclip.adaptive_grad_clip(
            {"big": np.ones((2,) * 5)}, {"big": np.ones((2,) * 5)}, 0.1, layout="optax"
        )


def test_params_must_match_the_gradients_shapes() -> None:
    grads, params = _tree()
    wrong = {**params, "conv": np.ones((1, 2))}
    with pytest.raises(
        ValueError, match=r"\['conv'\] has shape .* params has \['conv'\] of shape \(1, 2\)"
    ):
        agclip.adaptive_grad_clip(grads, wrong, 0.1, layout="torch")
    one, two = {"a": np.ones(2)}, {"a": np.ones(2), "b": np.ones(2)}
    with pytest.raises(ValueError, match=r"\['b'\] has shape \(2,\), params has nothing there"):
        agclip.adaptive_grad_clip(two, one, 0.1, layout="torch")
    with pytest.raises(ValueError, match="params has 2 leaves, grads 1"):
        agclip.adaptive_grad_clip(one, two, 0.1, layout="torch")


def test_torch_exclude_without_names_is_an_error() -> None:
    """It cannot exclude by name what has no name: silently ignoring it clipped the head."""
    pytest.importorskip("torch")
    from agclip.backends.torch import adaptive_clip_grad_

    model = _conv_net()
    before = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    with pytest.raises(ValueError, match="excludes parameters by name"):
        adaptive_clip_grad_(model.parameters(), 0.01, exclude="3.*")
    after = [p.grad for p in model.parameters() if p.grad is not None]
    assert all(bool((a == b).all()) for a, b in zip(after, before, strict=True))
    adaptive_clip_grad_(model, 0.01, exclude="3.*")  # a module: named
