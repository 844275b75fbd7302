"""The main job (python -m demo), shortened: it runs, tells its story and writes the plot."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from demo.__main__ import main, parse_args


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_demo_runs_and_unclipped_training_diverges(
    backend: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if importlib.util.find_spec("torch" if backend == "torch" else "optax") is None:
        pytest.skip(f"{backend} is not installed")
    main(["--steps", "30", "--backend", backend, "--out", str(tmp_path), "--no-progress"])
    out = capsys.readouterr().out
    rows = {
        line.split("  ")[0]: line
        for line in out.splitlines()
        if line.startswith(("no clip", "global", "value"))
    }
    assert "yes, at step" in rows["no clipping"]  # diverges at lr 1.0
    clipped = [row for name, row in rows.items() if name != "no clipping"]
    assert clipped
    assert all("  no  " in row for row in clipped)
    assert (tmp_path / "loss_curves.png").stat().st_size > 10_000


def test_demo_rejects_bad_options() -> None:
    with pytest.raises(SystemExit):
        parse_args(["--steps", "0"])
    with pytest.raises(SystemExit):
        parse_args(["--backend", "mxnet"])


def test_demo_help_gives_the_whole_description(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "in PyTorch and JAX (whichever are installed)." in text


def test_demo_table_says_what_its_columns_mean() -> None:
    from demo.adding_problem import Run
    from demo.report import table

    run = Run(framework="PyTorch", config="no clipping", losses=[1.0, 2e3])
    text = table([run])
    assert "yes, at step 2" in text
    assert "diverged: the training loss became inf/NaN or reached 1000" in text
    assert "final loss: the mean training MSE of the last 20 steps" in text


def test_demo_plot_colours_mean_the_same_configuration_in_every_panel() -> None:
    from demo.report import _style

    assert _style("global norm 1 (clip_grad_norm_)") == _style("global norm 1 (optax.chain)")
    assert _style("value 0.1") == _style("value 0.1 (optax.chain)")
    callback, function = (
        _style("global norm 1 (callback)"),
        _style("global norm 1 (clip_grad_norm_)"),
    )
    assert callback["linestyle"] != function["linestyle"]  # visible on top of its twin
    assert len({_style(c)["color"] for c in ("no clipping", "value 0.1", "global norm 1")}) == 3


def test_demo_leaves_torchs_thread_count_as_it_was(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        main(["--steps", "3", "--backend", "torch", "--out", str(tmp_path), "--no-progress"])
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
