"""``add_scalar``, ``add_scalars`` and ``export_scalars_to_json``: a mixin of ``SummaryWriter``.

``add_scalar`` is the hot path: a host number is framed on the calling thread from a cached
per-tag header; a device scalar is copied to the host without waiting and framed on the
writer thread.
"""

from __future__ import annotations

import json
import os
import time

from tbprobe.writer import values as _values
from tbprobe.writer.event_file import Deferred
from tbprobe.writer.naming import clean_tag, safe_subdir
from tbprobe.writer.record import (
    event_bytes,
    scalar_event,
    scalar_field_head,
    scalar_head,
    scalar_values,
)

_time = time.time  # bound once: add_scalar's hot path


class _DeferredScalar(Deferred):
    __slots__ = ("copy", "head", "step", "wall")

    def __init__(self, copy, head, wall, step):
        self.copy, self.head, self.wall, self.step = copy, head, wall, step

    def resolve(self) -> bytes:
        (arr,) = self.copy.arrays()
        return scalar_event(self.head, float(arr.reshape(())), self.wall, self.step)


class ScalarMixin:
    # ------------------------------------------------------------------ scalars
    def add_scalar(
        self,
        tag: str,
        scalar_value,
        global_step: int | None = None,
        walltime: float | None = None,
        display_name: str = "",
        summary_description: str = "",
    ):
        """Add one scalar: a number, or a one-element array or tensor on any device.

        Examples::

            writer.add_scalar("train/loss", loss, step)   # loss may be a CUDA tensor
        """
        if global_step is not None and self.log_freq != 1 and global_step % self.log_freq:
            return
        head = self._scalar_head.get(tag)
        if head is None:
            head = self._scalar_head[tag] = scalar_head(clean_tag(tag))
        if type(global_step) is int and walltime is None and self._defaults is None:
            step, wall = global_step, _time()  # the common case, checked cheaply
        else:
            step, wall = self._step_wall(global_step, walltime)
        if display_name or summary_description:
            self._add_scalar_with_metadata(
                tag, scalar_value, step, wall, display_name, summary_description
            )
            return
        t = type(scalar_value)
        if t is float or t is int:
            data = scalar_event(head, scalar_value, wall, step)
        elif _values.is_device_tensor(scalar_value):
            self._put_device_scalar(head, scalar_value, wall, step)
            return
        else:
            data = scalar_event(head, _values.to_float(scalar_value, "scalar_value"), wall, step)
        w = self._writer
        if w is not None:
            w.put(None, data, len(data))
        else:
            self._put(None, data, len(data))

    def _add_scalar_batch(self, tags: list[str], values, global_step: int | None = None) -> None:
        """Many host scalars of one step as ONE event (a ``Summary`` with a value per tag):
        the probe's per-step tags, at a fraction of a call per scalar. Readers see the same
        scalars as from one :meth:`add_scalar` per tag."""
        if global_step is not None and self.log_freq != 1 and global_step % self.log_freq:
            return
        if len(tags) != len(values):
            raise ValueError(f"values: expected {len(tags)} values, got {len(values)}")
        if not tags:
            return
        step, wall = self._step_wall(global_step, None)
        cache = self._scalar_field
        heads = []
        for tag in tags:
            h = cache.get(tag)
            if h is None:
                h = cache[tag] = scalar_field_head(clean_tag(tag))
            heads.append(h)
        data = event_bytes(wall, step, scalar_values(heads, values))
        self._put(None, data, len(data))

    def _put_device_scalar(self, head, tensor, wall, step) -> None:
        import torch

        if tensor.numel() != 1:
            raise ValueError(
                f"scalar_value: expected a single value, got shape {tuple(tensor.shape)}"
            )
        if tensor.is_complex():
            raise TypeError(f"scalar_value: complex tensors are not supported ({tensor.dtype})")
        from tbprobe.writer.device import host_copy

        copy = host_copy([tensor.detach().reshape(()).to(torch.float64)])
        self._put(None, _DeferredScalar(copy, head, wall, step), 64)

    def _add_scalar_with_metadata(self, tag, value, step, wall, display_name, description):
        from tbprobe.writer.proto import summary_pb2

        for arg, v in (("display_name", display_name), ("summary_description", description)):
            if not isinstance(v, str):
                raise TypeError(f"{arg}: expected a str, got {type(v).__name__}")
        v = summary_pb2.Summary.Value(tag=clean_tag(tag))
        v.simple_value = _values.to_float(value, "scalar_value")
        v.metadata.display_name = display_name
        v.metadata.summary_description = description
        self._emit([v], step, wall)

    def add_scalars(
        self,
        main_tag: str,
        tag_scalar_dict: dict,
        global_step: int | None = None,
        walltime: float | None = None,
    ):
        """Several scalars in one chart: each ``tag`` goes to the sub-run ``main_tag/tag``.

        Examples::

            writer.add_scalars("loss", {"train": 0.5, "val": 0.7}, step)
        """
        if self._skip(global_step):
            return
        if not isinstance(tag_scalar_dict, dict):
            raise TypeError(
                f"tag_scalar_dict: expected a dict, got {type(tag_scalar_dict).__name__}"
            )
        step, wall = self._step_wall(global_step, walltime)
        head = scalar_head(clean_tag(main_tag, "main_tag"))
        for sub, value in tag_scalar_dict.items():
            key = safe_subdir(self.logdir, [main_tag, sub], "tag_scalar_dict")
            if _values.is_device_tensor(value):
                raise TypeError(
                    "tag_scalar_dict: device tensors are not accepted here (they would need a "
                    "sync for export_scalars_to_json); pass floats or use add_scalar"
                )
            v = _values.to_float(value, f"tag_scalar_dict[{sub!r}]")
            data = scalar_event(head, v, wall, step)
            self._put(key, data, len(data))
            self.scalar_dict.setdefault(os.path.join(self.logdir, main_tag, sub), []).append(
                [wall, step, v]
            )

    def export_scalars_to_json(self, path):
        """Write what ``add_scalars`` logged, ``{run/tag: [[walltime, step, value], ...]}``, to
        ``path`` as JSON, then forget it (as tensorboardX does)."""
        with open(path, "w") as f:
            json.dump(self.scalar_dict, f)
        self.scalar_dict = {}
