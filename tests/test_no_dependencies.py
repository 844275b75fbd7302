"""`import agclip` must not import any framework (after array-api-compat's test)."""

from __future__ import annotations

import subprocess
import sys

import pytest


def test_import_agclip_imports_no_framework() -> None:
    frameworks = ("torch", "jax", "array_api_strict", "optax")
    code = (
        "import sys, agclip, agclip.backends, agclip.backends.numpy;"
        f"print(sorted(m for m in {frameworks!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


MISSING = {
    "agclip.backends.torch": ("torch", "torch"),
    "agclip.backends.jax": ("optax", "jax"),
    "agclip.integrations.lightning": ("lightning", "lightning"),
    "agclip.integrations.transformers": ("transformers", "hf"),
}


@pytest.mark.parametrize("module", list(MISSING))
def test_a_missing_framework_names_the_extra_to_install(module: str) -> None:
    absent, extra = MISSING[module]
    code = (
        f"import sys; sys.modules[{absent!r}] = None\n"  # import absent -> ImportError
        f"try:\n    import {module}\nexcept ModuleNotFoundError as error:\n    print(error)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert f"pip install 'agclip[{extra}]'" in out.stdout, out.stdout + out.stderr
