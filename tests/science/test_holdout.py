"""The larger test sets: sizes, balance, and disjointness from everything the shipped run used."""

from __future__ import annotations

import json

import pytest

from xlora.science import PACKAGED
from xlora.science.eval.evaluate import read_items
from xlora.science.eval.testsets import HoldoutSizes, holdout_items, manifest_ids, used_acps, used_ids, write_test_sets
from xlora.science.tasks.datasets import load_qm9


@pytest.fixture(scope="module")
def qm9():
    return load_qm9()


@pytest.fixture(scope="module")
def shipped():
    return manifest_ids(PACKAGED)


def test_shipped_test_sets_are_large_balanced_and_unseen(qm9, shipped):
    ids, seed = shipped
    items, test_ids = holdout_items(ids, seed, molecules=qm9)
    generated = {t: [i for i in v if not i.meta.get("loss_only")] for t, v in items.items()}
    for task in items:
        assert len(items[task]) >= 200, task  # losses
    assert len(generated["molecule-properties"]) >= 100 and len(generated["molecule-design"]) >= 100
    classify = [i for i in generated["peptides"] if i.meta["kind"] == "classify"]
    design = [i for i in generated["peptides"] if i.meta["kind"] == "design"]
    assert len(classify) >= 100 and len(design) >= 100
    assert sum(i.meta["antimicrobial"] for i in classify) * 2 == len(classify)  # balanced classes
    # disjoint from every id the shipped experts and gate saw (train, first held-out set, fresh gate data)
    qm9_used, amp_used = used_ids(ids)
    assert {"qm9_index_train", "qm9_index_eval", "qm9_index_gate", "amp_sequences_gate"} <= set(ids)
    assert not set(test_ids["qm9_index_test"]) & qm9_used
    assert not set(test_ids["amp_sequences_test"]) & amp_used
    # ... also by SMILES, and no molecule or peptide twice within the test sets
    used_smiles = {m.smiles for m in qm9 if int(m.id) in qm9_used}
    test_smiles = [i.prompt.split()[1].rstrip(".") for i in items["molecule-properties"]]
    assert not set(test_smiles) & used_smiles
    assert len(set(test_ids["qm9_index_test"])) == 400 and len(set(test_ids["amp_sequences_test"])) == 200
    # anticancer: balanced, unseen, and no peptide of the antimicrobial set
    acp = [i.meta["anticancer"] for i in generated["anticancer"]]
    assert len(items["anticancer"]) == 200 and len(acp) == 100 and sum(acp) == 50
    assert not set(test_ids["acp_sequences_test"]) & used_acps(ids)
    assert not set(test_ids["acp_sequences_test"]) & (amp_used | set(test_ids["amp_sequences_test"]))
    # thermochemistry asks about the property task's test molecules
    thermo = [i.prompt.split()[1] for i in items["molecule-thermo"]]
    assert thermo == [i.prompt.split()[1] for i in items["molecule-properties"]]
    prop_ids = {i.meta["id"] for i in items["molecule-properties"]}
    assert not prop_ids & {i.meta["id"] for i in items["molecule-design"]}
    # reproducible, and another seed draws other items
    assert holdout_items(ids, seed, molecules=qm9)[1] == test_ids
    assert holdout_items(ids, seed + 1, molecules=qm9)[1]["qm9_index_test"] != test_ids["qm9_index_test"]


def test_reproduce_staging_matches_the_shipped_split(shipped):
    """`xlora reproduce` with the shipped run's settings draws exactly its ids, so the test sets it
    stages are unseen by the shipped checkpoint too."""
    from xlora.science.recipe.pipeline import build_items, config_from_manifest

    ids, _ = shipped
    config = json.loads((PACKAGED / "manifest.json").read_text())["config"]
    _, _, _, staged = build_items(config_from_manifest(config))
    shared = [k for k in staged if k in ids]  # a manifest from before the anticancer task lacks its ids
    assert {"qm9_index_train", "qm9_index_gate", "amp_sequences_train", "amp_sequences_gate"} <= set(shared)
    assert {k: staged[k] for k in shared} == {k: ids[k] for k in shared}


def test_write_test_sets_resumes_and_follows_the_used_ids(tmp_path, shipped):
    ids, seed = shipped
    sizes = HoldoutSizes(n_loss=20, n_generate=6)
    record = write_test_sets(tmp_path, ids, seed, sizes)
    peptides = read_items(tmp_path / "peptides-test.jsonl")
    assert len(peptides) == 20 and sum(not i.meta.get("loss_only") for i in peptides) == 12
    assert sum(i.meta.get("antimicrobial", False) for i in peptides if i.meta["kind"] == "classify") == 5
    stamp = (tmp_path / "molecule-design-test.jsonl").stat().st_mtime_ns
    assert write_test_sets(tmp_path, ids, seed, sizes) == record  # resumed: nothing rewritten
    assert (tmp_path / "molecule-design-test.jsonl").stat().st_mtime_ns == stamp
    # a run that used other molecules gets test sets without them
    taken = record["qm9_index_test"][:5]
    other = {**ids, "qm9_index_gate": ids["qm9_index_gate"] + taken}
    again = write_test_sets(tmp_path, other, seed, sizes)
    assert not set(again["qm9_index_test"]) & set(taken)
    assert json.loads((tmp_path / "test-ids.json").read_text()) == again


def test_clear_errors(qm9):
    with pytest.raises(ValueError, match="even n_loss"):
        HoldoutSizes(n_loss=7).check()
    with pytest.raises(ValueError, match="n_generate <= n_loss / 2"):
        HoldoutSizes(n_loss=20, n_generate=11).check()
    with pytest.raises(ValueError, match="no QM9 molecules or no peptides"):
        used_ids({"qm9_index_train": [1]})
    with pytest.raises(ValueError, match="only .* unused"):
        tiny_run = {"qm9_index_train": [1], "amp_sequences_train": ["KK"]}
        holdout_items(tiny_run, 0, HoldoutSizes(100_000, 10), molecules=qm9)


def test_anticancer_sizes_are_checked_before_anything_is_written(tmp_path):
    from xlora.science.recipe.pipeline import ReproduceConfig, stage_data

    cfg = ReproduceConfig(work=tmp_path / "w", n_eval=60)  # 180 + 30 + 40 + 100 > 343 anticancer peptides
    with pytest.raises(ValueError, match="need 350 anticancer peptides; modlamp has 343: lower --n-eval"):
        stage_data(cfg)
    assert not (tmp_path / "w").exists()


def test_manifest_config_keeps_the_gate_data_it_was_trained_with():
    """A manifest from before v0.9 has no `gate_general`: its gate saw science prompts only."""
    from xlora.science.recipe.pipeline import config_from_manifest

    assert config_from_manifest({"n_expert_molecules": 2560, "gate_steps": 240}).gate_general == 0
    assert config_from_manifest({"n_expert_molecules": 2560, "gate_general": 320}).gate_general == 320
    from xlora.science import shipped_checkpoint

    shipped = json.loads((shipped_checkpoint() / "manifest.json").read_text())["config"]
    assert config_from_manifest(shipped).gate_general == shipped["gate_general"] == 320


def test_expert_step_factor_and_precision_enter_only_their_tasks_recipes():
    """Longer (and bf16) training of some experts is part of those experts' recipes only, so the
    other experts keep matching the committed ones; manifests from before v0.10 trained every
    expert one pass at the default precision; bad values fail at construction, naming the field."""
    from xlora.science.recipe.pipeline import ReproduceConfig, config_from_manifest

    cfg = ReproduceConfig(expert_steps=10, expert_step_factor={"peptides": 4}, expert_precision={"peptides": "bf16"})
    assert cfg.steps_of("peptides") == 40 and cfg.steps_of("anticancer") == 10
    peptides, anticancer = cfg.expert_recipe("peptides"), cfg.expert_recipe("anticancer")
    assert peptides["expert_step_factor"] == 4 and peptides["expert_precision"] == "bf16"
    assert "expert_step_factor" not in anticancer and "expert_precision" not in anticancer
    assert anticancer == ReproduceConfig(expert_steps=10, expert_step_factor={}, expert_precision={}).expert_recipe(
        "anticancer"
    )
    old = config_from_manifest({"n_expert_molecules": 2560, "expert_steps": 160})
    assert old.expert_step_factor == {} and old.expert_precision == {} and old.steps_of("peptides") == 160
    same = ReproduceConfig(
        expert_steps=10, expert_step_factor={"anticancer": 1}, expert_precision={"anticancer": "auto"}
    )
    assert same.expert_recipe("anticancer") == anticancer  # the default, stated: the same recipe
    for bad in (0, True, 2.0, 10**6, "3", None):
        with pytest.raises(ValueError, match="expert_step_factor: expected task -> an integer from 1 to 100"):
            ReproduceConfig(expert_step_factor={"peptides": bad})
    for bad in (None, "peptides", [("peptides", 3)]):
        with pytest.raises(ValueError, match="expert_step_factor: expected a dict of task ->"):
            ReproduceConfig(expert_step_factor=bad)
        with pytest.raises(ValueError, match="expert_precision: expected a dict of task ->"):
            ReproduceConfig(expert_precision=bad)
    with pytest.raises(ValueError, match="expert_step_factor: .*'proteins'"):
        ReproduceConfig(expert_step_factor={"proteins": 2})
    with pytest.raises(ValueError, match="expert_precision: expected task -> one of"):
        ReproduceConfig(expert_precision={"peptides": "int8"})


def test_gate_precision_is_checked_and_old_manifests_read_as_fp32():
    """The gate trains in bf16 autocast since v0.11; earlier manifests' gates trained at 'auto'
    (fp32 on CPU), so reading one back must not claim bf16; a bad value fails naming the field."""
    from xlora.science.recipe.pipeline import ReproduceConfig, config_from_manifest

    assert ReproduceConfig().gate_precision == "bf16"
    assert config_from_manifest({"n_expert_molecules": 2560, "gate_steps": 480}).gate_precision == "auto"
    assert config_from_manifest({"n_expert_molecules": 2560, "gate_precision": "bf16"}).gate_precision == "bf16"
    for bad in ("int8", None, True):
        with pytest.raises(ValueError, match="gate_precision: expected one of"):
            ReproduceConfig(gate_precision=bad)
