"""Tables and the loss-curve plot for the demo."""

from __future__ import annotations

from pathlib import Path

from .adding_problem import TARGET_LOSS, Run


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
    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, rows)])


def plot(runs: list[Run], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frameworks = sorted({run.framework for run in runs}, reverse=True)
    fig, axes = plt.subplots(
        1, len(frameworks), figsize=(6.5 * len(frameworks), 4.2), squeeze=False
    )
    for ax, framework in zip(axes[0], frameworks, strict=True):
        for run in (r for r in runs if r.framework == framework):
            label = run.config + (" (diverged)" if run.diverged else "")
            ax.plot(range(1, len(run.losses) + 1), run.losses, label=label, linewidth=1)
        ax.axhline(TARGET_LOSS, color="grey", linestyle="--", linewidth=0.8, label="target")
        ax.set(yscale="log", xlabel="step", ylabel="MSE", title=f"{framework}: {title}")
        ax.set_ylim(1e-4, 1e4)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
