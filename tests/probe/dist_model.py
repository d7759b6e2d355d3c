"""The model and data of :mod:`tests.probe.dist_harness`: a tiny transformer LM, the global
batches and each rank's share of them."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

WORLD = 2
MICRO = 2  # sequences per rank and step
SEQ = 8
VOCAB = 37  # odd: FSDP2 shards of the head's weight are uneven (19 + 18 rows)
DIM = 16
HEADS = 2
LR = 0.1
BINS = 64
SEED = 0


class Block(nn.Module):
    """Pre-norm causal self-attention and MLP."""

    def __init__(self):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(DIM), nn.LayerNorm(DIM)
        self.qkv, self.proj = nn.Linear(DIM, 3 * DIM), nn.Linear(DIM, DIM)
        self.fc1, self.fc2 = nn.Linear(DIM, 4 * DIM), nn.Linear(4 * DIM, DIM)

    def forward(self, x):  # (B, T, C)
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, HEADS, c // HEADS).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, C/H)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, c))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TinyLM(nn.Module):
    """2-layer transformer LM. ``pos`` has one row: rank 1's FSDP2 shard of it is empty."""

    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(VOCAB, DIM)
        self.pos = nn.Parameter(0.1 * torch.randn(1, SEQ, DIM))
        self.blocks = nn.ModuleList(Block() for _ in range(2))
        self.ln_f = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, VOCAB, bias=False)

    def forward(self, idx):  # (B, T) -> (B, T, VOCAB)
        x = self.tok(idx) + self.pos
        for b in self.blocks:
            x = b(x)
        return self.head(self.ln_f(x))


class Branch(nn.Module):
    """A parameter-free module (hooked by name: it is not a default choice)."""

    def forward(self, x):
        return x + 0.5 * torch.tanh(x)


class BranchLM(TinyLM):
    """TinyLM whose ``branch`` runs between ``ln_f`` and ``head`` only where ``branch_on``:
    data-dependent control flow (an ``if`` in forward, MoE routing) that skips a hooked
    module on some ranks."""

    def __init__(self):
        super().__init__()
        self.branch = Branch()
        self.branch_on = False

    def forward(self, idx):  # (B, T) -> (B, T, VOCAB)
        x = self.tok(idx) + self.pos
        for b in self.blocks:
            x = b(x)
        x = self.ln_f(x)
        if self.branch_on:
            x = self.branch(x)
        return self.head(x)


def make_model(dtype=torch.float32, branch: bool = False) -> TinyLM:
    """The seeded TinyLM (``branch``: a :class:`BranchLM`, the same parameters)."""
    torch.manual_seed(SEED)
    return (BranchLM() if branch else TinyLM()).to(dtype)


def global_batch(step: int) -> torch.Tensor:
    """int64 ``(WORLD * MICRO, SEQ + 1)`` tokens of ``step``; rank r trains on rows
    ``r * MICRO : (r + 1) * MICRO``."""
    gen = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, VOCAB, (WORLD * MICRO, SEQ + 1), generator=gen)


def rank_batch(step: int, rank: int) -> torch.Tensor:
    return global_batch(step)[rank * MICRO : (rank + 1) * MICRO]


def lm_loss(model, tokens) -> torch.Tensor:
    """Mean next-token cross entropy over the batch (so DDP's mean of ranks = global mean)."""
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))


def module_names(model: nn.Module) -> list[str]:
    """The modules a default ``Probe`` hooks (names as on one device), and a
    :class:`BranchLM`'s ``branch``."""
    from tbprobe.probe.selection import select_modules

    names = [n for n, _ in select_modules(model)]
    return [*names, "branch"] if isinstance(model, BranchLM) else names
