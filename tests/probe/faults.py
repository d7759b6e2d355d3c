"""Small models, planted faults, and a hook-based record builder for the diagnosis tests.

Each :class:`Fault` is planted in one module of one model (by overriding that module
instance's ``forward``, so hooks still fire around it and its names do not change) and fires
at one step; it knows where the diagnosis must report it: (module, pass, step).

:class:`HookRecorder` builds :class:`StepRecord` objects from plain forward, full-backward and
post-accumulate-grad hooks, so the diagnosis can be tested on real training without the
probe. It is test code: it syncs freely.
"""

from __future__ import annotations

import contextlib
import types
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from tbprobe.probe.records import StepRecord, TensorEvent

ARCHS = ("mlp", "cnn", "gpt2")
FAULTS = ("forward_nan", "backward_nan", "fp16_inf", "lr_spike")
# The module each architecture's faults are planted in (a parameterised leaf, mid-network).
TARGET = {"mlp": "2", "cnn": "3", "gpt2": "transformer.h.1.mlp.c_fc"}
EXPECTED_PASS = {
    "forward_nan": "forward",
    "backward_nan": "backward",
    "fp16_inf": "forward",
    "lr_spike": "update",
}


def make_model(arch: str, seed: int = 0) -> nn.Module:
    """A tiny model of ``arch`` (one of ``ARCHS``), deterministic for ``seed``."""
    torch.manual_seed(seed)
    if arch == "mlp":
        return nn.Sequential(
            nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4)
        )
    if arch == "cnn":
        return nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 8, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(72, 4),  # (B, 8 * 3 * 3): keeps where things are, like the teacher
        )
    if arch == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        cfg = GPT2Config(
            vocab_size=32,
            n_positions=16,
            n_embd=16,
            n_layer=2,
            n_head=2,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=0,
            eos_token_id=0,
        )
        return GPT2LMHeadModel(cfg).eval()  # eval(): no dropout; gradients still flow
    raise ValueError(f"arch: expected one of {ARCHS}, got {arch!r}")


class Data:
    """A noisy task per architecture: a fixed random teacher plus 20% label noise, so the
    loss never reaches zero and gradients stay noisy (healthy SGD, not a converged model)."""

    def __init__(self, arch: str, seed: int = 0, batch: int = 16):
        self.arch, self.batch = arch, batch
        self.gen = torch.Generator().manual_seed(seed + 1)
        g = self.gen
        self.teacher = torch.randn(16 if arch == "mlp" else 36, 4, generator=g)
        self.trans = torch.randint(0, 32, (32, 3), generator=g)  # gpt2: a noisy Markov chain

    def __call__(self):
        g, n = self.gen, self.batch
        if self.arch == "gpt2":
            tok = [torch.randint(0, 32, (n,), generator=g)]
            for _ in range(11):
                nxt = self.trans[tok[-1], torch.randint(0, 3, (n,), generator=g)]
                noise = torch.rand(n, generator=g) < 0.2
                tok.append(torch.where(noise, torch.randint(0, 32, (n,), generator=g), nxt))
            return (torch.stack(tok, 1),)  # (B, T)
        if self.arch == "mlp":
            x = torch.randn(n, 16, generator=g)
            feats = x
        else:
            x = torch.randn(n, 1, 12, 12, generator=g)
            feats = nn.functional.avg_pool2d(x, 2).flatten(1)  # (B, 36)
        y = (feats @ self.teacher).argmax(1)
        noise = torch.rand(n, generator=g) < 0.2
        y = torch.where(noise, torch.randint(0, 4, (n,), generator=g), y)
        return x, y


def loss_fn(arch: str, model: nn.Module, batch) -> torch.Tensor:
    """The training loss of ``model`` on ``batch``."""
    if arch == "gpt2":
        (tok,) = batch
        return model(input_ids=tok, labels=tok).loss
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


@dataclass
class Fault:
    """A fault of kind ``kind`` planted in ``module`` of an ``arch`` model, firing at ``step``."""

    arch: str
    kind: str
    step: int
    module: str = ""
    current: int = -1  # the training loop's step, set by the loop

    def __post_init__(self):
        if self.kind not in FAULTS:
            raise ValueError(f"kind: expected one of {FAULTS}, got {self.kind!r}")
        self.module = self.module or TARGET[self.arch]

    @property
    def expected(self) -> tuple[str, str, int]:
        """(module, pass, step) where the diagnosis must report this fault."""
        return self.module, EXPECTED_PASS[self.kind], self.step

    @property
    def armed(self) -> bool:
        return self.current == self.step

    def plant(self, model: nn.Module) -> None:
        """Override the target module's forward so that the fault fires at ``step``."""
        if self.kind == "lr_spike":
            return  # done by the optimizer: see make_optimizer and set_lr
        mod = model.get_submodule(self.module)
        inner = type(mod).forward
        fault = self

        def faulty_forward(self_, *args, **kwargs):
            out = inner(self_, *args, **kwargs)
            if not fault.armed:
                return out
            if fault.kind == "forward_nan":
                return torch.log(out)  # log of the negative entries: NaN in forward
            if fault.kind == "backward_nan":
                # The norm of an exactly-zero difference: 0 in forward, 0/0 = NaN in backward.
                zero = torch.sqrt(((out - out.detach()) ** 2).sum(-1, keepdim=True))
                return out + zero
            # fp16_inf: scaled by 2**24 in fp16 (a loss-scale bug): overflows past 65504.
            return (out.half() * 4096 * 4096).float()

        mod.forward = types.MethodType(faulty_forward, mod)

    def make_optimizer(self, model: nn.Module, opt: str, lr: float):
        """An optimizer with the target module's parameters in their own group."""
        target = {id(p) for p in model.get_submodule(self.module).parameters()}
        mine = [p for p in model.parameters() if id(p) in target]
        rest = [p for p in model.parameters() if id(p) not in target]
        return make_optimizer([{"params": mine}, {"params": rest}], opt, lr)

    def set_lr(self, optimizer, base_lr: float, factor: float = 1000.0) -> None:
        """For ``lr_spike``: the target group's lr is ``factor`` × at ``step`` only."""
        if self.kind == "lr_spike":
            optimizer.param_groups[0]["lr"] = base_lr * (factor if self.armed else 1.0)


def base_lr(arch: str, opt: str) -> float:
    """A learning rate at which ``arch`` trains well with ``opt`` (the CNN's ReLUs die under
    SGD at 0.05: that is a real failure, which the diagnosis reports as vanishing)."""
    if opt == "adam":
        return 3e-3
    return 0.01 if arch == "cnn" else 0.05


def make_optimizer(params, opt: str, lr: float):
    """SGD with momentum 0.9, or Adam."""
    if opt not in ("sgd", "adam"):
        raise ValueError(f"opt: expected 'sgd' or 'adam', got {opt!r}")
    if opt == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    return torch.optim.Adam(params, lr=lr)


def _tensors(x):
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (tuple, list)):
        return [t for item in x for t in _tensors(item)]
    if isinstance(x, dict):
        return [t for item in x.values() for t in _tensors(item)]
    if hasattr(x, "to_tuple"):  # transformers ModelOutput
        return _tensors(x.to_tuple())
    return []


def _nonfinite(x) -> int:
    return sum(int((~torch.isfinite(t)).sum()) for t in _tensors(x) if t.is_floating_point())


def _stats(x) -> np.ndarray | None:
    ts = [t.detach() for t in _tensors(x) if t.is_floating_point()]
    if not ts:
        return None
    flat = torch.cat([t.reshape(-1).double() for t in ts])
    fin = flat[torch.isfinite(flat)]
    row = np.zeros(10)
    row[0] = flat.numel()
    if fin.numel():
        row[1:6] = [fin.sum(), (fin * fin).sum(), fin.min(), fin.max(), fin.abs().max()]
    row[6] = int(torch.isnan(flat).sum())
    row[7] = int((flat == float("inf")).sum())
    row[8] = int((flat == float("-inf")).sum())
    row[9] = int((flat == 0).sum())
    return row


def default_modules(model: nn.Module) -> list[str]:
    """Parameterised leaves plus every module with children (the blocks), like the probe."""
    names = []
    for name, mod in model.named_modules():
        leaf = not any(True for _ in mod.children())
        if not leaf or any(True for _ in mod.parameters(recurse=False)):
            names.append(name)
    return names


class HookRecorder:
    """Builds one :class:`StepRecord` per optimizer step from plain hooks (test code).

    Call :meth:`before_step` after ``backward()`` and before ``optimizer.step()``, then
    :meth:`after_step` after it, which returns the record. ``stats_every`` sets the scheduled
    steps (full stats rows on forward outputs); ``check_every`` the steps whose hooked tensors
    are counted for non-finite values at all, like the probe's ``check_every`` (gradient
    norms, parameter norms and update ratios are recorded every step).
    """

    def __init__(self, model: nn.Module, stats_every: int = 1, modules=None, check_every=1):
        self.model, self.stats_every, self.check_every = model, stats_every, check_every
        self.step, self.events, self.handles = 0, [], []
        self._before: dict[str, torch.Tensor] = {}
        names = default_modules(model) if modules is None else modules
        for name in names:
            mod = model.get_submodule(name)
            self.handles.append(mod.register_forward_hook(self._fwd(name)))
            self.handles.append(mod.register_full_backward_hook(self._bwd(name)))
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        for n, p in self.params.items():
            self.handles.append(p.register_post_accumulate_grad_hook(self._grad(n)))

    @property
    def scheduled(self) -> bool:
        return self.stats_every > 0 and self.step % self.stats_every == 0

    @property
    def checked(self) -> bool:
        return self.scheduled or (self.check_every > 0 and self.step % self.check_every == 0)

    def _add(self, module, pass_, tensor, nonfinite, inputs=None, stats=None):
        ev = TensorEvent(
            seq=len(self.events),
            module=module,
            pass_=pass_,
            tensor=tensor,
            nonfinite=nonfinite,
            inputs_nonfinite=inputs,
            stats=stats,
        )
        self.events.append(ev)

    def _fwd(self, name):
        def hook(mod, args, out):
            if not self.checked:
                return
            stats = _stats(out) if self.scheduled else None
            self._add(name, "forward", "output", _nonfinite(out), _nonfinite(args), stats)

        return hook

    def _bwd(self, name):
        def hook(mod, grad_input, grad_output):
            if not self.checked:
                return
            go = _nonfinite(grad_output)
            self._add(name, "backward", "grad_output", go)
            if _tensors(grad_input):
                self._add(name, "backward", "grad_input", _nonfinite(grad_input), go)

        return hook

    def _grad(self, name):
        def hook(p):
            if self.checked:
                self._add(name, "grad", "grad", _nonfinite(p.grad))

        return hook

    def before_step(self) -> None:
        """Snapshot the parameters before the optimizer step (for the update ratio)."""
        self._before = {n: p.detach().clone() for n, p in self.params.items()}

    def after_step(self) -> StepRecord:
        """The record of the step that just ended; starts the next step."""
        grads = {n: float(p.grad.norm()) for n, p in self.params.items() if p.grad is not None}
        if grads:
            grads["_total"] = float(np.sqrt(sum(g * g for g in grads.values())))
        pnorms = {n: float(p.detach().norm()) for n, p in self.params.items()}
        ratios = {
            n: float((p.detach() - self._before[n]).norm()) / max(pnorms[n], 1e-12)
            for n, p in self.params.items()
            if n in self._before
        }
        rec = StepRecord(
            step=self.step,
            scheduled=self.scheduled,
            events=tuple(self.events),
            grad_norms=grads,
            param_norms=pnorms,
            update_ratios=ratios,
        )
        self.step += 1
        self.events = []
        return rec

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    close = remove  # for contextlib.closing


@contextlib.contextmanager
def one_thread():
    """Run torch on one intra-op thread: these models are tiny, and on a shared 2-core machine
    a second thread costs up to 15x in contention instead of saving anything."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train(
    arch: str,
    opt: str,
    steps: int,
    fault: Fault | None = None,
    seed: int = 0,
    stats_every=1,
    check_every=1,
):
    """Train ``arch`` with ``opt`` for ``steps`` steps; returns (StepRecords, losses).
    ``stats_every``: steps with full stats rows (0: none); ``check_every``: steps whose
    hooked tensors are counted for non-finite values (see :class:`HookRecorder`)."""
    model = make_model(arch, seed)
    data = Data(arch, seed)
    lr = base_lr(arch, opt)
    if fault is not None:
        fault.plant(model)
        optimizer = fault.make_optimizer(model, opt, lr)
    else:
        optimizer = make_optimizer(model.parameters(), opt, lr)
    rec = HookRecorder(model, stats_every, check_every=check_every)
    records, losses = [], []
    with one_thread(), contextlib.closing(rec):
        for step in range(steps):
            if fault is not None:
                fault.current = step
                fault.set_lr(optimizer, lr)
            loss = loss_fn(arch, model, data())
            optimizer.zero_grad()
            loss.backward()
            rec.before_step()
            optimizer.step()
            records.append(rec.after_step())
            losses.append(float(loss.detach()))
    return records, losses
