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
    assert len(docs) > 30  # found (fewer where a framework is not installed)
    marked = [name for name, doc in docs if re.search(r"\]\[[A-Za-z_][\w.]*\]", doc)]
    assert not marked


def test_make_help_lists_every_target() -> None:
    """``make help`` (and a bare ``make``) names every target the Makefile declares."""
    import shutil
    import subprocess

    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    phony = re.search(r"^\.PHONY:(.*)$", (ROOT / "Makefile").read_text(), re.M)
    assert phony is not None
    targets = phony.group(1).split()
    for args in (["help"], []):
        run = subprocess.run(
            ["make", "-s", *args], check=False, cwd=ROOT, capture_output=True, text=True
        )
        assert run.returncode == 0, run.stderr
        listed = [line.split()[0] for line in run.stdout.splitlines() if line.strip()]
        assert sorted(listed) == sorted(targets), (args, listed)


def test_readme_names_every_example() -> None:
    readme = (ROOT / "README.md").read_text()
    examples = sorted(p.name for p in (ROOT / "examples").glob("*.py"))
    assert len(examples) >= 6
    assert [name for name in examples if name not in readme] == []


def _blocks_naming_agclip() -> list[tuple[str, str]]:
    found = []
    for page in (ROOT / "README.md", ROOT / "docs" / "index.md"):
        blocks = re.findall(r"```python\n(.*?)```", page.read_text(), re.S)
        found += [(f"{page.name}#{i}", b) for i, b in enumerate(blocks) if "agclip." in b]
    return found


@pytest.mark.parametrize(("where", "block"), _blocks_naming_agclip(), ids=lambda x: x[:12])
def test_agclip_names_in_code_and_comments_resolve_with_the_blocks_imports(
    where: str, block: str
) -> None:
    """A line a reader pastes, comments included, works after the block's own imports
    (in a fresh interpreter: no other block's imports help)."""
    import subprocess
    import sys

    lines = block.splitlines()
    imports = [line for line in lines if re.match(r"(import|from) \w", line)]
    rest = "\n".join(line for line in lines if line not in imports)
    names = sorted(set(re.findall(r"\bagclip(?:\.\w+)+", rest)))
    check = "\n".join([*imports, *(f"assert {name} is not None" for name in names)])
    run = subprocess.run([sys.executable, "-c", check], check=False, capture_output=True, text=True)
    if "ModuleNotFoundError" in run.stderr and "agclip" not in run.stderr.splitlines()[-1]:
        pytest.skip(run.stderr.splitlines()[-1])
    assert run.returncode == 0, f"{where}: {run.stderr.splitlines()[-1]}\n{check}"
