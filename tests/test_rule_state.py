"""A rule's state is bound to what it describes: AdaGC's thresholds are keyed by tensor
(never lent to another), a state that does not fit the gradients is a clear error, a
state saved as plain numbers reloads with its dtypes, and a degenerate ZClip warm-up
(all-zero or constant norms) does not clip the rest of the run."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pytest
from support import Backend

import agclip


def _two(backend: Backend, scale: float = 1.0) -> list[Any]:
    return [backend.asarray(np.full((3, 4), scale)), backend.asarray(np.full(5, scale))]


def test_a_functional_adagc_state_for_other_tensors_is_an_error_naming_them(
    library: Backend,
) -> None:
    state = agclip.adagc_init(_two(library))
    other = [library.asarray(np.ones((3, 4))), library.asarray(np.ones(6))]  # [1] resized
    with pytest.raises(ValueError, match=r"tensor 1 is \[1\] \(6,\), the state's is \[1\] \(5,\)"):
        agclip.adagc(other, state)
    with pytest.raises(ValueError, match=r"tensor 2 is \[2\] \(2,\), the state's is nothing"):
        agclip.adagc([*_two(library), library.asarray(np.ones(2))], state)
    with pytest.raises(ValueError, match=r"tensor 0 is \['w'\]"):
        agclip.adagc({"w": library.asarray(np.ones((3, 4)))}, state)


def test_an_optax_adagc_state_for_other_tensors_is_an_error_naming_them() -> None:
    jnp = pytest.importorskip("jax.numpy")
    from agclip.backends.jax import adagc

    tx = adagc()
    state = tx.init({"a": jnp.ones(3), "b": jnp.ones(2)})
    with pytest.raises(ValueError, match=r"their tensor 1 is \['c'\]"):
        tx.update({"a": jnp.ones(3), "c": jnp.ones(2)}, state)


def test_a_state_of_another_library_is_a_type_error_naming_it() -> None:
    jnp = pytest.importorskip("jax.numpy")
    grads = [np.ones(3, np.float32)]
    state = agclip.autoclip_init([jnp.ones(3)], history=4)
    with pytest.raises(TypeError, match=r"state\.count is a jax.*gradients are numpy arrays"):
        agclip.autoclip(grads, state)
    with pytest.raises(TypeError, match=r"state\.count is a jax"):
        agclip.zclip(grads, agclip.zclip_init([jnp.ones(3)]))


@pytest.mark.parametrize("rule", ["zclip", "autoclip", "adagc"])
def test_numpy_states_stay_0d_arrays(rule: str) -> None:
    init, step = getattr(agclip, f"{rule}_init"), getattr(agclip, rule)
    grads = [np.ones(3, np.float32), np.ones(2, np.float32)]
    state = init(grads)
    for scale in (1.0, 1.5, 0.5, 30.0, 1.0):
        _, state = step([g * scale for g in grads], state)
    for name, value in state._asdict().items():
        for leaf in value.values() if isinstance(value, dict) else [value]:
            assert type(leaf) is np.ndarray, (name, type(leaf))
    assert state.count.dtype == np.int32


@pytest.mark.parametrize("rule", ["zclip", "autoclip", "adagc"])
def test_a_functional_state_saved_as_json_reloads_with_its_dtypes(
    library: Backend, rule: str
) -> None:
    init, step = getattr(agclip, f"{rule}_init"), getattr(agclip, rule)
    state = init(_two(library))
    for scale in (1.0, 1.2, 1.1):
        _, state = step(_two(library, scale), state)
    saved = json.loads(json.dumps(_plain(state, library)))
    restored = type(state)(**saved)
    want_out, want = step(_two(library, 3.0), state)
    got_out, got = step(_two(library, 3.0), restored)
    for a, b in zip(_leaves(got), _leaves(want), strict=True):  # every digit kept
        assert str(a.dtype) == str(b.dtype)
        np.testing.assert_array_equal(library.to_numpy(a), library.to_numpy(b))
    for a, b in zip(got_out, want_out, strict=True):
        np.testing.assert_array_equal(library.to_numpy(a), library.to_numpy(b))


def _plain(state: Any, backend: Backend) -> dict[str, Any]:
    def plain(value: Any) -> Any:
        if isinstance(value, dict):
            return {key: plain(item) for key, item in value.items()}
        return backend.to_numpy(value).tolist()

    return {name: plain(value) for name, value in state._asdict().items()}


def _leaves(state: Any) -> list[Any]:
    out = []
    for value in state:
        out += list(value.values()) if isinstance(value, dict) else [value]
    return out


def test_a_torch_state_saved_as_json_reloads_with_its_dtypes() -> None:
    torch = pytest.importorskip("torch")
    from agclip.backends.torch import AdaGC, AutoClip, ZClip

    model = torch.nn.Linear(4, 2)
    for make in (lambda: ZClip(warmup_steps=2), lambda: AutoClip(history=8), AdaGC):
        rule, twin = make(), make()
        for scale in (1.0, 1.3, 0.9, 1.1):
            model.zero_grad()
            model(torch.ones(3, 4)).sum().mul(scale).backward()
            rule.step(model)
        saved = json.loads(json.dumps(_plain(rule.state, Backend("torch", "torch"))))
        twin.load_state_dict({"state": saved})
        for a, b in zip(_leaves(twin.state), _leaves(rule.state), strict=True):
            assert a.dtype == b.dtype, type(rule).__name__
            torch.testing.assert_close(a, b, rtol=0, atol=0)  # float64: not via float32


def test_torch_adagc_never_lends_a_threshold_to_another_tensor() -> None:
    """Mixture-of-experts routing: the tensors with gradients change from step to step."""
    torch = pytest.importorskip("torch")
    from agclip.backends.torch import AdaGC

    experts = torch.nn.ModuleDict({"a": torch.nn.Linear(4, 4), "b": torch.nn.Linear(4, 4)})

    def route(name: str, scale: float) -> None:
        experts.zero_grad(set_to_none=True)
        experts[name](torch.ones(2, 4)).sum().mul(scale).backward()

    strict, lenient = AdaGC(warmup_steps=1), AdaGC(warmup_steps=1, new_tensors="init")
    for rule in (strict, lenient):
        route("a", 0.01)
        rule.step(experts)
        route("a", 0.01)
        rule.step(experts)
    route("b", 5.0)  # expert b: never seen
    with pytest.raises(ValueError, match=r"has none for b\.weight \(4, 4\).*new_tensors='init'"):
        strict.step(experts)
    before = {key: float(value) for key, value in lenient.state.gamma.items()}
    norm = float(lenient.step(experts))
    after = {key: float(value) for key, value in lenient.state.gamma.items()}
    for key in ("a.weight (4, 4)", "a.bias (4,)"):
        assert after[key] == before[key]  # no gradient this step: kept as it was
    assert after["b.weight (4, 4)"] > 1.0  # its own scale, not expert a's threshold
    assert norm == pytest.approx(math.sqrt(20) * 5 * 2, rel=1e-6)
    gb = torch.cat([experts["b"].weight.grad.flatten(), experts["b"].bias.grad])
    assert float(gb.norm()) == pytest.approx(norm, rel=1e-6)  # a new tensor is not clipped


def test_a_callback_step_refused_by_its_rule_is_not_counted() -> None:
    """A layer unfrozen under AdaGC (new_tensors="error"): the refused step leaves the
    callback's statistics, the gradients and the rule's state as they were."""
    torch = pytest.importorskip("torch")
    from agclip.backends.torch import AdaGC, GradientClipCallback

    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    callback = GradientClipCallback(AdaGC(warmup_steps=1))
    callback.set_model(model)
    model[1].requires_grad_(False)
    for _ in range(3):
        model.zero_grad()
        model(torch.ones(8, 4)).pow(2).sum().mul(10).backward()
        callback.on_after_backward()
    before, state = callback.stats(), callback.rule.state
    model[1].requires_grad_(True)
    model.zero_grad()
    model(torch.ones(8, 4)).pow(2).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"has none for 1\.weight"):
        callback.on_after_backward()
    assert callback.stats() == before
    assert callback.rule.state is state
    for param, grad in zip(model.parameters(), grads, strict=True):
        torch.testing.assert_close(param.grad, grad, rtol=0, atol=0)


@pytest.mark.parametrize("warmup", [[0.0] * 6, [0.5] * 6], ids=["all-zero", "constant"])
def test_a_degenerate_zclip_warm_up_does_not_clip_the_rest_of_the_run(
    library: Backend, warmup: list[float]
) -> None:
    """The zclip package, after such a warm-up, clips every later gradient to zero (or
    to the constant) for good; agclip keeps warming up until the norms spread."""
    state = agclip.zclip_init([library.asarray(np.ones(4))])
    rng = np.random.default_rng(0)
    out: Any = None
    for value in [*warmup, *(1.0 + 0.1 * rng.standard_normal(40))]:
        out, state = agclip.zclip([library.asarray(np.full(4, value))], state, warmup_steps=5)
    last = float(np.linalg.norm(library.to_numpy(out[0])))
    assert last == pytest.approx(2.0 * value, rel=1e-5)  # the last gradient: unclipped
    assert float(library.to_numpy(state.mean)) == pytest.approx(2.0, rel=0.2)
    spiked, state = agclip.zclip([library.asarray(np.full(4, 30.0))], state, warmup_steps=5)
    assert float(np.linalg.norm(library.to_numpy(spiked[0]))) < 4.0  # spikes still clip


def test_zclip_with_eps_zero_on_numpy_warns_nothing() -> None:
    """z = (x - mean) / (std + eps) divides by zero while the std is 0: no RuntimeWarning
    (the suite runs with warnings as errors)."""
    grads = [np.ones(3, np.float32)]
    state = agclip.zclip_init(grads)
    for scale in (1.0, 1.0, 1.0, 2.0, 1.0, 3.0):
        _, state = agclip.zclip([g * scale for g in grads], state, eps=0.0, warmup_steps=2)
    assert int(state.count) == 6
