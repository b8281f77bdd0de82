"""Training and test files of the two protein tasks, split by homology, for `xlora make-protein-data`:
the input a protein-mechanics expert and a protein-structure expert train on (`xlora train-expert`),
and the held-out records `xlora eval` scores them on.

Files in the output folder (JSONL): `protein-mechanics-train.jsonl` (chat records, forward and design
items mixed), `protein-mechanics-test.jsonl` (eval records with their labels), the same two for
`protein-structure`, and `protein-data.json` (counts, seed, which ids went where).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from xlora.core.config import write_text_atomic
from xlora.science.proteins.datasets import homology_split, mechanics_items, structure_items
from xlora.science.proteins.mechanics import label_table
from xlora.science.proteins.scope import load_domains
from xlora.science.proteins.structures import load_chains
from xlora.science.tasks.item import Item
from xlora.science.tasks.proteins import MECHANICS, STRUCTURE

FILES = (
    f"{MECHANICS}-train.jsonl",
    f"{MECHANICS}-test.jsonl",
    f"{STRUCTURE}-train.jsonl",
    f"{STRUCTURE}-test.jsonl",
    "protein-data.json",
)


def _chat(it: Item) -> dict:
    return {"messages": [{"role": "user", "content": it.prompt}, {"role": "assistant", "content": it.answer}]}


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def write_protein_data(out: Path, seed: int = 0, n_structure_train: int = 4000, n_structure_test: int = 200) -> dict:
    """Write the files above and return the record written to `protein-data.json`.

    Mechanics: every labelled chain, 30 % of clusters held out. Structure: SCOPe domains split by
    5-mer cluster and superfamily (20 % held out), then `n_structure_*` drawn (seeded) from each side;
    each test domain gives one forward and one design item."""
    if n_structure_train < 1 or n_structure_test < 1:
        raise ValueError("n_structure_train, n_structure_test: expected integers >= 1")
    rng = random.Random(seed)
    rows = label_table(load_chains()).labels
    mech = homology_split(rows, [r["sequence"] for r in rows], test_fraction=0.3, seed=seed)
    domains = load_domains()
    split = homology_split(
        domains, [d.sequence for d in domains], test_fraction=0.2, seed=seed, groups=[d.superfamily for d in domains]
    )
    for name, wanted, pool in (("n_structure_train", n_structure_train, split.train),
                               ("n_structure_test", n_structure_test, split.test)):  # fmt: skip
        if wanted > len(pool):
            raise ValueError(f"{name}: {wanted} domains asked for, the homology split holds {len(pool)}")
    train = rng.sample(split.train, n_structure_train)
    test = rng.sample(split.test, n_structure_test)
    out.mkdir(parents=True, exist_ok=True)
    parts = {
        f"{MECHANICS}-train.jsonl": [_chat(it) for d in (False, True) for it in mechanics_items(mech.train, d)],
        f"{MECHANICS}-test.jsonl": [it.record() for d in (False, True) for it in mechanics_items(mech.test, d)],
        f"{STRUCTURE}-train.jsonl": [_chat(it) for d in (False, True) for it in structure_items(train, d)],
        f"{STRUCTURE}-test.jsonl": [it.record() for d in (False, True) for it in structure_items(test, d)],
    }
    for name, records in parts.items():
        if name.endswith("train.jsonl"):  # forward and design items interleaved for training
            rng.shuffle(records)
        write_text_atomic(out / name, _jsonl(records))
    record = {
        "seed": seed,
        "counts": {name: len(records) for name, records in parts.items()},
        "mechanics_test_chains": sorted(r["id"] for r in mech.test),
        "structure_test_domains": sorted(d.id for d in test),
    }
    write_text_atomic(out / "protein-data.json", json.dumps(record, indent=1) + "\n")
    return record
