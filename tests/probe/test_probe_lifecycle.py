"""A probe beside ordinary training code over a job's life: copies and saves of a probed model,
a model dropped without ``detach()``, a layer unfrozen mid-run, a replaced optimizer, an exit
with steps in flight, steps given as numpy ints."""

from __future__ import annotations

import copy
import gc
import io
import os
import subprocess
import sys
import textwrap
import warnings
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import tbprobe
from tbprobe.probe import lifecycle
from tests.probe import models
from tests.probe.util import norm64, read_run, train

CHILD_TIMEOUT = 120  # seconds
REPO = Path(__file__).resolve().parents[2]


def _writer():
    return tbprobe.SummaryWriter(write_to_disk=False)


def test_copies_and_saves_of_a_probed_model_work_and_are_not_probed(tmp_path):
    """``copy.deepcopy(model)`` (EMA), ``AveragedModel(model)`` (SWA) and ``torch.save(model)``
    used to fail on the probe's writer lock; the copies carry inert hooks: their training
    adds nothing to the probe's steps."""
    model = models.make("mlp")
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    writer = tbprobe.SummaryWriter(str(tmp_path))
    probe = tbprobe.Probe(model, writer, opt, every=1, watch_requests=False)
    train(model, "mlp", 2, opt=opt)
    ema = copy.deepcopy(model)
    swa = torch.optim.swa_utils.AveragedModel(model)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    for other in (ema, swa, loaded):
        other(torch.randn(4, 8)).pow(2).sum().backward()  # not the probed model: no events
        assert probe.state.events == {} and probe.state.grads == {}
    train(model, "mlp", 2, opt=opt)
    probe.detach()
    writer.close()
    assert sorted(read_run(str(tmp_path))["scalars"]["grad_norm/_total"]) == [0, 1, 2, 3]
    assert probe.errors == []


def test_a_model_dropped_without_detach_is_freed():
    """A probe left attached to a dropped model does not keep the model alive (parameter
    gradient hooks, which the garbage collector does not see, hold the probe weakly)."""
    model = models.make("mlp")
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    tbprobe.attach(model, _writer(), opt, every=1, watch_requests=False)
    train(model, "mlp", 2, opt=opt)  # the one-liner works: the module's hooks keep it alive
    gone = weakref.ref(model)
    del model, opt
    gc.collect()
    assert gone() is None


def test_one_line_attach_keeps_logging():
    """``tbprobe.attach(model, writer, opt)`` without keeping the probe still logs: the
    module's forward hooks hold it."""
    model = models.make("mlp")
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    seen = []
    tbprobe.attach(model, _writer(), opt, every=1, watch_requests=False, on_anomaly=seen.append)
    gc.collect()
    train(model, "mlp", 3, opt=opt)
    model[0].weight.data[0, 0] = float("nan")
    train(model, "mlp", 3, opt=opt)
    assert seen and seen[0].kind == "nonfinite"


def test_a_second_probe_on_one_model_warns(tmp_path):
    """A notebook cell run twice attaches a second probe while the first is still attached:
    both log every step (here into one directory: each point twice), so the second warns,
    naming the first's log directory. After a detach, or on another model, nothing."""
    model, other = models.make("mlp"), models.make("mlp")
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    writers = [tbprobe.SummaryWriter(str(tmp_path)) for _ in range(2)]
    first = tbprobe.attach(model, writers[0], opt, every=1, watch_requests=False)
    with pytest.warns(RuntimeWarning, match="already has a Probe attached") as got:
        second = tbprobe.attach(model, writers[1], opt, every=1, watch_requests=False)
    assert str(tmp_path) in str(got[0].message)
    train(model, "mlp", 2, opt=opt)
    second.detach()
    first.detach()
    for w in writers:
        w.close()
    assert len(read_run(str(tmp_path))["scalars"]["grad_norm/_total"]) == 2  # steps 0, 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tbprobe.attach(model, _writer(), opt, every=1, watch_requests=False).detach()
        with tbprobe.attach(model, _writer(), opt, every=1, watch_requests=False):
            tbprobe.attach(other, _writer(), every=1, watch_requests=False).detach()


def test_layer_unfrozen_mid_run_gets_its_gradient_norms():
    """A layer frozen at attach and unfrozen later (linear probe, then fine-tune): its
    gradients are hooked at the next step boundary, and ``grad_norm/_total`` counts them."""
    model = models.make("mlp")
    model[0].requires_grad_(False)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    records = []
    probe = tbprobe.Probe(model, _writer(), opt, every=1, watch_requests=False)
    train(model, "mlp", 2, opt=opt)
    model[0].requires_grad_(True)
    opt.add_param_group({"params": list(model[0].parameters())})
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        models.loss_for("mlp", model, models.batch_for("mlp", gen)).backward()
        want = norm64(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
        opt.step()
        opt.zero_grad()
        probe.flush()
        records.append((probe.last_record.grad_norms, want))
    probe.detach()
    for norms, want in records:
        assert "0.weight" in norms and norms["_total"] == pytest.approx(want, rel=1e-6)


def test_a_replaced_optimizer_is_noticed_once(monkeypatch):
    """A new optimizer stepping the probed parameters while the probed one does not (a new
    training phase): the probe logs nothing then, and says so once; two optimizers that
    both step every iteration (one probed) say nothing."""
    model = models.make("mlp")
    first = torch.optim.SGD(model.parameters(), lr=0.01)
    probe = tbprobe.Probe(model, _writer(), first, every=1, watch_requests=False)
    other = torch.optim.SGD(model.parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(0)

    def both(n, opts):
        for _ in range(n):
            models.loss_for("mlp", model, models.batch_for("mlp", gen)).backward()
            for o in opts:
                o.step()
            model.zero_grad()

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        both(lifecycle.OTHER_STEPS + 2, (other, first))  # both step: no warning
    second = torch.optim.Adam(model.parameters(), lr=1e-3)
    with pytest.warns(RuntimeWarning, match="Adam stepped the probed parameters 10 times"):
        both(lifecycle.OTHER_STEPS, (second,))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        both(lifecycle.OTHER_STEPS + 2, (second,))  # once
    probe.detach()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        both(2 * lifecycle.OTHER_STEPS, (torch.optim.SGD(model.parameters(), lr=0.1),))


_EXIT_CHILD = """
import sys, time
import torch
import tbprobe
from tbprobe.probe import stream
from tests.probe import models
from tests.probe.util import train

born = {}
orig = stream.Pending.__init__
def init(self, *a, **k):
    orig(self, *a, **k)
    born[id(self)] = time.monotonic()
stream.Pending.__init__ = init  # as on CUDA: a step lands a little after it was packed
stream.Pending.ready = lambda self: time.monotonic() - born[id(self)] > 5.0
model = models.make("mlp")
opt = torch.optim.SGD(model.parameters(), lr=0.01)
writer = tbprobe.SummaryWriter(sys.argv[1])
probe = tbprobe.attach(model, writer, opt, every=1, watch_requests=False)
train(model, "mlp", 20, opt=opt)
print(len(probe._pending))
"""


def test_steps_in_flight_are_written_at_exit_without_detach(tmp_path):
    """A script that ends with steps still in flight (on CUDA the last steps land after
    the loop) and no ``detach()``: every step is on disk after the interpreter exits."""
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(_EXIT_CHILD))
    child = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "run")],
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert child.returncode == 0, child.stderr[-2000:]
    assert int(child.stdout.split()[-1]) == 20  # all in flight at the end of the script
    steps = read_run(str(tmp_path / "run"))["scalars"]["grad_norm/_total"]
    assert sorted(steps) == list(range(20))


def test_start_step_takes_numpy_and_tensor_ints():
    """``start_step`` accepts what the writer accepts as a step (numpy ints, int tensors),
    and ``tbprobe.AnomalyError`` is importable from the package."""
    model = nn.Linear(2, 2)
    for start in (np.int64(30), torch.tensor(30)):
        probe = tbprobe.Probe(model, _writer(), start_step=start, watch_requests=False)
        assert probe.global_step == 30 and type(probe.global_step) is int
        probe.detach()
    with pytest.raises(TypeError, match="start_step"):
        tbprobe.Probe(model, _writer(), start_step=2.5, watch_requests=False)
    assert issubclass(tbprobe.AnomalyError, RuntimeError)


def test_parameters_replaced_after_attach_are_noticed_at_the_first_step():
    """Parameters swapped after attaching (``fully_shard`` applied after the probe, a new
    head assigned before training) leave the probe reading stale tensors: its first step
    says so, once; a model left as it was says nothing."""
    model = models.make("mlp")
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    probe = tbprobe.Probe(model, _writer(), opt, every=1, watch_requests=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train(model, "mlp", 2, opt=opt)
    probe.detach()
    probe = tbprobe.Probe(model, _writer(), opt, every=1, watch_requests=False)
    model[2] = nn.Linear(model[2].in_features, model[2].out_features)
    with pytest.warns(RuntimeWarning, match="parameters were replaced after the probe attached"):
        train(model, "mlp", 1, opt=opt)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train(model, "mlp", 2, opt=opt)
    probe.detach()


def test_two_probes_on_one_writer_and_a_restart_at_step_0_warn(tmp_path):
    """A GAN's generator and discriminator probed into one writer write the same tags into
    one run (their points mixed): the second probe warns. A probe re-attached to a writer
    without start_step starts at 0 below the steps written there: it warns, naming the step
    to pass; passing it is quiet."""
    gen, disc = models.make("mlp"), models.make("mlp")
    opt_g = torch.optim.SGD(gen.parameters(), lr=0.01)
    opt_d = torch.optim.SGD(disc.parameters(), lr=0.01)
    w = tbprobe.SummaryWriter(str(tmp_path))
    first = tbprobe.attach(gen, w, opt_g, every=1, watch_requests=False)
    with pytest.warns(RuntimeWarning, match="already has a Probe writing to it"):
        second = tbprobe.attach(disc, w, opt_d, every=1, watch_requests=False)
    second.detach()
    train(gen, "mlp", 3, opt=opt_g)
    first.detach()
    with pytest.warns(RuntimeWarning, match="start_step=3 to go on"):
        tbprobe.attach(gen, w, opt_g, every=1, watch_requests=False).detach()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tbprobe.attach(gen, w, opt_g, every=1, watch_requests=False, start_step=3).detach()
    w.close()
