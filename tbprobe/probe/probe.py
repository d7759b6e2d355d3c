"""``Probe``: hooks on a model, one step boundary per optimizer step, results streamed out.

At each step boundary the step's device results are packed into one buffer and copied to
the host without a sync (:mod:`tbprobe.probe.stream`); landed steps are decoded, written and
handed to the diagnosis at a later boundary, so tags and anomaly reports may arrive one step
late. ``detach()``/``close()`` wait for everything still in flight.
"""

from __future__ import annotations

import atexit
import collections
import operator
import warnings
import weakref

import torch
from torch import nn

from tbprobe.probe.collect import StepState
from tbprobe.probe.config import TRACK, ProbeConfig
from tbprobe.probe.distributed import local_part
from tbprobe.probe.hooks import HookSet
from tbprobe.probe.landing import AnomalyError, poll, react
from tbprobe.probe.lifecycle import (
    flush_at_exit,
    one_device,
    register_probe,
    replaced_params,
    unregister_probe,
    watch_other_optimizers,
)
from tbprobe.probe.optional import AmpScale, make_diagnosis, make_watcher
from tbprobe.probe.pack import pack_step
from tbprobe.probe.ranks import agreed_every, dist_context, output_writer, unwrap
from tbprobe.probe.selection import clean_name, select_modules
from tbprobe.probe.snapshot import Snapshots

__all__ = ["AnomalyError", "Probe", "attach"]  # AnomalyError: from tbprobe.probe.landing


class Probe:
    """Attach statistics hooks to ``model`` and stream them to ``writer``.

    ``every`` (default: the writer's ``log_freq``): scheduled steps, whose full statistics
    are written as tags (DESIGN.md's table). ``histogram_every``: histograms of grads, params
    and activations (default None: only on snapshots). ``modules``/``exclude``: globs or
    ``nn.Module`` types (default: parameterised leaves plus blocks). ``track``: families among
    ``("grads", "params", "acts", "outgrads", "hists")``; without ``acts`` and ``outgrads``
    module outputs get only their non-finite check (no statistics, so no dead-activation
    warnings), which makes scheduled steps much cheaper. ``scaler``: a ``GradScaler``;
    gradient norms are unscaled and a step whose optimizer step it skipped still counts.
    ``check_every``: non-finite counts and gradient norms for the diagnosis (0: only on
    scheduled steps). ``on_anomaly``: ``"warn"``, ``"raise"`` (:class:`AnomalyError` from the
    training step), ``"snapshot"`` or a callable taking each ``Anomaly``. ``snapshot_every``:
    scheduled snapshots. ``hist_bins``: linear bins over the finite range. ``thumbnail_size``
    and ``max_tiles`` bound snapshot images. ``snapshot_signal``: an opt-in SIGUSR1 handler
    (main thread): ``kill -USR1 <pid>`` snapshots the next step. ``watch_requests``: pick up
    ``tbprobe snapshot`` requests in the writer's log dir. ``diagnosis``: an object with
    ``feed(StepRecord)`` (default: the built-in one; False: none).

    Under torch.distributed every rank builds a probe (they join one collective per step);
    rank 0 writes and the other ranks may pass ``writer=None``. Gradients and parameters held
    as DTensors (FSDP2) are reduced shard by shard and merged into the statistics of the
    whole tensor; plain ones (DDP: synchronised) are rank 0's own. ``reduce_activations``:
    activation and output-gradient statistics merged over the ranks (default: rank 0's own;
    non-finite counts are always merged on checked steps). ``per_rank``: every rank passes a
    writer on the same log dir and writes its own statistics under ``<logdir>/rank<r>``.
    Snapshot requests are watched on rank 0 only. A model wrapped in
    ``DistributedDataParallel`` is probed under its inner module's names.

    The step boundary is ``optimizer.step()`` (or ``scaler.update()`` with a scaler); without
    either, call :meth:`step` once per optimizer step.

    Example::

        writer = SummaryWriter("runs/exp")
        with Probe(model, writer, opt, every=10) as probe:
            for x, y in loader:
                loss_fn(model(x), y).backward()
                opt.step(); opt.zero_grad()
    """

    def __init__(
        self,
        model: nn.Module,
        writer,
        optimizer=None,
        *,
        every: int | None = None,
        histogram_every: int | None = None,
        modules=None,
        exclude=None,
        track=TRACK,
        scaler=None,
        check_every: int = 1,
        on_anomaly="warn",
        snapshot_every: int | None = None,
        hist_bins: int = 64,
        thumbnail_size: int = 256,
        max_tiles: int = 64,
        watch_requests: bool = True,
        snapshot_signal: bool = False,
        start_step: int = 0,
        diagnosis=None,
        reduce_activations: bool = False,
        per_rank: bool = False,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
        self._dist = dist_context(reduce_activations, per_rank)
        out = output_writer(writer, self._dist, per_rank is True)
        self._out = None
        if optimizer is not None and not callable(
            getattr(optimizer, "register_step_post_hook", None)
        ):
            raise TypeError(
                f"optimizer: expected a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        if not isinstance(start_step, bool) and hasattr(start_step, "__index__"):
            start_step = operator.index(start_step)  # numpy and tensor ints, as the writer
        every_default = every is None
        if every_default:
            lf = getattr(writer, "log_freq", 1)
            every = lf if isinstance(lf, int) and not isinstance(lf, bool) and lf > 0 else 1
        self.cfg = ProbeConfig(
            every=every,
            histogram_every=histogram_every,
            modules=modules,
            exclude=exclude,
            track=track,
            check_every=check_every,
            on_anomaly=on_anomaly,
            snapshot_every=snapshot_every,
            hist_bins=hist_bins,
            thumbnail_size=thumbnail_size,
            max_tiles=max_tiles,
            watch_requests=watch_requests,
            snapshot_signal=snapshot_signal,
            start_step=start_step,
            reduce_activations=reduce_activations,
            per_rank=per_rank,
        )
        self.amp = AmpScale(scaler, optimizer)  # validates scaler
        self.model, self.writer, self.optimizer = model, writer, optimizer
        base = unwrap(model)
        self.modules = select_modules(base, self.cfg.modules, self.cfg.exclude)
        if every_default:  # every rank schedules rank 0's steps (after the checks that raise)
            self.cfg.every = agreed_every(self.cfg.every, self._dist)
        # A compiled submodule (``model.x = torch.compile(model.x)``) names its parameters
        # through the wrapper's ``_orig_mod``: tags use the module's own name.
        self._params = [(clean_name(n), p) for n, p in base.named_parameters()]
        self._root = base
        self._params_checked = False  # at the first step boundary: see lifecycle
        lazy = [n for n, p in self._params if isinstance(p, nn.parameter.UninitializedParameter)]
        if lazy:
            raise ValueError(
                f"model: {lazy[0]!r} is an uninitialized lazy parameter (nn.Lazy* modules get "
                "their shapes at the first forward): run one forward pass, then attach the probe"
            )
        one_device(self._params)
        first = self._params[0][1] if self._params else None
        self._rows_always = first is not None and first.device.type == "cuda"
        self.anomalies: list = []
        self.last_record = None  # the latest StepRecord that landed
        self._own_errors: list = []
        self._pending: collections.deque = collections.deque()
        self._prev = None  # (names, copies) of trainable params before the update
        self._spare = None  # the last copies, reused by the next step when it is scheduled
        self._lr_names = None  # pack.lr_groups' names of the optimizer's groups
        self._step = self.cfg.start_step
        self._hooks = HookSet(self)
        self.snapshots = Snapshots(self.cfg, [n for n, _ in self.modules])
        self._diagnosis = make_diagnosis(diagnosis)
        self._extra_handles: list = []
        self._eager: set = set()  # modules whose outputs get changed in place: reduced at once
        self._learned = False  # a step has run that found them
        self._attached = False
        self._signal_hit, self._restore_signal = False, None
        self.state = StepState(self._step)
        try:  # nothing below may raise on one rank only (a collective is above)
            self._hooks.attach(self.modules, self._params)
            if optimizer is not None:
                # Never traced: a compiled optimizer step (torch.compile(opt.step)) runs the
                # probe's step boundary eagerly, not through Dynamo.
                pre, post = (torch.compiler.disable(f) for f in (self._pre_opt, self._post_opt))
                self._extra_handles.append(optimizer.register_step_pre_hook(pre))
                self._extra_handles.append(watch_other_optimizers(self))
                if not self.amp.enabled:
                    self._extra_handles.append(optimizer.register_step_post_hook(post))
            if self.amp.enabled:
                self.amp.wrap_update(self._close_step, self._after_step)
            watch = self.cfg.watch_requests and (self._dist is None or self._dist.rank == 0)
            self._watcher = make_watcher(writer, watch)  # rank 0's only: see dist_pack
            if self.cfg.snapshot_signal:  # opt-in: `kill -USR1 <pid>` snapshots the next step
                from tbprobe.probe.requests import install_sigusr1

                self._restore_signal = install_sigusr1(self._on_signal)
            self._out = out() if callable(out) else out  # the writer this rank writes to
        except BaseException:
            self._remove_hooks()
            raise
        self._attached = True
        register_probe(self, base)
        atexit.register(flush_at_exit, weakref.ref(self))
        self.state = self._new_state(self._step)
        if optimizer is None and self.state.scheduled and "params" in self.cfg.track:
            self._prev = self._copy_params()  # the first step's updates (see _close_step)

    # ---------------------------------------------------------------- public API
    @property
    def global_step(self) -> int:
        """The step the hooks are collecting now."""
        return self._step

    @property
    def errors(self) -> list:
        """``(kind, where, exception)`` of every hook or step that failed and was disabled."""
        return self._hooks.errors + self._own_errors

    def step(self) -> None:
        """End the current optimizer step (only when no optimizer or scaler was given)."""
        if self.optimizer is not None or self.amp.enabled:
            raise RuntimeError(
                "step(): this probe advances on optimizer.step() / scaler.update() by itself"
            )
        self._check_attached("step")
        self._close_step()
        self._after_step()

    def snapshot(self, modules=None, steps: int = 1) -> None:
        """Capture thumbnails, activation histograms and full statistics of ``modules``
        (globs over hooked module names; default all) for the next ``steps`` steps.

        Example::

            probe.snapshot(modules="features.*", steps=2)
        """
        if isinstance(steps, bool) or not isinstance(steps, int):
            raise TypeError(f"steps: expected an int, got {type(steps).__name__}")
        if steps < 1:
            raise ValueError(f"steps: expected at least 1, got {steps}")
        self._check_attached("snapshot")
        self._arm(self.snapshots.resolve(modules, strict=True), steps)

    def flush(self) -> None:
        """Wait for every step in flight, write it and react to its anomalies."""
        self._react(self._poll(wait=True))

    def detach(self) -> None:
        """Write everything in flight and remove every hook. Idempotent."""
        if not self._attached:
            return
        self._attached = False
        unregister_probe(self)
        try:
            new = self._poll(wait=True)
            if new:
                self._react(new, raising=False)
        finally:
            self._remove_hooks()
            if self._out is not None and self._out is not self.writer:
                self._out.close()  # the per-rank writer this probe opened

    close = detach

    def __enter__(self) -> Probe:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.detach()

    # ---------------------------------------------------------------- step boundary
    def _pre_opt(self, optimizer, args, kwargs) -> None:
        st = self.state
        if st.scheduled and "params" in self.cfg.track:
            self._prev = self._copy_params(optimizer)

    def _post_opt(self, optimizer, args, kwargs) -> None:
        self._close_step()
        self._after_step()

    def _close_step(self) -> None:
        """Pack the current step (never raises), open the next one."""
        st = self.state
        try:
            if st.active and ("step", "pack") not in self._hooks.disabled:
                pending = pack_step(self, st)
                if pending is not None:
                    self._pending.append(pending)
        except Exception as exc:  # logging never stops training
            if self._dist is None:
                self._hooks.fail("step", "pack", exc)
            else:  # every rank must join every later step's gather: warn once, keep packing
                self._hooks.note("step", "pack", exc)
        except BaseException:  # KeyboardInterrupt: the step ends all the same, so the
            self._end(st)  # probe's steps stay the optimizer's
            self.state = self._new_state(self._step)
            raise
        prev = self._end(st)
        self._hooks.hook_unfrozen()
        if not self._params_checked:
            self._params_checked = True
            replaced_params(self._root, self._params)
        self._take_requests()
        self.state = self._new_state(self._step)
        # Consecutive scheduled steps (every=1) copy into the same buffers: a fresh copy of
        # every parameter each step costs new pages (on the CPU, most of the copy's time).
        self._spare = prev if self.state.scheduled else None
        if self.optimizer is None and self.state.scheduled and "params" in self.cfg.track:
            self._prev = self._copy_params()

    def _end(self, st: StepState):
        """Close step ``st`` and count it; the parameter copies it took, for reuse."""
        self._learned = self._learned or (st.learn and bool(st.events))
        prev, self._prev = self._prev, None
        self._step += 1
        st.close()
        return prev

    def _after_step(self) -> None:
        """Write the steps that have landed; react to their anomalies (may raise)."""
        self._react(self._poll(wait=False))

    def _evaluating(self) -> bool:
        """A forward without gradients of a model put in eval mode, while an optimizer trains
        it: an evaluation between steps (a frozen encoder's no-grad forwards in training run
        with the model in train mode). Without an optimizer (inference, ``probe.step()``),
        such forwards are what is watched."""
        return self.optimizer is not None and not self._root.training

    def _new_state(self, step: int) -> StepState:
        if not self._attached or ("step", "pack") in self._hooks.disabled:
            return StepState(step)
        cfg = self.cfg
        scheduled, checked = cfg.scheduled(step), cfg.checked(step)
        snap = self.snapshots.take(step)
        # Module statistics on a scheduled step only where their tags are written (or the
        # ranks' packed layout expects them); otherwise non-finite counts do.
        module_stats = bool({"acts", "outgrads"} & set(cfg.track)) or self._dist is not None
        return StepState(
            step,
            scheduled=scheduled,
            checked=checked,
            full=(scheduled and module_stats) or snap is not None or self._rows_always,
            backward=checked or (scheduled and "outgrads" in cfg.track),
            hist=cfg.histogram_step(step),
            snap=snap,
            eager=self._eager,
            learn=not self._learned,
            keep_hists=self._dist is not None
            and cfg.reduce_activations
            and cfg.histogram_step(step),
        )

    def _arm(self, names: frozenset, steps: int) -> None:
        """Arm a snapshot; a step that has not started yet takes it at once."""
        st = self.state
        if not names:
            return
        if not st.events and not st.grad_seq and not st.act_hists:
            st.snap = names | (st.snap or frozenset())
            st.full = st.active = True
            steps -= 1
        if steps > 0:
            self.snapshots.arm(names, steps)

    def _on_signal(self) -> None:
        """SIGUSR1 (main thread, possibly inside a hook): only note it; the step arms it."""
        self._signal_hit = True

    def _take_requests(self) -> None:
        if self._signal_hit:
            self._signal_hit = False
            self.snapshots.arm(frozenset(self.snapshots.names), 1)
        if self._watcher is None:
            return
        try:
            for req in self._watcher.poll():
                names = self.snapshots.resolve(req.modules, strict=False)
                if not names:
                    warnings.warn(
                        f"tbprobe: snapshot request {req.modules} matches no module",
                        RuntimeWarning,
                        stacklevel=2,
                    )
                self.snapshots.arm(names, req.steps)
        except Exception as exc:
            self._hooks.fail("requests", "watcher", exc)

    def _copy_params(self, optimizer=None):
        """Copies of the trainable parameters before an update: ``(names, copies)``. With an
        ``optimizer``, of its parameters only: another optimizer's step would read as no
        update at all."""
        named = [(n, p) for n, p in self._params if p.requires_grad]
        if optimizer is not None:
            owned = {id(p) for g in optimizer.param_groups for p in g["params"]}
            named = [(n, p) for n, p in named if id(p) in owned]
        if not named:
            return None
        ts = [p.detach() for _, p in named]
        if self._dist is not None:  # DTensors: the local shards
            ts = [local_part(t)[0] for t in ts]
        names = [n for n, _ in named]
        spare, self._spare = self._spare, None
        if (
            spare is not None
            and spare[0] == names
            and all(
                a.shape == b.shape and a.dtype == b.dtype and a.device == b.device
                for a, b in zip(spare[1], ts, strict=True)
            )
        ):
            torch._foreach_copy_(spare[1], ts)
            return names, spare[1]
        return names, torch._foreach_mul(ts, 1.0)

    # ---------------------------------------------------------------- landing, anomalies
    # In tbprobe.probe.landing; bound here as methods, so the step boundary calls them
    # directly (no extra call) and they stay patchable on Probe.
    _poll = poll  # (wait) -> the new anomalies of the steps that landed
    _react = react  # (new, raising=True): write them, then act as on_anomaly says

    # ---------------------------------------------------------------- teardown
    def _check_attached(self, what: str) -> None:
        if not self._attached:
            raise RuntimeError(f"{what}(): the probe is detached")

    def _remove_hooks(self) -> None:
        try:
            self._hooks.remove()
            handles, self._extra_handles = self._extra_handles, []
            for h in handles:
                h.remove()
            self.amp.unwrap_update()
            self.state.close()
            self.state = StepState(self._step)
            self._prev = self._spare = None
        finally:
            w, self._watcher = getattr(self, "_watcher", None), None
            if w is not None:
                w.close()
            restore, self._restore_signal = getattr(self, "_restore_signal", None), None
            if restore is not None:
                restore()


def attach(model: nn.Module, writer, optimizer=None, **kwargs) -> Probe:
    """``Probe(model, writer, optimizer, **kwargs)`` in one line.

    Example::

        probe = tbprobe.attach(model, SummaryWriter("runs/x"), opt, every=10)
    """
    return Probe(model, writer, optimizer, **kwargs)
