"""Tables and the loss-curve plot for the demo."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .adding_problem import DIVERGED_LOSS, SMOOTHING, TARGET_LOSS, Run


def table(runs: list[Run]) -> str:
    headers = [
        "config",
        "diverged",
        "final loss",
        f"steps to MSE<{TARGET_LOSS}",
        "clipping fired",
        "clip time / step",
    ]
    rows = []
    for run in runs:
        steps = len(run.losses)
        clipped = "-" if run.config == "no clipping" else f"{run.clipped_steps / steps:.0%}"
        share = "-" if run.config == "no clipping" else f"{run.clip_share:.1%}"
        rows.append(
            [
                run.config,
                f"yes, at step {steps}" if run.diverged else "no",
                "inf/NaN"
                if run.diverged and run.final_loss != run.final_loss
                else f"{run.final_loss:.4f}",
                str(run.steps_to_target) if run.steps_to_target is not None else "never",
                clipped,
                share,
            ]
        )
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True))  # noqa: E731
    lines = [line(headers), line(["-" * w for w in widths]), *map(line, rows)]
    return "\n".join([*lines, *TABLE_NOTES])


TABLE_NOTES = [
    "",
    f"diverged: the training loss became inf/NaN or reached {DIVERGED_LOSS:g} (the run stops).",
    f"final loss: the mean training MSE of the last {SMOOTHING} steps run (for a diverged",
    f"  run, the steps before it stopped). steps to MSE<{TARGET_LOSS}: the first step where",
    f"  the {SMOOTHING}-step moving average is below the target. clipping fired: the share of",
    "  steps whose norm exceeded the threshold (value clipping: any element beyond it).",
    "  clip time / step: the share of a training step's time spent clipping.",
]

# One colour per configuration, the same in every panel; the second global-norm
# run (the callback) is drawn dashed on top, since it matches clip_grad_norm_.
COLOURS = {
    "no clipping": "tab:red",
    "value": "tab:green",
    "callback": "black",
    "global": "tab:blue",
}


def _style(config: str) -> dict:
    key = next((k for k in COLOURS if k in config), "global")
    if key == "callback":
        return {"color": COLOURS[key], "linestyle": (0, (4, 4)), "linewidth": 1.2, "zorder": 3}
    return {"color": COLOURS[key], "linestyle": "-", "linewidth": 1.0, "zorder": 2}


def plot(runs: list[Run], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frameworks = sorted({run.framework for run in runs}, reverse=True)
    fig, axes = plt.subplots(
        1, len(frameworks), figsize=(6.5 * len(frameworks), 4.2), squeeze=False
    )
    for ax, framework in zip(axes[0], frameworks, strict=True):
        panel = [run for run in runs if run.framework == framework]
        for run in panel:
            steps = np.arange(1, len(run.losses) + 1)
            twin = any(o is not run and o.losses == run.losses for o in panel)
            label = run.config + (
                " (dashed: the same curve)" if twin and "callback" in run.config else ""
            )
            if run.diverged:
                label += f" (diverged at step {len(run.losses)})"
            ax.plot(steps, run.losses, label=label, **_style(run.config))
            if run.diverged:  # a short curve: mark where it left the plot
                finite = [(i, v) for i, v in zip(steps, run.losses, strict=True) if np.isfinite(v)]
                at, value = finite[-1] if finite else (len(run.losses), 1e4)
                ax.plot(
                    [at],
                    [min(value, 1e4)],
                    marker="X",
                    markersize=10,
                    color=_style(run.config)["color"],
                )
                ax.annotate(
                    f"diverged (step {len(run.losses)})",
                    (at, min(value, 1e4)),
                    textcoords="offset points",
                    xytext=(8, -12),
                    fontsize=8,
                )
        ax.axhline(
            TARGET_LOSS,
            color="grey",
            linestyle=":",
            linewidth=0.8,
            label=f"target MSE {TARGET_LOSS:g}",
        )
        ax.set(
            yscale="log",
            xlabel="step",
            ylabel="MSE (training batch)",
            title=f"{framework}: {title}",
        )
        ax.set_ylim(1e-4, 1e4)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
