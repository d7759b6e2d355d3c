"""Shared by the ``gpu_checks`` modules: the run's mode, the report of results, the kernel tests'
catalogue and the fixed-seed inputs."""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
EDGES = [-1e3, -10.0, -1.0, -0.5, 0.0, 0.25, 1.0, 3.0, 100.0, 1e4]  # explicit histogram edges
RTOL = 1e-6


@dataclass
class Mode:
    device: str  # "cuda", or "cpu" in a dry run
    dry_run: bool
    quick: bool
    shard: tuple[int, int] = (0, 1)  # (k, n): this unit checks the dtypes i with i % n == k

    def mine(self, dtypes) -> list:
        k, n = self.shard
        return [d for i, d in enumerate(dtypes) if i % n == k]

    @property
    def backends(self):
        """(label, TBPROBE_KERNELS value or None for the default dispatch, tiny catalogue)."""
        if self.dry_run:
            return [("torch", "torch", False), ("triton-interp", "triton", True)]
        return [("triton", None, False)]


@dataclass
class Report:
    path: str | None
    meta: dict
    checks: list = field(default_factory=list)
    sections: list = field(default_factory=list)
    _saved: float = field(default_factory=time.monotonic)

    @contextlib.contextmanager
    def check(self, section: str, name: str):
        """Records a pass, or a fail with the exception's text; never lets it escape."""
        try:
            yield
        except Exception as e:  # a failing check must not stop the others
            detail = f"{type(e).__name__}: {e}".strip()[:600]
            self.add(section, name, "fail", detail)
        else:
            self.add(section, name, "pass")

    def add(self, section, name, status, detail=""):
        self.checks.append({"section": section, "name": name, "status": status, "detail": detail})
        if status == "fail":
            print(f"FAIL {section}/{name}: {detail}", flush=True)
        if time.monotonic() - self._saved > 5:  # a unit killed by its timeout keeps these
            self.save()

    def counts(self, section=None):
        rows = [c for c in self.checks if section is None or c["section"] == section]
        return {s: sum(c["status"] == s for c in rows) for s in ("pass", "fail", "skip")}

    def save(self) -> None:
        """Written after every section, so a run killed by its timeout still leaves results."""
        self._saved = time.monotonic()
        if not self.path:
            return
        total = self.counts()
        doc = dict(self.meta, sections=self.sections, checks=self.checks)
        doc["summary"] = dict(total, checks=len(self.checks), ok=total["fail"] == 0)
        # The half-written copy lives outside $OUT: a run killed while saving must not leave
        # a ninth file there (the device tool brings back eight).
        scratch = os.environ.get("SCRATCH") or tempfile.gettempdir()
        tmp = os.path.join(scratch, f"{os.path.basename(self.path)}.{os.getpid()}.tmp")
        with open(tmp, "w") as f:
            json.dump(doc, f, indent=1)
        shutil.move(tmp, self.path)  # a rename on one file system, else a copy


@functools.lru_cache(maxsize=1)
def catalogue():
    """The kernel tests' catalogue, loaded by path (a `tests` package elsewhere can't shadow it)."""
    spec = importlib.util.spec_from_file_location(
        "tbprobe_catalogue", ROOT / "tests" / "kernels" / "catalogue.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ----------------------------------------------------------------------------- inputs


def sample(shape, dtype, seed=0, nonfinite="some", int_bits=50):
    """Fixed-seed CPU values of ``dtype``. Floats: ``"some"`` puts NaN, +Inf, -Inf and 0 in,
    ``"heavy"`` makes ~30% non-finite, ``"nan"``/``"inf"`` every element. Integers reach far
    past fp32's 2^24 (``int_bits``) and hold their dtype's extremes."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 4
    if dtype == torch.bool:
        return x > 0
    if not dtype.is_floating_point:
        info = torch.iinfo(dtype)
        if info.min == 0:
            x = x.abs()
        x = (x * 2.0 ** min(info.bits - 4, int_bits)).clamp(info.min, info.max).to(dtype)
        if x.numel() >= 3 and int_bits >= info.bits - 4:
            x.view(-1)[:2] = torch.tensor([info.min, info.max], dtype=dtype)
        return x
    if nonfinite == "nan":
        x.fill_(math.nan)
    elif nonfinite == "inf":
        x.fill_(math.inf)
    elif nonfinite == "heavy":
        u = torch.rand(shape, generator=g, dtype=torch.float64)
        x = torch.where(u < 0.1, math.nan, torch.where(u < 0.2, math.inf, x))
        x = torch.where(u > 0.9, -math.inf, x)
    x = x.to(dtype)
    if nonfinite == "some":
        flat = x.view(-1)
        specials = [math.nan, math.inf, -math.inf, 0.0][: max(flat.numel() - 1, 0)]
        for i, v in enumerate(specials):
            flat[(i * 7919) % flat.numel()] = v
    return x
