"""One test body per behaviour, run on every backend (numpy, array_api_strict,
torch CPU, torch CUDA, JAX eager, JAX under jit).

``AGCLIP_BACKENDS=numpy,torch pytest`` runs a subset; unknown names are an
error. Per-backend exceptions go through markers that carry a reason:
``@pytest.mark.skip_backends("jax_jit", reason="...")`` and
``@pytest.mark.xfail_backends(...)``. A missing framework is SKIPPED with why.
"""

from __future__ import annotations

import os

import pytest
from support import ALL, Backend, make_backends

_BACKENDS = make_backends()

# Scripts that the distributed tests launch in their own processes: never imported
# here (pytest-markdown-docs would import them for their docstrings).
collect_ignore = ["distributed_worker.py", "jax_multiprocess_worker.py"]


def _selected() -> list[str]:
    raw = os.environ.get("AGCLIP_BACKENDS", "")
    if not raw.strip():
        return list(ALL)
    names = [name.strip() for name in raw.split(",") if name.strip()]
    unknown = sorted(set(names) - set(ALL))
    if unknown:
        raise pytest.UsageError(
            f"AGCLIP_BACKENDS names unknown backends {unknown}; known: {', '.join(ALL)}"
        )
    return names


def pytest_configure(config: pytest.Config) -> None:
    _selected()  # fail early on a bad selection


def _marker_names(marker: pytest.Mark) -> tuple[set[str], str]:
    reason = marker.kwargs.get("reason")
    if not reason:
        raise pytest.UsageError(f"{marker.name} needs reason=...")
    names = set(marker.args)
    unknown = names - set(ALL)
    if unknown:
        raise pytest.UsageError(f"{marker.name} names unknown backends {sorted(unknown)}")
    return names, reason


@pytest.fixture(params=_selected())
def backend(request: pytest.FixtureRequest) -> Backend:
    """Every backend, JAX eager and under ``jit`` (tests that call through ``backend.call``)."""
    return _chosen(request)


@pytest.fixture(params=[name for name in _selected() if not _BACKENDS[name].jit])
def library(request: pytest.FixtureRequest) -> Backend:
    """One backend per array library and device: for tests that call agclip eagerly
    (errors, messages), which would run the same JAX code twice under ``backend``."""
    return _chosen(request)


def _chosen(request: pytest.FixtureRequest) -> Backend:
    chosen = _BACKENDS[request.param]
    if chosen.skip_reason:
        pytest.skip(f"{chosen.name}: {chosen.skip_reason}")
    for marker in request.node.iter_markers("skip_backends"):
        names, reason = _marker_names(marker)
        if chosen.name in names:
            pytest.skip(f"{chosen.name}: {reason}")
    for marker in request.node.iter_markers("xfail_backends"):
        names, reason = _marker_names(marker)
        if chosen.name in names:
            request.node.add_marker(pytest.mark.xfail(reason=reason, strict=True))
    return chosen
