"""The cost of clipping inside a full GPT training step on the CPU, clipper by clipper.

A step is forward, backward, clip, ``AdamW(fused=True).step()``, on the demo's GPT
(``demo/gpt.py``) and on GPT-2 small (12 layers, width 768, vocab 50257, tied head:
124,439,808 parameters) with a short context and batch. Every arm, and the step
alone (no clip) as the baseline, runs in interleaved rounds in a shuffled order
(``common.interleaved_samples``) on one model and one optimizer.

An arm's clip cost is the time from the end of ``backward()`` to the end of the
optimizer step, minus the optimizer step alone's time in the same round: the same
measure for an arm that clips then steps and for ``clip_and_step``, whose one call
does both (its fused step takes the clip). The clip call's own time is shown too
where it can be timed apart. Medians with the 20th-80th percentiles over rounds.

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
from common import interleaved_samples, machine
from report import speed_benchmark

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the demo package
from agclip.backends.torch import AdaGC, AutoClip, ZClip, clip_and_step, clip_grad_norm_
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


def _foreach_norm_read(grads: list[torch.Tensor]) -> torch.Tensor:
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))


def _sum_read(grads: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([g.sum() for g in grads]).sum()


def floor(read: Callable[[list[torch.Tensor]], torch.Tensor]) -> Arm:
    """The least any clip handed to this step can cost: one read of every gradient,
    then the fused step carrying a gradient scale (which the kernel applies, writing
    every gradient back). Two reads, since the cheaper one depends on the model:
    one ``_foreach_norm`` call (small models: the cost is per call) or a ``sum`` per
    tensor (large ones: the cost is memory; ``_foreach_norm`` is slower there)."""

    def arm(model: GPT, optimizer: torch.optim.Optimizer) -> Callable[[], object]:
        params, scale = list(model.parameters()), torch.tensor(1.0)

        def call() -> torch.Tensor:
            value = read([p.grad for p in params])
            optimizer.grad_scale = scale  # type: ignore[attr-defined]  # as GradScaler does
            try:
                optimizer.step()
            finally:
                del optimizer.grad_scale  # type: ignore[attr-defined]
            return value

        return call

    return arm


FLOORS = {
    "floor: one _foreach_norm, the step carrying a scale": floor(_foreach_norm_read),
    "floor: one sum per tensor, the step carrying a scale": floor(_sum_read),
}
# Arms whose call also takes the optimizer step (it replaces optimizer.step()).
STEP_ARMS: dict[str, Arm] = {
    "agclip clip_and_step": lambda _, optimizer: partial(clip_and_step, optimizer, MAX_NORM),
    "agclip clip_and_step(ZClip())": lambda _, optimizer: partial(
        clip_and_step, optimizer, ZClip()
    ),
    **FLOORS,
}

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
    steps = {name: make(model, optimizer) for name, make in step_arms.items()}
    forward_backward()
    for call in [*clips.values(), *steps.values()]:
        for _ in range(warm_up_calls):
            call()

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
                "after_backward": end - backward_done,  # clip and optimizer step
                "norm": float(out) if isinstance(out, torch.Tensor) else math.nan,
            }

        return run

    cases = {BASELINE: timed(None)}
    cases |= {name: timed(clip) for name, clip in clips.items()}
    cases |= {name: timed(call, steps=True) for name, call in steps.items()}
    return interleaved_samples(cases, repeats)


def _spread(values: list[float], scale: float = 1.0, digits: int = 1) -> str:
    """Median (20th-80th percentile)."""
    if not values or not all(math.isfinite(v) for v in values):
        return "-"
    low, mid, high = np.percentile(np.asarray(values) * scale, [20, 50, 80])
    return f"{mid:.{digits}f} ({low:.{digits}f}-{high:.{digits}f})"


def summarize(samples: dict[str, list[dict[str, float]]]) -> dict[str, dict[str, Any]]:
    """Per arm and round: the step's and the clip call's seconds, the clip's cost (its
    clip and optimizer step minus the step alone's optimizer step in that round) and
    that cost's share of the arm's step."""
    alone = [r["after_backward"] for r in samples[BASELINE]]
    stats = {}
    for name, records in samples.items():
        steps = [r["step"] for r in records]
        cost = [r["after_backward"] - a for r, a in zip(records, alone, strict=True)]
        stats[name] = {
            "step": steps,
            "clip": [r["clip"] for r in records],
            "cost": cost,
            "share": [c / s for c, s in zip(cost, steps, strict=True)],
            "norm": statistics.median(r["norm"] for r in records),
        }
    return stats


def rows(stats: dict[str, dict[str, Any]]) -> list[list[str]]:
    table = []
    for name, s in stats.items():
        base = name == BASELINE
        table.append(
            [
                name,
                _spread(s["step"], 1e3),
                _spread(s["clip"], 1e3, 2),
                "-" if base else _spread(s["cost"], 1e3, 2),
                "-" if base else _spread(s["share"], 100, 2) + " %",
                "-" if math.isnan(s["norm"]) or name in FLOORS else f"{s['norm']:.3g}",
            ]
        )
    return table


def lowest_share(stats: dict[str, dict[str, Any]]) -> tuple[str, float]:
    """The agclip arm with the lowest median share of the step, and that share."""
    shares = {name: statistics.median(s["share"]) for name, s in stats.items() if "agclip" in name}
    best = min(shares, key=shares.__getitem__)
    return best, shares[best]


HEADERS = [
    "arm",
    "step ms",
    "clip call ms",
    "clip cost ms",
    "clip cost / step",
    "norm returned (median)",
]


def main() -> None:
    args, report = speed_benchmark("gpt_overhead", __doc__, repeats=20)
    report.note(
        f"CPU: {machine()}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads. Every arm and the step alone run in "
        f"{args.repeats} interleaved rounds (a shuffled order each round, after one "
        f"warm-up round) on one model and one `AdamW(fused=True)`; `max_norm` {MAX_NORM:g} "
        "where an arm has one; each clip call ran "
        f"{WARM_UP_CALLS} times on the first gradients before timing, so the adaptive "
        "rules are past their warm-up. Cells: median (20th-80th percentile) over rounds. "
        "`clip cost`: from the end of `backward()` to the end of the optimizer step, minus "
        "the step alone's optimizer step in the same round (for `clip_and_step`, whose "
        "fused step takes the clip, the one measure there is); `clip call`: the clip "
        "call alone, where it can be timed apart."
    )
    for name, shape in MODELS.items():
        parameters = sum(p.numel() for p in GPT(shape.config).parameters())
        stats = summarize(measure(shape, args.repeats))
        report.table(
            HEADERS,
            rows(stats),
            caption=f"{name} ({parameters:,} parameters; {shape.describe()}):",
        )
        torch_share = statistics.median(stats["torch.nn.utils.clip_grad_norm_"]["share"])
        floor_share = min(statistics.median(stats[name]["share"]) for name in FLOORS)
        best, share = lowest_share(stats)
        report.ratio(share / torch_share, against="torch", model=name, case="lowest clip share")
        report.note(
            f"{name}: agclip's lowest clip share is `{best}`, {100 * share:.2f}% of the "
            f"step against {100 * torch_share:.2f}% for torch's `clip_grad_norm_`: "
            f"{share / torch_share:.2f}x torch's share. The lower floor's share is "
            f"{100 * floor_share:.2f}% ({floor_share / torch_share:.2f}x torch's): no clip "
            "handed to this step can go below it."
        )
    report.emit(args.json)


if __name__ == "__main__":
    main()
