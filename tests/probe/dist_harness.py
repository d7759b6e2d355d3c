"""Two gloo ranks on CPU train a tiny transformer LM under DDP or FSDP2 with a ``Probe`` on
every rank; plain hooks (independent of the probe) record what the ranks really hold.

One ``torch.multiprocessing`` spawn runs every :class:`Scenario` in turn in one process group
(spawning costs seconds; a scenario costs well under one). Each rank dumps, per scenario,
``<out>/<scenario>/rank<r>.pt``: its captures (activations and output gradients of its own
micro-batch; the full gradients and parameters at the optimizer step), the anomalies its probe
found, the probe's errors, or the error its ``Probe(...)`` raised. Rank 0's probe writes to
``<out>/<scenario>/run``. A child's exception ends the spawn with its traceback; a hang ends
at a deadline, naming the scenario and phase each rank was in.

Probe API these runs assume (issue 7): ``writer=None`` on ranks other than 0 (rank 0 writes);
``reduce_activations=True`` reduces activation statistics over the ranks; ``per_rank=True``
with a writer on every rank writes rank r's own statistics under ``<writer logdir>/rank<r>``;
a model wrapped in ``DistributedDataParallel`` is probed under its inner module's names.

Each rank also records the torch.distributed collectives and the host syncs called from inside
the probe's code (:class:`Collectives`), and a scenario may make one rank's packing raise at
one step (``break_pack``), to check that the other ranks are not left waiting. The ranks of a
layout scenario record different keys: a :class:`~tests.probe.dist_model.BranchLM` runs its
hooked ``branch`` on one rank only (``branch``), or one rank's hook of a module raises at one
step and is disabled there (``fail_hook``). A scenario may accumulate ``micro`` backward passes
per step, clip the gradients after the last one (``clip``; the dump then holds the full
gradients before clipping, ``preclip_grads``) and step a second, unprobed optimizer after
the probed one (``second_opt``). The scenarios are in :mod:`tests.probe.dist_scenarios`.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import os
import time
import traceback

import torch
from torch import nn

from tests.probe.dist_instrument import Collectives, broken_pack, failing_hook
from tests.probe.dist_model import (  # noqa: F401 (the tests use them as H.*)
    BINS,
    DIM,
    LR,
    MICRO,
    SEQ,
    VOCAB,
    WORLD,
    global_batch,
    lm_loss,
    make_model,
    module_names,
    rank_batch,
)
from tests.probe.dist_scenarios import (  # noqa: F401 (the tests use them as H.*)
    BASE_NAMES,
    BREAK_MESSAGE,
    CLIP_NAMES,
    HOOK_FAIL,
    HOOK_FAIL_MESSAGE,
    LAYOUT_NAMES,
    SCENARIO,
    SCENARIOS,
    TWO_OPT_NAMES,
    VIEW_NAMES,
    Scenario,
)

COLLECTIVES = Collectives()


def _full(t: torch.Tensor) -> torch.Tensor:
    """A copy of the whole tensor (a DTensor is all-gathered: every rank must call)."""
    if hasattr(t, "full_tensor"):
        t = t.full_tensor()
    return t.detach().clone()


class Capture:
    """Plain hooks recording, per step, what the probe should reduce.

    ``acts[(step, rank)][module]`` and ``outgrads[(step, rank)][module]``: module outputs and
    the gradients w.r.t. them; ``grads[step]``/``before[step]``/``after[step]``: full
    gradients at the optimizer step and parameters before and after it. ``rank`` says whose
    micro-batch the next forward is (a single-process reference runs every rank's).
    """

    def __init__(self, named_modules, named_params, rank: int = 0):
        self.rank, self.step = rank, 0
        self.params = list(named_params)
        self.acts, self.outgrads, self.grads, self.before, self.after = {}, {}, {}, {}, {}
        self.handles = [m.register_forward_hook(self._forward(name)) for name, m in named_modules]

    def _forward(self, name):
        def hook(module, args, out):
            key = (self.step, self.rank)
            self.acts.setdefault(key, {})[name] = out.detach().clone()
            if out.requires_grad:
                store = self.outgrads.setdefault(key, {})
                out.register_hook(lambda g: store.__setitem__(name, g.detach().clone()))

        return hook

    def pre_step(self, *_):
        self.grads[self.step] = {n: _full(p.grad) for n, p in self.params}
        self.before[self.step] = {n: _full(p) for n, p in self.params}

    def post_step(self, *_):
        self.after[self.step] = {n: _full(p) for n, p in self.params}
        self.step += 1

    def remove(self):
        for h in self.handles:
            h.remove()

    def data(self) -> dict:
        keys = ("acts", "outgrads", "grads", "before", "after")
        return {k: getattr(self, k) for k in keys}


def plant_nan(module: nn.Module, capture: Capture, step: int, rank: int):
    """A forward hook: at ``step`` on ``rank`` the module's output gets one NaN element."""

    def hook(m, args, out):
        if capture.step == step and capture.rank == rank:
            out = out.clone()
            out.view(-1)[0] = math.nan
            return out
        return None

    return module.register_forward_hook(hook)


# ---------------------------------------------------------------- the ranks
def _progress(out: str, rank: int, what: str) -> None:
    with open(os.path.join(out, f"progress.rank{rank}"), "w") as f:
        f.write(what)


def _wrap(sc: Scenario, model: nn.Module):
    if sc.wrap == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, gradient_as_bucket_view=sc.bucket_view)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (WORLD,))
    for b in model.blocks:
        fully_shard(b, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _optimizers(sc: Scenario, params) -> list:
    """SGD optimizers, stepped in order: the probed one first; with ``sc.second_opt`` a
    second one takes the parameters under that prefix."""
    if sc.second_opt is None:
        return [torch.optim.SGD([p for _, p in params], lr=LR)]
    first = [p for n, p in params if not n.startswith(sc.second_opt)]
    second = [p for n, p in params if n.startswith(sc.second_opt)]
    return [torch.optim.SGD(first, lr=LR), torch.optim.SGD(second, lr=LR)]


def _local(t: torch.Tensor) -> torch.Tensor:
    return (t.to_local() if hasattr(t, "to_local") else t).detach().clone()


def _grad_layout(params) -> dict:
    """``{param: (type, placements, local shape, id, local copy)}`` of the grads at the step."""
    out = {}
    for n, p in params:
        g, local = p.grad, _local(p.grad)
        placements = str(getattr(g, "placements", None))
        out[n] = (type(g).__name__, placements, tuple(local.shape), id(g), local)
    return out


def _watch_grad_hooks(params, seen: dict) -> list:
    """Post-accumulate-grad hooks (the probe's) recording the grad as they first see it."""

    def hook(name):
        def fn(p):
            if name not in seen:
                seen[name] = (id(p.grad), _local(p.grad))

        return fn

    return [p.register_post_accumulate_grad_hook(hook(n)) for n, p in params]


def _run_scenario(rank: int, sc: Scenario, out: str) -> None:
    import torch.distributed as dist

    import tbprobe

    sdir = os.path.join(out, sc.name)
    os.makedirs(sdir, exist_ok=True)
    run_dir = os.path.join(sdir, "run")
    _progress(out, rank, f"{sc.name}: building")
    model = make_model(branch=sc.branch is not None)
    model.branch_on = rank == sc.branch
    names = module_names(model)
    wrapped = _wrap(sc, model)
    params = list(model.named_parameters())
    opts = _optimizers(sc, params)
    opt = opts[0]  # the probed one
    cap = Capture([(n, model.get_submodule(n)) for n in names], params, rank)
    handles = [plant_nan(model.get_submodule(sc.plant[0]), cap, *sc.plant[1:])] if sc.plant else []
    handles += [
        opt.register_step_pre_hook(cap.pre_step),
        opt.register_step_post_hook(cap.post_step),
    ]
    dump = {"error": None, "rank": rank, "hook_grads": {}}
    handles += _watch_grad_hooks(params, dump["hook_grads"])
    writer = tbprobe.SummaryWriter(run_dir) if rank == 0 or sc.per_rank else None
    probe = None
    kwargs = {"every": 1, "histogram_every": 1, "hist_bins": BINS, **sc.probe_kwargs}
    if sc.branch is not None:
        kwargs["modules"] = names  # the defaults and the parameter-free branch
    try:
        probe = tbprobe.Probe(wrapped, writer, opt, **kwargs)
    except Exception:
        dump["error"] = traceback.format_exc()
    errors: list = [None] * WORLD  # agree before training: a rank without a probe stops all
    dist.all_gather_object(errors, dump["error"])
    if any(errors):  # train without probes: the captures (torch's facts) still count
        dump["error"] = "\n".join(f"rank {r}: {e}" for r, e in enumerate(errors) if e)
        if probe is not None:
            probe.detach()
        probe = None
    fault = contextlib.nullcontext()
    if sc.break_pack is not None and sc.break_pack[1] == rank:
        fault = broken_pack(sc.break_pack[0], BREAK_MESSAGE)
    if sc.fail_hook is not None and sc.fail_hook[2] == rank:
        fault = failing_hook(*sc.fail_hook[:2], HOOK_FAIL_MESSAGE)
    COLLECTIVES.clear()
    with fault:
        for step in range(sc.steps):
            _progress(out, rank, f"{sc.name}: step {step}")
            for i in range(sc.micro):
                lm_loss(wrapped, rank_batch(step * sc.micro + i, rank)).backward()
            if step == 0:
                dump["grad_layout"] = _grad_layout(params)
            if sc.clip is not None:
                dump.setdefault("preclip_grads", {})[step] = {n: _full(p.grad) for n, p in params}
                total = torch.nn.utils.clip_grad_norm_(wrapped.parameters(), sc.clip)
                if hasattr(total, "full_tensor"):  # FSDP2: a DTensor
                    total = total.full_tensor()
                dump.setdefault("preclip", []).append(float(total))
            for o in opts:
                o.step()
            for o in opts:
                o.zero_grad()
    if probe is not None:
        _progress(out, rank, f"{sc.name}: detach")
        probe.detach()
        dump["anomalies"] = [_anomaly(a) for a in probe.anomalies]
        dump["probe_errors"] = [f"{k} {w}: {e!r}" for k, w, e in probe.errors]
        last = probe.last_record
        dump["last_events"] = [(e.module, e.pass_, e.tensor, e.nonfinite) for e in last.events]
    dump["collectives"] = list(COLLECTIVES.calls)
    dump["syncs"] = list(COLLECTIVES.syncs)
    if writer is not None:
        writer.close()
    cap.remove()
    for h in handles:
        h.remove()
    dump.update(cap.data())
    torch.save(dump, os.path.join(sdir, f"rank{rank}.pt"))
    dist.barrier()


def _anomaly(a) -> dict:
    keys = ("step", "kind", "where", "module", "pass_", "tensor", "producer", "message")
    return {k: getattr(a, k) for k in keys}


def _child(rank: int, out: str, names: list[str]) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)  # two ranks share few cores
    COLLECTIVES.install()
    store = "file://" + os.path.join(out, "store")
    dist.init_process_group(
        "gloo", init_method=store, rank=rank, world_size=WORLD,
        timeout=datetime.timedelta(seconds=60),
    )  # fmt: skip
    try:
        for sc in SCENARIOS:
            if sc.name in names:
                _run_scenario(rank, sc, out)
        _progress(out, rank, "done")
        dist.barrier()  # no rank tears gloo down while another still runs (aborts at exit)
    finally:
        dist.destroy_process_group()


class HarnessError(AssertionError):
    """A rank raised (its traceback is in the message) or the ranks ran past the deadline."""


def spawn_ranks(fn, args: tuple, out: str, timeout_s: float = 150.0) -> None:
    """Run ``fn(rank, *args)`` on ``WORLD`` spawned processes; raise :class:`HarnessError`
    with the failing rank's traceback, or after ``timeout_s`` with each rank's progress."""
    import torch.multiprocessing as mp
    from torch.multiprocessing.spawn import ProcessException

    ctx = mp.start_processes(fn, args=args, nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.join(timeout=0.5):
            if time.monotonic() > deadline:
                raise HarnessError(f"ranks still running after {timeout_s:.0f} s: {_where(out)}")
    except ProcessException as exc:
        raise HarnessError(f"a rank failed ({_where(out)}):\n{exc}") from None
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
            p.join(5)


def _where(out: str) -> str:
    parts = []
    for r in range(WORLD):
        path = os.path.join(out, f"progress.rank{r}")
        text = "not started"
        if os.path.exists(path):
            with open(path) as f:
                text = f.read()
        parts.append(f"rank {r} in {text!r}")
    return ", ".join(parts)


def run_scenarios(out: str, names=None, timeout_s: float = 150.0) -> str | None:
    """Spawn the ranks for ``names`` (default: all scenarios); the spawn's error or None.
    Scenarios finished before an error keep their dumps."""
    names = [sc.name for sc in SCENARIOS] if names is None else list(names)
    try:
        spawn_ranks(_child, (out, names), out, timeout_s)
    except HarnessError as exc:
        return str(exc)
    return None


def load(runs: tuple[str, str | None], name: str, probed: bool = True) -> list[dict]:
    """The dumps of scenario ``name`` of ``runs`` ``(out dir, spawn error)``, one per rank.
    A scenario that did not finish raises with the spawn's error; with ``probed``, so does
    one whose ``Probe(...)`` raised."""
    out, spawn_error = runs
    paths = [os.path.join(out, name, f"rank{r}.pt") for r in range(WORLD)]
    if not all(os.path.exists(p) for p in paths):
        raise HarnessError(f"scenario {name!r} did not finish: {spawn_error}")
    dumps = [torch.load(p, weights_only=False) for p in paths]
    if probed and dumps[0]["error"]:
        raise HarnessError(f"scenario {name!r}: Probe(...) raised\n{dumps[0]['error']}")
    return dumps


def truth(dumps: list[dict]) -> dict:
    """The run as the ranks held it: every rank's activations, rank 0's full tensors."""
    run = {k: dumps[0][k] for k in ("grads", "before", "after")}
    for k in ("acts", "outgrads"):
        run[k] = {key: v for d in dumps for key, v in d[k].items()}
    return run
