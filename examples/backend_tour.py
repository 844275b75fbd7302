"""Clip the gradients of one small real model on every installed backend.

A two-layer tanh MLP regresses y = 100 * sin(x @ w); one batch's gradients are
computed natively by each framework (NumPy by hand, PyTorch autograd, jax.grad),
clipped with agclip to max_norm=1, and the table shows the norm before and
after and the time taken. Frameworks that are not installed are listed as skipped.

    python examples/backend_tour.py
"""

from __future__ import annotations

import importlib.util
import time

import numpy as np

import agclip

MAX_NORM = 1.0
rng = np.random.default_rng(0)
X = rng.standard_normal((256, 32))
Y = 100 * np.sin(X @ rng.standard_normal((32, 1)))
PARAMS = {
    "w1": rng.standard_normal((32, 64)) / np.sqrt(32),
    "b1": np.zeros(64),
    "w2": rng.standard_normal((64, 1)) / 8,
    "b2": np.zeros(1),
}


def numpy_grads() -> dict[str, np.ndarray]:
    p = {k: v.astype(np.float32) for k, v in PARAMS.items()}
    x, y = X.astype(np.float32), Y.astype(np.float32)
    h = np.tanh(x @ p["w1"] + p["b1"])
    err = 2 * (h @ p["w2"] + p["b2"] - y) / len(x)  # d(MSE)/d(out)
    dh = (err @ p["w2"].T) * (1 - h * h)
    return {"w1": x.T @ dh, "b1": dh.sum(0), "w2": h.T @ err, "b2": err.sum(0)}


def torch_grads():
    import torch

    p = {k: torch.tensor(v, dtype=torch.float32, requires_grad=True) for k, v in PARAMS.items()}
    x, y = torch.tensor(X, dtype=torch.float32), torch.tensor(Y, dtype=torch.float32)
    out = torch.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]
    torch.mean((out - y) ** 2).backward()
    return {k: v.grad for k, v in p.items()}


def jax_grads():
    import jax
    import jax.numpy as jnp

    def loss(p):
        out = jnp.tanh(X @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]
        return jnp.mean((out - Y) ** 2)

    p = {k: jnp.asarray(v, dtype=jnp.float32) for k, v in PARAMS.items()}
    return jax.grad(loss)(p)


def strict_grads():
    import array_api_strict as xs

    return {k: xs.asarray(v) for k, v in numpy_grads().items()}


BACKENDS = {
    "numpy": (None, numpy_grads),
    "array_api_strict": ("array_api_strict", strict_grads),
    "torch": ("torch", torch_grads),
    "jax": ("jax", jax_grads),
}


def main() -> None:
    print(f"agclip {agclip.__version__}: clip_by_global_norm(grads, max_norm={MAX_NORM})\n")
    rows, skipped = [], []
    for name, (module, make) in BACKENDS.items():
        if module and importlib.util.find_spec(module) is None:
            skipped.append(f"{name} (not installed)")
            continue
        grads = make()
        agclip.global_norm(agclip.clip_by_global_norm(grads, MAX_NORM)[0])  # warm-up: JAX compiles
        start = time.perf_counter()
        clipped, before = agclip.clip_by_global_norm(grads, MAX_NORM)
        after = agclip.global_norm(clipped)
        float(after)  # wait for asynchronous backends
        elapsed = (time.perf_counter() - start) * 1e3
        rows.append((name, len(grads), float(before), float(after), elapsed))
    print(f"{'backend':<18}{'leaves':>7}{'norm before':>14}{'norm after':>12}{'time ms':>10}")
    for name, leaves, before, after, ms in rows:
        print(f"{name:<18}{leaves:>7}{before:>14.4f}{after:>12.6f}{ms:>10.3f}")
    if skipped:
        print("\nskipped: " + ", ".join(skipped))
    norms = [before for _, _, before, _, _ in rows]
    print(f"\nAll backends agree on the norm to {max(norms) / min(norms) - 1:.1e} (relative).")


if __name__ == "__main__":
    main()
