"""Device results resolved off the training thread.

The training thread reduces a device tensor on its own device, starts a non-blocking copy
into pinned host memory and records a CUDA event; the writer thread waits on the event and
reads the host copy. Nothing here synchronises the caller.
"""

from __future__ import annotations

import numpy as np
import torch


class HostCopy:
    """Non-blocking device-to-host copy of a few small tensors; ``arrays()`` waits for it."""

    __slots__ = ("_event", "_host", "_pending")

    def __init__(self, tensors: list[torch.Tensor]):
        self._event = None
        self._pending = None
        dev = tensors[0].device
        if dev.type == "cuda":
            self._host = []
            for t in tensors:
                h = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                h.copy_(t, non_blocking=True)
                self._host.append(h)
            self._event = torch.cuda.Event()
            self._event.record(torch.cuda.current_stream(dev))
        else:  # other accelerators: keep a private copy, move it on the writer thread
            self._host = None
            self._pending = [t.detach().clone() for t in tensors]

    def arrays(self) -> list[np.ndarray]:
        """The host arrays; called on the writer thread, where waiting is fine."""
        if self._event is not None:
            self._event.synchronize()
            return [h.numpy() for h in self._host]
        if self._pending is not None:
            return [t.cpu().numpy() for t in self._pending]  # sync-ok: writer thread
        return [h.numpy() for h in self._host]


def host_copy(tensors: list[torch.Tensor]) -> HostCopy:
    return HostCopy(tensors)
