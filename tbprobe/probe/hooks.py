"""The probe's hooks: forward outputs, output/input gradients, accumulated parameter grads.

Output gradients come from tensor hooks that the forward hook registers on the module's
output (and input) tensors, not from ``register_full_backward_hook``: a full backward hook
wraps the outputs in a view-producing autograd Function, so an in-place op on an output
(``nn.ReLU(inplace=True)`` after a conv) raises. A tensor hook registered before an in-place
op still receives the gradient of the value the module returned. One hook per tensor (and
version) serves both the module that produced it and the modules that consume it, so a
gradient is reduced once and the consumer's ``grad_input`` event comes before the
producer's ``grad_output`` event, in causal order.

Every hook does nothing on a step that is neither checked nor scheduled, skips
``torch.jit`` tracing and skips the forward that activation checkpointing recomputes during
the backward pass. A forward run without gradients (validation under ``torch.no_grad``,
``torch.inference_mode``) is recorded only for a module that runs no forward with gradients
in the step (see ``StepState.no_grad_forward``). Inside a ``torch.compile``d region the
forward hook does nothing, so it adds no graph break: compiled modules get gradient and
parameter statistics only (those are taken at the step boundary, outside the graph). A hook
that raises disables itself (see ``HookSet.fail``).
"""

from __future__ import annotations

import contextlib
import functools
import warnings
import weakref

import torch

from tbprobe.kernels import host_stats
from tbprobe.probe.collect import StepState
from tbprobe.probe.pack import reduce_grads
from tbprobe.probe.selection import floating_tensors

_ENGINE = torch.autograd.Variable._execution_engine


_compiling = torch.compiler.is_compiling


def _in_backward() -> bool:
    """True while autograd runs a backward graph: a checkpoint recompute is happening."""
    return torch._C._current_graph_task_id() != -1


class _Inert:
    """What a copied or pickled hook becomes: the copy of a probed module or parameter
    (``copy.deepcopy(model)``, ``AveragedModel``, ``torch.save(model)``) is not probed, and
    copying the probe with it would copy its writer."""

    __slots__ = ()

    def __call__(self, *args, **kwargs):
        return None


class _CopiesInert:
    """Mixin: a hook whose deep copy and pickle are :class:`_Inert`."""

    __slots__ = ()

    def __deepcopy__(self, memo):
        return _Inert()

    def __reduce__(self):
        return _Inert, ()


class _Guarded(_CopiesInert):
    """A hook body behind the failure policy (see :meth:`HookSet.fail`); returns None."""

    __slots__ = ("bound", "fn", "key", "owner")

    def __init__(self, owner, key, fn, bound):
        self.owner, self.key, self.fn, self.bound = owner, key, fn, bound

    def __call__(self, *args, **kwargs):
        # Inside a compiled region, first: nothing of the probe's is traced or guarded on
        # (its ``disabled`` set would be a guard of every compiled forward).
        if _compiling() or self.key in self.owner.disabled:
            return None
        try:
            self.fn(*self.bound, *args, **kwargs)
        except Exception as exc:  # a probe failure must never stop training
            self.owner.fail(*self.key, exc)
        return None


class _WeakGuarded(_CopiesInert):
    """:class:`_Guarded` for a parameter's post-accumulate-grad hook, holding its
    :class:`HookSet` weakly: torch does not show those hooks to the garbage collector, so a
    strong reference would keep a model dropped without ``detach()`` (and its probe) alive
    for good. The probe lives as long as its forward hooks' module, or its user's reference.
    """

    __slots__ = ("bound", "fn", "key", "ref")

    def __init__(self, owner, key, fn, bound):
        self.ref, self.key, self.fn, self.bound = weakref.ref(owner), key, fn, bound

    def __call__(self, *args):
        if _compiling():  # compiled autograd: the step boundary reads the gradients
            return None
        owner = self.ref()
        if owner is None or self.key in owner.disabled:
            return None
        try:
            self.fn(owner, *self.bound, *args)
        except Exception as exc:  # a probe failure must never stop training
            owner.fail(*self.key, exc)
        return None


class _SlotHook(_CopiesInert):
    """The backward tensor hook of one :class:`~tbprobe.probe.collect.Slot`: ``_Guarded``
    without a bound method and argument tuple, and with its key shared by every hook of the
    module. One is made per hooked tensor per step, and whatever lives through the step is
    work for the garbage collector."""

    __slots__ = ("key", "owner", "slot")

    def __init__(self, owner, key, slot):
        self.owner, self.key, self.slot = owner, key, slot

    def __call__(self, grad):
        if _compiling() or self.key in self.owner.disabled:
            return None
        try:
            self.owner._backward(self.slot, grad)
        except Exception as exc:  # a probe failure must never stop training
            self.owner.fail(*self.key, exc)
        return None


class _Keys:
    """The tuples the hooks of one module use every step, built once: its three event keys,
    its backward failure-policy key and ``(name,)`` for ``Slot.producers``/``consumers``.
    Tuples kept through a step would otherwise be new objects for the garbage collector."""

    __slots__ = ("backward", "forward", "grad_input", "grad_output", "one")

    def __init__(self, name: str):
        self.forward = (name, "forward", "output")
        self.grad_input = (name, "backward", "grad_input")
        self.grad_output = (name, "backward", "grad_output")
        self.backward = ("backward", name)
        self.one = (name,)


class HookSet:
    """Registers and removes every hook of one probe; hooks read ``owner.state``."""

    def __init__(self, owner):
        self.owner = owner
        self.handles: list = []
        self.disabled: set = set()
        self.errors: list[tuple[str, str, BaseException]] = []
        self._module_keys: dict[str, _Keys] = {}
        self._warned_gone = False  # see _grad_gone
        self._frozen: list = []  # [(name, parameter)] frozen at attach: no grad hook yet

    # ---------------------------------------------------------------- failure policy
    def fail(self, kind: str, where: str, exc: BaseException) -> None:
        """Disable the hook ``(kind, where)``, warn once and record the error."""
        key = (kind, where)
        if key in self.disabled:
            return
        self.disabled.add(key)
        self.errors.append((kind, where, exc))
        warnings.warn(
            f"tbprobe: the {kind} hook of {where!r} failed and is disabled "
            f"({type(exc).__name__}: {exc}); training continues",
            RuntimeWarning,
            stacklevel=3,
        )

    def note(self, kind: str, where: str, exc: BaseException) -> None:
        """Record the error of ``(kind, where)`` and warn once, without disabling it (a
        distributed step must still join the other ranks' collectives)."""
        if any(k == kind and w == where for k, w, _ in self.errors):
            return
        self.errors.append((kind, where, exc))
        warnings.warn(
            f"tbprobe: the {kind} hook of {where!r} failed ({type(exc).__name__}: {exc}); "
            "its step is not logged, training continues",
            RuntimeWarning,
            stacklevel=3,
        )

    def _guarded(self, kind: str, where: str, fn, *bound):
        """``fn(*bound, *args)`` that does nothing once ``(kind, where)`` failed, and disables
        it when it raises. A small callable object: a tensor hook is made per tensor per step,
        and ``functools.wraps`` would cost more than the hook itself."""
        return _Guarded(self, (kind, where), fn, bound)

    # ---------------------------------------------------------------- registration
    def attach(self, modules, params) -> None:
        """Forward hooks on ``modules`` ``[(name, module)]``, post-accumulate-grad hooks on
        ``params`` ``[(name, parameter)]``."""
        for name, m in modules:
            fn = self._guarded("forward", name, self._forward, name)
            self.handles.append(m.register_forward_hook(fn, with_kwargs=True))
        for name, p in params:
            if p.requires_grad:
                self._hook_grad(name, p)
            else:
                self._frozen.append((name, p))

    def _hook_grad(self, name: str, p) -> None:
        fn = _WeakGuarded(self, ("grad", name), HookSet._grad, (name,))
        self.handles.append(p.register_post_accumulate_grad_hook(fn))

    def hook_unfrozen(self, st: StepState | None = None) -> None:
        """Hook the gradients of parameters frozen at attach that require grad now (a
        backbone unfrozen mid-run): a look at the frozen ones at each step boundary and at
        the end of each backward pass, whose step ``st`` takes the gradients they already
        have (their hook was not there to fire)."""
        frozen = self._frozen
        if frozen and any(p.requires_grad for _, p in frozen):
            self._frozen = []
            for name, p in frozen:
                if not p.requires_grad:
                    self._frozen.append((name, p))
                    continue
                self._hook_grad(name, p)
                if st is not None and st.active and p.grad is not None:
                    st.grads[name] = p.grad
                    st.grad_seq[name] = st.next_seq()

    def remove(self) -> None:
        self._frozen = []
        handles, self.handles = self.handles, []
        for h in handles:
            h.remove()

    # ---------------------------------------------------------------- hook bodies
    def _forward(self, name, module, args, kwargs, output) -> None:
        if torch.compiler.is_compiling() or torch.jit.is_tracing():
            return  # compiled regions: gradient and parameter statistics only (no breaks)
        st: StepState = self.owner.state
        if not st.active:
            return
        outs = floating_tensors(output)
        if not outs:
            return
        grad = torch.is_grad_enabled()
        watch = st.backward and grad
        if not _in_backward():  # a checkpoint recompute is not a new forward
            if grad:
                st.grad_forward(name)
                for t in outs:
                    st.volume += t.numel()
            elif self.owner._evaluating() or not st.no_grad_forward(name):
                return  # validation (model.eval() in training) or after this step's training
            if st.in_backward:  # the next micro-batch: its backward has ended
                st.in_backward = False
                st.flush(self.owner.cfg.hist_bins)
            st.rows.maybe_compact()
            ins = floating_tensors(args) or floating_tensors(kwargs)
            now = not grad and torch.is_inference_mode_enabled()  # no version counter
            made = self._forward_stats(st, name, outs, ins, now)
            if made:  # on the host (CPU) a non-finite output is known right here
                self._params_at_fault(st, name, module)
        elif watch:
            ins = floating_tensors(args) or floating_tensors(kwargs)
        if watch:
            self._watch_grads(st, name, outs, ins)

    def _keys(self, name: str) -> _Keys:
        keys = self._module_keys.get(name)
        if keys is None:
            keys = self._module_keys[name] = _Keys(name)
        return keys

    def _forward_stats(self, st: StepState, name, outs, ins, now=False) -> bool:
        """Queue (or, on the host, reduce) the module's outputs and, where needed, inputs;
        True when host rows show the module made a non-finite output from finite inputs."""
        ev = st.event_at(self._keys(name).forward)
        made = False
        if ev.rows:  # called before in this step
            ev.new_call(st.next_seq())
        if len(outs) == 1:  # one slot: found or made once (its backward hook reuses it)
            s = st.slot(outs[0])
            if s.row is None:
                s.row = st.add(outs[0], name, now)
            rids = [s.row]
        else:
            rids = []
            for t in outs:  # a hooked child's output returned as is (containers): its row
                s = st.slot(t, create=False)
                if s is None or s.row is None:
                    rids.append(st.add(t, name, now))
                else:
                    rids.append(s.row)
        ev.rows.extend(rids)
        # Inputs matter only for an output with NaN/Inf (producer or propagator?); host
        # tensors are reduced at once, so finite outputs skip them (inputs_nonfinite: None).
        if ins and (not st.rows.host(outs[0]) or not st.rows.bad.isdisjoint(rids)):
            inputs = []
            for t in ins:
                s = st.slot(t, create=False)
                inputs.append(s.row if s is not None and s.row is not None else st.rows.add_nf(t))
            ev.inputs = inputs if ev.inputs is None else ev.inputs + inputs
            bad = st.rows.bad
            made = not bad.isdisjoint(rids) and bad.isdisjoint(inputs) and st.rows.all_host()
        snap = st.snap is not None and name in st.snap
        if (st.hist or snap) and name not in st.act_hists:
            st.add_hist(name, outs[0], self.owner.cfg.hist_bins)
        if snap and name not in st.thumbs and ("snapshot", name) not in self.disabled:
            try:  # a failed thumbnail must not take the module's statistics with it
                st.thumbs[name] = self.owner.snapshots.capture(outs[0], name)
            except Exception as exc:
                self.fail("snapshot", name, exc)
        return made

    def _params_at_fault(self, st: StepState, name, module) -> None:
        """``module`` made a host output non-finite from finite inputs: if one of its
        parameters is non-finite now, before any backward of the step, the optimizer step
        (or code) before this forward made it so; ``st.param_faults`` says which."""
        for pname, p in module.named_parameters():
            if not (p.is_floating_point() and p.is_cpu):
                continue
            if host_stats.nonfinite_count(p) > 0:  # host code, as the hooks' own counts
                st.param_faults.append((name, pname))
                return

    def _watch_grads(self, st: StepState, name, outs, ins) -> None:
        one = self._keys(name).one
        for t in outs:
            if t.requires_grad:
                s = self._watch(st, name, t)
                s.producers = s.producers + one if s.producers else one
        for t in ins:
            if t.requires_grad:
                s = self._watch(st, name, t)
                s.consumers = s.consumers + one if s.consumers else one

    def _watch(self, st: StepState, name, t):
        s = st.slot(t)
        if s.handle is None:
            s.handle = t.register_hook(_SlotHook(self, self._keys(name).backward, s))
        return s

    def _backward(self, slot, grad) -> None:
        st: StepState = self.owner.state
        if not st.backward or grad is None:
            return
        if not st.in_backward:  # the forward has ended: reduce what it queued
            st.in_backward = True
            st.flush(self.owner.cfg.hist_bins)
        st.rows.maybe_compact()
        rid = st.add(grad)
        for m in slot.consumers:  # the gradient w.r.t. m's input: m produced it
            ev = st.event_at(self._keys(m).grad_input)
            if ev.rows:
                ev.new_call(st.next_seq())
            ev.rows.append(rid)
            gout = st.pending_gout.pop(m, None)
            if gout is not None:
                ev.inputs = gout if ev.inputs is None else ev.inputs + gout
        for m in slot.producers:  # the gradient w.r.t. m's output: m consumes it next
            ev = st.event_at(self._keys(m).grad_output)
            if ev.rows:
                ev.new_call(st.next_seq())
            ev.rows.append(rid)
            gout = st.pending_gout.get(m)
            if gout is None:
                st.pending_gout[m] = [rid]
            else:
                gout.append(rid)

    def _grad(self, name, param) -> None:
        st: StepState = self.owner.state
        if st.active:
            if not st.in_backward:
                st.in_backward = True
                st.flush(self.owner.cfg.hist_bins)
            # The last accumulation's place in execution order: a gradient accumulated over
            # micro-batches is read once, after the last one (a NaN the forward made in a
            # later micro-batch comes before it).
            st.grad_seq[name] = st.next_seq()
            # Reduced at the end of the backward pass (see _end_backward), else at the step
            # boundary: the tensor is kept, so a zero_grad(set_to_none=True) before a manual
            # probe.step() does not lose it.
            g = st.grads[name] = param.grad
            if g is None and not self._warned_gone:
                self._grad_gone(name)
            task = torch._C._current_graph_task_id()
            if task not in st.grad_tasks:
                st.grad_tasks.add(task)
                # (outside a backward pass it raises: the grads are read at the boundary)
                # (compiled autograd refuses it outside fullgraph: AssertionError)
                with contextlib.suppress(RuntimeError, AssertionError):
                    _ENGINE.queue_callback(functools.partial(self._end_backward, st, task))

    def _grad_gone(self, name: str) -> None:
        """A post-accumulate-grad hook registered before the probe's took the gradient
        (an optimizer step inside the backward that sets ``.grad`` to None): say so once."""
        self._warned_gone = True
        warnings.warn(
            f"tbprobe: the gradient of {name!r} was already gone when the probe's hook ran "
            "(an optimizer step inside the backward pass, hooked before the probe?): its "
            "gradient statistics are missing; attach the probe before registering such hooks",
            RuntimeWarning,
            stacklevel=2,
        )

    def _end_backward(self, st: StepState, task: int) -> None:
        """The end of a backward pass that accumulated gradients (an autograd final
        callback: it must not raise). Queues the reduction behind the callbacks queued so far
        (DistributedDataParallel's, which write the reduced gradients), unless this is a
        nested backward (reentrant activation checkpointing, inside a node of the outer
        one): the outer one's end comes later."""
        st.grad_tasks.discard(task)
        if torch._C._current_autograd_node() is not None:
            return
        try:
            _ENGINE.queue_callback(functools.partial(self._grads_done, st))
        except Exception as exc:
            self.fail("grad", "<end of backward>", exc)

    def _grads_done(self, st: StepState) -> None:
        """Reduce the step's gradients now, before anything between the backward pass and
        the optimizer step changes them in place: gradient clipping (the norms are the
        gradients' own, as ``clip_grad_norm_`` returns them), ``zero_grad`` before a manual
        ``probe.step()``. With gradient accumulation, the last backward's reduction counts."""
        if st is not self.owner.state or ("grad", "<end of backward>") in self.disabled:
            return
        try:
            self.hook_unfrozen(st)
            reduce_grads(self.owner, st)
        except Exception as exc:  # a final callback that raises would fail the backward
            self.fail("grad", "<end of backward>", exc)
