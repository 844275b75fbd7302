"""Many leaves on JAX: the first call's compile time and peak memory, and the norm's
error with float32 accumulation (x64 off), agclip's transform against optax's.

Each measurement runs in a fresh process (compile caches and peak memory start
clean): trees of 100, 800, 1,000 and 5,000 float32 leaves of 50-400 values with
scales spread over e^±4. Peak memory is the process's peak resident set minus
that of the same process before compiling.

    python benchmarks/bench_jax_compile.py [--leaves 100,800,1000,5000] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from common import machine
from report import Report, add_json_option

MEASURE = """
import json, resource, sys, time
import numpy as np, jax, jax.numpy as jnp, optax
from agclip.backends import jax as agj
leaves, which = int(sys.argv[1]), sys.argv[2]
rng = np.random.default_rng(1)
tree = [jnp.asarray(rng.standard_normal(rng.integers(50, 400)) * np.exp(rng.normal(0, 2)),
        jnp.float32) for _ in range(leaves)]
exact = np.sqrt(sum(float(np.sum(np.asarray(t, np.float64) ** 2)) for t in tree))
tx = (agj if which == "agclip" else optax).clip_by_global_norm(exact / 2)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
compiled = jax.jit(tx.update).lower(tree, tx.init(tree)).compile()
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
jax.block_until_ready(compiled(tree, tx.init(tree)))
error = abs(float(agj.clip_by_global_norm(1.0).update(tree, None)[1].norm) - exact) / exact
naive = abs(float(jnp.sqrt(sum(jnp.sum(t * t) for t in tree))) - exact) / exact
print(json.dumps({"seconds": seconds, "megabytes": peak / 1024, "error": error, "naive": naive}))
"""


def measure(leaves: int, which: str) -> dict[str, float]:
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, str(leaves), which],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--leaves", default="100,800,1000,5000")
    parser.add_argument("--optax-up-to", type=int, default=1000, help="optax's compile is slow")
    add_json_option(parser)
    args = parser.parse_args()
    report = Report("jax_compile")
    report.note(f"{machine()}; jitted `clip_by_global_norm(...).update`, x64 off.")
    rows = []
    for leaves in map(int, args.leaves.split(",")):
        ours = measure(leaves, "agclip")
        theirs = measure(leaves, "optax") if leaves <= args.optax_up_to else None
        ratio = ""
        if theirs is not None:
            ratio = report.ratio(
                ours["seconds"] / theirs["seconds"], against="optax", case=f"{leaves} leaves"
            )
        rows.append(
            [
                str(leaves),
                "" if theirs is None else f"{theirs['seconds']:.1f}",
                f"{ours['seconds']:.1f}",
                ratio,
                "" if theirs is None else f"{theirs['megabytes']:.0f}",
                f"{ours['megabytes']:.0f}",
                f"{ours['naive']:.1e}",
                f"{ours['error']:.1e}",
            ]
        )
    report.table(
        [
            "leaves",
            "optax compile s",
            "agclip compile s",
            "agclip / optax",
            "optax peak MB",
            "agclip peak MB",
            "float32 sum rel err",
            "agclip rel err",
        ],
        rows,
        caption="First-call compile of the jitted update (lower + compile), in fresh "
        "processes; errors of the global norm against float64 (`float32 sum`: the "
        "sum of per-leaf float32 sums of squares, as optax's `tree.norm` takes it). "
        f"optax is compiled up to {args.optax_up_to:,} leaves (`--optax-up-to`), "
        "to keep `make bench` short.",
    )
    report.emit(args.json)


if __name__ == "__main__":
    main()
