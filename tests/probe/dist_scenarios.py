"""The training runs of :mod:`tests.probe.dist_harness`: one :class:`Scenario` per run, in
groups that one spawn of the ranks runs together (each test module spawns its group)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Scenario:
    """One training run of the spawn: wrapper, steps, extra Probe options, planted faults,
    what the training loop does between the backward passes and the optimizer step."""

    name: str
    wrap: str  # "ddp" | "fsdp"
    steps: int = 3
    probe_kwargs: dict = field(default_factory=dict)
    plant: tuple[str, int, int] | None = None  # (module, step, rank): NaN in its output
    per_rank: bool = False
    break_pack: tuple[int, int] | None = None  # (step, rank): its packing raises there
    branch: int | None = None  # the rank whose BranchLM takes its branch (every step)
    fail_hook: tuple[str, int, int] | None = None  # (module, step, rank): its hook raises
    clip: float | None = None  # clip_grad_norm_ to this after each step's last backward
    micro: int = 1  # backward passes (micro-batches) accumulated per step
    second_opt: str | None = None  # params under this prefix: a second, unprobed optimizer
    bucket_view: bool = False  # DDP(gradient_as_bucket_view=True): .grad becomes a bucket view


PLANT = ("blocks.1.fc1", 1, 1)
BREAK = (2, 1)  # rank 1's packing raises at step 2, a histogram step of "fsdp_broken"
BREAK_MESSAGE = "planted pack failure"
SCENARIOS = (
    Scenario("ddp", "ddp"),
    Scenario("fsdp", "fsdp", probe_kwargs={"reduce_activations": True}),
    Scenario("ddp_nan", "ddp", steps=2, plant=PLANT),
    Scenario("fsdp_nan", "fsdp", steps=2, plant=PLANT),
    Scenario("ddp_per_rank", "ddp", steps=2, probe_kwargs={"per_rank": True}, per_rank=True),
    Scenario(
        "fsdp_broken",
        "fsdp",
        steps=4,
        probe_kwargs={"reduce_activations": True, "histogram_every": 2},
        break_pack=BREAK,
    ),
)
# Ranks whose hooks record different keys: the packed gather's layout must not depend on it.
HOOK_FAIL = ("blocks.0.fc2", 1, 1)  # rank 1's forward hook of fc2 raises at step 1
HOOK_FAIL_MESSAGE = "planted hook failure"
LAYOUT_SCENARIOS = (
    Scenario(
        "ddp_branch",
        "ddp",
        steps=2,
        probe_kwargs={"every": 2, "histogram_every": 2},  # step 1: non-finite counts only
        plant=PLANT,
        branch=1,
    ),
    Scenario("fsdp_branch", "fsdp", steps=2, probe_kwargs={"reduce_activations": True}, branch=1),
    Scenario("ddp_hook_fail", "ddp", fail_hook=HOOK_FAIL),
    Scenario(
        "fsdp_hook_fail", "fsdp", probe_kwargs={"reduce_activations": True}, fail_hook=HOOK_FAIL
    ),
)
# Loops that touch the gradients or steps around the probe: gradient clipping between the
# last of 2 accumulated backwards and the step (the captures hold clipped grads; histograms
# on steps 0 and 2), and a second optimizer stepping the head after the probed one.
CLIP_SCENARIOS = (
    Scenario("ddp_clip", "ddp", probe_kwargs={"histogram_every": 2}, clip=1e-3, micro=2),
    Scenario(
        "fsdp_clip",
        "fsdp",
        probe_kwargs={"reduce_activations": True, "histogram_every": 2},
        clip=1e-3,
        micro=2,
    ),
)
SECOND_OPT = "head"
TWO_OPT_SCENARIOS = (
    Scenario("ddp_two_opt", "ddp", second_opt=SECOND_OPT),
    Scenario("fsdp_two_opt", "fsdp", second_opt=SECOND_OPT),
)
# DDP swaps each fresh .grad for a view into its all-reduced bucket after the gradient hooks
# ran: the probe must read the reduced one (with zero_grad's default set_to_none).
VIEW_SCENARIOS = (
    Scenario("ddp_bucket_view", "ddp", probe_kwargs={"histogram_every": 2}, bucket_view=True),
)
BASE_NAMES = tuple(sc.name for sc in SCENARIOS)
LAYOUT_NAMES = tuple(sc.name for sc in LAYOUT_SCENARIOS)
CLIP_NAMES = tuple(sc.name for sc in CLIP_SCENARIOS)
TWO_OPT_NAMES = tuple(sc.name for sc in TWO_OPT_SCENARIOS)
VIEW_NAMES = tuple(sc.name for sc in VIEW_SCENARIOS)
SCENARIOS += LAYOUT_SCENARIOS + CLIP_SCENARIOS + TWO_OPT_SCENARIOS + VIEW_SCENARIOS
SCENARIO = {sc.name: sc for sc in SCENARIOS}
