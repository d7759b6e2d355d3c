"""Lightning callback; ``lightning`` (or ``pytorch_lightning``) is imported on first use.

Example::

    from tbprobe.integrations.lightning import TbProbeCallback

    trainer = lightning.Trainer(callbacks=[TbProbeCallback("runs/exp", every=50)])
"""

from __future__ import annotations

from tbprobe.integrations._common import lazy_class

__all__ = ["TbProbeCallback"]  # noqa: F822 - built on first access by __getattr__


def _callback_base():
    try:
        from lightning.pytorch import Callback
    except ImportError:
        try:
            from pytorch_lightning import Callback
        except ImportError as e:
            raise ImportError(
                "tbprobe.integrations.lightning needs the 'lightning' package "
                "(pip install lightning)"
            ) from e
    return Callback


def _build():
    from tbprobe.integrations._common import ProbeSession

    class TbProbeCallback(_callback_base()):
        """Attach a ``tbprobe.Probe`` to the LightningModule for the length of ``fit()``.

        ``logdir``: where a tbprobe ``SummaryWriter`` is made (default: the trainer's
        ``log_dir``, else ``lightning_logs``), or pass ``writer=``. Other keyword arguments go
        to ``tbprobe.Probe``. The probe's step follows the first optimizer's steps, numbered
        as ``trainer.global_step`` (a resumed run goes on from its checkpoint's step, and its
        writer purges what the abandoned run wrote from there). Under DDP every rank attaches
        a probe and only global rank 0 writes.
        """

        def __init__(self, logdir=None, *, writer=None, **probe_kwargs):
            super().__init__()
            self._session = ProbeSession(writer, logdir, probe_kwargs)

        @property
        def probe(self):
            """The attached ``tbprobe.Probe`` while fitting, else None."""
            return self._session.probe

        def on_train_start(self, trainer, pl_module):
            # Not on_fit_start: a resumed run's global_step is restored after it
            optimizer = trainer.optimizers[0] if trainer.optimizers else None
            self._session.start(
                pl_module,
                optimizer,
                _default_logdir(trainer),
                start_step=trainer.global_step,
                main=trainer.global_rank == 0,
                resumed=trainer.global_step > 0,
            )

        def on_fit_end(self, trainer, pl_module):
            self._session.stop()

        def on_exception(self, trainer, pl_module, exception):
            self._session.stop()

    return TbProbeCallback


def _default_logdir(trainer) -> str:
    """The trainer's ``log_dir`` (its logger's version directory), or ``lightning_logs``
    under its root without a logger. Every rank asks: ``log_dir`` is a collective."""
    import os

    log_dir = trainer.log_dir
    if trainer.logger is None:
        return os.path.join(trainer.default_root_dir, "lightning_logs")
    return log_dir or "lightning_logs"


__getattr__ = lazy_class(__name__, _build)
