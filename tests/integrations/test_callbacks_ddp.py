"""The callbacks under DDP (2 gloo processes on the CPU): every process attaches a probe, so
each logged step's collective has all ranks (a probe on rank 0 alone hung Lightning and made
HF's gather fail); only the main process writes, and the written gradient norm is the
Trainer's.

Each script ends with ``destroy_process_group()``, as torch asks: a gloo group left for the
interpreter's exit can abort a rank ("terminate called without an active exception"), which
failed CI once on the HF script."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tbprobe.writer.reader import read_events

REPO = Path(__file__).resolve().parents[2]
TIMEOUT = 180  # seconds: two processes that import a framework; a hang fails, not waits

_HF = """
import json, os, sys
import torch, transformers
from tbprobe.integrations.hf import TbProbeCallback

out = sys.argv[1]
torch.manual_seed(0)
config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=16,
                                 bos_token_id=0, eos_token_id=0)
g = torch.Generator().manual_seed(1)
data = [{"input_ids": r, "labels": r} for r in torch.randint(0, 50, (32, 16), generator=g)]
args = transformers.TrainingArguments(output_dir=os.path.join(out, "hf"), max_steps=3,
    per_device_train_batch_size=2, use_cpu=True, disable_tqdm=True, report_to=[],
    save_strategy="no", logging_steps=1)
trainer = transformers.Trainer(model=transformers.GPT2LMHeadModel(config), args=args,
    train_dataset=data, callbacks=[TbProbeCallback(logdir=os.path.join(out, "probe"), every=1)])
trainer.train()
if trainer.is_world_process_zero():
    logged = {h["step"]: h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h}
    with open(os.path.join(out, "trainer.json"), "w") as f:
        json.dump(logged, f)
torch.distributed.destroy_process_group()  # torch's rule: a gloo group left to exit may abort
"""

_LIGHTNING = """
import os, sys
import torch
from torch import nn
import lightning.pytorch as pl
from tbprobe.integrations.lightning import TbProbeCallback

class M(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    def training_step(self, b, i):
        return nn.functional.mse_loss(self.net(b[0]), b[1])
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)

if __name__ == "__main__":
    out = sys.argv[1]
    torch.manual_seed(0)
    x = torch.randn(64, 8)
    data = torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True))
    trainer = pl.Trainer(max_steps=3, accelerator="cpu", devices=2, strategy="ddp", logger=False,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        default_root_dir=out, callbacks=[TbProbeCallback(os.path.join(out, "probe"), every=1)])
    trainer.fit(M(), torch.utils.data.DataLoader(data, batch_size=8))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list[str], tmp_path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "MASTER_ADDR": "127.0.0.1"}
    env["MASTER_PORT"] = str(_free_port())
    # A session of its own: a hang kills every process the launcher started, not just it.
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=env, cwd=str(tmp_path), start_new_session=True)  # fmt: skip
    try:
        _, err = child.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        _, err = child.communicate()
        pytest.fail(f"hung for {TIMEOUT} s:\n{err[-3000:]}")
    assert child.returncode == 0, err[-3000:]


def _norms(logdir) -> dict[int, float]:
    out = {}
    for ev in read_events(str(logdir), recursive=True):
        for v in ev.summary.value:
            if v.tag == "grad_norm/_total":
                out[ev.step] = v.simple_value
    return out


def test_hf_trainer_under_ddp(tmp_path):
    pytest.importorskip("transformers")
    script = tmp_path / "hf_ddp.py"
    script.write_text(textwrap.dedent(_HF))
    port = _free_port()
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
          "--master_port", str(port), str(script), str(tmp_path)], tmp_path)  # fmt: skip
    logged = {int(k): v for k, v in json.loads((tmp_path / "trainer.json").read_text()).items()}
    assert sorted(logged) == [1, 2, 3]
    assert len(list((tmp_path / "probe").iterdir())) == 1  # the main process's file only
    assert _norms(tmp_path / "probe") == pytest.approx(logged, rel=1e-4)


def test_lightning_under_ddp(tmp_path):
    pytest.importorskip("lightning")
    script = tmp_path / "pl_ddp.py"
    script.write_text(textwrap.dedent(_LIGHTNING))
    _run([sys.executable, str(script), str(tmp_path)], tmp_path)
    assert len(list((tmp_path / "probe").iterdir())) == 1
    assert sorted(_norms(tmp_path / "probe")) == [0, 1, 2]
