"""The demo's GPT: the model, the data, the spike counter, the runs and what they print."""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")

import torch

from demo.__main__ import main
from demo.gpt import (
    GPT,
    MAX_CHARS,
    VAL_FRACTION,
    VOCAB,
    GPTConfig,
    encode,
    prepare_data,
    read_sources,
    warmup_cosine,
)
from demo.gpt_report import table
from demo.gpt_runs import TOY, GPTRun, count_spikes, divergence_limit

ROOT = Path(__file__).resolve().parents[1]
SMALL = GPTConfig(context=12, width=16, layers=2, heads=2)


def test_logits_have_one_row_per_position_and_character() -> None:
    torch.manual_seed(0)
    model = GPT(SMALL)
    logits = model(torch.randint(0, SMALL.vocab, (3, 10)))
    assert logits.shape == (3, 10, len(VOCAB))
    assert logits.dtype == torch.float32
    assert model.head.weight is not model.tok_emb.weight  # the demo's head is untied


def test_a_tied_head_shares_the_token_embedding() -> None:
    model = GPT(GPTConfig(context=8, width=16, layers=1, heads=2, tie_head=True))
    assert model.head.weight is model.tok_emb.weight
    names = [name for name, _ in model.named_parameters()]
    assert "head.weight" not in names  # counted once, under the embedding


def test_attention_is_causal() -> None:
    torch.manual_seed(0)
    model = GPT(SMALL).eval()
    tokens = torch.randint(0, SMALL.vocab, (2, SMALL.context))
    changed = tokens.clone()
    changed[:, 7] = (changed[:, 7] + 1) % SMALL.vocab
    with torch.no_grad():
        before, after = model(tokens), model(changed)
    torch.testing.assert_close(after[:, :7], before[:, :7], rtol=0, atol=0)
    assert not torch.allclose(after[:, 7:], before[:, 7:])  # the change is seen from there on


def test_data_is_deterministic_split_and_read_without_the_network(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("the data preparation opened a socket")

    monkeypatch.setattr(socket, "socket", no_network)
    first, second = prepare_data(), prepare_data()
    assert torch.equal(first.train, second.train)
    assert torch.equal(first.val, second.val)
    assert first.train.numel() + first.val.numel() == MAX_CHARS
    assert first.val.numel() == pytest.approx(MAX_CHARS * VAL_FRACTION, abs=1)
    assert first.train.dtype == torch.int64
    assert int(first.train.min()) >= 0
    assert int(first.train.max()) < len(VOCAB)
    # The split is one cut: the validation text follows the training text.
    text = read_sources()
    assert encode(text[-first.val.numel() :]).equal(first.val)


def test_batches_come_from_a_seeded_generator_and_targets_are_the_next_characters() -> None:
    data = prepare_data()

    def draw(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        return data.batch("train", 4, 16, torch.Generator().manual_seed(seed))

    (x, y), (x_again, _), (x_other, _) = draw(0), draw(0), draw(1)
    assert x.shape == y.shape == (4, 16)
    assert torch.equal(x, x_again)
    assert not torch.equal(x, x_other)
    assert torch.equal(x[:, 1:], y[:, :-1])


def test_encoding_maps_unknown_characters_to_a_question_mark(tmp_path: Path) -> None:
    assert encode("a\n?é").tolist() == [VOCAB.index(c) for c in "a\n??"]
    (tmp_path / "argparse.py").write_text("x" * 100)  # a stdlib with one small file
    with pytest.raises(FileNotFoundError, match="found only 100 characters"):
        read_sources(1000, stdlib=tmp_path)
    assert read_sources(60, stdlib=tmp_path) == "x" * 60


def test_the_schedule_warms_up_linearly_then_decays_by_a_cosine() -> None:
    factor = warmup_cosine(10, 110, floor=0.1)
    assert factor(0) == pytest.approx(0.1)
    assert factor(9) == pytest.approx(1.0)
    assert factor(10) == pytest.approx(1.0)
    assert factor(60) == pytest.approx(0.55)
    assert factor(110) == pytest.approx(0.1)
    assert factor(500) == pytest.approx(0.1)


def test_count_spikes_on_synthetic_loss_curves() -> None:
    flat = [2.0] * 100
    assert count_spikes(flat) == 0
    noisy = [2.0 * (1 + 0.2 * math.sin(i)) for i in range(100)]  # within +-20%
    assert count_spikes(noisy) == 0
    falling = [4.0 * 0.98**i for i in range(100)]
    assert count_spikes(falling) == 0
    one = [*flat[:50], 5.0, *flat[51:]]
    assert count_spikes(one) == 1
    two_steps = [*flat[:50], 5.0, 4.0, *flat[52:]]
    assert count_spikes(two_steps) == 2  # steps are counted, not events
    assert count_spikes([*flat[:50], 2.59, *flat[51:]]) == 0  # under 1.3x the median
    assert count_spikes([*flat[:50], 2.61, *flat[51:]]) == 1
    assert count_spikes([2.0, 9.0, *flat]) == 0  # too early to judge
    assert count_spikes([*flat[:50], math.nan, math.inf, *flat[52:]]) == 2
    assert count_spikes(one, factor=3.0) == 0


def test_a_run_diverges_on_a_non_finite_loss_or_a_sustained_blow_up() -> None:
    limit = divergence_limit(len(VOCAB))
    assert limit == pytest.approx(math.log(96) + 1)
    run = GPTRun("no clipping", 0.1, 0, limit)
    assert all(run.record(3.0, 1.0, False) for _ in range(10))
    assert not run.record(math.nan, 1.0, False)
    assert run.diverged_at == 11
    spiky = GPTRun("no clipping", 0.1, 0, limit)
    assert all(spiky.record(loss, 1.0, False) for loss in [3.0] * 19 + [20.0])  # mean 3.85
    blown = GPTRun("no clipping", 0.1, 0, limit)
    assert not all(blown.record(loss, 1.0, False) for loss in [9.0] * 20)
    assert blown.diverged_at == 20
    assert blown.steps_to_target is None


def test_a_diverged_run_shows_where_it_diverged_not_a_loss() -> None:
    good = GPTRun("global norm 1", 0.1, 0, 5.56, losses=[3.0] * 30, val_loss=2.75)
    bad = GPTRun("no clipping", 0.1, 0, 5.56, losses=[3.0, 40.0, math.nan], diverged_at=3)
    text = table([bad, good])
    rows = {line.split("  ")[0]: line for line in text.splitlines()}
    assert "diverged at step 3" in rows["no clipping"]
    assert "2.750" in rows["global norm 1"]
    assert "nan" not in rows["no clipping"].lower()


def test_the_gpt_part_of_the_demo_runs_at_toy_size(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = torch.get_num_threads()
    toy = ["--task", "gpt", "--gpt-size", "toy", "--gpt-steps", str(TOY.steps)]
    main([*toy, "--out", str(tmp_path), "--no-progress"])
    out = capsys.readouterr().out
    assert "AdamW (0.9, 0.95)" in out
    rows = [line for line in out.splitlines() if line.startswith(("no clip", "global", "ZClip"))]
    assert [row.split("  ")[0] for row in rows] == ["no clipping", "global norm 1", "ZClip"]
    for row in rows:
        cells = row.split()
        assert "diverged" in row or 0 < float(cells[-5]) < 10  # a validation loss
    assert (tmp_path / "gpt_loss.png").stat().st_size > 10_000
    assert torch.get_num_threads() == before


def test_piped_output_holds_no_carriage_returns(tmp_path: Path) -> None:
    """Progress bars draw with \\r; with output going to a pipe or file there are none."""
    command = [sys.executable, "-m", "demo", "--task", "gpt", "--gpt-size", "toy"]
    command += ["--gpt-steps", "10", "--out", str(tmp_path)]  # progress bars not turned off
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, timeout=120, check=True)
    assert b"GPT loss curves" in done.stdout
    assert b"\r" not in done.stdout
    assert b"\r" not in done.stderr


def test_the_figure_legend_says_how_often_a_run_clipped_and_what_it_shares() -> None:
    from demo.gpt_report import _label

    plain = GPTRun("no clipping", 0.03, 0, 5.56, losses=[4.0, 3.0, 3.5, 3.2, 3.1, 3.0, 7.0, 3.0])
    zclip = GPTRun("ZClip", 0.03, 0, 5.56, losses=[*plain.losses[:7], 2.9], clipped_steps=1)
    clipped = GPTRun("global norm 1", 0.03, 0, 5.56, losses=[4.0, 2.0] * 4, clipped_steps=4)
    runs = [plain, clipped, zclip]
    assert _label(plain, runs) == "no clipping"
    assert _label(clipped, runs) == "global norm 1 (clipped 50% of steps)"
    assert _label(zclip, runs) == (
        "ZClip (clipped 12% of steps; the same as no clipping for the first 7 steps)"
    )
