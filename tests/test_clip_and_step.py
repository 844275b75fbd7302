"""``clip_and_step(optimizer, max_norm)``: one call that clips the optimizer's gradients
and steps, equal to torch's ``clip_grad_norm_`` over the optimizer's parameters then
``step()``; the coefficient inside a fused step; non-finite norms skip the step;
GradScaler composes; wrappers step through; nothing is left on the optimizer."""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    import torch
else:
    torch = pytest.importorskip("torch")

from support import grad_of

from agclip.backends.torch import (
    AdaGC,
    GradientClipCallback,
    ZClip,
    clip_and_step,
    clip_grad_norm_,
)

OPTIMIZERS: dict[str, Callable[[Any], Any]] = {
    "AdamW-fused": lambda ps: torch.optim.AdamW(ps, lr=1e-2, fused=True),
    "Adam-fused": lambda ps: torch.optim.Adam(ps, lr=1e-2, fused=True),
    "SGD-fused": lambda ps: torch.optim.SGD(ps, lr=1e-1, momentum=0.9, fused=True),
    "AdamW": lambda ps: torch.optim.AdamW(ps, lr=1e-2),
    "SGD": lambda ps: torch.optim.SGD(ps, lr=1e-1, momentum=0.9),
}
FUSED = {name: make for name, make in OPTIMIZERS.items() if name.endswith("fused")}


def _model() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.LayerNorm(8), torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4)
    )


def _groups(model: torch.nn.Module) -> list[dict[str, Any]]:
    """The usual decay / no-decay groups, each in reverse order: the LayerNorm and
    the biases first, nothing in the order of ``model.parameters()``."""
    named = list(model.named_parameters())
    no_decay = [p for name, p in reversed(named) if name.startswith("0.") or "bias" in name]
    decay = [p for name, p in reversed(named) if not (name.startswith("0.") or "bias" in name)]
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": 0.1}]


def _backward(model: torch.nn.Module, seed: int = 1, scale: float = 100.0) -> None:
    generator = torch.Generator().manual_seed(seed)
    x, y = torch.randn(16, 8, generator=generator), torch.randn(16, 4, generator=generator)
    (scale * torch.nn.functional.mse_loss(model(x), y)).backward()


def _twins(make: Callable[[Any], Any], grouped: bool = False) -> tuple[Any, Any, Any, Any]:
    ours, theirs = _model(), _model()
    params = _groups if grouped else (lambda m: list(m.parameters()))
    return ours, make(params(ours)), theirs, make(params(theirs))


def _params_of(optimizer: Any) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def _assert_same(ours: Any, theirs: Any, our_opt: Any, their_opt: Any, tol: float = 1e-6) -> None:
    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol / 10)
    mine, other = our_opt.state_dict()["state"], their_opt.state_dict()["state"]
    assert mine.keys() == other.keys()
    for key, values in other.items():
        for name, value in values.items():
            torch.testing.assert_close(mine[key][name], value, rtol=tol, atol=tol / 10)


def _clip_and_step_both(
    ours: Any, stepped: Any, theirs: Any, their_opt: Any, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of each twin, ``clip_and_step(stepped)`` and torch's clip then step:
    the two norms."""
    _backward(ours, seed=seed)
    _backward(theirs, seed=seed)
    norm = clip_and_step(stepped, 1.0)
    want = torch.nn.utils.clip_grad_norm_(_params_of(their_opt), 1.0)
    their_opt.step()
    return norm, want


def _nothing_left(optimizer: Any) -> None:
    assert not hasattr(optimizer, "grad_scale")
    assert not hasattr(optimizer, "found_inf")
    assert not optimizer._optimizer_step_pre_hooks
    assert not optimizer._optimizer_step_post_hooks


@pytest.mark.parametrize("grouped", [False, True], ids=["parameters", "groups-reordered"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_equals_torchs_clip_then_step(name: str, grouped: bool) -> None:
    ours, our_opt, theirs, their_opt = _twins(OPTIMIZERS[name], grouped)
    for step in range(3):
        norm, want = _clip_and_step_both(ours, our_opt, theirs, their_opt, seed=step)
        torch.testing.assert_close(norm, want, rtol=1e-6, atol=0)
        _assert_same(ours, theirs, our_opt, their_opt)
        _nothing_left(our_opt)
        our_opt.zero_grad(set_to_none=step % 2 == 0)  # either way, nothing leaks
        their_opt.zero_grad(set_to_none=step % 2 == 0)


@pytest.mark.parametrize("name", list(FUSED))
def test_a_fused_step_takes_the_coefficient_without_a_scale_pass(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _model()
    optimizer = FUSED[name](model.parameters())
    _backward(model)
    clip_and_step(optimizer, 1.0)  # fused SGD's first step takes the plain path (see below)
    _backward(model)
    calls = []
    monkeypatch.setattr(torch, "_foreach_mul_", lambda *a: calls.append(a))
    clip_and_step(optimizer, 1.0)
    assert not calls  # the gradients were not scaled here


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_only_the_optimizers_parameters_are_clipped(name: str) -> None:
    model = _model()
    head = model[3]
    optimizer = OPTIMIZERS[name](head.parameters())
    _backward(model)
    others = [grad_of(p).clone() for p in model[:3].parameters()]
    want = float(torch.nn.utils.get_total_norm([grad_of(p) for p in head.parameters()]))
    assert float(clip_and_step(optimizer, 1e-3)) == pytest.approx(want, rel=1e-6)
    earlier = model[:3].parameters()
    assert all(torch.equal(grad_of(p), g) for p, g in zip(earlier, others, strict=True))


class Wrapper:
    """A trainer's optimizer wrapper (Lightning's and accelerate's shape): the real
    optimizer in ``.optimizer``, its own ``step`` with bookkeeping."""

    def __init__(self, optimizer: Any):
        self.optimizer = optimizer
        self.steps = 0

    def step(self) -> None:
        self.steps += 1
        self.optimizer.step()


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_a_wrapped_optimizer_steps_through_its_wrapper(name: str) -> None:
    ours, our_opt, theirs, their_opt = _twins(OPTIMIZERS[name], grouped=True)
    wrapper = Wrapper(our_opt)
    for step in range(2):
        _clip_and_step_both(ours, wrapper, theirs, their_opt, seed=step)
        _assert_same(ours, theirs, our_opt, their_opt)
    assert wrapper.steps == 2
    _nothing_left(our_opt)


def _state_of(optimizer: Any) -> dict[Any, dict[str, Any]]:
    return copy.deepcopy(optimizer.state_dict()["state"])


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_a_nonfinite_norm_skips_the_step_bit_for_bit(name: str) -> None:
    model = _model()
    optimizer = OPTIMIZERS[name](model.parameters())
    _backward(model)
    clip_and_step(optimizer, 1.0)  # some optimizer state to keep
    optimizer.zero_grad()
    params, state = [p.detach().clone() for p in model.parameters()], _state_of(optimizer)
    _backward(model)
    grad_of(next(iter(model.parameters())))[0] = math.nan
    grads = [grad_of(p).clone() for p in model.parameters()]
    assert math.isnan(float(clip_and_step(optimizer, 1.0)))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), params, strict=True))
    after = optimizer.state_dict()["state"]
    assert all(torch.equal(after[i][n], v) for i in state for n, v in state[i].items())
    for p, g in zip(model.parameters(), grads, strict=True):  # untouched, NaN included
        assert torch.equal(grad_of(p).nan_to_num(7.0), g.nan_to_num(7.0))
    _nothing_left(optimizer)


def test_a_skipped_first_fused_sgd_step_leaves_no_unset_momentum() -> None:
    """torch's fused SGD leaves its momentum buffers unset when its very first step is
    skipped through ``found_inf``; later steps then read garbage."""
    ours, our_opt, theirs, their_opt = _twins(FUSED["SGD-fused"])
    _backward(ours)
    grad_of(next(iter(ours.parameters())))[0] = math.inf
    clip_and_step(our_opt, 1.0)  # skipped
    assert not our_opt.state
    for step in range(3):
        for model in (ours, theirs):
            model.zero_grad()
            _backward(model, seed=step)
        clip_and_step(our_opt, 1.0)
        torch.nn.utils.clip_grad_norm_(theirs.parameters(), 1.0)
        their_opt.step()
        _assert_same(ours, theirs, our_opt, their_opt)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_a_ratio_beyond_float32_still_clips(name: str) -> None:
    """norm / max_norm above 3.4e38: 1 / coefficient overflows float32."""
    model = torch.nn.Linear(4, 1)
    reference = copy.deepcopy(model)
    for p in [*model.parameters(), *reference.parameters()]:
        p.grad = torch.full_like(p, 1e30)
    optimizer = OPTIMIZERS[name](model.parameters())
    theirs = OPTIMIZERS[name](reference.parameters())
    clip_and_step(optimizer, 1e-10)
    clip_grad_norm_(reference.parameters(), 1e-10)  # agclip's in-place clip: exact
    assert float(torch.nn.utils.get_total_norm([grad_of(p) for p in reference.parameters()])) == (
        pytest.approx(1e-10, rel=1e-5)
    )
    theirs.step()
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)


def test_error_if_nonfinite_raises_before_anything_changes() -> None:
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), fused=True)
    _backward(model)
    grad_of(model[3].weight)[0, 0] = math.inf
    params = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match=r"parameters\[4\]"):
        clip_and_step(optimizer, 1.0, error_if_nonfinite=True)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), params, strict=True))
    assert not optimizer.state
    _nothing_left(optimizer)


def _scaled_backward(model: Any, scaler: Any, step: int) -> None:
    generator = torch.Generator().manual_seed(step)
    x, y = torch.randn(16, 8, generator=generator), torch.randn(16, 4, generator=generator)
    scaler.scale(100 * torch.nn.functional.mse_loss(model(x), y)).backward()


@pytest.mark.parametrize("unscaled_first", [False, True], ids=["scaled", "unscaled-first"])
@pytest.mark.parametrize("name", ["AdamW-fused", "SGD-fused", "AdamW", "SGD"])
def test_grad_scaler_equals_torchs_recipe(name: str, unscaled_first: bool) -> None:
    ours, our_opt, theirs, their_opt = _twins(OPTIMIZERS[name])
    our_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    their_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for step in range(4):
        _scaled_backward(ours, our_scaler, step)
        _scaled_backward(theirs, their_scaler, step)
        if step == 2:  # an overflowing step: both scalers skip it and halve their scale
            grad_of(next(iter(ours.parameters())))[0] = math.inf
            grad_of(next(iter(theirs.parameters())))[0] = math.inf
        if unscaled_first:
            our_scaler.unscale_(our_opt)
        norm = clip_and_step(our_opt, 1.0, scaler=our_scaler)
        their_scaler.unscale_(their_opt)
        want = torch.nn.utils.clip_grad_norm_(theirs.parameters(), 1.0)
        their_scaler.step(their_opt)
        if step != 2:
            torch.testing.assert_close(norm, want, rtol=1e-5, atol=0)
        our_scaler.update()
        their_scaler.update()
        _assert_same(ours, theirs, our_opt, their_opt, tol=1e-5)
        _nothing_left(our_opt)
        our_opt.zero_grad()
        their_opt.zero_grad()
    assert float(our_scaler.get_scale()) == float(their_scaler.get_scale()) == 2.0**9


def test_clip_grad_norm_has_torchs_signature_plus_process_group() -> None:
    ours = inspect.signature(clip_grad_norm_).parameters
    theirs = inspect.signature(torch.nn.utils.clip_grad_norm_).parameters
    assert list(ours) == [*theirs, "process_group"]
    model = _model()
    _backward(model)
    for name in ("optimizer", "scaler"):
        gone: dict[str, Any] = {name: object()}  # the old hand-over keywords
        with pytest.raises(TypeError, match=name):
            clip_grad_norm_(model.parameters(), 1.0, **gone)


def test_the_callback_clips_and_steps_with_its_statistics() -> None:
    ours, our_opt, theirs, their_opt = _twins(FUSED["AdamW-fused"], grouped=True)
    callback = GradientClipCallback(max_norm=1.0)
    callback.set_model(ours)
    for step in range(3):
        _backward(ours, seed=step)
        _backward(theirs, seed=step)
        norm = callback.clip_and_step(our_opt)
        want = torch.nn.utils.clip_grad_norm_(_params_of(their_opt), 1.0)
        their_opt.step()
        torch.testing.assert_close(norm, want, rtol=1e-6, atol=0)
        _assert_same(ours, theirs, our_opt, their_opt)
    assert callback.steps == callback.clipped_steps == 3
    _nothing_left(our_opt)


def test_an_adaptive_rule_as_the_threshold() -> None:
    ours, our_opt, theirs, their_opt = _twins(FUSED["AdamW-fused"])
    mine, reference = ZClip(warmup_steps=2), ZClip(warmup_steps=2)
    for step in range(6):
        scale = 100.0 if step == 5 else 1.0 + 0.1 * step
        _backward(ours, seed=step, scale=scale)
        _backward(theirs, seed=step, scale=scale)
        norm = clip_and_step(our_opt, mine)
        torch.testing.assert_close(norm, reference.step(theirs), rtol=1e-6, atol=0)
        their_opt.step()
        _assert_same(ours, theirs, our_opt, their_opt)
        our_opt.zero_grad()
        their_opt.zero_grad()
    assert int(mine.spikes) == int(reference.spikes) == 1


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@needs_cuda
def test_cuda_fused_step_matches_torch_without_a_host_sync() -> None:
    torch.manual_seed(0)
    ours = _model().cuda()
    theirs = copy.deepcopy(ours)
    our_opt = torch.optim.AdamW(ours.parameters(), lr=1e-2, fused=True)
    their_opt = torch.optim.AdamW(theirs.parameters(), lr=1e-2, fused=True)
    x, y = torch.randn(16, 8, device="cuda"), torch.randn(16, 4, device="cuda")
    for model in (ours, theirs):
        (100 * torch.nn.functional.mse_loss(model(x), y)).backward()
    our_opt.step()  # the state exists: the checked call below allocates nothing new
    their_opt.step()
    for model in (ours, theirs):
        model.zero_grad()
        (100 * torch.nn.functional.mse_loss(model(x), y)).backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        clip_and_step(our_opt, 1.0)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.nn.utils.clip_grad_norm_(theirs.parameters(), 1.0)
    their_opt.step()
    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_accelerates_optimizer_steps_once_per_accumulation() -> None:
    """accelerate's ``AcceleratedOptimizer`` only steps when gradients are synced: the
    micro-steps in between clip nothing, the last one clips the accumulated gradients."""
    accelerate = pytest.importorskip("accelerate")
    accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=2)
    ours, theirs = _model(), _model()
    our_opt = torch.optim.AdamW(ours.parameters(), lr=1e-2, fused=True)
    their_opt = torch.optim.AdamW(theirs.parameters(), lr=1e-2, fused=True)
    ours, wrapped = accelerator.prepare(ours, our_opt)
    for step in range(4):
        with accelerator.accumulate(ours):
            _backward(ours, seed=step)
            clip_and_step(wrapped, 1.0)
        _backward(theirs, seed=step)
        if step % 2 == 1:  # the reference: clip the accumulated gradients, then step
            torch.nn.utils.clip_grad_norm_(theirs.parameters(), 1.0)
            their_opt.step()
            their_opt.zero_grad()
            wrapped.zero_grad()
    _assert_same(ours, theirs, our_opt, their_opt)
    _nothing_left(our_opt)


@pytest.mark.parametrize("name", ["AdamW-fused", "AdamW"])
def test_a_wrappers_own_grad_scaler_is_found(name: str) -> None:
    """accelerate's fp16 wrapper steps through its own GradScaler: the norm is the
    unscaled gradients', without passing the scaler."""
    accelerate = pytest.importorskip("accelerate")
    from accelerate.optimizer import AcceleratedOptimizer

    accelerate.Accelerator(cpu=True)
    ours, our_opt, theirs, their_opt = _twins(OPTIMIZERS[name])
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    wrapped = AcceleratedOptimizer(our_opt, device_placement=False, scaler=scaler)
    their_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for step in range(3):
        _scaled_backward(ours, scaler, step)
        _scaled_backward(theirs, their_scaler, step)
        norm = clip_and_step(wrapped, 1.0)  # the wrapper updates its scaler itself
        their_scaler.unscale_(their_opt)
        want = torch.nn.utils.clip_grad_norm_(theirs.parameters(), 1.0)
        their_scaler.step(their_opt)
        their_scaler.update()
        torch.testing.assert_close(norm, want, rtol=1e-5, atol=0)
        _assert_same(ours, theirs, our_opt, their_opt, tol=1e-5)
        wrapped.zero_grad()
        their_opt.zero_grad()
    _nothing_left(our_opt)


def test_an_infinite_max_norm_measures_only_like_torch() -> None:
    ours, our_opt, theirs, their_opt = _twins(OPTIMIZERS["AdamW-fused"])
    _backward(ours)
    _backward(theirs)
    want = torch.nn.utils.clip_grad_norm_(theirs.parameters(), math.inf)
    torch.testing.assert_close(clip_grad_norm_(ours.parameters(), math.inf), want)
    torch.testing.assert_close(clip_and_step(our_opt, math.inf), want)
    their_opt.step()
    _assert_same(ours, theirs, our_opt, their_opt)


# torch's own: dynamo tracing an optimizer's step meets a deprecated torch.jit helper
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("name", ["AdamW-fused", "SGD-fused", "AdamW"])
def test_a_compiled_caller_clips_and_skips_nonfinite_steps(name: str) -> None:
    """Inside ``torch.compile`` the fused step does not see a coefficient set just
    before it: the gradients are scaled first, and a NaN step is still skipped."""
    torch._dynamo.reset()
    ours, our_opt, theirs, their_opt = _twins(OPTIMIZERS[name])
    compiled = torch.compile(lambda: clip_and_step(our_opt, 1.0), backend="aot_eager")
    for step in range(3):
        _backward(ours, seed=step)
        _backward(theirs, seed=step)
        norm = compiled()
        torch.testing.assert_close(norm, torch.nn.utils.clip_grad_norm_(theirs.parameters(), 1.0))
        their_opt.step()
        _assert_same(ours, theirs, our_opt, their_opt, tol=1e-5)
        our_opt.zero_grad()
        their_opt.zero_grad()
    _backward(ours, seed=9)
    grad_of(next(ours.parameters()))[0] = math.nan
    params, state = copy.deepcopy(ours.state_dict()), copy.deepcopy(our_opt.state_dict())
    assert not math.isfinite(compiled())
    for key, value in params.items():  # the step was skipped: nothing moved
        torch.testing.assert_close(ours.state_dict()[key], value, rtol=0, atol=0)
    for index, values in state["state"].items():
        for field, value in values.items():
            torch.testing.assert_close(our_opt.state_dict()["state"][index][field], value)
    _nothing_left(our_opt)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_a_step_pre_hook_sees_the_clipped_gradients(name: str) -> None:
    """A hook that reads or edits the gradients before the step (logging, noise):
    with it, a fused step gets clipped gradients, not a coefficient to apply later."""
    ours, our_opt, theirs, their_opt = _twins(OPTIMIZERS[name])
    seen: dict[str, list[float]] = {"ours": [], "theirs": []}

    def hook_for(model: Any, key: str) -> Callable[..., None]:
        def hook(optimizer: Any, args: Any, kwargs: Any) -> None:
            grads = [grad_of(p) for p in model.parameters()]
            seen[key].append(float(torch.nn.utils.get_total_norm(grads)))
            torch._foreach_add_(grads, 1.0)

        return hook

    our_opt.register_step_pre_hook(hook_for(ours, "ours"))
    their_opt.register_step_pre_hook(hook_for(theirs, "theirs"))
    for step in range(2):
        _clip_and_step_both(ours, our_opt, theirs, their_opt, seed=step)
        _assert_same(ours, theirs, our_opt, their_opt, tol=1e-5)
    assert seen["ours"] == pytest.approx(seen["theirs"], rel=1e-5)
    assert seen["ours"][0] == pytest.approx(1.0, rel=1e-5)


@pytest.mark.parametrize("make", ["SGD", "AdamW"])
def test_a_group_that_is_not_fused_takes_the_clipped_gradients(make: str) -> None:
    """A fused optimizer with one group ``fused=False``: that group's step would
    refuse a coefficient, so the gradients are scaled first."""
    optimizer = getattr(torch.optim, make)

    def build(params: list[Any]) -> Any:
        groups = [{"params": params[:4], "fused": False}, {"params": params[4:]}]
        return optimizer(groups, lr=1e-2, fused=True)

    ours, our_opt, theirs, their_opt = _twins(build)
    for step in range(2):
        _clip_and_step_both(ours, our_opt, theirs, their_opt, seed=step)
        _assert_same(ours, theirs, our_opt, their_opt)
        _nothing_left(our_opt)


def test_a_step_without_a_signature_to_read_is_stepped() -> None:
    """A step whose signature cannot be read (a builtin) is not refused: the
    gradients are clipped and it is called."""
    ours, our_opt, theirs, their_opt = _twins(OPTIMIZERS["SGD"])
    real_step = our_opt.step
    setattr(our_opt, "step", dict)  # noqa: B010  (no signature: inspect raises ValueError)
    _backward(ours)
    _backward(theirs)
    clip_and_step(our_opt, 1.0)  # clips, then calls dict()
    setattr(our_opt, "step", real_step)  # noqa: B010
    our_opt.step()  # the step on the clipped gradients
    torch.nn.utils.clip_grad_norm_(theirs.parameters(), 1.0)
    their_opt.step()
    _assert_same(ours, theirs, our_opt, their_opt)


class _StepNeedsAFunction(torch.optim.SGD):
    def step(self, fn: Any) -> Any:  # type: ignore[override]
        return super().step(fn)


class _WrapperNeedingAFunction(Wrapper):
    def step(self, fn: Any) -> None:  # type: ignore[override]
        self.optimizer.step()


def _lbfgs(params: Any) -> Any:
    return torch.optim.LBFGS(params)


def _step_replaced(params: Any) -> Any:
    optimizer = torch.optim.SGD(params, lr=0.1)

    def step(closure: Any) -> None:
        """A step replaced on the instance, needing its closure."""

    setattr(optimizer, "step", step)  # noqa: B010  (mypy refuses an assignment to a method)
    return optimizer


@pytest.mark.parametrize(
    "make",
    [
        _lbfgs,
        lambda ps: _StepNeedsAFunction(ps, lr=0.1),
        _step_replaced,
        lambda ps: _WrapperNeedingAFunction(torch.optim.SGD(ps, lr=0.1)),
    ],
    ids=["LBFGS", "step(fn)", "instance step(closure)", "wrapper step(fn)"],
)
def test_an_optimizer_whose_step_needs_a_closure_is_refused_before_clipping(
    make: Callable[[Any], Any],
) -> None:
    model = _model()
    optimizer = make(model.parameters())
    _backward(model)
    before = [grad_of(p).clone() for p in model.parameters()]
    for _ in range(2):  # the second call is answered from the step's remembered signature
        with pytest.raises(TypeError, match="closure"):
            clip_and_step(optimizer, 1.0)
    for p, grad in zip(model.parameters(), before, strict=True):
        assert torch.equal(grad_of(p), grad)


def test_a_per_tensor_rule_keys_its_state_by_the_optimizers_names() -> None:
    """AdaGC keeps one threshold per tensor: through ``clip_and_step`` they are
    keyed by the names the optimizer holds, so rebuilding it with its groups in
    another order keeps each tensor's threshold; without names it is refused."""
    model, reference = _model(), _model()
    rule, their_rule = AdaGC(warmup_steps=2), AdaGC(warmup_steps=2)
    named = list(model.named_parameters())
    optimizer = torch.optim.SGD(named, lr=0.0)
    for step in range(3):
        _backward(model, seed=step)
        _backward(reference, seed=step)
        norm = clip_and_step(optimizer, rule)
        torch.testing.assert_close(norm, their_rule.step(reference))
    assert [key.split()[0] for key in rule.state.gamma] == [name for name, _ in named]
    rebuilt = torch.optim.SGD(
        [{"params": named[2:]}, {"params": list(reversed(named[:2]))}], lr=0.0
    )
    _backward(model, seed=5, scale=1e4)  # a spike: every tensor clipped by its own threshold
    _backward(reference, seed=5, scale=1e4)
    clip_and_step(rebuilt, rule)
    their_rule.step(reference)
    for ours, theirs in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(grad_of(ours), grad_of(theirs), rtol=1e-5, atol=0)
    before = [grad_of(p).clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="named_parameters"):
        clip_and_step(torch.optim.SGD(model.parameters(), lr=0.0), rule)
    clashing = [{"params": list(module.named_parameters())} for module in (model[1], model[3])]
    with pytest.raises(ValueError, match="'weight'"):  # two submodules: local names clash
        clip_and_step(torch.optim.SGD(clashing, lr=0.0), rule)
    assert all(torch.equal(grad_of(p), g) for p, g in zip(model.parameters(), before, strict=True))


def test_nonfinite_steps_are_skipped_not_counted_as_clipped() -> None:
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    callback = GradientClipCallback(max_norm=1e9, warn_nonfinite=False)
    callback.set_model(model)
    for step, bad in enumerate([None, math.inf, math.nan, None]):
        optimizer.zero_grad()
        _backward(model, seed=step)
        if bad is not None:
            grad_of(next(model.parameters()))[0] = bad
        callback.clip_and_step(optimizer)
    assert (callback.steps, callback.clipped_steps) == (4, 0)


def test_accelerates_micro_steps_are_not_counted_by_the_callback() -> None:
    accelerate = pytest.importorskip("accelerate")
    accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=4)
    model = _model()
    model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.0))
    callback = GradientClipCallback(max_norm=1.0)
    callback.set_model(model)
    for step in range(8):
        with accelerator.accumulate(model):
            _backward(model, seed=step)
            callback.clip_and_step(optimizer)
            optimizer.zero_grad()
    assert (callback.steps, callback.clipped_steps) == (2, 2)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_an_optimizer_with_an_lr_scheduler_is_clipped_and_stepped(name: str) -> None:
    """An LR scheduler wraps ``optimizer.step`` on the instance (to count its calls):
    the step still needs no argument, and is judged as the class's own."""
    ours, our_opt, theirs, their_opt = _twins(OPTIMIZERS[name])
    schedulers = [torch.optim.lr_scheduler.StepLR(opt, 1) for opt in (our_opt, their_opt)]
    for seed in range(2):
        _backward(ours, seed)
        _backward(theirs, seed)
        clip_and_step(our_opt, 1.0)
        torch.nn.utils.clip_grad_norm_(theirs.parameters(), 1.0)
        their_opt.step()
        for scheduler in schedulers:
            scheduler.step()
    _assert_same(ours, theirs, our_opt, their_opt)
    lbfgs = torch.optim.LBFGS(ours.parameters())
    torch.optim.lr_scheduler.StepLR(lbfgs, 1)
    with pytest.raises(TypeError, match="closure"):
        clip_and_step(lbfgs, 1.0)


@pytest.mark.parametrize("name", list(FUSED))
def test_a_parameter_listed_twice_is_clipped_once_by_a_fused_step(name: str) -> None:
    """A fused step divides each listed gradient by ``grad_scale``: a parameter listed
    twice in a group (torch warns, and allows it) is scaled here instead."""
    ours, theirs = (torch.nn.Parameter(torch.tensor([1.0, 2.0])) for _ in range(2))
    with pytest.warns(UserWarning, match="duplicate"):
        our_opt, their_opt = (OPTIMIZERS[name]([p, p]) for p in (ours, theirs))
    for p in (ours, theirs):
        p.grad = torch.tensor([3.0, 4.0])
    clip_and_step(our_opt, 1.0)
    torch.nn.utils.clip_grad_norm_([theirs], 1.0)
    their_opt.step()
    torch.testing.assert_close(ours.grad, theirs.grad)
    torch.testing.assert_close(ours, theirs)


def test_huge_finite_gradients_are_clipped_not_zeroed() -> None:
    """Ten float32 values of 1e38 have a finite norm (3.2e38); clipped to 1e-10, the
    factor (3e-49) is below float32's range, and the clipped values (3.2e-11) are not."""
    param = torch.nn.Parameter(torch.zeros(10))
    param.grad = torch.full((10,), 1e38)
    norm = clip_grad_norm_([param], 1e-10)
    assert float(norm) == pytest.approx(10**0.5 * 1e38, rel=1e-6)
    torch.testing.assert_close(param.grad, torch.full((10,), 1e-10 / 10**0.5), rtol=1e-6, atol=0)
