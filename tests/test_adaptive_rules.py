"""Adaptive clipping rules (ZClip, AutoClip, AdaGC): a float64 reference of each rule on
every backend, the zclip package and the AutoClip paper's rule as references, the
robustness the references lack, jit compile-once, torch's meta device (no host
reads), checkpoints, the callback and optax composition."""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from support import Backend

import agclip

# -- float64 references of the rules ------------------------------------------------


class ZClipReference:
    """The zclip package's rules in float64, with agclip's one change: a non-finite
    norm is skipped (the gradients pass, the statistics stay)."""

    def __init__(
        self,
        alpha: float = 0.97,
        z_thresh: float = 2.5,
        max_grad_norm: float | None = None,
        eps: float = 1e-6,
        warmup_steps: int = 25,
        mode: str = "zscore",
        clip_option: str = "adaptive_scaling",
        clip_factor: float = 1.0,
        skip_update_on_spike: bool = False,
    ):
        self.alpha, self.z_thresh, self.cap, self.eps = alpha, z_thresh, max_grad_norm, eps
        self.warmup, self.mode, self.option = warmup_steps, mode, clip_option
        self.factor, self.skip = clip_factor, skip_update_on_spike
        self.buffer: list[float] = []
        self.mean = self.var = 0.0
        self.ready = False

    def threshold(self, norm: float) -> float:
        if not math.isfinite(norm):
            return math.inf
        cap = math.inf if self.cap is None else self.cap
        if not self.ready:
            self.buffer.append(norm)
            if len(self.buffer) >= self.warmup:
                self.mean = sum(self.buffer) / len(self.buffer)
                self.var = sum((x - self.mean) ** 2 for x in self.buffer) / len(self.buffer)
                self.ready = True
            return cap
        std = self.var**0.5
        clip: float | None = None
        if self.mode == "percentile":
            if norm > self.mean + self.z_thresh * std:
                clip = self.mean + self.z_thresh * std
        else:
            z = (norm - self.mean) / (std + self.eps)
            if z > self.z_thresh:
                adaptive = (self.mean + self.z_thresh * std / (z / self.z_thresh)) * self.factor
                clip = self.mean if self.option == "mean" else adaptive
        if not (clip is not None and self.skip):
            seen = norm if clip is None else clip
            self.mean = self.alpha * self.mean + (1 - self.alpha) * seen
            self.var = self.alpha * self.var + (1 - self.alpha) * (seen - self.mean) ** 2
        return min(math.inf if clip is None else clip, cap)


class AutoClipReference:
    """Seetharaman et al.'s rule: the percentile of every norm so far (or the last N)."""

    def __init__(self, percentile: float = 10, history: int | None = None):
        self.percentile, self.history, self.norms = percentile, history, list[float]()

    def threshold(self, norm: float) -> float:
        if not math.isfinite(norm):
            return math.inf
        self.norms.append(norm)
        kept = self.norms[-self.history :] if self.history else self.norms
        return float(np.percentile(kept, self.percentile))


class AdaGCReference:
    """Wang et al.'s per-tensor rule (kozistr's reading), warm-up over ``warmup_steps``."""

    def __init__(
        self,
        lambda_abs: float = 1.0,
        lambda_rel: float = 1.05,
        beta: float = 0.98,
        warmup_steps: int = 100,
        eps: float = 1e-6,
    ):
        self.abs, self.rel, self.beta, self.warmup, self.eps = (
            lambda_abs,
            lambda_rel,
            beta,
            warmup_steps,
            eps,
        )
        self.count = 0
        self.gamma: list[float] = []

    def factors(self, norms: list[float]) -> list[float]:
        total = math.sqrt(sum(n * n for n in norms))
        if not math.isfinite(total):
            return [1.0] * len(norms)
        self.gamma = self.gamma or [0.0] * len(norms)
        warm = self.count < self.warmup
        out = []
        for i, norm in enumerate(norms):
            gamma = self.gamma[i]
            if warm:
                factor = min(1.0, self.abs / max(total + self.eps, 1e-300))
                clipped = factor * norm
                self.gamma[i] = clipped if gamma == 0 else min(gamma, clipped)
            elif gamma == 0:  # never saw a nonzero gradient: not clipped
                factor, self.gamma[i] = 1.0, norm
            else:
                factor = min(1.0, self.rel * gamma / (norm + self.eps))
                self.gamma[i] = self.beta * gamma + (1 - self.beta) * factor * norm
            out.append(factor)
        self.count += 1
        return out


def coefficient(norm: float, threshold: float) -> float:
    if not math.isfinite(norm):
        return 1.0
    return min(1.0, threshold / (norm + 1e-6))


def sequence(steps: int, seed: int = 0) -> list[list[np.ndarray]]:
    """Gradients of two tensors with spikes (x30) and one NaN step, float32 values."""
    rng = np.random.default_rng(seed)
    out = []
    for step in range(steps):
        scale = 30.0 if step in (6, 10) else 1.0 + 0.2 * rng.random()
        grads = [rng.standard_normal((3, 4)) * scale, rng.standard_normal(5) * scale * 0.5]
        if step == 8:
            grads[1][2] = np.nan
        out.append([g.astype(np.float32).astype(np.float64) for g in grads])
    return out


def global_reference(ref: Any) -> Callable[[list[np.ndarray]], tuple[list[np.ndarray], float]]:
    def step(grads: list[np.ndarray]) -> tuple[list[np.ndarray], float]:
        norm = math.sqrt(sum(float(np.sum(g * g)) for g in grads))
        factor = coefficient(norm, ref.threshold(norm))
        return [g * factor for g in grads], norm

    return step


def adagc_reference(ref: AdaGCReference) -> Callable[[list[np.ndarray]], Any]:
    def step(grads: list[np.ndarray]) -> tuple[list[np.ndarray], float]:
        norms = [math.sqrt(float(np.sum(g * g))) for g in grads]
        factors = ref.factors(norms)
        return [g * f for g, f in zip(grads, factors, strict=True)], math.sqrt(
            sum(n * n for n in norms)
        )

    return step


RULES: dict[str, tuple[Any, Any, dict[str, Any], Callable[[], Any]]] = {
    "zclip": (
        agclip.zclip_init,
        agclip.zclip,
        {"warmup_steps": 3, "z_thresh": 2.0},
        lambda: global_reference(ZClipReference(warmup_steps=3, z_thresh=2.0)),
    ),
    "zclip_mean_capped": (
        agclip.zclip_init,
        agclip.zclip,
        {"warmup_steps": 3, "clip_option": "mean", "max_grad_norm": 20.0},
        lambda: global_reference(
            ZClipReference(warmup_steps=3, clip_option="mean", max_grad_norm=20.0)
        ),
    ),
    "zclip_percentile": (
        agclip.zclip_init,
        agclip.zclip,
        {"warmup_steps": 3, "mode": "percentile", "skip_update_on_spike": True},
        lambda: global_reference(
            ZClipReference(warmup_steps=3, mode="percentile", skip_update_on_spike=True)
        ),
    ),
    "autoclip": (
        lambda g: agclip.autoclip_init(g, history=5),
        agclip.autoclip,
        {"percentile": 25},
        lambda: global_reference(AutoClipReference(25, history=5)),
    ),
    "adagc": (
        agclip.adagc_init,
        agclip.adagc,
        {"warmup_steps": 3, "lambda_abs": 5.0},
        lambda: adagc_reference(AdaGCReference(lambda_abs=5.0, warmup_steps=3)),
    ),
}


@pytest.mark.parametrize("rule", list(RULES))
def test_every_rule_matches_its_float64_reference_on_every_backend(
    backend: Backend, rule: str
) -> None:
    init, step, options, make_reference = RULES[rule]
    reference = make_reference()
    steps = sequence(12)
    state = init([backend.asarray(g) for g in steps[0]])
    for index, grads in enumerate(steps):
        want, want_norm = reference(grads)
        clipped, state = backend.call(step, [backend.asarray(g) for g in grads], state, **options)
        got_norm = float(backend.to_numpy(state.norm))
        if math.isfinite(want_norm):
            assert got_norm == pytest.approx(want_norm, rel=1e-6), index
        else:
            assert not math.isfinite(got_norm), index
        for got, expected in zip(clipped, want, strict=True):
            np.testing.assert_allclose(
                backend.to_numpy(got), expected, rtol=3e-6, atol=1e-7, err_msg=f"step {index}"
            )
    assert int(backend.to_numpy(state.nonfinite)) == 1
    assert int(backend.to_numpy(state.spikes)) >= 1


def test_adagc_with_the_inf_norm_matches_its_reference() -> None:
    """Each tensor's norm is its largest value, the total the largest of those."""
    reference = AdaGCReference(lambda_abs=5.0, warmup_steps=3)
    steps = sequence(12)
    state = agclip.adagc_init(steps[0])
    for index, grads in enumerate(steps):
        norms = [float(np.max(np.abs(g))) for g in grads]
        factors = reference.factors(norms)
        clipped, state = agclip.adagc(grads, state, lambda_abs=5.0, warmup_steps=3, ord=math.inf)
        if all(math.isfinite(n) for n in norms):
            assert float(state.norm) == pytest.approx(max(norms), rel=1e-7), index
        for got, grad, factor in zip(clipped, grads, factors, strict=True):
            np.testing.assert_allclose(got, grad * factor, rtol=3e-6, err_msg=f"step {index}")


def test_rule_arguments_out_of_place_are_type_errors_naming_them() -> None:
    grads = [np.ones(3)]
    with pytest.raises(TypeError, match="unexpected or repeated argument 'foo'"):
        agclip.zclip(grads, agclip.zclip_init(grads), foo=1)
    with pytest.raises(TypeError, match="state must be a ZClipState, got tuple"):
        agclip.zclip(grads, (1, 2))
    with pytest.raises(TypeError, match="zclip_init got an unexpected argument 'history'"):
        agclip.zclip_init(grads, history=3)
    torch = pytest.importorskip("torch")
    del torch
    from agclip.backends.torch import ZClip

    with pytest.raises(TypeError, match="unexpected or repeated argument 'alpha'"):
        ZClip(0.9, alpha=0.9)
    with pytest.raises(TypeError, match="takes at most 9 positional values"):
        ZClip(*range(10))


@pytest.mark.parametrize("rule", list(RULES))
def test_an_empty_tree_passes_with_its_state(rule: str) -> None:
    init, step, options, _ = RULES[rule]
    state = init([])
    out, after = step([], state, **options)
    assert out == []
    assert after is state


def test_adagc_never_silences_a_tensor_that_had_zero_gradients_in_warm_up() -> None:
    state = agclip.adagc_init([np.zeros(3), np.zeros(2)])
    for _ in range(3):  # warm-up: the first tensor's gradient is still zero
        _, state = agclip.adagc([np.zeros(3), np.ones(2)], state, warmup_steps=3)
    clipped, state = agclip.adagc([np.full(3, 0.5), np.ones(2)], state, warmup_steps=3)
    np.testing.assert_allclose(clipped[0], 0.5)  # kozistr's version keeps gamma 0: zeroes it
    assert float(state.gamma["[0] (3,)"]) == pytest.approx(math.sqrt(3) * 0.5)


# -- argument checks ---------------------------------------------------------------
BAD = [
    ("zclip", {"alpha": 1.0}, "alpha"),
    ("zclip", {"alpha": -0.1}, "alpha"),
    ("zclip", {"z_thresh": 0.0}, "z_thresh"),
    ("zclip", {"warmup_steps": 0}, "warmup_steps"),
    ("zclip", {"warmup_steps": 2.5}, "warmup_steps"),
    ("zclip", {"mode": "median"}, "mode"),
    ("zclip", {"clip_option": "max"}, "clip_option"),
    ("zclip", {"max_grad_norm": -1.0}, "max_grad_norm"),
    ("zclip", {"clip_factor": 0.0}, "clip_factor"),
    ("zclip", {"eps": math.nan}, "eps"),
    ("autoclip", {"percentile": 101}, "percentile"),
    ("adagc", {"lambda_rel": 0.0}, "lambda_rel"),
    ("adagc", {"beta": 1.0}, "beta"),
    ("adagc", {"lambda_abs": math.inf}, "lambda_abs"),
]


@pytest.mark.parametrize(("rule", "options", "name"), BAD)
def test_bad_hyperparameters_are_errors_naming_them(
    rule: str, options: dict[str, Any], name: str
) -> None:
    init, step, _, _ = RULES[rule]
    grads = [np.ones(3)]
    with pytest.raises(ValueError, match=name):
        step(grads, init(grads), **options)


def test_bad_history_is_an_error_naming_it() -> None:
    with pytest.raises(ValueError, match="history"):
        agclip.autoclip_init([np.ones(3)], history=0)


def test_skip_update_on_spike_must_be_a_bool() -> None:
    grads = [np.ones(3)]
    with pytest.raises(TypeError, match="skip_update_on_spike"):
        agclip.zclip(grads, agclip.zclip_init(grads), skip_update_on_spike="yes")


# -- PyTorch: the zclip package, the AutoClip paper, robustness, meta, checkpoints ----
torch_only = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _model(seed: int = 0) -> Any:
    import torch

    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))


def _backward(models: list[Any], step: int, generator: Any, spike_every: int = 9) -> None:
    import torch

    x = torch.randn(16, 8, generator=generator)
    y = torch.randn(16, 2, generator=generator) * (
        40.0 if step % spike_every == spike_every - 1 else 1.0
    )
    for model in models:
        model.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()


ZCLIP_OPTIONS = [
    {},
    {"clip_option": "mean"},
    {"mode": "percentile"},
    {"clip_factor": 0.7},
    {"skip_update_on_spike": True},
    {"alpha": 0.9, "z_thresh": 1.5, "warmup_steps": 10},
]


@pytest.mark.parametrize("cap", [None, 3.0])
@pytest.mark.parametrize("options", ZCLIP_OPTIONS, ids=lambda o: ",".join(o) or "defaults")
def test_zclip_matches_the_zclip_package(options: dict[str, Any], cap: float | None) -> None:
    torch = pytest.importorskip("torch")
    zclip = pytest.importorskip("zclip", reason="the zclip package is a test reference")
    from agclip.backends.torch import ZClip

    ours, theirs = _model(), _model()
    clip_ours = ZClip(max_grad_norm=cap, **options)
    clip_theirs = zclip.ZClip(max_grad_norm=cap, **options)
    generator = torch.Generator().manual_seed(1)
    for step in range(120):
        _backward([ours, theirs], step, generator)
        norm_ours, norm_theirs = clip_ours.step(ours), clip_theirs.step(theirs)
        assert float(norm_ours) == pytest.approx(norm_theirs, rel=1e-6), step
        # the package's attributes, which people log, as read-only views
        assert bool(clip_ours.initialized) == clip_theirs.initialized, step
        if clip_theirs.initialized:
            assert float(clip_ours.mean) == pytest.approx(clip_theirs.mean, rel=1e-6), step
            assert float(clip_ours.var) == pytest.approx(clip_theirs.var, rel=1e-5), step
        for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
            scale = float(b.grad.abs().max())
            assert float((a.grad - b.grad).abs().max()) <= 1e-6 * scale, step
    assert int(clip_ours.state.spikes) > 0
    for name in ("alpha", "z_thresh", "max_grad_norm", "eps", "warmup_steps", "mode"):
        assert getattr(clip_ours, name) == getattr(clip_theirs, name), name
    for name in ("clip_option", "clip_factor", "skip_update_on_spike"):
        assert getattr(clip_ours, name) == getattr(clip_theirs, name), name
    with pytest.raises(AttributeError, match="read-only"):
        clip_ours.mean = 1.0


def test_zclip_survives_the_nan_and_inf_norms_that_break_the_zclip_package() -> None:
    torch = pytest.importorskip("torch")
    zclip = pytest.importorskip("zclip", reason="the zclip package is a test reference")
    from agclip.backends.torch import ZClip

    def grads_of(model: Any, value: float) -> None:
        for param in model.parameters():
            param.grad = torch.full_like(param, value)

    ours, theirs = _model(), _model()
    clip_ours, clip_theirs = ZClip(warmup_steps=5), zclip.ZClip(warmup_steps=5, max_grad_norm=None)
    for value in [0.01, 0.011] * 5:
        for model, clip in ((ours, clip_ours), (theirs, clip_theirs)):
            grads_of(model, value)
            clip.step(model)
    typical = float(clip_ours.state.mean)
    for model, clip in ((ours, clip_ours), (theirs, clip_theirs)):
        grads_of(model, math.nan)
        clip.step(model)
        grads_of(model, 0.5)  # a 50x spike
        clip.step(model)
    spiked_ours = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in ours.parameters()))
    spiked_theirs = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in theirs.parameters()))
    size = sum(p.numel() for p in theirs.parameters())
    assert spiked_theirs == pytest.approx(0.5 * math.sqrt(size), rel=1e-5)  # unclipped
    assert spiked_ours < 1.5 * typical  # agclip: clipped near the mean
    assert int(clip_ours.state.nonfinite) == 1
    assert math.isfinite(float(clip_ours.state.mean))

    # An inf norm, on fresh statistics: the package clips to the mean, inf * 0 = NaN.
    clip_ours, clip_theirs = ZClip(warmup_steps=5), zclip.ZClip(warmup_steps=5, max_grad_norm=None)
    for index, value in enumerate([0.01] * 10 + [math.inf]):
        for model, clip in ((ours, clip_ours), (theirs, clip_theirs)):
            grads_of(model, 0.01 + 0.001 * (index % 2))
            next(model.parameters()).grad[0, 0] = value
            clip.step(model)
    assert any(bool(p.grad.isnan().any()) for p in theirs.parameters())
    first = next(ours.parameters()).grad
    assert float(first[0, 0]) == math.inf
    assert float(first[0, 1]) == pytest.approx(0.01)
    assert not any(bool(p.grad.isnan().any()) for p in ours.parameters())
    assert int(clip_ours.state.nonfinite) == 1


@pytest.mark.slow
@pytest.mark.parametrize("history", [None, 20])
def test_autoclip_follows_the_papers_rule(history: int | None) -> None:
    torch = pytest.importorskip("torch")
    from agclip.backends.torch import AutoClip

    ours, theirs = _model(), _model()
    clip = AutoClip(percentile=10, history=history)
    norms: list[float] = []
    generator = torch.Generator().manual_seed(2)
    for step in range(300):  # past the first buffer (256): the unbounded one grows
        _backward([ours, theirs], step, generator, spike_every=23)
        # The paper's code: the norm read parameter by parameter, np.percentile, clip.
        norms.append(sum(p.grad.norm(2).item() ** 2 for p in theirs.parameters()) ** 0.5)
        kept = norms[-history:] if history else norms
        torch.nn.utils.clip_grad_norm_(theirs.parameters(), float(np.percentile(kept, 10)))
        clip.step(ours)
        for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
            assert float((a.grad - b.grad).abs().max()) <= 2e-6 * float(b.grad.abs().max()), step
    held = clip.state.history.shape[0]
    assert held == (20 if history else 512)
    assert int(clip.state.count) == 300


def _meta_model() -> Any:
    import torch

    return torch.nn.Linear(4, 3, device="meta")


@pytest.mark.parametrize("rule", ["ZClip", "AutoClip", "AutoClip(history=4)", "AdaGC"])
def test_torch_rules_read_nothing_on_the_host(rule: str) -> None:
    """torch's meta device has no values: any host read (``.item()``, ``bool()``)
    raises. Every step of every rule runs there, so none syncs on CUDA."""
    torch = pytest.importorskip("torch")
    from agclip.backends import torch as agt

    name, _, history = rule.partition("(history=")
    make: Callable[[], agt.AdaptiveRule] = {
        "ZClip": lambda: agt.ZClip(warmup_steps=2),
        "AutoClip": lambda: agt.AutoClip(history=int(history[:-1]) if history else None),
        "AdaGC": lambda: agt.AdaGC(warmup_steps=2),
    }[name]
    model, clip = _meta_model(), make()
    callback_model, callback = (
        _meta_model(),
        agt.GradientClipCallback(max_norm=make(), check_every=100),
    )
    callback.set_model(callback_model)
    for _ in range(6):
        for param in [*model.parameters(), *callback_model.parameters()]:
            param.grad = torch.ones_like(param)
        assert clip.step(model).device.type == "meta"
        assert callback.on_after_backward().device.type == "meta"
    assert all(t.device.type == "meta" for t in _tensors(clip.state))


def _tensors(state: Any) -> list[Any]:
    """The state's tensors, those of per-tensor fields (dicts) included, in order."""
    out = []
    for value in state:
        out += list(value.values()) if isinstance(value, dict) else [value]
    return out


@pytest.mark.parametrize("rule", ["ZClip", "AutoClip", "AdaGC"])
def test_state_round_trips_through_a_checkpoint(rule: str) -> None:
    torch = pytest.importorskip("torch")
    from agclip.backends import torch as agt

    make: Callable[[], agt.AdaptiveRule] = {
        "ZClip": lambda: agt.ZClip(warmup_steps=3),
        "AutoClip": lambda: agt.AutoClip(percentile=10),
        "AdaGC": lambda: agt.AdaGC(warmup_steps=3),
    }[rule]
    first, resumed_model = _model(), _model()
    clip = make()
    generator = torch.Generator().manual_seed(3)
    for step in range(12):
        _backward([first], step, generator)
        clip.step(first)
    buffer = io.BytesIO()
    torch.save(clip.state_dict(), buffer)
    buffer.seek(0)
    resumed = make()
    resumed.load_state_dict(torch.load(buffer))
    for step in range(12, 24):
        _backward([first, resumed_model], step, generator)
        clip.step(first)
        resumed.step(resumed_model)
        for a, b in zip(first.parameters(), resumed_model.parameters(), strict=True):
            assert torch.equal(a.grad, b.grad), step
    for a, b in zip(_tensors(clip.state), _tensors(resumed.state), strict=True):
        assert torch.equal(a, b)


def test_loading_a_foreign_state_dict_is_an_error_naming_the_fields() -> None:
    pytest.importorskip("torch")
    from agclip.backends.torch import AutoClip, ZClip

    clip = ZClip()
    with pytest.raises(ValueError, match="mean"):
        clip.load_state_dict(AutoClip().state_dict() or {"state": {"history": 0}})


def test_autoclip_refuses_a_state_of_another_history() -> None:
    pytest.importorskip("torch")
    from agclip.backends.torch import AutoClip

    ring = AutoClip(history=3)
    for value in range(5):
        ring.step(_grads(float(value + 1)))
    with pytest.raises(ValueError, match="history=3"):
        AutoClip(history=None).load_state_dict(ring.state_dict())
    with pytest.raises(ValueError, match="history=3"):
        AutoClip(history=4).load_state_dict(ring.state_dict())
    AutoClip(history=3).load_state_dict(ring.state_dict())  # the same layout loads


def _grads(value: float) -> list[Any]:
    import torch

    param = torch.nn.Parameter(torch.zeros(2))
    param.grad = torch.full((2,), value)
    return [param]


def test_the_callback_takes_a_rule_and_counts_its_clips() -> None:
    torch = pytest.importorskip("torch")
    from agclip.backends.torch import AdaGC, GradientClipCallback, ZClip

    makers: list[Callable[[], Any]] = [lambda: ZClip(warmup_steps=3), lambda: AdaGC(warmup_steps=3)]
    for make in makers:
        alone, inside = _model(), _model()
        rule = make()
        callback = GradientClipCallback(max_norm=make())
        callback.set_model(inside)
        generator = torch.Generator().manual_seed(4)
        changed = 0  # steps in which the rule alone changed some gradient
        for step in range(30):
            _backward([alone, inside], step, generator)
            before = [p.grad.clone() for p in alone.parameters()]
            want = rule.step(alone)
            changed += any(
                not torch.equal(p.grad, b) for p, b in zip(alone.parameters(), before, strict=True)
            )
            assert torch.equal(callback.on_after_backward(), want)
            for a, b in zip(alone.parameters(), inside.parameters(), strict=True):
                assert torch.equal(a.grad, b.grad), step
        assert callback.clipped_steps == changed >= int(rule.state.spikes) > 0


def test_a_rule_through_the_callback_skips_a_fused_step_on_a_nan_norm() -> None:
    torch = pytest.importorskip("torch")
    from agclip.backends.torch import GradientClipCallback, ZClip

    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    callback = GradientClipCallback(max_norm=ZClip(warmup_steps=2))
    callback.set_model(model)
    generator = torch.Generator().manual_seed(5)
    for step in range(4):
        _backward([model], step, generator)
        callback.clip_and_step(optimizer)
    before = [p.detach().clone() for p in model.parameters()]
    state = {key: dict(value) for key, value in optimizer.state_dict()["state"].items()}
    _backward([model], 0, generator)
    next(model.parameters()).grad[0, 0] = math.nan
    with pytest.warns(agclip.backends.torch.NonFiniteGradientWarning):
        callback.clip_and_step(optimizer)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before, strict=True))
    after = optimizer.state_dict()["state"]
    assert all(
        torch.equal(after[i][name], value) for i in state for name, value in state[i].items()
    )


# -- JAX: optax transforms ------------------------------------------------------------
def _largest(threshold: Any) -> float:
    values = threshold.values() if isinstance(threshold, dict) else [threshold]
    return max(float(np.max(np.asarray(value))) for value in values)


def _jax_transforms() -> dict[str, Any]:
    from agclip.backends import jax as agj

    return {
        "zclip": agj.zclip(warmup_steps=3, z_thresh=2.0),
        "autoclip": agj.autoclip(25, history=5),
        "adagc": agj.adagc(lambda_abs=5.0, warmup_steps=3),
    }


@pytest.mark.parametrize("rule", ["zclip", "autoclip", "adagc"])
def test_optax_transforms_compile_once_and_match_the_functional_rule(rule: str) -> None:
    jax = pytest.importorskip("jax")
    jnp = pytest.importorskip("jax.numpy")
    optax = pytest.importorskip("optax")
    tx = _jax_transforms()[rule]
    assert isinstance(tx, optax.GradientTransformation)
    init, step, options, _ = RULES[rule]
    steps = sequence(14)
    state = tx.init([jnp.asarray(g, jnp.float32) for g in steps[0]])
    functional = init([np.asarray(g, np.float32) for g in steps[0]])
    update = jax.jit(tx.update)
    for grads in steps:
        out, state = update([jnp.asarray(g, jnp.float32) for g in grads], state)
        want, functional = step([np.asarray(g, np.float32) for g in grads], functional, **options)
        for got, expected in zip(out, want, strict=True):
            np.testing.assert_allclose(np.asarray(got), expected, rtol=2e-6, atol=1e-7)
        assert float(state.norm) == pytest.approx(float(functional.norm), rel=1e-6, nan_ok=True)
        assert _largest(state.threshold) == pytest.approx(_largest(functional.threshold), rel=2e-6)
    assert update._cache_size() == 1  # spikes and NaN steps included: one compilation


def test_zclip_works_under_inject_hyperparams_with_a_schedule() -> None:
    jax = pytest.importorskip("jax")
    jnp = pytest.importorskip("jax.numpy")
    optax = pytest.importorskip("optax")
    from agclip.backends.jax import zclip

    tx = optax.inject_hyperparams(zclip)(
        alpha=0.9,
        z_thresh=optax.linear_schedule(3.0, 2.0, 10),
        warmup_steps=3,
        skip_update_on_spike=True,
    )
    # Committed to the device like the states the update returns: optax's own
    # inject_hyperparams state is uncommitted at init, which alone costs a recompile.
    state = jax.device_put(tx.init({"w": jnp.zeros(4)}), jax.devices()[0])
    update = jax.jit(tx.update)
    for scale in [1.0, 1.2] * 4 + [50.0]:
        out, state = update({"w": jnp.full(4, scale)}, state)
    assert int(state.inner_state.spikes) == 1
    # clipped near the mean norm (2.0 and 2.4 alternate): mean + z_thresh**2 * std / z
    assert 2.0 < float(jnp.linalg.norm(out["w"])) < 2.6
    assert update._cache_size() == 1


def test_autoclip_and_adagc_work_under_inject_hyperparams() -> None:
    jax = pytest.importorskip("jax")
    jnp = pytest.importorskip("jax.numpy")
    optax = pytest.importorskip("optax")
    from agclip.backends.jax import adagc, autoclip

    for tx in (
        optax.inject_hyperparams(autoclip, static_args=("history",))(percentile=50.0, history=4),
        optax.inject_hyperparams(adagc)(lambda_rel=1.1, warmup_steps=2),
    ):
        state = tx.init({"w": jnp.zeros(4)})
        for scale in [1.0, 2.0, 3.0, 100.0]:
            out, state = jax.jit(tx.update)({"w": jnp.full(4, scale)}, state)
        assert float(jnp.linalg.norm(out["w"])) < 20.0  # the spike was clipped


def test_zclip_composes_with_apply_if_finite() -> None:
    jnp = pytest.importorskip("jax.numpy")
    optax = pytest.importorskip("optax")
    from agclip.backends.jax import apply_if_finite, zclip

    tx = optax.chain(apply_if_finite(zclip(warmup_steps=3), 2), optax.sgd(1.0))
    state = tx.init({"w": jnp.zeros(4)})
    for scale in [1.0, 1.2, 1.0, 1.2, 1.0, math.nan, 50.0]:
        out, state = tx.update({"w": jnp.full(4, scale)}, state)
        if math.isnan(scale):
            assert float(jnp.abs(out["w"]).max()) == 0.0  # the step is skipped
    assert float(jnp.linalg.norm(out["w"])) < 3.0  # the spike after it is clipped
    assert int(state[0].total_notfinite) == 1


@pytest.mark.parametrize("rule", ["zclip", "autoclip", "adagc"])
def test_jax_and_torch_give_the_same_results_on_the_same_gradients(rule: str) -> None:
    torch = pytest.importorskip("torch")
    jnp = pytest.importorskip("jax.numpy")
    from agclip.backends import torch as agt

    tx = _jax_transforms()[rule]
    rules: dict[str, Callable[[], agt.AdaptiveRule]] = {
        "zclip": lambda: agt.ZClip(warmup_steps=3, z_thresh=2.0),
        "autoclip": lambda: agt.AutoClip(25, history=5),
        "adagc": lambda: agt.AdaGC(lambda_abs=5.0, warmup_steps=3),
    }
    clip = rules[rule]()
    params = [torch.nn.Parameter(torch.zeros(3, 4)), torch.nn.Parameter(torch.zeros(5))]
    steps = sequence(14, seed=3)
    state = tx.init([jnp.zeros((3, 4)), jnp.zeros(5)])
    for grads in steps:
        for param, grad in zip(params, grads, strict=True):
            param.grad = torch.tensor(grad, dtype=torch.float32)
        norm = clip.step(params)
        out, state = tx.update([jnp.asarray(g, jnp.float32) for g in grads], state)
        assert float(norm) == pytest.approx(float(state.norm), rel=1e-6, nan_ok=True)
        for param, got in zip(params, out, strict=True):
            np.testing.assert_allclose(param.grad.numpy(), np.asarray(got), rtol=2e-6, atol=1e-7)
