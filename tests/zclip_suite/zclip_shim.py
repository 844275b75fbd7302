"""The zclip package's names, with agclip's ZClip behind them: its tests run unchanged."""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("torch", reason="the zclip package's tests need torch")

from agclip.backends.torch import ZClip

__all__ = ["ZClip"]


def __getattr__(name: str) -> Any:
    """The package's own Lightning callback, stepping agclip's ZClip."""
    if name != "ZClipLightningCallback":
        raise AttributeError(name)
    callback = pytest.importorskip("zclip.zclip_lightning_callback", reason="the zclip package")

    class ZClipLightningCallback(callback.ZClipLightningCallback):  # type: ignore[misc]
        def __init__(self, **kwargs: Any):
            super().__init__(**kwargs)
            self.zclip = ZClip(**kwargs)

    return ZClipLightningCallback
