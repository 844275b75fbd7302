"""agclip.backends.jax vs optax.clip_by_global_norm on GPT-2-small gradients, side by side.

124M float32 values in 148 arrays. Cases: both jitted; agclip called eagerly
(its cached compiled update) against optax jitted. Median of interleaved runs.

    python benchmarks/bench_jax.py [--repeats 7] [--json out.json]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from common import gpt2_small_shapes, interleaved, machine, make_grads, reference_norm
from report import Report, speed_benchmark

from agclip.backends import jax as agj


def main() -> None:
    args, report = speed_benchmark("jax", __doc__, repeats=7)
    report.note(f"jax {jax.__version__} on {jax.devices()[0].platform}; {machine()}")
    host = make_grads(gpt2_small_shapes())
    exact = reference_norm(host)
    grads = [jnp.asarray(g) for g in host]
    del host
    ours, theirs = agj.clip_by_global_norm(exact / 2), optax.clip_by_global_norm(exact / 2)
    ours_jit, theirs_jit = jax.jit(ours.update), jax.jit(theirs.update)
    state_o, state_t = ours.init(grads), theirs.init(grads)

    def block(out):
        jax.block_until_ready(out)

    times = interleaved(
        {
            "optax jit": lambda: block(theirs_jit(grads, state_t)),
            "agclip jit": lambda: block(ours_jit(grads, state_o)),
            "agclip eager": lambda: block(ours.update(grads, state_o)),
        },
        repeats=args.repeats,
    )
    norm = float(ours_jit(grads, state_o)[1].norm)
    optax_norm = float(jnp.sqrt(sum(jnp.sum(g * g) for g in grads)))
    base = times["optax jit"]
    report.table(
        ["case", "optax jit ms", "agclip ms", "ratio", "optax-style f32 rel err", "agclip rel err"],
        [
            [
                "both jitted",
                f"{base * 1e3:.1f}",
                f"{times['agclip jit'] * 1e3:.1f}",
                report.ratio(times["agclip jit"] / base, against="optax", case="both jitted"),
                f"{abs(optax_norm - exact) / exact:.1e}",
                f"{abs(norm - exact) / exact:.1e}",
            ],
            [
                "agclip eager vs optax jit",
                f"{base * 1e3:.1f}",
                f"{times['agclip eager'] * 1e3:.1f}",
                report.ratio(
                    times["agclip eager"] / base, against="optax", case="agclip eager vs optax jit"
                ),
                "",
                "",
            ],
        ],
    )
    adamw_case(report, grads, exact, args.repeats)
    report.emit(args.json)


def adamw_case(report: Report, grads: list[jax.Array], exact: float, repeats: int) -> None:
    """``optax.chain(clip, optax.adamw)`` under ``jit``, end to end: XLA fuses the scale
    into the update, for optax's clip and for agclip's (its range guard included)."""
    params = [jnp.zeros_like(g) for g in grads]
    chains = {
        "optax": optax.chain(optax.clip_by_global_norm(exact / 2), optax.adamw(1e-4)),
        "agclip": optax.chain(agj.clip_by_global_norm(exact / 2), optax.adamw(1e-4)),
    }
    steps, states = {}, {}
    for name, tx in chains.items():
        states[name] = tx.init(params)
        steps[name] = jax.jit(lambda g, s, p, tx=tx: optax.apply_updates(p, tx.update(g, s, p)[0]))
    times = interleaved(
        {
            name: lambda n=name: jax.block_until_ready(steps[n](grads, states[n], params))
            for name in chains
        },
        repeats=repeats,
    )
    report.table(
        ["case", "optax clip + adamw ms", "agclip clip + adamw ms", "ratio"],
        [
            [
                "clip + adamw, jitted",
                f"{times['optax'] * 1e3:.1f}",
                f"{times['agclip'] * 1e3:.1f}",
                report.ratio(
                    times["agclip"] / times["optax"], against="optax", case="clip + adamw"
                ),
            ]
        ],
        caption="A whole optimizer update, jitted: `optax.chain(clip, optax.adamw)`.",
    )


if __name__ == "__main__":
    main()
