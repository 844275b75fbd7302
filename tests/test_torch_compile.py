"""The PyTorch drop-ins under ``torch.compile(fullgraph=True)``: no graph break (as
torch's own ``clip_grad_norm_``), and the compiled results equal the eager ones, the
range guard's fallback (huge gradients) and non-finite gradients included. The
adaptive rules' ``step`` compiles whole too."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    import torch
else:
    torch = pytest.importorskip("torch")

from support import grad_of

from agclip.backends import torch as agt


def _grads(scale: float, dtype: Any = None, poison: float | None = None) -> list[Any]:
    generator = torch.Generator().manual_seed(0)
    params = []
    for shape in [(300, 200), (17,), (5, 5, 5)]:
        param = torch.nn.Parameter(torch.zeros(shape, dtype=dtype or torch.float32))
        grad = (torch.randn(shape, generator=generator) * scale).to(param.dtype)
        if poison is not None and len(shape) == 1:
            grad[3] = poison
        param.grad = grad
        params.append(param)
    return params


DROP_INS: dict[str, Callable[[list[Any], float], Any]] = {
    "clip_grad_norm_": lambda ps, p: agt.clip_grad_norm_(ps, 1.0, norm_type=p),
    "get_total_norm": lambda ps, p: agt.get_total_norm([x.grad for x in ps], norm_type=p),
    "clip_grads_with_norm_": lambda ps, p: agt.clip_grads_with_norm_(ps, 1.0, torch.tensor(7.0)),
    "clip_grad_value_": lambda ps, p: agt.clip_grad_value_(ps, 0.1),
}
CASES: dict[str, dict[str, Any]] = {
    "plain": {"scale": 1.0},
    "huge": {"scale": 1e20},  # squares overflow float32: the guard's fallback branch
    "float16": {"scale": 1e3, "dtype": "float16"},
    "nan": {"scale": 1.0, "poison": math.nan},
}


@pytest.mark.parametrize("name", list(DROP_INS))
def test_the_drop_ins_have_no_graph_break(name: str) -> None:
    params = _grads(1.0)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(lambda: DROP_INS[name](params, 2.0))()
    assert explained.graph_break_count == 0, explained.break_reasons


@pytest.mark.parametrize("p", [2.0, 1.0, math.inf, 3.0])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("name", list(DROP_INS))
def test_compiled_results_equal_eager(name: str, case: str, p: float) -> None:
    options = dict(CASES[case])
    dtype = getattr(torch, options.pop("dtype", "float32"))
    eager, compiled = _grads(dtype=dtype, **options), _grads(dtype=dtype, **options)
    want = DROP_INS[name](eager, p)
    torch._dynamo.reset()
    got = torch.compile(DROP_INS[name], fullgraph=True, backend="aot_eager")(compiled, p)
    if want is not None:
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0, equal_nan=True)
    for a, b in zip(compiled, eager, strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=0, equal_nan=True)


THRESHOLDED: dict[str, Callable[[list[Any], float], Any]] = {
    "clip_grad_norm_": agt.clip_grad_norm_,
    "clip_grads_with_norm_": lambda ps, t: agt.clip_grads_with_norm_(ps, t, torch.tensor(7.0)),
    "clip_grad_value_": agt.clip_grad_value_,
}


@pytest.mark.parametrize("name", list(THRESHOLDED))
def test_a_compiled_clip_takes_a_new_python_float_each_call(name: str) -> None:
    """From its second value on, dynamo passes a Python float argument as a symbolic
    float: the threshold's checks must trace it, and the results follow each value."""
    torch._dynamo.reset()
    compiled = torch.compile(THRESHOLDED[name], fullgraph=True, backend="aot_eager")
    for value in (1.0, 0.5, 0.25, 3.0):
        eager, ours = _grads(1.0), _grads(1.0)
        want, got = THRESHOLDED[name](eager, value), compiled(ours, value)
        if want is not None:
            torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
        for a, b in zip(ours, eager, strict=True):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=0)


@pytest.mark.parametrize("make", [agt.ZClip, agt.AutoClip, agt.AdaGC])
def test_the_rules_step_compiles_whole(make: Callable[[], Any]) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
    model(torch.randn(16, 8)).pow(2).sum().backward()
    rule = make()
    rule.step(model)  # the state exists
    torch._dynamo.reset()
    explained = torch._dynamo.explain(lambda: rule.step(model))()
    assert explained.graph_break_count == 0, explained.break_reasons


def test_the_callback_compiles_whole_without_its_host_check() -> None:
    """The non-finite warning reads a flag on the host (a graph break); without it the
    callback's step is one graph."""
    model = torch.nn.Linear(8, 4)
    model(torch.randn(16, 8)).pow(2).sum().backward()
    callback = agt.GradientClipCallback(1.0, warn_nonfinite=False)
    callback.set_model(model)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(callback.on_after_backward)()
    assert explained.graph_break_count == 0, explained.break_reasons


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_graphs_capture_the_clip() -> None:
    """``mode="reduce-overhead"`` replays the step as a CUDA graph: the clip must hold
    no host read, and the replays must equal eager steps."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Tanh(), torch.nn.Linear(256, 8))
    model = model.cuda()
    params = list(model.parameters())
    x, y = torch.randn(32, 64, device="cuda"), torch.randn(32, 8, device="cuda")

    def step() -> Any:
        model.zero_grad(set_to_none=False)
        (100 * torch.nn.functional.mse_loss(model(x), y)).backward()
        return agt.clip_grad_norm_(params, 1.0)

    compiled = torch.compile(step, mode="reduce-overhead")
    for _ in range(3):
        got = compiled()
        grads = [grad_of(p).clone() for p in params]
        want = step()
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
        for p, g in zip(params, grads, strict=True):
            torch.testing.assert_close(g, p.grad, rtol=1e-6, atol=1e-9)


def test_a_compiled_clip_before_backward_returns_zero_without_a_graph_break() -> None:
    """The placement warning stays out of the graph: compiled, the clip is silent."""
    params = [torch.nn.Parameter(torch.zeros(3))]
    torch._dynamo.reset()
    explained = torch._dynamo.explain(lambda: agt.clip_grad_norm_(params, 1.0))()
    assert explained.graph_break_count == 0, explained.break_reasons
    torch._dynamo.reset()
    compiled = torch.compile(
        lambda: agt.clip_grad_norm_(params, 1.0), fullgraph=True, backend="aot_eager"
    )
    assert float(compiled()) == 0.0
