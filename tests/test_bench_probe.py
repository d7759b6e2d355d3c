"""``benchmarks/bench_probe.py`` on the CPU: its ``--quick`` mode end to end, its argument
checks, its target verdicts, and that its read-back checks catch a logger that stopped logging."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.scripts import loaded_script

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "bench_probe.py"


@pytest.fixture(scope="module")
def bench():
    with loaded_script(SCRIPT, "bench_probe_under_test") as mod:
        yield mod


def _probe_importable() -> bool:
    import tbprobe

    try:
        tbprobe.Probe  # noqa: B018 - the lazy attribute is what the script imports
    except AttributeError:
        return False
    return True


def _selection_importable() -> bool:
    try:
        from tbprobe.probe.selection import floating_tensors, select_modules  # noqa: F401
    except ImportError:
        return False
    return True


def _bench(mod, tmp_path, **kw):
    return mod.Bench(
        device=torch.device("cpu"), repeats=1, window_s=0.05, budget_s=5.0, root=str(tmp_path),
        unavailable={}, **kw,
    )  # fmt: skip


@pytest.mark.slow
def test_quick_run_end_to_end(tmp_path):
    """--quick on the CPU exits 0, measures every available configuration for both models with
    a passing read-back check, writes the JSON rows and targets, and prints both tables."""
    out = tmp_path / "probe.json"
    cmd = [sys.executable, str(SCRIPT), "--quick", "--device", "cpu", "--repeats", "1"]
    cmd += ["--steps", "1", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    rows = {(r["model"], r["config"]): r for r in doc["rows"]}
    configs = ("none", "tbprobe", "tbprobe-grads", "floor", "tbprobe+hist", "wandb.watch")
    configs += ("tensorboardX",)
    assert set(rows) == {(m, c) for m in ("transformer LM", "CNN") for c in configs}
    measured = {"none", "wandb.watch", "tensorboardX"}  # wandb is a dev dependency
    if _probe_importable():
        measured |= {"tbprobe", "tbprobe-grads", "tbprobe+hist"}
    if _selection_importable():
        measured |= {"floor"}
    for (model, cfg), r in rows.items():
        if cfg not in measured:
            assert r["status"].startswith("not available"), (model, cfg, r["status"])
            continue
        assert r["status"] == "ok" and r["check"] == "ok", (model, cfg, r)
        # One round: every other configuration once, each between two no-probe windows.
        windows = 1 + len(measured) - 1 if cfg == "none" else 1
        assert r["step_s"] > 0 and r["windows"] == windows and r["steps_per_window"] == 1
        assert r["overhead"] == 0.0 if cfg == "none" else isinstance(r["overhead"], float)
    verdicts = [t["verdict"] for t in doc["targets"]]
    assert verdicts[2:4] == ["n/a on cpu", "n/a on cpu"]
    floor = doc["targets"][4]  # informational: no PASS/FAIL
    assert floor["target"] == "cpu: floor (bare reductions) overhead"
    if "floor" in measured:
        assert floor["verdict"] == "info" and isinstance(floor["value"], float)
    cpu_ok = ("PASS", "FAIL") if _probe_importable() else ("n/a",)
    assert all(v.split()[0] in cpu_ok for v in verdicts[:2]), verdicts
    for heading in ("### transformer LM (", "### CNN ("):
        assert heading in proc.stdout
    assert proc.stdout.count("| no probe | ") == 2
    assert "- info: cpu: floor (bare reductions) overhead" in proc.stdout


BAD_ARGS = [["--repeats", "0"], ["--window-s", "0"], ["--steps", "0"], ["--device", "tpu"]]


@pytest.mark.parametrize("argv", [*BAD_ARGS, ["--configs", "none,tbprobe,watch"]])
def test_bad_arguments_exit_2(bench, argv, capsys):
    """A bad --repeats, --window-s, --steps, --device or --configs is refused with exit status
    2, naming the option."""
    with pytest.raises(SystemExit) as exc:
        bench.main(argv)
    assert exc.value.code == 2
    assert argv[0] in capsys.readouterr().err


def _rows(bench, norms, wandb, hist=0.01, device="cpu"):
    rows = []
    for model, o, w in zip(("LM", "CNN"), norms, wandb, strict=True):
        for cfg, v in ((bench.NORMS, o), (bench.WANDB, w), (bench.HISTS, hist)):
            rows.append(dict(model=model, config=cfg, status="ok", check="ok", overhead=v))
    return rows


def test_targets_verdicts(bench, tmp_path):
    """The CPU targets take the worse model: max overhead ≤ 10%, and wandb.watch's overhead at
    least 5× tbprobe's on every model (a tbprobe overhead below 0.01% counts as 0.01%)."""
    b = _bench(bench, tmp_path)
    b.rows = _rows(bench, norms=[0.02, 0.08], wandb=[0.5, 0.5])
    got = [(t["verdict"], t["value"]) for t in bench.targets(b)]
    assert got[0] == ("PASS", 0.08) and got[1][0] == "PASS" and got[1][1] == pytest.approx(6.25)
    b.rows = _rows(bench, norms=[0.11, -0.01], wandb=[0.5, 0.5])
    got = [(t["verdict"], t["value"]) for t in bench.targets(b)]
    assert got[0] == ("FAIL", 0.11) and got[1][0] == "FAIL"  # 0.5 / 0.11 < 5
    b.rows = _rows(bench, norms=[0.05, -0.01], wandb=[0.3, 0.5])
    got = [(t["verdict"], t["value"]) for t in bench.targets(b)]
    assert got[:2] == [("PASS", 0.05), ("PASS", pytest.approx(6.0))]  # LM 6×, CNN 5000×
    b.rows[0]["check"] = "WRONG: nothing written"
    assert [t["verdict"] for t in bench.targets(b)][:2] == ["FAIL (wrong result)"] * 2


def test_each_window_is_compared_with_the_no_probe_windows_around_it(bench, tmp_path, monkeypatch):
    """Rounds run none, A, none, B, none, ...; each overhead is the ratio to the mean of the
    two neighbouring no-probe windows, so a machine slowing down steadily (here 10% per
    window) does not show up as overhead: a configuration 20% slower reads +20%, a free one
    0%, whatever its place in the rotated order."""
    clock = {"w": 0}
    cost = {"none": 1.0, "tbprobe": 1.2, "wandb.watch": 1.0}

    def window(model, cfg, r, n):
        clock["w"] += 1
        return 0.01 * cost[cfg] * 1.1 ** clock["w"], 1, "ok"

    b = _bench(bench, tmp_path, steps=1)
    b.repeats = 3
    b.unavailable = {c: "not here" for c in bench.CONFIGS if c not in cost}
    monkeypatch.setattr(b, "window", window)
    b.run_model(_tiny_model(bench))
    rows = {r["config"]: r for r in b.rows if r["status"] == "ok"}
    assert rows["none"]["windows"] == 3 * 3 and rows["tbprobe"]["windows"] == 3
    # the neighbours' mean is (1 + 1.1²) / 2 = 1.105 of the window before: ratio = 1.1 / 1.105
    drift = 1.1 / 1.105
    assert rows["tbprobe"]["overhead"] == pytest.approx(1.2 * drift - 1)
    assert rows["wandb.watch"]["overhead"] == pytest.approx(drift - 1)
    assert abs(rows["wandb.watch"]["overhead"]) < 0.005


class _SilentProbe:
    """Attaches nothing and writes nothing: a probe that stopped working."""

    def __init__(self, model, writer, **kwargs):
        pass

    def detach(self):
        pass


def _tiny_model(bench):
    torch.manual_seed(0)
    module = bench.cnn((4,))
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 2])
    opt = torch.optim.SGD(module.parameters(), lr=0.1)
    return bench.Model(name="tiny", desc="", module=module, opt=opt, batches=[(x, y)],
                       loss_fn=torch.nn.functional.cross_entropy)  # fmt: skip


def test_silent_probe_fails_the_check(bench, tmp_path, monkeypatch):
    """A probe that writes nothing is reported WRONG, not as a free configuration."""
    import tbprobe

    monkeypatch.setattr(tbprobe, "Probe", _SilentProbe, raising=False)
    b = _bench(bench, tmp_path)
    for cfg in (bench.NORMS, bench.HISTS):
        step_s, n, check = b.window(_tiny_model(bench), cfg, 0, 3)
        assert step_s > 0 and n == 3
        assert check == "WRONG: grad_norm/_total written 0× in 3 steps"


def test_tensorboardx_loop_missing_histograms_fails_the_check(bench, tmp_path, monkeypatch):
    """The tensorboardX loop's check fails when its gradient histograms are not written, and
    passes when they are."""
    import tensorboardX

    b = _bench(bench, tmp_path)
    assert b.window(_tiny_model(bench), bench.TBX, 0, 2)[2] == "ok"
    real = tensorboardX.SummaryWriter.add_histogram

    def params_only(self, tag, *args, **kwargs):
        if not tag.startswith("grad_hist/"):
            real(self, tag, *args, **kwargs)

    monkeypatch.setattr(tensorboardX.SummaryWriter, "add_histogram", params_only)
    check = b.window(_tiny_model(bench), bench.TBX, 1, 2)[2]
    assert check == "WRONG: 5 tags short of 2 histograms"  # conv, BN weight + bias, linear w + b


def test_wandb_without_histograms_fails_the_check(bench, tmp_path, monkeypatch):
    """wandb.watch's check passes when its hooks log, and fails when they log nothing."""
    from wandb.integration.torch import wandb_torch

    b = _bench(bench, tmp_path)
    assert b.window(_tiny_model(bench), bench.WANDB, 0, 2)[2] == "ok"
    monkeypatch.setattr(wandb_torch.TorchHistory, "log_tensor_stats", lambda *a, **k: None)
    check = b.window(_tiny_model(bench), bench.WANDB, 1, 2)[2]
    assert check.startswith("WRONG: no histogram for ['gradients/0.weight'")


def test_floor_check_needs_its_hooks_to_have_run(bench, tmp_path):
    """The floor's check is WRONG when its hooks and after-step reductions never ran, "ok"
    after a window of training steps, and its teardown leaves no hook on the model."""
    if not _selection_importable():
        pytest.skip("tbprobe.probe.selection is not importable")
    model = _tiny_model(bench)
    att = bench.attach_floor(model, cuda=False)
    try:
        assert att.check(1) == "WRONG: after-step reductions ran 0× in 1 steps"
    finally:
        att.teardown()
    assert not any(m._forward_hooks for m in model.module.modules())
    assert not model.opt._optimizer_step_pre_hooks
    b = _bench(bench, tmp_path)
    step_s, n, check = b.window(model, bench.FLOOR, 0, 2)
    assert step_s > 0 and n == 2 and check == "ok"
    assert not any(m._forward_hooks for m in model.module.modules())


def test_floor_check_catches_a_step_without_forward_reductions(bench):
    """A timed step whose hooks did not run (here: a step boundary with no forward or
    backward before it) makes the floor's check WRONG."""
    if not _selection_importable():
        pytest.skip("tbprobe.probe.selection is not importable")
    model = _tiny_model(bench)
    att = bench.attach_floor(model, cuda=False)
    try:
        b = bench.Bench(device=torch.device("cpu"), repeats=1, window_s=0.05, budget_s=1.0,
                        root="", unavailable={})  # fmt: skip
        b.train(model, 2, att.after_step)
        assert att.check(2) == "ok"
        att.after_step()  # a step boundary with no forward or backward before it
        assert att.check(1).startswith("WRONG: step 0 reduced 0 outputs of ")
    finally:
        att.teardown()
