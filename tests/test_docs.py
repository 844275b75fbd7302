"""The Markdown pages render as written: tables stand apart from the text above them,
and the design page names no file that is not in the repository."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_table_starts_after_a_blank_line(page: Path) -> None:
    lines = page.read_text().splitlines()
    fenced = False
    for number, (above, line) in enumerate(zip(["", *lines], lines, strict=False), start=1):
        fenced ^= line.startswith("```")
        starts_table = line.startswith("|") and not above.startswith("|")
        if not fenced and starts_table:
            assert not above.strip(), f"{page.name}:{number}: a table right under text: {above!r}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_local_links_and_named_files_exist(page: Path) -> None:
    text = page.read_text()
    for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", text):
        assert (page.parent / target).exists(), f"{page.name} links to missing {target}"
    for name in re.findall(r"`([A-Za-z_/]+\.md)`", text):
        assert (ROOT / name).exists() or (ROOT / "docs" / name).exists(), (
            f"{page.name} names {name}, which is not in the repository"
        )


def _public_docstrings() -> list[tuple[str, str]]:
    """(name, docstring) of every public object agclip's modules export."""
    import importlib
    import importlib.util

    found = []
    for module_name in [
        "agclip",
        "agclip.backends.numpy",
        "agclip.backends.torch",
        "agclip.backends.jax",
        "agclip.integrations.lightning",
        "agclip.integrations.transformers",
    ]:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        found.append((module_name, module.__doc__ or ""))
        for name in getattr(module, "__all__", []):
            found.append((f"{module_name}.{name}", getattr(module, name).__doc__ or ""))
    return found


def test_docstrings_read_cleanly_in_help() -> None:
    """help() and IDEs show docstrings as they are: no site-only link markup."""
    docs = _public_docstrings()
    assert len(docs) > 40
    marked = [name for name, doc in docs if re.search(r"\]\[[A-Za-z_][\w.]*\]", doc)]
    assert not marked
