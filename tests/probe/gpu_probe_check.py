"""The probe's GPU check, run by hand on a lent GPU (``DEVICE=cpu`` for a dry run here).

For four zoo models on the device: training steps with norms and stats every step,
histograms every 2 and snapshots every 3 run under ``torch.cuda.set_sync_debug_mode("error")``
(no host sync), write their tags, and the last step's ``param_norm`` tags match the
parameters. Then the step time of an 8-layer bf16 conv net with no probe, stats every step,
and histograms every step. Prints one JSON object.

Run it on the device with the carried wheels installed into ``/tmp/site``::

    PYTHONPATH=/tmp/site:. python3 -m tests.probe.gpu_probe_check
"""

import json
import os
import tempfile
import time

import torch

import tbprobe
from tests.probe import models
from tests.probe.util import read_run

DEV = os.environ.get("DEVICE", "cuda")
BENCH_N = int(os.environ.get("BENCH_N", "60"))


def _sync_mode(mode) -> None:
    if DEV == "cuda":
        torch.cuda.set_sync_debug_mode(mode)


def _wait() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def check_model(name: str) -> dict:
    model = models.make(name).to(DEV)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    logdir = tempfile.mkdtemp()
    writer = tbprobe.SummaryWriter(logdir)
    probe = tbprobe.Probe(
        model, writer, opt, every=1, histogram_every=2, snapshot_every=3, watch_requests=False
    )
    gen = torch.Generator().manual_seed(0)
    xs = [models.batch_for(name, gen).to(DEV) for _ in range(8)]

    def step(x):
        model(x).float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()

    step(xs[0])  # warm-up: the probe's constants are copied to the device once
    _wait()
    err = None
    _sync_mode("error")
    try:
        for x in xs[1:]:
            step(x)
    except Exception as exc:  # report it, do not stop the check
        err = repr(exc)[:400]
    finally:
        _sync_mode(0)
    norms = {n: float(p.detach().double().norm()) for n, p in model.named_parameters()}
    probe.detach()
    writer.close()
    scalars = read_run(logdir)["scalars"]
    last = max(scalars["grad_norm/_total"])
    ok = all(abs(scalars[f"param_norm/{n}"][last] - v) <= 1e-4 * v + 1e-6 for n, v in norms.items())
    run = read_run(logdir)
    return {
        "sync_error": err,
        "probe_errors": [repr(e)[:200] for e in probe.errors],
        "tags": len(run["scalars"]),
        "images": len(run["images"]),
        "hists": len(run["histos"]),
        "last_step": last,
        "param_norm_ok": ok,
    }


def check_helpers() -> dict:
    """Device helpers a model check may not reach with its cache cold: AMP's column powers
    (built at the first scaled step; a GradScaler's own step syncs, so no AMP model runs
    under "error") and the ranks' row merge (distributed only)."""
    from tbprobe.probe.distributed import merge_rows
    from tbprobe.probe.optional import _POWERS, _powers

    _POWERS.clear()
    gathered = torch.randn(2, 3, 10, dtype=torch.float64, device=DEV)
    _wait()
    err = None
    _sync_mode("error")
    try:
        powers, merged = _powers(torch.device(DEV)), merge_rows(gathered)
    except Exception as exc:
        err = repr(exc)[:400]
    finally:
        _sync_mode(0)
    ok = err is None
    if ok:
        want = torch.tensor([0, 1, 2, 1, 1, 1, 0, 0, 0, 0], dtype=torch.float64)
        g = gathered.cpu()
        ok = torch.equal(powers.cpu(), want) and torch.equal(
            merged.cpu()[:, 4:6], g[:, :, 4:6].amax(0)
        )
    return {"sync_error": err, "probe_errors": [], "param_norm_ok": ok}


def bench(kind: str) -> float:
    """Mean step time in ms over BENCH_N steps, after 10 warm-up steps."""
    torch.manual_seed(0)
    layers = [nn_block() for _ in range(8)]
    model = torch.nn.Sequential(*layers).to(DEV).to(torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters(), 1e-4)
    writer = tbprobe.SummaryWriter(write_to_disk=False)
    probe = None
    if kind != "none":
        hist = 1 if kind == "hist" else None
        probe = tbprobe.Probe(
            model, writer, opt, every=1, histogram_every=hist, watch_requests=False
        )
    x = torch.randn(64, 64, 32, 32, device=DEV, dtype=torch.bfloat16)
    for n in (10, BENCH_N):
        _wait()
        t = time.perf_counter()
        for _ in range(n):
            model(x).float().pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
        _wait()
    dt = (time.perf_counter() - t) / BENCH_N
    if probe is not None:
        probe.detach()
    return dt * 1e3


def nn_block() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Conv2d(64, 64, 3, padding=1), torch.nn.ReLU(inplace=True))


if __name__ == "__main__":
    out = {name: check_model(name) for name in ("cnn", "nested", "twice", "structured")}
    out["helpers"] = check_helpers()
    if DEV == "cuda":
        out["bench_ms"] = {k: round(bench(k), 3) for k in ("none", "stats", "hist", "none")}
    print(json.dumps(out, indent=1))
