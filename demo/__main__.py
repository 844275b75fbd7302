"""Exploding gradients, measured: LSTM on the adding problem, SGD+momentum at a high
learning rate, without clipping, with global-norm clipping and with value clipping,
in PyTorch and JAX (whichever are installed).

    python -m demo [--steps 1000] [--seed 0] [--lr 1.0] [--backend all|torch|jax] [--out out/demo]
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from pathlib import Path

from .report import plot, table

BACKENDS = {"torch": ("torch", "PyTorch"), "jax": ("optax", "JAX")}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    summary = __doc__.split("\n\n")[0].replace("\n", " ")  # the first paragraph, whole
    parser = argparse.ArgumentParser(prog="python -m demo", description=summary)
    parser.add_argument("--steps", type=int, default=1000, help="training steps per run (1000)")
    parser.add_argument("--seed", type=int, default=0, help="seed for data and weights (0)")
    parser.add_argument("--lr", type=float, default=1.0, help="SGD learning rate (1.0)")
    parser.add_argument("--max-norm", type=float, default=1.0, help="global-norm threshold (1.0)")
    parser.add_argument("--clip-value", type=float, default=0.1, help="value-clip threshold (0.1)")
    parser.add_argument("--backend", choices=["all", *BACKENDS], default="all")
    parser.add_argument("--out", type=Path, default=Path("out/demo"), help="output folder")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.lr <= 0:
        parser.error("--steps must be >= 1 and --lr > 0")
    return args


def progress_bar(enabled: bool):
    if not enabled:
        return lambda iterable, **_: iterable
    from tqdm import tqdm

    return lambda iterable, **kw: tqdm(iterable, leave=False, ncols=100, **kw)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    chosen = list(BACKENDS) if args.backend == "all" else [args.backend]
    settings = {
        "steps": args.steps,
        "seed": args.seed,
        "lr": args.lr,
        "max_norm": args.max_norm,
        "clip_value": args.clip_value,
        "progress": progress_bar(not args.no_progress),
    }
    print(
        f"Adding problem (length 20, batch 64), LSTM(2->64), SGD momentum 0.9, lr {args.lr}, "
        f"{args.steps} steps, seed {args.seed}\n"
    )
    runs, skipped = [], []
    for name in chosen:
        module, label = BACKENDS[name]
        if importlib.util.find_spec(module) is None:
            skipped.append(f"{label} ({module} is not installed)")
            continue
        start = time.perf_counter()
        if name == "torch":
            from .torch_runs import run_all
        else:
            from .jax_runs import run_all
        framework_runs = run_all(**settings)
        print(f"{label} ({time.perf_counter() - start:.0f} s)")
        print(table(framework_runs) + "\n")
        runs += framework_runs
    if skipped:
        print("skipped: " + ", ".join(skipped))
    if runs:
        path = plot(runs, args.out / "loss_curves.png", f"lr {args.lr}, seed {args.seed}")
        print(f"loss curves: {path}")


if __name__ == "__main__":
    main()
