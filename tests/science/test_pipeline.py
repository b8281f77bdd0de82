"""Science pipeline: real data loaders, metrics on hand-made cases, a tiny end-to-end run."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace

import pytest
import torch
from helpers import add_tiny_tokenizer, make_base

from xlora.science.tasks import TASKS, Item, formula_of, mean_baseline, net_charge, score
from xlora.science.tasks.datasets import hill_formula, load_acps, load_amps, load_qm9, split, split3


@pytest.fixture(scope="module")
def qm9():
    return load_qm9()


def test_qm9_rows_and_formulas(qm9):
    assert len(qm9) == 130_831
    assert qm9[0].smiles == "C" and qm9[0].formula == "CH4"
    assert hill_formula([5, 4, 1, 1, 0]) == "C4H5NO"
    # the formula built from QM9's Stoichiometry counts equals RDKit's for the molecule
    for m in qm9[::2617]:
        assert formula_of(m.smiles) == m.formula, m
    gaps = [m.gap_ev for m in qm9[:1000]]
    assert 1 < min(gaps) and max(gaps) < 20  # eV, converted from Hartree


def test_amps_and_split():
    raw = load_amps(unique=False)
    assert len(raw) == 5200 and sum(p.antimicrobial for p in raw) == 2600
    amps = load_amps()
    assert len({p.sequence for p in amps}) == len(amps) < 5200
    train, held = split(amps, 300, 50, seed=3)
    assert len(train) == 300 and len(held) == 50
    assert not {p.sequence for p in train} & {p.sequence for p in held}
    assert split(amps, 300, 50, seed=3) == (train, held)  # fixed seed, same split
    a, b, extra = split3(amps, 300, 50, 100, seed=3)
    assert (a, b) == (train, held) and len(extra) == 100  # extra items never move the first two
    assert not {p.sequence for p in extra} & {p.sequence for p in train + held}
    with pytest.raises(ValueError, match="only .* exist"):
        split(amps, 5000, 500, seed=0)


def test_anticancer_set_and_thermo_fields(qm9):
    acps = load_acps()
    assert sum(p.anticancer for p in acps) == 343 and sum(not p.anticancer for p in acps) == 826
    assert len({p.sequence for p in acps}) == len(acps)
    assert not {p.sequence for p in acps} & {p.sequence for p in load_amps(unique=False)}  # no shared peptide
    methane = qm9[0]  # QM9 row 1: Cv 6.469 cal/mol K, ZPVE 0.044749 Hartree
    assert methane.cv == pytest.approx(6.469) and methane.zpve_ev == pytest.approx(0.044749 * 27.211386, rel=1e-6)


def test_net_charge():
    # six lysines plus the termini at pH 7 (Biopython's pKa set): a little under +6
    assert 5.5 < net_charge("KKKKKK") < 6.0
    assert -6.5 < net_charge("DDDDEE") < -5.8
    assert -0.5 < net_charge("GAGAGA") < 0.0  # only the termini, which nearly cancel


def test_metrics_on_hand_made_cases():
    props = [
        Item("molecule-properties", "p", "", {"gap": 6.0, "dipole": 1.0}),
        Item("molecule-properties", "p", "", {"gap": 8.0, "dipole": 2.0}),
    ]
    r = score("molecule-properties", props, ["gap 6.50 eV; dipole 1.00 D", "no numbers here"])
    assert r["gap_mae_ev"] == pytest.approx(0.5) and r["parsed_rate"] == 0.5
    design = [Item("molecule-design", "p", "", {"formula": "C2H6O"})] * 3
    r = score("molecule-design", design, ["CCO", "C1CC", "CCC"], train_smiles={"CCO"})
    assert r["valid_rate"] == pytest.approx(2 / 3) and r["exact_formula_rate"] == pytest.approx(1 / 3)
    assert r["novel_rate"] == pytest.approx(1 / 3)  # CCC is valid and new; CCO is in the training set
    peps = [
        Item("peptides", "p", "", {"kind": "classify", "antimicrobial": True, "charge": 3.0}),
        Item("peptides", "p", "", {"kind": "classify", "antimicrobial": False, "charge": 0.0}),
        Item("peptides", "p", "", {"kind": "design", "length": 6, "charge": 6}),
    ]
    r = score("peptides", peps, ["antimicrobial: yes; charge +2.0", "antimicrobial: yes; charge +0.5", "KKKKKK"])
    assert r["amp_accuracy"] == 0.5 and r["charge_mae"] == pytest.approx(0.75) and r["design_satisfied_rate"] == 1.0
    # an MAE needs at least half the answers parsed: one lucky parse out of three is "n/a"
    r = score("molecule-properties", props + props[:1], ["gap 6.0", "?", "?"])
    assert math.isnan(r["gap_mae_ev"]) and r["parsed_rate"] == pytest.approx(1 / 3)
    r = score("peptides", peps, ["charge +3.0", "no", "KKKKKK"])
    assert r["charge_mae"] == 0.0 and r["charge_parsed_rate"] == 0.5
    thermo = [Item("molecule-thermo", "p", "", {"cv": 30.0, "zpve": 4.0})] * 2
    r = score("molecule-thermo", thermo, ["Cv 31.50 cal/mol K; ZPVE 3.90 eV", "Cv 29.0"])
    assert r["cv_mae"] == pytest.approx(1.25) and r["zpve_mae_ev"] == pytest.approx(0.1) and r["parsed_rate"] == 0.5
    assert score("molecule-thermo", thermo, ["Cv: 30.5; ZPVE: 4.0", "ZPVE 4.2 eV"])["parsed_rate"] == 0.5  # both
    acp = [Item("anticancer", "p", "", {"anticancer": True}), Item("anticancer", "p", "", {"anticancer": False})]
    assert score("anticancer", acp, ["anticancer: yes", "anticancer: yes"])["acp_accuracy"] == 0.5
    assert score("anticancer", acp, ["yes", "anticancer: no"])["acp_accuracy"] == 0.5  # unparsed is wrong
    assert score("anticancer", acp, ["Anticancer: Yes.", "anticancer: not sure"])["acp_accuracy"] == 0.5
    assert score("anticancer", acp, ["non-anticancer: yes", "anticancer: no"])["acp_accuracy"] == 0.5
    with pytest.raises(ValueError, match="anticancer item 1: meta 'anticancer' must be true or false, got 'yes'"):
        score("anticancer", [Item("anticancer", "p", "", {"anticancer": "yes"})], ["anticancer: yes"])
    with pytest.raises(ValueError, match="molecule-thermo item 2: meta 'cv' must be a finite number, got None"):
        mean_baseline("molecule-thermo", [thermo[0], Item("molecule-thermo", "p", "", {"cv": None, "zpve": 1.0})], [])
    with pytest.raises(ValueError, match="anticancer item 1: its meta lacks anticancer"):
        score("anticancer", [Item("anticancer", "p", "", {})], ["anticancer: yes"])
    assert mean_baseline("molecule-thermo", thermo, ["Cv 28.00; ZPVE 3.00", "Cv 30.00; ZPVE 4.00"]) == {
        "cv_mae": pytest.approx(1.0),
        "zpve_mae_ev": pytest.approx(0.5),
    }
    majority = mean_baseline("anticancer", acp * 2 + acp[:1], ["anticancer: no"] * 3 + ["anticancer: yes"])
    assert majority == {"acp_accuracy": pytest.approx(2 / 5)}  # always "no": right on the 2 negatives of 5
    # the training-mean baseline: train answers 2 and 4 -> mean 3; targets 6 and 8 -> MAE 4 (gap)
    base = mean_baseline("molecule-properties", props, ["gap 2.00 eV; dipole 1.00 D", "gap 4.00 eV; dipole 3.00 D"])
    assert base == {"gap_mae_ev": pytest.approx(4.0), "dipole_mae_d": pytest.approx(0.5)}
    base = mean_baseline("peptides", peps, ["antimicrobial: yes; charge +1.0", "antimicrobial: no; charge +2.0"])
    assert base == {"charge_mae": pytest.approx((1.5 + 1.5) / 2)}  # design items are not charge targets


def test_tiny_end_to_end(tmp_path):
    """The whole pipeline on a tiny local model: every artifact is produced."""
    from xlora.science.recipe.pipeline import ReproduceConfig, reproduce

    base = make_base(tmp_path / "tiny", layers=1)
    add_tiny_tokenizer(base)
    cfg = ReproduceConfig(
        out=tmp_path / "ck",
        work=tmp_path / "work",
        base=str(base),
        n_train=16,
        n_eval=4,
        n_expert_molecules=20,
        n_expert_classify=14,
        n_expert_design=6,
        n_expert_acp=8,
        acp_gate_fresh=4,
        expert_batch_size=4,
        expert_steps=2,
        gate_steps=2,
        batch_size=4,
        gate_size=8,
        gate_fresh=4,
        gate_general=3,
        gate_softmax=False,
        gate_route_weight=0.5,
        gate_route_only=["molecule-properties", "base"],  # the prior reads these labels alone
    )
    torch.manual_seed(0)
    results = reproduce(cfg)
    assert set(results["models"]) == {
        "base",
        "expert molecule-properties",
        "expert molecule-design",
        "expert peptides",
        "expert molecule-thermo",
        "expert anticancer",
        "uniform mix (1/N)",
        "X-LoRA (trained gate)",
    }
    for f in (
        "xlora_config.json",
        "xlora_classifier.safetensors",
        "results.md",
        "manifest.json",
        "figures/routing_heatmap.png",
        "figures/routing_tokens.png",
    ):
        assert (cfg.out / f).is_file(), f
    manifest = json.loads((cfg.out / "manifest.json").read_text())
    assert manifest["command"] == "xlora reproduce" and len(manifest["data"]["qm9_index_train"]) == 40
    assert not set(manifest["data"]["qm9_index_train"]) & set(manifest["data"]["qm9_index_eval"])
    assert not set(manifest["data"]["amp_sequences_train"]) & set(manifest["data"]["amp_sequences_eval"])
    # fresh gate examples: disjoint from both, and the gate trained on them as well
    data = manifest["data"]
    assert len(data["qm9_index_gate"]) == 8 and len(data["amp_sequences_gate"]) == 4
    assert not set(data["qm9_index_gate"]) & (set(data["qm9_index_train"]) | set(data["qm9_index_eval"]))
    assert not set(data["amp_sequences_gate"]) & (set(data["amp_sequences_train"]) | set(data["amp_sequences_eval"]))
    assert len(data["acp_sequences_train"]) == 8 and len(data["acp_sequences_gate"]) == 4
    assert not set(data["acp_sequences_gate"]) & (set(data["acp_sequences_train"]) | set(data["acp_sequences_eval"]))
    # 16 of each expert's examples (anticancer has 8 in all), then 4 fresh ones per task
    assert len((cfg.work / "data" / "gate-train.jsonl").read_text().splitlines()) == 4 * 16 + 8 + 5 * 4
    # the gate trained on those plus 3 general prompts whose targets are the base's own answers
    gate_rows = (cfg.work / "data" / "gate-train-general3.jsonl").read_text().splitlines()
    cached = json.loads((cfg.work / "data" / "general-base-answers.json").read_text())
    assert len(gate_rows) == 4 * 16 + 8 + 5 * 4 + 3 and len(cached) == 3
    last = json.loads(gate_rows[-1])["messages"]
    assert last[1]["content"] == cached[last[0]["content"]]
    # each gate example names its task's expert (the routing prior's label); general prompts the base
    labels = [json.loads(row)["expert"] for row in gate_rows]
    assert labels[-3:] == ["base"] * 3 and set(labels[:-3]) == set(TASKS)
    assert labels[:16] == ["molecule-properties"] * 16 and labels[-7:-3] == ["anticancer"] * 4
    from xlora.science.recipe.pipeline import stage_general

    (cfg.work / "data" / "general-base-answers.json").write_text("{broken")  # a cache only: answered again
    assert stage_general(cfg).read_text().splitlines() == gate_rows
    # the larger test sets (200 per task by default): staged too, unseen by experts and gate
    seen_qm9 = set(data["qm9_index_train"]) | set(data["qm9_index_eval"]) | set(data["qm9_index_gate"])
    seen_amp = set(data["amp_sequences_train"]) | set(data["amp_sequences_eval"]) | set(data["amp_sequences_gate"])
    assert len(data["qm9_index_test"]) == 400 and not set(data["qm9_index_test"]) & seen_qm9
    assert len(data["amp_sequences_test"]) == 200 and not set(data["amp_sequences_test"]) & seen_amp
    assert len((cfg.work / "data" / "peptides-test.jsonl").read_text().splitlines()) == 200
    assert len(data["acp_sequences_test"]) == 200 and not set(data["acp_sequences_test"]) & set(
        data["acp_sequences_train"] + data["acp_sequences_eval"] + data["acp_sequences_gate"]
    )
    assert json.loads((cfg.out / "xlora_config.json").read_text())["enable_softmax"] is False
    (gate_run,) = (cfg.work / "runs").glob("gate-ck-*/run.json")  # the gate trained in bf16 (the default)
    gate_run_args = json.loads(gate_run.read_text())["args"]
    assert cfg.gate_precision == "bf16" and gate_run_args["precision"] == "bf16"
    assert gate_run_args["route_weight"] == 0.5  # the routing prior reached the gate's training
    assert gate_run_args["route_only"] == ["base", "molecule-properties"]
    assert "| X-LoRA (trained gate) |" in (cfg.out / "results.md").read_text()
    # resumable: a second call reuses every stage
    assert json.dumps(reproduce(cfg), sort_keys=True) == json.dumps(results, sort_keys=True)  # NaN-safe
    with pytest.raises(ValueError, match=r"xlora_config.json: a gate with other settings \(xlora_size=8\)"):
        reproduce(replace(cfg, gate_size=16))  # never silently reuse a gate of other settings
    with pytest.raises(ValueError, match=r"other settings \(gate_route_weight=0.5 there, 1.0 here\)"):
        reproduce(replace(cfg, gate_route_weight=1.0))  # ... nor one trained with another routing prior
    with pytest.raises(ValueError, match=r"other settings \(gate_route_only=\['base', 'molecule-properties'\] there"):
        reproduce(replace(cfg, gate_route_only=None))  # ... or one reading other labels
    manifest_text = (cfg.out / "manifest.json").read_text()
    (cfg.out / "manifest.json").unlink()  # as if killed during the evaluation: the gate's own record decides
    with pytest.raises(ValueError, match=r"other settings \(gate_route_weight=0.5 there, 1.0 here\)"):
        reproduce(replace(cfg, gate_route_weight=1.0))
    settings_text = (cfg.out / "reproduce_settings.json").read_text()
    (cfg.out / "reproduce_settings.json").unlink()  # no record at all: refused, not guessed
    with pytest.raises(ValueError, match="without a record of the settings it was trained with"):
        reproduce(cfg)
    (cfg.out / "manifest.json").write_text(manifest_text)
    (cfg.out / "reproduce_settings.json").write_text(settings_text)
    # ... nor a checkpoint over other experts (say, a three-expert one from before v0.8)
    older = tmp_path / "ck-three"
    older.mkdir()
    config = json.loads((cfg.out / "xlora_config.json").read_text())
    config["adapters"] = config["adapters"][:3]
    (older / "xlora_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="a checkpoint over other experts"):
        reproduce(replace(cfg, out=older))
    check_forced_routing(cfg)
    check_gate_plus(cfg)
    check_gate_probe(cfg)
    check_expert_reuse(cfg, tmp_path)


def check_gate_plus(cfg) -> None:
    """The extra-data gate of the composite and general-prompt experiments: the run's gate data plus
    the extra items, the run's gate settings and base, resumable."""
    from xlora.science.recipe.extra_gate import train_gate_plus

    extra = [Item("general", "Spell the word apple backwards.", "elppa", {})]
    gate = train_gate_plus(cfg.work, cfg.out, extra, "plus", steps=2)
    lines = (cfg.work / "data" / "plus-train.jsonl").read_text().splitlines()
    # the run's own gate data, its general prompts included, then the extra item
    assert lines[:-1] == (cfg.work / "data" / "gate-train-general3.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["messages"][1]["content"] == "elppa"
    config = json.loads((gate / "xlora_config.json").read_text())
    assert (
        config["xlora_size"] == cfg.gate_size
        and config["adapters"] == json.loads((cfg.out / "xlora_config.json").read_text())["adapters"]
    )
    plus_args = json.loads((cfg.work / "runs" / "plus" / "run.json").read_text())["args"]
    assert plus_args["precision"] == cfg.gate_precision and plus_args["route_weight"] == cfg.gate_route_weight
    stamp = (gate / "xlora_classifier.safetensors").stat().st_mtime_ns
    assert train_gate_plus(cfg.work, cfg.out, extra, "plus", steps=2) == gate  # done: not retrained
    assert (gate / "xlora_classifier.safetensors").stat().st_mtime_ns == stamp


def check_expert_reuse(cfg, tmp_path) -> None:
    """Committed experts are reused by a run with the same recipe (bit for bit, nothing trained) and
    ignored by a run with another recipe."""
    from xlora.science.recipe.pipeline import commit_experts, reusable_expert, stage_data, stage_experts

    store = tmp_path / "store"
    commit_experts(cfg, store)
    record = json.loads((store / "recipe.json").read_text())
    assert record["recipes"]["anticancer"]["expert_steps"] == 2 and set(record["train_s"]) == set(TASKS)
    for task in TASKS:  # each expert trained its own number of steps (`expert_step_factor`)
        log = (cfg.work / "runs" / task / "metrics.jsonl").read_text().splitlines()
        assert json.loads(log[-1])["step"] == cfg.steps_of(task)
        run = json.loads((cfg.work / "runs" / task / "run.json").read_text())
        assert run["args"]["precision"] == cfg.expert_precision.get(task, "auto")  # bf16 where the config says
    assert set(record["train_sha1"]) == set(TASKS)
    assert "n_expert_acp" not in record["recipes"]["peptides"]  # each expert's recipe: its own data only
    same = replace(cfg, work=tmp_path / "work-same", out=tmp_path / "ck-same")
    stage_data(same)
    for task, path in stage_experts(same, store=store).items():
        weights = "adapter_model.safetensors"
        assert (path / weights).read_bytes() == (cfg.work / "experts" / task / weights).read_bytes()
    assert not (same.work / "runs" / "timings.json").exists()  # nothing was trained
    other = replace(cfg, work=tmp_path / "work-other", out=tmp_path / "ck-other", expert_lr=0.5)
    stage_data(other)
    stage_experts(other, store=store)
    assert set(json.loads((other.work / "runs" / "timings.json").read_text())) == {f"expert {t}" for t in TASKS}
    # a work folder's finished experts are never mixed into a run of another recipe
    with pytest.raises(ValueError, match="an expert made with another recipe"):
        stage_experts(replace(other, expert_lr=0.25), store=store)
    # other anticancer data: only that expert is retrained, the other four come from the store
    fewer = replace(cfg, work=tmp_path / "work-fewer", out=tmp_path / "ck-fewer", n_expert_acp=6)
    stage_data(fewer)
    stage_experts(fewer, store=store)
    assert set(json.loads((fewer.work / "runs" / "timings.json").read_text())) == {"expert anticancer"}
    # other training data under the same recipe (n_eval moves the peptide design pool): retrained
    shifted = replace(cfg, work=tmp_path / "work-shifted", out=tmp_path / "ck-shifted", n_eval=20)
    stage_data(shifted)
    stage_experts(shifted, store=store)
    assert set(json.loads((shifted.work / "runs" / "timings.json").read_text())) == {"expert peptides"}
    # experts made with another recipe than the committing config's are refused
    with pytest.raises(ValueError, match="made with another recipe than this config's; not committed"):
        commit_experts(replace(other, expert_lr=0.25), tmp_path / "store-refused")
    assert not (tmp_path / "store-refused").exists()
    # a store of the v0.6 layout (one "recipe" for its experts) is still reused
    old = tmp_path / "store-old"
    shutil.copytree(store, old)
    (old / "recipe.json").write_text(json.dumps({"recipe": cfg.expert_recipe("peptides")}))
    assert reusable_expert(old, "peptides", cfg.expert_recipe("peptides"))
    assert not reusable_expert(old, "anticancer", cfg.expert_recipe("anticancer"))


def experiment(name: str):
    """A script of experiments/ as a module."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(name, Path(__file__).parents[2] / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_gate_probe(cfg) -> None:
    """experiments/gate_probe.py trains the asked-for gate and reports the held-out losses of it."""
    from xlora.bases.loading import load_base
    from xlora.core.model import XLoraModel
    from xlora.science.eval.evaluate import eval_loss

    probe = experiment("gate_probe")
    argv = ["p", "--work", str(cfg.work), "--base", cfg.base, "--steps", "2", "--size", "8", "--no-softmax"]
    with pytest.raises(SystemExit, match="--n-train"):  # not the sizes the work dir was made with
        probe.main(argv + ["--seed", "3"])
    row = probe.main(argv + ["--fresh", "4"])  # the sizes come from the work dir
    gate = cfg.work / "probes" / "p" / "gate"
    config = json.loads((gate / "xlora_config.json").read_text())
    assert config["xlora_size"] == 8 and config["enable_softmax"] is False
    assert len((cfg.work / "probes" / "p" / "gate-train.jsonl").read_text().splitlines()) == 4 * 16 + 8 + 5 * 4
    base, tok = load_base(cfg.base)
    model = XLoraModel.from_pretrained(base, gate).eval()
    for task in ("molecule-properties", "peptides"):
        expected = eval_loss(model, tok, cfg.work / "data" / f"{task}-eval-chat.jsonl")
        assert row["domains"][task]["loss"] == pytest.approx(expected, abs=1e-4)


def check_forced_routing(cfg) -> None:
    """experiments/routing_diagnostics.py: forcing one expert everywhere must equal that expert alone,
    and forcing it only on the prompt must differ (the answer keeps the gate's scalings)."""
    from xlora.bases.loading import load_base
    from xlora.core.model import XLoraModel
    from xlora.science.eval.evaluate import eval_loss

    diag = experiment("routing_diagnostics")
    base, tok = load_base(cfg.base)
    model = XLoraModel.from_pretrained(base, cfg.out).eval()
    path = cfg.work / "data" / "peptides-eval-chat.jsonl"
    k = model.expert_names.index("peptides")
    forced = diag.forced_loss(model, tok, path, k, diag.WHERE["everywhere (= single expert)"], 0)
    with model.static_scalings([1.0 if j == k else 0.0 for j in range(model.n_experts)]):
        alone = eval_loss(model, tok, path)
    assert abs(forced - alone) < 1e-5
    prompt_only = diag.forced_loss(model, tok, path, k, diag.WHERE["whole prompt"], 0)
    assert abs(prompt_only - alone) > 1e-6 and abs(prompt_only - eval_loss(model, tok, path)) > 1e-6


def test_plot_scalings_cli(tiny, tmp_path):
    from helpers import load_base
    from typer.testing import CliRunner

    from xlora import XLoraModel
    from xlora.cli import app

    base_dir, experts = tiny
    m = XLoraModel.from_experts(load_base(base_dir), experts)
    m.enable_scalings_logging()
    m.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4)
    m.flush_log_scalings(tmp_path / "log")
    r = CliRunner().invoke(app, ["plot-scalings", str(tmp_path / "log"), "-o", str(tmp_path / "fig")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "fig" / "scalings_heatmap.png").stat().st_size > 1000
    assert (tmp_path / "fig" / "scalings_tokens.png").stat().st_size > 1000
    r = CliRunner().invoke(app, ["plot-scalings", str(tmp_path / "nothing")])
    assert r.exit_code == 2 and "not found" in r.output


@pytest.mark.embedded
def test_shipped_demo_answers(tmp_path):
    """The shipped (package data) xlora-science checkpoint loads on the embedded base and answers."""
    from typer.testing import CliRunner

    from xlora.cli import app
    from xlora.cli.science import DEMO_PROMPTS
    from xlora.science import shipped_checkpoint

    assert (shipped_checkpoint() / "xlora_config.json").is_file()
    r = CliRunner().invoke(app, ["demo", "--figures", str(tmp_path / "fig")])
    assert r.exit_code == 0, r.output
    assert r.output.count("dominant expert:") == len(DEMO_PROMPTS) and "| X-LoRA (trained gate) |" in r.output
    assert (tmp_path / "fig" / "routing_heatmap.png").is_file()


def test_reproduce_cli_defaults_are_the_config_defaults():
    """`xlora reproduce` without options runs ReproduceConfig's recipe (else it would not reuse the
    committed experts, whose recipe is the config's)."""
    import inspect

    from xlora.cli.science import reproduce
    from xlora.science.recipe.pipeline import ReproduceConfig

    config = ReproduceConfig()
    renamed = {"out_dir": "out", "scaling_pass_layers": "gate_scaling_pass_layers"}
    for name, param in inspect.signature(reproduce).parameters.items():
        key = renamed.get(name, name)
        if key not in ("out", "work"):
            assert param.default == getattr(config, key), name


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"gate_route_weight": -1.0}, "gate_route_weight: expected a finite number >= 0"),
        ({"gate_route_weight": 1.0, "gate_route_only": []}, "gate_route_only: expected None or a non-empty list"),
        ({"gate_route_weight": 1.0, "gate_route_only": ["proteins"]}, "gate_route_only: expected None or a"),
        ({"gate_route_weight": 1.0, "gate_route_only": "base"}, "gate_route_only: expected None or a"),
        (
            {"gate_route_weight": 0.0, "gate_route_only": ["base"]},
            "gate_route_only: names the labels a routing prior reads; set gate_route_w",
        ),
        ({"gate_route_weight": 1.0, "gate_route_only": [["base"]]}, "gate_route_only: expected None or a"),
        ({"gate_route_only": ["base"], "gate_general": 0}, "'base' labels the general prompts, and gate_general is 0"),
        ({"gate_softmax": True}, "gate_softmax: the routing prior pulls the general prompts towards no expert"),
        ({"gate_softmax": True, "gate_route_only": ["base", "peptides"]}, "gate_softmax: the routing prior pulls"),
    ],
)
def test_reproduce_routing_options_are_checked(kw, message):
    from xlora.science.recipe.pipeline import ReproduceConfig

    with pytest.raises(ValueError, match=message):
        ReproduceConfig(**kw)


def test_reproduce_routing_options_that_work_and_their_one_spelling():
    from xlora.science.recipe.pipeline import ReproduceConfig

    # softmax is fine when no "base" label is read: no prior, no general prompts, or a prior on tasks only
    for kw in ({"gate_route_weight": 0.0}, {"gate_general": 0}, {"gate_route_only": ["peptides"]}):
        ReproduceConfig(gate_softmax=True, **kw)
    one = ReproduceConfig(gate_route_only=["peptides", "base", "peptides"]).gate_route_only
    assert one == ReproduceConfig(gate_route_only=("base", "peptides")).gate_route_only == ["base", "peptides"]
