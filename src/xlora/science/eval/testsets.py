"""Larger held-out test sets, disjoint from everything a run's experts and gate saw.

The first held-out sets of `xlora reproduce` have 24 items per task, too few for a metric to mean
much, and they steered the gate investigation, so they are no longer unseen either. A test set here
is a function of the *used* ids of a run (the `qm9_index_*` and `amp_sequences_*` lists that
`stage_data` and every `manifest.json` record: train, held-out and fresh gate examples) and a seed:
items are drawn at random from what is left, so the sets are disjoint by construction, and the
shipped checkpoint's manifest is enough to rebuild its test sets without retraining anything.

Per task (defaults): 200 items scored by loss; the answers of 100 of them are generated and scored
(`meta["loss_only"]` marks the others). Peptides: 100 classification items, half antimicrobial,
and 100 design items, all generated, so each peptide metric has 100 items. The thermochemistry
task asks about the property task's test molecules; anticancer peptides are balanced, drawn from
their own stream (so adding them left the other tasks' test sets as they were).
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

from xlora.science.tasks import (
    TASKS,
    Item,
    anticancer_item,
    design_item,
    peptide_items,
    property_item,
    thermo_item,
)
from xlora.science.tasks.datasets import AnticancerPeptide, Molecule, Peptide, load_acps, load_amps, load_qm9

TEST_KEYS = ("qm9_index_test", "amp_sequences_test", "acp_sequences_test")


@dataclass(frozen=True)
class HoldoutSizes:
    """How many test items per task; `n_loss` is even (peptides: half classify, half design) and
    `n_generate` at most half of it (it counts peptides per kind)."""

    n_loss: int = 200  # per task, scored by the held-out loss
    n_generate: int = 100  # per metric: molecules per molecule task, peptides per peptide kind

    def check(self) -> None:
        if self.n_loss < 2 or self.n_loss % 2 or not 1 <= self.n_generate <= self.n_loss // 2:
            raise ValueError(f"test sizes: need an even n_loss >= 2 and 1 <= n_generate <= n_loss / 2, got {self}")


def used_ids(ids: dict) -> tuple[set[int], set[str]]:
    """QM9 indices and peptide sequences any expert or gate saw or any earlier held-out set held."""
    qm9 = {int(i) for k, v in ids.items() if k.startswith("qm9_index_") and k not in TEST_KEYS for i in v}
    amp = {str(s) for k, v in ids.items() if k.startswith("amp_sequences_") and k not in TEST_KEYS for s in v}
    if not qm9 or not amp:
        raise ValueError("the run's ids name no QM9 molecules or no peptides: is this a reproduce manifest?")
    return qm9, amp


def used_acps(ids: dict) -> set[str]:
    """Anticancer sequences the run used (none for a run from before the anticancer task)."""
    return {str(s) for k, v in ids.items() if k.startswith("acp_sequences_") and k not in TEST_KEYS for s in v}


def _sample(pool: list, n: int, rng: random.Random, what: str) -> list:
    if n > len(pool):
        raise ValueError(f"test set: asked for {n} {what}, only {len(pool)} unused ones exist")
    return rng.sample(pool, n)


def draw_test(
    ids: dict, seed: int, sizes: HoldoutSizes = HoldoutSizes(), molecules: list[Molecule] | None = None
) -> tuple[list[Molecule], list[Peptide], list[Peptide]]:
    """(molecules for both molecule tasks, peptides to classify (balanced), peptides to design),
    all unused by the run whose `ids` are given. Molecules are excluded by QM9 index and by SMILES."""
    sizes.check()
    rng = random.Random(f"xlora-test-{seed}")  # its own stream: never the one the training splits used
    qm9_used, amp_used = used_ids(ids)
    molecules = load_qm9() if molecules is None else molecules
    smiles_used = {m.smiles for m in molecules if int(m.id) in qm9_used}
    pool = [m for m in molecules if int(m.id) not in qm9_used and m.smiles not in smiles_used]
    mols = _sample(pool, 2 * sizes.n_loss, rng, "molecules")
    amps = [p for p in load_amps() if p.sequence not in amp_used]
    half = sizes.n_loss // 2
    pos = _sample([p for p in amps if p.antimicrobial], half // 2 + half % 2, rng, "antimicrobial peptides")
    neg = _sample([p for p in amps if not p.antimicrobial], half // 2, rng, "non-antimicrobial peptides")
    classify = [p for pair in zip(pos, neg) for p in pair] + pos[len(neg) :]  # alternate, so any prefix is balanced
    taken = {p.sequence for p in classify}
    designable = [p for p in amps if p.antimicrobial and 8 <= len(p.sequence) <= 30 and p.sequence not in taken]
    design = _sample(designable, half, rng, "designable antimicrobial peptides")
    return mols, classify, design


def draw_anticancer_test(ids: dict, seed: int, sizes: HoldoutSizes = HoldoutSizes()) -> list[AnticancerPeptide]:
    """`n_loss` anticancer test peptides, half anticancer, alternating (any prefix is balanced),
    unused by the run; its own random stream, so the other test sets do not depend on it."""
    sizes.check()
    rng = random.Random(f"xlora-test-acp-{seed}")
    pool = [p for p in load_acps() if p.sequence not in used_acps(ids)]
    half = sizes.n_loss // 2
    pos = _sample([p for p in pool if p.anticancer], half, rng, "anticancer peptides")
    neg = _sample([p for p in pool if not p.anticancer], half, rng, "non-anticancer peptides")
    return [p for pair in zip(pos, neg) for p in pair]


def holdout_items(
    ids: dict, seed: int, sizes: HoldoutSizes = HoldoutSizes(), molecules: list[Molecule] | None = None
) -> tuple[dict[str, list[Item]], dict]:
    """Test items per task and their ids (`qm9_index_test`, `amp_sequences_test`) for the manifest."""
    mols, classify, design = draw_test(ids, seed, sizes, molecules)
    acps = draw_anticancer_test(ids, seed, sizes)
    n, g = sizes.n_loss, sizes.n_generate

    def flag(items: list[Item], n_generated: int) -> list[Item]:
        for i, it in enumerate(items):
            if i >= n_generated:
                it.meta["loss_only"] = True
        return items

    items = {
        "molecule-properties": flag([property_item(m) for m in mols[:n]], g),
        "molecule-design": flag([design_item(m) for m in mols[n:]], g),
        "peptides": flag([peptide_items(p, False) for p in classify], g)
        + flag([peptide_items(p, True) for p in design], g),
        "molecule-thermo": flag([thermo_item(m) for m in mols[:n]], g),
        "anticancer": flag([anticancer_item(p) for p in acps], g),
    }
    test_ids = {
        "qm9_index_test": sorted(int(m.id) for m in mols),
        "amp_sequences_test": sorted(p.sequence for p in classify + design),
        "acp_sequences_test": sorted(p.sequence for p in acps),
    }
    return items, test_ids


def write_test_sets(folder: Path, ids: dict, seed: int, sizes: HoldoutSizes = HoldoutSizes()) -> dict:
    """Write `{task}-test.jsonl` (eval records) to `folder` and return the test ids (also written to
    `test-ids.json`, with the sizes, seed and a hash of the used ids). Skipped when `test-ids.json`
    there matches all of these and every file exists, so staging stays resumable."""
    marker = folder / "test-ids.json"
    files = [folder / f"{task}-test.jsonl" for task in TASKS]
    qm9, amp = used_ids(ids)  # a run with other training ids needs other test sets
    used = hashlib.sha1(json.dumps([sorted(qm9), sorted(amp), sorted(used_acps(ids))]).encode()).hexdigest()
    settings = {"test_seed": seed, "test_n_loss": sizes.n_loss, "test_n_generate": sizes.n_generate, "used_sha1": used}
    if marker.is_file() and all(f.is_file() for f in files):
        done = json.loads(marker.read_text())
        if all(done.get(k) == v for k, v in settings.items()):
            return done
    items, test_ids = holdout_items(ids, seed, sizes)
    folder.mkdir(parents=True, exist_ok=True)
    for task, path in zip(TASKS, files):
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(it.record()) + "\n" for it in items[task]))
        tmp.replace(path)
    record = {**settings, **test_ids}
    tmp = marker.with_suffix(".tmp")
    tmp.write_text(json.dumps(record))
    tmp.replace(marker)
    return record


def manifest_ids(checkpoint: Path) -> tuple[dict, int]:
    """The used ids and the seed recorded in a checkpoint's `manifest.json` (as `xlora reproduce`
    writes it), so its test sets can be rebuilt without the run's work folder."""
    path = Path(checkpoint) / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; test sets need the manifest of an `xlora reproduce` run")
    manifest = json.loads(path.read_text())
    data, config = manifest.get("data"), manifest.get("config", {})
    if not isinstance(data, dict):
        raise ValueError(f"{path}: no 'data' section with the run's split ids")
    return data, int(config.get("seed", 0))


__all__ = [
    "HoldoutSizes", "draw_anticancer_test", "draw_test", "manifest_ids", "holdout_items", "used_ids", "write_test_sets",
]  # fmt: skip
