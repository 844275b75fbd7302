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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

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


@dataclass(frozen=True)
class Hyper:
    """One hyperparameter: its name, default and docs. ``static`` ones pick a code
    path (a string option): they stay on the host, the others may be traced."""

    name: str
    default: Any
    doc: str
    static: bool = False


@dataclass(frozen=True, eq=False)  # hashed by identity: a static argument under jit
class RuleSpec:
    """Everything that makes one adaptive rule; the fronts are generated from it."""

    name: str  # the functional name ("zclip"); the optax transform has it too
    title: str  # the PyTorch class name ("ZClip")
    summary: str
    doc: str  # the rule, shared by every front's docstring
    references: str
    state_type: Any  # the state's NamedTuple class
    hypers: tuple[Hyper, ...]
    check: Callable[[dict[str, Any]], dict[str, Any]]  # all hyperparameters, validated
    new_state: Callable[..., Any]  # (k, like, dtype, keys, window) -> state
    thresholds: Callable[..., Any]  # (k, norms, total, state, config, **static)
    per_tensor: tuple[str, ...] = ()  # state fields with one entry per tensor
    window: Hyper | None = None  # a size of the state (AutoClip's history)
    aliases: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    coefficient_eps: str | None = None  # the hyperparameter added to norms, if any
    # read-only attributes of the PyTorch objects beyond hyperparameters and state
    # fields: name -> f(state or None, hyperparameters)
    views: Mapping[str, Callable[[Any, Mapping[str, Any]], Any]] = field(
        default_factory=lambda: MappingProxyType({})
    )

    def configure(
        self, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None, owner: str = ""
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Validated ``(traced, static)`` hyperparameters from positional and keyword
        arguments (aliases accepted); a ``TypeError`` names an unknown one."""
        kwargs = dict(kwargs or {})
        for alias, name in self.aliases.items():
            if alias in kwargs:
                if name in kwargs:
                    raise TypeError(f"{owner or self.title}: give {name} or {alias}, not both")
                kwargs[name] = kwargs.pop(alias)
        names = [hyper.name for hyper in self.hypers]
        if len(args) > len(names):
            raise TypeError(f"{owner or self.title} takes at most {len(names)} positional values")
        values = {hyper.name: hyper.default for hyper in self.hypers}
        values.update(zip(names, args, strict=False))
        for name in kwargs:
            if name not in values:
                raise TypeError(f"{owner or self.title} got an unexpected argument {name!r}")
            if names.index(name) < len(args):
                raise TypeError(f"{owner or self.title} got {name!r} twice")
        values.update(kwargs)
        checked = self.check(values)
        static = {h.name: checked.pop(h.name) for h in self.hypers if h.static}
        return checked, static

    def signature(
        self, before: Sequence[inspect.Parameter], after: Sequence[inspect.Parameter]
    ) -> inspect.Signature:
        """The hyperparameters as a signature between a front's own parameters."""
        kind: Any = inspect.Parameter.POSITIONAL_OR_KEYWORD
        if any(p.kind == inspect.Parameter.KEYWORD_ONLY for p in before):
            kind = inspect.Parameter.KEYWORD_ONLY
        hypers = [inspect.Parameter(h.name, kind, default=h.default) for h in self.hypers]
        return inspect.Signature([*before, *hypers, *after])

    def docstring(self, head: str, args_before: str, args_after: str, tail: str) -> str:
        """A front's docstring: its own head, the rule, every hyperparameter, its own
        arguments and returns, the references."""
        hypers = "".join(f"    {h.name}: {h.doc}\n" for h in self.hypers)
        return (
            f"{head}\n\n{self.doc}\n\nArgs:\n{args_before}{hypers}{args_after}\n{tail}"
            f"\nReferences:\n    {self.references}\n"
        )


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
    if not spec.per_tensor:
        return
    held = list(getattr(state, spec.per_tensor[0]))
    if held == list(keys):
        return
    for index, (have, want) in enumerate(zip(held, keys, strict=False)):
        if have != want:
            raise ValueError(
                f"{spec.title} keeps one threshold per tensor and its state does not fit "
                f"these gradients: tensor {index} is {want}, the state's is {have}. "
                f"Build a new state for these gradients ({spec.name}_init)."
            )
    longer, shorter = (held, keys) if len(held) > len(keys) else (keys, held)
    which = "the state's" if longer is held else "these gradients'"
    raise ValueError(
        f"{spec.title} keeps one threshold per tensor and its state does not fit these "
        f"gradients: the state holds {len(held)} tensors, the gradients {len(keys)}; "
        f"{which} tensor {len(shorter)} is {longer[len(shorter)]}."
    )


def gathered(spec: RuleSpec, state: Any, keys: Sequence[str], stack: Callable[..., Any]) -> Any:
    """The state with each per-tensor dict stacked into a vector in ``keys``'s order."""
    return state._replace(
        **{f: stack([getattr(state, f)[key] for key in keys]) for f in spec.per_tensor}
    )


def scattered(spec: RuleSpec, state: Any, keys: Sequence[str]) -> Any:
    """The inverse of :func:`gathered`: vectors back into dicts keyed by tensor."""
    return state._replace(
        **{f: {key: getattr(state, f)[i] for i, key in enumerate(keys)} for f in spec.per_tensor}
    )


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
        total = norm_of_norms(k, norms, p)
        state = gathered(spec, state, keys, k.stack)
        factor, state = rule_factor(k, spec, norms, total, state, config, static)
        return apply_per_unit(k, units, factor, in_place=False), scattered(spec, state, keys)
    batch = reduce.prepare(k, leaves)
    total = total_norm(k, batch, p, reduce)
    factor, state = rule_factor(k, spec, None, total, state, config, static)
    return apply_factor(k, batch, factor, in_place=False), state
