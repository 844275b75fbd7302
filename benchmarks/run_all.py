"""Run every benchmark side by side with its peers and regenerate docs/benchmarks.md.

Each benchmark runs in its own process; its Markdown output goes into the page
under the command that reproduces it. Every table row with a bold ratio
(``**0.24x**``) is plotted and checked against the target set for it.

    python benchmarks/run_all.py [--only numpy,torch,jax,stability] [--out docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCHES = {
    "numpy": ("NumPy: in place vs plain NumPy", "bench_numpy.py"),
    "torch": ("PyTorch: vs torch.nn.utils.clip_grad_norm_", "bench_torch.py"),
    "jax": ("JAX: vs optax.clip_by_global_norm", "bench_jax.py"),
    "stability": ("Training stability and overhead", "bench_stability.py"),
}
# (benchmark, words every matching row label contains) -> the largest ratio allowed
TARGETS = {
    ("numpy", ("clipping",)): 0.35,
    ("numpy", ("no clipping",)): 0.35,
    ("torch", ("cpu", "GPT-2", "clipping")): 0.70,
    ("torch", ("cpu", "GPT-2", "no clipping")): 0.40,
    ("torch", ("cpu", "2000")): 1.10,
    ("torch", ("cuda",)): 1.00,
    ("jax", ("both jitted",)): 1.05,
    ("jax", ("eager",)): 1.30,
}
RATIO = re.compile(r"\*\*([0-9.]+)x\*\*")
NUMBER = re.compile(r"\**-?[0-9.]+(e[-+]?[0-9]+)?[x%]?\**")  # a measurement cell, not a label


def ratios(name: str, markdown: str) -> list[tuple[str, float]]:
    """(row label, ratio) for each table row holding a bold ratio."""
    found = []
    for line in markdown.splitlines():
        match = RATIO.search(line)
        if match and line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            label = " ".join(c for c in cells if c and not NUMBER.fullmatch(c))
            found.append((f"{name}: {label}", float(match.group(1))))
    return found


def target_for(name: str, label: str) -> float | None:
    """The target of the most specific rule matching this row ("no clipping" over "clipping")."""
    matching = [
        (len(" ".join(words)), limit)
        for (bench, words), limit in TARGETS.items()
        if bench == name and all(word in label for word in words)
    ]
    return max(matching)[1] if matching else None


def plot(rows: list[tuple[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 0.45 * len(rows) + 1))
    labels = [label for label, _ in rows]
    ax.barh(labels, [r for _, r in rows], color="tab:blue")
    ax.axvline(1.0, color="grey", linestyle="--", linewidth=0.8)
    ax.set(xlabel="agclip time / peer time (lower is faster)")
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
    args = parser.parse_args()
    chosen = [name.strip() for name in args.only.split(",")]
    unknown = set(chosen) - set(BENCHES)
    if unknown:
        parser.error(f"unknown benchmarks {sorted(unknown)}; known: {', '.join(BENCHES)}")

    sections, all_ratios = [], []
    for index, name in enumerate(chosen, 1):
        title, script = BENCHES[name]
        print(f"[{index}/{len(chosen)}] {title} ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        result = subprocess.run(
            [sys.executable, str(ROOT / "benchmarks" / script)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
            check=True,
        )
        seconds = time.perf_counter() - start
        print(f"      done in {seconds:.0f} s", file=sys.stderr, flush=True)
        found = ratios(name, result.stdout)
        all_ratios += found
        checks = []
        for label, ratio in found:
            limit = target_for(name, label)
            if limit is not None:
                verdict = "met" if ratio <= limit else "**not met**"
                checks.append(
                    f"- {label}: {ratio:.2f}x against a target of <= {limit:.2f}x: {verdict}"
                )
        body = result.stdout.strip()
        sections.append(
            f"## {title}\n\nCommand: `python benchmarks/{script}` ({seconds:.0f} s)\n\n{body}\n"
            + ("\nTargets:\n\n" + "\n".join(checks) + "\n" if checks else "")
        )

    plot_path = args.out.parent / "img" / "speed_ratios.png"
    if all_ratios:
        plot(all_ratios, plot_path)
    cpu = platform.processor() or platform.machine()
    header = f"""# Benchmarks

Generated by `make bench` (`python benchmarks/run_all.py`) on
{datetime.date.today().isoformat()}: {cpu}, {os.cpu_count()} cores, Python
{platform.python_version()}; {versions()}.

Times are medians of interleaved runs, agclip and its peers side by side in one
process (the machine is shared and noisy: repeated runs move ratios by up to
~0.2). Gradients use GPT-2-small parameter shapes (148 float32 arrays,
124,439,808 values) unless a table says otherwise; errors are relative to a
float64 reference.
"""
    if all_ratios:
        header += "\n![speed ratios](img/speed_ratios.png)\n"
    args.out.write_text(header + "\n" + "\n".join(sections))
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
