"""How far below torch can a clip of a small model go? A probe, not a page section.

On nanoGPT's shapes (0.81M float32 values in 52 tensors) a clip's time is calls, not
bytes. This times, interleaved and from the same gradients each run:

- torch's ``clip_grad_norm_`` and agclip's;
- a straight-line clip that keeps agclip's contract (each tensor's norm in float32,
  combined in float64; the overflow guard's host check; the factor computed from the
  float64 norm; no pass when it is 1; a float32 norm returned) with nothing around
  it: no validation, no dispatch, no functions of its own;
- the call floor: one ``torch._foreach_norm`` and one ``torch._foreach_mul_``.

The straight-line clip bounds what restructuring agclip's call could reach here.

    python benchmarks/probe_small_call.py [--repeats 200]
"""

from __future__ import annotations

import argparse
import math

import torch
from common import interleaved, machine, make_grads, nanogpt_shapes
from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype

from agclip.backends.torch import clip_grad_norm_


def straight_line_clip(params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    grads = [g for p in params if (g := p.grad) is not None]
    (((group,), _),) = _group_tensors_by_device_and_dtype([grads]).values()  # one: CPU float32
    norms = torch.stack(torch._foreach_norm(group, 2.0, dtype=torch.float32))
    norm = torch.linalg.vector_norm(norms, dtype=torch.float64)
    if not math.isfinite(float(norm)):  # the guard's host check (its fallback not taken)
        raise AssertionError("these gradients need no guard")
    factor = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    if float(factor) != 1.0:
        torch._foreach_mul_(grads, factor.to(torch.float32))
    return norm.to(torch.float32)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(2)
    grads = [torch.from_numpy(g) for g in make_grads(nanogpt_shapes())]
    params = []
    for g in grads:
        param = torch.nn.Parameter(torch.empty(g.shape))
        param.grad = g.clone()
        params.append(param)
    live = [p.grad for p in params]
    exact = float(torch.linalg.vector_norm(torch.cat([g.double().reshape(-1) for g in grads])))
    print(f"{machine()}; torch {torch.__version__}, 2 threads; nanoGPT shapes")
    factor = torch.tensor(0.5)
    for case, max_norm in (("clipping", exact / 2), ("no clipping", exact * 2)):

        def floor(scales: bool = case == "clipping") -> None:
            torch._foreach_norm(live)
            if scales:
                torch._foreach_mul_(live, factor)

        arms = {
            "torch clip_grad_norm_": lambda m=max_norm: torch.nn.utils.clip_grad_norm_(params, m),
            "agclip clip_grad_norm_": lambda m=max_norm: clip_grad_norm_(params, m),
            "straight-line clip": lambda m=max_norm: straight_line_clip(params, m),
            "call floor": floor,
        }
        restore = lambda: torch._foreach_copy_(live, grads)  # noqa: E731
        times = interleaved(arms, repeats=args.repeats, setup=dict.fromkeys(arms, restore))
        torch_time = times["torch clip_grad_norm_"]
        print(f"\n{case} (median us; x torch's clip_grad_norm_):")
        for name, seconds in times.items():
            print(f"  {name:24s} {seconds * 1e6:7.0f}  {seconds / torch_time:.2f}x")


if __name__ == "__main__":
    main()
