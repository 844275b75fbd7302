"""The global norm across ranks: one all-reduce of one float64 pair, whatever the layout.

Every gradient counts ``||local||^p / replication``, where ``replication`` is
how many ranks hold an identical copy of that local tensor:

- a DTensor: the product of the mesh sizes of its ``Replicate`` dimensions
  (``Partial`` placements are resolved first); its local shard is reduced with
  agclip's own kernels, so no DTensor dispatch and no all-gather. Any number of
  meshes, mixed with plain tensors, is fine;
- a plain tensor: with ``process_group=P``, distinct on the ranks of ``P``
  (pipeline stages, FSDP1 or ZeRO shards: 1); without one, a copy on every
  rank (DDP, TP's plain modules: ``world``).

The partial sums then meet in one ``all_reduce``, together with the element
count so that every rank takes the same branch of the range guard; p=inf
reduces by MAX. The group is ``process_group`` when given (whatever ranks
outside it hold; DTensor meshes must then lie within it), else the default
group (it covers pipeline stages whose meshes are sub-meshes). With neither a
DTensor nor a ``process_group`` nothing is reduced: DDP gradients are already
identical everywhere.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .._kernels import Batch, Kernels
from .._pipeline import LOCAL, Reduction


@dataclass(frozen=True, eq=False)
class GroupReduction(Reduction):
    """Partial results combined with ``all_reduce`` over a process group."""

    group: Any

    def sum(self, x: Any) -> Any:
        return self._all_reduce(x, dist.ReduceOp.SUM)

    def max(self, x: Any) -> Any:
        return self._all_reduce(x, dist.ReduceOp.MAX)

    def needs_guard(self, needed_here: bool) -> bool:
        # gloo (CPU): always guard. The branch is a free host check of a value
        # that was reduced, so every rank takes it alike, ranks without
        # gradients included. NCCL: the static answer, so no host sync; ranks
        # agree when they hold the same gradient dtypes (see the docs).
        return needed_here or dist.get_backend(self.group) != "nccl"

    def sum_and_count(self, total: Any, batch: Batch) -> tuple[Any, Any]:
        count = torch.tensor(float(batch.size)).to(total.device)
        both = torch.stack([total.to(torch.float64), count])
        both = self._all_reduce(both, dist.ReduceOp.SUM)
        return both[0].to(total.dtype), both[1]

    def _all_reduce(self, x: torch.Tensor, op: Any) -> torch.Tensor:
        wide = x.to(device=self._device(x), dtype=torch.float64, copy=True)
        dist.all_reduce(wide, op=op, group=self.group)
        return wide.to(device=x.device, dtype=x.dtype)

    def _device(self, x: torch.Tensor) -> torch.device:
        # NCCL reduces CUDA tensors only; a rank without gradients has a CPU zero.
        if x.is_cpu and dist.get_backend(self.group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return x.device


def _group_of(process_group: Any) -> Any:
    """The ``ProcessGroup`` to reduce over: the one given, or a ``DeviceMesh``'s."""
    if not hasattr(process_group, "get_group"):
        return process_group
    if process_group.ndim == 1:
        return process_group.get_group()
    if process_group.size() == dist.get_world_size():
        return dist.group.WORLD
    raise ValueError(
        f"process_group is a {process_group.ndim}-D DeviceMesh of {process_group.size()} of the "
        f"{dist.get_world_size()} ranks: pass the ProcessGroup over which the gradients are "
        "distinct (or a 1-D mesh)"
    )


def _dtensor_type() -> Any:
    from torch.distributed.tensor import DTensor

    return DTensor


def _local_and_replication(tensor: Any) -> tuple[torch.Tensor, int]:
    from torch.distributed.tensor import Replicate

    placements = tensor.placements
    if any(placement.is_partial() for placement in placements):
        placements = [Replicate() if p.is_partial() else p for p in placements]
        tensor = tensor.redistribute(tensor.device_mesh, placements)  # rare: pending sums
    replication = 1
    for dim, placement in enumerate(placements):
        if placement.is_replicate():
            replication *= tensor.device_mesh.size(dim)
    return tensor.to_local(), replication


def distributed_batch(
    k: Kernels, batch: Batch, process_group: Any = None
) -> tuple[Batch, Reduction]:
    """The batch to reduce (local shards, weighted by 1/replication) and the reduction
    that makes its norm global; the batch itself and no reduction when nothing is
    distributed."""
    if process_group is None and not (dist.is_available() and dist.is_initialized()):
        return batch, LOCAL
    tensors, dtensor = batch.leaves, _dtensor_type()
    if process_group is None and not any(isinstance(t, dtensor) for t in tensors):
        return batch, LOCAL  # plain copies on every rank (DDP)
    plain = 1 if process_group is not None else dist.get_world_size()
    local, by_replication = [], defaultdict(list)
    for tensor in tensors:
        if isinstance(tensor, dtensor):
            shard, replication = _local_and_replication(tensor)
        else:
            shard, replication = tensor, plain
        local.append(shard)
        by_replication[replication].append(shard)
    groups, weights = [], []
    for replication, shards in sorted(by_replication.items()):
        part = k.prepare(shards).groups
        groups += part
        weights += [1.0 / replication] * len(part)
    group = _group_of(process_group) if process_group is not None else dist.group.WORLD
    return Batch(local, groups, weights), GroupReduction(group)
