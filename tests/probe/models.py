"""The probe's model zoo: tiny models covering the shapes of module trees and outputs the
probe must attach to, each with a ``batch()`` and a ``loss(model, batch)``."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


class SmallCNN(nn.Module):
    """Convs followed by in-place ReLUs (which full backward hooks cannot survive)."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(4, 6, 3, padding=1),
            nn.ReLU(inplace=True),
        )
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


def tiny_gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16)
    cfg.attn_pdrop = cfg.resid_pdrop = cfg.embd_pdrop = 0.0
    return GPT2LMHeadModel(cfg)


class Nested(nn.Module):
    """Containers inside containers: blocks of a ModuleList of Sequentials."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(8, 8)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Sequential(nn.Linear(8, 8)))
            for _ in range(2)
        )

    def forward(self, x):
        x = self.stem(x)
        for b in self.blocks:
            x = x + b(x)
        return x


class Twice(nn.Module):
    """One module called twice in every forward."""

    def __init__(self):
        super().__init__()
        self.shared = nn.Linear(8, 8)
        self.out = nn.Linear(8, 2)

    def forward(self, x):
        return self.out(self.shared(torch.relu(self.shared(x))))


@dataclass
class Pair:
    first: torch.Tensor
    second: torch.Tensor


class TupleOut(nn.Linear):
    def forward(self, x):
        y = super().forward(x)
        return y, torch.tensor(3)  # the int tensor is not a floating activation


class DictOut(nn.Linear):
    def forward(self, x):
        return {"y": super().forward(x), "note": "text"}


class DataOut(nn.Linear):
    def forward(self, x):
        y = super().forward(x)
        return Pair(y, 2 * y)


class Structured(nn.Module):
    """Modules returning a tuple, a dict and a dataclass."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = TupleOut(8, 8), DictOut(8, 8), DataOut(8, 4)

    def forward(self, x):
        y, _ = self.a(x)
        pair = self.c(self.b(y)["y"])
        return pair.first + pair.second


class Checkpointed(nn.Module):
    """Blocks run under ``torch.utils.checkpoint`` (non-reentrant)."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(2))
        self.out = nn.Linear(8, 2)

    def forward(self, x):
        for b in self.blocks:
            x = checkpoint(b, x, use_reentrant=False)
        return self.out(x)


def batch_for(name: str, gen: torch.Generator):
    """An input batch for the zoo model ``name``."""
    if name == "cnn":
        return torch.randn(2, 3, 8, 8, generator=gen)
    if name == "gpt2":
        return torch.randint(0, 64, (2, 8), generator=gen)
    return torch.randn(4, 8, generator=gen)


def loss_for(name: str, model: nn.Module, x) -> torch.Tensor:
    if name == "gpt2":
        return model(input_ids=x, labels=x).loss
    return model(x).float().pow(2).mean()


ZOO = {
    "mlp": mlp,
    "cnn": SmallCNN,
    "gpt2": tiny_gpt2,
    "nested": Nested,
    "twice": Twice,
    "structured": Structured,
    "checkpointed": Checkpointed,
}


def make(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return ZOO[name]()
