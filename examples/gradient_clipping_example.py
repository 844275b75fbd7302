"""PyTorch: the three ways to clip with agclip, in a real training loop.

1. ``clip_grad_norm_``: a drop-in for ``torch.nn.utils.clip_grad_norm_``.
2. ``GradientClipCallback``: ``set_model`` once, ``on_after_backward`` each step;
   it keeps statistics and names parameters whose gradients go non-finite.
3. ``clip_and_step``: clip and take the optimizer's step in one call; a fused
   optimizer takes the clip inside its step (no pass to scale the gradients).

    python examples/gradient_clipping_example.py
"""

from __future__ import annotations

import torch

from agclip.backends.torch import GradientClipCallback, clip_and_step, clip_grad_norm_


def make_problem(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
    x = torch.randn(256, 16)
    y = 50 * torch.sin(x.sum(dim=1, keepdim=True))  # large targets: large gradients
    return model, x, y


def train_with_function(steps: int = 200) -> float:
    model, x, y = make_problem()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(steps):
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        clip_grad_norm_(model.parameters(), max_norm=1.0)  # returns the pre-clip norm
        optimizer.step()
    return loss.item()


def train_with_callback(steps: int = 200) -> tuple[float, dict]:
    model, x, y = make_problem()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    clipper = GradientClipCallback(max_norm=1.0)
    clipper.set_model(model)
    for _ in range(steps):
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        clipper.on_after_backward()
        optimizer.step()
    return loss.item(), clipper.stats()


def train_with_clip_and_step(steps: int = 200) -> float:
    model, x, y = make_problem()
    # The same optimizer as above, so the losses match; with fused=True the clip
    # would ride inside the step (equal up to rounding, which this problem amplifies).
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(steps):
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        clip_and_step(optimizer, max_norm=1.0)  # clip_grad_norm_, then optimizer.step()
    return loss.item()


def main() -> None:
    model, x, y = make_problem()
    with torch.no_grad():
        print(f"initial loss {torch.nn.functional.mse_loss(model(x), y).item():.4g}")
    print(f"clip_grad_norm_:      final loss {train_with_function():.4g}")
    loss, stats = train_with_callback()
    print(f"GradientClipCallback: final loss {loss:.4g}, stats {stats}")
    print(f"clip_and_step:        final loss {train_with_clip_and_step():.4g}")


if __name__ == "__main__":
    main()
