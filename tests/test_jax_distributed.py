"""JAX across devices and processes: 4 host CPU devices (``jit`` with NamedSharding,
``shard_map`` over a tree mixing sharded and replicated leaves, ``pmap`` after
``pmean``) and a 2-process ``jax.distributed`` run, each against the unsharded
result."""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("jax")
pytest.importorskip("optax")
pytestmark = pytest.mark.slow

FOUR_DEVICES = textwrap.dedent("""
import os, warnings
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
warnings.filterwarnings("ignore")  # pmap's deprecation notice
import jax, jax.numpy as jnp, numpy as np
try:
    try:
        from jax import shard_map
    except ImportError:  # JAX < 0.6
        from jax.experimental.shard_map import shard_map
except ImportError:  # JAX < 0.6
    from jax.experimental.shard_map import shard_map
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import agclip
from agclip.backends import jax as agj

rng = np.random.default_rng(0)
tree = {"w1": jnp.asarray(rng.standard_normal((8, 8)) * 10, jnp.float32),
        "w2": jnp.asarray(rng.standard_normal((4, 8)) * 10, jnp.float32),
        "b": jnp.asarray(rng.standard_normal(8) * 10, jnp.float32)}
want, want_norm = agclip.clip_by_global_norm(tree, 1.0)
def close(a, b, what):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, err_msg=what)

# jit + NamedSharding: GSPMD reduces; no axis_name.
mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("dp", "tp"))
specs = {"w1": P("dp", "tp"), "w2": P(None, "tp"), "b": P()}
sharded = {k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in tree.items()}
tx = agj.clip_by_global_norm(1.0)
got, state = jax.jit(tx.update)(sharded, tx.init(sharded))
close(state.norm, want_norm, "jit norm")
for k in tree:
    close(got[k], want[k], "jit " + k)

# shard_map over a mixed tree: specs say which leaves are copies.
txs = agj.clip_by_global_norm(1.0, axis_name=("dp", "tp"), specs=specs)
def local(t):
    out, s = txs.update(t, txs.init(t))
    return out, s.norm
got, norm = jax.jit(shard_map(local, mesh=mesh, in_specs=(specs,), out_specs=(specs, P())))(sharded)
close(norm, want_norm, "shard_map norm")
for k in tree:
    close(got[k], want[k], "shard_map " + k)

# Only leaves partitioned over some of the axes, or none: their partial sums are
# invariant along the others, which shard_map's type checks refuse in a psum there.
part_specs = {"w2": P(None, "tp"), "b": P()}
part = {k: sharded[k] for k in part_specs}
want_part, want_part_norm = agclip.clip_by_global_norm({k: tree[k] for k in part_specs}, 1.0)
txp_ = agj.clip_by_global_norm(1.0, axis_name=("dp", "tp"), specs=part_specs)
def local_part(t):
    out, s = txp_.update(t, txp_.init(t))
    return out, s.norm
run = shard_map(local_part, mesh=mesh, in_specs=(part_specs,), out_specs=(part_specs, P()))
got, norm = jax.jit(run)(part)
close(norm, want_part_norm, "shard_map partial specs norm")
for k in part_specs:
    close(got[k], want_part[k], "shard_map partial specs " + k)

# A per-tensor rule reduces each tensor's norm on its own: a partially partitioned
# tensor meets the same check.
full = {k: tree[k] for k in part_specs}
want_rule, _ = agclip.adagc(full, agclip.adagc_init(full))
txa = agj.adagc(axis_name=("dp", "tp"), specs=part_specs)
state = txa.init(full)
state_specs = jax.tree_util.tree_map(lambda _: P(), state)
run = shard_map(lambda t, s: txa.update(t, s)[0], mesh=mesh,
                in_specs=(part_specs, state_specs), out_specs=part_specs)
got = jax.jit(run)(part, state)
for k in part_specs:
    close(got[k], want_rule[k], "adagc shard_map partial specs " + k)

# pmap + pmean: the gradients are identical on every device, so no axis_name.
per_device = jax.tree_util.tree_map(lambda x: jnp.stack([x * (i + 1) for i in range(4)]), tree)
mean = jax.tree_util.tree_map(lambda x: x * 2.5, tree)  # the mean of x * 1..4
want_mean, want_mean_norm = agclip.clip_by_global_norm(mean, 1.0)
txp = agj.clip_by_global_norm(1.0)
def step(g):
    g = jax.lax.pmean(g, "i")
    out, s = txp.update(g, txp.init(g))
    return out, s.norm
got, norms = jax.pmap(step, axis_name="i")(per_device)
for device in range(4):
    close(norms[device], want_mean_norm, "pmap norm")
    for k in tree:
        close(got[k][device], want_mean[k], "pmap " + k)
print("four devices ok")
""")


def test_four_host_devices_jit_shard_map_and_pmap_give_the_unsharded_result() -> None:
    done = subprocess.run(
        [sys.executable, "-c", FOUR_DEVICES],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "four devices ok" in done.stdout


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_two_process_jax_distributed_gives_the_unsharded_result() -> None:
    worker = Path(__file__).with_name("jax_multiprocess_worker.py")
    port = str(_free_port())
    processes = [
        subprocess.Popen(
            [sys.executable, str(worker), str(rank), port],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    outputs = [process.communicate(timeout=300)[0] for process in processes]
    for rank, (process, output) in enumerate(zip(processes, outputs, strict=True)):
        assert process.returncode == 0, output[-3000:]
        assert f"process {rank}: norm" in output
