"""The table and the figure of the GPT part of the demo."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from .gpt_runs import (
    SMOOTHING,
    SPIKE_FACTOR,
    SPIKE_MIN_HISTORY,
    SPIKE_WINDOW,
    TARGET_LOSS,
    GPTRun,
    count_spikes,
)
from .report import text_table

STYLES: dict[str, dict[str, Any]] = {
    "no clipping": {"color": "tab:red", "linestyle": "-", "linewidth": 1.0, "zorder": 2},
    "global": {"color": "tab:blue", "linestyle": (0, (5, 2)), "linewidth": 1.2, "zorder": 3},
    "ZClip": {"color": "tab:green", "linestyle": (0, (1, 1)), "linewidth": 1.4, "zorder": 4},
}
INSET_STEPS = 60  # warm-up and just after it: where the spikes of these runs come


def _style(config: str) -> dict[str, Any]:
    return STYLES["global" if config.startswith("global") else config]


def worst_loss(run: GPTRun) -> str:
    """The highest training loss after the first steps (which start at ln vocab)."""
    later = run.losses[SPIKE_MIN_HISTORY:]
    if not later:
        return "-"
    if not all(math.isfinite(v) for v in later):
        return "inf/NaN"
    return f"{max(later):.2f}"


def table(runs: list[GPTRun]) -> str:
    headers = [
        "config",
        "final val loss",
        f"steps to loss<{TARGET_LOSS}",
        "loss spikes",
        "worst loss",
        "clipping fired",
    ]
    rows = []
    for run in runs:
        rows.append(
            [
                run.config,
                f"diverged at step {run.diverged_at}" if run.diverged else f"{run.val_loss:.3f}",
                str(run.steps_to_target) if run.steps_to_target is not None else "never",
                str(count_spikes(run.losses)),
                worst_loss(run),
                "-"
                if run.config == "no clipping"
                else f"{run.clipped_steps / max(1, len(run.losses)):.0%}",
            ]
        )
    notes = [
        "",
        "final val loss: cross-entropy (nats per character) on 8 fixed batches of held-out",
        "  text.",
        f"diverged: a non-finite loss, or a {SMOOTHING}-step mean more than 1 nat above a",
        "  uniform guess; the run stops there, and its loss is not a result.",
        f"steps to loss<{TARGET_LOSS}: the first step where the {SMOOTHING}-step mean training",
        "  loss is below the target.",
        f"loss spikes: steps whose training loss is over {SPIKE_FACTOR:g}x the median of the",
        f"  previous {SPIKE_WINDOW}. worst loss: the highest training loss after step"
        f" {SPIKE_MIN_HISTORY}.",
        "clipping fired: the share of steps whose gradients were scaled.",
    ]
    return "\n".join([text_table(headers, rows), *notes])


def same_start(run: GPTRun, other: GPTRun) -> int:
    """How many first steps two runs share exactly (the same losses)."""
    n = 0
    for a, b in zip(run.losses, other.losses, strict=False):
        if a != b:
            break
        n += 1
    return n


def _label(run: GPTRun, runs: list[GPTRun]) -> str:
    if run.config == "no clipping":
        return run.config
    label = f"{run.config} (clipped {run.clipped_steps / max(1, len(run.losses)):.0%} of steps"
    plain = next((r for r in runs if r.config == "no clipping"), None)
    shared = same_start(run, plain) if plain is not None else 0
    if shared >= SPIKE_MIN_HISTORY:
        label += f"; the same as no clipping for the first {shared} steps"
    return label + ")"


def _draw(ax: Any, runs: list[GPTRun], values: str, steps: int | None = None) -> None:
    for run in runs:
        ys = np.asarray(getattr(run, values), dtype=np.float64)[:steps]
        ax.plot(np.arange(1, len(ys) + 1), ys, label=_label(run, runs), **_style(run.config))
        if run.diverged and run.diverged_at is not None and len(ys) >= run.diverged_at:
            finite = ys[np.isfinite(ys)]
            ax.plot(
                [len(ys)],
                [finite[-1] if finite.size else 0.0],
                marker="X",
                markersize=9,
                color=_style(run.config)["color"],
            )


def plot(runs: list[GPTRun], path: Path, title: str, *, max_norm: float, warmup: int) -> Path:
    """Left: the training loss, with an inset of the first steps; right: the pre-clip
    gradient norm of each run, log-scaled, with the global-norm threshold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (loss_ax, norm_ax) = plt.subplots(1, 2, figsize=(13, 6))
    _draw(loss_ax, runs, "losses")
    for run in runs:
        if run.diverged:
            loss_ax.annotate(
                f"diverged at step {run.diverged_at}",
                (len(run.losses), 5.0),
                fontsize=8,
                color=_style(run.config)["color"],
            )
    finite = [v for run in runs for v in run.losses if math.isfinite(v)]
    top = min(max(finite, default=5.0) * 1.05, 20.0)
    loss_ax.axhline(TARGET_LOSS, color="grey", linestyle=":", linewidth=0.8)
    loss_ax.axvline(warmup, color="grey", linestyle="--", linewidth=0.6)
    loss_ax.text(warmup, top * 0.97, " end of warm-up", fontsize=7, va="top", color="grey")
    loss_ax.set(
        xlabel="step",
        ylabel="training loss (nats per character)",
        ylim=(max(0.0, min(finite, default=1.0) - 0.2), top),
    )
    # Under the axes: the space above the curves holds the inset.
    loss_ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.12))
    steps = min(INSET_STEPS, max(len(run.losses) for run in runs))
    inset = loss_ax.inset_axes((0.42, 0.45, 0.55, 0.45))
    _draw(inset, runs, "losses", steps)
    inset.set_xlim(0.5, steps + 0.5)
    inset.set_title(f"first {steps} steps", fontsize=7)
    inset.tick_params(labelsize=6)

    _draw(norm_ax, runs, "norms")
    norm_ax.axhline(max_norm, color="tab:blue", linestyle=":", linewidth=0.8)
    norm_ax.text(1, max_norm, f" max_norm {max_norm:g}", fontsize=7, va="bottom", color="tab:blue")
    norm_ax.set(xlabel="step", ylabel="gradient norm before clipping", yscale="log")
    norm_ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.12))
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
