"""Protein datasets: homology splits keep clusters whole, items come from real rows, baselines are honest."""

from __future__ import annotations

import random

import pytest

from xlora.science.proteins.datasets import (
    class_baselines,
    helix_oracle,
    homology_split,
    regression_baselines,
    structure_items,
)
from xlora.science.proteins.homology import cluster_sequences
from xlora.science.proteins.scope import load_domains

AA = "ACDEFGHIKLMNPQRSTVWY"


def family(seed: int, n: int, length: int = 80) -> list[str]:
    """`n` close homologs (a few point mutations each) of one random sequence."""
    rng = random.Random(seed)
    root = [rng.choice(AA) for _ in range(length)]
    out = []
    for _ in range(n):
        seq = root[:]
        for i in rng.sample(range(length), 3):
            seq[i] = rng.choice(AA)
        out.append("".join(seq))
    return out


def test_homology_split_keeps_each_family_on_one_side():
    seqs = [s for f in range(12) for s in family(f, 5)]
    rows = list(range(len(seqs)))
    split = homology_split(rows, seqs, test_fraction=0.25, seed=1)
    clusters = cluster_sequences(seqs)
    train_clusters = {clusters[i] for i in split.train}
    assert not train_clusters & {clusters[i] for i in split.test}
    assert sorted(split.train + split.test) == rows and len(split.test) == 15  # 3 of 12 families
    with pytest.raises(ValueError, match="test_fraction: expected a number in \\(0, 1\\)"):
        homology_split(rows, seqs, test_fraction=1.0)


def test_baselines_on_real_domains():
    """On real SCOPe domains split by homology, the composition oracle beats the training mean on
    helix content, and the majority class is the class baseline; every interval names its n."""
    domains = load_domains(limit=400)
    split = homology_split(domains, [d.sequence for d in domains], 0.3, groups=[d.superfamily for d in domains])
    train, test = split.train, split.test
    got = regression_baselines(
        [d.sequence for d in train], [100 * d.helix_fraction for d in train],
        [d.sequence for d in test], [100 * d.helix_fraction for d in test], resamples=200,
    )  # fmt: skip
    assert {i.n for i in got.values()} == {len(test)}
    assert got["ridge oracle"].estimate < 0.9 * got["training mean"].estimate
    acc = class_baselines([d.sequence for d in train], [d.scop_class for d in train],
                          [d.sequence for d in test], [d.scop_class for d in test], resamples=200)  # fmt: skip
    assert 0 <= acc["training majority"].estimate <= 1 and acc["ridge oracle"].n == len(test)
    oracle = helix_oracle(train)
    assert oracle([]) == [] and all(-50 < v < 150 for v in oracle([d.sequence for d in test[:5]]))
    items = structure_items(test[:3], design=True)
    assert [it.meta["length"] for it in items] == [len(d.sequence) for d in test[:3]]
