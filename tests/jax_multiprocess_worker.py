"""One process of a 2-process ``jax.distributed`` run (tests/test_jax_distributed.py):
2 CPU devices here, 4 in all, gloo collectives. agclip's transform under ``jit``
on global arrays must give the norm and the clip of the whole, unsharded tree.

    python tests/jax_multiprocess_worker.py PROCESS_ID PORT
"""

from __future__ import annotations

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import agclip
from agclip.backends import jax as agj


def main() -> None:
    process_id, port = int(sys.argv[1]), int(sys.argv[2])
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
    assert jax.device_count() == 4
    assert jax.local_device_count() == 2
    rng = np.random.default_rng(0)  # the same host data in both processes
    host = {
        "w": rng.standard_normal((8, 6)).astype(np.float32) * 10,
        "b": rng.standard_normal(8).astype(np.float32) * 10,
    }
    mesh = Mesh(np.array(jax.devices()), ("d",))
    specs = {"w": P("d"), "b": P("d")}

    def global_array(key: str) -> jax.Array:
        value = host[key]
        return jax.make_array_from_callback(
            value.shape, NamedSharding(mesh, specs[key]), lambda index: value[index]
        )

    tree = {key: global_array(key) for key in host}
    tx = agj.clip_by_global_norm(1.0)
    clipped, state = jax.jit(tx.update)(tree, tx.init(tree))
    want_clipped, want_norm = agclip.clip_by_global_norm(host, 1.0)
    norm = float(state.norm)
    assert abs(norm - float(want_norm)) <= 1e-6 * float(want_norm), (norm, float(want_norm))
    for key, value in clipped.items():
        for shard in value.addressable_shards:
            np.testing.assert_allclose(
                np.asarray(shard.data), want_clipped[key][shard.index], rtol=1e-6
            )
    total = float(jax.jit(agclip.global_norm)(tree))
    assert abs(total - float(want_norm)) <= 1e-6 * float(want_norm)
    print(f"process {process_id}: norm {norm:.6f} == {float(want_norm):.6f}")  # noqa: T201
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
