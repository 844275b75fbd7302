"""Benchmarks hand their results over as data; run_all renders and judges them."""

from __future__ import annotations

import json
from pathlib import Path

import run_all  # benchmarks/ is on the pytest pythonpath
from report import Report, render


def _torch_report() -> Report:
    report = Report("torch")
    report.note("torch 2.x; a machine")
    cells = []
    for shapes, case, value in (
        ("GPT-2 small", "clipping", 0.99),
        ("GPT-2 small", "no clipping", 0.38),
        ("2000 x 1000", "clipping", 1.20),
    ):
        cell = report.ratio(value, against="torch", device="cpu", shapes=shapes, case=case)
        cells.append(["cpu", shapes, case, cell])
    report.table(["device", "shapes", "case", "ratio"], cells, caption="a caption")
    return report


def test_report_round_trips_through_json(tmp_path: Path) -> None:
    report = _torch_report()
    report.emit(tmp_path / "r.json")
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["benchmark"] == "torch"
    assert [r["ratio"] for r in data["ratios"]] == [0.99, 0.38, 1.20]
    assert data["ratios"][1]["case"] == {
        "device": "cpu",
        "shapes": "GPT-2 small",
        "case": "no clipping",
    }
    assert render(data) == report.markdown()


def test_rendered_tables_stand_after_a_blank_line() -> None:
    text = _torch_report().markdown()
    assert "a caption\n\n| device | shapes | case | ratio |" in text
    assert "| cpu | GPT-2 small | no clipping | **0.38x** |" in text


def test_the_first_matching_target_applies_by_fields_and_peer() -> None:
    gpt2 = {"device": "cpu", "shapes": "GPT-2 small"}
    floor = "memory floor"
    assert run_all.target_for("torch", {**gpt2, "case": "clipping"}, floor) == 1.10
    assert run_all.target_for("torch", {**gpt2, "case": "no clipping"}, floor) == 1.10
    assert run_all.target_for("torch", {**gpt2, "case": "clipping"}, "torch") is None  # reported
    assert run_all.target_for("torch", {**gpt2, "case": "clip + fused step"}, "torch") == 0.90
    nothing = {**gpt2, "case": "fused step, nothing to clip"}
    assert run_all.target_for("torch", nothing, "torch") == 0.90
    small = {"device": "cpu", "shapes": "2000 x 1000"}
    assert run_all.target_for("torch", small, "torch") == 1.10
    assert run_all.target_for("torch", small, "call floor") is None  # reported, not judged
    assert run_all.target_for("torch", {"device": "cuda", "case": "x"}, floor) is None
    assert run_all.target_for("jax", {"case": "agclip eager vs optax jit"}) == 1.30
    assert run_all.target_for("numpy", {"case": "something else"}) is None


def test_verdicts_say_met_or_not_met() -> None:
    report = _torch_report()
    report.ratio(1.05, against="memory floor", device="cpu", shapes="GPT-2 small", case="clipping")
    lines = run_all.verdicts("torch", report.ratios)
    assert lines == [
        "- torch: cpu 2000 x 1000 clipping (vs torch): 1.20x against a target of <= 1.10x: "
        "**not met**",
        "- torch: cpu GPT-2 small clipping (vs memory floor): 1.05x against a target of "
        "<= 1.10x: met",
    ]
