"""Turning what users log (Python numbers, numpy arrays, torch tensors) into host arrays.

torch is never imported here: a value can only be a tensor if torch is already loaded.
"""

from __future__ import annotations

import numbers
import sys

import numpy as np

_NUMERIC_KINDS = "biuf"  # bool, signed, unsigned, float


def _torch():
    return sys.modules.get("torch")


def is_tensor(value) -> bool:
    torch = _torch()
    return torch is not None and isinstance(value, torch.Tensor)


def is_device_tensor(value) -> bool:
    """True for a torch tensor that does not live in host memory (CUDA, XPU, MPS, ...)."""
    return is_tensor(value) and value.device.type not in ("cpu", "meta")


def widen_tensor(t, name: str):
    """A detached tensor with a dtype numpy understands, converted exactly.

    bf16 and fp8 go to fp32 (exact), never through fp16; complex raises TypeError.
    """
    torch = _torch()
    t = t.detach()
    if t.is_complex():
        raise TypeError(f"{name}: complex tensors are not supported (got dtype {t.dtype})")
    if t.dtype in (torch.bfloat16,) or "float8" in str(t.dtype):
        t = t.float()
    elif t.dtype in (torch.uint16, torch.uint32, torch.uint64):
        t = t.to(torch.int64) if t.dtype != torch.uint64 else t.double()
    if t.is_conj() or t.is_neg():
        t = t.resolve_conj().resolve_neg()
    return t


def to_numpy(value, name: str) -> np.ndarray:
    """A host numpy array with the value's elements (numbers, sequences, arrays, tensors).

    Raises TypeError naming ``name`` for anything that is not numeric. A device tensor is
    copied to the host here, which waits for the device: hot paths defer instead.
    """
    if is_tensor(value):
        t = widen_tensor(value, name)
        if t.device.type != "cpu":
            t = t.cpu()  # sync-ok: callers on the training thread defer device tensors
        return t.numpy()
    if isinstance(value, np.ndarray):
        arr = value
    elif isinstance(value, (numbers.Number, np.generic)) and not isinstance(value, str):
        arr = np.asarray(value)
    elif isinstance(value, (list, tuple)):
        try:
            arr = np.asarray(value)
        except (ValueError, TypeError) as e:
            raise TypeError(f"{name}: expected a numeric sequence ({e})") from None
    else:
        raise TypeError(
            f"{name}: expected a number, numpy array or torch tensor, got {type(value).__name__}"
        )
    if arr.dtype.kind not in _NUMERIC_KINDS:
        raise TypeError(f"{name}: expected numeric values, got dtype {arr.dtype}")
    return arr


def to_float(value, name: str) -> float:
    """One Python float from a number, a one-element array or a one-element host tensor."""
    if type(value) is float or type(value) is int:
        return float(value)
    if isinstance(value, bool):
        return float(value)
    arr = to_numpy(value, name)
    if arr.size != 1:
        raise ValueError(f"{name}: expected a single value, got shape {tuple(arr.shape)}")
    return float(arr.reshape(()))


def check_int(value, name: str, minimum: int) -> int:
    """``value`` as a Python int: any integral number (``int``, numpy integers; not bool) that is
    at least ``minimum``. Raises TypeError or ValueError naming ``name``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    n = int(value)
    if n < minimum:
        raise ValueError(f"{name}: must be >= {minimum}, got {n}")
    return n
