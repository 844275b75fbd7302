"""agclip.backends.torch vs torch.nn.utils.clip_grad_norm_ (foreach on and off), side by side.

Cases: GPT-2-small gradients (124M float32 in 148 tensors) and nanoGPT's small
model (0.81M in 52 tensors), clipping and not, and 2,000 tensors of 1,000 values.
Median times of interleaved runs, ratios against torch's faster mode, and each
norm's error against float64. A CUDA
section runs when a GPU is present; it adds Llama-3.2-1B shapes (1.24B values).

Every case also times a floor, interleaved with the rest. On GPT-2 shapes
clipping is memory-bound: the floor is the fewest passes any clip needs, one read
of every gradient (``sum``) and, when clipping, one in-place scale (``mul_``),
because the coefficient depends on the whole norm. On small models the time is
calls, not bytes: the floor is the two foreach calls any clip of separate
tensors makes (``torch._foreach_norm``, then ``torch._foreach_mul_`` when
clipping), with nothing around them.

    python benchmarks/bench_torch.py [--repeats 25] [--json out.json]
"""

from __future__ import annotations

import math
from functools import partial

import torch
from common import (
    gpt2_small_shapes,
    interleaved,
    llama_1b_shapes,
    machine,
    make_grads,
    many_small_shapes,
    nanogpt_shapes,
    reference_norm,
)
from report import Report, speed_benchmark

from agclip.backends.torch import clip_and_step, clip_grad_norm_


def params_with(grads, device):
    params = []
    for g in grads:
        p = torch.nn.Parameter(torch.empty(g.shape, device=device))
        p.grad = torch.tensor(g, device=device)  # a copy: clipping must not touch g
        params.append(p)
    return params


def memory_floor(grads: list[torch.Tensor], scales: bool):
    """The fewest memory passes a clip needs: read everything (and scale it in place)."""
    factor = torch.tensor(0.5, device=grads[0].device)

    def floor():
        for grad in grads:
            grad.sum()
        if scales:
            torch._foreach_mul_(grads, factor)

    return floor


def call_floor(grads: list[torch.Tensor], scales: bool):
    """The fewest calls a clip of separate tensors makes: their norms in one foreach
    call (and one foreach scale), nothing else."""
    factor = torch.tensor(0.5, device=grads[0].device)

    def floor():
        torch._foreach_norm(grads)
        if scales:
            torch._foreach_mul_(grads, factor)

    return floor


def shape_sets(device: str) -> dict[str, list[tuple[int, ...]]]:
    """The gradients timed on ``device``: GPT-2 small and many small tensors; on a
    GPU also a 1B-parameter model, which the CPU runs cannot hold three copies of."""
    sets = {
        "GPT-2 small": gpt2_small_shapes(),
        "nanoGPT (0.81M)": nanogpt_shapes(),
        "2000 x 1000": many_small_shapes(),
    }
    if device == "cuda":
        sets["Llama-3.2-1B"] = llama_1b_shapes()
    return sets


def memory_bound(shapes: list[tuple[int, ...]]) -> bool:
    """Large tensors: the time is memory traffic, held against the memory floor
    (clipping and not). Many small ones time per-call overhead (clipping only)."""
    return max(math.prod(shape) for shape in shapes) > 1 << 20


def run_cases(
    report: Report,
    device: str,
    repeats: int,
    sets: dict[str, list[tuple[int, ...]]] | None = None,
) -> list[list[str]]:
    rows = []
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for shapes_name, shapes in (sets or shape_sets(device)).items():
        grads = make_grads(shapes)
        exact = reference_norm(grads)
        cases = [("clipping", exact / 2), ("no clipping", exact * 2)]
        if shapes_name == "2000 x 1000":  # per-call overhead: one case tells it
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
            floor_of = memory_floor if memory_bound(shapes) else call_floor
            fns["floor"] = timed(floor_of([p.grad for p in params], label == "clipping"))
            times = interleaved(fns, repeats=repeats, setup=dict.fromkeys(fns, restore))
            errors = {}
            for name, fn in (
                ("torch", torch.nn.utils.clip_grad_norm_),
                ("agclip", clip_grad_norm_),
            ):
                restore()
                errors[name] = abs(float(fn(params, max_norm)) - exact) / exact
            best_torch = min(times["torch foreach"], times["torch loop"])
            floor = times["floor"]
            against_floor = "memory floor" if memory_bound(shapes) else "call floor"
            ratio = partial(report.ratio, device=device, shapes=shapes_name, case=label)
            if not memory_bound(shapes):
                report.note(
                    f"{device}, {shapes_name}, {label}: the call floor takes "
                    f"{floor / best_torch:.2f}x torch's time in this run."
                )
            if memory_bound(shapes) and label == "no clipping":
                # This shared machine's memory speed moves between runs; the ratios with it.
                gigabytes = sum(g.nbytes for g in grads) / 1e9
                report.note(
                    f"{device}, {shapes_name}: the `sum` floor read the gradients at "
                    f"{gigabytes / floor:.0f} GB/s in this run."
                )
            rows.append(
                [
                    device,
                    shapes_name,
                    label,
                    f"{times['torch foreach'] * 1e3:.2f}",
                    f"{times['torch loop'] * 1e3:.2f}",
                    f"{times['agclip'] * 1e3:.2f}",
                    ratio(times["agclip"] / best_torch, against="torch"),
                    f"{floor * 1e3:.2f}",
                    ratio(times["agclip"] / floor, against=against_floor),
                    f"{errors['torch']:.1e}",
                    f"{errors['agclip']:.1e}",
                ]
            )
            del params, originals
    return rows


def fused_step_case(
    report: Report,
    repeats: int,
    device: str = "cpu",
    *,
    clipping: bool = True,
    shapes_name: str = "GPT-2 small",
    shapes: list[tuple[int, ...]] | None = None,
) -> list[str]:
    """Clip + AdamW(fused=True) step end to end: agclip's ``clip_and_step`` against
    torch's clip then the same step (GPT-2 small unless ``shapes`` are given), with a
    ``max_norm`` that clips (half the norm) or not (twice it). The gradients are
    restored before every call (untimed); parameters and optimizer state just move on.

    The floor is the least any clip handed to this step can cost, timed in the same
    runs: one read of every gradient (the norm), then the step, which when clipping
    carries a gradient scale (of 1) and so writes every gradient back, as the
    clipped gradients must be left in ``.grad``."""
    grads = make_grads(shapes or gpt2_small_shapes())
    max_norm = reference_norm(grads) * (0.5 if clipping else 2.0)
    sides = {}
    for name in ("torch", "agclip", "floor"):
        params = params_with(grads, device)
        optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True)
        optimizer.step()  # the moments exist from here on
        sides[name] = (params, optimizer, [p.grad.clone() for p in params])

    def restore(name):
        params, _, saved = sides[name]
        return lambda: [p.grad.copy_(g) for p, g in zip(params, saved, strict=True)]

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def torch_step():
        params, optimizer, _ = sides["torch"]
        torch.nn.utils.clip_grad_norm_(params, max_norm)
        optimizer.step()
        sync()

    def agclip_step():
        clip_and_step(sides["agclip"][1], max_norm)
        sync()

    def plain_step():
        sides["torch"][1].step()
        sync()

    one = torch.ones((), device=device)
    zero = torch.zeros((), device=device)
    read_every_grad = memory_floor([p.grad for p in sides["floor"][0]], scales=False)

    def floor_step():
        optimizer = sides["floor"][1]
        read_every_grad()
        if clipping:  # what GradScaler hands over: the kernel divides and writes back
            optimizer.grad_scale, optimizer.found_inf = one, zero
        optimizer.step()
        optimizer.grad_scale = optimizer.found_inf = None
        sync()

    times = interleaved(
        {"torch": torch_step, "agclip": agclip_step, "floor": floor_step, "step only": plain_step},
        repeats=repeats,
        setup={
            "torch": restore("torch"),
            "agclip": restore("agclip"),
            "floor": restore("floor"),
            "step only": restore("torch"),
        },
    )
    case = "clip + fused step" if clipping else "fused step, nothing to clip"
    ratio = partial(report.ratio, device=device, shapes=shapes_name, case=case)
    return [
        device,
        shapes_name,
        f"AdamW(fused=True), {'clipping' if clipping else 'nothing to clip'}",
        f"{times['torch'] * 1e3:.1f}",
        f"{times['agclip'] * 1e3:.1f}",
        f"{times['step only'] * 1e3:.1f}",
        ratio(times["agclip"] / times["torch"], against="torch"),
        f"{times['floor'] * 1e3:.1f}",
        ratio(times["agclip"] / times["floor"], against="step floor"),
        f"{times['floor'] / times['torch']:.2f}x",
    ]


def main() -> None:
    args, report = speed_benchmark("torch", __doc__, repeats=25)
    report.note(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {machine()}")
    rows = run_cases(report, "cpu", args.repeats)
    if torch.cuda.is_available():
        rows += run_cases(report, "cuda", args.repeats)
    else:
        report.note("CUDA: no GPU here, CUDA section skipped")
    report.table(
        [
            "device",
            "shapes",
            "case",
            "torch foreach ms",
            "torch loop ms",
            "agclip ms",
            "agclip / best torch",
            "floor ms",
            "agclip / floor",
            "torch rel err",
            "agclip rel err",
        ],
        rows,
        caption="floor, timed in the same interleaved runs: on GPT-2 shapes (memory-bound) one "
        "read of every gradient (`sum`), plus one in-place scale (`mul_`) when clipping; on "
        "small models (call-bound) one `torch._foreach_norm` call, plus one "
        "`torch._foreach_mul_` when clipping",
    )
    devices = ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
    report.table(
        [
            "device",
            "shapes",
            "case",
            "torch clip + step ms",
            "agclip clip in step ms",
            "step alone ms",
            "agclip / torch",
            "floor ms",
            "agclip / floor",
            "floor / torch",
        ],
        [
            fused_step_case(
                report, args.repeats, device, clipping=clipping, shapes_name=name, shapes=shapes
            )
            for device in devices
            for name, shapes in shape_sets(device).items()
            if memory_bound(shapes)
            for clipping in (True, False)
        ],
        caption="Clip then a fused optimizer step, end to end: agclip's `clip_and_step` hands "
        "the coefficient to the step, torch scales the gradients first. Floor: one read of "
        "every gradient, then the step; when clipping, the step carries a gradient scale "
        "and writes every gradient back (the clipped values must end in `.grad`). "
        "`floor / torch` is the best ratio any hand-off to this step could reach here.",
    )
    report.emit(args.json)


if __name__ == "__main__":
    main()
