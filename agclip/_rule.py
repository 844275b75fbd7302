"""Adaptive rules, driven generically: each rule is a :class:`RuleSpec` (its state, its
hyperparameters and their checks, its threshold update, its docs), and the functional,
PyTorch and optax fronts all drive a spec through the functions here.

A step: the norm (the global one, or one per tensor for a per-tensor rule) ->
``spec.thresholds`` -> the coefficient (1 where the norm is not finite: the
gradients pass unchanged, so a finite check downstream still sees them) -> the
state update. States are NamedTuples of 0-d arrays on the gradients' device;
a per-tensor field is a dict keyed by the tensor (its key path and shape, or
its parameter name), so a state never lends one tensor's threshold to another.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ._checks import check_size
from ._kernels import Kernels
from ._pipeline import (
    LOCAL,
    Reduction,
    apply_factor,
    apply_per_unit,
    clip_coefficient,
    norm_of_norms,
    total_norm,
    units_of,
)

COEFFICIENT_EPS = 1e-6  # torch's max_norm / (norm + 1e-6)
_KIND = inspect.Parameter


@dataclass(frozen=True, eq=False)  # hashed by identity: a static argument under jit
class RuleSpec:
    """Everything that makes one adaptive rule; the fronts are generated from it.

    ``doc`` is the rule's module docstring: a summary line, the rule, an ``Args:``
    section documenting ``defaults`` (the hyperparameters, in order) and
    ``References:``; every front's docstring is built from it.
    """

    title: str  # the PyTorch class name ("ZClip"); lowercase, the functions' name
    doc: str
    state_type: Any  # the state's NamedTuple class
    defaults: Mapping[str, Any]
    check: Callable[[dict[str, Any]], dict[str, Any]]  # all hyperparameters, validated
    new_state: Callable[..., Any]  # (k, like, dtype, keys, window) -> state
    thresholds: Callable[..., Any]  # (k, norms, total, state, config, **static)
    static: tuple[str, ...] = ()  # hyperparameters that pick a code path (host values)
    per_tensor: tuple[str, ...] = ()  # state fields with one entry per tensor
    window: tuple[str, int] | None = None  # a size of the state and its default
    aliases: Mapping[str, str] = field(default_factory=dict)  # other accepted names
    coefficient_eps: str | None = None  # the hyperparameter added to norms, if any
    # read-only attributes of the PyTorch objects beyond hyperparameters and state
    # fields: name -> f(state or None, hyperparameters)
    views: Mapping[str, Callable[[Any, Mapping[str, Any]], Any]] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.title.lower()

    def configure(
        self, args: Sequence[Any], kwargs: Mapping[str, Any], owner: str
    ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        """``(traced, static, given)`` hyperparameters from positional and keyword
        arguments (aliases accepted); a ``TypeError`` names an unknown one."""
        given = dict(zip(self.defaults, args, strict=False))
        for key, value in kwargs.items():
            name = self.aliases.get(key, key)
            if name not in self.defaults or name in given:
                raise TypeError(f"{owner} got an unexpected or repeated argument {key!r}")
            given[name] = value
        if len(args) > len(self.defaults):
            raise TypeError(f"{owner} takes at most {len(self.defaults)} positional values")
        checked = self.check({**self.defaults, **given})
        static = {name: checked.pop(name) for name in self.static}
        return checked, static, given

    def signature(self, before: Sequence[_KIND], after: Sequence[_KIND]) -> inspect.Signature:
        """The hyperparameters as a signature between a front's own parameters."""
        kind = _KIND.KEYWORD_ONLY if before else _KIND.POSITIONAL_OR_KEYWORD
        hypers = [_KIND(name, kind, default=value) for name, value in self.defaults.items()]
        return inspect.Signature([*before, *hypers, *after])

    def docstring(self, head: str, before: str, after: str, tail: str = "") -> str:
        """A front's docstring: its own head, the rule, the hyperparameters between
        the front's own arguments, its returns, the references."""
        rule, hypers, references = re.split(r"\n\s*(?:Args|References):\n", self.doc)
        body = rule.split("\n\n", 1)[1] if "\n\n" in rule else ""
        args = f"Args:\n{before}{hypers}\n{after}"
        return f"{head}\n\n{body}\n\n{args}\n{tail.strip()}\n\nReferences:\n{references}"

    def window_of(self, kwargs: dict[str, Any], *, unbounded: bool = False) -> int | None:
        """The state's size, popped from ``kwargs`` (its default when absent) and checked;
        ``None`` for a rule without one, or where ``unbounded`` allows ``None``."""
        if not self.window:
            return None
        size = kwargs.pop(self.window[0], self.window[1])
        return None if size is None and unbounded else check_size(self.window[0], size)


# -- helpers of the specs' math ------------------------------------------------------
def scalars(k: Kernels, like: Any, dtype: Any, **values: float) -> dict[str, Any]:
    """0-d arrays of ``dtype`` on ``like``'s device, one per keyword."""
    xp, where = k.xp, k.placement(like)
    return {name: xp.full((), value, dtype=dtype, **where) for name, value in values.items()}


def counted(k: Kernels, flag: Any, counter: Any) -> Any:
    """``counter`` plus one where ``flag`` holds."""
    return counter + k.xp.astype(flag, counter.dtype)


def like_value(k: Kernels, value: Any, like: Any) -> Any:
    """``value`` (a number or a 0-d array) as an array of ``like``'s dtype and device."""
    if isinstance(value, (int, float)):
        return k.xp.full_like(like, float(value))
    return k.xp.astype(k.on_device_of(value, like), like.dtype)


def as_flag(k: Kernels, value: Any) -> Any:
    """A Python bool as it is; an injected array as a bool array."""
    return value if isinstance(value, bool) else k.xp.astype(value, k.xp.bool)


# -- keys of per-tensor state ----------------------------------------------------------
def leaf_keys(paths: Sequence[str], leaves: Sequence[Any]) -> list[str]:
    """What identifies each tensor in a per-tensor state: its name and its shape."""
    return [f"{path} {tuple(leaf.shape)}" for path, leaf in zip(paths, leaves, strict=True)]


def check_keys(spec: RuleSpec, state: Any, keys: Sequence[str]) -> None:
    """A per-tensor state must describe exactly these tensors: a ``ValueError``
    naming the first one that differs."""
    keys = list(keys)
    held = list(getattr(state, spec.per_tensor[0])) if spec.per_tensor else keys
    if held != keys:
        pairs = enumerate(zip(held, keys, strict=False))
        index = next((i for i, (a, b) in pairs if a != b), min(len(held), len(keys)))
        mine, theirs = [*keys, "nothing"][index], [*held, "nothing"][index]
        raise ValueError(
            f"{spec.title} keeps one threshold per tensor, and its state does not fit these "
            f"gradients: their tensor {index} is {mine}, the state's is {theirs} ({len(keys)} "
            f"tensors against {len(held)}). Build a state for them ({spec.name}_init)."
        )


def gathered(spec: RuleSpec, state: Any, keys: Sequence[str], stack: Callable[..., Any]) -> Any:
    """The state with each per-tensor dict stacked into a vector in ``keys``'s order."""
    fields = {f: stack([getattr(state, f)[key] for key in keys]) for f in spec.per_tensor}
    return state._replace(**fields)


def scattered(spec: RuleSpec, state: Any, keys: Sequence[str]) -> Any:
    """The inverse of :func:`gathered`: vectors back into dicts keyed by tensor."""
    fields = {f: dict(zip(keys, getattr(state, f), strict=True)) for f in spec.per_tensor}
    return state._replace(**fields)


# -- one step's math -------------------------------------------------------------------
def rule_factor(
    k: Kernels,
    spec: RuleSpec,
    norms: Any,
    total: Any,
    state: Any,
    config: Mapping[str, Any],
    static: Mapping[str, Any],
) -> tuple[Any, Any]:
    """This step's scale factor (0-d, or one per tensor) and the new state, from the
    norm(s) and the state with its per-tensor fields as vectors."""
    xp = k.xp
    for_total, for_each, finish = spec.thresholds(k, norms, total, state, config, **static)
    eps = config[spec.coefficient_eps] if spec.coefficient_eps else COEFFICIENT_EPS
    factor = clip_coefficient(k, total, xp.astype(for_total, total.dtype), eps)
    if for_each is not None:
        factor = factor * clip_coefficient(k, norms, xp.astype(for_each, norms.dtype), eps)
    factor = xp.where(xp.isfinite(total), factor, xp.ones_like(factor))
    return factor, finish(factor)


def clip_with_rule(
    k: Kernels,
    leaves: list[Any],
    state: Any,
    config: Mapping[str, Any],
    *,
    spec: RuleSpec,
    p: float,
    keys: tuple[str, ...] = (),
    reduce: Reduction = LOCAL,
    **static: Any,
) -> tuple[list[Any], Any]:
    """One functional step over leaves: the clipped leaves and the new state."""
    if spec.per_tensor:
        units = units_of(k, leaves, reduce)
        norms = k.stack([total_norm(k, unit, p, reduce) for unit in units])
        state = gathered(spec, state, keys, k.stack)
        factor, state = rule_factor(
            k, spec, norms, norm_of_norms(k, norms, p), state, config, static
        )
        return apply_per_unit(k, units, factor, in_place=False), scattered(spec, state, keys)
    batch = reduce.prepare(k, leaves)
    total = total_norm(k, batch, p, reduce)
    factor, state = rule_factor(k, spec, None, total, state, config, static)
    return apply_factor(k, batch, factor, in_place=False), state
