"""Run every benchmark side by side with its peers and regenerate docs/benchmarks.md.

Each benchmark runs in its own process and hands back its results as data
(``--json``, see ``report.py``); this script renders the page from that data
under the command that reproduces each section, plots every ratio and judges
each against its target: the first rule in ``TARGETS`` whose fields all match
the ratio's case.

    python benchmarks/run_all.py [--only numpy,torch,jax,jax_compile,distributed,stability,
        adaptive,gpt_overhead,gpt_stability] [--update] [--out docs/benchmarks.md]

With ``--update`` only the chosen sections of the existing page are replaced (each
says when it was regenerated); the header, the other sections and the speed-ratio
plot stay as they were.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import cpu_model
from report import label, render

ROOT = Path(__file__).resolve().parents[1]
BENCHES = {
    "numpy": ("NumPy: in place vs plain NumPy", "bench_numpy.py"),
    "torch": ("PyTorch: vs torch.nn.utils.clip_grad_norm_", "bench_torch.py"),
    "jax": ("JAX: vs optax.clip_by_global_norm", "bench_jax.py"),
    "jax_compile": ("JAX: many leaves, compile time and memory", "bench_jax_compile.py"),
    "distributed": ("Distributed: FSDP2 on 2 CPU ranks", "bench_distributed.py"),
    "stability": ("Training stability and overhead", "bench_stability.py"),
    "adaptive": ("Adaptive clipping: ZClip, AutoClip, AdaGC", "bench_adaptive.py"),
    "gpt_overhead": ("GPT training step: the share spent clipping", "bench_gpt_overhead.py"),
    "gpt_stability": (
        "GPT stability: learning rates, seeds and clipping rules",
        "bench_gpt_stability.py",
    ),
}


@dataclass(frozen=True)
class Target:
    """The largest ratio allowed for the cases of ``benchmark`` whose fields equal
    ``case``, measured against ``against`` (the peer, or the memory floor)."""

    benchmark: str
    case: tuple[tuple[str, str], ...]
    limit: float
    against: str | None = None

    def matches(self, benchmark: str, case: dict[str, Any], against: str | None = None) -> bool:
        if self.against is not None and against != self.against:
            return False
        return benchmark == self.benchmark and all(case.get(k) == v for k, v in self.case)


def _t(benchmark: str, limit: float, against: str | None = None, **case: str) -> Target:
    return Target(benchmark, tuple(case.items()), limit, against)


# First match wins: put the specific rules first.
TARGETS = [
    _t("numpy", 0.35, case="clipping"),
    _t("numpy", 0.35, case="no clipping"),
    # CPU speed on GPT-2 shapes is judged against the memory floor measured in the
    # same run (one read; + one in-place scale when clipping); torch's ratio is reported.
    _t("torch", 1.10, "memory floor", device="cpu", shapes="GPT-2 small", case="clipping"),
    _t("torch", 1.10, "memory floor", device="cpu", shapes="GPT-2 small", case="no clipping"),
    # The fused step is also held against its own floor (one read of every gradient,
    # then the step with the kernel's gradient write-back), timed in the same runs.
    _t("torch", 1.10, "step floor", device="cpu", shapes="GPT-2 small"),
    _t("torch", 0.90, device="cpu", shapes="GPT-2 small", case="clip + fused step"),
    _t("torch", 0.90, device="cpu", shapes="GPT-2 small", case="fused step, nothing to clip"),
    _t("torch", 1.10, "torch", device="cpu", shapes="2000 x 1000"),
    # A small model: the fixed cost of a call, against torch's own clip.
    _t("torch", 0.80, "torch", device="cpu", shapes="nanoGPT (0.81M)"),
    _t("torch", 1.00, "torch", device="cuda"),
    _t("jax", 1.05, case="both jitted"),
    _t("jax", 1.30, case="agclip eager vs optax jit"),
    _t("jax", 1.05, case="clip + adamw"),
    _t("jax_compile", 1.50, "optax", case="800 leaves"),
    _t("distributed", 1.00),  # never slower than torch or torchtitan, one collective
    _t("adaptive", 1.20),  # a ZClip step against torch's clip_grad_norm_
    # In a GPT training step: agclip's recommended path at most half torch's share.
    _t("gpt_overhead", 0.50, "torch", case="lowest clip share"),
]


def target_for(benchmark: str, case: dict[str, Any], against: str | None = None) -> float | None:
    """The limit of the first rule matching this case (and peer), or None."""
    return next((t.limit for t in TARGETS if t.matches(benchmark, case, against)), None)


def verdicts(benchmark: str, ratios: list[dict[str, Any]]) -> list[str]:
    lines = []
    for ratio in ratios:
        limit = target_for(benchmark, ratio["case"], ratio["against"])
        if limit is not None:
            verdict = "met" if ratio["ratio"] <= limit else "**not met**"
            lines.append(
                f"- {benchmark}: {label(ratio)} (vs {ratio['against']}): {ratio['ratio']:.2f}x "
                f"against a target of <= {limit:.2f}x: {verdict}"
            )
    return lines


def run_benchmark(script: str) -> tuple[dict[str, Any], float]:
    """Run one benchmark script; its results as data and the seconds it took."""
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "result.json"
        start = time.perf_counter()
        subprocess.run(
            [sys.executable, str(ROOT / "benchmarks" / script), "--json", str(out)],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            check=True,
        )
        return json.loads(out.read_text()), time.perf_counter() - start


def plot(rows: list[tuple[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 0.45 * len(rows) + 1))
    labels = [label for label, _ in rows]
    ax.barh(labels, [r for _, r in rows], color="tab:blue")
    ax.axvline(1.0, color="grey", linestyle="--", linewidth=0.8)
    ax.set(xlabel="agclip time / peer's (or the memory floor's) time: lower is faster")
    ax.invert_yaxis()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def versions() -> str:
    names = ("numpy", "torch", "jax", "optax", "array-api-compat")
    found = []
    for name in names:
        try:
            found.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            found.append(f"{name} (not installed)")
    return ", ".join(found)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(BENCHES))
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument(
        "--update", action="store_true", help="replace only these sections of the existing page"
    )
    args = parser.parse_args()
    chosen = [name.strip() for name in args.only.split(",")]
    unknown = set(chosen) - set(BENCHES)
    if unknown:
        parser.error(f"unknown benchmarks {sorted(unknown)}; known: {', '.join(BENCHES)}")

    sections, plotted = {}, []
    for index, name in enumerate(chosen, 1):
        title, script = BENCHES[name]
        print(f"[{index}/{len(chosen)}] {title} ...", file=sys.stderr, flush=True)
        data, seconds = run_benchmark(script)
        print(f"      done in {seconds:.0f} s", file=sys.stderr, flush=True)
        plotted += [(f"{name}: {label(r)} (vs {r['against']})", r["ratio"]) for r in data["ratios"]]
        checks = verdicts(name, data["ratios"])
        when = (
            f"; this section regenerated on {datetime.date.today().isoformat()} with "
            f"`run_all.py --only {name} --update`"
            if args.update
            else ""
        )
        sections[name] = (
            f"## {title}\n\nCommand: `python benchmarks/{script}` ({seconds:.0f} s{when})\n\n"
            + render(data)
            + ("\nTargets:\n\n" + "\n".join(checks) + "\n" if checks else "")
        )

    if args.update:
        args.out.write_text(update_page(args.out.read_text(), sections))
    else:
        if plotted:
            plot(plotted, args.out.parent / "img" / "speed_ratios.png")
        args.out.write_text(header(bool(plotted)) + "\n" + "\n".join(sections.values()))
    print(f"wrote {args.out}", file=sys.stderr)


def update_page(page: str, sections: dict[str, str]) -> str:
    """``page`` with the sections of ``sections`` (benchmark name -> Markdown, from its
    "## title" on) replaced, or added in ``BENCHES`` order; everything else kept."""
    head, *parts = page.split("\n## ")
    found = {part.split("\n", 1)[0]: "## " + part.rstrip("\n") + "\n" for part in parts}
    titles = {BENCHES[name][0]: text for name, text in sections.items()}
    merged = []
    for title, _ in BENCHES.values():
        text = titles.get(title, found.pop(title, None))
        if text is not None:
            merged.append(text)
    merged += found.values()  # sections of benchmarks no longer listed stay too
    return head.rstrip("\n") + "\n\n" + "\n".join(merged)


def header(with_plot: bool) -> str:
    cpu = cpu_model()
    text = f"""# Benchmarks

Generated by `make bench` (`python benchmarks/run_all.py`) on
{datetime.date.today().isoformat()}: {cpu}, {os.cpu_count()} cores, Python
{platform.python_version()}; {versions()}.

Times are medians of interleaved runs, agclip and its peers side by side in one
process, in a shuffled order each round (the machine is shared and noisy:
repeated runs move ratios by up to ~0.2). Gradients use GPT-2-small parameter
shapes (148 float32 arrays, 124,439,808 values) unless a table says otherwise;
errors are relative to a float64 reference.
"""
    return text + ("\n![speed ratios](img/speed_ratios.png)\n" if with_plot else "")


if __name__ == "__main__":
    main()
