"""Optional frameworks: an adapter whose framework is missing says which extra brings it."""

from __future__ import annotations


def missing(extra: str, error: ImportError) -> ImportError:
    """The error to raise when an adapter's framework cannot be imported."""
    return ModuleNotFoundError(
        f"{error} — this part of agclip needs it: pip install 'agclip[{extra}]'",
        name=error.name,
    )
