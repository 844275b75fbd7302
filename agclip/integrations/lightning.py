"""Lightning: clip with agclip where Lightning clips, and log the norm.

Replace the Trainer's own clipping with one callback::

    # before: Trainer(gradient_clip_val=1.0)
    Trainer(callbacks=[GradientClipping(max_norm=1.0)])

It clips in ``on_before_optimizer_step``: after gradient accumulation and
after AMP unscaling, where Lightning itself clips. Built on the ``lightning``
package (``lightning.pytorch``).
"""

from __future__ import annotations

import warnings
from typing import Any

from .._missing import missing

try:
    import torch
    from lightning.pytorch import Callback, LightningModule, Trainer
except ImportError as error:
    raise missing("lightning", error) from error

from .._typing import Scalar
from ..backends._torch_rules import fresh_copy
from ..backends.torch import AdaptiveRule, GradientClipCallback

__all__ = ["GradientClipping"]


class GradientClipping(Callback):
    """Clip gradients with agclip before every optimizer step, and log the norm.

    The pre-clip norm is logged every step as ``name`` (default
    ``"grad_norm"``) and the share of steps that clipped as
    ``f"{name}_clip_rate"`` per epoch, through ``pl_module.log``: tensors that
    stay on the device, so no per-step host sync. Non-finite gradients give a
    ``NonFiniteGradientWarning`` naming the parameters, or a ``RuntimeError``
    with ``error_if_nonfinite=True`` before anything is modified.

    The Trainer's own ``gradient_clip_val`` must be unset: clipping twice is
    refused at setup. Each optimizer step clips that optimizer's parameters (as
    Lightning's own ``clip_gradients``), with manual optimization and several
    optimizers too: each optimizer has its own copy of an adaptive rule and its
    own statistics (``clippers[i]``; logged with the suffix ``_i`` from the second
    on). With ``precision="16-mixed"`` the clip is of the unscaled gradients, a
    fused optimizer's too (whose gradients Lightning leaves scaled until its step:
    Lightning's own clipping refuses that pair). The rules' states and the
    statistics are saved in Lightning's checkpoints: a resumed run clips as an
    uninterrupted one.

    Args:
        max_norm: the largest total gradient norm allowed, or an adaptive rule
            (``ZClip()``, ``AutoClip()``, ``AdaGC()`` from ``agclip.backends.torch``).
        norm_type: 2.0 (default), 1, ``inf`` or any p > 0.
        error_if_nonfinite: raise instead of warning on NaN/inf gradients.
        warn_nonfinite: warn on NaN/inf gradients (turn off with
            ``precision="16-mixed"``, whose scaler skips such steps itself).
        log_norm: log the norm and the clip rate.
        name: the logged name of the norm.

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
        log_norm: bool = True,
        name: str = "grad_norm",
    ):
        super().__init__()
        self._options: dict[str, Any] = {"norm_type": norm_type, "warn_nonfinite": warn_nonfinite}
        self._options["error_if_nonfinite"] = error_if_nonfinite
        self.clipper = GradientClipCallback(max_norm, **self._options)
        self.clippers = [self.clipper]  # one per optimizer, in the trainer's order
        self._module: LightningModule | None = None
        self.log_norm = log_norm
        self.name = name

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if trainer.gradient_clip_val:
            raise ValueError(
                f"Trainer(gradient_clip_val={trainer.gradient_clip_val}) would clip the "
                "gradients a second time after agclip's GradientClipping: leave "
                "gradient_clip_val unset (None or 0)."
            )
        self._module = pl_module
        for clipper in self.clippers:
            clipper.set_model(pl_module)

    def _clipper(self, index: int) -> GradientClipCallback:
        given = self.clipper.max_norm
        while len(self.clippers) <= index:  # each further optimizer: a rule of its own
            rule = fresh_copy(given) if isinstance(given, AdaptiveRule) else given
            clipper = GradientClipCallback(rule, **self._options)
            if self._module is not None:
                clipper.set_model(self._module)
            self.clippers.append(clipper)
        return self.clippers[index]

    def on_before_optimizer_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: Any
    ) -> None:
        # This optimizer's parameters only (Lightning steps each optimizer on its own),
        # and unscaled: with 16-mixed a fused optimizer's gradients are still scaled here.
        index = next((i for i, o in enumerate(trainer.optimizers) if o is optimizer), 0)
        clipper = self._clipper(index)
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        norm = clipper.on_after_backward(optimizer, scaler=scaler)
        if self.log_norm:
            name = self.name if index == 0 else f"{self.name}_{index}"
            clipped = torch.as_tensor(clipper.last_clipped, dtype=torch.float32)
            pl_module.log(name, norm, on_step=True, on_epoch=False, batch_size=1)
            # batch_size=1: the epoch's rate is the share of steps, not of samples
            pl_module.log(f"{name}_clip_rate", clipped, on_step=False, on_epoch=True, batch_size=1)

    def on_load_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self.state_key not in checkpoint.get("callbacks", {}):
            warnings.warn(
                "the checkpoint holds no state of agclip's GradientClipping: the clip "
                "statistics and the rules' states start afresh in this resumed run",
                stacklevel=2,
            )

    def state_dict(self) -> dict[str, Any]:
        """Each optimizer's statistics and rule state, for Lightning's checkpoints."""
        return {"clippers": [clipper.state_dict() for clipper in self.clippers]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for index, saved in enumerate(state_dict.get("clippers", [])):
            self._clipper(index).load_state_dict(saved)
