"""The GPT benchmarks' harnesses at toy size: the overhead of clipping in a training
step, and the stability sweep's summaries and verdicts."""

from __future__ import annotations

import math
import statistics

import pytest

pytest.importorskip("torch")

import bench_gpt_overhead as overhead
import bench_gpt_stability as stability
import run_all
import torch
from common import cpu_model

from agclip.backends.torch import clip_grad_norm_
from demo.gpt import GPT, GPTConfig, loss_of
from demo.gpt_runs import TOY, GPTRun, Setup

TINY = overhead.Shape(GPTConfig(context=8, width=16, layers=1, heads=2), batch=2, context=8)


def test_the_overhead_harness_times_every_arm_against_the_step_alone() -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: a busy second core would only slow this down
    try:
        samples = overhead.measure(TINY, repeats=2, warm_up_calls=2)
    finally:
        torch.set_num_threads(threads)
    expected = {overhead.BASELINE, *overhead.CLIP_ARMS, *overhead.STEP_ARMS}
    assert set(samples) == expected
    assert all(len(records) == 2 for records in samples.values())
    stats = overhead.summarize(samples)
    for name in [*overhead.CLIP_ARMS, *overhead.STEP_ARMS]:
        assert all(math.isfinite(s) and s > 0 for s in stats[name]["step"])
        assert all(math.isfinite(c) for c in stats[name]["cost"])
        assert all(math.isfinite(share) for share in stats[name]["share"])
        if name not in overhead.FLOORS:  # a floor reads, it returns no norm
            assert stats[name]["norm"] > 0  # every clip call returns the pre-clip norm
    for name in overhead.CLIP_ARMS:  # timed apart as well
        assert all(math.isfinite(c) and c >= 0 for c in stats[name]["clip"])
    for name in (overhead.BASELINE, *overhead.STEP_ARMS):  # no separate clip time
        assert all(math.isnan(c) for c in stats[name]["clip"])
    assert stats[overhead.BASELINE]["cost"] == [0.0, 0.0]
    table = overhead.rows(stats)
    assert [row[0] for row in table] == list(samples)
    assert all(len(row) == len(overhead.HEADERS) for row in table)
    best, share = overhead.lowest_share(stats)
    assert "agclip" in best
    assert share == min(statistics.median(stats[n]["share"]) for n in stats if "agclip" in n)


def test_the_step_arms_clip_like_clip_then_step() -> None:
    """``clip_and_step`` in the harness clips: the same parameters as clip, then step."""
    torch.manual_seed(0)
    models = [GPT(TINY.config) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    optimizers = [torch.optim.AdamW(m.parameters(), lr=0.1, fused=True) for m in models]
    x = torch.randint(0, TINY.config.vocab, (TINY.batch, TINY.context))
    for model in models:
        loss_of(model, x, x).mul(100).backward()
    clip_grad_norm_(list(models[0].parameters()), overhead.MAX_NORM)
    optimizers[0].step()
    overhead.STEP_ARMS["agclip clip_and_step"](models[1], optimizers[1])()
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(a, b)


def test_the_overhead_benchmark_covers_gpt2_small_and_names_the_cpu() -> None:
    gpt2 = overhead.MODELS["GPT-2 small"].config
    assert (gpt2.layers, gpt2.width, gpt2.vocab, gpt2.tie_head) == (12, 768, 50257, True)
    assert set(overhead.CLIP_ARMS) == {
        "torch.nn.utils.clip_grad_norm_",
        "agclip clip_grad_norm_",
        "agclip ZClip().step",
        "agclip AutoClip().step",
        "agclip AdaGC().step",
    }
    assert set(overhead.STEP_ARMS) == {
        "agclip clip_and_step",
        "agclip clip_and_step(ZClip())",
        *overhead.FLOORS,
    }
    assert run_all.target_for("gpt_overhead", {"case": "lowest clip share"}, "torch") == 0.5
    assert cpu_model()
    assert overhead._spread([1.0, 2.0, 3.0]) == "2.0 (1.4-2.6)"


def _run(config: str, lr: float, seed: int, losses: list[float], **kw: object) -> GPTRun:
    run = GPTRun(config, lr, seed, limit=5.56, losses=losses, val_loss=2.0)
    for key, value in kw.items():
        setattr(run, key, value)
    return run


def _reaching(step: int) -> list[float]:
    """200 losses whose 20-step mean first drops below the target at ``step``."""
    return [3.0] * (step - 4) + [0.0] * (204 - step)


def _results(clipped_diverges: bool, clipped_steps: int) -> dict[tuple[str, float], list[GPTRun]]:
    """Two learning rates; at the high one the unclipped run diverges. At the low one
    the unclipped run reaches the target at step 100, the clipped one at
    ``clipped_steps``."""
    return {
        ("no clipping", 0.01): [_run("no clipping", 0.01, 0, _reaching(100))],
        ("no clipping", 1.0): [_run("no clipping", 1.0, 0, [9.0] * 20, diverged_at=20)],
        ("global norm 1", 0.01): [_run("global norm 1", 0.01, 0, _reaching(clipped_steps))],
        ("global norm 1", 1.0): [
            _run("global norm 1", 1.0, 0, [9.0] * 20, diverged_at=20)
            if clipped_diverges
            else _run("global norm 1", 1.0, 0, [3.0] * 200)
        ],
    }


def test_the_explosion_verdict_says_whether_clipping_saved_every_diverged_run() -> None:
    held = stability.explosion_verdict(_results(clipped_diverges=False, clipped_steps=80))
    assert "diverged 1 times (lr 1 seed 0)" in held[0]
    assert held[1].endswith("1 of 1 of those runs did not diverge: the claim holds for it.")
    failed = stability.explosion_verdict(_results(clipped_diverges=True, clipped_steps=80))
    assert "0 of 1" in failed[1]
    assert "**does not hold**" in failed[1]


@pytest.mark.parametrize(
    ("clipped_steps", "words"),
    [
        (80, "a median 20% fewer steps (from -20% to -20%): within the claim's 10-30%"),
        (50, "50% fewer steps (from -50% to -50%): faster than the claim's 10-30%"),
        (95, "5% fewer steps (from -5% to -5%): **faster, but by less than the claimed 10%**"),
        (120, "20% more steps (from +20% to +20%): **not faster**"),
    ],
)
def test_the_speed_verdict_compares_steps_to_target_where_both_runs_reach_it(
    clipped_steps: int, words: str
) -> None:
    lines = stability.speed_verdict(_results(clipped_diverges=False, clipped_steps=clipped_steps))
    assert "over 1 pairs" in lines[1]  # the diverged unclipped run is no pair
    assert words in lines[1]


def test_the_sweep_runs_at_toy_size_and_summarizes_per_arm_and_lr() -> None:
    setup = Setup(model=TOY.model, batch=TOY.batch, steps=12, warmup=2, eval_batches=1)
    results = stability.sweep((1e-3,), 2, setup, names=["no clipping", "ZClip"], workers=1)
    assert set(results) == {("no clipping", 1e-3), ("ZClip", 1e-3)}
    assert [run.seed for run in results[("ZClip", 1e-3)]] == [0, 1]
    stats = stability.summarize(results[("ZClip", 1e-3)])
    assert stats["runs"] == 2
    assert stats["diverged"] == 0
    assert len(stats["spikes"]) == 2
    assert math.isfinite(stats["worst"])
    assert stats["val"] is not None
    assert 0 < stats["val"] < 10


def test_run_all_knows_the_gpt_benchmarks_and_updates_only_their_sections() -> None:
    assert run_all.BENCHES["gpt_overhead"][1] == "bench_gpt_overhead.py"
    assert run_all.BENCHES["gpt_stability"][1] == "bench_gpt_stability.py"
    title = run_all.BENCHES["gpt_stability"][0]
    numpy_title = run_all.BENCHES["numpy"][0]
    page = f"# Benchmarks\n\nheader\n\n## {numpy_title}\n\nold numpy\n\n## Gone\n\nkept\n"
    new = run_all.update_page(page, {"gpt_stability": f"## {title}\n\nnew\n"})
    assert new == (
        f"# Benchmarks\n\nheader\n\n## {numpy_title}\n\nold numpy\n\n## {title}\n\nnew\n"
        "\n## Gone\n\nkept\n"
    )
    again = run_all.update_page(new, {"gpt_stability": f"## {title}\n\nnewer\n"})
    assert again.count(f"## {title}") == 1
    assert "newer" in again
    assert "old numpy" in again
