"""The adaptive-clipping benchmark's measurements, on runs whose answers are known."""

from __future__ import annotations

import math

import pytest

pytest.importorskip("torch")

import bench_adaptive as bench  # benchmarks/ is on the pytest pythonpath
import run_all


def _run(losses: list[float], corrupted: list[int], clipped: list[bool] | None = None) -> bench.Run:
    return bench.Run(losses=losses, corrupted=corrupted, clipped=clipped or [False] * len(losses))


def test_an_excursion_is_the_peak_after_a_corrupted_batch_over_the_loss_before() -> None:
    losses = [1.0] * 10 + [5.0, 3.0] + [1.0] * 100
    run = _run(losses, corrupted=[10, 60])
    assert bench.excursions(run) == [5.0, 1.0]
    assert bench.excursions(run, range(50, 112)) == [1.0]
    assert bench.steps_above_twice_best(run) == 2


def test_summaries_split_the_halves_of_a_shifted_run() -> None:
    losses = [1.0] * 5 + [4.0] + [1.0] * 4 + [1.0] * 5 + [2.0] + [1.0] * 4
    run = _run(losses, corrupted=[5, 15], clipped=[False] * 10 + [True] * 10)
    stats = bench.summarize([run])
    assert stats["worst early"] == 4.0
    assert stats["worst late"] == 2.0
    assert stats["clipped late"] == 1.0
    assert stats["clipped"] == 0.5


def test_verdicts_hold_the_rules_to_the_issue_targets() -> None:
    def stats(worst: float, final: float) -> dict[str, float]:
        return {"worst": worst, "final": final}

    table = {
        "no clipping": stats(40.0, 3.0),
        "fixed max_norm=0.1": stats(4.0, 1.0),
        "fixed max_norm=1": stats(20.0, 2.0),
        "ZClip (z=2.5, alpha=0.97)": stats(1.5, 1.2),
        "AutoClip (p=10)": stats(3.5, 1.0),
        "AdaGC (1.05, 0.98, abs=1)": stats(1.1, 1.4),
    }
    lines = bench.verdicts(table)
    assert lines[0].endswith(": met")  # no clipping above 30x: the scenario bites
    assert lines[1].endswith(": met")
    assert lines[2].endswith("**not met**")  # worst 3.5x
    assert lines[3].endswith("**not met**")  # final 1.4x the best fixed
    assert run_all.target_for("adaptive", {"case": "ZClip step, clipping"}, "torch") == 1.2


@pytest.mark.parametrize("arm", list(bench.ARMS))
def test_every_arm_trains_through_a_corrupted_batch(arm: str) -> None:
    run = bench.train(bench.SCENARIOS["scale jump"], arm, seed=0, steps=260)
    assert len(run.losses) == 260
    assert run.corrupted == [249]
    assert all(math.isfinite(loss) for loss in run.losses)
