"""Which implementation a kernel call uses: Triton for CUDA tensors, the torch reference (or the
host path) otherwise; ``TBPROBE_KERNELS=torch|triton`` forces one, read at each call."""

from __future__ import annotations

import functools
import os

import torch

_CHOICES = ("", "auto", "torch", "triton")


@functools.lru_cache(maxsize=1)
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def forced() -> str:
    """``"torch"``, ``"triton"`` or ``""`` from ``TBPROBE_KERNELS`` (ValueError otherwise)."""
    value = os.environ.get("TBPROBE_KERNELS", "").strip().lower()
    if value not in _CHOICES:
        raise ValueError(f"TBPROBE_KERNELS: expected 'torch' or 'triton', got {value!r}")
    return "" if value == "auto" else value


def use_triton(device: torch.device) -> bool:
    """True when a call on ``device`` should launch the Triton kernels."""
    choice = forced()
    if choice == "torch":
        return False
    if choice == "triton":
        return True
    return device.type == "cuda" and _triton_importable()
