"""agclip.backends.torch: a drop-in for torch.nn.utils clipping, and GradientClipCallback."""

from __future__ import annotations

import json
import math
import warnings
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    import torch
else:
    torch = pytest.importorskip("torch")

from support import grad_of

from agclip.backends import torch as ag

NORM_TYPES = [2.0, 1.0, math.inf, 3.0]
FOREACH = [None, True, False]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


class LSTMLanguageModel(torch.nn.Module):
    def __init__(self, vocab: int = 50, dim: int = 32) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        self.lstm = torch.nn.LSTM(dim, dim, num_layers=2, batch_first=True)
        self.head = torch.nn.Linear(dim, vocab)

    def forward(self, tokens: Any) -> Any:
        out, _ = self.lstm(self.embed(tokens))
        return self.head(out)


def lstm_with_grads(seed: int = 0, scale: float = 1.0) -> Any:
    torch.manual_seed(seed)
    model = LSTMLanguageModel()
    tokens = torch.randint(0, 50, (4, 12))
    logits = model(tokens[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 50), tokens[:, 1:].reshape(-1))
    (loss * scale).backward()
    return model


def cnn_with_grads(seed: int = 0, scale: float = 1.0) -> Any:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3),
        torch.nn.Flatten(),
        torch.nn.Linear(8 * 4 * 4, 10),
    )
    (model(torch.randn(2, 3, 8, 8)).pow(2).sum() * scale).backward()
    return model


def grads_of(model: Any) -> Any:
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("make", [lstm_with_grads, cnn_with_grads], ids=["lstm", "cnn"])
@pytest.mark.parametrize("norm_type", NORM_TYPES)
@pytest.mark.parametrize("foreach", FOREACH)
@pytest.mark.parametrize("scale", [100.0, 1e-4], ids=["clips", "no-clip"])
def test_parity_with_torch_nn_utils(
    make: Any, norm_type: float, foreach: bool | None, scale: float
) -> None:
    ours, theirs = make(scale=scale), make(scale=scale)
    got = ag.clip_grad_norm_(ours.parameters(), 1.0, norm_type=norm_type, foreach=foreach)
    want = torch.nn.utils.clip_grad_norm_(theirs.parameters(), 1.0, norm_type, foreach=foreach)
    assert got.dtype == torch.float32
    assert got.shape == ()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
    for a, b in zip(grads_of(ours), grads_of(theirs), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)


def test_inputs_torch_accepts() -> None:
    model = lstm_with_grads(scale=100)
    gen = (p for p in model.parameters())
    assert float(ag.clip_grad_norm(gen, 1.0)) > 1.0  # generator, alias
    single = torch.nn.Parameter(torch.ones(4))
    single.grad = torch.full((4,), 3.0)
    assert float(ag.clip_grad_norm_(single, 1.0, norm_type="inf")) == 3.0  # one tensor, "inf"
    no_grad = [torch.nn.Parameter(torch.ones(2))]
    with pytest.warns(ag.ClipPlacementWarning, match="before backward"):
        norm = ag.clip_grad_norm_(no_grad, 1.0)
    assert norm.shape == ()
    assert float(norm) == 0.0


def test_get_total_norm_and_clip_grads_with_norm_match_torch() -> None:
    ours, theirs = cnn_with_grads(scale=50), cnn_with_grads(scale=50)
    for norm_type in NORM_TYPES:
        got = ag.get_total_norm([p.grad for p in ours.parameters()], norm_type)
        want = torch.nn.utils.get_total_norm([p.grad for p in theirs.parameters()], norm_type)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
    norm = ag.get_total_norm([p.grad for p in ours.parameters()])
    ag.clip_grads_with_norm_(ours.parameters(), 2.0, norm)
    torch.nn.utils.clip_grads_with_norm_(theirs.parameters(), 2.0, norm)
    for a, b in zip(grads_of(ours), grads_of(theirs), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)


@pytest.mark.parametrize("foreach", FOREACH)
def test_clip_grad_value_matches_torch(foreach: bool | None) -> None:
    ours, theirs = lstm_with_grads(scale=10), lstm_with_grads(scale=10)
    ag.clip_grad_value_(ours.parameters(), 0.01, foreach=foreach)
    torch.nn.utils.clip_grad_value_(theirs.parameters(), 0.01, foreach=foreach)
    for a, b in zip(grads_of(ours), grads_of(theirs), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# -- where torch is wrong ----------------------------------------------------
def test_huge_finite_gradients_are_clipped_where_torch_zeroes_them() -> None:
    ours, theirs = torch.nn.Parameter(torch.zeros(10)), torch.nn.Parameter(torch.zeros(10))
    ours.grad, theirs.grad = torch.full((10,), 1e20), torch.full((10,), 1e20)
    norm = ag.clip_grad_norm_([ours], 1.0)
    assert math.isclose(float(norm), math.sqrt(10) * 1e20, rel_tol=1e-6)
    torch.testing.assert_close(ours.grad, torch.full((10,), 1 / math.sqrt(10)))
    assert math.isinf(float(torch.nn.utils.clip_grad_norm_([theirs], 1.0)))
    assert float(theirs.grad.abs().max()) == 0.0  # torch: every gradient silently zeroed


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_norm_is_float32_and_does_not_overflow(dtype: torch.dtype) -> None:
    param = torch.nn.Parameter(torch.zeros(100_000, dtype=dtype))
    param.grad = torch.full((100_000,), 300.0, dtype=dtype)
    norm = ag.clip_grad_norm_([param], 1e6)
    assert norm.dtype == torch.float32
    assert math.isclose(float(norm), 300 * math.sqrt(100_000), rel_tol=1e-6)
    if dtype == torch.float16:  # torch's own norm overflows float16
        assert math.isinf(float(torch.nn.utils.get_total_norm([param.grad])))


def test_mixed_dtypes_in_one_call() -> None:
    params = [
        torch.nn.Parameter(torch.zeros(3, dtype=d))
        for d in (torch.float16, torch.float32, torch.bfloat16, torch.float64)
    ]
    for p in params:
        p.grad = torch.full((3,), 2.0, dtype=p.dtype)
    norm = ag.clip_grad_norm_(params, 1.0)
    assert norm.dtype == torch.float64  # a float64 gradient widens the result
    assert math.isclose(float(norm), math.sqrt(12 * 4), rel_tol=1e-6)
    for p in params:
        assert grad_of(p).dtype == p.dtype
        torch.testing.assert_close(
            grad_of(p).double(), torch.full((3,), 2 / math.sqrt(48)).double(), rtol=1e-2, atol=0
        )


# -- no host sync ------------------------------------------------------------
@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_meta_device_path_has_no_host_sync(norm_type: float) -> None:
    # Any value read on the host (.item(), bool(), Python if) raises on meta tensors.
    params = [torch.nn.Parameter(torch.empty(s, device="meta")) for s in [(300, 40), (7,)]]
    for p in params:
        p.grad = torch.empty_like(p)
    norm = ag.clip_grad_norm_(params, 1.0, norm_type=norm_type)
    assert norm.device.type == "meta"
    assert norm.dtype == torch.float32
    ag.clip_grad_value_(params, 1.0)
    cb = ag.GradientClipCallback(1.0, warn_nonfinite=False)
    model = torch.nn.Linear(4, 4, device="meta")
    for p in model.parameters():
        p.grad = torch.empty_like(p)
    cb.set_model(model)
    assert cb.on_after_backward().device.type == "meta"


@needs_cuda
def test_cuda_path_has_no_host_sync() -> None:
    model = lstm_with_grads(scale=100).cuda()
    for p in model.parameters():
        p.grad = p.grad.cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        norm = ag.clip_grad_norm_(model.parameters(), 1.0)
        ag.clip_grad_value_(model.parameters(), 1.0)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert norm.device.type == "cuda"


@needs_cuda
def test_mixed_devices_combine_on_first_gradients_device() -> None:
    a, b = torch.nn.Parameter(torch.zeros(3, device="cuda")), torch.nn.Parameter(torch.zeros(4))
    a.grad, b.grad = torch.full((3,), 1.0, device="cuda"), torch.full((4,), 1.0)
    norm = ag.clip_grad_norm_([a, b], 1.0)
    assert norm.device.type == "cuda"
    assert math.isclose(float(norm), math.sqrt(7), rel_tol=1e-6)


# -- bad input ---------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"max_norm": -1.0}, ValueError, "max_norm"),
        ({"max_norm": math.nan}, ValueError, "max_norm"),
        ({"max_norm": 1.0, "norm_type": 0}, ValueError, "norm_type"),
        ({"max_norm": 1.0, "norm_type": "fro"}, ValueError, "norm_type"),
    ],
)
def test_bad_arguments_raise_and_leave_gradients_untouched(
    kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    model = cnn_with_grads(scale=100)
    before = grads_of(model)
    with pytest.raises(error, match=match):
        ag.clip_grad_norm_(model.parameters(), **kwargs)
    for a, b in zip(grads_of(model), before, strict=True):
        assert torch.equal(a, b)


def test_non_tensor_in_parameters_is_a_type_error_before_any_change() -> None:
    model = cnn_with_grads(scale=100)
    before = grads_of(model)
    with pytest.raises(TypeError, match=r"parameters\[6\] is a str"):
        ag.clip_grad_norm_([*model.parameters(), "oops"], 1.0)  # type: ignore[list-item]
    for a, b in zip(grads_of(model), before, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        ("oops", r"tensors\[3\] is a str"),
        (torch.ones(3, dtype=torch.int64), r"tensors\[3\].*int64"),
    ],
)
def test_get_total_norm_names_a_bad_tensor(bad: Any, match: str) -> None:
    with pytest.raises(TypeError, match=match):
        ag.get_total_norm([torch.ones(2), None, torch.ones(3), bad])  # type: ignore[list-item]


def test_nonfinite_error_counts_parameters_without_grad() -> None:
    model = cnn_with_grads(scale=100)
    params = list(model.parameters())
    params[0].grad = None
    params[1].grad = None
    params[4].grad[0] = math.inf
    with pytest.raises(RuntimeError, match=r"parameters\[4\] \(shape \(10, 128\)\)"):
        ag.clip_grad_norm_(params, 1.0, error_if_nonfinite=True)


def test_error_if_nonfinite_names_parameters_and_changes_nothing() -> None:
    model = cnn_with_grads(scale=100)
    params = list(model.parameters())
    params[2].grad[0] = math.nan
    before = grads_of(model)
    with pytest.raises(RuntimeError, match=r"parameters\[2\] \(shape \(8, 8, 3, 3\)\)"):
        ag.clip_grad_norm_(params, 1.0, error_if_nonfinite=True)
    for a, b in zip(grads_of(model), before, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)  # bit for bit


# -- the callback --------------------------------------------------------------
def test_callback_clips_counts_and_returns_the_norm() -> None:
    model = lstm_with_grads(scale=100)
    want = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
    cb = ag.GradientClipCallback(max_norm=1.0)
    cb.set_model(model)
    norm = cb.on_after_backward()
    torch.testing.assert_close(norm, want, rtol=1e-5, atol=0)
    after = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
    assert float(after) <= 1.0 + 1e-5
    assert cb.stats() == {
        "steps": 1,
        "clipped_steps": 1,
        "clip_rate": 1.0,
        "last_norm": float(norm),
    }


def test_callback_clips_a_layer_replaced_after_set_model() -> None:
    """The model's parameters are read at every call, not kept from ``set_model``: a new
    head (or layers built later, as in Lightning's ``configure_model``) is clipped."""
    model: Any = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    cb = ag.GradientClipCallback(max_norm=1.0)
    cb.set_model(model)
    model[1] = torch.nn.Linear(4, 3)
    model(torch.ones(2, 4)).pow(2).sum().mul(100).backward()
    want = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
    torch.testing.assert_close(cb.on_after_backward(), want, rtol=1e-6, atol=0)
    after = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
    assert float(after) <= 1.0 + 1e-6
    model[1].weight.grad[0, 0] = math.nan
    with pytest.warns(ag.NonFiniteGradientWarning, match=r"1\.weight"):
        cb.on_after_backward()


@pytest.mark.parametrize("through_optimizer", [False, True])
def test_callback_follows_parameters_replaced_without_a_registration(
    through_optimizer: bool,
) -> None:
    """``to_empty`` (meta-device initialisation) puts new parameters in place without
    torch's registration hooks: the clip still finds them, and names them."""
    with torch.device("meta"):
        model: Any = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    cb = ag.GradientClipCallback(max_norm=1.0)
    cb.set_model(model)
    with pytest.warns(ag.ClipPlacementWarning):
        cb.on_after_backward()  # a first call, before the parameters exist
    model.to_empty(device="cpu")
    for param in model.parameters():
        torch.nn.init.normal_(param)
    model(torch.ones(2, 4)).pow(2).sum().mul(100).backward()
    model[1].weight.grad[0, 0] = math.nan
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1) if through_optimizer else None
    with pytest.warns(ag.NonFiniteGradientWarning, match=r": 1\.weight$"):
        norm = cb.on_after_backward(optimizer)
    assert math.isnan(float(norm))


def test_callback_state_round_trips_through_json() -> None:
    model = torch.nn.Linear(4, 2)
    saved = ag.GradientClipCallback(ag.ZClip(warmup_steps=2))
    saved.set_model(model)
    for scale in (1.0, 1.2, 50.0):
        model.zero_grad()
        model(torch.ones(3, 4)).sum().mul(scale).backward()
        saved.on_after_backward()

    def plain(value: Any) -> Any:
        if isinstance(value, dict):
            return {key: plain(item) for key, item in value.items()}
        return value.tolist() if isinstance(value, torch.Tensor) else value

    restored = ag.GradientClipCallback(ag.ZClip(warmup_steps=2))
    restored.load_state_dict(json.loads(json.dumps(plain(saved.state_dict()))))
    assert {**restored.stats(), "last_norm": None} == {**saved.stats(), "last_norm": None}
    for name in ("count", "mean", "var", "spikes"):
        torch.testing.assert_close(
            getattr(restored.rule.state, name), getattr(saved.rule.state, name), rtol=0, atol=0
        )
    with pytest.raises(ValueError, match="clipped_steps"):
        restored.load_state_dict({"steps": 3, "rule": {}})
    state = saved.state_dict()
    with pytest.raises(ValueError, match="of a ZClip threshold, this callback's is fixed"):
        ag.GradientClipCallback(1.0).load_state_dict(state)
    with pytest.raises(ValueError, match="of a ZClip threshold, this callback's is AutoClip"):
        ag.GradientClipCallback(ag.AutoClip()).load_state_dict(state)
    for bad in ({"steps": 2.7}, {"steps": "3"}, {"clipped_steps": 9}):
        with pytest.raises(ValueError, match="steps"):
            restored.load_state_dict({**state, **bad})
    assert restored.steps == 3  # nothing changed by a refused state


def test_callback_warns_with_parameter_names_or_raises() -> None:
    model = lstm_with_grads()
    model.head.weight.grad[0, 0] = math.inf
    cb = ag.GradientClipCallback(max_norm=1.0)
    cb.set_model(model)
    with pytest.warns(ag.NonFiniteGradientWarning, match=r"head\.weight"):
        cb.on_after_backward()
    model = lstm_with_grads()
    model.lstm.weight_hh_l1.grad[0, 0] = math.nan
    before = grads_of(model)
    strict = ag.GradientClipCallback(max_norm=1.0, error_if_nonfinite=True)
    strict.set_model(model)
    with pytest.raises(RuntimeError, match=r"lstm\.weight_hh_l1"):
        strict.on_after_backward()
    for a, b in zip(grads_of(model), before, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def test_callback_bad_use_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="max_norm"):
        ag.GradientClipCallback(max_norm=-1)
    with pytest.raises(RuntimeError, match="set_model"):
        ag.GradientClipCallback().on_after_backward()
    with pytest.raises(TypeError, match=r"torch\.nn\.Module"):
        ag.GradientClipCallback().set_model([torch.ones(1)])  # type: ignore[arg-type]


def test_callback_in_a_real_training_loop_with_grad_scaler() -> None:
    torch.manual_seed(0)
    model = LSTMLanguageModel()
    optimizer = torch.optim.SGD(model.parameters(), lr=2.0)
    scaler = torch.amp.GradScaler("cpu")
    cb = ag.GradientClipCallback(max_norm=0.5, warn_nonfinite=False)
    cb.set_model(model)
    data = torch.randint(0, 50, (16, 13))
    data[:, 1::2] = data[:, 0:-1:2]  # learnable: every other token repeats
    losses = []
    for _ in range(60):
        optimizer.zero_grad()
        logits = model(data[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 50), data[:, 1:].reshape(-1))
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)  # documented order: unscale, then clip
        cb.on_after_backward()
        scaler.step(optimizer)
        scaler.update()
        losses.append(loss.item())
    assert cb.steps == 60
    assert 0 < cb.clipped_steps <= 60
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.8 * losses[0]


@pytest.mark.slow
def test_torch_compile_of_a_training_step_with_clipping() -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(32, 8), torch.randn(32, 1) * 100

    def step() -> Any:
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        norm = ag.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        return loss, norm

    compiled = torch.compile(step, backend="eager")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # dynamo's graph-break notes
        first_loss, first_norm = compiled()
        for _ in range(5):
            loss, _ = compiled()
    assert first_norm.item() > 1.0
    assert loss.item() < first_loss.item()


def test_a_tensor_listed_twice_counts_and_scales_once() -> None:
    """torch counts a tied weight listed twice twice, and scales it twice."""
    param = torch.nn.Parameter(torch.zeros(2))
    param.grad = torch.tensor([3.0, 4.0])
    assert float(ag.clip_grad_norm_([param, param], 1.0)) == pytest.approx(5.0)
    torch.testing.assert_close(param.grad, torch.tensor([0.6, 0.8]))
    assert float(ag.get_total_norm([param.grad, param.grad])) == pytest.approx(1.0)
