"""Reading back what a probe wrote, and a small training loop for the probe tests."""

from __future__ import annotations

import collections

import numpy as np
import torch

from tbprobe.writer.reader import read_events
from tests.probe.models import batch_for, loss_for


def read_run(logdir: str) -> dict:
    """``{"scalars"|"histos"|"images"|"texts": {tag: {step: value}}}`` from a run's files."""
    out = collections.defaultdict(lambda: collections.defaultdict(dict))
    for ev in read_events(logdir):
        for v in ev.summary.value:
            kind = v.WhichOneof("value")
            if kind == "simple_value":
                out["scalars"][v.tag][ev.step] = v.simple_value
            elif kind == "histo":
                out["histos"][v.tag][ev.step] = v.histo
            elif kind == "image":
                out["images"][v.tag][ev.step] = v.image
            elif kind == "tensor" and v.metadata.plugin_data.plugin_name == "text":
                out["texts"][v.tag][ev.step] = v.tensor.string_val[0].decode()
    return out


def train(model, name: str, steps: int, opt=None, probe_step=None, seed: int = 0, micro=1):
    """``steps`` optimizer steps of ``micro`` micro-batches each; ``probe_step`` is called
    after each step when the probe has no optimizer."""
    gen = torch.Generator().manual_seed(seed)
    opt = opt or torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(steps):
        for _ in range(micro):
            loss_for(name, model, batch_for(name, gen)).backward()
        opt.step()
        opt.zero_grad()
        if probe_step is not None:
            probe_step()
    return opt


def norm64(t: torch.Tensor) -> float:
    return float(np.linalg.norm(t.detach().double().numpy().ravel()))
