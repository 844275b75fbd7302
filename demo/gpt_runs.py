"""The GPT experiment: the small GPT of ``gpt.py`` trained with AdamW (linear warm-up,
cosine decay) on Python source, without clipping and with each clipping rule.

Every run of a given seed starts from the same weights and sees the same batches,
so runs differ only in how their gradients were clipped.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, cast

import torch

from agclip.backends.torch import (
    AdaGC,
    AutoClip,
    ZClip,
    adaptive_clip_grad_,
    clip_grad_norm_,
    get_total_norm,
)

from .adding_problem import first_mean_below
from .gpt import GPT, CharData, GPTConfig, adamw, loss_of, warmup_cosine

TARGET_LOSS = 2.5  # nats per character; character frequencies alone score 3.07 on this text
SMOOTHING = 20  # steps to target and divergence use means over 20 steps
# A spike: a step whose training loss is more than SPIKE_FACTOR times the median of
# the previous SPIKE_WINDOW steps. Batches differ in difficulty (every arm of a seed
# sees the same ones), so the factor sits above that batch-to-batch spread.
SPIKE_WINDOW = 20
SPIKE_FACTOR = 1.3
SPIKE_MIN_HISTORY = 5


@dataclass(frozen=True)
class Setup:
    """The sizes of one experiment (the demo's by default)."""

    model: GPTConfig = field(default_factory=GPTConfig)
    batch: int = 16
    steps: int = 300
    warmup: int = 30
    eval_batches: int = 8  # validation: 8 fixed batches of 32 windows
    threads: int = 2  # torch threads while training

    def describe(self) -> str:
        m = self.model
        head = "tied" if m.tie_head else "untied"
        return (
            f"GPT ({m.layers} layers, width {m.width}, {m.heads} heads, context {m.context}, "
            f"{head} head), batch {self.batch}, {self.steps} steps"
        )


DEMO = Setup()
# For tests: the same code path in a fraction of a second per run.
# One thread: tensors this small gain nothing from two, and lose much when a core is busy.
TOY = Setup(
    model=GPTConfig(context=16, width=32, layers=1, heads=2),
    batch=4,
    steps=25,
    warmup=5,
    threads=1,
)

Clip = Callable[[], object]


def _no_clip(model: GPT) -> Clip:
    return lambda: None


def _global(max_norm: float, model: GPT) -> Clip:
    return partial(clip_grad_norm_, list(model.parameters()), max_norm)


def arms(max_norms: Sequence[float] = (1.0,)) -> dict[str, Callable[[GPT], Clip]]:
    """Arm name -> a function that, given a fresh model, returns its clip call (run
    after ``backward()``, before the optimizer step). The rules use their papers'
    defaults; AGC leaves the output head out, as Brock et al. do."""
    table: dict[str, Callable[[GPT], Clip]] = {"no clipping": _no_clip}
    for max_norm in max_norms:
        table[f"global norm {max_norm:g}"] = partial(_global, max_norm)
    table["ZClip"] = lambda model: partial(ZClip().step, model)
    table["AutoClip"] = lambda model: partial(AutoClip().step, model)
    table["AdaGC"] = lambda model: partial(AdaGC().step, model)
    # Named parameters, so that ``exclude`` matches names (the annotation says tensors).
    table["AGC 0.01 (not the head)"] = lambda model: partial(
        adaptive_clip_grad_, cast(Any, list(model.named_parameters())), 0.01, exclude="head.*"
    )
    return table


@dataclass
class GPTRun:
    """One training run's record. ``limit``: the divergence threshold (nats)."""

    config: str
    lr: float
    seed: int
    limit: float
    losses: list[float] = field(default_factory=list)
    norms: list[float] = field(default_factory=list)  # pre-clip global norms
    clipped_steps: int = 0
    diverged_at: int | None = None
    val_loss: float = float("nan")

    def record(self, loss: float, norm: float, clipped: bool) -> bool:
        """Add a step; False once the run has diverged (the caller stops)."""
        self.losses.append(loss)
        self.norms.append(norm)
        self.clipped_steps += clipped
        recent = self.losses[-SMOOTHING:]
        if not math.isfinite(loss) or (
            len(recent) == SMOOTHING and sum(recent) / SMOOTHING > self.limit
        ):
            self.diverged_at = len(self.losses)
        return self.diverged_at is None

    @property
    def diverged(self) -> bool:
        return self.diverged_at is not None

    @property
    def steps_to_target(self) -> int | None:
        """The first step where the mean training loss of the last 20 steps is below
        ``TARGET_LOSS``; None for a diverged run or one that never gets there."""
        return None if self.diverged else first_mean_below(self.losses, TARGET_LOSS, SMOOTHING)


def count_spikes(
    losses: Sequence[float],
    *,
    window: int = SPIKE_WINDOW,
    factor: float = SPIKE_FACTOR,
    min_history: int = SPIKE_MIN_HISTORY,
) -> int:
    """The number of steps whose loss exceeds ``factor`` times the median of the up to
    ``window`` finite losses before it; steps with fewer than ``min_history`` steps
    before them are not judged. A non-finite loss counts as a spike."""
    spikes = 0
    for step in range(min_history, len(losses)):
        loss = losses[step]
        if not math.isfinite(loss):
            spikes += 1
            continue
        history = [v for v in losses[max(0, step - window) : step] if math.isfinite(v)]
        if history and loss > factor * statistics.median(history):
            spikes += 1
    return spikes


def divergence_limit(vocab: int) -> float:
    """A run diverged when its loss is non-finite or its mean over 20 steps is more than
    1 nat above a uniform guess (ln vocab): no longer learning, not a passing spike."""
    return math.log(vocab) + 1.0


@torch.no_grad()
def validation_loss(model: GPT, data: CharData, setup: Setup) -> float:
    generator = torch.Generator().manual_seed(1234)  # the same windows for every run
    model.eval()
    total = 0.0
    for _ in range(setup.eval_batches):
        x, y = data.batch("val", 32, setup.model.context, generator)
        total += float(loss_of(model, x, y))
    model.train()
    return total / setup.eval_batches


def train(
    arm: str,
    make_clip: Callable[[GPT], Clip],
    *,
    lr: float,
    seed: int,
    data: CharData,
    setup: Setup = DEMO,
    progress: Callable[..., Iterable[int]] | None = None,
) -> GPTRun:
    """Train one model from seed ``seed`` with the clip of ``make_clip``."""
    torch.manual_seed(seed)
    model = GPT(setup.model)
    optimizer = adamw(model, lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(setup.warmup, setup.steps)
    )
    clip = make_clip(model)
    params = list(model.parameters())
    generator = torch.Generator().manual_seed(seed)
    run = GPTRun(arm, lr, seed, divergence_limit(setup.model.vocab))
    steps: Iterable[int] = range(setup.steps)
    if progress is not None:
        steps = progress(steps, total=setup.steps, desc=f"GPT {arm:<24}")
    for _ in steps:
        x, y = data.batch("train", setup.batch, setup.model.context, generator)
        optimizer.zero_grad(set_to_none=True)
        loss = loss_of(model, x, y)
        loss.backward()
        norm = float(get_total_norm([p.grad for p in params if p.grad is not None]))
        clip()
        clipped = arm != "no clipping" and (
            float(get_total_norm([p.grad for p in params if p.grad is not None]))
            < norm * (1 - 1e-5)
        )
        optimizer.step()
        schedule.step()
        if not run.record(loss.item(), norm, clipped):
            break
    if not run.diverged:
        run.val_loss = validation_loss(model, data, setup)
    return run


def run_all(
    *,
    data: CharData,
    lr: float,
    seed: int,
    max_norm: float,
    progress: Callable[..., Iterable[int]] | None = None,
    setup: Setup = DEMO,
) -> list[GPTRun]:
    """The demo's three runs: no clipping, global-norm clipping, ZClip. Runs on
    ``setup.threads`` threads and leaves torch's thread count as it was."""
    table = arms((max_norm,))
    chosen = ["no clipping", f"global norm {max_norm:g}", "ZClip"]
    previous = torch.get_num_threads()
    torch.set_num_threads(setup.threads)
    try:
        return [
            train(name, table[name], lr=lr, seed=seed, data=data, setup=setup, progress=progress)
            for name in chosen
        ]
    finally:
        torch.set_num_threads(previous)
