"""agclip.integrations.lightning on a real Lightning Trainer (CPU, seconds): the same
parameters as Lightning's own norm clipping, the norm in the logger, named
non-finite warnings, double clipping refused, accumulation, mixed precision
and manual optimization."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    import lightning.pytorch as pl
    import torch
else:
    torch = pytest.importorskip("torch")
    pl = pytest.importorskip("lightning.pytorch")

from agclip.backends.torch import NonFiniteGradientWarning
from agclip.integrations.lightning import GradientClipping

pytestmark = [
    # lightning 2.6 with torch 2.13: its own use of a deprecated torch pytree API.
    pytest.mark.filterwarnings(
        "ignore:.isinstance.treespec, LeafSpec.. is deprecated:FutureWarning"
    ),
    pytest.mark.filterwarnings("ignore:.*does not have many workers"),
    pytest.mark.filterwarnings("ignore:.*is smaller than the logging interval"),
    pytest.mark.filterwarnings("ignore:.*precision='16-mixed'.*not supported on CPU"),
]


class Regression(pl.LightningModule):
    def __init__(self, scale: float = 100.0, manual: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)
        )
        self.scale = scale
        self.automatic_optimization = not manual

    def training_step(self, batch: Any, index: int) -> Any:
        x, y = batch
        loss = self.scale * torch.nn.functional.mse_loss(self.net(x), y)
        if self.automatic_optimization:
            return loss
        optimizer = self.optimizers()
        assert not isinstance(optimizer, list)  # one optimizer
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()
        return None

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _data(batches: int = 4) -> Any:
    generator = torch.Generator().manual_seed(1)
    x, y = (
        torch.randn(16 * batches, 4, generator=generator),
        torch.randn(16 * batches, 1, generator=generator),
    )
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)


def _fit(module: pl.LightningModule, callbacks: list[Any], **options: Any) -> pl.Trainer:
    trainer = pl.Trainer(
        max_epochs=1,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **options,
    )
    trainer.fit(module, _data())
    return trainer


def _parameters(module: pl.LightningModule) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


@pytest.mark.parametrize(
    "options",
    [{}, {"accumulate_grad_batches": 2}, {"precision": "bf16-mixed"}],
    ids=["plain", "accumulation", "bf16-mixed"],
)
def test_training_matches_lightnings_own_norm_clipping(options: dict[str, Any]) -> None:
    ours, theirs = Regression(), Regression()
    clipping = GradientClipping(max_norm=1.0)
    _fit(ours, [clipping], **options)
    _fit(theirs, [], gradient_clip_val=1.0, gradient_clip_algorithm="norm", **options)
    for a, b in zip(_parameters(ours), _parameters(theirs), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    steps = 2 if options.get("accumulate_grad_batches") else 4
    assert clipping.clipper.steps == steps
    assert clipping.clipper.clipped_steps == steps  # scale 100: every step clips


def test_the_norm_and_clip_rate_reach_the_logger() -> None:
    clipping = GradientClipping(max_norm=1e9)  # never clips: the logged norm is the raw one
    trainer = _fit(Regression(), [clipping])
    metrics = trainer.callback_metrics
    assert float(metrics["grad_norm_clip_rate"]) == 0.0
    last = clipping.clipper.last_norm
    assert last is not None
    assert math.isclose(float(metrics["grad_norm"]), float(last), rel_tol=1e-6)


def test_an_adaptive_rule_clips_and_logs_like_a_fixed_threshold() -> None:
    from agclip.backends.torch import ZClip

    ours, reference = Regression(), Regression()
    clipping = GradientClipping(max_norm=ZClip(warmup_steps=2, max_grad_norm=1.0))
    trainer = _fit(ours, [clipping])
    # ZClip with a cap: warm-up and non-spike steps clip at the cap, as Lightning does.
    _fit(reference, [], gradient_clip_val=1.0, gradient_clip_algorithm="norm")
    for a, b in zip(_parameters(ours), _parameters(reference), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert float(trainer.callback_metrics["grad_norm_clip_rate"]) == 1.0  # scale 100: all


def test_fp16_with_a_grad_scaler_clips_the_unscaled_gradients() -> None:
    from lightning.pytorch.plugins import MixedPrecision

    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    plugin = MixedPrecision("16-mixed", "cpu", scaler=scaler)
    ours, theirs = Regression(), Regression()
    clipping = GradientClipping(max_norm=1.0, warn_nonfinite=False)
    _fit(ours, [clipping], plugins=[plugin])
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=256.0))
    _fit(theirs, [], plugins=[plugin], gradient_clip_val=1.0)
    for a, b in zip(_parameters(ours), _parameters(theirs), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    last = clipping.clipper.last_norm
    assert last is not None
    assert 1.0 < float(last) < 1e3  # unscaled (scaled: x256)


def test_nonfinite_gradients_are_named_in_a_warning() -> None:
    class Broken(Regression):
        def on_after_backward(self) -> None:
            layer = self.net[2]
            assert isinstance(layer, torch.nn.Linear)
            assert layer.weight.grad is not None
            layer.weight.grad[0, 0] = math.nan

    with pytest.warns(NonFiniteGradientWarning, match=r"net\.2\.weight"):
        _fit(Broken(), [GradientClipping(max_norm=1.0)])


def test_double_clipping_is_refused() -> None:
    with pytest.raises(ValueError, match="gradient_clip_val"):
        _fit(Regression(), [GradientClipping(max_norm=1.0)], gradient_clip_val=1.0)


def test_manual_optimization_clips_at_each_optimizer_step() -> None:
    clipping = GradientClipping(max_norm=1.0)
    _fit(Regression(manual=True), [clipping])
    assert clipping.clipper.steps == 4
    assert clipping.clipper.clipped_steps == 4


class TwoOptimizers(Regression):
    """Manual optimization with two optimizers, each stepping its own layer; the
    reference clips with Lightning's own ``clip_gradients`` before each step."""

    def __init__(self, ours: bool):
        super().__init__(manual=True)
        self.ours = ours

    def training_step(self, batch: Any, index: int) -> Any:
        x, y = batch
        optimizers: Any = self.optimizers()
        first, second = optimizers
        loss = self.scale * torch.nn.functional.mse_loss(self.net(x), y)
        first.zero_grad()
        second.zero_grad()
        self.manual_backward(loss)
        for optimizer, limit in ((first, 0.5), (second, 2.0)):
            if not self.ours:
                self.clip_gradients(
                    optimizer, gradient_clip_val=limit, gradient_clip_algorithm="norm"
                )
            optimizer.step()
        return None

    def configure_optimizers(self) -> Any:
        return [
            torch.optim.SGD(self.net[0].parameters(), lr=0.01),
            torch.optim.SGD(self.net[2].parameters(), lr=0.01),
        ]


def test_each_optimizer_step_clips_that_optimizers_parameters() -> None:
    clipping = GradientClipping(max_norm=1.0)
    # The first optimizer clipped at 0.5, the second at 2.0 (its own limit).
    clipping.clippers = [GradientClipping(0.5).clipper, GradientClipping(2.0).clipper]
    ours, theirs = TwoOptimizers(ours=True), TwoOptimizers(ours=False)
    _fit(ours, [clipping])
    _fit(theirs, [])
    for a, b in zip(_parameters(ours), _parameters(theirs), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert clipping.clippers[0].steps == clipping.clippers[1].steps == 4


@pytest.mark.parametrize("rule", ["ZClip", "AdaGC"])
def test_each_optimizer_has_its_own_copy_of_an_adaptive_rule(rule: str) -> None:
    """One rule shared by two optimizers would mix their norms in one set of statistics
    (and AdaGC would meet the second optimizer's tensors as unknown ones)."""
    import agclip.backends.torch as agt

    given = getattr(agt, rule)(warmup_steps=2)
    clipping = GradientClipping(max_norm=given)
    module = TwoOptimizers(ours=True)
    _fit(module, [clipping])
    first, second = clipping.clippers
    assert first.rule is given
    assert second.rule is not given
    assert first.steps == second.steps == 4
    # Each state describes its optimizer's norms alone: replay them on fresh rules.
    reference = TwoOptimizers(ours=True)
    replay = [getattr(agt, rule)(warmup_steps=2) for _ in range(2)]
    _fit(reference, [_Replay(replay)])
    for clipper, twin in zip(clipping.clippers, replay, strict=True):
        for a, b in zip(_state(clipper.rule), _state(twin), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_rule_holding_a_process_group_is_shared_not_copied() -> None:
    """A process group cannot be deep-copied: each optimizer's rule shares it."""
    import threading

    from agclip.backends._torch_rules import fresh_copy
    from agclip.backends.torch import ZClip

    group = threading.Lock()  # stands in for a ProcessGroup: neither pickles
    given = ZClip(process_group=group)
    clipping = GradientClipping(max_norm=given)
    model = torch.nn.Linear(3, 1)
    model(torch.ones(2, 3)).sum().backward()
    given.process_group = None  # a world of one process, for this step only
    given.step(model)
    given.process_group = group
    twin = fresh_copy(given)
    assert twin.process_group is group
    assert twin.state is None
    assert given.state is not None
    assert clipping.clipper.rule is given


class _Replay(pl.Callback):
    """Each optimizer's own rule stepped on that optimizer's parameters."""

    def __init__(self, rules: list[Any]):
        self.rules = rules

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        index = trainer.optimizers.index(optimizer)
        named = {id(p): n for n, p in pl_module.named_parameters()}
        params = [p for group in optimizer.param_groups for p in group["params"]]
        self.rules[index].step([(named[id(p)], p) for p in params])


def _state(rule: Any) -> list[torch.Tensor]:
    leaves = []
    for value in rule.state:
        leaves += list(value.values()) if isinstance(value, dict) else [value]
    return leaves


def test_the_clip_rate_is_a_share_of_steps_not_of_samples() -> None:
    """Batches of 16, 16 and 1, only the last one clipping: 1 / 3 of the steps (Lightning
    weights an epoch mean by the batch size it infers, which gave 1 / 33)."""
    torch.manual_seed(0)
    x = torch.cat([torch.full((32, 4), 0.001), torch.full((1, 4), 100.0)])
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x[:, :1]), 16)
    clipping = GradientClipping(max_norm=1.0)
    trainer = pl.Trainer(
        max_epochs=1,
        callbacks=[clipping],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Regression(scale=1.0), data)
    assert clipping.clipper.stats()["clipped_steps"] == 1
    rate = float(trainer.callback_metrics["grad_norm_clip_rate"])
    assert math.isclose(rate, 1 / 3, rel_tol=1e-6)


@pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")
def test_a_resumed_run_clips_as_an_uninterrupted_one(tmp_path: Any) -> None:
    """The rule's state and the statistics go into Lightning's checkpoint."""
    from agclip.backends.torch import ZClip

    def fit(epochs: int, clipping: GradientClipping, root: Any, **options: Any) -> Any:
        module = Regression()
        trainer = pl.Trainer(
            max_epochs=epochs,
            callbacks=[clipping],
            logger=False,
            default_root_dir=root,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(module, _data(), **options)
        return module

    whole = GradientClipping(ZClip(warmup_steps=3))
    straight = fit(3, whole, tmp_path / "straight")
    fit(1, GradientClipping(ZClip(warmup_steps=3)), tmp_path / "split")
    resumed_clipping = GradientClipping(ZClip(warmup_steps=3))
    checkpoint = next((tmp_path / "split" / "checkpoints").glob("*.ckpt"))
    resumed = fit(3, resumed_clipping, tmp_path / "split", ckpt_path=checkpoint)
    for a, b in zip(_parameters(resumed), _parameters(straight), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert resumed_clipping.clipper.stats() == whole.clipper.stats()
    for a, b in zip(_state(resumed_clipping.clipper.rule), _state(whole.clipper.rule), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # A checkpoint saved without the callback: the run says it starts afresh.
    fit(1, GradientClipping(1.0), tmp_path / "plain")
    (plain,) = (tmp_path / "plain" / "checkpoints").glob("*.ckpt")
    saved = torch.load(plain, weights_only=False)
    saved["callbacks"] = {k: v for k, v in saved["callbacks"].items() if "Clipping" not in k}
    torch.save(saved, plain)
    with pytest.warns(UserWarning, match="start afresh"):
        fit(2, GradientClipping(ZClip()), tmp_path / "plain", ckpt_path=plain)


class FusedAdamW(Regression):
    def __init__(self, fused: bool):
        super().__init__()
        self.fused = fused

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=0.01, fused=self.fused)


def test_16_mixed_with_a_fused_optimizer_clips_the_unscaled_gradients() -> None:
    """Lightning leaves a fused optimizer's gradients scaled until its step (and its own
    clipping refuses the pair); the callback takes the norm of the unscaled gradients."""
    from lightning.pytorch.plugins import MixedPrecision

    def plugin() -> Any:
        return MixedPrecision(
            "16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=256.0)
        )

    ours, theirs = FusedAdamW(fused=True), FusedAdamW(fused=False)
    clipping = GradientClipping(max_norm=1.0, warn_nonfinite=False)
    _fit(ours, [clipping], plugins=[plugin()])
    _fit(theirs, [], plugins=[plugin()], gradient_clip_val=1.0)  # unfused: Lightning clips
    for a, b in zip(_parameters(ours), _parameters(theirs), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    last = clipping.clipper.last_norm
    assert last is not None
    assert 1.0 < float(last) < 1e3  # unscaled (scaled: x256)
    assert clipping.clipper.clipped_steps == 4


class ClipAndStep(Regression):
    """Manual optimization through agclip's one call: the LightningOptimizer wrapper steps."""

    def __init__(self, fused: bool):
        super().__init__(manual=True)
        self.fused = fused

    def training_step(self, batch: Any, index: int) -> Any:
        from agclip.backends.torch import clip_and_step

        x, y = batch
        optimizer = self.optimizers()
        optimizer.zero_grad()  # type: ignore[union-attr]
        self.manual_backward(self.scale * torch.nn.functional.mse_loss(self.net(x), y))
        clip_and_step(optimizer, 1.0)
        return None

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=0.01, fused=self.fused)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "plain"])
def test_clip_and_step_through_a_lightning_optimizer(fused: bool) -> None:
    ours = ClipAndStep(fused)
    trainer = _fit(ours, [])
    theirs = FusedAdamW(fused=False)
    _fit(theirs, [], gradient_clip_val=1.0, gradient_clip_algorithm="norm")
    for a, b in zip(_parameters(ours), _parameters(theirs), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert trainer.global_step == 4  # the wrapper's bookkeeping ran


def test_a_clip_inside_training_step_says_it_runs_before_backward() -> None:
    """nano-world-model#22: ``clip_grad_norm_`` in ``training_step`` runs before
    ``backward()``; Lightning has set every ``.grad`` to None: nothing was clipped."""
    from agclip.backends.torch import ClipPlacementWarning, clip_grad_norm_

    class ClipsTooEarly(Regression):
        def training_step(self, batch: Any, index: int) -> Any:
            clip_grad_norm_(self.parameters(), 1.0)
            return super().training_step(batch, index)

    with pytest.warns(ClipPlacementWarning, match=r"before backward\(\)"):
        _fit(ClipsTooEarly(), [])
