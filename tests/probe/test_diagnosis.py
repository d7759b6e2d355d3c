"""The diagnosis on synthetic StepRecords: attribution, episodes, spikes, warnings, config."""

import numpy as np
import pytest

from tbprobe.probe.anomaly import Anomaly, format_markdown, parse_markdown
from tbprobe.probe.diagnosis import Diagnosis, owner_module
from tbprobe.probe.records import StepRecord, TensorEvent

RNG = np.random.default_rng(0)


def ev(seq, module, pass_="forward", tensor="output", nonfinite=0, inputs=0, stats=None):
    return TensorEvent(
        seq=seq,
        module=module,
        pass_=pass_,
        tensor=tensor,
        nonfinite=nonfinite,
        inputs_nonfinite=inputs,
        stats=stats,
    )


def rec(step, events=(), grads=None, params=None, updates=None):
    return StepRecord(
        step=step,
        scheduled=True,
        events=tuple(events),
        grad_norms=grads or {},
        param_norms=params or {},
        update_ratios=updates or {},
    )


def healthy_grads(n, names=("a.weight", "b.weight", "c.weight")):
    """n steps of noisy, finite gradient norms (±30 %) around 1.0 per parameter."""
    out = []
    for _ in range(n):
        g = {k: float(1.0 + 0.3 * RNG.standard_normal()) for k in names}
        g["_total"] = float(np.sqrt(sum(v * v for v in g.values())))
        out.append(g)
    return out


def feed_all(diag, records):
    return [a for r in records for a in diag.feed(r)]


def test_stat_columns_match_the_kernels():
    """The diagnosis reads the count and zeros columns where kernels.STAT_NAMES puts them."""
    from tbprobe.kernels import STAT_NAMES
    from tbprobe.probe import diagnosis_warnings as diagnosis

    assert STAT_NAMES[diagnosis._COUNT] == "count"
    assert STAT_NAMES[diagnosis._ABS_MAX] == "abs_max"


def test_first_nonfinite_event_is_reported_as_producer():
    """The first non-finite event in execution order, with finite inputs, is the producer."""
    events = [ev(0, "l0"), ev(1, "l1", nonfinite=3), ev(2, "l2", nonfinite=9, inputs=3)]
    (a,) = Diagnosis().feed(rec(5, events))
    assert (a.kind, a.step, a.where, a.pass_, a.tensor) == (
        "nonfinite",
        5,
        "l1",
        "forward",
        "output",
    )
    assert a.producer is True and a.value == 3


def test_propagator_is_refined_to_enclosing_module():
    """A child fed non-finite inputs is replaced by the innermost ancestor with finite inputs."""
    events = [
        ev(0, "blk.fc1"),
        ev(1, "blk.fc2", nonfinite=4, inputs=2),  # an unhooked op between fc1 and fc2 made it
        ev(2, "blk", nonfinite=4, inputs=0),
        ev(3, "", nonfinite=4, inputs=0),
    ]
    (a,) = Diagnosis().feed(rec(0, events))
    assert (a.where, a.producer) == ("blk", True)
    assert "blk.fc2" in a.message


def test_propagator_without_producing_ancestor_stays_a_propagator():
    """Non-finite data entering the first module is reported there as propagated."""
    (a,) = Diagnosis().feed(rec(0, [ev(0, "l0", nonfinite=2, inputs=2)]))
    assert (a.where, a.producer) == ("l0", False)
    assert "no hooked module before it made them so: the model's input" in a.message
    # After a finite first module: code between modules (an in-place write, a log(0)).
    (c,) = Diagnosis().feed(rec(0, [ev(0, "l0"), ev(1, "l1", nonfinite=2, inputs=2)]))
    assert (c.where, c.producer) == ("l1", False) and "code between modules" in c.message
    # Passed on from an earlier hooked module's output: that one is the producer.
    (d,) = Diagnosis().feed(rec(0, [ev(0, "l0", nonfinite=2), ev(1, "l1", nonfinite=2, inputs=2)]))
    assert d.where == "l0" and "before it" not in d.message
    (b,) = Diagnosis().feed(rec(0, [ev(0, "l0", nonfinite=2, inputs=None)]))
    assert b.producer is None


def test_param_grad_first_is_attributed_to_module_backward():
    """A parameter gradient firing before its module's grad_input names the module's backward."""
    events = [
        ev(0, "l1", "backward", "grad_output", 0, None),
        ev(1, "l1.bias", "grad", "grad", 1, None),
        ev(2, "l1.weight", "grad", "grad", 8, None),
        ev(3, "l1", "backward", "grad_input", 16, 0),
    ]
    (a,) = Diagnosis().feed(rec(0, events))
    assert (a.where, a.module, a.pass_, a.tensor, a.producer) == (
        "l1",
        "l1",
        "backward",
        "grad_input",
        True,
    )
    # Without the module's grad_input (e.g. the first layer), the gradient itself is named,
    # and its producer status comes from the module's grad_output.
    (b,) = Diagnosis().feed(rec(0, events[:3]))
    assert (b.where, b.module, b.pass_, b.producer) == ("l1.bias", "l1", "grad", True)


def test_backward_nan_made_in_a_blocks_own_code_names_the_block():
    """blk = fc2(relu(fc1(x) + sqrt(0 * ...))): the backward NaN first shows in fc1's
    grad_output, with no hooked consumer passing it on (fc2's grad_input is finite) while
    blk's own grad_output is finite: blk's backward made it."""
    events = [
        ev(0, "blk", "backward", "grad_output", 0, None),
        ev(1, "blk.fc2", "backward", "grad_output", 0, None),
        ev(2, "blk.fc2", "backward", "grad_input", 0, 0),
        ev(3, "blk.fc1", "backward", "grad_output", 32, None),
        ev(4, "blk.fc1", "backward", "grad_input", 32, 32),
        ev(5, "blk", "backward", "grad_input", 32, 0),
    ]
    (a,) = Diagnosis().feed(rec(0, events))
    assert (a.where, a.pass_, a.tensor, a.producer) == ("blk", "backward", "grad_input", True)
    assert "first non-finite hooked tensor: backward grad_output of blk.fc1" in a.message
    # The gradient reaching the block from above was non-finite already: not refined
    above = [ev(0, "blk", "backward", "grad_output", 8, None), *events[1:]]
    (b,) = Diagnosis().feed(rec(0, above))
    assert (b.where, b.tensor, b.producer) == ("blk", "grad_output", None)
    # No enclosing hooked module: fc1's grad_output stays, producer unknown
    (c,) = Diagnosis().feed(rec(0, events[1:5]))
    assert (c.where, c.tensor, c.producer) == ("blk.fc1", "grad_output", None)


def test_nonfinite_episode_reported_once_and_again_after_recovery():
    """NaN that persists is one report; a finite step ends the episode; a new NaN reports."""
    nan = [ev(0, "l0", nonfinite=1)]
    ok = [ev(0, "l0")]
    diag = Diagnosis()
    steps = [nan, nan, nan, (), ok, nan, nan]  # () carries no information: not a recovery
    found = feed_all(diag, [rec(i, e) for i, e in enumerate(steps)])
    assert [a.step for a in found] == [0, 5]


def test_nonfinite_grad_norm_without_events():
    """A non-finite gradient norm is reported when no per-tensor counts exist."""
    (a,) = Diagnosis().feed(rec(3, grads={"x.weight": float("nan"), "_total": float("nan")}))
    assert (a.kind, a.where, a.module, a.pass_) == ("nonfinite", "x.weight", "x", "grad")


def test_spike_reported_with_top_offenders_once_per_episode():
    """A 50x gradient norm is a spike naming the worst parameters; its next step is not new."""
    grads = healthy_grads(40)
    for s in (30, 31):
        grads[s] = dict(grads[s], **{"b.weight": 50.0, "c.weight": 20.0, "_total": 54.0})
    found = feed_all(Diagnosis(), [rec(i, grads=g) for i, g in enumerate(grads)])
    (a,) = found
    assert (a.kind, a.step, a.where, a.module, a.pass_) == ("spike", 30, "b.weight", "b", "grad")
    assert [n for n, _ in a.top] == ["b.weight", "c.weight"]
    assert a.top[0][1] > a.top[1][1] >= 10
    assert a.value == 50.0 and 0.7 < a.baseline < 1.3


def test_spike_again_after_recovery_and_not_in_warmup():
    """Spikes inside warm-up are ignored; a second spike after a calm step is reported."""
    grads = healthy_grads(60)
    for s in (3, 30, 45):
        grads[s] = dict(grads[s], **{"a.weight": 100.0, "_total": 100.0})
    found = feed_all(Diagnosis(), [rec(i, grads=g) for i, g in enumerate(grads)])
    assert [(a.kind, a.step) for a in found] == [("spike", 30), ("spike", 45)]


def test_small_tensor_spike_below_min_share_is_ignored():
    """A tiny tensor's 200x jump that stays below min_share of the total is not a spike."""
    grads = healthy_grads(40)
    for g in grads:
        g["ln.bias"] = 1e-4
    grads[30]["ln.bias"] = 2e-2
    assert feed_all(Diagnosis(), [rec(i, grads=g) for i, g in enumerate(grads)]) == []
    assert feed_all(Diagnosis(min_share=0.0), [rec(i, grads=g) for i, g in enumerate(grads)])


def growing_grads(n, per_step, noise, names=("a.weight", "b.weight"), seed=0):
    """n steps of gradient norms growing by ``per_step`` a step, with log-normal noise."""
    rng, out = np.random.default_rng(seed), []
    for i in range(n):
        g = {k: float(per_step**i * np.exp(noise * rng.standard_normal())) for k in names}
        g["_total"] = float(np.sqrt(sum(v * v for v in g.values())))
        out.append(g)
    return out


def test_gradual_noisy_growth_is_not_a_spike():
    """Norms growing 1000x over 100 steps, with 3x step-to-step noise, raise nothing: each
    value is far above the old median but never far above the values just before it."""
    for seed in range(5):
        grads = growing_grads(120, 1.07, 1.0, seed=seed)
        totals = [g["_total"] for g in grads]
        assert np.median(totals[-20:]) > 100 * np.median(totals[10:30])
        assert feed_all(Diagnosis(), [rec(i, grads=g) for i, g in enumerate(grads)]) == []


@pytest.mark.parametrize("climb", [[30.0], [4.0, 30.0], [2.0, 6.0, 30.0]])
def test_sudden_climb_within_rise_steps_is_a_spike(climb):
    """A total that climbs 30x within 1-3 steps (rise=3) is reported at the step it gets there."""
    grads = healthy_grads(40)
    for k, factor in enumerate(climb):
        grads[30 + k] = {n: v * factor for n, v in grads[30 + k].items()}
    (a,) = feed_all(Diagnosis(), [rec(i, grads=g) for i, g in enumerate(grads)])
    assert (a.kind, a.step) == ("spike", 30 + len(climb) - 1)
    assert "recent peak" in a.message and len(a.top) == 3


def test_single_parameter_spike_needs_param_spike_factor():
    """A parameter jumping 60x with an unmoved total is noise at the default (100x) but a spike
    at param_spike_factor=20; a 300x jump is a spike either way."""
    grads = healthy_grads(60, names=("a.weight", "b.weight", "c.weight", "d.bias"))
    for g in grads:
        g["d.bias"] = 0.3 * g["d.bias"]
    grads[30]["d.bias"] = 60 * 0.3
    grads[50]["d.bias"] = 300 * 0.3
    records = [rec(i, grads=g) for i, g in enumerate(grads)]
    assert [(a.step, a.where) for a in feed_all(Diagnosis(), records)] == [(50, "d.bias")]
    found = feed_all(Diagnosis(param_spike_factor=20), records)
    assert [(a.step, a.where) for a in found] == [(30, "d.bias"), (50, "d.bias")]


def test_amp_skipped_step_gradients_are_not_an_episode():
    """On a step the GradScaler skipped, Inf gradients are a normal overflow (no report, no
    episode); a NaN forward output on a skipped step is still reported."""
    inf_grads = [
        ev(0, "l0"),
        ev(1, "l0", "backward", "grad_input", 5, 0),
        ev(2, "l0.weight", "grad", "grad", 5, None),
    ]
    bad_norms = {"l0.weight": float("inf"), "_total": float("inf")}
    skipped = StepRecord(
        step=3, scheduled=False, skipped=True, events=tuple(inf_grads), grad_norms=bad_norms
    )
    diag = Diagnosis()
    assert diag.feed(skipped) == []
    (a,) = diag.feed(rec(4, inf_grads, grads=bad_norms))  # not skipped: a real episode
    assert (a.step, a.pass_, a.where) == (4, "backward", "l0")
    nan_fwd = StepRecord(step=5, scheduled=False, skipped=True, events=(ev(0, "l0", nonfinite=2),))
    (b,) = Diagnosis().feed(nan_fwd)
    assert (b.step, b.pass_, b.where) == (5, "forward", "l0")


def test_nonfinite_gradient_from_the_loss_says_it_came_from_outside():
    """The first non-finite tensor is the gradient arriving at the model's last module (a
    log(0) in the loss): the report says it came from outside the hooked modules."""
    events = [
        ev(0, "l0"),
        ev(1, "l1"),
        ev(2, "l1", "backward", "grad_output", 4, None),
        ev(3, "l1", "backward", "grad_input", 4, 4),
    ]
    (a,) = Diagnosis().feed(rec(5, events, grads={"l0.weight": float("nan")}))
    assert (a.step, a.pass_, a.where) == (5, "backward", "l1")
    assert "came from outside the hooked modules: the loss" in a.message


def test_parameter_gradient_message_reads_plainly():
    """A first non-finite parameter gradient is "the gradient of <param>", not "the grad
    grad of <param>"."""
    events = [ev(0, "l0"), ev(1, "l0.weight", "grad", "grad", 8, None)]
    (a,) = Diagnosis().feed(rec(3, events, grads={"l0.weight": float("nan")}))
    assert a.message.startswith("8 NaN/Inf in the gradient of l0.weight (")
    # Refined to the module's backward, the first tensor named is "gradient of", too.
    events = [
        ev(0, "l0.weight", "grad", "grad", 8, None),
        ev(1, "l0", "backward", "grad_input", 8, 0),
    ]
    (b,) = Diagnosis().feed(rec(3, events))
    assert b.message.endswith("first non-finite hooked tensor: gradient of l0.weight"), b.message


def test_amp_skips_that_never_end_are_reported_at_the_first_one():
    """A NaN made in the backward pass on every step: the GradScaler skips every step and its
    scale falls without end. After ``max_skipped`` skips in a row it is reported, at the first
    skipped step, pass and module of that step's attribution; a few skips in a row (the
    scaler's backoff at work) and skips broken by a clean step are not."""
    nan_bwd = (
        ev(0, "l0"),
        ev(1, "l1"),
        ev(2, "l1", "backward", "grad_output", 0, None),
        ev(3, "l1", "backward", "grad_input", 8, 0),
        ev(4, "l0.weight", "grad", "grad", 8, None),
    )
    bad = {"l0.weight": float("nan"), "_total": float("nan")}

    def skipped(step):
        return StepRecord(step=step, scheduled=False, skipped=True, events=nan_bwd, grad_norms=bad)

    clean = [rec(s, [ev(0, "l0"), ev(1, "l1")], grads={"l0.weight": 1.0, "_total": 1.0})
             for s in range(10)]  # fmt: skip
    diag = Diagnosis(max_skipped=4)
    assert feed_all(diag, clean) == []
    assert feed_all(diag, [skipped(10), skipped(11), skipped(12)]) == []  # backoff at work
    assert feed_all(diag, [rec(13, [ev(0, "l0")], grads={"l0.weight": 1.0, "_total": 1.0})]) == []
    found = feed_all(diag, [skipped(s) for s in range(14, 30)])
    (a,) = found
    assert (a.step, a.kind, a.pass_, a.where, a.producer) == (
        14,
        "nonfinite",
        "backward",
        "l1",
        True,
    )
    assert "skipped 4 optimizer steps in a row (to step 17)" in a.message
    with pytest.raises(TypeError, match="max_skipped"):
        Diagnosis(max_skipped=2.5)


def test_amp_skips_wait_for_the_scale_to_fall_to_one():
    """Where the scale is known, a run of skips is reported once it is down to 1 or less:
    from an init_scale of 2**24 a healthy backoff skips a dozen steps before the scale fits
    (not reported, however long it took), while a NaN the backward pass makes on every
    step halves it to 1 and is reported then, at the first skipped step."""
    bad = {"l0.weight": float("inf"), "_total": float("inf")}
    ok = {"l0.weight": 1.0, "_total": 1.0}

    def step(s, scale, skipped):
        return StepRecord(step=s, scheduled=False, skipped=skipped, loss_scale=scale,
                          events=(ev(0, "l0"),), grad_norms=bad if skipped else ok)  # fmt: skip

    healthy = [step(s, 2.0 ** (24 - s), True) for s in range(12)]
    healthy += [step(s, 2.0**12, False) for s in range(12, 40)]
    assert feed_all(Diagnosis(), healthy) == []
    endless = [step(s, 2.0 ** (16 - s), True) for s in range(30)]
    (a,) = feed_all(Diagnosis(), endless)
    assert a.step == 0
    assert "skipped 17 optimizer steps in a row (to step 16, its scale down to 1)" in a.message


def test_parameter_made_nonfinite_by_the_optimizer_step():
    """Finite gradients, then a NaN parameter norm (the optimizer's state went bad): reported
    at that step, pass "update", at the parameter; the next step's NaN forward output is the
    same episode, not a second report blaming the forward."""
    fwd = [ev(0, "l0"), ev(1, "l1")]
    grads = {"l0.weight": 1.0, "l1.weight": 1.0, "_total": 1.4}
    recs = [rec(s, fwd, grads=grads, params={"l0.weight": 3.0, "l1.weight": 2.0})
            for s in range(20)]  # fmt: skip
    recs.append(rec(20, fwd, grads=grads, params={"l0.weight": 3.0, "l1.weight": float("nan")}))
    recs.append(rec(21, [ev(0, "l0"), ev(1, "l1", nonfinite=4, inputs=0)], grads=grads))
    (a,) = feed_all(Diagnosis(), recs)
    assert (a.step, a.kind, a.pass_, a.where, a.module) == (
        20,
        "nonfinite",
        "update",
        "l1.weight",
        "l1",
    )
    assert "gradient was finite" in a.message


def test_total_baseline_restarts_when_a_layer_is_unfrozen():
    """A backbone unfrozen mid-run adds its gradients and updates to ``_total``: that jump is
    no spike (the total's baseline restarts), while a later real spike still is one."""
    head = {"head.weight": 1.0}
    recs = []
    for i in range(60):
        g = {k: v * (1 + 0.1 * RNG.standard_normal()) for k, v in head.items()}
        u = {"head.weight": 1e-3 * (1 + 0.1 * RNG.standard_normal())}
        if i >= 30:  # unfrozen: 30 parameters with gradients 5x the head's and updates alike
            g.update(
                {f"body.{j}.weight": 5.0 * (1 + 0.1 * RNG.standard_normal()) for j in range(30)}
            )
            u.update({f"body.{j}.weight": 1e-3 for j in range(30)})
        if i == 55:
            g = {k: v * 1000 for k, v in g.items()}
        g["_total"] = float(np.sqrt(sum(v * v for v in g.values())))
        params = dict.fromkeys(u, 1.0)
        recs.append(rec(i, grads=g, params=params, updates=u))
    found = feed_all(Diagnosis(), recs)
    assert [(a.step, a.kind, a.pass_) for a in found] == [(55, "spike", "grad")]


def test_update_spike_from_ratio_times_param_norm():
    """An update ‖Δw‖ = ratio × ‖w‖ 1000x its baseline is an update spike at that parameter."""
    recs = []
    for i in range(30):
        params = {"a.weight": 10.0, "b.weight": 5.0}
        updates = {"a.weight": 1e-3 * (1 + 0.2 * RNG.standard_normal()), "b.weight": 2e-3}
        if i == 25:
            updates["b.weight"] = 2.0
        recs.append(rec(i, params=params, updates=updates))
    (a,) = feed_all(Diagnosis(), recs)
    assert (a.kind, a.step, a.where, a.pass_, a.tensor) == (
        "spike",
        25,
        "b.weight",
        "update",
        "update",
    )


def test_update_spike_says_when_its_learning_rate_rose():
    """An update spike whose parameter's learning rate rose since the last measured update,
    above any it had (a planted LR spike), says so, with the factor; one at an unchanged rate
    does not."""
    recs = []
    for i in range(40):
        lr = 1.0 if i == 25 else 1e-3
        updates = {"a.weight": 1e-3 * (1 + 0.2 * RNG.standard_normal()), "b.weight": 2e-3}
        if i == 25:
            updates["a.weight"] = 1.0
        if i == 35:
            updates["b.weight"] = 5.0
        recs.append(
            StepRecord(step=i, scheduled=True, param_norms={"a.weight": 1.0, "b.weight": 1.0},
                       update_ratios=updates, lrs={"a.weight": lr, "b.weight": 1e-3})
        )  # fmt: skip
    a, b = feed_all(Diagnosis(), recs)
    assert (a.step, a.where) == (25, "a.weight")
    assert "its learning rate rose ×1e+03 (to 1)" in a.message
    assert (b.step, b.where) == (35, "b.weight") and "learning rate" not in b.message


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_a_warm_restart_of_the_learning_rate_is_no_update_spike(optimizer):
    """A schedule that decays the learning rate 1000x and restarts it at its peak (SGDR) moves
    the update sizes with it (Adam: ∝ lr; SGD: ∝ lr × gradient): no spike, although ‖Δw‖ jumps
    1000x at the restart. Updates are judged at each parameter's peak rate so far; one that
    explodes below the peak still is a spike, its note saying the scale, its value the
    ‖Δw‖ measured."""
    recs = []
    for i in range(120):
        lr = 1e-3 * (1e-3 if i % 60 >= 40 else 1.0)  # decayed for 20 steps, then restarted
        g = 1.0 + 0.2 * RNG.standard_normal() if optimizer == "sgd" else 1.0
        updates = {k: lr * g * (1 + 0.2 * RNG.standard_normal()) for k in ("a.weight", "b.w")}
        if i == 110:
            updates["b.w"] *= 300  # an explosion at the decayed rate
        recs.append(
            StepRecord(step=i, scheduled=True, param_norms={"a.weight": 1.0, "b.w": 1.0},
                       update_ratios=updates, lrs=dict.fromkeys(updates, lr))
        )  # fmt: skip
    (a,) = feed_all(Diagnosis(), recs)
    assert (a.step, a.where, a.pass_) == (110, "b.w", "update")
    assert "peak learning rate so far: this one's ×1e+03" in a.message
    assert a.value == pytest.approx(recs[110].update_ratios["b.w"])


def test_vanishing_after_patience_once():
    """A gradient that drops to exactly 0 warns after a fifth of a window, once; vanishing again
    within `window` steps of a recovery (an MoE expert that gets tokens now and then) is the
    same episode. A series that was exactly 0 and came back is zero by design (a multi-task
    head without labels in some batches): its later zeros are never reported, however long
    the healthy stretch between; a collapse to a tiny non-zero norm still is."""
    grads = healthy_grads(240)
    for zeros in (range(30, 60), range(70, 75), range(80, 84), range(150, 155)):
        for s in zeros:
            grads[s]["c.weight"] = 0.0
    for s in range(210, 215):
        grads[s]["c.weight"] = 1e-7
    found = feed_all(Diagnosis(patience=3), [rec(i, grads=g) for i, g in enumerate(grads)])
    assert [(a.kind, a.where, a.step) for a in found] == [
        ("vanishing", "c.weight", 39),  # exact zeros: a fifth of a window (10) in a row
        ("vanishing", "c.weight", 212),  # a tiny norm: patience (3)
    ]
    assert found[0].severity == "warning" and "exactly 0" in found[0].message


def test_exact_zeros_now_and_then_are_no_vanishing():
    """A head whose gradient is exactly 0 on single steps (no label in the batch) and later
    on three in a row: it was 0 and came back before, so no warning."""
    grads = healthy_grads(120)
    for s in (20, 33, 41, 60, 61, 62, 63, 90, 91, 92):
        grads[s]["c.weight"] = 0.0
    assert feed_all(Diagnosis(patience=3), [rec(i, grads=g) for i, g in enumerate(grads)]) == []


class _AlwaysSorting(Diagnosis):
    """The diagnosis without the vanishing check's shortcut: every step sorts the medians."""

    def _check_vanishing(self, step, items):
        self._state["grad_top"] = None
        return super()._check_vanishing(step, items)


@pytest.mark.parametrize("seed", range(4))
def test_vanishing_shortcut_reports_what_the_full_check_reports(seed):
    """The vanishing check skips its median on steps where no value can be a candidate; on
    series that collapse (to 0, to near the threshold, for 1 to 5 steps), recover, rise and
    come and go,
    it reports exactly what the check that always takes the median reports."""
    rng = np.random.default_rng(seed)
    names = [f"l{i}.weight" for i in range(5)]
    records = []
    for step in range(300):
        g = {k: float(np.exp(rng.normal(0.0, 0.05)) * (1 + step / 1000)) for k in names}
        for k in names:
            if rng.random() < 0.04:
                g[k] = 0.0 if rng.random() < 0.3 else 10 ** rng.uniform(-5, -3.5) * g[k]
            if rng.random() < 0.05 and step > 100:
                del g[k]  # not observed this step
        g["_total"] = float(np.sqrt(sum(v * v for v in g.values())))
        records.append(rec(step, grads=g))
    for collapse in rng.integers(20, 290, size=6):  # runs of collapsed steps
        for s in range(collapse, min(collapse + int(rng.integers(1, 6)), 300)):
            k = names[int(rng.integers(5))]
            if k in records[s].grad_norms:  # near the threshold (1e-4 × the median)
                records[s].grad_norms[k] *= 10 ** rng.uniform(-4.5, -3.5)
    want = feed_all(_AlwaysSorting(patience=2, warmup=3), records)
    got = feed_all(Diagnosis(patience=2, warmup=3), records)
    assert [str(a) for a in got] == [str(a) for a in want]
    assert any(a.kind == "vanishing" for a in want)


def test_dead_activation_after_warmup():
    """An all-zero forward output on `patience` (3) scheduled steps in a row warns once,
    after the module's warm-up observations (zeros in those, a zero-initialised branch, do not
    count); a module zero on single steps now and then (an MoE expert without tokens) is
    never dead, even when a longer run of zeros comes later."""
    zero = np.zeros(10)
    zero[0] = zero[9] = 64.0  # count, zeros; abs_max 0
    live = zero.copy()
    live[5], live[9] = 2.5, 10.0
    stats = [zero] * 3 + [live] * 10 + [zero] * 5
    flaps = [zero] * 3 + [live] * 10 + [zero, live, zero, zero, live] * 2 + [zero] * 5
    recs = [
        rec(i, [ev(0, "relu_block", stats=s), ev(1, "expert", stats=f)])
        for i, (s, f) in enumerate(zip(stats + [live] * 10, flaps, strict=True))
    ]
    found = feed_all(Diagnosis(warmup=5), recs)
    assert [(a.kind, a.where, a.step) for a in found] == [("dead", "relu_block", 15)]


def test_no_dead_warning_while_outputs_are_not_finite():
    """After a NaN, an embedding's output is NaN but for its padding row of zeros: its finite
    elements are all 0, which is not a dead module; nor does the NaN episode re-arm warnings."""
    live = np.zeros(10)
    live[0], live[5] = 64.0, 2.5
    nan_but_zeros = np.zeros(10)
    nan_but_zeros[0], nan_but_zeros[6] = 64.0, 48.0  # 48 NaN, 16 finite zeros
    recs = [rec(i, [ev(0, "emb", stats=live)]) for i in range(12)]
    recs += [rec(12 + i, [ev(0, "emb", nonfinite=48, stats=nan_but_zeros)]) for i in range(8)]
    found = feed_all(Diagnosis(warmup=5), recs)
    assert [(a.kind, a.step) for a in found] == [("nonfinite", 12)]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"spike_factor": 1.0},
        {"window": 0},
        {"warmup": -1},
        {"vanishing": 1.5},
        {"min_share": 1.0},
        {"min_history": 60},
        {"rise": 0},
        {"recent": 49},
        {"param_spike_factor": 5.0},
    ],
)
def test_bad_config_raises_value_error(kwargs):
    """Out-of-range settings raise ValueError naming the argument."""
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        Diagnosis(**kwargs)


def test_bad_types_raise_type_error():
    """Wrong types for settings and records raise TypeError naming the argument."""
    with pytest.raises(TypeError, match="window"):
        Diagnosis(window=2.5)
    with pytest.raises(TypeError, match="check_spikes"):
        Diagnosis(check_spikes="yes")
    with pytest.raises(TypeError, match="record"):
        Diagnosis().feed({"step": 1})


def test_anomaly_markdown_round_trip_and_one_line_str():
    """format_markdown renders a table parse_markdown reads back, pipes and NaN included."""
    a = Anomaly(7, "nonfinite", "odd|name", "output", float("nan"), None, "x | y", pass_="forward")
    b = Anomaly(8, "spike", "w.weight", "grad norm", 12.5, 1.25, "10x", pass_="grad")
    rows = parse_markdown(format_markdown([a, b]))
    assert [r["where"] for r in rows] == ["odd|name", "w.weight"]
    assert rows[0]["message"] == "x | y" and rows[0]["baseline"] is None
    assert rows[1]["value"] == 12.5 and rows[1]["step"] == 8 and rows[1]["pass"] == "grad"
    assert "\n" not in str(a) and str(b).startswith("tbprobe: step 8: spike at w.weight")
    assert b.to_dict()["top"] == [] and a.to_dict()["value"] == "nan"
    with pytest.raises(ValueError, match="kind"):
        Anomaly(1, "boom", "x", "output", 1.0, None, "")
    with pytest.raises(TypeError, match="anomalies"):
        format_markdown(["not an anomaly"])
    assert owner_module("a.b.weight") == "a.b" and owner_module("bias") == ""


def _volume_run(last_volume, last_scale):
    """30 calm steps over 1024-element batches, then one over ``last_volume`` elements whose
    gradient norms are ``last_scale`` × the usual."""
    recs = [
        StepRecord(step=i, scheduled=False, grad_norms=g, volume=1024)
        for i, g in enumerate(healthy_grads(30))
    ]
    g = {k: v * last_scale for k, v in healthy_grads(1)[0].items()}
    recs.append(StepRecord(step=30, scheduled=False, grad_norms=g, volume=last_volume))
    return feed_all(Diagnosis(), recs)


def test_a_short_last_batch_is_judged_for_its_noise():
    """An epoch's last batch of 1 sample after batches of 1024 has gradients up to √1024 = 32×
    noisier: 25× the usual norms is no spike there, though it is on a full batch; an
    explosion on the short batch (1000×) still is, with its raw norm and the allowance said."""
    assert _volume_run(1024, 25.0)[0].kind == "spike"
    assert _volume_run(1, 25.0) == []
    (a,) = _volume_run(1, 1000.0)
    assert (a.kind, a.step) == ("spike", 30)
    assert a.value > 1000 * 0.5  # the raw norm, not the one divided by 32
    assert "norms divided by 32" in a.message and "0.00098× the usual data" in a.message
    # Half the usual data or more: judged as usual.
    assert _volume_run(600, 25.0)[0].kind == "spike"


def _lr_records(lrs, updates_at=()):
    """Unscheduled records of one group ("fc.weight", "fc.bias") at rates ``lrs``; update
    sizes (a calm 1e-3) on the steps ``updates_at``."""
    out = []
    for i, lr in enumerate(lrs):
        ups = {"fc.weight": 1e-3} if i in updates_at else {}
        out.append(StepRecord(step=i, scheduled=bool(ups), update_ratios=ups,
                              lr_groups=((lr, ("fc.weight", "fc.bias")),)))  # fmt: skip
    return out


def test_a_learning_rate_far_above_its_peak_is_an_update_spike_on_any_step():
    """A group's rate ≥ spike_factor × its peak so far is reported at that step (pass
    "update", its module), once while it stays up; again after it came down. A warm-up from
    a tiny start factor (fast at first: its first `warmup` steps are not judged), a decay and
    a warm restart back to the peak are not; nor is a jump on a step whose update sizes were
    measured (the ‖Δw‖ check covers it)."""
    warm = [1e-3 * min(1.0, 1e-3 + i / 20) for i in range(25)]
    lrs = warm + [1e-3] * 5 + [1.0, 1.0, 1e-3] + [1e-6] * 10 + [1e-3] * 3 + [0.5]
    found = feed_all(Diagnosis(), _lr_records(lrs))
    assert [(a.step, a.kind, a.module, a.pass_, a.where) for a in found] == [
        (30, "spike", "fc", "update", "fc.weight"),
        (46, "spike", "fc", "update", "fc.weight"),
    ]
    assert "is 1e+03× its peak so far (1 vs 0.001)" in found[0].message
    assert feed_all(Diagnosis(), _lr_records(lrs, updates_at=(30, 46))) == []


def test_a_group_frozen_by_a_zero_learning_rate_joins_the_total_quietly():
    """A backbone group kept at lr 0 (linear probe, then fine-tune through a per-group LR
    multiplier) starts to train: the total ‖Δw‖ grows 20x because many more parameters move,
    as when a layer is unfrozen by requires_grad: the total's baseline restarts, no spike."""
    recs = []
    for i in range(60):
        lr_b = 0.0 if i < 30 else 1e-3
        ups = {"head.w": 1e-3 * (1 + 0.1 * RNG.standard_normal()), "body.w": 2e-2 if lr_b else 0.0}
        recs.append(
            StepRecord(step=i, scheduled=True, param_norms=dict.fromkeys(ups, 1.0),
                       update_ratios=ups, lrs={"head.w": 1e-3, "body.w": lr_b})
        )  # fmt: skip
    assert feed_all(Diagnosis(), recs) == []
