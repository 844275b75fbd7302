"""The experiment in PyTorch: an LSTM trained with SGD + momentum, clipped three ways."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from agclip.backends.torch import GradientClipCallback, clip_grad_norm_, clip_grad_value_

from .adding_problem import Run, batches


class AddingRNN(torch.nn.Module):
    """A recurrent net reading the sequence; a linear head on the last state."""

    def __init__(self, cell: str = "lstm", hidden: int = 64):
        super().__init__()
        if cell == "lstm":
            self.rnn: torch.nn.Module = torch.nn.LSTM(2, hidden, batch_first=True)
        else:  # the vanilla tanh RNN of Pascanu et al.
            self.rnn = torch.nn.RNN(2, hidden, nonlinearity="tanh", batch_first=True)
        self.head = torch.nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        prediction: torch.Tensor = self.head(out[:, -1])
        return prediction


def _clippers(
    model: torch.nn.Module, max_norm: float, clip_value: float
) -> dict[str, Callable[[], bool] | None]:
    """config name -> a function that clips the model's gradients and returns
    whether clipping changed anything."""
    callback = GradientClipCallback(max_norm=max_norm, warn_nonfinite=False)
    callback.set_model(model)
    params = list(model.parameters())

    def with_callback() -> bool:
        callback.on_after_backward()
        return callback.last_norm is not None and bool(callback.last_norm > max_norm)

    def with_function() -> bool:
        return bool(clip_grad_norm_(params, max_norm) > max_norm)

    def by_value() -> bool:
        fired = any(bool(p.grad.abs().max() > clip_value) for p in params if p.grad is not None)
        clip_grad_value_(params, clip_value)
        return fired

    return {
        "no clipping": None,
        f"global norm {max_norm:g} (callback)": with_callback,
        f"global norm {max_norm:g} (clip_grad_norm_)": with_function,
        f"value {clip_value:g}": by_value,
    }


def run_all(
    *,
    steps: int,
    seed: int,
    lr: float,
    max_norm: float,
    clip_value: float,
    progress: Callable[..., Iterable[Any]],
    cell: str = "lstm",
    length: int = 20,
    stop_at_target: bool = False,
    only: Callable[[str], bool] | None = None,
) -> list[Run]:
    """Train one model per clipping config; ``only`` filters configs by name,
    ``stop_at_target`` ends a run once it reaches the target loss. Runs on two
    threads, and leaves torch's thread count as it was."""
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        return _train_all(
            seed, steps, lr, max_norm, clip_value, progress, cell, length, stop_at_target, only
        )
    finally:
        torch.set_num_threads(previous)


def _train_all(
    seed: int,
    steps: int,
    lr: float,
    max_norm: float,
    clip_value: float,
    progress: Callable[..., Iterable[Any]],
    cell: str,
    length: int,
    stop_at_target: bool,
    only: Callable[[str], bool] | None,
) -> list[Run]:
    runs = []
    configs = [c for c in _clippers(AddingRNN(cell), max_norm, clip_value) if not only or only(c)]
    for config in configs:
        torch.manual_seed(seed)
        model = AddingRNN(cell)
        clip = _clippers(model, max_norm, clip_value)[config]
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
        run = Run("PyTorch", config)
        data = batches(seed, steps, length=length)
        bar = progress(data, total=steps, desc=f"PyTorch {config:<32}")
        for x, y in bar:
            optimizer.zero_grad()
            loss = torch.nn.functional.mse_loss(model(torch.from_numpy(x)), torch.from_numpy(y))
            loss.backward()
            if clip is not None:
                run.clipped_steps += clip()
            optimizer.step()
            if not run.record(loss.item()) or (stop_at_target and run.steps_to_target):
                break
        runs.append(run)
    return runs
