"""The demo's data and models: pillow-drawn shapes, a small CNN, a tiny transformer LM.

Everything is generated locally from a seed (no downloads) and small enough to train on two
CPU cores in seconds.
"""

from __future__ import annotations

import math
import sys
import time

import numpy as np
import torch
from torch import nn

SHAPES = ("circle", "square", "triangle", "cross")


def _draw(draw, kind: str, cx: float, cy: float, r: float, color) -> None:
    if kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
    elif kind == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=color)
    elif kind == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=color)
    else:  # cross
        w = max(1.0, r / 3)
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=color)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=color)


def shapes_dataset(n: int, size: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` RGB images of one coloured shape each, drawn with pillow, and their labels.

    Returns ``x`` float32 ``(n, 3, size, size)`` in [0, 1] and ``y`` int64 ``(n,)`` indexing
    :data:`SHAPES`.

    Example::

        x, y = shapes_dataset(256)  # (256, 3, 32, 32), (256,)
    """
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    labels = rng.integers(0, len(SHAPES), size=n)
    for i in range(n):
        bg = tuple(int(v) for v in rng.integers(0, 70, size=3))
        img = Image.new("RGB", (size, size), bg)
        r = rng.uniform(size * 0.18, size * 0.32)
        cx, cy = rng.uniform(r + 1, size - r - 1, size=2)
        color = tuple(int(v) for v in rng.integers(120, 256, size=3))
        _draw(ImageDraw.Draw(img), SHAPES[labels[i]], cx, cy, r, color)
        images[i] = np.asarray(img)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255)  # (n, 3, size, size)
    return x.contiguous(), torch.from_numpy(labels).long()


class ShapesCNN(nn.Module):
    """Three conv blocks and a linear head: ``(B, 3, 32, 32)`` -> ``(B, len(SHAPES))``."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.conv3 = nn.Conv2d(2 * width, 4 * width, 3, padding=1)
        self.head = nn.Linear(4 * width, len(SHAPES))
        self.pool = nn.MaxPool2d(2)

    def forward(self, x):
        x = self.pool(torch.relu(self.conv1(x)))  # (B, w, 16, 16)
        x = self.pool(torch.relu(self.conv2(x)))  # (B, 2w, 8, 8)
        x = torch.relu(self.conv3(x)).mean((2, 3))  # (B, 4w)
        return self.head(x)


class Attention(nn.Module):
    """Causal multi-head self-attention; ``self.probs`` outputs ``(B, heads, T, T)``."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.probs = nn.Softmax(dim=-1)  # a module, so a probe can snapshot the attention maps

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, c // self.heads).unbind(2)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))  # (B, H, T, D)
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, H, T, T)
        mask = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        att = self.probs(scores.masked_fill(~mask, float("-inf")))
        return self.proj((att @ v).transpose(1, 2).reshape(b, t, c))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TinyLM(nn.Module):
    """A small GPT-style LM: ``(B, T)`` token ids -> ``(B, T, vocab)`` logits."""

    def __init__(self, vocab: int = 32, dim: int = 64, heads: int = 4, layers: int = 2, ctx=64):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(ctx, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, idx):
        t = idx.shape[1]
        x = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))  # (B, T, C)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


def counting_batch(b: int, t: int, vocab: int, generator: torch.Generator) -> torch.Tensor:
    """``(b, t + 1)`` sequences ``start + stride * i (mod vocab)``: next-token prediction that
    a tiny transformer learns in a few hundred steps by attending to earlier tokens."""
    start = torch.randint(0, vocab, (b, 1), generator=generator)
    stride = torch.randint(1, 5, (b, 1), generator=generator)
    return (start + stride * torch.arange(t + 1)) % vocab


class Progress:
    """A one-line text progress bar on stderr (no dependency)."""

    def __init__(self, total: int, label: str, width: int = 28):
        self.total, self.label, self.width = total, label, width
        self.t0 = time.perf_counter()
        self._tty = sys.stderr.isatty()

    def update(self, done: int, note: str = "") -> None:
        if not self._tty and done not in (self.total,) and done % max(1, self.total // 4):
            return  # not a terminal: a few lines, not hundreds
        filled = self.width * done // self.total
        bar = "#" * filled + "." * (self.width - filled)
        secs = time.perf_counter() - self.t0
        line = f"{self.label:<24} [{bar}] {done:4d}/{self.total} {secs:5.1f}s {note}"
        end = "\n" if done == self.total or not self._tty else ""
        sys.stderr.write(("\r" if self._tty else "") + line + end)
        sys.stderr.flush()
