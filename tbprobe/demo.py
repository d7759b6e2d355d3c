"""``tbprobe demo``: train, snapshot, then fine-tune too hard and let the probe find the blow-up.

1. A small CNN learns to tell pillow-drawn shapes apart, with a probe attached in one line.
   Half-way, a snapshot of its feature maps is requested from *outside* the process, the way
   ``tbprobe snapshot LOGDIR`` does it on a running job.
2. A tiny transformer learns a counting task; the probe snapshots its block activations and
   attention heads.
3. The CNN is fine-tuned on new shapes at a learning rate 150× too high. Its gradients explode;
   the probe reports which layer and which step, and TensorBoard shows it all.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import warnings

import torch
import torch.nn.functional as F

from tbprobe.demo_data import Progress, ShapesCNN, TinyLM, counting_batch, shapes_dataset

CNN_STEPS, LM_STEPS, FINETUNE_STEPS = 160, 160, 40
FINETUNE_LR_FACTOR = 150


def _request_snapshot_from_outside(logdir: str, modules: str) -> subprocess.Popen:
    """Run ``tbprobe snapshot`` in another process, as a user would from a shell."""
    cmd = [sys.executable, "-m", "tbprobe.cli", "snapshot", logdir, "--modules", modules]
    print(f"  $ tbprobe snapshot {logdir} --modules '{modules}'   (from another process)")
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _train_cnn(logdir, device, scale):
    from tbprobe import SummaryWriter, attach

    torch.manual_seed(0)
    x, y = shapes_dataset(2048, seed=0)
    x, y = x.to(device), y.to(device)
    model = ShapesCNN().to(device)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    writer = SummaryWriter(os.path.join(logdir, "cnn"))
    probe = attach(model, writer, opt, every=1, histogram_every=20)  # the one line
    steps = max(20, int(CNN_STEPS * scale))
    bar, request = Progress(steps, "1/3 train CNN"), None
    for step in range(steps):
        i = torch.randint(0, len(x), (64,), device=device)
        loss = F.cross_entropy(model(x[i]), y[i])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()  # the probe's step boundary: no code needed
        writer.add_scalar("train/loss", loss.detach(), step)  # a device tensor: no sync
        if step == steps // 2:
            request = _request_snapshot_from_outside(writer.get_logdir(), "conv*")
        if step % 10 == 9 or step == steps - 1:
            bar.update(step + 1, f"loss {loss.item():.3f}")  # sync-ok: the demo's progress bar
    if request is not None and request.wait(timeout=30) != 0:
        print(f"  snapshot request failed: {request.stderr.read().decode()}", file=sys.stderr)
    return model, opt, writer, probe, (x, y), steps


def _train_lm(logdir, device, scale):
    from tbprobe import SummaryWriter, attach

    torch.manual_seed(1)
    model = TinyLM().to(device)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(1)
    steps = max(20, int(LM_STEPS * scale))
    with SummaryWriter(os.path.join(logdir, "transformer")) as writer:
        # Hook the blocks and everything inside them (the attention softmax included).
        probe = attach(model, writer, opt, every=5, histogram_every=40, modules=["blocks.*"])
        bar = Progress(steps, "2/3 train transformer")
        with probe:
            for step in range(steps):
                seq = counting_batch(32, 32, 32, gen).to(device)  # (B, T + 1)
                logits = model(seq[:, :-1])  # (B, T, vocab)
                loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), seq[:, 1:].reshape(-1))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                writer.add_scalar("train/loss", loss.detach(), step)
                if step == steps - 2:  # on demand, in-process: the next step is captured
                    probe.snapshot(modules=["blocks.?", "blocks.*.attn.probs"])
                if step % 10 == 9 or step == steps - 1:
                    bar.update(step + 1, f"loss {loss.item():.3f}")  # sync-ok: progress bar
    return steps


def _finetune(cnn, opt, writer, probe, device, first_step, scale):
    torch.manual_seed(2)
    x, y = shapes_dataset(1024, seed=7)  # new shapes to fine-tune on
    x, y = x.to(device), y.to(device)
    for group in opt.param_groups:
        group["lr"] *= FINETUNE_LR_FACTOR
    steps = max(10, int(FINETUNE_STEPS * scale))
    bar = Progress(steps, f"3/3 fine-tune, lr ×{FINETUNE_LR_FACTOR}")
    for k in range(steps):
        i = torch.randint(0, len(x), (64,), device=device)
        loss = F.cross_entropy(cnn(x[i]), y[i])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        writer.add_scalar("train/loss", loss.detach(), first_step + k)
        if k % 5 == 4 or k == steps - 1:
            bar.update(k + 1, f"loss {loss.item():.3g}")  # sync-ok: the demo's progress bar
    probe.detach()  # writes what is still in flight; its anomalies are in probe.anomalies
    writer.close()
    return probe.anomalies


def _summary(anomalies) -> list[str]:
    """The lines that answer: which layer blew up, at which step, forward or backward."""
    lines = []
    first: dict = {}  # the first spike of each series: gradient norms, update sizes
    for a in anomalies:
        if a.kind == "spike":
            first.setdefault(a.pass_, a)
    for a in sorted(first.values(), key=lambda a: a.step):
        what = "gradients exploded" if a.pass_ == "grad" else "updates ‖Δw‖ exploded"
        top = ", ".join(f"{n} ×{r:.0f}" for n, r in (a.top or ())[:3])
        lines.append(f"{what} at step {a.step}: {a.where} first ({top})")
    for kind, what in (("nonfinite", "first non-finite value"), ("vanishing", "then vanishing")):
        found = [a for a in anomalies if a.kind == kind]
        if found:
            a = found[0]
            lines.append(f"{what}: step {a.step}, {a.where} ({a.tensor}, {a.pass_})")
    dead = [a for a in anomalies if a.kind == "dead"]
    if dead:
        names = sorted({a.where for a in dead})
        lines.append(f"dead activations (all zero) from step {dead[0].step}: {', '.join(names)}")
    return lines or ["no anomaly found"]


def _logdir_problem(logdir: str) -> str | None:
    """Why ``logdir`` cannot be the run directory (it is created if missing), or None."""
    if os.path.exists(logdir) and not os.path.isdir(logdir):
        return "exists and is not a directory"
    try:
        os.makedirs(logdir, exist_ok=True)
    except OSError as e:
        return e.strerror or str(e)
    return None


def run_demo(logdir: str | None = None, scale: float = 1.0) -> int:
    """The whole demo; ``scale`` shortens it (tests use a small one)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    logdir = logdir or os.path.join("runs", time.strftime("demo-%Y%m%d-%H%M%S"))
    problem = _logdir_problem(logdir)
    if problem:  # before minutes of training, not after
        print(f"tbprobe demo: --logdir {logdir}: {problem}", file=sys.stderr)
        return 2
    print(f"tbprobe demo on {device}; run directory {logdir}")
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the probe prints each anomaly once
        cnn, opt, writer, probe, _, steps = _train_cnn(logdir, device, scale)
        _train_lm(logdir, device, scale)
        anomalies = _finetune(cnn, opt, writer, probe, device, steps, scale)
    print("\ndiagnosis (tbprobe found it without a single host sync in the training step):")
    for line in _summary(anomalies):
        print(f"  {line}")
    tb = os.path.join(os.path.dirname(sys.executable), "tensorboard")
    tb = tb if os.path.exists(tb) else "tensorboard"
    print(f"\ndone in {time.perf_counter() - t0:.0f} s. Look at it:")
    print(f"  {tb} --logdir {logdir}")
    cli = os.path.join(os.path.dirname(sys.executable), "tbprobe")
    cli = cli if os.path.exists(cli) else "tbprobe"
    print(f"  {cli} report {logdir}   # the diagnosis, read back from the event files")
    return 0
