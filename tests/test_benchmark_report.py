"""benchmarks/run_all.py reads the ratios out of the benchmarks' tables and judges them."""

from __future__ import annotations

import run_all  # benchmarks/ is on the pytest pythonpath

TORCH_TABLE = """
| device | shapes | case | torch ms | agclip ms | ratio | err |
|---|---|---|---|---|---|---|
| cpu | GPT-2 small | clipping | 45.15 | 43.74 | **0.99x** | 2.5e-08 |
| cpu | GPT-2 small | no clipping | 41.87 | 16.00 | **0.38x** | 2.5e-08 |
| cpu | 2000 x 1000 | clipping | 8.47 | 10.15 | **1.20x** | 1.0e-08 |
"""


def test_ratios_keep_labels_and_drop_measurements() -> None:
    assert run_all.ratios("torch", TORCH_TABLE) == [
        ("torch: cpu GPT-2 small clipping", 0.99),
        ("torch: cpu GPT-2 small no clipping", 0.38),
        ("torch: cpu 2000 x 1000 clipping", 1.20),
    ]


def test_the_most_specific_target_applies() -> None:
    assert run_all.target_for("torch", "torch: cpu GPT-2 small clipping") == 0.70
    assert run_all.target_for("torch", "torch: cpu GPT-2 small no clipping") == 0.40
    assert run_all.target_for("torch", "torch: cpu 2000 x 1000 clipping") == 1.10
    assert run_all.target_for("jax", "jax: agclip eager vs optax jit") == 1.30
    assert run_all.target_for("numpy", "numpy: something else") is None
