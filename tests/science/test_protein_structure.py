"""SCOPe domains from sidechainnet, homology clusters and splits, alignment identity and the sequence oracles."""

from __future__ import annotations

import importlib.util
import random

import numpy as np
import pytest

from xlora.science.proteins import homology, scope
from xlora.science.proteins.homology import (
    KmerIndex,
    alignment_identity,
    cluster_sequences,
    nearest_identity,
    split_by_cluster,
)
from xlora.science.proteins.oracle import (
    SequenceClassifier,
    SequenceRegressor,
    features,
    mae,
    nearest_neighbour_predict,
)
from xlora.science.proteins.scope import Domain, load_domains

AMINO = "ACDEFGHIKLMNPQRSTVWY"


@pytest.fixture(scope="module")
def domains() -> list[Domain]:
    return load_domains(limit=300)


def random_protein(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(AMINO) for _ in range(n))


def mutate(rng: random.Random, seq: str, n: int) -> str:
    out = list(seq)
    for i in rng.sample(range(len(seq)), n):
        out[i] = rng.choice([a for a in AMINO if a != out[i]])
    return "".join(out)


def test_domains_parse_to_aligned_standard_sequences_with_fractions(domains):
    assert len(domains) == 300
    assert len({d.sequence for d in domains}) == 300  # deduplicated
    assert {d.scop_class for d in domains} == set("abcd")  # sorted by sid, PDB order mixes classes
    for d in domains:
        assert d.id.startswith("d") and len(d.sequence) == len(d.dssp) > 0
        assert set(d.sequence) <= set(AMINO) and set(d.dssp) <= set(scope.DSSP_STATES)
        assert d.superfamily.startswith(d.scop_class + ".") and d.superfamily.count(".") == 2
        for f in (d.helix_fraction, d.strand_fraction, d.coil_fraction):
            assert 0.0 <= f <= 1.0 + 1e-12
        assert d.helix_fraction + d.strand_fraction + d.coil_fraction == pytest.approx(1.0)


def test_fractions_follow_the_documented_eight_to_three_mapping():
    d = Domain("dtest__", "ACDEFGHIKL", "HGIEBTSLLH", "a", "a.1.1")
    assert d.helix_fraction == pytest.approx(0.4)  # H G I H
    assert d.strand_fraction == pytest.approx(0.2)  # E B
    assert d.coil_fraction == pytest.approx(0.4)  # T S L L


def test_entries_with_unknown_residues_or_mismatched_dssp_are_dropped():
    assert scope.parse_entry("1ABC_d1abca_", {"Sequence": "ACX", "DSSP": "LLL", "SCCS": "a.1.1.1"}) is None
    assert scope.parse_entry("1ABC_d1abca_", {"Sequence": "ACD", "DSSP": "LL", "SCCS": "a.1.1.1"}) is None
    d = scope.parse_entry("1ABC_d1abca_", {"Sequence": "ACD", "DSSP": "HHL", "SCCS": "b.2.3.0"})
    assert d == Domain("d1abca_", "ACD", "HHL", "b", "b.2.3")


def test_missing_package_names_it_and_the_pip_line(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="sidechainnet.*pip install"):
        load_domains(limit=1)


def test_unknown_class_letter_is_refused():
    with pytest.raises(ValueError, match="unknown SCOP classes"):
        load_domains(classes="az")


def test_near_identical_sequences_cluster_together_unrelated_ones_apart():
    rng = random.Random(0)
    bases = [random_protein(rng, 120) for _ in range(5)]
    seqs = bases + [mutate(rng, b, 3) for b in bases]  # i and i + 5 are 97.5% identical
    labels = cluster_sequences(seqs)
    for i in range(5):
        assert labels[i] == labels[i + 5]
    assert len(set(labels)) == 5


def test_groups_merge_clusters():
    rng = random.Random(1)
    seqs = [random_protein(rng, 80) for _ in range(4)]
    assert cluster_sequences(seqs, groups=["x", "y", "x", "z"]) == [0, 1, 0, 2]


def test_split_never_puts_one_cluster_on_both_sides(domains):
    seqs = [d.sequence for d in domains]
    ids = [d.id for d in domains]
    clusters = cluster_sequences(seqs, groups=[d.superfamily for d in domains])
    for seed in range(3):
        parts = split_by_cluster(ids, clusters, (0.7, 0.15, 0.15), seed)
        assert sorted(sum(parts, [])) == sorted(ids)
        side = {i: n for n, part in enumerate(parts) for i in part}
        for c in set(clusters):
            assert len({side[i] for i, lab in zip(ids, clusters) if lab == c}) == 1
        assert abs(len(parts[0]) - 0.7 * len(ids)) < 0.1 * len(ids)
    # and no pair above the k-mer threshold straddles the split
    train, test = split_by_cluster(ids, cluster_sequences(seqs), (0.5, 0.5), 0)
    side = {i: 0 for i in train} | {i: 1 for i in test}
    pi, pj, _ = homology.similar_pairs(seqs)
    assert all(side[ids[a]] == side[ids[b]] for a, b in zip(pi.tolist(), pj.tolist()))


def test_split_rejects_bad_fractions():
    with pytest.raises(ValueError, match="sum to 1"):
        split_by_cluster(["a", "b"], [0, 1], (0.5, 0.6), 0)


def test_identity_of_self_and_of_a_one_residue_mutant():
    rng = random.Random(2)
    seq = random_protein(rng, 150)
    assert alignment_identity(seq, seq) == 1.0
    for _ in range(5):
        m = mutate(rng, seq, 1)
        assert alignment_identity(seq, m) == pytest.approx(149 / 150)
    assert alignment_identity(seq, seq[20:100]) == 1.0  # a fragment is not novel
    assert alignment_identity(seq, random_protein(rng, 150)) < 0.15  # unrelated


def test_nearest_identity_finds_the_source_among_real_domains(domains):
    train = [d.sequence for d in domains]
    index = KmerIndex(train)
    target = train[123]
    assert nearest_identity(target, index) == (1.0, 123)
    mutant = mutate(random.Random(3), target, 1)
    ident, i = nearest_identity(mutant, train)
    assert i == 123 and ident == pytest.approx((len(target) - 1) / len(target))


def test_features_have_the_documented_shape():
    x = features(["ACDE", "WWWWWW"])
    assert x.shape == (2, 421)
    assert x[:, :20].sum(1) == pytest.approx([1, 1]) and x[:, 20:420].sum(1) == pytest.approx([1, 1])


def test_oracles_beat_the_mean_on_a_homology_split_of_real_domains(domains):
    seqs = [d.sequence for d in domains]
    clusters = cluster_sequences(seqs, groups=[d.superfamily for d in domains])
    train, test = split_by_cluster(list(range(len(domains))), clusters, (0.7, 0.3), seed=0)
    tr_s, te_s = [seqs[i] for i in train], [seqs[i] for i in test]
    # measured on these 300 domains (seed 0, n_test 90): helix MAE 0.125 vs mean 0.187, strand 0.107 vs 0.149,
    # class accuracy 0.433 vs the test set's own majority 0.322
    for name in ("helix_fraction", "strand_fraction"):
        y = np.array([getattr(d, name) for d in domains])
        pred = SequenceRegressor().fit(tr_s, y[train]).predict(te_s)
        assert pred.shape == (len(test),)
        assert mae(pred, y[test]) < 0.8 * mae(np.full(len(test), y[train].mean()), y[test])
    labels = [d.scop_class for d in domains]
    pred_c = SequenceClassifier().fit(tr_s, [labels[i] for i in train]).predict(te_s)
    truth = [labels[i] for i in test]
    majority = max(set(truth), key=truth.count)  # the best constant guess, even with hindsight
    acc = np.mean([p == t for p, t in zip(pred_c, truth)])
    assert acc > np.mean([t == majority for t in truth]) + 0.05


def test_regressor_fits_several_targets_and_any_number():
    rng = random.Random(4)
    seqs = [random_protein(rng, rng.randint(30, 90)) for _ in range(250)]
    y = np.array([[s.count("K") / len(s), sum(s.count(a) for a in "AILMFVW") / len(s)] for s in seqs])  # (250, 2)
    pred = SequenceRegressor(alpha=1.0).fit(seqs[:200], y[:200]).predict(seqs[200:])
    assert pred.shape == (50, 2)
    for t in range(2):  # both targets are linear in the composition features
        assert mae(pred[:, t], y[200:, t]) < 0.6 * mae(np.full(50, y[:200, t].mean()), y[200:, t])
    with pytest.raises(ValueError, match="one value per sequence"):
        SequenceRegressor().fit(seqs, [1.0])


def test_nearest_neighbour_returns_the_training_value_of_an_exact_copy(domains):
    train = [d.sequence for d in domains[:200]]
    values = [d.helix_fraction for d in domains[:200]]
    queries = [train[7], train[150], domains[250].sequence]
    pred = nearest_neighbour_predict(train, values, queries)
    assert pred[:2] == [values[7], values[150]] and pred[2] in values
    assert nearest_neighbour_predict(train, [d.scop_class for d in domains[:200]], [train[42]]) == [
        domains[42].scop_class
    ]
