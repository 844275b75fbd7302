"""A clip that cannot have done its job says so (``ClipPlacementWarning``): before
``backward()`` (nothing has a gradient), twice on the same gradients, inside DDP's
``no_sync()`` (tests/distributed_worker.py). And nothing fires where the clip is
right: the suite runs with warnings as errors, so every loop below is a check."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    import torch
else:
    torch = pytest.importorskip("torch")

from agclip.backends.torch import (
    AdaGC,
    ClipPlacementWarning,
    GradientClipCallback,
    ZClip,
    adaptive_clip_grad_,
    clip_and_step,
    clip_grad_norm_,
    get_total_norm,
)


def _model() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def _loss(model: torch.nn.Module, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    x, y = torch.randn(8, 4, generator=generator), torch.randn(8, 1, generator=generator)
    return 100 * torch.nn.functional.mse_loss(model(x), y)


def _grads(model: torch.nn.Module) -> list[Any]:
    return [p.grad for p in model.parameters()]


CLIPS: dict[str, Callable[[torch.nn.Module, Any], Any]] = {
    "clip_grad_norm_": lambda model, opt: clip_grad_norm_(model.parameters(), 1.0),
    "get_total_norm": lambda model, opt: get_total_norm(_grads(model)),
    "clip_and_step": lambda model, opt: clip_and_step(opt, 1.0),
    "ZClip.step": lambda model, opt: ZClip().step(model),
    "adaptive_clip_grad_": lambda model, opt: adaptive_clip_grad_(model.parameters(), 0.01),
}


@pytest.mark.parametrize("name", list(CLIPS))
def test_a_clip_before_backward_warns_at_the_callers_line(name: str) -> None:
    """nano-world-model#22 in miniature: the clip inside ``training_step``, before
    ``backward()``: every ``.grad`` is None (Lightning zeroes them to None first)."""
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(ClipPlacementWarning, match=r"before backward\(\)") as caught:
        CLIPS[name](model, optimizer)
    assert caught[0].filename == __file__  # points at the caller, not into agclip


def test_the_callback_warns_before_backward() -> None:
    model = _model()
    callback = GradientClipCallback(1.0)
    callback.set_model(model)
    with pytest.warns(ClipPlacementWarning, match="before backward"):
        callback.on_after_backward()


def test_an_empty_parameter_list_and_a_pipeline_rank_stay_silent() -> None:
    assert float(clip_grad_norm_([], 1.0)) == 0.0  # torch's own behaviour, no warning
    with pytest.warns(UserWarning, match="empty generator"):  # torch's own warning
        clip_grad_norm_(torch.nn.Sequential().parameters(), 1.0)


def test_clipping_the_same_gradients_twice_warns() -> None:
    """Two clips of one step's gradients (a clip in a hook and another in the loop,
    or a loop that clips again without a new backward)."""
    model = _model()
    callback = GradientClipCallback(1.0)
    callback.set_model(model)
    _loss(model).backward()
    callback.on_after_backward()
    with pytest.warns(ClipPlacementWarning, match="gradients the last clip left"):
        callback.on_after_backward()
    with pytest.warns(ClipPlacementWarning, match="gradients the last clip left"):
        callback.on_after_backward()  # nothing to clip the second time: still the same


def _train(
    clip: Callable[[Any, Any], Any],
    *,
    max_norm: Any = 1.0,
    accumulate: int = 1,
    frozen: bool = False,
    set_to_none: bool = True,
) -> None:
    model = _model()
    if frozen:
        model[0].requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.01)
    callback = GradientClipCallback(max_norm)
    callback.set_model(model)
    for step in range(6):
        optimizer.zero_grad(set_to_none=set_to_none)
        for micro in range(accumulate):
            (_loss(model, seed=step * accumulate + micro) / accumulate).backward()
        clip(callback, optimizer)
    assert callback.steps == 6


RIGHT: dict[str, tuple[Callable[[Any, Any], Any], Callable[[], Any]]] = {
    "callback then step": (lambda cb, opt: (cb.on_after_backward(), opt.step()), lambda: 1.0),
    "callback clip_and_step": (lambda cb, opt: cb.clip_and_step(opt), lambda: 1.0),
    "rule in the callback": (lambda cb, opt: cb.clip_and_step(opt), lambda: ZClip(warmup_steps=2)),
}


@pytest.mark.parametrize("set_to_none", [True, False], ids=["set_to_none", "zeroed"])
@pytest.mark.parametrize("frozen", [False, True], ids=["all", "frozen-layer"])
@pytest.mark.parametrize("accumulate", [1, 3])
@pytest.mark.parametrize("name", list(RIGHT))
def test_no_false_alarm_where_the_clip_is_right(
    name: str, accumulate: int, frozen: bool, set_to_none: bool
) -> None:
    clip, max_norm = RIGHT[name]
    _train(clip, max_norm=max_norm(), accumulate=accumulate, frozen=frozen, set_to_none=set_to_none)


def test_no_false_alarm_with_a_grad_scaler() -> None:
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    callback = GradientClipCallback(1.0, warn_nonfinite=False)
    callback.set_model(model)
    for step in range(4):
        optimizer.zero_grad()
        scaler.scale(_loss(model, seed=step)).backward()
        if step % 2:
            scaler.unscale_(optimizer)
            callback.on_after_backward()
            scaler.step(optimizer)
        else:
            callback.clip_and_step(optimizer, scaler=scaler)
        scaler.update()


def test_no_false_alarm_with_an_adaptive_rule_and_a_compiled_step() -> None:
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    callback = GradientClipCallback(AdaGC(warmup_steps=2), warn_nonfinite=False)
    callback.set_model(model)

    @torch.compile(backend="aot_eager")
    def clip() -> torch.Tensor:
        return callback.on_after_backward()

    for step in range(4):
        optimizer.zero_grad()
        _loss(model, seed=step).backward()
        clip()
        optimizer.step()
