"""The functional front of every adaptive rule (``agclip.zclip_init`` / ``agclip.zclip``
and the others), generated from each rule's spec; the optax transforms run the same
steps. A state that does not fit the gradients (another library, other tensors) is
a clear error; one saved as plain numbers (JSON) comes back with its dtypes."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import array_api_compat as compat
import numpy as np

from ._checks import check_count, check_ord
from ._dispatch import flatten_arrays, kernels_for
from ._kernels import Batch, Kernels
from ._pipeline import LOCAL, Reduction
from ._rule import RuleSpec, check_keys, clip_with_rule, leaf_keys
from ._typing import ArrayTree


def make_state(spec: RuleSpec, k: Kernels, batch: Batch, keys: Sequence[str], window: Any) -> Any:
    """A fresh state for the batch's library, device and accumulator dtype."""
    like = batch.leaves[0]
    return spec.new_state(k, like, k.accumulator(batch), list(keys), window)


def fit_state(
    spec: RuleSpec, k: Kernels, state: Any, like: Any, template: Callable[[], Any]
) -> Any:
    """``state`` as arrays of the gradients' library (``like`` is one gradient): plain
    numbers (a state saved as JSON, or NumPy scalars) get the dtypes of a fresh state;
    another library's arrays are a ``TypeError`` (moving a state between libraries is
    the caller's explicit choice)."""
    if not isinstance(state, spec.state_type):
        raise TypeError(f"state must be a {spec.state_type.__name__}, got {type(state).__name__}")
    xp = k.xp
    fresh: list[Any] = []

    def fit(name: str, value: Any, path: tuple[Any, ...]) -> Any:
        if isinstance(value, Mapping):
            return {key: fit(f"{name}[{key!r}]", item, (*path, key)) for key, item in value.items()}
        if isinstance(value, (int, float, list, np.generic)):
            fresh[:] = fresh or [template()]
            model = fresh[0]
            for step in path:
                model = model[step] if isinstance(model, Mapping) else getattr(model, step)
            return xp.asarray(value, dtype=model.dtype, **k.placement(model))
        if not _same_library(value, like):
            raise TypeError(
                f"state.{name} is a {type(value).__module__}.{type(value).__name__}, but the "
                f"gradients are {_library_name(like)} arrays: build the state from these "
                f"gradients ({spec.name}_init) or convert it"
            )
        return value if compat.is_jax_array(value) else xp.asarray(value)

    named: Any = state
    fields = zip(named._fields, named, strict=True)
    return type(state)(*(fit(name, value, (name,)) for name, value in fields))


def _same_library(value: Any, like: Any) -> bool:
    try:
        return compat.array_namespace(value) is compat.array_namespace(like)
    except TypeError:
        return False


def _library_name(like: Any) -> str:
    return compat.array_namespace(like).__name__.removeprefix("array_api_compat.")


def state_keys(spec: RuleSpec, flat: Any) -> tuple[str, ...]:
    return tuple(leaf_keys(flat.paths, flat.leaves)) if spec.per_tensor else ()


def functional_init(spec: RuleSpec, grads: ArrayTree, window: Any = None) -> Any:
    """The spec's initial state for gradients like ``grads`` (NumPy float32 when empty)."""
    import numpy as np
    from array_api_compat import numpy as np_compat

    flat, k = flatten_arrays(grads)
    if k is None:
        k = kernels_for(np_compat)
        return spec.new_state(k, np.zeros((), np.float32), np.float32, [], window)
    return make_state(spec, k, k.prepare(flat.leaves), state_keys(spec, flat), window)


def functional_step(
    spec: RuleSpec,
    grads: ArrayTree,
    state: Any,
    config: dict[str, Any],
    static: dict[str, Any],
    *,
    ord: Any = 2,
    reduce: Reduction = LOCAL,
) -> tuple[ArrayTree, Any]:
    """One step of the spec's rule over a pytree (compiled once on JAX: the
    hyperparameters are traced arguments, the options static)."""
    p = check_ord(ord)
    flat, k = flatten_arrays(grads)
    if k is None:
        return grads, state
    keys = state_keys(spec, flat)
    if reduce is not LOCAL:  # local shards: their shapes are not the whole tensors'
        keys = _by_path(spec, state, keys)
    check_keys(spec, state, keys)
    state = fit_state(
        spec,
        k,
        state,
        flat.leaves[0],
        lambda: make_state(spec, k, k.prepare(flat.leaves), keys, _window_of(spec, state)),
    )
    clipped, state = k.run(
        clip_with_rule,
        flat.leaves,
        state,
        config,
        spec=spec,
        p=p,
        keys=keys,
        reduce=reduce,
        **static,
    )
    return flat.unflatten(clipped), state


def _by_path(spec: RuleSpec, state: Any, keys: tuple[str, ...]) -> tuple[str, ...]:
    """The state's keys where they name the same tensors (by key path) in the same order."""
    held = tuple(getattr(state, spec.per_tensor[0], {})) if spec.per_tensor else ()
    same = [a.rsplit(" (", 1)[0] for a in held] == [b.rsplit(" (", 1)[0] for b in keys]
    return held if same else keys


def _window_of(spec: RuleSpec, state: Any) -> Any:
    if spec.window is None:
        return None
    held = getattr(state, spec.window.name)
    return len(held) if isinstance(held, list) else held.shape[0]


def check_window(spec: RuleSpec, window: Any) -> Any:
    assert spec.window is not None
    return check_count(spec.window.name, window, low=1)


_TREE_ARGS = """    grads: a pytree of gradient arrays (``None`` leaves skipped).
    state: the previous state (``{name}_init(grads)`` at first).
"""
_ORD = "    ord: the norm's order: 2 (default), 1, ``inf`` or any p > 0.\n"
_RETURNS = """Returns:
    The pair ``(clipped, state)``: a new tree like ``grads``, and the new state
    (``state.norm``: the pre-clip norm; ``state.threshold``: the threshold in force).
"""


def functional_front(spec: RuleSpec) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """``(init, step)``: the rule as pure functions, ``agclip.<name>_init`` and
    ``agclip.<name>``."""

    def init(grads: ArrayTree, **window: Any) -> Any:
        size = None
        if spec.window is not None:
            size = check_window(spec, window.pop(spec.window.name, spec.window.default))
        if window:
            raise TypeError(f"{spec.name}_init got an unexpected argument {next(iter(window))!r}")
        return functional_init(spec, grads, size)

    def step(grads: ArrayTree, state: Any, *, ord: Any = 2, **hypers: Any) -> tuple[ArrayTree, Any]:
        config, static = spec.configure((), hypers, owner=spec.name)
        return functional_step(spec, grads, state, config, static, ord=ord)

    keyword = inspect.Parameter.KEYWORD_ONLY
    positional = inspect.Parameter.POSITIONAL_OR_KEYWORD
    grads_param = inspect.Parameter("grads", positional)
    window_params = (
        [inspect.Parameter(spec.window.name, keyword, default=spec.window.default)]
        if spec.window
        else []
    )
    init.__signature__ = inspect.Signature([grads_param, *window_params])  # type: ignore[attr-defined]
    window_doc = ""
    if spec.window:
        window_doc = (
            "\n\nArgs:\n    grads: gradients like the ones to clip.\n"
            f"    {spec.window.name}: {spec.window.doc}"
        )
    init.__doc__ = (
        f"{spec.title}'s initial state for gradients like ``grads`` (their library, "
        f"device, dtypes{' and tensors' if spec.per_tensor else ''}).{window_doc}"
    )
    step.__signature__ = spec.signature(  # type: ignore[attr-defined]
        [grads_param, inspect.Parameter("state", positional)],
        [inspect.Parameter("ord", keyword, default=2)],
    )
    step.__doc__ = spec.docstring(
        f"{spec.title}: {spec.summary}", _TREE_ARGS.format(name=spec.name), _ORD, _RETURNS
    )
    for fn, name in ((init, f"{spec.name}_init"), (step, spec.name)):
        fn.__name__ = fn.__qualname__ = name
        fn.__module__ = "agclip"
    return init, step
