"""The probe's optional collaborators: an AMP grad scaler, the diagnosis, snapshot requests.

The diagnosis (``tbprobe.probe.diagnosis``) and the request watcher
(``tbprobe.probe.requests``) are imported lazily; a probe without them still records.
"""

from __future__ import annotations

import os

import torch

_POWERS: dict[torch.device, torch.Tensor] = {}


def _powers(device: torch.device) -> torch.Tensor:
    """How each ``kernels.STAT_NAMES`` column scales with the gradient: ``scale ** p``."""
    p = _POWERS.get(device)
    if p is None:  # built on the device: a copy from pageable host memory would sync
        cols = torch.arange(10, device=device)
        p = (cols >= 1).double() + (cols == 2).double() - (cols >= 6).double()
        _POWERS[device] = p
    return p


def _enabled(scaler) -> bool:
    is_enabled = getattr(scaler, "is_enabled", None)
    return not callable(is_enabled) or bool(is_enabled())


class AmpScale:
    """Unscales gradient statistics by ``scaler._scale`` on the device (no ``get_scale()``,
    which syncs), unless the scaler already unscaled the gradients in place."""

    def __init__(self, scaler, optimizer):
        if scaler is not None and not (  # a disabled GradScaler has no _scale: no scaling
            callable(getattr(scaler, "update", None))
            and (hasattr(scaler, "_scale") or not _enabled(scaler))
        ):
            raise TypeError(f"scaler: expected a torch.amp.GradScaler, got {type(scaler).__name__}")
        self.scaler, self.optimizer = scaler, optimizer

    @property
    def enabled(self) -> bool:
        s = self.scaler
        return s is not None and bool(s.is_enabled())

    def _grads_unscaled(self) -> bool:
        from torch.amp.grad_scaler import OptState

        states = self.scaler._per_optimizer_states
        if self.optimizer is not None:
            st = states.get(id(self.optimizer))
            return st is not None and st["stage"] is not OptState.READY
        return any(st["stage"] is not OptState.READY for st in states.values())

    def scale(self) -> torch.Tensor | None:
        """The device scale the gradients still carry, or None."""
        if not self.enabled or self.scaler._scale is None or self._grads_unscaled():
            return None
        return self.scaler._scale

    def unscale(self, rows: torch.Tensor) -> torch.Tensor:
        """Stats rows ``(P, 10)`` of scaled gradients -> rows of the unscaled ones."""
        s = self.scale()
        if s is None:
            return rows
        inv = s.to(rows.device, torch.float64).reciprocal()  # (1,)
        return rows * inv.pow(_powers(rows.device))

    def unscaled(self, tensors):
        """The gradients divided by the scale (copies), or the tensors themselves."""
        s = self.scale()
        if s is None:
            return list(tensors)
        return torch._foreach_div(list(tensors), s.reshape(()))

    def loss_scale(self) -> torch.Tensor | None:
        """The scaler's device scale of this step (before its update), or None."""
        if not self.enabled or self.scaler._scale is None:
            return None
        return self.scaler._scale

    def found_inf(self) -> torch.Tensor | None:
        """A device ``()`` count of the devices on which the scaler found Inf/NaN gradients
        this step (> 0: it skipped the optimizer step), or None when it has not checked."""
        if not self.enabled:
            return None
        states = self.scaler._per_optimizer_states
        if self.optimizer is not None:
            st = states.get(id(self.optimizer))
            states = [] if st is None else [st]
        else:
            states = list(states.values())
        found = [v for st in states for v in st["found_inf_per_device"].values()]
        if not found:
            return None
        dev = found[0].device
        total = found[0].double()
        for v in found[1:]:
            total = total + v.to(dev, torch.float64, non_blocking=True)
        return total

    # ---------------------------------------------------------------- boundary
    def wrap_update(self, close, after) -> None:
        """Make ``scaler.update()`` the step boundary: ``close()`` before the scale changes,
        ``after()`` (which may raise) once it has."""
        orig = self.scaler.update

        def update(*args, **kwargs):
            close()
            result = orig(*args, **kwargs)
            after()
            return result

        self.scaler.update = update

    def unwrap_update(self) -> None:
        if self.scaler is not None and "update" in vars(self.scaler):
            del self.scaler.update


def make_diagnosis(diagnosis):
    """The diagnosis to feed: the given object, the built-in one, or None."""
    if diagnosis is False:
        return None
    if diagnosis is not None:
        if not callable(getattr(diagnosis, "feed", None)):
            raise TypeError(
                f"diagnosis: expected an object with feed(record), got {type(diagnosis).__name__}"
            )
        return diagnosis
    try:
        from tbprobe.probe.diagnosis import Diagnosis
    except ModuleNotFoundError as exc:
        if exc.name != "tbprobe.probe.diagnosis":
            raise
        return None
    return Diagnosis()


def make_watcher(writer, enabled: bool):
    """A started ``RequestWatcher`` on the writer's log dir, or None."""
    if not enabled or not callable(getattr(writer, "get_logdir", None)):
        return None
    logdir = writer.get_logdir()
    if not os.path.isdir(logdir):  # e.g. write_to_disk=False: no run to send requests to
        return None
    try:
        from tbprobe.probe.requests import RequestWatcher
    except ModuleNotFoundError as exc:
        if exc.name != "tbprobe.probe.requests":
            raise
        return None
    watcher = RequestWatcher(logdir)
    watcher.start()
    return watcher
