"""The models bench_probe.py trains under every configuration: plain torch modules with random
init, nothing downloaded.

CPU: a small GPT-style transformer LM and a small CNN, fp32 (``quick``: smaller ones). CUDA: a
GPT-2-small-sized LM (12 layers, 768 wide, 12 heads, vocab 50257, tied head; 12 × 1024 tokens
a step), parameters and gradients in bf16, eager. Each model comes with its AdamW optimizer,
4 fixed batches and its loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x):  # (B, T, C)
        b, t, c = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, c // self.heads).unbind(2)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))  # (B, H, T, C/H)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, C/H)
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(d), Attention(d, heads)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(approximate="tanh"))
        self.mlp.append(nn.Linear(4 * d, d))

    def forward(self, x):  # (B, T, C)
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """A GPT-2-style LM: token + position embeddings, pre-norm blocks, tied LM head."""

    def __init__(self, *, vocab: int, seq: int, d: int, layers: int, heads: int):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(seq, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.wte.weight
        for m in self.modules():
            if isinstance(m, nn.Linear | nn.Embedding):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, idx):  # (B, T) int64
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(pos)  # (B, T, C)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))  # (B, T, vocab)


def cnn(widths: tuple[int, ...], classes: int = 10) -> nn.Module:
    """Conv-BN-ReLU stages (stride 2 after the first), global average pool, linear head."""
    layers, c_in = [], 3
    for i, c in enumerate(widths):
        layers += [nn.Conv2d(c_in, c, 3, stride=1 if i == 0 else 2, padding=1, bias=False)]
        layers += [nn.BatchNorm2d(c), nn.ReLU()]
        c_in = c
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, classes))


def lm_loss(logits, y):  # (B, T, V), (B, T)
    return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())


@dataclass(kw_only=True)
class Model:
    name: str
    desc: str
    module: nn.Module
    opt: torch.optim.Optimizer
    batches: list[tuple[torch.Tensor, torch.Tensor]]
    loss_fn: object


def build_models(device: torch.device, quick: bool) -> list[Model]:
    gen = torch.Generator(device=device).manual_seed(0)
    torch.manual_seed(0)
    if device.type == "cuda":  # GPT-2 small
        lms = [("GPT-2 small", dict(vocab=50257, seq=1024, d=768, layers=12, heads=12), 12)]
        dtype = torch.bfloat16
    else:
        lm = dict(vocab=1024, seq=64, d=128, layers=1, heads=4) if quick else None
        lm = lm or dict(vocab=4096, seq=128, d=256, layers=4, heads=4)
        lms, dtype = [("transformer LM", lm, 4 if quick else 8)], torch.float32
    models = []
    for name, cfg, batch in lms:
        module = GPT(**cfg).to(device, dtype)
        x = torch.randint(cfg["vocab"], (4, batch, cfg["seq"] + 1), device=device, generator=gen)
        batches = [(b[:, :-1], b[:, 1:]) for b in x]  # (B, T) inputs, (B, T) targets
        desc = f"{cfg['layers']} layers × {cfg['d']}, {batch}×{cfg['seq']} tokens"
        models.append(Model(name=name, desc=desc, module=module, opt=None, batches=batches,
                            loss_fn=lm_loss))  # fmt: skip
    if device.type != "cuda":
        widths, batch = ((16, 32), 16) if quick else ((32, 64, 128), 32)
        module = cnn(widths).to(device)
        x = torch.randn(4, batch, 3, 32, 32, device=device, generator=gen)
        y = torch.randint(10, (4, batch), device=device, generator=gen)
        desc = f"{len(widths)} conv stages {widths}, {batch}×3×32×32"
        models.append(
            Model(
                name="CNN",
                desc=desc,
                module=module,
                opt=None,
                batches=list(zip(x, y, strict=True)),
                loss_fn=F.cross_entropy,
            )
        )
    for m in models:
        m.module.train()
        m.opt = torch.optim.AdamW(m.module.parameters(), lr=1e-4)
        n = sum(p.numel() for p in m.module.parameters())
        m.desc = f"{n / 1e6:.3g}M params, {m.desc}, {str(dtype).split('.')[-1]}"
    return models


def train(model: Model, n: int, after_step=None) -> None:
    """``n`` optimizer steps over ``model``'s batches; ``after_step`` after each ``opt.step()``,
    before ``zero_grad``."""
    for i in range(n):
        x, y = model.batches[i % len(model.batches)]
        loss = model.loss_fn(model.module(x), y)
        loss.backward()
        model.opt.step()
        if after_step is not None:
            after_step()
        model.opt.zero_grad(set_to_none=True)
