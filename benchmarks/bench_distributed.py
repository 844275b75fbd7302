"""Distributed clipping cost: collectives per call and host time, FSDP2 on 2 CPU ranks.

100 to 800 FSDP2 gradients (``fully_shard``, gloo), clipped by
``torch.nn.utils.clip_grad_norm_``, by the torchtitan recipe
(``get_total_norm``, ``full_tensor``, ``clip_grads_with_norm_``; its pipeline
all-reduce is not needed on one stage) and by agclip. Median host time of
interleaved calls on rank 0, and the collectives one call issues
(``CommDebugMode``). Every norm is checked against a float64 reference.

    python benchmarks/bench_distributed.py [--repeats 51] [--json out.json]
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

SIZES = (100, 200, 400, 800)


def measure(count: int, mesh: object, repeats: int) -> dict[str, object]:
    """One model of ``count`` FSDP2 gradients: collectives, error and time of each clipper."""
    import torch
    import torch.distributed as dist
    from common import interleaved
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, distribute_tensor
    from torch.distributed.tensor.debug import CommDebugMode

    from agclip.backends.torch import clip_grad_norm_

    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(count // 2)])
    fully_shard(model, mesh=mesh)
    params = list(model.parameters())
    full = [torch.randn(p.shape, dtype=torch.float64) for p in params]
    exact = math.sqrt(sum(float((g * g).sum()) for g in full))
    for param, grad in zip(params, full, strict=True):
        param.grad = distribute_tensor(grad.float(), mesh, param.placements)
    max_norm = exact * 10  # no clip: the norm, the coefficient, the scale (or its skip)

    def titan() -> object:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        norm = norm.full_tensor() if isinstance(norm, DTensor) else norm
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
        return norm

    calls = {
        "torch": lambda: torch.nn.utils.clip_grad_norm_(params, max_norm),
        "torchtitan": titan,
        "agclip": lambda: clip_grad_norm_(params, max_norm),
    }
    row: dict[str, object] = {"gradients": count}
    for name, call in calls.items():
        with CommDebugMode() as comm:
            norm = call()
        value = norm.full_tensor() if isinstance(norm, DTensor) else norm
        row[f"{name} collectives"] = comm.get_total_counts()
        row[f"{name} err"] = abs(float(value) - exact) / exact
    times = interleaved(calls, repeats=repeats, setup=dict.fromkeys(calls, dist.barrier))
    row.update({f"{name} ms": seconds * 1e3 for name, seconds in times.items()})
    return row


def worker(out: Path, repeats: int) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    rows = [measure(count, mesh, repeats) for count in SIZES]
    if dist.get_rank() == 0:
        out.write_text(json.dumps(rows))
    dist.barrier()  # no rank leaves while another still talks
    dist.destroy_process_group()
    # No interpreter teardown: torch's C++ threads sometimes abort the process at
    # exit, after the results are written (see tests/distributed_worker.py).
    sys.stderr.flush()
    os._exit(0)


def main() -> None:
    from report import speed_benchmark

    args, report = speed_benchmark("distributed", __doc__, repeats=51)
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "rows.json"
        subprocess.run(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc-per-node=2",
                __file__,
                "--worker",
                str(out),
                str(args.repeats),
            ],
            check=True,
            capture_output=True,
        )
        rows = json.loads(out.read_text())
    report.note(
        "FSDP2 (`fully_shard`) on 2 CPU ranks, gloo; Linear(64, 64) layers; no clip "
        "needed (the norm, the coefficient, the scale or its skip)."
    )
    table = []
    for row in rows:
        best = min(row["torch ms"], row["torchtitan ms"])
        table.append(
            [
                str(row["gradients"]),
                f"{row['torch ms']:.1f}",
                str(row["torch collectives"]),
                f"{row['torchtitan ms']:.1f}",
                str(row["torchtitan collectives"]),
                f"{row['agclip ms']:.1f}",
                str(row["agclip collectives"]),
                report.ratio(
                    row["agclip ms"] / best,
                    against="torch or torchtitan",
                    gradients=f"{row['gradients']} gradients",
                ),
                f"{max(row['torch err'], row['torchtitan err']):.1e}",
                f"{row['agclip err']:.1e}",
            ]
        )
    report.table(
        [
            "gradients",
            "torch ms",
            "torch coll.",
            "torchtitan ms",
            "torchtitan coll.",
            "agclip ms",
            "agclip coll.",
            "agclip / best",
            "peer rel err",
            "agclip rel err",
        ],
        table,
    )
    report.emit(args.json)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        sys.path.insert(0, str(Path(__file__).parent))
        worker(Path(sys.argv[2]), int(sys.argv[3]))
    else:
        main()
