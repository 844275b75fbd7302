"""The experiment in JAX: the same LSTM, trained with optax.chain(agclip clip, SGD+momentum)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from agclip.backends import jax as agj

from .adding_problem import Run, batches

HIDDEN = 64


def init_params(seed: int, hidden: int = HIDDEN) -> dict[str, jax.Array]:
    """Uniform(-1/sqrt(hidden), 1/sqrt(hidden)), as torch initialises an LSTM."""
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    bound = 1.0 / np.sqrt(hidden)

    def uniform(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
        return jax.random.uniform(key, shape, jnp.float32, -bound, bound)

    return {
        "w": uniform(keys[0], (2 + hidden, 4 * hidden)),
        "b": uniform(keys[1], (4 * hidden,)),
        "head_w": uniform(keys[2], (hidden, 1)),
        "head_b": uniform(keys[3], (1,)),
    }


def predict(params: dict[str, jax.Array], x: jax.Array) -> jax.Array:
    batch = x.shape[0]
    hidden = params["head_w"].shape[0]

    def cell(
        carry: tuple[jax.Array, jax.Array], x_t: jax.Array
    ) -> tuple[tuple[jax.Array, jax.Array], None]:
        h, c = carry
        gates = jnp.concatenate([x_t, h], axis=-1) @ params["w"] + params["b"]
        i, f, g, o = jnp.split(gates, 4, axis=-1)
        c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
        h = jax.nn.sigmoid(o) * jnp.tanh(c)
        return (h, c), None

    zeros = jnp.zeros((batch, hidden))
    (h, _), _ = jax.lax.scan(cell, (zeros, zeros), jnp.swapaxes(x, 0, 1))
    out: jax.Array = h @ params["head_w"] + params["head_b"]
    return out


def loss_fn(params: dict[str, jax.Array], x: jax.Array, y: jax.Array) -> jax.Array:
    loss: jax.Array = jnp.mean((predict(params, x) - y) ** 2)
    return loss


def _fired(config: str, grads: Any, state: Any, max_norm: float, clip_value: float) -> jax.Array:
    if config.startswith("global"):
        fired: jax.Array = state[0].norm > max_norm
        return fired
    if config.startswith("value"):
        peaks = [jnp.max(jnp.abs(g)) for g in jax.tree_util.tree_leaves(grads)]
        return jnp.max(jnp.stack(peaks)) > clip_value
    return jnp.asarray(False)


def run_all(
    *,
    steps: int,
    seed: int,
    lr: float,
    max_norm: float,
    clip_value: float,
    progress: Callable[..., Any],
) -> list[Run]:
    clips = {
        "no clipping": optax.identity(),
        f"global norm {max_norm:g} (optax.chain)": agj.clip_by_global_norm(max_norm),
        f"value {clip_value:g} (optax.chain)": agj.clip_by_value(clip_value),
    }
    runs = []
    for config, clip in clips.items():
        tx = optax.chain(clip, optax.sgd(lr, momentum=0.9))
        params = init_params(seed)
        state = tx.init(params)

        @jax.jit
        def step(
            params: Any, state: Any, x: Any, y: Any, tx: Any = tx, config: str = config
        ) -> tuple[Any, Any, jax.Array, jax.Array]:
            loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
            updates, state = tx.update(grads, state, params)
            fired = _fired(config, grads, state, max_norm, clip_value)
            return optax.apply_updates(params, updates), state, loss, fired

        run = Run("JAX", config)
        bar = progress(batches(seed, steps), total=steps, desc=f"JAX     {config:<32}")
        fired_steps = []
        for x, y in bar:
            params, state, loss, fired = step(params, state, x, y)
            fired_steps.append(fired)
            if not run.record(float(loss)):
                break
        run.clipped_steps = int(np.sum(jax.device_get(fired_steps)))
        runs.append(run)
    return runs
