"""One step's device results in one buffer, copied to the host without a sync.

:func:`pack` concatenates every result of a step into a single uint8 device buffer (a float64
section, then the uint8 thumbnails), starts a non-blocking copy into pinned host memory and
records a CUDA event. :meth:`Pending.ready` asks the event (never waits); :meth:`Pending.decode`
turns the landed bytes into numpy arrays keyed as they were packed. Results that are host
tensors already (the probe on CPU tensors) skip the buffer: :meth:`Pending.on_host` keeps them
and ``decode`` reads each.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import numpy as np
import torch

# The packed host buffers handed to numpy once their copy has landed (tests exclude them when
# counting host syncs: reading them is not one).
HOST_BUFFERS: weakref.WeakSet = weakref.WeakSet()


@dataclass
class Packer:
    """Collects named device tensors of one step; :meth:`finish` packs them."""

    f64: list = field(default_factory=list)  # (key, tensor)
    u8: list = field(default_factory=list)

    def add(self, key, t: torch.Tensor) -> None:
        (self.u8 if t.dtype == torch.uint8 else self.f64).append((key, t))

    def finish(self, step: int, meta) -> Pending | None:
        if not self.f64 and not self.u8:
            return None
        dev = (self.f64 or self.u8)[0][1].device
        if dev.type == "cpu" and all(t.device.type == "cpu" for _, t in self.f64 + self.u8):
            return Pending.on_host(step, meta, self.f64 + self.u8)
        layout, parts, off = [], [], 0
        for key, t in self.f64:
            flat = t.detach().reshape(-1).to(device=dev, dtype=torch.float64)
            layout.append((key, "f8", off, tuple(t.shape)))
            parts.append(flat)
            off += flat.numel() * 8
        buf = [torch.cat(parts).view(torch.uint8)] if parts else []
        for key, t in self.u8:
            layout.append((key, "u1", off, tuple(t.shape)))
            buf.append(t.detach().reshape(-1).to(dev))
            off += t.numel()
        data = torch.cat(buf) if len(buf) > 1 else buf[0]
        return Pending(step, meta, layout, data)


class Pending:
    """A packed step on its way to the host."""

    __slots__ = ("_data", "_event", "_host", "_parts", "layout", "meta", "step")

    def __init__(self, step, meta, layout, data: torch.Tensor | None):
        self.step, self.meta, self.layout = step, meta, layout
        self._event = None
        self._data = None
        self._parts = None
        if data is None:
            self._host = None
            return
        if data.device.type == "cuda":
            self._host = torch.empty(data.shape, dtype=torch.uint8, pin_memory=True)
            self._host.copy_(data, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record(torch.cuda.current_stream(data.device))
        elif data.device.type == "cpu":
            self._host = data
        else:  # other accelerators: moved when decoded
            self._host, self._data = None, data

    @classmethod
    def on_host(cls, step, meta, parts: list) -> Pending:
        """A step whose results ``[(key, tensor)]`` are host tensors already (the probe on
        CPU tensors): nothing to pack or copy to the host, each read as it is at decode."""
        p = cls(step, meta, [], None)
        p._parts = parts
        return p

    def ready(self) -> bool:
        """True once the host copy has landed; never waits."""
        return self._event is None or self._event.query()

    def wait(self) -> None:
        """Block until the copy has landed (for ``detach``/``close`` only)."""
        if self._event is not None:
            self._event.synchronize()

    def decode(self) -> dict:
        """``{key: np.ndarray}`` from the landed host bytes (call after :meth:`ready`)."""
        if self._parts is not None:
            return _host_arrays(self._parts)
        host = self._host
        if host is None:
            host = self._data.cpu()  # sync-ok: rare non-CUDA accelerator, after the step
        HOST_BUFFERS.add(host)
        raw = host.numpy()  # sync-ok: a host buffer whose copy has completed
        out = {}
        for key, kind, off, shape in self.layout:
            n = int(np.prod(shape, dtype=np.int64))
            arr = raw[off : off + 8 * n].view(np.float64) if kind == "f8" else raw[off : off + n]
            out[key] = arr.reshape(shape).copy()
        return out


def _host_arrays(parts: list) -> dict:
    """``{key: np.ndarray}`` of host tensors: float64 (uint8 for images) copies."""
    out = {}
    for key, t in parts:
        t = t.detach()
        if t.dtype not in (torch.float64, torch.uint8):
            t = t.to(torch.float64)
        HOST_BUFFERS.add(t)
        out[key] = t.numpy().copy()  # sync-ok: a host tensor (the probe on CPU tensors)
    return out
