"""Lightning with agclip's clipping: a small regression model, one epoch on CPU.

The Trainer's own clipping (`gradient_clip_val`) stays off; the callback clips
before every optimizer step and logs `grad_norm` and `grad_norm_clip_rate`.

    python examples/lightning_example.py
"""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import torch

from agclip.integrations.lightning import GradientClipping


class Regression(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1)
        )

    def training_step(self, batch, batch_index):
        x, y = batch
        return 100 * torch.nn.functional.mse_loss(self.net(x), y)  # steep: gradients explode

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def main() -> None:
    warnings.filterwarnings("ignore", ".*does not have many workers")
    # lightning 2.6 with torch 2.13 uses a deprecated torch pytree check internally
    warnings.filterwarnings("ignore", ".isinstance.treespec, LeafSpec.. is deprecated")
    torch.manual_seed(0)
    x = torch.randn(256, 8)
    data = torch.utils.data.TensorDataset(x, x.sum(dim=1, keepdim=True))
    loader = torch.utils.data.DataLoader(data, batch_size=32)
    clipping = GradientClipping(max_norm=1.0)
    trainer = pl.Trainer(
        max_epochs=2,
        callbacks=[clipping],  # instead of Trainer(gradient_clip_val=1.0)
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Regression(), loader)
    stats = clipping.clipper.stats()
    print(
        f"{stats['steps']} optimizer steps, {stats['clipped_steps']} clipped; "
        f"last pre-clip norm {float(trainer.callback_metrics['grad_norm']):.3f}, "
        f"clip rate in the last epoch {float(trainer.callback_metrics['grad_norm_clip_rate']):.0%}"
    )


if __name__ == "__main__":
    main()
