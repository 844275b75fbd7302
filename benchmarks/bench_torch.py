"""agclip.backends.torch vs torch.nn.utils.clip_grad_norm_ (foreach on and off), side by side.

Cases: GPT-2-small gradients (124M float32 in 148 tensors), clipping and not,
and 2,000 tensors of 1,000 values. Median times of interleaved runs, ratios
against torch's faster mode, and each norm's error against float64. A CUDA
section runs when a GPU is present.

    python benchmarks/bench_torch.py [--repeats 7]
"""

from __future__ import annotations

import argparse

import torch
from common import (
    gpt2_small_shapes,
    interleaved,
    machine,
    make_grads,
    many_small_shapes,
    reference_norm,
    table,
)

from agclip.backends.torch import clip_grad_norm_


def params_with(grads, device):
    params = []
    for g in grads:
        p = torch.nn.Parameter(torch.empty(g.shape, device=device))
        p.grad = torch.tensor(g, device=device)  # a copy: clipping must not touch g
        params.append(p)
    return params


def run_cases(device: str, repeats: int) -> list[list[str]]:
    rows = []
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for shapes_name, shapes in (
        ("GPT-2 small", gpt2_small_shapes()),
        ("2000 x 1000", many_small_shapes()),
    ):
        grads = make_grads(shapes)
        exact = reference_norm(grads)
        cases = [("clipping", exact / 2), ("no clipping", exact * 2)]
        if shapes_name != "GPT-2 small":
            cases = cases[:1]
        for label, max_norm in cases:
            params = params_with(grads, device)
            originals = [p.grad.clone() for p in params]

            def restore(params=params, originals=originals):
                for p, o in zip(params, originals, strict=True):
                    p.grad.copy_(o)

            def timed(fn):
                def run():
                    fn()
                    sync()

                return run

            fns = {
                "torch foreach": timed(
                    lambda m=max_norm, ps=params: torch.nn.utils.clip_grad_norm_(
                        ps, m, foreach=True
                    )
                ),
                "torch loop": timed(
                    lambda m=max_norm, ps=params: torch.nn.utils.clip_grad_norm_(
                        ps, m, foreach=False
                    )
                ),
                "agclip": timed(lambda m=max_norm, ps=params: clip_grad_norm_(ps, m)),
            }
            times = interleaved(fns, repeats=repeats, setup={name: restore for name in fns})
            errors = {}
            for name, fn in (
                ("torch", torch.nn.utils.clip_grad_norm_),
                ("agclip", clip_grad_norm_),
            ):
                restore()
                errors[name] = abs(float(fn(params, max_norm)) - exact) / exact
            best_torch = min(times["torch foreach"], times["torch loop"])
            rows.append(
                [
                    device,
                    shapes_name,
                    label,
                    f"{times['torch foreach'] * 1e3:.2f}",
                    f"{times['torch loop'] * 1e3:.2f}",
                    f"{times['agclip'] * 1e3:.2f}",
                    f"**{times['agclip'] / best_torch:.2f}x**",
                    f"{errors['torch']:.1e}",
                    f"{errors['agclip']:.1e}",
                ]
            )
            del params, originals
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {machine()}")
    rows = run_cases("cpu", args.repeats)
    if torch.cuda.is_available():
        rows += run_cases("cuda", args.repeats)
    else:
        print("CUDA: no GPU here, CUDA section skipped")
    print(
        table(
            [
                "device",
                "shapes",
                "case",
                "torch foreach ms",
                "torch loop ms",
                "agclip ms",
                "agclip / best torch",
                "torch rel err",
                "agclip rel err",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    main()
