"""The cost of clipping inside a full GPT training step on the CPU, clipper by clipper.

A step is forward, backward, clip, ``AdamW(fused=True).step()``, on the demo's GPT
(``demo/gpt.py``) and on GPT-2 small (12 layers, width 768, vocab 50257, tied head:
124,439,808 parameters) with a short context and batch. Every arm, and the step
alone (no clip) as the baseline, runs in interleaved rounds in a shuffled order
(``common.interleaved_samples``) on one model and one optimizer. Per arm: the step's
time, the clip call's time inside it, the clip's share of the step, and the step's
time minus the step alone's time in the same round; medians with the 20th-80th
percentiles over rounds.

    python benchmarks/bench_gpt_overhead.py [--repeats 20] [--json out.json]
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import cpu_model, interleaved_samples, machine
from report import speed_benchmark

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the demo package
from agclip.backends.torch import AdaGC, AutoClip, ZClip, clip_grad_norm_
from demo.gpt import GPT, GPTConfig, loss_of

MAX_NORM = 1.0
# Each clip call runs this often on the first gradients before timing, so the
# adaptive rules time their adaptive path (warm-up: AdaGC 100 steps, ZClip 25).
WARM_UP_CALLS = 101

Arm = Callable[[GPT, torch.optim.Optimizer], Callable[[], object]]

# Arms whose call clips between backward() and optimizer.step(): one line per arm.
CLIP_ARMS: dict[str, Arm] = {
    "torch.nn.utils.clip_grad_norm_": lambda model, _: partial(
        torch.nn.utils.clip_grad_norm_, list(model.parameters()), MAX_NORM
    ),
    "agclip clip_grad_norm_": lambda model, _: partial(
        clip_grad_norm_, list(model.parameters()), MAX_NORM
    ),
    "agclip ZClip().step": lambda model, _: partial(ZClip().step, model),
    "agclip AutoClip().step": lambda model, _: partial(AutoClip().step, model),
    "agclip AdaGC().step": lambda model, _: partial(AdaGC().step, model),
}

# Arms whose call also takes the optimizer step (it replaces optimizer.step()), e.g.
#   "agclip clip_and_step": lambda _, optimizer: partial(clip_and_step, optimizer, MAX_NORM),
# Their clip cannot be timed alone: their overhead is their step minus the step alone.
STEP_ARMS: dict[str, Arm] = {}

BASELINE = "step alone (no clip)"


@dataclass(frozen=True)
class Shape:
    config: GPTConfig
    batch: int
    context: int  # tokens per sequence fed (the position table may be longer)

    def describe(self) -> str:
        c = self.config
        head = "tied" if c.tie_head else "untied"
        return (
            f"{c.layers} layers, width {c.width}, vocab {c.vocab}, {head} head; "
            f"batch {self.batch} x {self.context} tokens"
        )


MODELS = {
    "demo GPT": Shape(GPTConfig(), batch=16, context=64),
    "GPT-2 small": Shape(
        GPTConfig(vocab=50257, context=1024, width=768, layers=12, heads=12, tie_head=True),
        batch=8,
        context=32,
    ),
}


def measure(
    shape: Shape,
    repeats: int,
    clip_arms: dict[str, Arm] | None = None,
    step_arms: dict[str, Arm] | None = None,
    warm_up_calls: int = WARM_UP_CALLS,
) -> dict[str, list[dict[str, float]]]:
    """Arm -> one record per round: ``step`` and ``clip`` seconds (``clip`` is NaN for
    the baseline and for step arms) and the returned ``norm`` (NaN if none)."""
    clip_arms = CLIP_ARMS if clip_arms is None else clip_arms
    step_arms = STEP_ARMS if step_arms is None else step_arms
    torch.manual_seed(0)
    model = GPT(shape.config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    x = torch.randint(0, shape.config.vocab, (shape.batch, shape.context))
    y = torch.randint(0, shape.config.vocab, (shape.batch, shape.context))

    def forward_backward() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_of(model, x, y).backward()

    clips = {name: make(model, optimizer) for name, make in clip_arms.items()}
    forward_backward()
    for clip in clips.values():
        for _ in range(warm_up_calls):
            clip()

    def timed(call: Callable[[], object] | None, *, steps: bool = False) -> Any:
        def run() -> dict[str, float]:
            start = time.perf_counter()
            forward_backward()
            backward_done = time.perf_counter()
            out = call() if call is not None else None
            clip_done = time.perf_counter()
            if not steps:
                optimizer.step()
            end = time.perf_counter()
            clipped = call is not None and not steps
            return {
                "step": end - start,
                "clip": clip_done - backward_done if clipped else math.nan,
                "norm": float(out) if isinstance(out, torch.Tensor) else math.nan,
            }

        return run

    cases = {BASELINE: timed(None)}
    cases |= {name: timed(clip) for name, clip in clips.items()}
    cases |= {name: timed(make(model, optimizer), steps=True) for name, make in step_arms.items()}
    return interleaved_samples(cases, repeats)


def _spread(values: list[float], scale: float = 1.0, digits: int = 1) -> str:
    """Median (20th-80th percentile)."""
    if not values or not all(math.isfinite(v) for v in values):
        return "-"
    low, mid, high = np.percentile(np.asarray(values) * scale, [20, 50, 80])
    return f"{mid:.{digits}f} ({low:.{digits}f}-{high:.{digits}f})"


def summarize(samples: dict[str, list[dict[str, float]]]) -> dict[str, dict[str, Any]]:
    """Per arm: its rounds' step and clip seconds, the clip's share of each round's
    step, and each round's step minus the baseline's in that round."""
    base = [r["step"] for r in samples[BASELINE]]
    stats = {}
    for name, records in samples.items():
        steps = [r["step"] for r in records]
        clips = [r["clip"] for r in records]
        stats[name] = {
            "step": steps,
            "clip": clips,
            "share": [c / s for c, s in zip(clips, steps, strict=True)],
            "extra": [s - b for s, b in zip(steps, base, strict=True)],
            "norm": statistics.median(r["norm"] for r in records),
        }
    return stats


def rows(stats: dict[str, dict[str, Any]]) -> list[list[str]]:
    table = []
    for name, s in stats.items():
        table.append(
            [
                name,
                _spread(s["step"], 1e3),
                _spread(s["clip"], 1e3, 2),
                _spread(s["share"], 100, 2) + ("" if name == BASELINE else " %"),
                "-" if name == BASELINE else _spread(s["extra"], 1e3),
                "-" if math.isnan(s["norm"]) else f"{s['norm']:.3g}",
            ]
        )
    return table


HEADERS = [
    "arm",
    "step ms",
    "clip call ms",
    "clip / step",
    "step - step alone, ms",
    "norm returned (median)",
]


def main() -> None:
    args, report = speed_benchmark("gpt_overhead", __doc__, repeats=20)
    report.note(
        f"CPU: {cpu_model()}; {machine()}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads. Every arm and the step alone run in "
        f"{args.repeats} interleaved rounds (a shuffled order each round, after one "
        f"warm-up round) on one model and one `AdamW(fused=True)`; `max_norm` {MAX_NORM:g} "
        "where an arm has one; each clip call ran "
        f"{WARM_UP_CALLS} times on the first gradients before timing, so the adaptive "
        "rules are past their warm-up. Cells: median (20th-80th percentile) over rounds. "
        "`clip / step`: the clip call's share of its own step, round by round; "
        "`step - step alone`: the step's time minus the step alone's time in the same "
        "round (the measure for an arm whose call also takes the optimizer step); a "
        "step's own round-to-round spread can exceed a clip's cost, so read it with its "
        "percentiles."
    )
    for name, shape in MODELS.items():
        parameters = sum(p.numel() for p in GPT(shape.config).parameters())
        stats = summarize(measure(shape, args.repeats))
        report.table(
            HEADERS,
            rows(stats),
            caption=f"{name} ({parameters:,} parameters; {shape.describe()}):",
        )
    report.emit(args.json)


if __name__ == "__main__":
    main()
