"""Snapshots: arming them, the thumbnail of one activation, and its image for TensorBoard."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import numpy as np
import torch

from tbprobe import kernels


@dataclass
class _Armed:
    names: frozenset
    steps: int


_ATTENTION_WORDS = ("attn", "attention", "prob", "softmax", "score")


def _looks_like_attention(x: torch.Tensor, name: str) -> bool:
    """A ``(B, heads, T, S)`` map from a module whose name says attention (``attn.probs``,
    ``attention.softmax``, ...): drawn as a grid of heads, not of channels."""
    tail = name.lower().rsplit(".", 2)[-2:]
    return x.ndim == 4 and any(w in part for part in tail for w in _ATTENTION_WORDS)


def _thumb_input(x: torch.Tensor, name: str = "") -> tuple[torch.Tensor, str]:
    """A 2-D, 3-D or 4-D view of ``x`` and the thumbnail kind that suits it."""
    x = x.detach()
    if _looks_like_attention(x, name):
        return x, "attention"
    if x.ndim <= 1:
        return x.reshape(1, -1), "heatmap"
    if x.ndim == 2:
        return x, "heatmap"
    if x.ndim == 3:
        return x, "sequence"
    if x.ndim > 4:
        x = x.reshape(*x.shape[:3], -1)
    if x.shape[2] * x.shape[3] == 1:  # (B, C, 1, 1): one pixel per map, blank as tiles
        return x.reshape(x.shape[0], -1), "heatmap"  # samples x channels
    return x, "conv"


class Snapshots:
    """Armed snapshot requests of one probe; :meth:`take` says what the next step captures."""

    def __init__(self, cfg, module_names: list[str]):
        self.cfg = cfg
        self.names = list(module_names)
        self._armed: list[_Armed] = []

    def resolve(self, modules, *, strict: bool, arg: str = "modules") -> frozenset:
        """Hooked module names matching ``modules`` (globs, or names of parameters whose
        module is hooked); None means all. ``strict``: a glob matching nothing raises."""
        if modules is None:
            return frozenset(self.names)
        if isinstance(modules, str):
            modules = [modules]
        try:
            modules = list(modules)
        except TypeError:
            raise TypeError(
                f"{arg}: expected a glob or a list of globs, got {type(modules).__name__}"
            ) from None
        out = set()
        for g in modules:
            if not isinstance(g, str):
                raise TypeError(f"{arg}: expected str globs, got {g!r}")
            hit = [n for n in self.names if fnmatch.fnmatchcase(n, g)]
            parent = g
            while not hit and "." in parent:  # a parameter name: its module
                parent = parent.rsplit(".", 1)[0]
                hit = [n for n in self.names if n == parent]
            if not hit and strict:
                raise ValueError(f"{arg}: {g!r} matches no hooked module")
            out.update(hit)
        return frozenset(out)

    def arm(self, names: frozenset, steps: int) -> None:
        if names:
            self._armed.append(_Armed(names, steps))

    def take(self, step: int) -> frozenset | None:
        """Module names to capture at ``step``, or None; consumes one step of every armed
        request."""
        names = set(self.names) if self.cfg.snapshot_step(step) else set()
        for a in self._armed:
            names |= a.names
            a.steps -= 1
        self._armed = [a for a in self._armed if a.steps > 0]
        return frozenset(names) if names else None

    def pending(self) -> bool:
        return bool(self._armed)

    def capture(self, x: torch.Tensor, name: str = "") -> tuple[torch.Tensor, tuple, str]:
        """``(uint8 (H, W) thumbnail on x's device, x's shape, kind)``; ``name`` (the module's)
        tells attention maps from feature maps."""
        view, kind = _thumb_input(x, name)
        img = kernels.thumbnail(
            view, kind=kind, max_tiles=self.cfg.max_tiles, max_size=self.cfg.thumbnail_size
        )
        return img, tuple(view.shape), kind


def image_for_tensorboard(img: np.ndarray, shape: tuple, kind: str, title: str, cfg):
    """The thumbnail as written: labelled RGB ``(H', W', 3)`` when ``render.py`` is there,
    else the grayscale ``(H, W)``; with its ``dataformats``."""
    try:
        from tbprobe.probe.render import render_snapshot
    except ModuleNotFoundError as exc:
        if exc.name != "tbprobe.probe.render":
            raise
        return img, "HW"
    rgb = render_snapshot(
        img,
        shape=shape,
        kind=kind,
        title=title,
        max_tiles=cfg.max_tiles,
        max_size=cfg.thumbnail_size,
    )
    return rgb, "HWC"
