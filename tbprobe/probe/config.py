"""The probe's options, validated once, and the schedule derived from them.

A step is *scheduled* (full statistics, tags written) every ``every`` steps, *checked*
(non-finite counts and gradient norms for the diagnosis) every ``check_every`` steps, gets
histograms every ``histogram_every`` steps and thumbnails every ``snapshot_every`` steps or
when a snapshot is armed. A step that is none of these costs the hooks nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

TRACK = ("grads", "params", "acts", "outgrads", "hists")
REACTIONS = ("warn", "raise", "snapshot")


def _positive_int(name: str, value, *, allow_none: bool = False, allow_zero: bool = False):
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    low = 0 if allow_zero else 1
    if value < low:
        raise ValueError(f"{name}: expected an int >= {low}, got {value}")


def _patterns(name: str, value) -> tuple:
    """``modules``/``exclude``: a glob, a module type, or a sequence of them."""
    if value is None:
        return ()
    items = (value,) if isinstance(value, (str, type)) else value
    try:
        items = tuple(items)
    except TypeError:
        raise TypeError(
            f"{name}: expected a glob, an nn.Module type or a sequence of them, "
            f"got {type(value).__name__}"
        ) from None
    for item in items:
        if isinstance(item, str):
            if not item:
                raise ValueError(f"{name}: empty glob")
            continue
        if isinstance(item, type):
            import torch

            if issubclass(item, torch.nn.Module):
                continue
        raise TypeError(f"{name}: expected globs (str) or nn.Module subclasses, got {item!r}")
    return items


@dataclass(kw_only=True)
class ProbeConfig:
    """Validated options of :class:`tbprobe.Probe` (see its docstring for each one).

    Example::

        cfg = ProbeConfig(every=10, histogram_every=100, track=("grads", "acts"))
        cfg.scheduled(20), cfg.histogram_step(20)  # (True, False)
    """

    every: int = 1
    histogram_every: int | None = None
    modules: object = None
    exclude: object = None
    track: object = TRACK
    check_every: int = 1
    on_anomaly: object = "warn"
    snapshot_every: int | None = None
    hist_bins: int = 64
    thumbnail_size: int = 256
    max_tiles: int = 64
    watch_requests: bool = True
    snapshot_signal: bool = False
    start_step: int = 0
    reduce_activations: bool = False
    per_rank: bool = False

    def __post_init__(self):
        _positive_int("every", self.every)
        _positive_int("histogram_every", self.histogram_every, allow_none=True)
        _positive_int("check_every", self.check_every, allow_zero=True)
        _positive_int("snapshot_every", self.snapshot_every, allow_none=True)
        _positive_int("hist_bins", self.hist_bins)
        _positive_int("thumbnail_size", self.thumbnail_size)
        _positive_int("max_tiles", self.max_tiles)
        _positive_int("start_step", self.start_step, allow_zero=True)
        if self.thumbnail_size < 8:
            raise ValueError(
                f"thumbnail_size: expected at least 8 pixels, got {self.thumbnail_size}"
            )
        from tbprobe.kernels.thumbnail import SEP, grid_shape

        side = max(grid_shape(self.max_tiles))  # a pixel per tile at least, and separators
        if self.thumbnail_size < side * (1 + SEP) - SEP:
            raise ValueError(
                f"thumbnail_size: {self.thumbnail_size} pixels cannot hold the grid of "
                f"max_tiles={self.max_tiles} tiles (at least {side * (1 + SEP) - SEP})"
            )
        self.modules = _patterns("modules", self.modules)
        self.exclude = _patterns("exclude", self.exclude)
        track = (self.track,) if isinstance(self.track, str) else self.track
        try:
            track = frozenset(track)
        except TypeError:
            raise TypeError(
                f"track: expected a sequence of {TRACK}, got {type(self.track).__name__}"
            ) from None
        unknown = sorted(str(t) for t in track if t not in TRACK)
        if unknown:
            raise ValueError(f"track: unknown families {unknown}; expected some of {TRACK}")
        self.track = track
        if not callable(self.on_anomaly) and self.on_anomaly not in REACTIONS:
            raise ValueError(
                f"on_anomaly: expected one of {REACTIONS} or a callable, got {self.on_anomaly!r}"
            )
        for name in ("watch_requests", "snapshot_signal", "reduce_activations", "per_rank"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise TypeError(f"{name}: expected a bool, got {type(value).__name__}")
        if self.per_rank and self.reduce_activations:
            raise ValueError(
                "reduce_activations: per_rank=True writes each rank's own activation "
                "statistics; it cannot be combined with reduce_activations=True"
            )

    # ---------------------------------------------------------------- schedule
    def scheduled(self, step: int) -> bool:
        """Full statistics and tags at this step."""
        return step % self.every == 0

    def checked(self, step: int) -> bool:
        """Non-finite counts and gradient norms for the diagnosis at this step."""
        return self.check_every > 0 and step % self.check_every == 0

    def histogram_step(self, step: int) -> bool:
        """Histograms of grads, params and activations at this step."""
        h = self.histogram_every
        return h is not None and "hists" in self.track and step % h == 0

    def snapshot_step(self, step: int) -> bool:
        """A scheduled snapshot (``snapshot_every``) at this step."""
        s = self.snapshot_every
        return s is not None and step % s == 0
