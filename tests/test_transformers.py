"""agclip.integrations.transformers on a real Hugging Face Trainer (CPU, seconds, a tiny
GPT-2 built from a config: no downloads): the same parameters as the Trainer's own
clipping, the norm in the logs, named non-finite warnings, double clipping
refused, accumulation and bf16."""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    import torch
    import transformers
else:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")

from agclip.backends.torch import NonFiniteGradientWarning
from agclip.integrations.transformers import GradientClippingCallback


def _model() -> Any:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=64,
        n_positions=16,
        n_embd=16,
        n_layer=1,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return transformers.GPT2LMHeadModel(config)


def _dataset(rows: int = 16) -> list[dict[str, Any]]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (rows, 12), generator=generator)
    return [{"input_ids": row, "labels": row} for row in ids]


def _train(tmp_path: Path, callbacks: list[Any], resume: Any = None, **options: Any) -> Any:
    settings: dict[str, Any] = {
        "output_dir": str(tmp_path),
        "per_device_train_batch_size": 4,
        "max_steps": 4,
        "learning_rate": 1e-2,
        "logging_steps": 1,
        "report_to": [],
        "save_strategy": "no",
        "use_cpu": True,
        "disable_tqdm": True,
        "seed": 0,
        "max_grad_norm": 0.0,
    }
    settings.update(options)
    model = _model()
    args = transformers.TrainingArguments(**settings)
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=_dataset(), callbacks=callbacks
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def _parameters(trainer: Any) -> list[torch.Tensor]:
    return [p.detach().clone() for p in trainer.model.parameters()]


@pytest.mark.parametrize(
    "options",
    [{}, {"gradient_accumulation_steps": 2}, {"bf16": True}],
    ids=["plain", "accumulation", "bf16"],
)
def test_training_matches_the_trainers_own_clipping(
    tmp_path: Path, options: dict[str, Any]
) -> None:
    clipping = GradientClippingCallback(max_norm=0.1)
    ours = _train(tmp_path / "ours", [clipping], **options)
    theirs = _train(tmp_path / "theirs", [], **{**options, "max_grad_norm": 0.1})
    for a, b in zip(_parameters(ours), _parameters(theirs), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert clipping.clipper.steps == 4
    assert clipping.clipper.clipped_steps > 0


def test_an_adaptive_rule_is_the_callbacks_rule(tmp_path: Path) -> None:
    from agclip.backends.torch import AutoClip

    rule = AutoClip(percentile=10)
    clipping = GradientClippingCallback(max_norm=rule)
    _train(tmp_path, [clipping])
    assert clipping.clipper.steps == int(rule.state.count) == 4
    # p=10 of norms that change every step: the lowest norms are not clipped, the rest are;
    # the first step's norm is its own percentile: eps (max_norm / (norm + 1e-6)) scales it
    # by a hair, which counts as clipped (the gradients changed).
    spikes = int(rule.state.spikes)
    assert 0 < spikes <= clipping.clipper.clipped_steps <= spikes + 1


def test_the_pre_clip_norm_is_the_logged_grad_norm(tmp_path: Path) -> None:
    clipping = GradientClippingCallback(max_norm=0.1)
    trainer = _train(tmp_path, [clipping])
    logged = [entry["grad_norm"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 4
    last = clipping.clipper.last_norm
    assert last is not None
    assert math.isclose(logged[-1], float(last), rel_tol=1e-6)
    assert all(norm > 0.1 for norm in logged)  # pre-clip, above the threshold


def test_nonfinite_gradients_are_named_in_a_warning(tmp_path: Path) -> None:
    class Poison(transformers.TrainerCallback):
        def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            kw["model"].lm_head.weight.grad[0, 0] = math.nan

    with pytest.warns(NonFiniteGradientWarning, match=r"transformer\.wte\.weight"):
        _train(tmp_path, [Poison(), GradientClippingCallback(max_norm=0.1)], max_steps=1)


def test_double_clipping_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_grad_norm=0"):
        _train(tmp_path, [GradientClippingCallback(max_norm=0.1)], max_grad_norm=1.0)


def test_a_resumed_run_clips_as_an_uninterrupted_one(tmp_path: Path) -> None:
    """The rule's state and the statistics are saved in each checkpoint and restored by
    ``resume_from_checkpoint``; without them the run says it starts afresh."""
    from agclip.backends.torch import ZClip

    saving = {"max_steps": 8, "save_strategy": "steps", "save_steps": 4}
    whole = GradientClippingCallback(ZClip(warmup_steps=3))
    straight = _parameters(_train(tmp_path, [whole], **saving))
    again = GradientClippingCallback(ZClip(warmup_steps=3))
    resumed = _train(tmp_path, [again], resume=str(tmp_path / "checkpoint-4"), **saving)
    for a, b in zip(_parameters(resumed), straight, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert again.clipper.stats() == whole.clipper.stats()
    for name in ("count", "mean", "var", "spikes"):
        torch.testing.assert_close(
            getattr(again.clipper.rule.state, name), getattr(whole.clipper.rule.state, name)
        )
    # Moved elsewhere, the checkpoint carries the state with it.
    moved = tmp_path / "elsewhere" / "step-4"
    shutil.copytree(tmp_path / "checkpoint-4", moved)
    shutil.rmtree(tmp_path / "checkpoint-4")
    elsewhere = GradientClippingCallback(ZClip(warmup_steps=3))
    _train(tmp_path / "other", [elsewhere], resume=str(moved), **saving)
    assert elsewhere.clipper.stats() == whole.clipper.stats()
    # A checkpoint saved without the callback: the run says it starts afresh.
    _train(tmp_path / "plain", [], **saving)
    with pytest.warns(UserWarning, match="start afresh"):
        _train(
            tmp_path / "plain",
            [GradientClippingCallback(1.0)],
            str(tmp_path / "plain" / "checkpoint-4"),
            **saving,
        )
