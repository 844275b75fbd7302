"""Benchmark results as data: each benchmark fills a Report; run_all renders them.

A Report holds notes, tables and the speed ratios, each ratio with the fields
of its case (``{"device": "cpu", "shapes": "GPT-2 small", "case": "clipping"}``)
so targets match fields, not scraped text. A benchmark script prints the
Markdown for people and, with ``--json PATH``, writes the data for
``run_all.py``.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Report:
    benchmark: str
    blocks: list[dict[str, Any]] = field(default_factory=list)  # notes and tables, in order
    ratios: list[dict[str, Any]] = field(default_factory=list)

    def note(self, text: str) -> None:
        """A paragraph of Markdown."""
        self.blocks.append({"note": text})

    def table(self, headers: list[str], rows: list[list[str]], caption: str = "") -> None:
        self.blocks.append({"caption": caption, "headers": headers, "rows": rows})

    def ratio(self, value: float, *, against: str, **case: str) -> str:
        """Record agclip's time over ``against``'s for this case; the bold table cell."""
        self.ratios.append({"case": case, "against": against, "ratio": value})
        return f"**{value:.2f}x**"

    def markdown(self) -> str:
        return render(asdict(self))

    def emit(self, json_path: Path | None) -> None:
        """Print the Markdown; write the data when a path is given."""
        print(self.markdown())
        if json_path is not None:
            json_path.write_text(json.dumps(asdict(self), indent=1))


def add_json_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")


def speed_benchmark(name: str, doc: str, *, repeats: int) -> tuple[argparse.Namespace, Report]:
    """The command line of a speed benchmark (``--repeats``, ``--json``) and its report."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=repeats, help=f"timed runs ({repeats})")
    add_json_option(parser)
    return parser.parse_args(), Report(name)


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def render(data: dict[str, Any]) -> str:
    """Markdown for a report's data: every block a paragraph, captions above tables."""
    parts = []
    for block in data["blocks"]:
        if "note" in block:
            parts.append(block["note"])
            continue
        if block["caption"]:
            parts.append(block["caption"])
        parts.append(markdown_table(block["headers"], block["rows"]))
    return "\n\n".join(parts) + "\n"


def label(ratio: dict[str, Any]) -> str:
    """A ratio's case as words, for plots and verdicts."""
    return " ".join(str(value) for value in ratio["case"].values())
