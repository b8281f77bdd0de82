"""The reproduce run's data: expert-training, held-out and fresh gate items per task, disjoint.

Molecules: one shuffled QM9 order; the property and thermochemistry experts train on the same
molecules (two property families of one set), the design expert on others. Antimicrobial and
anticancer peptides come from separate modlamp files that share no sequence (`load_acps`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from xlora.science.tasks import (
    TASKS,
    Item,
    anticancer_item,
    design_item,
    formula_item,
    peptide_items,
    property_item,
    thermo_item,
)
from xlora.science.tasks.datasets import load_acps, load_amps, load_qm9, split3

if TYPE_CHECKING:
    from xlora.science.recipe.pipeline import ReproduceConfig

ItemsByTask = dict[str, list[Item]]


def _interleave(pos: list, neg: list) -> list:
    """pos[0], neg[0], pos[1], ...: any prefix is balanced."""
    out = [x for pair in zip(pos, neg) for x in pair]
    return out + pos[len(neg) :] + neg[len(pos) :]


def _anticancer_splits(cfg: ReproduceConfig) -> tuple[list, list, list]:
    """Balanced train / held-out / fresh-gate anticancer peptides (its own seed stream, so the other
    tasks' splits do not move when these sizes change); the fresh ones are at most `gate_fresh`."""
    acps = load_acps()
    sizes = (cfg.n_expert_acp // 2, cfg.n_eval // 2, min(cfg.acp_gate_fresh, cfg.gate_fresh) // 2)
    positives = sum(p.anticancer for p in acps)
    if sum(sizes) + cfg.n_test // 2 > positives:  # checked before any file is written
        raise ValueError(
            f"anticancer: half of n_expert_acp={cfg.n_expert_acp}, n_eval={cfg.n_eval}, the fresh gate examples "
            f"({min(cfg.acp_gate_fresh, cfg.gate_fresh)}) and n_test={cfg.n_test} need {sum(sizes) + cfg.n_test // 2} "
            f"anticancer peptides; modlamp has {positives}: lower --n-eval or --n-test"
        )
    pos = split3([p for p in acps if p.anticancer], *sizes, cfg.seed + 2)
    neg = split3([p for p in acps if not p.anticancer], *sizes, cfg.seed + 2)
    return tuple(_interleave(a, b) for a, b in zip(pos, neg))  # type: ignore[return-value]


def build_items(cfg: ReproduceConfig) -> tuple[ItemsByTask, ItemsByTask, ItemsByTask, dict]:
    """Expert-training, held-out and fresh gate items per task, and the ids of each (for the manifest).

    The fresh gate items come after the train and held-out samples in the same shuffled orders, so
    `gate_fresh` never changes what the experts train on or what is evaluated. Every molecule is in
    exactly one of train / held-out / gate (and, within them, in the design task or in the two
    property tasks); every peptide sequence in exactly one place."""
    nm, ne, ng = cfg.n_expert_molecules, cfg.n_eval, cfg.gate_fresh
    nc, nd = cfg.n_expert_classify, cfg.n_expert_design
    mol_train, mol_eval, mol_gate = split3(load_qm9(), 2 * nm, 2 * ne, 2 * ng, cfg.seed)
    amps = load_amps()
    pos = [p for p in amps if p.antimicrobial and 8 <= len(p.sequence) <= 30]
    pep_train, pep_eval, pep_rest = split3(amps, nc, ne // 2, len(amps) - nc - ne // 2, cfg.seed)
    used = {p.sequence for p in pep_train} | {p.sequence for p in pep_eval}
    pos = [p for p in pos if p.sequence not in used]
    if nd + ne // 2 > len(pos):
        raise ValueError(f"n_expert_design={nd}: only {len(pos)} designable peptides are left after the others")
    des_train, des_eval, des_rest = split3(pos, nd, ne // 2, len(pos) - nd - ne // 2, cfg.seed + 1)
    used |= {p.sequence for p in des_train} | {p.sequence for p in des_eval}
    pep_gate = [p for p in pep_rest if p.sequence not in used][: ng // 2]
    used |= {p.sequence for p in pep_gate}
    des_gate = [p for p in des_rest if p.sequence not in used][: ng // 2]
    if len(pep_gate) < ng // 2 or len(des_gate) < ng // 2:
        raise ValueError(f"gate_fresh={ng}: not enough unused peptides left after the train and held-out sets")
    acp_train, acp_eval, acp_gate = _anticancer_splits(cfg)

    def design(mols: list, train: bool) -> list[Item]:
        if not (train and cfg.expert_formula_items):
            return [design_item(m) for m in mols]
        return [design_item(m) if i % 2 == 0 else formula_item(m) for i, m in enumerate(mols)]

    def tasks(mol: list, pep: list, des: list, acp: list, n: int, train: bool = False) -> ItemsByTask:
        return {
            "molecule-properties": [property_item(m) for m in mol[:n]],
            "molecule-design": design(mol[n:], train),
            "peptides": [peptide_items(p, False) for p in pep] + [peptide_items(p, True) for p in des],
            "molecule-thermo": [thermo_item(m) for m in mol[:n]],  # the property task's molecules
            "anticancer": [anticancer_item(p) for p in acp],
        }

    def seqs(*groups: list) -> list[str]:
        return sorted({p.sequence for g in groups for p in g})

    ids = {
        "qm9_index_train": sorted(int(m.id) for m in mol_train),
        "qm9_index_eval": sorted(int(m.id) for m in mol_eval),
        "amp_sequences_train": seqs(pep_train, des_train),
        "amp_sequences_eval": seqs(pep_eval, des_eval),
        "acp_sequences_train": seqs(acp_train),
        "acp_sequences_eval": seqs(acp_eval),
    }
    if ng:
        ids |= {"qm9_index_gate": sorted(int(m.id) for m in mol_gate), "amp_sequences_gate": seqs(pep_gate, des_gate)}
    if acp_gate:
        ids["acp_sequences_gate"] = seqs(acp_gate)
    return (
        tasks(mol_train, pep_train, des_train, acp_train, nm, train=True),
        tasks(mol_eval, pep_eval, des_eval, acp_eval, ne),
        tasks(mol_gate, pep_gate, des_gate, acp_gate, ng),
        ids,
    )


def chat_record(it: Item) -> dict:
    return {"messages": [{"role": "user", "content": it.prompt}, {"role": "assistant", "content": it.answer}]}


def gate_share(items: list[Item], n: int) -> list[Item]:
    """`n` of an expert's training items spread evenly over its list (so peptides keep both kinds)."""
    stride = max(1, len(items) // max(n, 1))
    return items[::stride][:n]


def gate_records(train: ItemsByTask, fresh: ItemsByTask, n_train: int) -> list[dict]:
    """The gate's data: `n_train` of each expert's training examples, then the fresh ones no expert saw;
    each names its task's expert (`"expert"`, for the gate's routing prior)."""
    seen = [chat_record(i) | {"expert": task} for task in TASKS for i in gate_share(train[task], n_train)]
    return seen + [chat_record(i) | {"expert": task} for task in TASKS for i in fresh[task]]


__all__ = ["ItemsByTask", "build_items", "chat_record", "gate_records", "gate_share"]
