"""The optax interface, with a fallback when optax is absent: ``GradientTransformation``
and ``EmptyState`` (optax's own when it is installed), and the norm-order argument."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, cast

from .._checks import check_ord
from .._typing import ArrayTree


class GradientTransformation(NamedTuple):
    """optax's ``(init, update)`` pair. The factories return
    ``optax.GradientTransformation`` itself (the same two fields) when optax is
    installed, and this NamedTuple otherwise."""

    init: Callable[[ArrayTree], Any]
    update: Callable[..., tuple[ArrayTree, Any]]


class EmptyState(NamedTuple):
    """State of the stateless transforms (optax.EmptyState when optax is installed)."""


def transformation(
    init: Callable[[ArrayTree], Any], update: Callable[..., tuple[ArrayTree, Any]]
) -> GradientTransformation:
    try:
        import optax
    except ImportError:
        return GradientTransformation(init, update)
    return cast(GradientTransformation, optax.GradientTransformation(init, update))


def empty_state() -> Any:
    try:
        import optax
    except ImportError:
        return EmptyState()
    return optax.EmptyState()


def order(ord: Any) -> float:
    """The norm order; ``None`` is 2. (A ``None`` default, unlike a number, is left
    static by ``optax.inject_hyperparams``.)"""
    return 2.0 if ord is None else check_ord(ord)
