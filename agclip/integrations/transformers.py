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

import warnings
from pathlib import Path
from typing import Any

from .._missing import missing

try:
    from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
    from transformers.trainer import TRAINER_STATE_NAME
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
except ImportError as error:
    raise missing("hf", error) from error

from .._typing import Scalar
from ..backends.torch import AdaptiveRule, GradientClipCallback

__all__ = ["GradientClippingCallback"]

STATE_KEY = "agclip.GradientClippingCallback"  # in the Trainer state's stateful_callbacks


class GradientClippingCallback(TrainerCallback):
    """A ``TrainerCallback`` that clips the model's gradients with agclip.

    Needs ``TrainingArguments(max_grad_norm=0)`` (or ``None``): a Trainer
    clipping on its own as well is refused when training starts. Non-finite
    gradients give a ``NonFiniteGradientWarning`` naming the parameters, or a
    ``RuntimeError`` with ``error_if_nonfinite=True`` before anything is
    modified. Each training log (``logs["grad_norm"]``, also in
    ``state.log_history``) carries the pre-clip norm of the last step. Each
    checkpoint the Trainer saves holds the rule's state and the statistics (in its
    ``trainer_state.json``); ``train(resume_from_checkpoint=...)`` restores them: a
    resumed run clips as an uninterrupted one.

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
        if state.global_step > 0:  # resumed: the state comes from that checkpoint's own
            saved = _stateful(state).get(STATE_KEY)  # trainer_state.json
            if saved is not None:
                self.clipper.load_state_dict(saved)
            else:
                warnings.warn(
                    f"the checkpoint this run resumes from (step {state.global_step}) holds no "
                    "agclip state: the clip statistics and the rule's state start afresh",
                    stacklevel=2,
                )

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        # The Trainer has just written this checkpoint's trainer_state.json: written again
        # with the clip's state, it travels with the checkpoint wherever it is resumed from.
        _stateful(state)[STATE_KEY] = _plain(self.clipper.state_dict())
        folder = Path(str(args.output_dir)) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if args.should_save and (folder / TRAINER_STATE_NAME).is_file():
            state.save_to_json(str(folder / TRAINER_STATE_NAME))

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


def _stateful(state: TrainerState) -> dict[str, Any]:
    """The state's ``stateful_callbacks``: a dict of plain values by name (typed as a
    list: the callbacks it is made from)."""
    callbacks: dict[str, Any] | Any = state.stateful_callbacks
    if not isinstance(callbacks, dict):
        callbacks = state.stateful_callbacks = {}  # type: ignore[assignment]
    return callbacks


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
