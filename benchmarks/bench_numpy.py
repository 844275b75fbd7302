"""agclip.backends.numpy vs plain NumPy on GPT-2-small gradients (148 float32 arrays, 124M values).

Plain NumPy is the obvious code: ``sqrt(sum(np.sum(a * a)))`` then ``a * coef``.
agclip clips in place: blocked BLAS dots, one in-place multiply, none when no
clipping is needed. Reports median times side by side (interleaved runs),
peak extra memory (tracemalloc) and the norm's error against float64.

    python benchmarks/bench_numpy.py [--repeats 7] [--json out.json]
"""

from __future__ import annotations

import math
import tracemalloc

import numpy as np
from common import gpt2_small_shapes, interleaved, machine, make_grads, reference_norm
from report import speed_benchmark

from agclip.backends.numpy import clip_by_global_norm_


def plain_numpy(arrays, max_norm):
    norm = math.sqrt(sum(float(np.sum(a * a)) for a in arrays))
    coef = min(1.0, max_norm / (norm + 1e-6))
    return [a * np.float32(coef) for a in arrays], norm


def peak_extra_bytes(fn) -> int:
    tracemalloc.start()
    tracemalloc.reset_peak()
    fn()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak


def main() -> None:
    args, report = speed_benchmark("numpy", __doc__, repeats=7)

    grads = make_grads(gpt2_small_shapes())
    nbytes = sum(g.nbytes for g in grads)
    exact = reference_norm(grads)
    report.note(
        f"GPT-2 small: {len(grads)} arrays, {sum(g.size for g in grads):,} values, "
        f"norm {exact:.4f}; {machine()}"
    )

    rows = []
    # clipping: max_norm below the norm, so every array is scaled (restore after each run)
    # no clipping: max_norm above the norm
    for label, max_norm in (("clipping", exact / 2), ("no clipping", exact * 2)):
        work = [g.copy() for g in grads]

        def restore(work=work):
            for w, g in zip(work, grads, strict=True):
                np.copyto(w, g)

        times = interleaved(
            {
                "numpy": lambda m=max_norm: plain_numpy(grads, m),
                "agclip": lambda w=work, m=max_norm: clip_by_global_norm_(w, m),
            },
            repeats=args.repeats,
            setup={"agclip": restore},
        )
        mem_plain = peak_extra_bytes(lambda m=max_norm: plain_numpy(grads, m))
        restore()
        mem_ours = peak_extra_bytes(lambda w=work, m=max_norm: clip_by_global_norm_(w, m))
        restore()
        err_ours = abs(clip_by_global_norm_(work, max_norm) - exact) / exact
        err_plain = abs(plain_numpy(grads, max_norm)[1] - exact) / exact
        rows.append(
            [
                label,
                f"{times['numpy'] * 1e3:.1f}",
                f"{times['agclip'] * 1e3:.1f}",
                report.ratio(times["agclip"] / times["numpy"], against="numpy", case=label),
                f"{mem_plain / nbytes:.1%}",
                f"{mem_ours / nbytes:.3%}",
                f"{err_plain:.1e}",
                f"{err_ours:.1e}",
            ]
        )
    report.table(
        [
            "case",
            "numpy ms",
            "agclip ms",
            "time ratio",
            "numpy extra mem",
            "agclip extra mem",
            "numpy rel err",
            "agclip rel err",
        ],
        rows,
    )
    report.emit(args.json)


if __name__ == "__main__":
    main()
