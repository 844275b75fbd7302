"""Hugging Face Trainer: clip with agclip before each optimizer step.

Switch the Trainer's own clipping off and add one callback::

    # before: TrainingArguments(..., max_grad_norm=1.0)
    args = TrainingArguments(..., max_grad_norm=0)
    Trainer(model, args, ..., callbacks=[GradientClippingCallback(max_norm=1.0)])

It clips in ``on_pre_optimizer_step``: after gradient accumulation and after
the Trainer's AMP unscaling. The Trainer's logs report agclip's pre-clip norm
as ``grad_norm`` (as the Trainer does for its own clipping).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

from .._missing import missing

try:
    from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
except ImportError as error:
    raise missing("hf", error) from error

from .._typing import Scalar
from ..backends.torch import AdaptiveRule, GradientClipCallback

__all__ = ["GradientClippingCallback"]


class GradientClippingCallback(TrainerCallback):
    """A ``TrainerCallback`` that clips the model's gradients with agclip.

    Needs ``TrainingArguments(max_grad_norm=0)`` (or ``None``): a Trainer
    clipping on its own as well is refused when training starts. Non-finite
    gradients give a ``NonFiniteGradientWarning`` naming the parameters, or a
    ``RuntimeError`` with ``error_if_nonfinite=True`` before anything is
    modified. Each training log (``logs["grad_norm"]``, also in
    ``state.log_history``) carries the pre-clip norm of the last step. Each
    checkpoint the Trainer saves holds the rule's state and the statistics
    (``agclip_clipping.json``); ``train(resume_from_checkpoint=...)`` restores them
    from a checkpoint of ``output_dir``: a resumed run clips as an uninterrupted one.

    Args:
        max_norm: the largest total gradient norm allowed, or an adaptive rule
            (``ZClip()``, ``AutoClip()``, ``AdaGC()`` from ``agclip.backends.torch``).
        norm_type: 2.0 (default), 1, ``inf`` or any p > 0.
        error_if_nonfinite: raise instead of warning on NaN/inf gradients.
        warn_nonfinite: warn on NaN/inf gradients (turn off with ``fp16=True``,
            whose scaler skips such steps itself).

    References:
        Pascanu, Mikolov and Bengio, "On the difficulty of training recurrent
        neural networks", ICML 2013.
    """

    def __init__(
        self,
        max_norm: Scalar | AdaptiveRule = 1.0,
        norm_type: float | str = 2.0,
        error_if_nonfinite: bool = False,
        *,
        warn_nonfinite: bool = True,
    ):
        self.clipper = GradientClipCallback(
            max_norm, norm_type, error_if_nonfinite, warn_nonfinite=warn_nonfinite
        )

    def on_init_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        _refuse_double_clipping(args)

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        _refuse_double_clipping(args)  # also for a callback added after __init__
        self.clipper.set_model(kwargs["model"])
        if state.global_step > 0:  # resumed from a checkpoint
            path = _saved_state(args, state)
            if path.exists():
                self.clipper.load_state_dict(json.loads(path.read_text()))
            else:
                warnings.warn(
                    f"no {path.name} in {path.parent}: the clip statistics and the rule's "
                    "state start afresh in this resumed run",
                    stacklevel=2,
                )

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        path = _saved_state(args, state)
        if args.should_save and path.parent.is_dir():
            path.write_text(json.dumps(_plain(self.clipper.state_dict())))

    def on_pre_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        # The accelerate optimizer carries the fp16 GradScaler: the clip is of the
        # unscaled gradients even though the Trainer did not unscale them (max_grad_norm=0).
        self.clipper.on_after_backward(kwargs.get("optimizer"))

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        norm = self.clipper.last_norm
        if logs is None or "loss" not in logs or norm is None:
            return  # not a training log, or no step yet
        logs["grad_norm"] = float(norm)  # one read per log, not per step
        last = state.log_history[-1] if state.log_history else {}
        if last.get("step") == state.global_step and "loss" in last:
            last["grad_norm"] = logs["grad_norm"]


def _saved_state(args: TrainingArguments, state: TrainerState) -> Path:
    """Where the clip's state goes: beside the Trainer's own, in this step's checkpoint."""
    folder = f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
    return Path(str(args.output_dir)) / folder / "agclip_clipping.json"


def _plain(value: Any) -> Any:
    """Tensors as numbers and lists (float64 keeps every digit through JSON)."""
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    return value.tolist() if hasattr(value, "tolist") else value


def _refuse_double_clipping(args: TrainingArguments) -> None:
    if args.max_grad_norm:
        raise ValueError(
            f"TrainingArguments(max_grad_norm={args.max_grad_norm}) makes the Trainer clip "
            "as well as agclip's GradientClippingCallback: set max_grad_norm=0."
        )
