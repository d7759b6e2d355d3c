"""Hugging Face ``transformers.Trainer`` callback; ``transformers`` is imported on first use.

Example::

    from tbprobe.integrations.hf import TbProbeCallback

    trainer = Trainer(model, args, train_dataset=ds, callbacks=[TbProbeCallback(every=50)])
"""

from __future__ import annotations

import os

from tbprobe.integrations._common import lazy_class

__all__ = ["TbProbeCallback"]  # noqa: F822 - built on first access by __getattr__


def _build():
    from transformers import TrainerCallback

    from tbprobe.integrations._common import ProbeSession

    class TbProbeCallback(TrainerCallback):
        """Attach a ``tbprobe.Probe`` to the Trainer's model for the length of ``train()``.

        ``writer``: a tbprobe ``SummaryWriter`` to write to; else one is made in ``logdir``,
        else where the Trainer logs (see ``_default_logdir``), and closed at the end of
        training. Other keyword arguments go to ``tbprobe.Probe`` (``every``,
        ``histogram_every``, ...). The probe's step follows the Trainer's optimizer steps
        (its step post-hook), so gradient accumulation is handled, and is numbered as the
        Trainer numbers its logs (the first optimizer step is 1; a resumed run goes on from
        its checkpoint's step, and its writer purges what the abandoned run wrote from
        there). Under DDP every process attaches a probe and only the main one writes. The
        Trainer calls no callback when ``train()`` raises: the probe then stays attached
        until the next ``train()`` or ``callback.probe.detach()``.
        """

        def __init__(self, writer=None, logdir=None, **probe_kwargs):
            self._session = ProbeSession(writer, logdir, probe_kwargs)

        @property
        def probe(self):
            """The attached ``tbprobe.Probe`` while training runs, else None."""
            return self._session.probe

        def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
            if model is None:
                return
            # The Trainer logs an optimizer step's values at global_step after the step
            self._session.start(
                model,
                optimizer,
                _default_logdir(args),
                start_step=state.global_step + 1,
                main=state.is_world_process_zero,
                resumed=state.global_step > 0,
            )

        def on_train_end(self, args, state, control, **kwargs):
            self._session.stop()

    return TbProbeCallback


def _default_logdir(args) -> str:
    """Where the Trainer's own TensorBoard logs go: ``args.logging_dir`` (transformers
    before 5), ``TENSORBOARD_LOGGING_DIR``, else a run of its own under
    ``<output_dir>/runs`` (``<date>_<host>``, as the Trainer names it), so that two runs in
    one output directory are two runs in TensorBoard."""
    import socket
    from datetime import datetime

    found = getattr(args, "logging_dir", None) or os.environ.get("TENSORBOARD_LOGGING_DIR")
    if found:
        return found
    run = datetime.now().strftime("%b%d_%H-%M-%S") + "_" + socket.gethostname()
    return os.path.join(args.output_dir, "runs", run)


__getattr__ = lazy_class(__name__, _build)
