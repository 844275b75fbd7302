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
