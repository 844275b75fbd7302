"""The PyTorch benchmark's cases run end to end (on small stand-in shapes, on the CPU):
the CUDA section, which only a GPU machine runs, goes through the same code."""

from __future__ import annotations

import math

import pytest

pytest.importorskip("torch")

import bench_torch as bench  # benchmarks/ is on the pytest pythonpath
import run_all
from report import Report

# One tensor over the memory-bound size (and with a tail), one small one.
STAND_IN = [(300, 4096), (3, 1001), (7,)]


def test_a_gpu_times_a_1b_parameter_model_and_the_cpu_does_not() -> None:
    cuda, cpu = bench.shape_sets("cuda"), bench.shape_sets("cpu")
    assert sum(math.prod(shape) for shape in cuda["Llama-3.2-1B"]) == 1_235_814_400
    assert "Llama-3.2-1B" not in cpu
    assert cpu.keys() <= cuda.keys()
    assert [bench.memory_bound(shapes) for shapes in cuda.values()] == [True, False, False, True]
    assert sum(math.prod(shape) for shape in cpu["nanoGPT (0.81M)"]) == 809_856
    assert len(cpu["nanoGPT (0.81M)"]) == 52


def test_every_set_is_timed_against_its_floor() -> None:
    report = Report("torch")
    sets: dict[str, list[tuple[int, ...]]] = {
        "stand-in": STAND_IN,
        "small": [(1000,)] * 3,
        "2000 x 1000": [(10,)] * 3,
    }
    rows = bench.run_cases(report, "cpu", 1, sets)
    assert [row[1:3] for row in rows] == [
        ["stand-in", "clipping"],
        ["stand-in", "no clipping"],
        ["small", "clipping"],
        ["small", "no clipping"],
        ["2000 x 1000", "clipping"],
    ]
    against = [(r["case"]["shapes"], r["case"]["case"], r["against"]) for r in report.ratios]
    assert ("stand-in", "no clipping", "memory floor") in against
    assert ("small", "clipping", "memory floor") not in against
    assert ("small", "clipping", "call floor") in against  # small models: calls, not bytes
    assert ("2000 x 1000", "clipping", "call floor") in against
    for row in rows:
        assert float(row[-1]) < 1e-6  # agclip's norm error against float64


@pytest.mark.parametrize("clipping", [True, False])
def test_the_fused_step_case_is_held_against_torch_and_its_floor(clipping: bool) -> None:
    report = Report("torch")
    row = bench.fused_step_case(
        report, 1, clipping=clipping, shapes_name="stand-in", shapes=STAND_IN
    )
    assert row[:2] == ["cpu", "stand-in"]
    case = "clip + fused step" if clipping else "fused step, nothing to clip"
    assert {r["against"] for r in report.ratios} == {"torch", "step floor"}
    assert all(
        r["case"] == {"device": "cpu", "shapes": "stand-in", "case": case} for r in report.ratios
    )
    floor = next(r for r in report.ratios if r["against"] == "step floor")
    gpt2 = dict(floor["case"], shapes="GPT-2 small")
    assert run_all.target_for("torch", gpt2, "step floor") == 1.10
