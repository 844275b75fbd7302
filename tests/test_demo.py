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
    lstm = ["--task", "lstm", "--steps", "30", "--backend", backend]
    main([*lstm, "--out", str(tmp_path), "--no-progress"])
    out = capsys.readouterr().out
    rows = {
        line.split("  ")[0]: line
        for line in out.splitlines()
        if line.startswith(("no clip", "global", "value"))
    }
    assert "diverged at step" in rows["no clipping"]  # diverges at lr 1.0
    clipped = [row for name, row in rows.items() if name != "no clipping"]
    assert clipped
    assert not any("diverged" in row for row in clipped)
    assert all(0 < float(row.split()[-3]) < 1 for row in clipped)  # the final MSE
    assert (tmp_path / "loss_curves.png").stat().st_size > 10_000


def test_demo_rejects_bad_options() -> None:
    with pytest.raises(SystemExit):
        parse_args(["--steps", "0"])
    with pytest.raises(SystemExit):
        parse_args(["--backend", "mxnet"])
    with pytest.raises(SystemExit):
        parse_args(["--task", "resnet"])
    with pytest.raises(SystemExit):
        parse_args(["--gpt-lr", "0"])


def test_demo_help_gives_the_whole_description(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "in PyTorch and JAX (whichever are installed);" in text
    assert "with ZClip (PyTorch)." in text
    assert "--task {all,lstm,gpt}" in text
    assert "they show only on a terminal anyway" in text


def test_demo_table_says_what_its_columns_mean() -> None:
    from demo.adding_problem import Run
    from demo.report import table

    run = Run(framework="PyTorch", config="no clipping", losses=[1.0, 2e3])
    clipped = Run(framework="PyTorch", config="value 0.1", losses=[0.25] * 30, clipped_steps=3)
    text = table([run, clipped])
    rows = {line.split("  ")[0]: line for line in text.splitlines()}
    assert rows["no clipping"].split()[2:] == ["diverged", "at", "step", "2", "never", "-"]
    assert rows["value 0.1"].split()[2:] == ["0.2500", "never", "10%"]
    assert "clip time" not in text  # timed in the overhead benchmark, not here
    assert "diverged: the training loss became inf/NaN or reached 1000" in text
    assert "final loss: the mean training MSE of the last" in text


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
    # Value clipping follows global-norm clipping for hundreds of steps in JAX: a dotted
    # line over a wider solid one, so both stay visible.
    value, global_ = _style("value 0.1 (optax.chain)"), _style("global norm 1 (optax.chain)")
    assert value["linestyle"] != global_["linestyle"]
    assert value["zorder"] > global_["zorder"]
    assert global_["linewidth"] > value["linewidth"]


def test_the_plot_legend_says_which_curve_lies_over_which() -> None:
    from demo.adding_problem import Run
    from demo.report import _label

    panel = [
        Run("JAX", "global norm 1 (optax.chain)", [0.2] * 30),
        Run("JAX", "value 0.1 (optax.chain)", [0.21] * 30),
        Run("JAX", "no clipping", [1.0, 2e3]),
    ]
    assert "dotted, over the wide global-norm line" in _label(panel[1], panel)
    assert _label(panel[0], panel) == "global norm 1 (optax.chain)"
    assert _label(panel[2], panel) == "no clipping (diverged at step 2)"


def test_demo_leaves_torchs_thread_count_as_it_was(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        both = ["--steps", "3", "--gpt-size", "toy", "--gpt-steps", "3", "--backend", "torch"]
        main([*both, "--out", str(tmp_path), "--no-progress"])
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
