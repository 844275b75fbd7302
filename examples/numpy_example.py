"""NumPy: clip a list of gradient arrays in place, and the functional core.

python examples/numpy_example.py
"""

from __future__ import annotations

import numpy as np

import agclip
from agclip.backends.numpy import clip_by_global_norm_, clip_by_value_


def main() -> None:
    rng = np.random.default_rng(0)
    grads = [rng.standard_normal((512, 256), dtype=np.float32) for _ in range(4)]
    grads.append(np.full(10, 1e20, dtype=np.float32))  # finite but huge

    norm = clip_by_global_norm_(grads, max_norm=1.0)  # in place
    print(f"pre-clip norm {norm:.4g}, after {float(agclip.global_norm(grads)):.6f}")

    clip_by_value_(grads, 1e-3)
    print(f"largest |g| after value clipping: {max(float(np.abs(g).max()) for g in grads):.0e}")

    tree = {"layer": {"w": np.array([np.nan, 1.0]), "b": np.array([2.0])}}
    print("non-finite leaves:", agclip.nonfinite_paths(tree))
    print("zeroed:", agclip.zero_nonfinite(tree)["layer"]["w"].tolist())


if __name__ == "__main__":
    main()
