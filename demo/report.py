"""Tables and the loss-curve plot for the LSTM part of the demo."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .adding_problem import DIVERGED_LOSS, SMOOTHING, TARGET_LOSS, Run

INSET_STEPS = 15  # the unclipped runs diverge within the first few steps: zoom in there


def text_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, rows)])


def table(runs: list[Run]) -> str:
    headers = ["config", "final loss", f"steps to MSE<{TARGET_LOSS}", "clipping fired"]
    rows = []
    for run in runs:
        steps = len(run.losses)
        rows.append(
            [
                run.config,
                f"diverged at step {steps}" if run.diverged else f"{run.final_loss:.4f}",
                str(run.steps_to_target) if run.steps_to_target is not None else "never",
                "-" if run.config == "no clipping" else f"{run.clipped_steps / steps:.0%}",
            ]
        )
    return "\n".join([text_table(headers, rows), *TABLE_NOTES])


TABLE_NOTES = [
    "",
    f"diverged: the training loss became inf/NaN or reached {DIVERGED_LOSS:g}; the run",
    "  stops there, and its loss is not a result.",
    f"final loss: the mean training MSE of the last {SMOOTHING} steps.",
    f"steps to MSE<{TARGET_LOSS}: the first step where the {SMOOTHING}-step moving average",
    "  is below the target.",
    "clipping fired: the share of steps whose norm exceeded the threshold (value",
    "  clipping: any element beyond it).",
]


# One colour per configuration, the same in every panel. Curves that coincide stay
# visible: the callback is dashed over clip_grad_norm_ (the same numbers), value
# clipping is dotted over the wider global-norm line it follows for hundreds of steps.
COLOURS = {
    "no clipping": "tab:red",
    "value": "tab:green",
    "callback": "black",
    "global": "tab:blue",
}


def _style(config: str) -> dict[str, Any]:
    key = next((k for k in COLOURS if k in config), "global")
    if key == "callback":
        return {"color": COLOURS[key], "linestyle": (0, (4, 4)), "linewidth": 1.2, "zorder": 3}
    if key == "value":
        return {"color": COLOURS[key], "linestyle": (0, (1, 1)), "linewidth": 1.2, "zorder": 4}
    width = 2.0 if key == "global" else 1.0
    return {"color": COLOURS[key], "linestyle": "-", "linewidth": width, "zorder": 2}


def _label(run: Run, panel: list[Run]) -> str:
    label = run.config
    if run.diverged:
        return label + f" (diverged at step {len(run.losses)})"
    if "callback" in run.config and any(o is not run and o.losses == run.losses for o in panel):
        return label + " (dashed: the same curve)"
    if "value" in run.config and any(o.config.startswith("global") for o in panel):
        return label + " (dotted, over the wide global-norm line it can hide)"
    return label


def _draw(ax: Any, panel: list[Run], *, steps: int | None = None, marks: bool = False) -> None:
    for run in panel:
        losses = run.losses[:steps] if steps else run.losses
        xs = np.arange(1, len(losses) + 1)
        style = _style(run.config)
        dots = {"marker": ".", "markersize": 5} if marks else {}
        ax.plot(xs, losses, label=_label(run, panel), **style, **dots)
        if run.diverged and len(run.losses) <= len(losses):  # the end is on this plot
            finite = [(i, v) for i, v in zip(xs, losses, strict=True) if np.isfinite(v)]
            at, value = finite[-1] if finite else (len(losses), DIVERGED_LOSS)
            ax.plot([at], [min(value, 1e4)], marker="X", markersize=10, color=style["color"])


def plot(runs: list[Run], path: Path, describe: str) -> Path:
    """One panel per framework, log-scaled loss, an inset of the first steps (where the
    unclipped runs blow up) and the divergence points marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frameworks = sorted({run.framework for run in runs}, reverse=True)
    fig, axes = plt.subplots(1, len(frameworks), figsize=(7 * len(frameworks), 6), squeeze=False)
    for ax, framework in zip(axes[0], frameworks, strict=True):
        panel = [run for run in runs if run.framework == framework]
        _draw(ax, panel)
        for run in panel:
            if run.diverged:
                finite = [v for v in run.losses if np.isfinite(v)]
                ax.annotate(
                    f"diverged at step {len(run.losses)}",
                    (len(run.losses), min(finite[-1] if finite else 1e4, 1e4)),
                    textcoords="offset points",
                    xytext=(10, -4),
                    fontsize=8,
                    color=_style(run.config)["color"],
                )
        ax.axhline(
            TARGET_LOSS,
            color="grey",
            linestyle=":",
            linewidth=0.8,
            label=f"target MSE {TARGET_LOSS:g}",
        )
        ax.set(yscale="log", xlabel="step", ylabel="MSE (training batch)", ylim=(1e-4, 1e4))
        ax.set_title(f"{framework}: {describe}", fontsize=9)
        # Below the axes: the space above the curves holds the inset.
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2)
        inset = ax.inset_axes((0.36, 0.6, 0.42, 0.36))
        _draw(inset, panel, steps=INSET_STEPS, marks=True)
        inset.set(yscale="log", xlim=(0.5, INSET_STEPS + 0.5), ylim=(1e-2, 1e4))
        inset.set_title(f"first {INSET_STEPS} steps", fontsize=7)
        inset.tick_params(labelsize=6)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
