"""The PyTorch front of every adaptive rule: one class, made concrete per spec
(``ZClip``, ``AutoClip``, ``AdaGC``). ``step(model)`` clips the gradients in place
and returns the pre-clip norm; the state lives on the gradients' device as tensors
(no host sync per step), is saved with ``state_dict()`` and restored with
``load_state_dict()``. The rule also plugs into ``GradientClipCallback`` and
``clip_and_step`` as their threshold."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch
import torch.distributed as dist

from .._checks import check_count, choice
from .._kernels import Batch, Kernels
from .._pipeline import LOCAL, norm_of_norms, total_norm
from .._rule import RuleSpec, gathered, leaf_keys, rule_factor, scattered
from ._torch_clip import Decision
from ._torch_distributed import distributed_batch
from ._torch_grads import (
    collect_grads,
    empty_norm,
    grad_names,
    kernels,
    named_parameters,
    norm_type_arg,
    warn_if_no_gradients,
)

FIRST_CAPACITY = 256  # an unbounded AutoClip history starts here and doubles


class AdaptiveRule:
    """An adaptive rule for PyTorch gradients (see the concrete classes)."""

    spec: ClassVar[RuleSpec]

    def __init__(
        self,
        *args: Any,
        norm_type: float | str = 2.0,
        foreach: bool | None = None,
        process_group: Any = None,
        **kwargs: Any,
    ):
        spec, name = self.spec, type(self).__name__
        window = spec.window
        size = kwargs.pop(window.name, window.default) if window else None
        new_tensors = kwargs.pop("new_tensors", "error") if spec.per_tensor else "error"
        config, static = spec.configure(args, kwargs, owner=name)
        given = {h.name: h.default for h in spec.hypers}
        given.update(zip(given, args, strict=False))
        given.update({spec.aliases.get(key, key): value for key, value in kwargs.items()})
        object.__setattr__(self, "_views", {**given, **config, **static})
        self.config, self.static = config, static
        self.window = None if size is None else check_count(window.name, size, low=1)  # type: ignore[union-attr]
        self.new_tensors = choice("new_tensors", new_tensors, ("error", "init"))
        self.norm_type = norm_type_arg(norm_type)
        self.foreach = foreach
        self.process_group = process_group
        self.state: Any = None  # a NamedTuple of tensors, made at the first step
        self._steps = 0  # steps taken: a host-side bound on an unbounded history

    # -- the zclip package's attributes, as read-only views --------------------------
    def __getattr__(self, name: str) -> Any:
        views = self.__dict__.get("_views", {})
        name = self.spec.aliases.get(name, name)
        if name in self.spec.views:
            return self.spec.views[name](self.state, views)
        if name in views:
            return views[name]
        if name in self.spec.state_type._fields:
            return None if self.state is None else getattr(self.state, name)
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        fields = self.spec.state_type._fields
        if (
            name in self.spec.views
            or name in self.spec.aliases
            or (name in fields or any(h.name == name for h in self.spec.hypers))
        ):
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
        grads, _ = collect_grads(k, params, names)
        if not grads and self.process_group is None:
            warn_if_no_gradients(params)
            return empty_norm()
        decision = self.decide(k, grads, grad_names(params, names), self.process_group)
        decision.apply(k)
        return decision.returned_norm(k)

    def decide(
        self,
        k: Kernels,
        grads: Batch,
        names: list[str],
        process_group: Any,
        *,
        check: Callable[[torch.Tensor], None] | None = None,
        divisor: torch.Tensor | None = None,
    ) -> Decision:
        """This step's norm and factor(s), with the state updated; nothing written yet."""
        spec, p = self.spec, self.norm_type
        if spec.per_tensor:
            units = [
                distributed_batch(k, k.prepare([grad]), process_group) for grad in grads.leaves
            ]
            if process_group is not None or any(reduce is not LOCAL for _, reduce in units):
                _check_every_rank_holds(len(units), spec.title)
            norms = k.stack([total_norm(k, unit, p, reduce) for unit, reduce in units])
            total = norm_of_norms(k, norms, p)
            norms, total = _unscaled(norms, divisor), _unscaled(total, divisor)
            if check is not None:
                check(total)
            keys = leaf_keys(names, grads.leaves)
            state = self._state(k, grads, keys)
            factor, new = rule_factor(
                k,
                spec,
                norms,
                total,
                gathered(spec, state, keys, k.stack),
                self.config,
                self.static,
            )
            new = scattered(spec, new, keys)
            self.state = new._replace(**_entries(spec, state, new))
            return Decision(total, factor, grads, units=[unit for unit, _ in units])
        batch, reduce = distributed_batch(k, grads, process_group)
        total = _unscaled(total_norm(k, batch, p, reduce), divisor)
        if check is not None:
            check(total)
        state = self._state(k, batch, [])
        factor, self.state = rule_factor(k, spec, None, total, state, self.config, self.static)
        self._steps += 1
        return Decision(total, factor, batch)

    def _state(self, k: Kernels, batch: Batch, keys: list[str]) -> Any:
        """The state on the gradients' device and in their accumulator dtype; a new one
        at the first step. Per-tensor state must know these tensors (or, with
        ``new_tensors="init"``, starts an entry for each new one)."""
        like = batch.leaves[0] if batch else torch.zeros(())
        dtype = k.accumulator(batch)
        window = self.window or FIRST_CAPACITY
        if self.state is None:
            return self.spec.new_state(k, like, dtype, keys, window)
        state = self.state
        if self.spec.window is not None and self.window is None:
            state = self._grown(state)
        new = [key for key in keys if key not in getattr(state, self.spec.per_tensor[0], keys)]
        if new and self.new_tensors == "error":
            raise ValueError(
                f"{self.spec.title} keeps one threshold per tensor and has none for {new[0]}: "
                f"its state describes other tensors. Pass {self.spec.title}(new_tensors='init') "
                "if tensors may join later (mixture-of-experts routing, a layer unfrozen)."
            )
        if new:
            fresh = self.spec.new_state(k, like, dtype, new, window)
            state = state._replace(**_entries(self.spec, state, fresh))
        return _cast(state, like.device, dtype)

    def _grown(self, state: Any) -> Any:
        """An unbounded history (``history=None``) doubles when full."""
        history = getattr(state, self.spec.window.name)  # type: ignore[union-attr]
        if self._steps < history.shape[0]:
            return state
        more = torch.full_like(history, float("inf"))
        return state._replace(**{self.spec.window.name: torch.cat([history, more])})  # type: ignore[union-attr]

    # -- checkpoints ------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The state as tensors, for a checkpoint (empty before the first step)."""
        return {} if self.state is None else {"state": dict(self.state._asdict())}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore a state saved by ``state_dict()`` (tensors, or plain numbers and
        lists as from JSON: each field gets the dtype it had). Tensors move to the
        gradients' device at the next step."""
        name, fields = type(self).__name__, self.spec.state_type._fields
        if not state_dict:
            self.state, self._steps = None, 0
            return
        saved = state_dict.get("state", {})
        if set(saved) != set(fields):
            raise ValueError(
                f"{name}.load_state_dict: expected the state fields "
                f"{', '.join(fields)}, got {', '.join(sorted(saved)) or 'none'}"
            )
        keys = list(saved[self.spec.per_tensor[0]]) if self.spec.per_tensor else []
        held = len(saved[self.spec.window.name]) if self.spec.window else None
        template = self.spec.new_state(kernels(), torch.zeros(()), torch.float64, keys, held or 1)
        state = type(template)(*(_like(saved[f], t) for f, t in zip(fields, template, strict=True)))
        if self.spec.window is not None:
            count = int(state.count)  # read once here, not per step
            if self.window is not None and held != self.window:
                raise ValueError(
                    f"{name}({self.spec.window.name}={self.window}).load_state_dict: the state "
                    f"holds a history of {held} norms; load it into {name}(history={held})"
                )
            if self.window is None and count > held:  # type: ignore[operator]
                raise ValueError(
                    f"{name}(history=None).load_state_dict: the state saw {count} norms but "
                    f"kept only the last {held}; load it into {name}(history={held})"
                )
            self._steps = count
        self.state = state


def _like(value: Any, like: Any) -> Any:
    if isinstance(like, dict):
        return {key: _like(value[key], like[key]) for key in value}
    return torch.as_tensor(value).to(like.dtype)


def _cast(state: Any, device: torch.device | None = None, dtype: torch.dtype | None = None) -> Any:
    """Every field on ``device``; floating fields in ``dtype`` (counters stay int32)."""

    def cast(value: Any) -> Any:
        if isinstance(value, dict):
            return {key: cast(item) for key, item in value.items()}
        wanted = dtype if dtype is not None and value.is_floating_point() else value.dtype
        if value.device == (device or value.device) and value.dtype == wanted:
            return value
        return value.to(device=device, dtype=wanted)

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


def torch_rule(spec: RuleSpec, example: str) -> type[AdaptiveRule]:
    """The PyTorch class of ``spec``, with its signature and docstring."""
    rule = type(spec.title, (AdaptiveRule,), {"spec": spec, "__module__": "agclip.backends.torch"})
    keyword = inspect.Parameter.KEYWORD_ONLY
    extra = []
    if spec.window is not None:
        extra.append(inspect.Parameter(spec.window.name, keyword, default=spec.window.default))
    if spec.per_tensor:
        extra.append(inspect.Parameter("new_tensors", keyword, default="error"))
    rule.__signature__ = spec.signature(  # type: ignore[attr-defined]
        [],
        [
            *extra,
            inspect.Parameter("norm_type", keyword, default=2.0),
            inspect.Parameter("foreach", keyword, default=None),
            inspect.Parameter("process_group", keyword, default=None),
        ],
    )
    after = _TORCH_ARGS
    if spec.window is not None:
        keep_all = "``None`` keeps every norm (the buffer on the device doubles when full)."
        after = f"    {spec.window.name}: {spec.window.doc} {keep_all}\n" + after
    if spec.per_tensor:
        after = _NEW_TENSORS + after
    rule.__doc__ = spec.docstring(f"{spec.title}: {spec.summary}", "", after, example)
    return rule


_TORCH_ARGS = """    norm_type: the norm's order (2.0 default, 1, ``inf``, any p > 0).
    foreach: as in ``clip_grad_norm_``.
    process_group: as in ``clip_grad_norm_``: the norm is global.
"""
_NEW_TENSORS = """    new_tensors: ``"error"`` (default): gradients of a tensor the state has not
        seen are a ``ValueError`` naming it; ``"init"``: such a tensor starts a fresh
        entry (mixture-of-experts routing, a layer unfrozen). Entries of tensors
        without a gradient this step are kept as they were.
"""
