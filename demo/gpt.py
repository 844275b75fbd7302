"""A small decoder-only transformer and character-level data from Python's own sources.

The model: pre-LayerNorm blocks, learned position embeddings, causal self-attention
(``scaled_dot_product_attention``), a linear head, untied by default (so AGC can
leave the head out by name; ``tie_head=True`` gives GPT-2's layout). The data: a
fixed list of standard-library modules, read from this interpreter's
``sysconfig.get_paths()["stdlib"]``; nothing is downloaded.
"""

from __future__ import annotations

import math
import sysconfig
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

# Modules present, as plain files, in CPython 3.10 to 3.13; sorted so the text is
# the same for every run on a given interpreter.
SOURCES = (
    "argparse.py",
    "collections/__init__.py",
    "dataclasses.py",
    "difflib.py",
    "fractions.py",
    "functools.py",
    "heapq.py",
    "json/decoder.py",
    "json/encoder.py",
    "random.py",
    "shutil.py",
    "string.py",
    "tempfile.py",
    "textwrap.py",
)
# Newline and printable ASCII; any other character (rare in these files) reads as "?".
VOCAB = "\n" + "".join(chr(c) for c in range(32, 127))
MAX_CHARS = 300_000  # enough text for a few hundred steps; reading it takes milliseconds
VAL_FRACTION = 0.1


@dataclass(frozen=True)
class GPTConfig:
    vocab: int = len(VOCAB)
    context: int = 64
    width: int = 128
    layers: int = 4
    heads: int = 4
    tie_head: bool = False  # GPT-2 ties the head to the token embedding


@dataclass(frozen=True)
class CharData:
    """Encoded text: ``train`` and ``val`` are int64 tensors of token ids."""

    train: torch.Tensor
    val: torch.Tensor
    vocab: str

    def batch(
        self, split: str, batch: int, context: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``batch`` random windows: inputs (batch, context) and the next characters."""
        data = self.train if split == "train" else self.val
        starts = torch.randint(0, data.numel() - context - 1, (batch,), generator=generator)
        rows = starts[:, None] + torch.arange(context + 1)
        windows = data[rows]
        return windows[:, :-1], windows[:, 1:]


def read_sources(max_chars: int = MAX_CHARS, stdlib: Path | None = None) -> str:
    """The listed stdlib modules, concatenated in order, cut at ``max_chars``."""
    root = Path(stdlib or sysconfig.get_paths()["stdlib"])
    parts, total = [], 0
    for name in SOURCES:
        path = root / name
        if not path.is_file():  # a packaging that moved a module: use the rest
            continue
        text = path.read_text(encoding="utf-8")
        parts.append(text)
        total += len(text)
        if total >= max_chars:
            break
    text = "".join(parts)[:max_chars]
    if len(text) < max_chars // 2:
        raise FileNotFoundError(f"found only {len(text):,} characters of source under {root}")
    return text


def encode(text: str, vocab: str = VOCAB) -> torch.Tensor:
    """Token ids of ``text``; characters outside ``vocab`` become ``"?"``."""
    table = np.full(0x110000, vocab.index("?"), dtype=np.int64)
    table[[ord(c) for c in vocab]] = np.arange(len(vocab))
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    return torch.from_numpy(table[codes])


def prepare_data(max_chars: int = MAX_CHARS, stdlib: Path | None = None) -> CharData:
    """Read, encode and split: the first 90% of the text trains, the rest validates
    (one contiguous cut, so no validation window overlaps a training one)."""
    ids = encode(read_sources(max_chars, stdlib))
    cut = int(len(ids) * (1 - VAL_FRACTION))
    return CharData(train=ids[:cut], val=ids[cut:], vocab=VOCAB)


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.heads = config.heads
        self.ln_1 = nn.LayerNorm(config.width)
        self.qkv = nn.Linear(config.width, 3 * config.width)
        self.proj = nn.Linear(config.width, config.width)
        self.ln_2 = nn.LayerNorm(config.width)
        self.fc = nn.Linear(config.width, 4 * config.width)
        self.fc_proj = nn.Linear(4 * config.width, config.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        qkv = self.qkv(self.ln_1(x)).view(b, t, 3, self.heads, c // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (b, heads, t, head width)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, c))
        out: torch.Tensor = x + self.fc_proj(F.gelu(self.fc(self.ln_2(x))))
        return out


class GPT(nn.Module):
    """Token + position embeddings, ``layers`` blocks, a final LayerNorm, a linear head."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab, config.width)
        self.pos_emb = nn.Embedding(config.context, config.width)
        blocks = [Block(config) for _ in range(config.layers)]
        self.blocks = nn.ModuleList(blocks)
        self.ln_f = nn.LayerNorm(config.width)
        self.head = nn.Linear(config.width, config.vocab, bias=False)
        self.apply(self._init)
        if config.tie_head:
            self.head.weight = self.tok_emb.weight
        for block in blocks:  # GPT-2: residual projections scaled by depth
            for proj in (block.proj, block.fc_proj):
                nn.init.normal_(proj.weight, std=0.02 / math.sqrt(2 * config.layers))

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Logits (batch, time, vocab) for token ids (batch, time)."""
        positions = torch.arange(idx.shape[1], device=idx.device)
        x = self.tok_emb(idx) + self.pos_emb(positions)
        for block in self.blocks:
            x = block(x)
        logits: torch.Tensor = self.head(self.ln_f(x))
        return logits


def loss_of(model: GPT, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def adamw(model: nn.Module, lr: float, *, weight_decay: float = 0.1) -> torch.optim.AdamW:
    """AdamW as GPT recipes set it: betas (0.9, 0.95), weight decay on matrices only
    (not on biases and LayerNorm gains), the fused kernel."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=True)


def warmup_cosine(warmup: int, total: int, floor: float = 0.1) -> Callable[[int], float]:
    """The learning-rate factor at each step: linear warm-up from 1/warmup to 1 over
    ``warmup`` steps, then a cosine down to ``floor`` at step ``total``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor
