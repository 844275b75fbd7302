"""Shared benchmark helpers: GPT-2-small parameter shapes, timing, reporting."""

from __future__ import annotations

import math
import platform
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np

T = TypeVar("T")


def gpt2_small_shapes() -> list[tuple[int, ...]]:
    """The 148 parameter shapes of GPT-2 small (124,439,808 values)."""
    d, vocab, ctx, layers = 768, 50257, 1024, 12
    shapes: list[tuple[int, ...]] = [(vocab, d), (ctx, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,)]  # ln_1, attn
        shapes += [(d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]  # ln_2, mlp
    shapes += [(d,), (d,)]  # ln_f
    return shapes


def nanogpt_shapes(layers: int = 4, d: int = 128, vocab: int = 65, ctx: int = 64):
    """The 52 parameter shapes of a nanoGPT-sized character model (809,856 values; the
    head tied to the token embedding): where a call's fixed cost shows."""
    shapes: list[tuple[int, ...]] = [(vocab, d), (ctx, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,)]  # ln_1, attn
        shapes += [(d,), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,)]  # ln_2, mlp
    return [*shapes, (d,), (d,)]  # ln_f


def llama_1b_shapes() -> list[tuple[int, ...]]:
    """The 146 parameter shapes of Llama-3.2-1B (1,235,814,400 values, tied embedding):
    a model that fills an H100-class GPU's bandwidth, too large for the CPU runs."""
    d, vocab, layers, kv, hidden = 2048, 128256, 16, 512, 8192
    shapes: list[tuple[int, ...]] = [(vocab, d)]
    for _ in range(layers):
        shapes += [(d,), (d, d), (kv, d), (kv, d), (d, d)]  # input norm, q, k, v, o
        shapes += [(d,), (hidden, d), (hidden, d), (d, hidden)]  # post norm, gate, up, down
    return [*shapes, (d,)]  # final norm


def many_small_shapes() -> list[tuple[int, ...]]:
    """2,000 tensors of 1,000 values: where per-call overhead dominates."""
    return [(1000,)] * 2000


def make_grads(
    shapes: list[tuple[int, ...]], seed: int = 0, scale: float = 1e-3
) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s, dtype=np.float32) * np.float32(scale) for s in shapes]


def reference_norm(arrays: list[np.ndarray]) -> float:
    """float64 global 2-norm."""
    total = 0.0
    for a in arrays:
        wide = np.asarray(a, dtype=np.float64).ravel()
        total += float(np.dot(wide, wide))
    return math.sqrt(total)


def interleaved(
    cases: dict[str, Callable[[], object]],
    repeats: int = 7,
    setup: dict[str, Callable[[], object]] | None = None,
) -> dict[str, float]:
    """Median seconds per case, runs interleaved so machine noise hits all alike.

    The order is shuffled every round (seeded: runs repeat). A case finds the
    caches as the case before it left them, which can cost it a few percent
    after a slow case with a large footprint; in a fixed order the same case
    would always pay.

    ``setup[name]``, when given, runs untimed before each run of that case
    (for example to restore gradients that a case clips in place).
    """
    setup = setup or {}
    times: dict[str, list[float]] = {name: [] for name in cases}
    names, order = list(cases), random.Random(0)
    for round_ in range(repeats + 1):  # round 0 warms up
        order.shuffle(names)
        for name in names:
            fn = cases[name]
            if name in setup:
                setup[name]()
            start = time.perf_counter()
            fn()
            if round_:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def interleaved_samples(cases: dict[str, Callable[[], T]], repeats: int = 7) -> dict[str, list[T]]:
    """Every case's own measurements (what it returns), ``repeats`` runs each, in
    interleaved rounds of a seeded shuffled order like ``interleaved``; a first round
    warms up and is dropped. For cases that time their own phases."""
    samples: dict[str, list[T]] = {name: [] for name in cases}
    names, order = list(cases), random.Random(0)
    for round_ in range(repeats + 1):
        order.shuffle(names)
        for name in names:
            result = cases[name]()
            if round_:
                samples[name].append(result)
    return samples


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    import os

    return f"{cpu_model()}, {os.cpu_count()} cores, Python {platform.python_version()}"
