"""The cases bench_kernels.py times and how each result is checked: the inputs (``make``,
the model's gradients), their labels, and the untimed checks against float64 references."""

from __future__ import annotations

import os
from unittest import mock

import numpy as np
import torch

from tbprobe import kernels
from tbprobe.kernels import reference
from tbprobe.kernels.thumbnail import thumbnail_reference

MiB = 1 << 20
DTYPE_NAME = {torch.float32: "fp32", torch.bfloat16: "bf16"}
EDGES = np.linspace(-4.0, 4.0, 101)
BINS = [("tensorflow", "tensorflow", 1548), ("64", 64, 64), ("100 edges", EDGES, 100)]
TBX_MAX_NUMEL = 1 << 25  # the tensorboardX path takes seconds per call beyond this
CHECK_SLICE = 1 << 20  # on CPU, exact counts are compared on this many elements


def forced_backend(name: str):
    """``TBPROBE_KERNELS`` (read at each kernel call) set for a ``with`` block."""
    return mock.patch.dict(os.environ, {"TBPROBE_KERNELS": name})


def make(shape, dtype, device, seed: int = 0) -> torch.Tensor:
    """Standard normal values with every 4099th element an exact zero."""
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=dtype, device=device)
    x.view(-1)[::4099] = 0
    return x


def label(dtype, n) -> str:
    return f"({n:,},) {DTYPE_NAME[dtype]}, {n * dtype.itemsize / MiB:.3g} MiB"


def check_stats(tensors, rows: torch.Tensor) -> str:
    """``rows`` against float64 torch on the device: exact counts/extrema, sums to 1e-5."""
    got = rows.cpu()
    for i, t in enumerate(tensors):
        x = t.detach().reshape(-1).double()  # (n,)
        mn, mx = torch.aminmax(x)
        zero = torch.zeros((), dtype=torch.float64, device=x.device)
        exp = torch.stack(
            [zero + x.numel(), x.sum(), (x * x).sum(), mn, mx, torch.maximum(-mn, mx)]
            + [zero, zero, zero, (x == 0).sum().double(), x.abs().sum()]
        ).cpu()
        for j, name in enumerate(kernels.STAT_NAMES):
            tol = 1e-5 * float(exp[10] if name == "sum" else exp[j]) if j in (1, 2) else 0.0
            if abs(float(got[i, j]) - float(exp[j])) > tol:
                return f"WRONG: tensor {i} {name} {float(got[i, j])!r} != {float(exp[j])!r}"
    return "ok"


def check_hist(x, h, bins, full: bool, tbx_counts=None) -> str:
    """Counts sum, numpy's linear edges, exact counts vs the torch reference and tensorboardX."""
    flat = x.reshape(-1)
    if isinstance(bins, np.ndarray):
        expected = int(((flat >= bins[0]) & (flat <= bins[-1])).sum())
    else:
        expected = flat.numel()
    total = int(h.counts.sum())
    if total != expected:
        return f"WRONG: counts sum {total} != {expected}"
    part = flat if full else flat[:CHECK_SLICE]
    hp = h if part.numel() == flat.numel() else kernels.histogram(part, bins)
    if isinstance(bins, int):
        mn, mx = (float(v) for v in torch.aminmax(part.double()))
        if not np.array_equal(hp.edges.cpu().numpy(), np.linspace(mn, mx, bins + 1)):
            return "WRONG: linear edges differ from numpy's"
    ref = reference.bin_counts(part, hp.edges.to(part.device))
    if not torch.equal(hp.counts, ref):
        return f"WRONG: {int((hp.counts != ref).sum())} bins differ from the torch reference"
    if tbx_counts is not None and not np.array_equal(tbx_counts, h.counts.cpu().numpy()):
        return "WRONG: counts differ from tensorboardX's np.histogram"
    return "ok"


def check_thumbnail(x, img, kind) -> str:
    ref = thumbnail_reference(x, kind=kind)
    if img.shape != ref.shape:
        return f"WRONG: shape {tuple(img.shape)} != {tuple(ref.shape)}"
    diff = int((img.int() - ref.int()).abs().max())
    return "ok" if diff <= 1 else f"WRONG: {diff} grey levels off the reference"


def model_shapes(d: int, ffn: int, layers: int, vocab: int) -> list[tuple[int, ...]]:
    """A llama-like model: embedding, per layer 2 norms + q/k/v/o + gate/up/down, head."""
    layer = [(d,), (d, d), (d, d), (d, d), (d, d), (d,), (ffn, d), (ffn, d), (d, ffn)]
    return [(vocab, d)] + layer * layers + [(d,), (vocab, d)]


def model_grads(model: tuple, device) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The flat bf16 gradient buffer of ``model_shapes(*model)`` (like DDP/FSDP's) and its
    views."""
    shapes = model_shapes(*model)
    sizes = [int(np.prod(s)) for s in shapes]
    flat = make((sum(sizes),), torch.bfloat16, device, seed=2)
    return flat, [g.view(s) for g, s in zip(flat.split(sizes), shapes, strict=True)]
