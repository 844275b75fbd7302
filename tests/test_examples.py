"""The examples run (smoke tests), and the docstring examples hold (doctests)."""

from __future__ import annotations

import doctest
import importlib
import importlib.util
import runpy
import sys
import warnings
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
NEEDS = {
    "gradient_clipping_example.py": "torch",
    "jax_example.py": "optax",
    "numpy_example.py": None,
    "backend_tour.py": None,
    "lightning_example.py": "lightning",
    "transformers_example.py": "transformers",
}


@pytest.mark.parametrize("name", sorted(NEEDS))
def test_example_runs(
    name: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    needed = NEEDS[name]
    if needed and importlib.util.find_spec(needed) is None:
        pytest.skip(f"{needed} is not installed")
    monkeypatch.setattr(sys, "argv", [name])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        runpy.run_path(str(EXAMPLES / name), run_name="__main__")
    assert capsys.readouterr().out.strip()
    # What a user copies should run quietly: any warning here is ours to avoid.
    assert not caught, [f"{w.category.__name__}: {w.message}" for w in caught]


MODULES = {
    "agclip._agc": None,
    "agclip._clip": None,
    "agclip._finite": None,
    "agclip.backends.numpy": None,
    "agclip.backends.torch": "torch",
    "agclip.backends._torch_callback": "torch",
    "agclip.backends.jax": "optax",
}
# (the integrations' docstrings have no examples: their pages and examples/ show them)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_docstring_examples(module: str) -> None:
    needed = MODULES[module]
    if needed and importlib.util.find_spec(needed) is None:
        pytest.skip(f"{needed} is not installed")
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0, f"{module} has no docstring examples"
    assert result.failed == 0
