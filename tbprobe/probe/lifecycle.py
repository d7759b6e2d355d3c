"""A probe's life beside the training code it watches: a model split over devices refused
at attach, a second probe on one model noticed, another optimizer stepping the probed
parameters noticed, the steps in flight written at interpreter exit."""

from __future__ import annotations

import contextlib
import warnings
import weakref

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

__all__ = [
    "OTHER_STEPS",
    "flush_at_exit",
    "one_device",
    "register_probe",
    "unregister_probe",
    "replaced_params",
    "watch_other_optimizers",
]

# The probes attached to each model and writing to each writer, and the next step of the
# last probe detached from a writer (weakly: nothing is kept alive by these).
_PROBED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_WRITING: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_NEXT_STEP: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def register_probe(probe, model) -> None:
    """Remember ``probe`` as attached to ``model`` and writing to its writer, warning when
    another probe still is attached to the model (a notebook cell run twice, a training
    function re-run after an exception: both log every step, doubling the cost and, into one
    log directory, every point), or writes to the same writer (a GAN's two models: their
    tags are the same, their points mix in one run), or when this one starts below the
    steps an earlier probe wrote there (a re-attach without ``start_step``)."""
    live = [p for p in _PROBED.get(model, ()) if p is not probe and p._attached]
    if live:
        old = getattr(live[0].writer, "logdir", None)
        where = f" (writing to {old})" if old else ""
        _warn(
            f"this {type(model).__name__} already has a Probe attached{where}; both now log "
            "every step, doubling the cost and, into one log directory, every point. Detach "
            "the first (probe.detach(), or attach with `with`) before attaching again"
        )
    _PROBED.setdefault(model, weakref.WeakSet()).add(probe)
    writer = probe.writer
    if writer is None:
        return
    others = [p for p in _WRITING.get(writer, ()) if p is not probe and p._attached]
    if others and not live:
        _warn(
            "this writer already has a Probe writing to it (on another model); both write "
            "the same tags (grad_norm/_total, ...) into one run, mixing their points. Give "
            "each probe its own writer, e.g. SummaryWriter(f'{logdir}/generator')"
        )
    with contextlib.suppress(TypeError):  # a writer that cannot be weakly referenced
        _WRITING.setdefault(writer, weakref.WeakSet()).add(probe)
        after = _NEXT_STEP.get(writer)
        if after is not None and probe.cfg.start_step < after:
            _warn(
                f"an earlier probe wrote steps up to {after - 1} to this writer; this one "
                f"starts at step {probe.cfg.start_step}, so TensorBoard shows both on one "
                f"axis. Pass start_step={after} to go on from there"
            )


def unregister_probe(probe) -> None:
    """At detach: remember the next step of ``probe`` on its writer."""
    writer = probe.writer
    if writer is not None:
        with contextlib.suppress(TypeError):
            _NEXT_STEP[writer] = max(_NEXT_STEP.get(writer, 0), probe.global_step)


def _warn(msg: str) -> None:
    warnings.warn(f"tbprobe: {msg}", RuntimeWarning, stacklevel=5)


OTHER_STEPS = 10  # another optimizer's steps of the probed parameters in a row: warn


def watch_other_optimizers(probe):
    """A global optimizer step post-hook (removed at detach) that warns once when another
    optimizer steps the probed parameters ``OTHER_STEPS`` times while the probed one does
    not: the probe's steps follow its optimizer, so a replaced optimizer (a new training
    phase) leaves it logging nothing. Held weakly: the hook does not keep the probe alive."""
    ref, counts = weakref.ref(probe), {"other": 0, "warned": False}
    overlaps: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def other_step(optimizer, args, kwargs):
        p = ref()
        if p is None or optimizer is p.optimizer or counts["warned"]:
            return
        hit = overlaps.get(optimizer)
        if hit is None:
            mine = {id(t) for _, t in p._params}
            groups = optimizer.param_groups
            hit = overlaps[optimizer] = any(id(t) in mine for g in groups for t in g["params"])
        if not hit:
            return
        if counts.get("at") != p._step:  # the probe's optimizer stepped since: count anew
            counts["at"], counts["other"] = p._step, 0
        counts["other"] += 1
        if counts["other"] >= OTHER_STEPS:
            counts["warned"] = True
            warnings.warn(
                f"tbprobe: a {type(optimizer).__name__} stepped the probed parameters "
                f"{OTHER_STEPS} times while the probe's own optimizer did not: the probe's "
                "steps follow the optimizer it was given, so nothing is being logged. After "
                "replacing the optimizer, re-attach: probe.detach(); tbprobe.attach(model, "
                "writer, new_optimizer, start_step=probe.global_step)",
                RuntimeWarning,
                stacklevel=2,
            )

    return register_optimizer_step_post_hook(torch.compiler.disable(other_step))


def flush_at_exit(ref) -> None:
    """At interpreter exit (before the writer's own exit close, registered earlier): write
    the steps still in flight of a probe left attached (on CUDA the last ones are)."""
    p = ref()
    if p is not None and p._attached:
        with contextlib.suppress(Exception):  # logging never fails an exit
            p.flush()


def one_device(params: list) -> None:
    """ValueError naming two parameters on different devices: one process's tensors are
    reduced and packed on one device (a model split over GPUs, e.g. ``device_map="auto"``,
    is not supported; DDP/FSDP hold each rank's parameters on its own device)."""
    at: dict = {}
    for n, p in params:
        at.setdefault(p.device, n)
    if len(at) > 1:
        (d0, n0), (d1, n1) = list(at.items())[:2]
        raise ValueError(
            f"model: parameters on more than one device ({n0!r} on {d0}, {n1!r} on {d1}); "
            "tbprobe reduces and packs a process's tensors on one device, so a model split "
            "over devices is not supported: use one device per process (DDP/FSDP)"
        )


def replaced_params(base, params: list) -> None:
    """At the first step boundary: warn when ``base``'s parameters are no longer the ones
    the probe hooked at attach (``fully_shard`` applied after attaching, a layer swapped
    before training): the probe would read stale tensors and miss the new gradients."""
    now = [id(p) for p in base.parameters()]
    if now != [id(p) for _, p in params]:
        warnings.warn(
            "tbprobe: the model's parameters were replaced after the probe attached (e.g. "
            "fully_shard or a new layer assigned after attach): the probe reads the ones it "
            "was given, so its gradient and parameter statistics are stale. Attach the probe "
            "after wrapping or sharding the model",
            RuntimeWarning,
            stacklevel=4,
        )
