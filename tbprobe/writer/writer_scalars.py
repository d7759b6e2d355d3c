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
from tbprobe.writer.naming import INT64_MAX, INT64_MIN, clean_tag, safe_subdir
from tbprobe.writer.record import (
    event_bytes,
    scalar_event,
    scalar_field_head,
    scalar_head,
    scalar_values,
)

_time = time.time  # bound once: add_scalar's hot path


class _DeferredScalar(Deferred):
    __slots__ = ("copy", "head", "row", "step", "wall")

    def __init__(self, copy, head, wall, step, row=None):
        self.copy, self.head, self.wall, self.step = copy, head, wall, step
        self.row = row  # an add_scalars ``scalar_dict`` row whose value is this scalar

    def resolve(self) -> bytes:
        (arr,) = self.copy.arrays()
        value = float(arr.reshape(()))
        if self.row is not None:
            self.row[2] = value
        return scalar_event(self.head, value, self.wall, self.step)


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
        if self.log_freq != 1 and self._skip(global_step):
            return
        head = self._scalar_head.get(tag)
        if head is None:
            head = self._scalar_head[tag] = scalar_head(clean_tag(tag))
        if (
            type(global_step) is int
            and INT64_MIN <= global_step <= INT64_MAX
            and walltime is None
            and self._defaults is None
        ):
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
        if self.log_freq != 1 and self._skip(global_step):
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

    def _put_device_scalar(self, head, tensor, wall, step, key=None, row=None) -> None:
        """Queue a device scalar without waiting for it: a non-blocking copy to the host,
        framed on the writer thread, which also stores the value in ``row[2]`` (if given;
        until then ``row[2]`` is the copy)."""
        import torch

        if tensor.numel() != 1:
            raise ValueError(
                f"scalar_value: expected a single value, got shape {tuple(tensor.shape)}"
            )
        if tensor.is_complex():
            raise TypeError(f"scalar_value: complex tensors are not supported ({tensor.dtype})")
        from tbprobe.writer.device import host_copy

        copy = host_copy([tensor.detach().reshape(()).to(torch.float64)])
        if row is not None:
            row[2] = copy
        self._put(key, _DeferredScalar(copy, head, wall, step, row), 64)

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
            key = safe_subdir(self._logdir, [main_tag, sub], "tag_scalar_dict")
            row = [wall, step, None]
            if _values.is_device_tensor(value):  # as add_scalar: no sync, framed later
                self._put_device_scalar(head, value, wall, step, key, row)
                self._scalar_pending.append(row)
            else:
                row[2] = _values.to_float(value, f"tag_scalar_dict[{sub!r}]")
                data = scalar_event(head, row[2], wall, step)
                self._put(key, data, len(data))
            self._sub_writer(key)
            self._scalar_dict.setdefault(os.path.join(self._logdir, main_tag, sub), []).append(row)

    @property
    def scalar_dict(self) -> dict[str, list]:
        """What ``add_scalars`` logged, ``{run/tag: [[walltime, step, value], ...]}`` (as in
        tensorboardX). Values of device tensors are read here, waiting for their copies."""
        pending = self._scalar_pending
        for row in pending:
            copy = row[2]
            if type(copy) is not float:  # the writer thread has not written it yet
                (arr,) = copy.arrays()
                row[2] = float(arr.reshape(()))
        pending.clear()
        return self._scalar_dict

    @scalar_dict.setter
    def scalar_dict(self, value: dict) -> None:
        self._scalar_dict = value
        self._scalar_pending: list[list] = []  # rows whose value is a device scalar

    def export_scalars_to_json(self, path):
        """Write what ``add_scalars`` logged, ``{run/tag: [[walltime, step, value], ...]}``, to
        ``path`` as JSON, then forget it (as tensorboardX does)."""
        with open(path, "w") as f:
            json.dump(self.scalar_dict, f)
        self.scalar_dict = {}
