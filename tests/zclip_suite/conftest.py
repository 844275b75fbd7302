"""The zclip package's tests against agclip's ZClip: each deliberate difference is a
strict expected failure with its reason (see NOTICE and docs/adaptive.md)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest

READ_ONLY = (
    "agclip's statistics are read-only views of .state: the test sets zclip.mean and "
    "zclip.var directly (agclip: load_state_dict)"
)
DIFFERENCES = {
    "test_invalid_clip_option": "agclip raises ValueError naming the option, not AssertionError",
    "test_warmup_phase": "agclip keeps running moments through the warm-up: no buffer of norms",
    "test_zscore_clipping": READ_ONLY,
    "test_percentile_clipping": READ_ONLY,
    "test_skip_update_on_spike": READ_ONLY,
    "test_adaptive_scaling_threshold": READ_ONLY,
    "test_mean_threshold": READ_ONLY,
    "test_in_place_clipping": "apply_in_place_clipping is the package's helper, not agclip's API",
    "test_clip_option_adaptive_scaling": "it spies on the package's private _compute_clip_val",
    # Not a difference: it fails against the zclip package too (its DataLoader wraps the
    # one batch of 5 in another batch dimension, and the loss refuses the shapes).
    "test_callback_called_before_optimizer": "fails with the zclip package itself",
}
# Lightning 2.6's own use of a torch pytree API that torch 2.13 deprecates, and its
# notes about this small test setup: not agclip's (docs/lightning.md says more).
LIGHTNING_NOTES = [
    "ignore:.isinstance.treespec, LeafSpec.. is deprecated:FutureWarning",
    "ignore:.*does not have many workers",
    "ignore:.*is smaller than the logging interval",
    "ignore:.*GPU available but not used",
    "ignore:.*`max_epochs` was not set",
]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "zclip_suite" not in str(item.path):
            continue
        for note in LIGHTNING_NOTES:
            item.add_marker(pytest.mark.filterwarnings(note))
        reason = DIFFERENCES.get(item.name)
        if reason:
            item.add_marker(pytest.mark.xfail(reason=reason, strict=True))


def pytest_ignore_collect(collection_path: Path, config: Any) -> bool | None:
    """The package's test files import torch at the top: without torch they are
    not collected (zclip_shim.py reports the suite SKIPPED, with the reason)."""
    if collection_path.name.startswith("test_") and importlib.util.find_spec("torch") is None:
        return True
    return None
