"""The PyTorch front of every adaptive rule: one class, made concrete per spec
(``ZClip``, ``AutoClip``, ``AdaGC``). ``step(model)`` clips the gradients in place
and returns the pre-clip norm; the state lives on the gradients' device as tensors
(no host sync per step), is saved with ``state_dict()`` and restored with
``load_state_dict()``. The rule also plugs into ``GradientClipCallback`` and
``clip_and_step`` as their threshold."""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch
import torch.distributed as dist

from .._checks import choice
from .._kernels import Batch, Kernels
from .._pipeline import LOCAL, norm_of_norms, total_norm
from .._rule import RuleSpec, gathered, leaf_keys, rule_factor, scattered
from ._torch_clip import Decision, decide_for
from ._torch_distributed import distributed_batch
from ._torch_grads import (
    empty_norm,
    kernels,
    named_parameters,
    norm_type_arg,
)

FIRST_CAPACITY = 256  # an unbounded history starts here and doubles
_OPTIONS = """    norm_type: as in ``clip_grad_norm_``.
    foreach: as in ``clip_grad_norm_``.
    process_group: as in ``clip_grad_norm_`` (with a process group or DTensor
        gradients, the norm is global).
"""
_NEW_TENSORS = """    new_tensors: ``"error"`` (default): gradients of a tensor the state has not
        seen are a ``ValueError`` naming it; ``"init"``: such a tensor starts a fresh
        entry (mixture-of-experts routing, a layer unfrozen). Tensors without a
        gradient this step keep their entries.
"""


class AdaptiveRule:
    """An adaptive rule for PyTorch gradients (see the concrete classes)."""

    spec: ClassVar[RuleSpec]

    def __init_subclass__(cls) -> None:
        """A concrete rule's signature and docstring, built from its spec (the class's
        own docstring adds what is PyTorch-specific)."""
        spec, keyword = cls.spec, inspect.Parameter.KEYWORD_ONLY
        own: list[tuple[str, Any]] = [spec.window] if spec.window else []
        own += [("new_tensors", "error")] if spec.per_tensor else []
        own += [("norm_type", 2.0), ("foreach", None), ("process_group", None)]
        extra = [inspect.Parameter(name, keyword, default=value) for name, value in own]
        cls.__signature__ = signature = spec.signature([], extra)  # type: ignore[attr-defined]

        def __init__(self: AdaptiveRule, *args: Any, **kwargs: Any) -> None:
            AdaptiveRule.__init__(self, *args, **kwargs)

        # The class's own __init__ carries the signature, for tools that read it there.
        this = inspect.Parameter("self", inspect.Parameter.POSITIONAL_ONLY)
        __init__.__signature__ = signature.replace(  # type: ignore[attr-defined]
            parameters=[this, *signature.parameters.values()]
        )
        __init__.__qualname__ = f"{cls.__qualname__}.__init__"
        __init__.__module__ = "agclip.backends.torch"
        cls.__init__ = __init__  # type: ignore[method-assign]
        window = ""
        if spec.window:
            window = f"    {spec.window[0]}: the last norms kept; ``None``: every norm.\n"
        options = window + (_NEW_TENSORS if spec.per_tensor else "") + _OPTIONS
        head = f"{spec.title}: {spec.doc.splitlines()[0].split(': ', 1)[-1]}"
        cls.__doc__ = spec.docstring(head, "", options, inspect.cleandoc(cls.__doc__ or ""))
        cls.__module__ = "agclip.backends.torch"

    def __init__(
        self,
        *args: Any,
        norm_type: float | str = 2.0,
        foreach: bool | None = None,
        process_group: Any = None,
        **kwargs: Any,
    ):
        spec = self.spec
        size = spec.window_of(kwargs, unbounded=True)
        new_tensors = (
            kwargs.pop("new_tensors") if spec.per_tensor and "new_tensors" in kwargs else "error"
        )
        config, static, given = spec.configure(args, kwargs, type(self).__name__)
        object.__setattr__(self, "_views", {**config, **static, **given})
        self.config, self.static = config, static
        self.window = size
        self.new_tensors = choice("new_tensors", new_tensors, ("error", "init"))
        self.norm_type = norm_type_arg(norm_type)
        self.foreach, self.process_group = foreach, process_group
        self.state: Any = None  # a NamedTuple of tensors, made at the first step
        self._steps = 0  # steps taken: a host-side bound on an unbounded history

    # -- the zclip package's attributes, as read-only views --------------------------
    def __getattr__(self, name: str) -> Any:
        views, name = self.__dict__.get("_views", {}), self.spec.aliases.get(name, name)
        if name in self.spec.views:
            return self.spec.views[name](self.state, views)
        if name in views:
            return views[name]
        if name in self.spec.state_type._fields:
            return None if self.state is None else getattr(self.state, name)
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        spec = self.spec
        if {name, spec.aliases.get(name)} & {*spec.views, *spec.defaults, *spec.state_type._fields}:
            raise AttributeError(
                f"{type(self).__name__}.{name} is read-only: hyperparameters are set when the "
                "rule is made, and the statistics live in .state (load_state_dict to change them)"
            )
        object.__setattr__(self, name, value)

    # -- stepping ---------------------------------------------------------------------
    @torch.no_grad()
    def step(self, model: torch.nn.Module | Any) -> torch.Tensor:
        """Clip the gradients of ``model`` (a module, or an iterable of parameters) in
        place; returns the pre-clip norm, a 0-d float32 tensor (float64 for float64
        gradients) on the gradients' device. Call it after ``backward()`` (after
        ``scaler.unscale_(optimizer)`` with AMP) and before ``optimizer.step()``, or
        let ``clip_and_step(optimizer, rule)`` do both."""
        params, names = named_parameters(model)
        k = kernels(self.foreach)
        decision = decide_for(k, params, names, self, self.process_group)
        if decision is None:
            return empty_norm()
        decision.apply(k)
        return decision.returned_norm(k)

    def decide(
        self,
        k: Kernels,
        grads: Batch,
        names: Callable[[], list[str]],
        process_group: Any,
        *,
        check: Callable[[torch.Tensor], None] | None = None,
        divisor: torch.Tensor | None = None,
    ) -> Decision:
        """This step's norm and factor(s), with the state updated; nothing written yet."""
        spec, p, units = self.spec, self.norm_type, None
        if spec.per_tensor:
            parts = [distributed_batch(k, k.prepare([g]), process_group) for g in grads.leaves]
            if process_group is not None or any(reduce is not LOCAL for _, reduce in parts):
                _check_every_rank_holds(len(parts), spec.title)
            units = [unit for unit, _ in parts]
            norms = _unscaled(k.stack([total_norm(k, u, p, r) for u, r in parts]), divisor)
            total, batch = norm_of_norms(k, norms, p), grads
        else:
            batch, reduce = distributed_batch(k, grads, process_group)
            norms, total = None, _unscaled(total_norm(k, batch, p, reduce), divisor)
        keys = leaf_keys(names(), grads.leaves) if spec.per_tensor else []
        state = self._state(k, batch, keys)  # may refuse new tensors: before the check,
        if check is not None:  # which counts the step in a callback
            check(total)
        factor, new = rule_factor(
            k, spec, norms, total, gathered(spec, state, keys, k.stack), self.config, self.static
        )
        new = scattered(spec, new, keys)
        self.state = new._replace(**_entries(spec, state, new))
        self._steps += 1
        return Decision(total, factor, batch, units)

    def _state(self, k: Kernels, batch: Batch, keys: list[str]) -> Any:
        """The state on the gradients' device and in their accumulator dtype; a new one
        at the first step. Per-tensor state must know these tensors (or, with
        ``new_tensors="init"``, starts an entry for each new one)."""
        like = batch.leaves[0] if batch else torch.zeros(())
        dtype, spec = k.accumulator(batch), self.spec
        state = self.state or spec.new_state(k, like, dtype, keys, self.window or FIRST_CAPACITY)
        if spec.window and self.window is None:  # an unbounded history doubles when full
            history = getattr(state, spec.window[0])
            if self._steps >= history.shape[0]:
                more = torch.full_like(history, float("inf"))
                state = state._replace(**{spec.window[0]: torch.cat([history, more])})
        new = [key for key in keys if key not in getattr(state, spec.per_tensor[0], keys)]
        if new and self.new_tensors == "error":
            raise ValueError(
                f"{spec.title} keeps one threshold per tensor and has none for {new[0]}: "
                f"its state describes other tensors. Pass {spec.title}(new_tensors='init') "
                "if tensors may join later (mixture-of-experts routing, a layer unfrozen)."
            )
        if new:
            state = state._replace(**_entries(spec, state, spec.new_state(k, like, dtype, new, 1)))
        return _cast(state, like.device, dtype)

    # -- checkpoints ------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The state as tensors, for a checkpoint (empty before the first step)."""
        return {} if self.state is None else {"state": dict(self.state._asdict())}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore a state saved by ``state_dict()`` (tensors, or plain numbers and
        lists as from JSON: each field gets the dtype it had). Tensors move to the
        gradients' device at the next step."""
        name, spec, saved = type(self).__name__, self.spec, state_dict.get("state", {})
        fields = spec.state_type._fields
        if state_dict and set(saved) != set(fields):
            raise ValueError(
                f"{name}.load_state_dict: expected the state fields "
                f"{', '.join(fields)}, got {', '.join(sorted(saved)) or 'none'}"
            )
        if not state_dict:
            self.state, self._steps = None, 0
            return
        keys = list(saved[spec.per_tensor[0]]) if spec.per_tensor else []
        held = len(saved[spec.window[0]]) if spec.window else 1
        template = spec.new_state(kernels(), torch.zeros(()), torch.float64, keys, held)
        state = type(template)(*(_like(saved[f], t) for f, t in zip(fields, template, strict=True)))
        self._steps = int(state.count)  # read once here, not per step
        if spec.window and (held != self.window if self.window else self._steps > held):
            raise ValueError(
                f"{name}.load_state_dict: the state holds the last {held} of "
                f"{self._steps} norms; load it into {name}(history={held})"
            )
        self.state = state


def fresh_copy(rule: AdaptiveRule) -> AdaptiveRule:
    """A rule with the same hyperparameters and options (its process group too, shared,
    not copied) and no state yet."""
    twin = copy.copy(rule)
    object.__setattr__(twin, "state", None)
    object.__setattr__(twin, "_steps", 0)
    return twin


def _like(value: Any, like: Any) -> Any:
    if isinstance(like, dict):
        return {key: _like(value[key], like[key]) for key in value}
    return torch.as_tensor(value, dtype=like.dtype)  # not via float32 (JSON numbers)


def _cast(state: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """Every field on ``device``; floating fields in ``dtype`` (counters stay int32)."""

    def cast(value: Any) -> Any:
        if isinstance(value, dict):
            return {key: cast(item) for key, item in value.items()}
        wanted = dtype if value.is_floating_point() else value.dtype
        return (
            value if value.device == device and value.dtype == wanted else value.to(device, wanted)
        )

    return type(state)(*(cast(value) for value in state))


def _entries(spec: RuleSpec, first: Any, then: Any) -> dict[str, dict[str, Any]]:
    """The per-tensor fields of ``first`` updated by ``then``'s entries: tensors without
    a gradient this step keep theirs."""
    return {f: {**getattr(first, f), **getattr(then, f)} for f in spec.per_tensor}


def _unscaled(norm: torch.Tensor, divisor: torch.Tensor | None) -> torch.Tensor:
    return norm if divisor is None else norm / divisor


def _check_every_rank_holds(tensors: int, title: str) -> None:
    """Per-tensor norms reduce across ranks tensor by tensor, so every rank must hold a
    part of every tensor (FSDP, TP, FSDP1 / ZeRO shards). Checked at every step with
    one all-reduce, so that every rank raises the same error instead of waiting on
    another's collectives (pipeline stages, tensors routed away)."""
    nccl = dist.get_backend() == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    extremes = torch.tensor([tensors, -tensors], dtype=torch.float64, device=device)
    dist.all_reduce(extremes, op=dist.ReduceOp.MAX)  # the most and (negated) the fewest
    most, fewest = int(extremes[0]), -int(extremes[1])
    if most != fewest:
        raise ValueError(
            f"{title} across ranks needs every rank to hold a part of every gradient tensor "
            f"(FSDP, tensor parallel, FSDP1 or ZeRO shards); the ranks hold between {fewest} "
            f"and {most} tensors (pipeline stages?). Use a global-norm rule there (ZClip, "
            "AutoClip): they need only the global norm."
        )
