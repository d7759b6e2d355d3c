"""Snapshots (images, histograms, stats), snapshot requests from outside, and the probe's
reaction to anomalies."""

from __future__ import annotations

import io
import math
import time
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import tbprobe
from tbprobe.kernels.thumbnail import thumbnail_shape
from tbprobe.probe.anomaly import Anomaly
from tbprobe.probe.probe import AnomalyError
from tests.probe import models
from tests.probe.util import read_run, train


def _expected_size(shape, kind, cfg, title):
    h, w = thumbnail_shape(shape, kind=kind, max_size=cfg.thumbnail_size)
    try:
        from tbprobe.probe.render import render_snapshot
    except ModuleNotFoundError:
        return (h, w)
    rgb = render_snapshot(
        np.zeros((h, w), np.uint8),
        shape=shape,
        kind=kind,
        title=title,
        max_size=cfg.thumbnail_size,
    )
    return rgb.shape[:2]


def test_snapshot_writes_decodable_images_histograms_and_stats(tmp_path):
    """snapshot(modules) captures the selected modules at the next step only: a
    snapshot/<module> PNG of the expected size, act_hist and act_rms at that step."""
    model = models.make("cnn")
    writer = tbprobe.SummaryWriter(str(tmp_path))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    probe = tbprobe.Probe(model, writer, opt, every=100, watch_requests=False)
    train(model, "cnn", 2, opt=opt)
    probe.snapshot(modules="features.*")
    train(model, "cnn", 2, opt=opt)
    probe.detach()
    writer.close()
    run = read_run(str(tmp_path))
    assert set(run["images"]) == {"snapshot/features.0", "snapshot/features.2"}
    for module, channels in (("features.0", 4), ("features.2", 6)):
        (step, img), *more = run["images"][f"snapshot/{module}"].items()
        assert step == 2 and not more
        arr = np.asarray(Image.open(io.BytesIO(img.encoded_image_string)))
        want = _expected_size((2, channels, 8, 8), "conv", probe.cfg, module)
        assert arr.shape[:2] == want == (img.height, img.width)
        assert list(run["histos"][f"act_hist/{module}"]) == [2]
        assert 2 in run["scalars"][f"act_rms/{module}"]
    assert "act_rms/head" not in run["scalars"] or 2 not in run["scalars"]["act_rms/head"]


def test_snapshot_writes_its_modules_gradient_and_parameter_histograms(tmp_path):
    """A snapshot's step also writes grad_hist and param_hist of its modules' parameters
    (the tag table: "every histogram_every steps and on snapshot"), of the gradient before
    clipping and the parameter after the update; no other parameter's."""
    from tbprobe.probe.pack import in_modules

    model = models.make("cnn")
    writer = tbprobe.SummaryWriter(str(tmp_path))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    probe = tbprobe.Probe(model, writer, opt, every=100, watch_requests=False)
    gen = torch.Generator().manual_seed(0)
    seen = {}
    for step in range(3):
        if step == 1:
            probe.snapshot(modules="features.0")
        models.loss_for("cnn", model, models.batch_for("cnn", gen)).backward()
        if step == 1:
            seen["grad"] = model.features[0].weight.grad.clone()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
        opt.step()
        if step == 1:
            seen["param"] = model.features[0].weight.detach().clone()
        opt.zero_grad()
    probe.detach()
    writer.close()
    histos = read_run(str(tmp_path))["histos"]
    mine = [n for n, p in model.named_parameters() if n.startswith("features.0.")]
    assert mine and not in_modules("features.2.weight", frozenset({"features.0"}))
    for fam in ("grad_hist", "param_hist"):
        assert {t for t in histos if t.startswith(fam + "/")} == {f"{fam}/{n}" for n in mine}
        assert all(list(histos[f"{fam}/{n}"]) == [1] for n in mine)
    for fam, key in (("grad_hist", "grad"), ("param_hist", "param")):
        h, t = histos[f"{fam}/features.0.weight"][1], seen[key].double()
        assert h.num == t.numel() and sum(h.bucket) == t.numel()
        assert (h.min, h.max) == (t.min().item(), t.max().item())
        assert h.sum_squares == pytest.approx(float((t * t).sum()), rel=1e-6)


def test_snapshot_every_schedules_snapshots_of_all_hooked_modules(tmp_path):
    """snapshot_every=2 captures every hooked module at steps 0 and 2; sequence outputs
    of the transformer become token x feature images."""
    model = models.make("gpt2")
    writer = tbprobe.SummaryWriter(str(tmp_path))
    probe = tbprobe.Probe(model, writer, snapshot_every=2, every=50, watch_requests=False)
    train(model, "gpt2", 3, probe_step=probe.step)
    probe.detach()
    writer.close()
    images = read_run(str(tmp_path))["images"]
    assert {f"snapshot/{n}" for n, _ in probe.modules} == set(images)
    assert all(sorted(v) == [0, 2] for v in images.values())


def test_snapshot_request_file_is_picked_up(tmp_path):
    """A `tbprobe snapshot` request dropped in the log dir produces snapshot images for the
    requested modules within 2 steps of the watcher finding it."""
    from tbprobe.probe.requests import request_snapshot

    model = models.make("mlp")
    writer = tbprobe.SummaryWriter(str(tmp_path))
    writer.flush()
    probe = tbprobe.Probe(model, writer, every=100)
    assert probe._watcher is not None
    request_snapshot(str(tmp_path), modules="2", steps=1)
    deadline = time.monotonic() + 20
    gen = torch.Generator().manual_seed(0)

    def armed():
        return probe.snapshots.pending() or probe.state.snap is not None

    while not armed() and time.monotonic() < deadline:
        model(torch.randn(4, 8, generator=gen)).sum().backward()
        probe.step()
        time.sleep(0.05)  # pace the loop: the watcher stats at most every 0.5 s
    picked = probe.global_step
    assert armed(), "request not picked up in 20 s"
    for _ in range(2):
        model(torch.randn(4, 8, generator=gen)).sum().backward()
        probe.step()
    probe.detach()
    writer.close()
    steps = list(read_run(str(tmp_path))["images"]["snapshot/2"])
    assert len(steps) == 1 and picked <= steps[0] <= picked + 1


class _Planted:
    """A diagnosis that reports one anomaly at a chosen step."""

    def __init__(self, step, where="0"):
        self.step, self.where = step, where

    def feed(self, record):
        if record.step != self.step:
            return []
        msg = f"planted at {self.where}"
        return [Anomaly(record.step, "nonfinite", self.where, "output", 1.0, None, msg)]


def _probe(tmp_path, on_anomaly, step=1, where="0"):
    model = models.make("mlp")
    writer = tbprobe.SummaryWriter(str(tmp_path))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    probe = tbprobe.Probe(
        model,
        writer,
        opt,
        every=100,
        on_anomaly=on_anomaly,
        diagnosis=_Planted(step, where),
        watch_requests=False,
    )
    return model, writer, opt, probe


def test_on_anomaly_warn_records_prints_and_writes_markdown(tmp_path, capsys):
    """ "warn": the anomaly is in probe.anomalies, warned, printed once, and written as an
    `anomaly` text event at its step (even off the writer's log_freq)."""
    model, writer, opt, probe = _probe(tmp_path, "warn")
    with pytest.warns(RuntimeWarning, match="planted"):
        train(model, "mlp", 3, opt=opt)
    probe.detach()
    writer.close()
    assert [a.step for a in probe.anomalies] == [1]
    err = capsys.readouterr().err
    assert err.count("planted at 0") == 1
    assert "tbprobe: step 1: nonfinite at 0 (output): planted at 0" in err  # str(anomaly)
    texts = read_run(str(tmp_path))["texts"]["anomaly/text_summary"]  # tensorboardX naming
    assert list(texts) == [1] and "planted at 0" in texts[1]


def test_on_anomaly_raise_raises_from_the_training_step(tmp_path):
    """ "raise": AnomalyError comes out of optimizer.step() with the anomalies attached."""
    model, writer, opt, probe = _probe(tmp_path, "raise")
    with pytest.raises(AnomalyError) as info:
        train(model, "mlp", 3, opt=opt)
    first = info.value.anomalies[0]
    assert first.where == "0"
    # Its text says the step and place: it may come a step late (no host sync).
    assert f"anomalies: step {first.step}: {first.kind} at 0 (" in str(info.value)
    probe.detach()
    writer.close()


def test_on_anomaly_snapshot_captures_the_offending_module_next_step(tmp_path):
    """ "snapshot": the offending module (from a parameter name too) is captured at the
    step after the anomaly's."""
    model, writer, opt, probe = _probe(tmp_path, "snapshot", step=1, where="2.weight")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train(model, "mlp", 4, opt=opt)
    probe.detach()
    writer.close()
    images = read_run(str(tmp_path))["images"]
    assert list(images) == ["snapshot/2"] and list(images["snapshot/2"]) == [2]


def test_on_anomaly_callable_gets_each_anomaly(tmp_path):
    """A callable on_anomaly is called once per anomaly."""
    got = []
    model, writer, opt, probe = _probe(tmp_path, got.append)
    train(model, "mlp", 3, opt=opt)
    probe.detach()
    writer.close()
    assert [a.message for a in got] == ["planted at 0"]


def test_builtin_diagnosis_reports_a_planted_nan(tmp_path):
    """With the built-in diagnosis, a NaN made by module 2's forward at step 3 is reported
    at module 2, forward, step 3."""
    model = models.make("mlp")
    state = {"step": 0}

    def plant(m, a, out):
        return out * math.nan if state["step"] == 3 else None

    model[2].register_forward_hook(plant)
    writer = tbprobe.SummaryWriter(str(tmp_path))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    probe = tbprobe.Probe(model, writer, opt, every=100, on_anomaly=lambda a: None)
    gen = torch.Generator().manual_seed(0)
    for step in range(5):
        state["step"] = step
        model(torch.randn(4, 8, generator=gen)).pow(2).mean().backward()
        opt.zero_grad() if step == 3 else opt.step()
        if step == 3:
            probe._close_step()  # the optimizer step was skipped: end it by hand
            probe._after_step()
        opt.zero_grad()
    probe.detach()
    writer.close()
    nf = [a for a in probe.anomalies if a.kind == "nonfinite"]
    assert nf and (nf[0].step, nf[0].module, nf[0].pass_) == (3, "2", "forward")


class _TwoShapes(torch.nn.Module):
    """A 5-D (Conv3d) and a 2-D (Linear) activation."""

    def __init__(self):
        super().__init__()
        self.conv3d = torch.nn.Conv3d(2, 5, 3, padding=1)
        self.lin = torch.nn.Linear(8, 6)

    def forward(self, v, x):
        return self.conv3d(v).pow(2).mean() + self.lin(x).pow(2).mean()


def test_snapshot_images_follow_the_drawn_shape_and_the_size_options(tmp_path):
    """With thumbnail_size=64 and max_tiles=3, a 5-D and a 2-D activation are written as
    exactly render_snapshot(thumbnail(drawn view), shape=drawn shape, max_tiles, max_size,
    title=module) of their captured output."""
    from tbprobe import kernels
    from tbprobe.probe.render import render_snapshot

    torch.manual_seed(0)
    model = _TwoShapes()
    outs = {}
    for name in ("conv3d", "lin"):
        model.get_submodule(name).register_forward_hook(
            lambda m, a, out, _n=name: outs.__setitem__(_n, out.detach().clone())
        )
    writer = tbprobe.SummaryWriter(str(tmp_path))
    probe = tbprobe.Probe(
        model, writer, snapshot_every=5, thumbnail_size=64, max_tiles=3, watch_requests=False
    )
    model(torch.randn(2, 2, 4, 6, 6), torch.randn(4, 8)).backward()
    probe.step()
    probe.detach()
    writer.close()
    images = read_run(str(tmp_path))["images"]
    drawn = {
        "conv3d": (outs["conv3d"].reshape(2, 5, 4, 36), "conv"),  # (B, C, D, H*W)
        "lin": (outs["lin"], "heatmap"),
    }
    for name, (view, kind) in drawn.items():
        img = kernels.thumbnail(view, kind=kind, max_tiles=3, max_size=64).numpy()
        want = render_snapshot(
            img, shape=tuple(view.shape), kind=kind, title=name, max_tiles=3, max_size=64
        )
        got = np.asarray(
            Image.open(io.BytesIO(images[f"snapshot/{name}"][0].encoded_image_string)).convert(
                "RGB"
            )
        )
        np.testing.assert_array_equal(got, want)


def test_attention_maps_are_drawn_as_heads():
    """A 4-D output of a module named like attention probabilities is drawn as a grid of
    heads; other 4-D outputs as channels."""
    from tbprobe.probe.snapshot import _thumb_input

    x = torch.rand(2, 4, 8, 8)
    assert _thumb_input(x, "blocks.0.attn.probs")[1] == "attention"
    assert _thumb_input(x, "encoder.layer.1.attention.self")[1] == "attention"
    assert _thumb_input(x, "features.3")[1] == "conv"
    assert _thumb_input(x[0], "blocks.0.attn.probs")[1] == "sequence"  # 3-D: not attention


def test_one_pixel_feature_maps_are_drawn_as_a_samples_by_channels_heatmap():
    """(B, C, 1, 1) outputs (squeeze-excitation, pooled heads) would be blank tiles: they
    are drawn as one (B, C) heatmap instead, whose pixels follow the values."""
    from tbprobe import kernels
    from tbprobe.probe.snapshot import _thumb_input

    x = torch.arange(2 * 16, dtype=torch.float32).reshape(2, 16, 1, 1)
    view, kind = _thumb_input(x, "se.fc")
    assert kind == "heatmap" and view.shape == (2, 16)
    img = kernels.thumbnail(view, kind=kind)
    assert len(img.unique()) > 8  # not one grey level


def test_a_failing_thumbnail_leaves_the_modules_statistics(tmp_path, monkeypatch):
    """A thumbnail that raises disables snapshots of that module only: its activation
    statistics keep being written."""
    from tbprobe.probe import snapshot as snap_mod

    def broken(self, x, name=""):
        raise RuntimeError("planted thumbnail failure")

    monkeypatch.setattr(snap_mod.Snapshots, "capture", broken)
    model = nn.Sequential(nn.Conv2d(3, 4, 1))
    writer = tbprobe.SummaryWriter(str(tmp_path))
    probe = tbprobe.Probe(model, writer, every=1, watch_requests=False)
    probe.snapshot()
    with pytest.warns(RuntimeWarning, match="snapshot hook of '0' failed"):
        for _ in range(3):
            model(torch.randn(2, 3, 4, 4)).sum().backward()
            probe.step()
    probe.detach()
    writer.close()
    assert [(k, w) for k, w, _ in probe.errors] == [("snapshot", "0")]
    assert set(read_run(tmp_path)["scalars"]["act_rms/0"]) == {0, 1, 2}


def test_thumbnail_size_too_small_for_max_tiles_is_refused():
    model = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="thumbnail_size: 8 pixels cannot hold the grid"):
        tbprobe.Probe(model, tbprobe.SummaryWriter(write_to_disk=False), thumbnail_size=8)
    tbprobe.Probe(model, tbprobe.SummaryWriter(write_to_disk=False), thumbnail_size=8,
                  max_tiles=16).detach()  # fmt: skip
