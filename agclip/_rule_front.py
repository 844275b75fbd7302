"""The functional front of every adaptive rule (``agclip.zclip_init`` / ``agclip.zclip``
and the others), generated from each rule's spec; the optax transforms run the same
steps. A state that does not fit the gradients (another library, other tensors) is
a clear error; one saved as plain numbers (JSON) comes back with its dtypes."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import array_api_compat as compat
import numpy as np
from array_api_compat import numpy as np_compat

from ._checks import check_ord
from ._dispatch import flatten_arrays, kernels_for
from ._pipeline import LOCAL, Reduction
from ._rule import RuleSpec, check_keys, clip_with_rule, leaf_keys
from ._typing import ArrayTree

WINDOW_DOC = "    {}: how many of the last norms the state keeps (its size).\n"


def fit_state(spec: RuleSpec, k: Any, state: Any, like: Any, template: Callable[[], Any]) -> Any:
    """``state`` as arrays of the gradients' library (``like`` is one gradient): plain
    numbers (a state saved as JSON, or NumPy scalars) get the dtypes of a fresh state;
    another library's arrays are a ``TypeError`` (moving a state between libraries is
    the caller's explicit choice)."""
    if not isinstance(state, spec.state_type):
        raise TypeError(f"state must be a {spec.state_type.__name__}, got {type(state).__name__}")
    fresh: list[Any] = []

    def fit(name: str, value: Any, path: tuple[Any, ...]) -> Any:
        if isinstance(value, Mapping):
            return {key: fit(f"{name}[{key!r}]", item, (*path, key)) for key, item in value.items()}
        if isinstance(value, (int, float, list, np.generic)):
            if not fresh:
                fresh.append(template())
            model = fresh[0]
            for step in path:
                model = model[step] if isinstance(model, Mapping) else getattr(model, step)
            return k.xp.asarray(value, dtype=model.dtype, **k.placement(model))
        library = compat.array_namespace(like)
        if compat.array_namespace(value) is not library:
            raise TypeError(
                f"state.{name} is a {type(value).__module__}.{type(value).__name__}, but the "
                f"gradients are {library.__name__.removeprefix('array_api_compat.')} arrays: "
                f"build the state from these gradients ({spec.name}_init) or convert it"
            )
        return value

    return type(state)(*(fit(n, v, (n,)) for n, v in zip(state._fields, state, strict=True)))


def functional_init(spec: RuleSpec, grads: ArrayTree, window: Any = None) -> Any:
    """The spec's initial state for gradients like ``grads`` (NumPy float32 when empty)."""
    flat, k = flatten_arrays(grads)
    if k is None:
        empty = np.zeros((), np.float32)
        return spec.new_state(kernels_for(np_compat), empty, np.float32, [], window)
    keys = leaf_keys(flat.paths, flat.leaves) if spec.per_tensor else []
    like, dtype = flat.leaves[0], k.accumulator(k.prepare(flat.leaves))
    return spec.new_state(k, like, dtype, keys, window)


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
    keys = tuple(leaf_keys(flat.paths, flat.leaves)) if spec.per_tensor else ()
    if reduce is not LOCAL and spec.per_tensor:  # local shards: not the tensors' shapes
        held = tuple(getattr(state, spec.per_tensor[0]))
        keys = held if [_path(a) for a in held] == [_path(b) for b in keys] else keys
    check_keys(spec, state, keys)
    history: Any = spec.window and getattr(state, spec.window[0])
    window = spec.window and (history.shape[0] if hasattr(history, "shape") else len(history))
    state = fit_state(spec, k, state, flat.leaves[0], lambda: functional_init(spec, grads, window))
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


def _path(key: str) -> str:
    return key.rsplit(" (", 1)[0]


def functional_front(spec: RuleSpec) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """``(init, step)``: the rule as pure functions, ``agclip.<name>_init`` and
    ``agclip.<name>``."""

    def init(grads: ArrayTree, **window: Any) -> Any:
        size = spec.window_of(window)
        if window:
            raise TypeError(f"{spec.name}_init got an unexpected argument {next(iter(window))!r}")
        return functional_init(spec, grads, size)

    def step(grads: ArrayTree, state: Any, *, ord: Any = 2, **hypers: Any) -> tuple[ArrayTree, Any]:
        config, static, _ = spec.configure((), hypers, spec.name)
        return functional_step(spec, grads, state, config, static, ord=ord)

    positional, keyword = inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY
    grads = inspect.Parameter("grads", positional)
    window = (
        [inspect.Parameter(*spec.window[:1], keyword, default=spec.window[1])]
        if spec.window
        else []
    )
    init.__signature__ = inspect.Signature([grads, *window])  # type: ignore[attr-defined]
    step.__signature__ = spec.signature(  # type: ignore[attr-defined]
        [grads, inspect.Parameter("state", positional)],
        [inspect.Parameter("ord", keyword, default=2)],
    )
    sizes = WINDOW_DOC.format(spec.window[0]) if spec.window else ""
    init.__doc__ = f"""{spec.title}'s initial state for gradients like ``grads`` (their library,
device, dtypes{" and tensors" if spec.per_tensor else ""}).

Args:
    grads: a pytree of gradient arrays.
{sizes}"""
    step.__doc__ = spec.docstring(
        f"{spec.title}: {spec.doc.splitlines()[0].split(': ', 1)[-1]}",
        "    grads: a pytree of gradient arrays (``None`` leaves skipped).\n"
        f"    state: the previous state (``{spec.name}_init(grads)`` at first).\n",
        "    ord: the norm's order: 2 (default), 1, ``inf`` or any p > 0.\n",
        "Returns:\n    The pair ``(clipped, state)``: a new tree like ``grads`` and the new state\n"
        "    (``state.norm``: the pre-clip norm; ``state.threshold``: the one in force).\n",
    )
    for fn, name in ((init, f"{spec.name}_init"), (step, spec.name)):
        fn.__name__ = fn.__qualname__ = name
        fn.__module__ = "agclip"
    return init, step
