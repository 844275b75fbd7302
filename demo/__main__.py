"""Exploding gradients, measured: an LSTM on the adding problem, SGD+momentum at a high
learning rate, without clipping, with global-norm clipping and with value clipping,
in PyTorch and JAX (whichever are installed); then a small GPT on Python source,
AdamW with warm-up and cosine decay, without clipping, with global-norm clipping and
with ZClip (PyTorch).

    python -m demo [--task all|lstm|gpt] [--backend all|torch|jax] [--seed 0]
        [--steps 1000] [--lr 1.0] [--gpt-steps 300] [--gpt-lr ...] [--out out/demo]
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

BACKENDS = {"torch": ("torch", "PyTorch"), "jax": ("optax", "JAX")}
GPT_LR = 3e-2  # where the unclipped run spikes (see docs/training.md)
Progress = Callable[..., Iterable[Any]]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    summary = __doc__.split("\n\n")[0].replace("\n", " ")  # the first paragraph, whole
    parser = argparse.ArgumentParser(prog="python -m demo", description=summary)
    parser.add_argument(
        "--task",
        choices=["all", "lstm", "gpt"],
        default="all",
        help="which experiment: the LSTM, the GPT or both (all)",
    )
    parser.add_argument(
        "--backend",
        choices=["all", *BACKENDS],
        default="all",
        help="frameworks for the LSTM (all); the GPT runs on torch",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for data and weights (0)")
    lstm = parser.add_argument_group("LSTM")
    lstm.add_argument("--steps", type=int, default=1000, help="training steps per run (1000)")
    lstm.add_argument("--lr", type=float, default=1.0, help="SGD learning rate (1.0)")
    lstm.add_argument("--max-norm", type=float, default=1.0, help="global-norm threshold (1.0)")
    lstm.add_argument("--clip-value", type=float, default=0.1, help="value-clip threshold (0.1)")
    gpt = parser.add_argument_group("GPT")
    gpt.add_argument(
        "--gpt-steps", type=int, default=300, help="steps per run (300), a tenth of them warm-up"
    )
    gpt.add_argument("--gpt-lr", type=float, default=GPT_LR, help=f"peak AdamW lr ({GPT_LR:g})")
    gpt.add_argument("--gpt-max-norm", type=float, default=1.0, help="global-norm threshold (1.0)")
    gpt.add_argument(
        "--gpt-size",
        choices=["demo", "toy"],
        default="demo",
        help="demo: 4 layers of width 128; toy: 1 layer of width 32, for tests",
    )
    parser.add_argument(
        "--out", type=Path, default=Path("out/demo"), help="output folder (out/demo)"
    )
    parser.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bars (they show only on a terminal anyway)",
    )
    args = parser.parse_args(argv)
    if args.steps < 1 or args.lr <= 0 or args.gpt_steps < 1 or args.gpt_lr <= 0:
        parser.error("--steps and --gpt-steps must be >= 1, --lr and --gpt-lr > 0")
    return args


def progress_bar(enabled: bool) -> Progress:
    """tqdm bars on a terminal only: ``disable=None`` turns them off when the output
    is not a TTY, so logs redirected to a file hold no carriage returns."""
    if not enabled:
        return lambda iterable, **_: iterable
    tqdm = importlib.import_module("tqdm").tqdm

    def bar(iterable: Iterable[Any], **kw: Any) -> Iterable[Any]:
        return tqdm(iterable, leave=False, ncols=100, disable=None, **kw)  # type: ignore[no-any-return]

    return bar


def run_lstm(args: argparse.Namespace, progress: Progress) -> None:
    chosen = list(BACKENDS) if args.backend == "all" else [args.backend]
    settings = {
        "steps": args.steps,
        "seed": args.seed,
        "lr": args.lr,
        "max_norm": args.max_norm,
        "clip_value": args.clip_value,
        "progress": progress,
    }
    print(
        f"LSTM: adding problem (length 20, batch 64), LSTM(2->64), SGD momentum 0.9, "
        f"lr {args.lr}, {args.steps} steps, seed {args.seed}\n"
    )
    from .report import plot, table

    runs, skipped = [], []
    for name in chosen:
        module, label = BACKENDS[name]
        if importlib.util.find_spec(module) is None:
            skipped.append(f"{label} ({module} is not installed)")
            continue
        start = time.perf_counter()
        if name == "torch":
            from .torch_runs import run_all as run_torch

            framework_runs = run_torch(**settings)
        else:
            from .jax_runs import run_all as run_jax

            framework_runs = run_jax(**settings)
        print(f"{label} ({time.perf_counter() - start:.0f} s)")
        print(table(framework_runs) + "\n")
        runs += framework_runs
    if skipped:
        print("skipped: " + ", ".join(skipped))
    if runs:
        describe = (
            f"LSTM(2->64) on the adding problem (length 20)\n"
            f"SGD momentum 0.9, lr {args.lr:g}, seed {args.seed}"
        )
        path = plot(runs, args.out / "loss_curves.png", describe)
        print(f"loss curves: {path}\n")


def run_gpt(args: argparse.Namespace, progress: Progress) -> None:
    if args.backend == "jax" or importlib.util.find_spec("torch") is None:
        print("GPT: skipped (it runs on PyTorch)")
        return
    from .gpt import prepare_data
    from .gpt_report import plot, table
    from .gpt_runs import DEMO, TOY, run_all

    base = TOY if args.gpt_size == "toy" else DEMO
    setup = dataclasses.replace(base, steps=args.gpt_steps, warmup=max(1, args.gpt_steps // 10))
    start = time.perf_counter()
    data = prepare_data()
    print(
        f"GPT: {setup.describe()}, on character-level Python source "
        f"({data.train.numel():,} training and {data.val.numel():,} validation characters); "
        f"AdamW (0.9, 0.95), weight decay 0.1, peak lr {args.gpt_lr:g}, {setup.warmup} "
        f"warm-up steps then cosine; seed {args.seed}\n"
    )
    runs = run_all(
        data=data,
        lr=args.gpt_lr,
        seed=args.seed,
        max_norm=args.gpt_max_norm,
        progress=progress,
        setup=setup,
    )
    print(f"PyTorch ({time.perf_counter() - start:.0f} s)")
    print(table(runs) + "\n")
    title = (
        f"{setup.describe()}; next character of Python source\n"
        f"AdamW (0.9, 0.95), peak lr {args.gpt_lr:g} ({setup.warmup} warm-up steps, cosine), "
        f"seed {args.seed}"
    )
    path = plot(
        runs, args.out / "gpt_loss.png", title, max_norm=args.gpt_max_norm, warmup=setup.warmup
    )
    print(f"GPT loss curves: {path}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    progress = progress_bar(not args.no_progress)
    if args.task in ("all", "lstm"):
        run_lstm(args, progress)
    if args.task in ("all", "gpt"):
        run_gpt(args, progress)


if __name__ == "__main__":
    main()
