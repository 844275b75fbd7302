"""agclip.backends.torch on the inputs a new user tried (issue 9): gradients that
require grad, thresholds as arrays, partial writes, norms beyond float32, the
callback's edge cases and torch's empty-generator warning."""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest

if TYPE_CHECKING:
    import torch
else:
    torch = pytest.importorskip("torch")

from support import grad_of

from agclip.backends import torch as ag


def params_with(*grads: Any) -> Any:
    params = []
    for grad in grads:
        param = torch.nn.Parameter(torch.zeros(grad.shape, dtype=grad.dtype))
        param.grad = grad
        params.append(param)
    return params


def two_groups(requires_grad: bool = False) -> Any:
    """A float32 and a float64 gradient (two dtype groups), each needing a clip."""
    grads = [
        torch.full((3,), 4.0, requires_grad=requires_grad),
        torch.full((2,), -3.0, dtype=torch.float64, requires_grad=requires_grad),
    ]
    return params_with(*grads)


def grads(params: Any) -> Any:
    return [p.grad.detach().clone() for p in params]


# -- 1. gradients that require grad --------------------------------------------
def test_gradients_that_require_grad_are_clipped_like_torch() -> None:
    ours, theirs = two_groups(requires_grad=True), two_groups(requires_grad=True)
    norm = ag.clip_grad_norm_(ours, 1.0)
    want = torch.nn.utils.clip_grad_norm_(theirs, 1.0)
    assert norm.grad_fn is None
    assert not norm.requires_grad
    torch.testing.assert_close(norm, want.to(norm.dtype))
    for a, b in zip(grads(ours), grads(theirs), strict=True):
        torch.testing.assert_close(a, b)
    ag.clip_grad_value_(ours, 0.1)
    torch.nn.utils.clip_grad_value_(theirs, 0.1)
    total = ag.get_total_norm([p.grad for p in ours])
    assert total.grad_fn is None
    ag.clip_grads_with_norm_(ours, 0.05, total)
    torch.nn.utils.clip_grads_with_norm_(theirs, 0.05, total)
    for a, b in zip(grads(ours), grads(theirs), strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.filterwarnings("ignore:Using backward.. with create_graph=True")
def test_create_graph_gradients_do_not_record_the_clip() -> None:
    x = torch.nn.Parameter(torch.tensor([3.0, 4.0]))
    (x**3).sum().backward(create_graph=True)
    assert grad_of(x).grad_fn is not None
    before = grad_of(x).grad_fn
    norm = ag.clip_grad_norm_([x], 1.0)
    assert norm.grad_fn is None
    assert grad_of(x).grad_fn is before  # the clip was not added to the graph
    np.testing.assert_allclose(
        grad_of(x).detach().numpy(), np.array([27.0, 48.0]) / math.hypot(27, 48), rtol=1e-5
    )


# -- 2. and 3. thresholds: host arrays checked, nothing half-written ----------------
@pytest.mark.parametrize(
    "bad", [np.array(-1.0), torch.tensor(-1.0), torch.tensor(math.nan), np.float64("-inf")]
)
def test_bad_0d_host_thresholds_raise_before_any_change(bad: Any) -> None:
    params = two_groups()
    before = grads(params)
    callback = ag.GradientClipCallback
    for call, name in (
        (lambda: ag.clip_grad_norm_(params, bad), "max_norm"),
        (lambda: ag.clip_grads_with_norm_(params, bad, torch.tensor(5.0)), "max_norm"),
        (lambda: ag.clip_grad_value_(params, bad), "clip_value"),
        (lambda: callback(max_norm=bad), "max_norm"),
    ):
        with pytest.raises(ValueError, match=name):
            call()
    for a, b in zip(grads(params), before, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("threshold", [np.array(1.0), torch.tensor(1.0), np.float32(1.0)])
def test_0d_host_thresholds_work_like_numbers(threshold: Any) -> None:
    ours, theirs = two_groups(), two_groups()
    ag.clip_grad_value_(ours, threshold)
    torch.nn.utils.clip_grad_value_(theirs, 1.0)
    ag.clip_grad_norm_(ours, threshold)
    torch.nn.utils.clip_grad_norm_(theirs, 1.0)
    for a, b in zip(grads(ours), grads(theirs), strict=True):
        torch.testing.assert_close(a, b)


def test_threshold_from_another_library_names_it() -> None:
    strict = pytest.importorskip("array_api_strict")
    params = two_groups()
    with pytest.raises(TypeError, match="max_norm is a array_api_strict array"):
        ag.clip_grad_norm_(params, strict.asarray(1.0))
    with pytest.raises(TypeError, match="clip_value is a array_api_strict array"):
        ag.clip_grad_value_(params, strict.asarray(1.0))


@pytest.mark.parametrize("foreach", [None, False])
def test_value_clip_beyond_float16_range_clips_every_group(foreach: bool | None) -> None:
    params = params_with(
        torch.tensor([2e5, -3.0, -2e5]), torch.tensor([math.inf, 3.0, -5.0], dtype=torch.float16)
    )
    ag.clip_grad_value_(params, 1e5, foreach=foreach)
    assert params[0].grad.tolist() == [1e5, -3.0, -1e5]
    assert params[1].grad.tolist() == [65504.0, 3.0, -5.0]


# -- 6. a norm beyond float32's range ---------------------------------------------------
def test_error_if_nonfinite_raises_when_the_norm_exceeds_float32() -> None:
    params = params_with(torch.full((4,), 3.4e38))
    before = grads(params)
    with pytest.raises(RuntimeError, match=r"6\.8e\+38, beyond the range of the torch.float32"):
        ag.clip_grad_norm_(params, 1.0, error_if_nonfinite=True)
    with pytest.raises(RuntimeError, match="beyond the range"):
        ag.get_total_norm([p.grad for p in params], error_if_nonfinite=True)
    torch.testing.assert_close(grads(params)[0], before[0])
    # Without the error flag the clip uses the exact norm: gradients come out right.
    ag.clip_grad_norm_(params, 1.0)
    torch.testing.assert_close(params[0].grad, torch.full((4,), 0.5))


# -- 8. the callback ---------------------------------------------------------------
def test_callback_on_a_model_without_parameters_returns_zero() -> None:
    callback = ag.GradientClipCallback(max_norm=1.0)
    callback.set_model(torch.nn.ReLU())
    assert float(callback.on_after_backward()) == 0.0
    assert callback.steps == 1


def test_callback_counts_a_step_only_when_it_succeeds() -> None:
    model = torch.nn.Linear(2, 1)
    model(torch.ones(1, 2)).sum().backward()
    grad_of(model.weight)[0, 0] = math.nan
    callback = ag.GradientClipCallback(max_norm=1.0, error_if_nonfinite=True)
    callback.set_model(model)
    with pytest.raises(RuntimeError, match="weight"):
        callback.on_after_backward()
    assert callback.steps == 0
    assert callback.clipped_steps == 0
    grad_of(model.weight).fill_(0.0)
    callback.on_after_backward()
    assert callback.steps == 1


@pytest.mark.filterwarnings("ignore:Using backward.. with create_graph=True")
def test_callback_clips_create_graph_gradients_without_recording() -> None:
    model = torch.nn.Linear(3, 1)
    model(torch.ones(2, 3)).pow(2).sum().mul(100).backward(create_graph=True)
    callback = ag.GradientClipCallback(max_norm=1.0)
    callback.set_model(model)
    norm = callback.on_after_backward()
    assert norm.grad_fn is None
    total = ag.get_total_norm([grad_of(p) for p in model.parameters()])
    np.testing.assert_allclose(float(total), 1.0, rtol=1e-5)


# -- 9. torch's warning for an empty generator ----------------------------------------
def test_exhausted_generator_warns_like_torch() -> None:
    model = torch.nn.Linear(2, 2)
    params = model.parameters()
    list(params)  # exhausted, as after a first clip_grad_norm_(model.parameters(), ...)
    with pytest.warns(UserWarning, match="`parameters` is an empty generator") as ours:
        norm = ag.clip_grad_norm_(params, 1.0)
    assert float(norm) == 0.0
    with pytest.warns(UserWarning, match="empty generator") as theirs:
        torch.nn.utils.clip_grad_norm_((p for p in list[torch.Tensor]()), 1.0)
    assert str(ours[0].message) == str(theirs[0].message)
    assert ours[0].filename == __file__  # points at the caller, as torch's does
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ag.clip_grad_norm_([], 1.0)  # an empty list is not a consumed generator


# -- arguments that are not what they should be ---------------------------------------
def test_bad_arguments_are_errors_naming_them() -> None:
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="check_every must be an int >= 1, got 0"):
        ag.GradientClipCallback(1.0, check_every=0)
    with pytest.raises(TypeError, match="optimizer must be a torch optimizer, got object"):
        ag.clip_and_step(object(), 1.0)
    with_a_string: list[Any] = [model.weight, "bias"]
    with pytest.raises(TypeError, match=r"parameters\[1\] is a str, not a torch.Tensor"):
        ag.adaptive_clip_grad_(with_a_string, 0.01)
    model(torch.ones(1, 2)).sum().backward()
    before = grad_of(model.weight).clone()
    with pytest.raises(TypeError, match=r"parameters\[1\] is a str, not a torch.Tensor"):
        ag.clip_grad_norm_(with_a_string, 1e-3)
    with pytest.raises(TypeError, match=r"tensors\[1\] is a float, not a torch.Tensor"):
        ag.get_total_norm([grad_of(model.weight), 1.0])  # type: ignore[list-item]
    assert torch.equal(grad_of(model.weight), before)  # nothing modified before the error


def test_an_optimizer_whose_optimizer_attribute_is_not_one_is_used_itself() -> None:
    """Only a wrapper's ``.optimizer`` that is an optimizer is unwrapped."""
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    optimizer.optimizer = "not an optimizer"  # type: ignore[attr-defined]
    model(torch.ones(1, 2)).sum().mul(100).backward()
    before = [p.detach().clone() for p in model.parameters()]
    norm = ag.clip_and_step(optimizer, 1.0)
    moved = [b - p.detach() for b, p in zip(before, model.parameters(), strict=True)]
    assert float(norm) > 1.0
    assert float(torch.linalg.vector_norm(torch.cat([m.flatten() for m in moved]))) == (
        pytest.approx(1.0, rel=1e-5)
    )


def test_loading_an_empty_state_dict_starts_a_rule_afresh() -> None:
    model = torch.nn.Linear(2, 2)
    fresh, used = ag.ZClip(warmup_steps=2), ag.ZClip(warmup_steps=2)
    for scale in (1.0, 2.0, 3.0):
        model.zero_grad()
        model(torch.ones(1, 2)).sum().mul(scale).backward()
        used.step(model)
    used.load_state_dict({})
    assert used.state is None
    model.zero_grad()
    model(torch.ones(1, 2)).sum().backward()
    used.step(model)
    fresh.step(model)
    torch.testing.assert_close(used.state, fresh.state)
