"""The structure the design promises, checked on the source: a one-way import graph,
a generic layer that names no backend, and one clip pipeline."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import agclip

PACKAGE = Path(agclip.__file__).resolve().parent  # the source, or the installed wheel
GENERIC = {"agclip._kernels", "agclip._pipeline", "agclip._tree", "agclip._checks"}
BACKEND_KERNELS = {
    "agclip.backends._numpy_kernels",
    "agclip.backends._torch_kernels",
    "agclip.backends._jax_kernels",
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _trees() -> dict[str, ast.Module]:
    return {_module_name(p): ast.parse(p.read_text()) for p in sorted(PACKAGE.rglob("*.py"))}


def _agclip_imports(name: str, tree: ast.Module) -> set[str]:
    """Every agclip module ``name`` imports, at any depth of the file (function-level too)."""
    package = name if name.endswith("backends") or name == "agclip" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("agclip")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            if target.startswith("agclip"):
                found.add(target)
    return found


GRAPH = {name: _agclip_imports(name, tree) for name, tree in _trees().items()}


def test_the_import_graph_has_no_cycle() -> None:
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(GRAPH.get(node, ())):
            if state.get(nxt) == "open":
                pytest.fail("import cycle: " + " -> ".join([*path, node, nxt]))
            if nxt not in state:
                visit(nxt, [*path, node])
        state[node] = "done"

    for node in sorted(GRAPH):
        if node not in state:
            visit(node, [])


@pytest.mark.parametrize("name", sorted(GENERIC))
def test_the_generic_layer_names_no_backend_and_no_dispatch(name: str) -> None:
    bad = {m for m in GRAPH[name] if m.startswith("agclip.backends") or m == "agclip._dispatch"}
    assert not bad, f"{name} imports {sorted(bad)}"


@pytest.mark.parametrize("name", sorted(BACKEND_KERNELS))
def test_backend_kernels_build_on_the_contract_only(name: str) -> None:
    assert GRAPH[name] <= {"agclip._kernels"}, f"{name} imports {sorted(GRAPH[name])}"


def test_the_pipeline_exists_once() -> None:
    """Only ``_pipeline`` turns a norm into a coefficient and scales by it; every
    other module reaches that math through its public internal functions."""
    for name, tree in _trees().items():
        if name == "agclip._pipeline":
            continue
        used = {
            node.attr if isinstance(node, ast.Attribute) else node.id
            for node in ast.walk(tree)
            if isinstance(node, (ast.Attribute, ast.Name))
        }
        assert not used & {"clip_coefficient", "root", "underflow_floor"}, name
        if name not in BACKEND_KERNELS | {"agclip._kernels"}:
            assert not used & {"scale", "scale_", "sum_of_powers", "max_abs"}, name
    callers = {name for name, imports in GRAPH.items() if "agclip._pipeline" in imports}
    assert callers >= {
        "agclip._clip",
        "agclip.backends.numpy",
        "agclip.backends.torch",
        "agclip.backends._torch_callback",
        "agclip.backends.jax",
    }


def test_no_private_name_crosses_a_module_boundary() -> None:
    for name, tree in _trees().items():
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.ImportFrom)
                and node.module
                and "agclip" in (node.module if not node.level else "agclip")
            ):
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private, f"{name} imports private {private} from {node.module}"
