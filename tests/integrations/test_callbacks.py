"""The Hugging Face Trainer and Lightning callbacks attach a probe for the length of training."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tbprobe.writer.reader import read_events


def _scalars(logdir) -> dict[str, dict[int, float]]:
    out: dict[str, dict[int, float]] = {}
    for ev in read_events(str(logdir), recursive=True):
        for v in ev.summary.value:
            if v.HasField("simple_value"):
                out.setdefault(v.tag, {})[ev.step] = v.simple_value
    return out


def test_integrations_import_their_framework_lazily():
    """Importing the callback modules loads neither transformers nor lightning."""
    code = (
        "import sys, tbprobe.integrations.hf, tbprobe.integrations.lightning\n"
        "print('transformers' in sys.modules, 'lightning' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def _hf_trainer(tmp_path, max_steps, callback, **args):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=1,
        n_embd=16,
        n_head=2,
        vocab_size=50,
        n_positions=16,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = transformers.GPT2LMHeadModel(config)
    ids = torch.randint(0, 50, (16, 16))
    data = [{"input_ids": row, "labels": row} for row in ids]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=max_steps,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        logging_steps=1,
        **{"save_strategy": "no", **args},
    )
    return transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[callback])


def test_hf_trainer_callback_writes_probe_tags(tmp_path):
    """A tiny GPT-2 built from a config trains 4 steps under Trainer; the probe writes the grad
    norm of every parameter at every optimizer step, at the Trainer's own steps (1..4) and
    equal to the (pre-clipping) grad_norm the Trainer logs, and detaches at the end."""
    pytest.importorskip("transformers")
    from tbprobe.integrations.hf import TbProbeCallback

    callback = TbProbeCallback(every=1)  # no logdir: <output_dir>/runs
    trainer = _hf_trainer(tmp_path, 4, callback, max_grad_norm=1e-3)
    trainer.train()
    assert callback.probe is None  # detached at on_train_end
    scalars = _scalars(tmp_path / "out" / "runs")
    assert sorted(scalars["grad_norm/_total"]) == [1, 2, 3, 4]  # one per optimizer step
    logged = {h["step"]: h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h}
    assert sorted(logged) == [1, 2, 3, 4] and min(logged.values()) > 1e-2  # clipped: 1e-3
    for step, norm in logged.items():
        assert scalars["grad_norm/_total"][step] == pytest.approx(norm, rel=1e-5)
    names = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    for name in names:
        assert sorted(scalars[f"grad_norm/{name}"]) == [1, 2, 3, 4], name
    for step, total in scalars["grad_norm/_total"].items():
        per = [scalars[f"grad_norm/{n}"][step] for n in names]
        assert total == pytest.approx(sum(v * v for v in per) ** 0.5, rel=1e-4)


def test_hf_resumed_training_goes_on_at_the_trainers_step(tmp_path):
    """Resumed from its step-2 checkpoint, a run to 4 steps writes the probe's steps 3 and 4."""
    pytest.importorskip("transformers")
    from tbprobe.integrations.hf import TbProbeCallback

    first = TbProbeCallback(logdir=str(tmp_path / "a"), every=1)
    _hf_trainer(tmp_path, 2, first, save_strategy="steps", save_steps=2).train()
    again = TbProbeCallback(logdir=str(tmp_path / "b"), every=1)
    _hf_trainer(tmp_path, 4, again).train(resume_from_checkpoint=True)
    assert sorted(_scalars(tmp_path / "a")["grad_norm/_total"]) == [1, 2]
    assert sorted(_scalars(tmp_path / "b")["grad_norm/_total"]) == [3, 4]


def _regressor():
    import lightning.pytorch as pl

    class Regressor(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(
                torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1)
            )

        def training_step(self, batch, _):
            x, y = batch
            return torch.nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    torch.manual_seed(0)
    x = torch.randn(40, 8)
    data = torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True))
    return Regressor(), torch.utils.data.DataLoader(data, batch_size=8)


def _pl_trainer(max_steps, callback):
    import lightning.pytorch as pl

    return pl.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback],
    )


def test_lightning_callback_writes_probe_tags(tmp_path):
    """A LightningModule fits 5 steps; the probe writes grad and param norms every step, and
    its act_rms tags name the module's own submodules."""
    pytest.importorskip("lightning")
    from tbprobe.integrations.lightning import TbProbeCallback

    callback = TbProbeCallback(str(tmp_path / "logs"), every=1)
    _pl_trainer(5, callback).fit(*_regressor())
    assert callback.probe is None
    scalars = _scalars(tmp_path / "logs")
    assert sorted(scalars["grad_norm/_total"]) == [0, 1, 2, 3, 4]
    assert sorted(scalars["param_norm/net.0.weight"]) == [0, 1, 2, 3, 4]
    assert "act_rms/net.0" in scalars and "act_rms/net.2" in scalars


def test_lightning_resumed_fit_goes_on_at_the_trainers_step(tmp_path):
    """Resumed from a checkpoint taken after 5 steps, a fit to 8 writes steps 5, 6 and 7."""
    pytest.importorskip("lightning")
    from tbprobe.integrations.lightning import TbProbeCallback

    model, loader = _regressor()
    trainer = _pl_trainer(5, TbProbeCallback(str(tmp_path / "a"), every=1))
    trainer.fit(model, loader)
    trainer.save_checkpoint(tmp_path / "ck.ckpt")
    model, loader = _regressor()
    _pl_trainer(8, TbProbeCallback(str(tmp_path / "b"), every=1)).fit(
        model, loader, ckpt_path=tmp_path / "ck.ckpt"
    )
    assert sorted(_scalars(tmp_path / "b")["grad_norm/_total"]) == [5, 6, 7]


def test_callback_rejects_writer_and_logdir_together():
    """Giving both a writer and a logdir is refused, naming the argument."""
    from tbprobe.integrations._common import ProbeSession

    with pytest.raises(ValueError, match="logdir"):
        ProbeSession(writer=object(), logdir="runs/x")
    with pytest.raises(TypeError, match="logdir"):
        ProbeSession(logdir=3)


def test_bad_callback_arguments_fail_at_construction():
    """A log directory passed as the HF callback's first (``writer``) argument, or a typo in a
    Probe keyword, fails where the callback is made, naming the argument, not when training
    starts."""
    from tbprobe.integrations._common import ProbeSession

    with pytest.raises(TypeError, match=r"writer: expected a SummaryWriter, got str \(a log"):
        ProbeSession("runs/x")
    with pytest.raises(TypeError, match="histogram_evry: not an argument of tbprobe.Probe"):
        ProbeSession(logdir="runs/x", probe_kwargs={"histogram_evry": 5})


def test_resumed_session_purges_what_the_abandoned_run_wrote(tmp_path):
    """A session started at a resumed step purges the log directory from there (TensorBoard
    and ``tbprobe report`` then show the resumed timeline only); a fresh one does not."""
    from tbprobe.integrations._common import ProbeSession

    model = torch.nn.Linear(2, 2)
    for resumed, logdir in ((False, tmp_path / "fresh"), (True, tmp_path / "resumed")):
        session = ProbeSession(logdir=str(logdir), probe_kwargs={"watch_requests": False})
        session.start(model, None, start_step=5, resumed=resumed)
        session.stop()
        starts = [e.step for e in read_events(str(logdir)) if e.session_log.status == 1]
        assert starts == ([5] if resumed else [])
