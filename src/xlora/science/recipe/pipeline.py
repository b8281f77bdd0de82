"""`xlora reproduce`: data -> one expert per task -> the gate -> evaluation -> results and figures.

Every stage writes its output once and is skipped when that output exists, so an interrupted run
resumes (training stages also resume from their own checkpoints).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import time
from dataclasses import asdict
from importlib import metadata
from pathlib import Path

import torch

from xlora.core.config import write_text_atomic
from xlora.science.eval.testsets import TEST_KEYS, HoldoutSizes, write_test_sets
from xlora.science.recipe.config import ReproduceConfig, config_from_manifest
from xlora.science.recipe.splits import build_items, chat_record, gate_records
from xlora.science.tasks import TASKS

# ---------------------------------------------------------------------- data


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))


def stage_data(cfg: ReproduceConfig) -> dict:
    """Write the train / held-out / gate files and the test sets; returns every id for the manifest."""
    data = cfg.work / "data"
    marker, settings_file = data / "ids.json", data / "data-settings.json"
    ids = json.loads(marker.read_text()) if marker.is_file() else {}
    keys = ("seed", "n_train", "n_eval", "n_expert_molecules", "n_expert_classify", "n_expert_design")
    keys += ("expert_formula_items", "gate_fresh", "n_expert_acp", "acp_gate_fresh")
    # "gate_labels": the gate file names each example's expert (v0.12); older folders rebuild
    settings = {k: getattr(cfg, k) for k in keys} | {"tasks": list(TASKS), "gate_labels": True}
    done = json.loads(settings_file.read_text()) if settings_file.is_file() else {}
    if done != settings or not (data / "gate-train.jsonl").is_file():
        # (re)build everything: another recipe's files must not be trained on silently
        train, evals, fresh, ids = build_items(cfg)
        for task in TASKS:
            write_jsonl(data / f"{task}-train.jsonl", [chat_record(i) for i in train[task]])
            write_jsonl(data / f"{task}-eval-chat.jsonl", [chat_record(i) for i in evals[task]])
            write_jsonl(data / f"{task}-eval.jsonl", [i.record() for i in evals[task]])
        write_jsonl(data / "gate-train.jsonl", gate_records(train, fresh, cfg.n_train))
        marker.write_text(json.dumps(ids))
        settings_file.write_text(json.dumps(settings))
    # the test sets depend only on the ids above and the seed; a later stage of its own, so a work
    # folder from before they existed gains them without touching anything else
    test = write_test_sets(data, ids, cfg.seed, HoldoutSizes(cfg.n_test, cfg.n_test_generate))
    return ids | {k: test[k] for k in TEST_KEYS}


# ---------------------------------------------------------------------- training


def stage_args(cfg: ReproduceConfig, out: Path, run: str, steps: int, lr: float):
    """Training options of a stage: resumable, checkpointed every 20 steps, seeded."""
    from xlora.train.loop import TrainingArgs

    return TrainingArgs(
        output_dir=str(out),
        run_dir=str(cfg.work / "runs" / run),
        max_steps=steps,
        batch_size=cfg.batch_size,
        lr=lr,
        warmup_steps=5,
        save_every=20,
        seed=cfg.seed,
        resume="auto",  # continue a killed stage, start a new one afresh
    )


EXPERT_STORE = Path(__file__).resolve().parents[1] / "experts"  # committed experts: reused when their recipe matches


def train_sha1(cfg: ReproduceConfig, task: str) -> str:
    """SHA-1 of a task's staged training file: what the expert learns from, item for item. The recipe
    alone does not pin it (the peptide design pool, for one, depends on `n_eval`)."""
    return hashlib.sha1((cfg.work / "data" / f"{task}-train.jsonl").read_bytes()).hexdigest()


def made_with(sidecar: Path) -> tuple[dict, str | None]:
    """(recipe, training-file SHA-1) an expert's sidecar records; no SHA-1 from older runs."""
    saved = json.loads(sidecar.read_text())
    return saved, saved.pop("train_sha1", None)


def stage_experts(cfg: ReproduceConfig, store: Path | None = EXPERT_STORE) -> dict[str, Path]:
    """One PEFT LoRA expert per task in `work/experts/`. Experts already trained with the same recipe
    on the same training file (`store/recipe.json`, committed with the package) are copied instead of
    retrained: they are the bulk of the run's time (about 15-20 min each on 2 cores)."""
    from xlora.bases.loading import load_base
    from xlora.train.api import LoraOptions, train_expert
    from xlora.train.data import load_dataset

    experts = {}
    for task in TASKS:
        recipe, sha = cfg.expert_recipe(task), train_sha1(cfg, task)
        out = cfg.work / "experts" / task
        experts[task] = out
        sidecar = out.with_name(f"{task}.recipe.json")  # the recipe the expert in `out` was made with
        if (out / "adapter_config.json").is_file():
            saved, saved_sha = made_with(sidecar) if sidecar.is_file() else (None, None)
            if saved != recipe or saved_sha not in (None, sha):
                raise ValueError(
                    f"{out}: an expert made with another recipe or other data (or by an older xlora) is there; "
                    f"never mixed into this run: delete {out.parent} or choose another --work"
                )
            continue
        if store is not None and reusable_expert(store, task, recipe, sha):
            shutil.copytree(store / task, out)
            sidecar.write_text(json.dumps(recipe | {"train_sha1": sha}))
            print(f"expert {task}: reused from {store / task} (same recipe, same training data)")
            continue
        base, tok = load_base(cfg.base)
        ds = load_dataset(cfg.work / "data" / f"{task}-train.jsonl", tok, cfg.max_length)
        args = stage_args(cfg, out, task, cfg.steps_of(task), cfg.expert_lr)
        args.batch_size = cfg.expert_batch_size
        args.precision = cfg.expert_precision.get(task, "auto")
        print(f"training expert {task} ({len(ds)} examples, {cfg.steps_of(task)} steps of {cfg.expert_batch_size})")
        t0 = time.time()
        train_expert(
            base,
            ds,
            None,
            args,
            LoraOptions(cfg.rank, cfg.alpha, list(cfg.targets), dropout=0.0),
            pad_token_id=tok.pad_token_id or 0,
        )
        record_time(cfg, f"expert {task}", time.time() - t0)
        sidecar.write_text(json.dumps(recipe | {"train_sha1": sha}))
    return experts


def commit_experts(cfg: ReproduceConfig, store: Path = EXPERT_STORE) -> None:
    """Copy a run's trained experts into `store` with the recipe and training file (SHA-1) each was
    made with and its training wall time, so later runs with the same recipe and data reuse them
    (`stage_experts`). Refuses experts whose sidecar records another recipe than `cfg`'s; replaces the
    store as a whole, atomically."""
    from xlora.formats.native import atomic_directory

    timings = cfg.work / "runs" / "timings.json"
    times = json.loads(timings.read_text()) if timings.is_file() else {}
    previous = store / "recipe.json"
    before = json.loads(previous.read_text()).get("train_s", {}) if previous.is_file() else {}
    shas = {}
    for task in TASKS:
        sidecar = cfg.work / "experts" / f"{task}.recipe.json"
        saved, sha = made_with(sidecar) if sidecar.is_file() else (None, None)
        if saved != cfg.expert_recipe(task):
            raise ValueError(f"{sidecar}: the expert was made with another recipe than this config's; not committed")
        shas[task] = sha or train_sha1(cfg, task)  # older sidecars: the staged file it trained on
    with atomic_directory(store, overwrite=True, replaces=None) as tmp:
        for task in TASKS:
            shutil.copytree(cfg.work / "experts" / task, Path(tmp) / task)
        record = {
            "recipes": {t: cfg.expert_recipe(t) for t in TASKS},
            "train_sha1": shas,
            # an expert this run reused keeps the training time recorded when it was trained
            "train_s": {t: times.get(f"expert {t}", before.get(t)) for t in TASKS},
            # the machine's cores, not this process's thread setting (the commit may run single-threaded)
            "machine": {"cores": os.cpu_count(), "torch": torch.__version__},
        }
        (Path(tmp) / "recipe.json").write_text(json.dumps(record, indent=1))


def reusable_expert(store: Path, task: str, recipe: dict, sha: str | None = None) -> bool:
    """Whether `store` holds this task's expert trained with exactly `recipe` (and, where the store
    records it, on the training file whose SHA-1 is `sha`)."""
    path = store / "recipe.json"
    if not path.is_file() or not (store / task / "adapter_config.json").is_file():
        return False
    record = json.loads(path.read_text())
    # a store from v0.6-0.7 holds one "recipe" shared by its three experts, and no SHA-1s
    if record.get("recipes", {}).get(task, record.get("recipe")) != recipe:
        return False
    stored = record.get("train_sha1", {}).get(task)
    return stored is None or sha is None or stored == sha


def record_time(cfg: ReproduceConfig, stage: str, seconds: float) -> None:
    """Wall time of a stage when it actually ran (a resumed run keeps the earlier figures)."""
    path = cfg.work / "runs" / "timings.json"
    times = json.loads(path.read_text()) if path.is_file() else {}
    times[stage] = round(seconds)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(times, indent=1))


def gate_config(cfg: ReproduceConfig):
    """The X-LoRA classifier the reproduce run trains."""
    from xlora.core.config import XLoraConfig

    return XLoraConfig(
        xlora_depth=cfg.gate_depth,
        xlora_size=cfg.gate_size,
        layerwise_scalings=cfg.gate_layerwise,
        enable_softmax=cfg.gate_softmax,
        xlora_dropout_p=0.0,
        scaling_pass_layers=cfg.gate_scaling_pass_layers,
    )


def gate_args(cfg: ReproduceConfig, out: Path, run: str, steps: int):
    """A gate stage's training options: `stage_args` at the gate's learning rate, precision and routing prior."""
    args = stage_args(cfg, out, run, steps, cfg.gate_lr)
    args.precision = cfg.gate_precision
    args.route_weight = cfg.gate_route_weight
    args.route_only = cfg.gate_route_only
    return args


def train_gate_stage(cfg: ReproduceConfig, experts: dict[str, Path], out: Path, run: str, data: Path) -> None:
    """Train a gate over `experts` on the chat records in `data`; the checkpoint goes to `out`."""
    from xlora.bases.loading import load_base
    from xlora.core.model import XLoraModel
    from xlora.train.api import train_gate
    from xlora.train.data import load_dataset

    base, tok = load_base(cfg.base)
    torch.manual_seed(cfg.seed)
    model = XLoraModel.from_experts(base, experts, gate_config(cfg), base_model_id=cfg.base)
    ds = load_dataset(data, tok, cfg.max_length)
    args = gate_args(cfg, out, run, cfg.gate_steps)
    print(f"training the gate ({len(ds)} examples, {cfg.gate_steps} steps)")
    train_gate(model, ds, None, args, pad_token_id=tok.pad_token_id or 0)


def stage_general(cfg: ReproduceConfig) -> Path:
    """The gate's training file: `gate-train.jsonl`, plus `gate_general` everyday prompts with the base
    model's own greedy answers as targets (`xlora.science.tasks.general`; answers cached per prompt)."""
    data = cfg.work / "data"
    if cfg.gate_general == 0:
        return data / "gate-train.jsonl"
    from xlora.bases.loading import load_base
    from xlora.science.eval.evaluate import generate_answers
    from xlora.science.tasks import Item
    from xlora.science.tasks.general import base_answered, general_prompts

    prompts = general_prompts(cfg.gate_general, cfg.seed)
    cache = data / "general-base-answers.json"
    try:  # a cache only: unreadable (say, a kill mid-write on an older xlora) means answer again
        done = json.loads(cache.read_text()) if cache.is_file() else {}
    except (OSError, ValueError):
        done = {}
    done = done if isinstance(done, dict) else {}
    todo = [p for p in prompts if p not in done]
    if todo:
        base, tok = load_base(cfg.base)
        print(f"answering {len(todo)} general prompts with the base model (gate targets)")
        with torch.no_grad():
            answers = generate_answers(base.eval(), tok, [Item("general", p, "", {}) for p in todo], 32, 32)
        done |= dict(zip(todo, answers))
        write_text_atomic(cache, json.dumps(done, indent=1))
    rows = [chat_record(it) | {"expert": "base"} for it in base_answered(prompts, [done[p] for p in prompts])]
    out = data / f"gate-train-general{cfg.gate_general}.jsonl"
    write_text_atomic(out, (data / "gate-train.jsonl").read_text() + "".join(json.dumps(r) + "\n" for r in rows))
    return out


def run_settings(cfg: ReproduceConfig) -> dict:
    """What decides the gate (data, experts, gate options): the config less paths and test-set sizes."""
    return {k: v for k, v in asdict(cfg).items() if k not in ("out", "work", "n_test", "n_test_generate")}


SETTINGS_FILE = "reproduce_settings.json"  # next to the gate: the run settings it was trained with


def check_finished_run(cfg: ReproduceConfig) -> None:
    """A gate already at `cfg.out` is reused only by a run with the settings it was trained with
    (`SETTINGS_FILE`, written when the gate is saved; older checkpoints: their manifest): say, a gate
    trained without the routing prior is never taken for one trained with it."""
    record, manifest = cfg.out / SETTINGS_FILE, cfg.out / "manifest.json"
    source = record if record.is_file() else manifest
    if not source.is_file():
        raise ValueError(
            f"{cfg.out}: a gate is there without a record of the settings it was trained with (a run killed "
            "just after saving it, or an unfinished run of an older xlora); delete it or choose another --out"
        )
    try:
        data = json.loads(source.read_text())
        had = data if source == record else run_settings(config_from_manifest(data["config"]))
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{source}: unreadable ({e}); delete {cfg.out} or choose another --out") from None
    want = json.loads(json.dumps(run_settings(cfg), default=str))
    had = json.loads(json.dumps(had, default=str))
    differ = [f"{k}={had.get(k)!r} there, {want[k]!r} here" for k in sorted(want) if had.get(k) != want[k]]
    if differ:
        raise ValueError(
            f"{cfg.out}: a gate trained with other settings ({'; '.join(differ)}) is already there; "
            "choose another --out or delete it"
        )


def stage_gate(cfg: ReproduceConfig, experts: dict[str, Path]) -> Path:
    existing = cfg.out / "xlora_config.json"
    if existing.is_file():  # done before: reuse it, unless it was made with other gate settings
        have, want = json.loads(existing.read_text()), asdict(gate_config(cfg))
        keys = ("xlora_depth", "xlora_size", "layerwise_scalings", "enable_softmax", "scaling_pass_layers")
        differ = [k for k in keys if have.get(k) != want[k]]
        if sorted(have.get("adapters", [])) != sorted(TASKS):
            raise ValueError(
                f"{existing}: a checkpoint over other experts ({', '.join(have.get('adapters', []))}) is already "
                f"there, not this run's {', '.join(TASKS)}; choose another --out or delete it"
            )
        if differ:
            raise ValueError(
                f"{existing}: a gate with other settings ({', '.join(f'{k}={have[k]}' for k in differ)}) is already "
                "there; choose another --out or delete it"
            )
        check_finished_run(cfg)
        return cfg.out
    t0 = time.time()
    # the run directory (resumable checkpoints) is named by the settings, so changing them starts afresh
    settings = run_settings(cfg)
    if cfg.gate_scaling_pass_layers is None:  # added later: runs of full-pass gates keep their folder
        del settings["gate_scaling_pass_layers"]
    if cfg.gate_general == 0:  # added later: runs of science-only gates keep their folder
        del settings["gate_general"]
    if not cfg.gate_route_weight:  # added in v0.12: runs without a routing prior keep their folder
        del settings["gate_route_weight"]
    if cfg.gate_route_only is None:  # added in v0.13, likewise
        del settings["gate_route_only"]
    tag = hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:8]
    train_gate_stage(cfg, experts, cfg.out, f"gate-{cfg.out.name}-{tag}", stage_general(cfg))
    write_text_atomic(cfg.out / SETTINGS_FILE, json.dumps(run_settings(cfg), indent=1, default=str))
    record_time(cfg, "gate", time.time() - t0)
    return cfg.out


# ---------------------------------------------------------------------- the main entry


def preflight(cfg: ReproduceConfig) -> None:
    """What can be checked before hours of work: the two folders, and the early gate against the base."""
    from transformers import AutoConfig

    from xlora.bases.loading import default_base_dir
    from xlora.formats.atomic import check_destination

    check_destination(cfg.out, overwrite=True, replaces="xlora")  # a gate from an earlier run is reused
    check_destination(cfg.work, overwrite=True, replaces=None)
    out, work = cfg.out.resolve(), cfg.work.resolve()
    if out == work or out.is_relative_to(work) or work.is_relative_to(out):
        raise ValueError(f"--out {cfg.out} and --work {cfg.work}: expected two separate folders")
    k = cfg.gate_scaling_pass_layers
    if k is not None:
        base_dir = default_base_dir() if cfg.base == "default" else Path(cfg.base)
        n = getattr(AutoConfig.from_pretrained(base_dir).get_text_config(), "num_hidden_layers", None)
        if isinstance(n, int) and k > n:
            raise ValueError(f"--scaling-pass-layers {k}: expected 1..{n} (the base model's decoder layers)")


def reproduce(cfg: ReproduceConfig) -> dict:
    """Run (or resume) the whole experiment; returns the results dict also written to disk."""
    from xlora.science.eval.evaluate import evaluate_all, write_results
    from xlora.science.figures import write_figures

    preflight(cfg)
    ids = stage_data(cfg)
    experts = stage_experts(cfg)
    stage_gate(cfg, experts)
    t0 = time.time()
    results = evaluate_all(cfg)
    write_figures(cfg.out, cfg.work / "data", base=cfg.base)
    record_time(cfg, "evaluation and figures", time.time() - t0)
    wall = json.loads((cfg.work / "runs" / "timings.json").read_text())
    wall["total"] = sum(wall.values())
    write_results(cfg.out, results)
    manifest = {
        "command": "xlora reproduce",
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
        "data": {
            "qm9pack": metadata.version("qm9pack"),
            "modlamp": metadata.version("modlamp"),
            "split": f"random, seed {cfg.seed}, disjoint train/held-out by molecule and by sequence",
            **ids,
        },
        "machine": {"cores": torch.get_num_threads(), "python": platform.python_version(), "torch": torch.__version__},
        "wall_time_s": wall,
        "results": results,
    }
    tmp = cfg.out / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    tmp.replace(cfg.out / "manifest.json")
    shutil.copy(cfg.out / "results.md", cfg.work / "results.md")
    return results
