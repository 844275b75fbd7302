"""The adding problem (Hochreiter and Schmidhuber, 1997) and the run record shared by backends."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

TARGET_LOSS = 0.05  # clearly better than the trivial baseline (predict 1.0): MSE ~0.167
DIVERGED_LOSS = 1e3  # a loss above this (or NaN/inf) counts as diverged
SMOOTHING = 20  # steps-to-target uses the mean of the last 20 losses


def batches(
    seed: int, steps: int, batch: int = 64, length: int = 20
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``steps`` batches ``(x, y)``: x (batch, length, 2) float32, y (batch, 1).

    Channel 0 holds uniform values, channel 1 marks two positions (one in each
    half); the target is the sum of the two marked values.
    """
    rng = np.random.default_rng(seed)
    rows = np.arange(batch)
    for _ in range(steps):
        values = rng.uniform(0.0, 1.0, (batch, length)).astype(np.float32)
        first = rng.integers(0, length // 2, batch)
        second = rng.integers(length // 2, length, batch)
        marks = np.zeros((batch, length), np.float32)
        marks[rows, first] = 1.0
        marks[rows, second] = 1.0
        x = np.stack([values, marks], axis=-1)
        y = (values[rows, first] + values[rows, second])[:, None]
        yield x, y


def first_mean_below(losses: list[float], target: float, window: int) -> int | None:
    """The first step at which the mean of the last ``window`` losses is below
    ``target`` (None if it never is)."""
    if len(losses) < window:
        return None
    smooth = np.convolve(np.asarray(losses, np.float64), np.ones(window) / window, "valid")
    hits = np.nonzero(smooth < target)[0]
    return int(hits[0]) + window if hits.size else None


@dataclass
class Run:
    """One training run's record."""

    framework: str
    config: str
    losses: list[float] = field(default_factory=list)
    clipped_steps: int = 0

    def record(self, loss: float) -> bool:
        """Add a loss; False once the run has diverged (the caller stops)."""
        self.losses.append(loss)
        return bool(np.isfinite(loss)) and loss < DIVERGED_LOSS

    @property
    def diverged(self) -> bool:
        last = self.losses[-1] if self.losses else 0.0
        return not np.isfinite(last) or last >= DIVERGED_LOSS

    @property
    def steps_to_target(self) -> int | None:
        return None if self.diverged else first_mean_below(self.losses, TARGET_LOSS, SMOOTHING)

    @property
    def final_loss(self) -> float:
        return float(np.mean(self.losses[-SMOOTHING:])) if self.losses else float("nan")
