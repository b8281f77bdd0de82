"""The reproduce run's recipe: `ReproduceConfig` (every size, step count and gate setting), its
checks, and reading it back from a manifest written by an older xlora."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path

from xlora.core.checks import check_number
from xlora.science.tasks import TASKS

MAX_NEW_TOKENS = {
    "molecule-properties": 24, "molecule-design": 32, "peptides": 40, "molecule-thermo": 28, "anticancer": 8,
}  # fmt: skip


@dataclass
class ReproduceConfig:
    """Sizes chosen so the whole experiment runs in about 2 hours on 2 CPU cores (the experts, the
    bulk of it, are committed and reused: see `stage_experts`)."""

    out: Path = Path("models/xlora-science")  # the shipped checkpoint (small)
    base: str = "default"  # the embedded SmolLM2, or a local model directory (tests use a tiny one)
    work: Path = Path("xlora-reproduce")  # data files, runs, intermediate experts (not shipped)
    seed: int = 0
    n_train: int = 320  # per task: the share of each expert's training data the gate also trains on
    n_eval: int = 24  # per task
    # The experts (v0.6: 8x the data of the first recipe, batch 16, four projections; see the
    # README's "What moved the experts"). Molecules per molecule task; peptides to classify and to design.
    n_expert_molecules: int = 2560
    n_expert_classify: int = 1600
    n_expert_design: int = 480
    expert_formula_items: bool = True  # half the design expert's molecules go SMILES -> formula
    # v0.8's two more domains: the thermochemistry expert trains on the property expert's
    # molecules; anticancer peptides (balanced), few because modlamp has 343 usable anticancer ones
    n_expert_acp: int = 360
    acp_gate_fresh: int = 80  # fresh anticancer gate examples (balanced), instead of gate_fresh
    expert_steps: int = 160
    expert_batch_size: int = 16
    # v0.10: the two experts short of the targets (gap MAE, AMP accuracy) train several
    # passes: `expert_steps` times this factor, in bf16 autocast (1.7x faster than fp32 on this
    # machine's AMX CPU, so the run stays in budget; slower on CPUs without AMX/AVX512-BF16). Tasks not
    # named keep the recipe they were committed with (one pass, precision "auto" = fp32 on CPU).
    expert_step_factor: dict[str, int] = field(default_factory=lambda: {"molecule-properties": 4, "peptides": 5})
    # v0.12: the three one-pass experts retrained in bf16 too (1.36-1.82x faster here than fp32,
    # `benchmarks/expert_precision.py`), so a from-scratch run has a margin under 2.5 h
    expert_precision: dict[str, str] = field(default_factory=lambda: {task: "bf16" for task in TASKS})
    # v0.11: 800 steps of 8, about 2 passes over the gate data (480 in v0.9-0.10, 240 before),
    # in bf16 autocast: 2.6 s per step here against about 2.9 s in fp32 (v0.10's run), a smaller
    # gain than the experts' 1.75x (not profiled)
    gate_steps: int = 800
    gate_precision: str = "bf16"
    # v0.12: the gate's routing prior (`TrainingArgs.route_weight`): each gate example's tokens are
    # pulled towards its task's expert alone (general prompts: towards no expert); 0 = next-token loss only.
    # v0.13: 0.1 (README, "Routing prior"): against no prior, paired, gap MAE and retention clearly
    # better, no task's generated metric clearly worse; 0.5 (v0.12) cost the mixing gains on design
    gate_route_weight: float = 0.1
    # v0.13: the tasks (and/or "base", the general prompts) whose labels the prior reads; None: all
    gate_route_only: list[str] | None = None
    batch_size: int = 8  # the gate's
    rank: int = 8
    alpha: float = 16.0
    targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj", "o_proj", "gate_proj"])
    expert_lr: float = 2e-3
    # The gate: these settings won the investigation in the README (softmax, width 64, lr 2e-3 and
    # the experts' own data left the mixture behind the single experts).
    gate_lr: float = 5e-3
    gate_size: int = 256
    gate_depth: int = 2
    gate_softmax: bool = False  # unconstrained scalings: the gate may also scale an expert up or down
    gate_layerwise: bool = True
    gate_fresh: int = 320  # per task: extra gate-training examples the experts never saw
    # everyday prompts answered by the base itself, added to the gate data so the gate learns to leave
    # a general question to the base (README, "Knowledge retention"); 0 = science prompts only
    gate_general: int = 320  # v0.9 (0 until v0.8)
    max_length: int = 128
    gate_scaling_pass_layers: int | None = None  # early gate: the scaling pass runs the first k layers
    # the larger test sets for `xlora eval` (testsets.py): disjoint from all of the above
    n_test: int = 200  # per task, scored by loss
    n_test_generate: int = 100  # per generated metric

    def expert_recipe(self, task: str) -> dict:
        """What decides one task's expert (its data sizes, steps, LoRA shape, base): equal recipes,
        equal experts. The first three tasks keep the recipe they were committed with in v0.6."""
        data = {
            "molecule-thermo": ("n_expert_molecules",),
            "anticancer": ("n_expert_acp",),
        }.get(task, ("n_expert_molecules", "n_expert_classify", "n_expert_design", "expert_formula_items"))
        keys = (
            "base", "seed", *data, "expert_steps", "expert_batch_size", "rank", "alpha", "targets", "expert_lr",
            "max_length",
        )  # fmt: skip
        recipe = {k: getattr(self, k) for k in keys}
        # only what differs from one pass at the default precision, so stating the default changes nothing
        if self.expert_step_factor.get(task, 1) != 1:
            recipe["expert_step_factor"] = self.expert_step_factor[task]
        if self.expert_precision.get(task, "auto") != "auto":
            recipe["expert_precision"] = self.expert_precision[task]
        return json.loads(json.dumps(recipe, default=str))

    def steps_of(self, task: str) -> int:
        """Training steps of one task's expert."""
        return self.expert_steps * self.expert_step_factor.get(task, 1)

    def __post_init__(self) -> None:
        from xlora.train.loop import PRECISIONS

        self._check_numbers()
        for name, table, ok, expected in (
            ("expert_step_factor", self.expert_step_factor, _is_factor, f"an integer from 1 to {MAX_STEP_FACTOR}"),
            ("expert_precision", self.expert_precision, lambda v: v in PRECISIONS, f"one of {PRECISIONS}"),
        ):
            if not isinstance(table, dict):
                raise ValueError(f"{name}: expected a dict of task -> {expected}, got {table!r}")
            for task, value in table.items():
                if task not in TASKS or not ok(value):
                    raise ValueError(f"{name}: expected task -> {expected} for {TASKS}, got {task!r}: {value!r}")
        if self.gate_precision not in PRECISIONS:
            raise ValueError(f"gate_precision: expected one of {PRECISIONS}, got {self.gate_precision!r}")
        w = self.gate_route_weight
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0 <= w < float("inf"):
            raise ValueError(f"gate_route_weight: expected a finite number >= 0, got {w!r}")
        only = self.gate_route_only
        if only is not None:
            names = {*TASKS, "base"}
            if (
                not isinstance(only, (list, tuple))
                or not only
                or not all(isinstance(x, str) and x in names for x in only)
            ):
                raise ValueError(
                    f"gate_route_only: expected None or a non-empty list of {TASKS} or 'base', got {only!r}"
                )
            self.gate_route_only = only = sorted(set(only))  # one spelling per choice (run folder, settings)
            if not w:
                raise ValueError("gate_route_only: names the labels a routing prior reads; set gate_route_weight > 0")
            if "base" in only and not self.gate_general:
                raise ValueError("gate_route_only: 'base' labels the general prompts, and gate_general is 0")
        if w and self.gate_general and self.gate_softmax and (only is None or "base" in only):
            raise ValueError(
                "gate_softmax: the routing prior pulls the general prompts towards no expert ('base'), which "
                "softmax scalings (they sum to 1) cannot reach: use --no-gate-softmax, --gate-route-weight 0, "
                "or --gate-route-only without base"
            )

    def _check_numbers(self) -> None:
        """Every count, size and rate in range, so that a bad option fails before hours of work."""
        counts = {  # field: smallest allowed value
            **dict.fromkeys(("n_train", "n_eval", "n_expert_molecules", "n_expert_classify", "n_expert_design"), 1),
            **dict.fromkeys(("n_expert_acp", "expert_steps", "expert_batch_size", "gate_steps", "batch_size"), 1),
            **dict.fromkeys(("rank", "gate_size", "gate_depth", "n_test", "n_test_generate"), 1),
            **dict.fromkeys(("seed", "acp_gate_fresh", "gate_fresh", "gate_general"), 0),
            "max_length": 16,
        }
        for name, low in counts.items():
            check_number("reproduce", name, getattr(self, name), integer=True, low=low)
        for name in ("alpha", "expert_lr", "gate_lr"):
            check_number("reproduce", name, getattr(self, name), low=0, low_open=True)
        check_number("reproduce", "gate_scaling_pass_layers", self.gate_scaling_pass_layers, integer=True, low=1,
                     optional=True)  # fmt: skip
        if not self.targets or not all(isinstance(t, str) and t for t in self.targets):
            raise ValueError(f"reproduce: targets: expected module names such as q_proj, got {self.targets!r}")


MAX_STEP_FACTOR = 100


def _is_factor(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_STEP_FACTOR


def config_from_manifest(config: dict) -> ReproduceConfig:
    """The ReproduceConfig a manifest's `config` section records. Manifests from before the
    v0.6 expert recipe (no `n_expert_molecules`) trained each expert on `n_train` items (peptides:
    half to classify, half to design), without formula items, in batches of `batch_size`."""
    known = {f.name for f in fields(ReproduceConfig)}
    values = {k: v for k, v in config.items() if k in known}
    if "n_expert_molecules" not in config:
        n = int(config.get("n_train", ReproduceConfig.n_train))
        values |= {"n_expert_molecules": n, "n_expert_classify": n // 2, "n_expert_design": n // 2}
        values |= {"expert_formula_items": False, "expert_batch_size": int(config.get("batch_size", 8))}
    values.setdefault("gate_general", 0)  # gates before v0.9 trained on science prompts only
    values.setdefault("expert_step_factor", {})  # before v0.10 every expert trained one pass, fp32
    values.setdefault("expert_precision", {})
    values.setdefault("gate_precision", "auto")  # gates before v0.11 trained in fp32 on CPU
    values.setdefault("gate_route_weight", 0.0)  # ... and before v0.12 without a routing prior
    values.setdefault("gate_route_only", None)  # ... read by all the labels before v0.13
    for key in ("out", "work"):
        if key in values:
            values[key] = Path(values[key])
    return ReproduceConfig(**values)


__all__ = ["MAX_NEW_TOKENS", "MAX_STEP_FACTOR", "ReproduceConfig", "config_from_manifest"]
