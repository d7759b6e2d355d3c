"""A run with the probe's tags and known values, and what TensorBoard must serve for a run.

``write_probe_run(logdir)`` writes, with tbprobe's ``SummaryWriter``, the tags the probe writes
(DESIGN.md's tag table) over ``STEPS`` steps, with a gradient explosion in ``fc1`` from
``EXPLOSION_STEP``, and returns the :class:`RunSpec` of what it wrote. ``spec_from_events``
builds the same spec from any run's event files (e.g. a real ``tbprobe demo`` run), so the
end-to-end tests can be pointed at another run by changing only the fixture.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

STEPS = 20
EXPLOSION_STEP = 15
HISTOGRAM_STEPS = tuple(range(0, STEPS, 2))
SNAPSHOT_STEPS = (10, 19)
ANOMALY_TAG = "anomaly"
ANOMALY_TEXT = (
    "**gradient explosion** first seen in `fc1.weight` at step 15\n"
    "\n"
    "| step | kind | where | value | median before |\n"
    "|---|---|---|---|---|\n"
    "| 15 | grad_norm spike | fc1.weight | 640 | 0.8 |\n"
    "| 15 | grad_norm spike | _total | 640.0031 | 0.9434 |\n"
)


@dataclass
class RunSpec:
    """What a run holds, as TensorBoard's data API should serve it.

    ``scalars``: ``{tag: [(step, value), ...]}``; ``histograms``: ``{tag: [(step, Histo)]}``;
    ``images``: ``{tag: [(step, (H, W, C) uint8 array)]}``; ``texts``: ``{tag: [(step, md)]}``
    keyed by the stored tag (``add_text("anomaly", ...)`` stores ``anomaly/text_summary``).
    """

    scalars: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    histograms: dict[str, list[tuple[int, np.ndarray]]] = field(default_factory=dict)
    images: dict[str, list[tuple[int, np.ndarray]]] = field(default_factory=dict)
    texts: dict[str, list[tuple[int, str]]] = field(default_factory=dict)


def _grad_norm_fc1(step: int) -> float:
    return 0.5 + 0.02 * step if step < EXPLOSION_STEP else 40.0 * 2.0 ** (step - 11)


def _grad_norm_fc2(step: int) -> float:
    return 0.6 - 0.01 * step


def _scalar_values(step: int) -> dict[str, float]:
    g1, g2 = _grad_norm_fc1(step), _grad_norm_fc2(step)
    return {
        "grad_norm/fc1.weight": g1,
        "grad_norm/fc2.weight": g2,
        "grad_norm/_total": math.hypot(g1, g2),
        "param_norm/fc1.weight": 3.0 + 0.05 * step,
        "update_ratio/fc1.weight": 1e-3 * (1 + step % 4),
        "act_rms/fc1": 1.0 + 0.1 * math.sin(step),
        "act_absmax/fc1": 4.0 + 0.25 * step,
        "outgrad_rms/fc1": 1e-2 * (step + 1),
    }


def _histogram_data(step: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(1000 * seed + step)
    return rng.normal(0.05 * step, 0.1 * (1 + step / 4), size=500)  # (500,)


def _snapshot_image(step: int) -> np.ndarray:
    """A ``(48, 80)`` uint8 feature-map grid: 2x4 tiles of 24x20, one pattern per channel."""
    y, x = np.mgrid[0:24, 0:20] / np.array([24.0, 20.0])[:, None, None]  # (2, 24, 20) in [0, 1)
    r = np.hypot(y - 0.5, x - 0.5)
    phase = step / 4
    maps = [
        np.sin(12 * y + phase),
        np.sin(12 * x + phase),
        np.sin(9 * (x + y) + phase),
        np.exp(-20 * r**2),
        np.cos(25 * r - phase),
        np.sign(np.sin(9 * x) * np.sin(9 * y + phase)),
        2 * x * y - 1,
        -np.exp(-12 * ((x - 0.3) ** 2 + (y - 0.6) ** 2)),
    ]  # 8 x (24, 20), each in [-1, 1]
    tiles = np.stack(maps).reshape(2, 4, 24, 20).transpose(0, 2, 1, 3).reshape(48, 80)
    return np.round((tiles + 1) * 127.5).astype(np.uint8)


def tensorflow_edges() -> np.ndarray:
    """TensorBoard's default histogram edges (REFERENCE.md): 1549 float64 values."""
    v, pos = 1e-12, []
    while v < 1e20:
        pos.append(v)
        v *= 1.1
    return np.array([-x for x in reversed(pos)] + [0.0] + pos)


@dataclass(frozen=True)
class Histo:
    """One histogram as written: ``counts[i]`` is the bucket whose right edge is ``limits[i]``."""

    lo: float
    hi: float
    limits: np.ndarray  # (K,) float64
    counts: np.ndarray  # (K,) float64

    def served(self, reader: str) -> np.ndarray:
        """(left, right, count) rows, ``(K', 3)`` float64, as TensorBoard's ``reader`` serves them.

        ``reader="python"`` (``--load_fast=false``) drops empty buckets at both ends; ``"rust"``
        (the default data server) keeps them. Both put the minimum as the first left edge and
        the maximum as the last right edge, so the Rust server's first row can run backwards
        when the writer kept an empty bucket before the first occupied one (tensorboardX does).

        Example: ``Histo(0.5, 1.5, np.array([0., 1., 2.]), np.array([0, 2, 1])).served("rust")``.
        """
        counts, limits = self.counts, self.limits
        if reader == "python":
            nonzero = np.flatnonzero(counts)
            if nonzero.size == 0:
                return np.zeros((0, 3))
            counts = counts[nonzero[0] : nonzero[-1] + 1]
            limits = limits[nonzero[0] : nonzero[-1] + 1]
        elif reader != "rust":
            raise ValueError(f"reader: expected 'python' or 'rust', got {reader!r}")
        inner = list(limits[:-1])
        return np.array([[self.lo, *inner], [*inner, self.hi], counts], dtype=np.float64).T


def _histo_of(data: np.ndarray) -> Histo:
    """What tensorboardX writes for ``data`` with the default bins: the occupied range plus
    one empty bucket before it (REFERENCE.md)."""
    edges = tensorflow_edges()
    counts, _ = np.histogram(data, edges)
    nonzero = np.flatnonzero(counts)
    start, end = max(nonzero[0] - 1, 0), nonzero[-1] + 1
    limits = edges[1:][start:end]
    return Histo(float(data.min()), float(data.max()), limits, counts[start:end].astype(float))


def write_probe_run(logdir: str | Path) -> RunSpec:
    """Write the probe's tags over ``STEPS`` steps into ``logdir``; return what was written.

    Example: ``spec = write_probe_run(tmp_path / "probe")``.
    """
    from tbprobe import SummaryWriter

    spec = RunSpec()
    with SummaryWriter(str(logdir)) as writer:
        for step in range(STEPS):
            for tag, value in _scalar_values(step).items():
                writer.add_scalar(tag, value, step)
                spec.scalars.setdefault(tag, []).append((step, value))
            if step in HISTOGRAM_STEPS:
                for seed, tag in enumerate(
                    ("grad_hist/fc1.weight", "param_hist/fc1.weight", "act_hist/fc1")
                ):
                    data = _histogram_data(step, seed)
                    writer.add_histogram(tag, data, step)
                    spec.histograms.setdefault(tag, []).append((step, _histo_of(data)))
            if step in SNAPSHOT_STEPS:
                img = _snapshot_image(step)
                writer.add_image("snapshot/conv1", img, step, dataformats="HW")
                spec.images.setdefault("snapshot/conv1", []).append((step, img[:, :, None]))
                rgb = np.stack([img, img[::-1], 255 - img])  # (3, 48, 80)
                writer.add_image("snapshot/blocks.0.attn", rgb, step)
                rgb_hwc = rgb.transpose(1, 2, 0)
                spec.images.setdefault("snapshot/blocks.0.attn", []).append((step, rgb_hwc))
            if step == EXPLOSION_STEP:
                writer.add_text(ANOMALY_TAG, ANOMALY_TEXT, step)
                spec.texts[f"{ANOMALY_TAG}/text_summary"] = [(step, ANOMALY_TEXT)]
    return spec


def decode_png(data: bytes) -> np.ndarray:
    """PNG bytes to a ``(H, W, C)`` uint8 array (C = 1 for grayscale)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        arr = np.asarray(im)
    return arr[:, :, None] if arr.ndim == 2 else arr


def spec_from_events(logdir: str | Path) -> RunSpec:
    """The :class:`RunSpec` of the run in ``logdir`` (one run: event files directly inside).

    Example: ``spec_from_events("runs/demo-2026")``.
    """
    from tbprobe.writer import read_events

    spec = RunSpec()
    for ev in read_events(str(logdir), errors="raise"):
        for v in ev.summary.value:
            kind = v.WhichOneof("value")
            if kind == "simple_value":
                spec.scalars.setdefault(v.tag, []).append((ev.step, v.simple_value))
            elif kind == "histo":
                h = v.histo
                histo = Histo(h.min, h.max, np.array(h.bucket_limit), np.array(h.bucket))
                spec.histograms.setdefault(v.tag, []).append((ev.step, histo))
            elif kind == "image":
                img = decode_png(v.image.encoded_image_string)
                spec.images.setdefault(v.tag, []).append((ev.step, img))
            elif kind == "tensor" and (
                v.metadata.plugin_data.plugin_name == "text" or v.tag in spec.texts
            ):  # only a tag's first event carries the plugin metadata, as in TensorBoard's files
                text = v.tensor.string_val[0].decode("utf-8")
                spec.texts.setdefault(v.tag, []).append((ev.step, text))
    return spec
