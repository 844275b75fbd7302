"""JAX/optax: agclip's transform in an optax chain, logging the pre-clip norm.

python examples/jax_example.py
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from agclip.backends.jax import clip_by_global_norm


def main(steps: int = 200) -> None:
    x = jax.random.normal(jax.random.PRNGKey(0), (256, 8))
    y = x @ jnp.arange(1.0, 9.0) * 20
    params = {"w": jnp.zeros(8), "b": jnp.zeros(())}
    tx = optax.chain(clip_by_global_norm(1.0), optax.sgd(0.5, momentum=0.9))
    state = tx.init(params)

    def loss(p):
        return jnp.mean((x @ p["w"] + p["b"] - y) ** 2)

    @jax.jit
    def step(p, s):
        value, grads = jax.value_and_grad(loss)(p)
        updates, s = tx.update(grads, s, p)
        return optax.apply_updates(p, updates), s, value

    for i in range(steps):
        params, state, value = step(params, state)
        if i % 50 == 0:
            print(
                f"step {i:3d}  loss {float(value):10.3f}  pre-clip norm {float(state[0].norm):9.3f}"
            )
    print(f"final loss {float(loss(params)):.4f}")


if __name__ == "__main__":
    main()
