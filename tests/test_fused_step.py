"""``clip_grad_norm_(..., optimizer=)``: the coefficient applied inside a fused optimizer
step (``fused=True``), equal to torch's clip then the same step; a non-finite norm
skips the step; nothing leaks into a later step; GradScaler composes."""

from __future__ import annotations

import copy
import math
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    import torch
else:
    torch = pytest.importorskip("torch")

from support import grad_of

from agclip.backends.torch import GradientClipCallback, clip_grad_norm_

FUSED = [
    lambda ps: torch.optim.AdamW(ps, lr=1e-2, fused=True),
    lambda ps: torch.optim.Adam(ps, lr=1e-2, fused=True),
    lambda ps: torch.optim.SGD(ps, lr=1e-1, momentum=0.9, fused=True),
]


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))


def _backward(model: torch.nn.Module, seed: int = 1, scale: float = 100.0) -> None:
    generator = torch.Generator().manual_seed(seed)
    x, y = torch.randn(16, 8, generator=generator), torch.randn(16, 4, generator=generator)
    (scale * torch.nn.functional.mse_loss(model(x), y)).backward()


def _twins(make: Any) -> tuple[Any, Any, Any, Any]:
    ours, theirs = _model(), _model()
    return ours, make(list(ours.parameters())), theirs, make(list(theirs.parameters()))


@pytest.mark.parametrize("make", FUSED, ids=["AdamW", "Adam", "SGD"])
def test_fused_step_equals_torchs_clip_then_step(make: Any) -> None:
    ours, our_opt, theirs, their_opt = _twins(make)
    for step in range(3):
        _backward(ours, seed=step)
        _backward(theirs, seed=step)
        norm = clip_grad_norm_(ours.parameters(), 1.0, optimizer=our_opt)
        want = torch.nn.utils.clip_grad_norm_(theirs.parameters(), 1.0)
        torch.testing.assert_close(norm, want, rtol=1e-6, atol=0)
        our_opt.step()
        their_opt.step()
        for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
            # after the step the gradients hold the clipped values, as after a plain clip
            torch.testing.assert_close(grad_of(a), grad_of(b), rtol=1e-6, atol=1e-7)
        our_opt.zero_grad()
        their_opt.zero_grad()
        assert not hasattr(our_opt, "grad_scale")  # consumed by the step


def test_the_gradients_are_untouched_until_the_step() -> None:
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), fused=True)
    _backward(model)
    before = [grad_of(p).clone() for p in model.parameters()]
    clip_grad_norm_(model.parameters(), 1.0, optimizer=optimizer)
    for p, b in zip(model.parameters(), before, strict=True):
        assert torch.equal(grad_of(p), b)


def test_a_nonfinite_norm_skips_the_step_bit_for_bit() -> None:
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    _backward(model)
    optimizer.step()  # some optimizer state to keep
    optimizer.zero_grad()
    params = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(optimizer.state_dict())
    _backward(model)
    grad_of(next(iter(model.parameters())))[0, 0] = math.nan
    norm = clip_grad_norm_(model.parameters(), 1.0, optimizer=optimizer)
    assert math.isnan(float(norm))
    optimizer.step()
    for a, b in zip(model.parameters(), params, strict=True):
        assert torch.equal(a, b)
    after = optimizer.state_dict()["state"]
    for key, value in state["state"].items():
        for name, tensor in value.items():
            assert torch.equal(after[key][name], tensor), name


def test_a_pending_coefficient_never_reaches_a_later_step() -> None:
    ours, our_opt, theirs, their_opt = _twins(FUSED[0])
    _backward(ours, seed=5)
    clip_grad_norm_(ours.parameters(), 1e-3, optimizer=our_opt)  # pending, never stepped
    our_opt.zero_grad()  # new gradients: the clip above no longer applies
    _backward(ours, seed=6)
    _backward(theirs, seed=6)
    our_opt.step()
    their_opt.step()  # no clip at all
    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_a_second_clip_replaces_the_first() -> None:
    ours, our_opt, theirs, their_opt = _twins(FUSED[0])
    _backward(ours)
    _backward(theirs)
    clip_grad_norm_(ours.parameters(), 1e-3, optimizer=our_opt)
    clip_grad_norm_(ours.parameters(), 1.0, optimizer=our_opt)
    torch.nn.utils.clip_grad_norm_(theirs.parameters(), 1.0)
    our_opt.step()
    their_opt.step()
    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_on_cpu_a_clip_with_nothing_to_scale_hands_nothing_over() -> None:
    """The fused CPU kernel writes every gradient back when it has a scale: with
    nothing to clip, agclip leaves the step alone (and drops an earlier pending clip)."""
    ours, our_opt, theirs, their_opt = _twins(FUSED[0])
    _backward(ours, scale=1.0)
    _backward(theirs, scale=1.0)
    clip_grad_norm_(ours.parameters(), 1e-3, optimizer=our_opt)  # pending ...
    clip_grad_norm_(ours.parameters(), 1e6, optimizer=our_opt)  # ... replaced: nothing to clip
    assert not hasattr(our_opt, "grad_scale")
    assert not hasattr(our_opt, "found_inf")
    our_opt.step()
    their_opt.step()
    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        assert torch.equal(a, b)


def test_other_optimizers_get_the_gradients_scaled_here() -> None:
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters())  # not fused
    _backward(model)
    clip_grad_norm_(model.parameters(), 1.0, optimizer=optimizer)
    assert not hasattr(optimizer, "grad_scale")
    total = torch.nn.utils.get_total_norm([grad_of(p) for p in model.parameters()])
    assert float(total) == pytest.approx(1.0, rel=1e-5)


def test_grad_scaler_and_the_clip_combine_into_one_scale() -> None:
    ours, our_opt, theirs, their_opt = _twins(FUSED[0])
    our_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    their_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for step in range(3):
        for model, scaler in ((ours, our_scaler), (theirs, their_scaler)):
            generator = torch.Generator().manual_seed(step)
            x, y = torch.randn(16, 8, generator=generator), torch.randn(16, 4, generator=generator)
            scaler.scale(100 * torch.nn.functional.mse_loss(model(x), y)).backward()
        norm = clip_grad_norm_(ours.parameters(), 1.0, optimizer=our_opt, scaler=our_scaler)
        their_scaler.unscale_(their_opt)
        want = torch.nn.utils.clip_grad_norm_(theirs.parameters(), 1.0)
        torch.testing.assert_close(norm.float(), want, rtol=1e-5, atol=0)
        our_scaler.step(our_opt)
        their_scaler.step(their_opt)
        our_scaler.update()
        their_scaler.update()
        our_opt.zero_grad()
        their_opt.zero_grad()
        for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert float(our_scaler.get_scale()) == float(their_scaler.get_scale())


def test_the_callback_hands_its_clip_to_a_fused_step() -> None:
    ours, our_opt, theirs, their_opt = _twins(FUSED[0])
    callback = GradientClipCallback(max_norm=1.0, optimizer=our_opt)
    callback.set_model(ours)
    _backward(ours)
    _backward(theirs)
    callback.on_after_backward()
    torch.nn.utils.clip_grad_norm_(theirs.parameters(), 1.0)
    our_opt.step()
    their_opt.step()
    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert callback.clipped_steps == 1


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
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        clip_grad_norm_(ours.parameters(), 1.0, optimizer=our_opt)
        our_opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.nn.utils.clip_grad_norm_(theirs.parameters(), 1.0)
    their_opt.step()
    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
