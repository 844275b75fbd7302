"""`import agclip` must not import any framework (after array-api-compat's test)."""

from __future__ import annotations

import subprocess
import sys


def test_import_agclip_imports_no_framework() -> None:
    frameworks = ("torch", "jax", "array_api_strict", "optax")
    code = (
        "import sys, agclip, agclip.backends, agclip.backends.numpy;"
        f"print(sorted(m for m in {frameworks!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
