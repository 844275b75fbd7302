"""The structure the design promises, checked on the source: imports point down the
layers (front -> dispatch -> backend kernels -> generic math), the coefficient formula
exists once, modules stay small, and comments carry no measured timings."""

from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

import pytest

import agclip

PACKAGE = Path(agclip.__file__).resolve().parent  # the source, or the installed wheel
GENERIC = {
    "agclip._typing",
    "agclip._checks",
    "agclip._tree",
    "agclip._kernels",
    "agclip._pipeline",
    "agclip._rule",
    "agclip._zclip",
    "agclip._autoclip",
    "agclip._adagc",
    "agclip._missing",
}
BACKEND_KERNELS = {
    "agclip.backends._numpy_kernels",
    "agclip.backends._torch_kernels",
    "agclip.backends._jax_kernels",
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


SOURCES = {_module_name(p): p.read_text() for p in sorted(PACKAGE.rglob("*.py"))}
TREES = {name: ast.parse(source) for name, source in SOURCES.items()}


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


GRAPH = {name: _agclip_imports(name, tree) for name, tree in TREES.items()}


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
def test_the_generic_layer_imports_only_the_generic_layer(name: str) -> None:
    assert GRAPH[name] <= GENERIC, f"{name} imports {sorted(GRAPH[name] - GENERIC)}"


@pytest.mark.parametrize("name", sorted(BACKEND_KERNELS))
def test_backend_kernels_build_on_the_contract_only(name: str) -> None:
    assert GRAPH[name] <= {"agclip._kernels"}, f"{name} imports {sorted(GRAPH[name])}"


def test_the_core_reaches_backend_kernels_only_through_dispatch() -> None:
    for name, imports in GRAPH.items():
        if not name.startswith("agclip.backends") and name != "agclip._dispatch":
            assert not imports & BACKEND_KERNELS, f"{name} imports {sorted(imports)}"


def _is_coefficient(node: ast.AST) -> bool:
    """``something / (norm + eps)``: the clip coefficient's division."""
    if not (isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div)):
        return False
    right = node.right
    names = {n.id for n in ast.walk(right) if isinstance(n, ast.Name)}
    return isinstance(right, ast.BinOp) and isinstance(right.op, ast.Add) and "eps" in names


def test_the_coefficient_formula_exists_once() -> None:
    # Only the pipeline turns a norm into a coefficient; everyone else calls it.
    where = {name for name, tree in TREES.items() if any(map(_is_coefficient, ast.walk(tree)))}
    assert not where
    defined = {
        name
        for name, tree in TREES.items()
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef) and node.name == "clip_coefficient"
    }
    assert defined == {"agclip._pipeline"}


def test_no_private_name_crosses_a_module_boundary() -> None:
    for name, tree in TREES.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.level or "agclip" in (node.module or "")):
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private, f"{name} imports private {private} from {node.module}"


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_no_module_is_over_400_lines(name: str) -> None:
    assert len(SOURCES[name].splitlines()) <= 400


TIMING = re.compile(r"\d\s*(ms|us|µs|ns|s|seconds?)\b|\d(\.\d+)?x (the time|faster|slower)")


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_no_measured_timing_in_a_comment(name: str) -> None:
    """Timings go stale: they belong on the benchmarks page, not in the code."""
    tokens = tokenize.generate_tokens(io.StringIO(SOURCES[name]).readline)
    comments = [t.string for t in tokens if t.type == tokenize.COMMENT]
    assert not [c for c in comments if TIMING.search(c)]
