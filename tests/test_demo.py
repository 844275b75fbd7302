"""The main job (python -m demo), shortened: it runs, tells its story and writes the plot."""

from __future__ import annotations

import importlib.util

import pytest

from demo.__main__ import main, parse_args


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_demo_runs_and_unclipped_training_diverges(backend, tmp_path, capsys):
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
    assert clipped and all("  no  " in row for row in clipped)
    assert (tmp_path / "loss_curves.png").stat().st_size > 10_000


def test_demo_rejects_bad_options():
    with pytest.raises(SystemExit):
        parse_args(["--steps", "0"])
    with pytest.raises(SystemExit):
        parse_args(["--backend", "mxnet"])
