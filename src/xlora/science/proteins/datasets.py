"""Protein train/test sets split by homology cluster, as task items, and the baselines any protein
expert must beat: the training mean, the nearest training sequence, and a ridge oracle on sequence
composition, each with its bootstrap interval and n (`baselines`, `benchmarks/protein_baselines.py`).

Splits are by cluster (shared 5-mers, plus SCOP superfamily for SCOPe domains: `homology`), never at
random, so family signatures cannot leak from training into the test set.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from xlora.science.eval.stats import Interval, bootstrap_mean
from xlora.science.proteins.homology import cluster_sequences, split_by_cluster
from xlora.science.proteins.oracle import SequenceClassifier, SequenceRegressor, nearest_neighbour_predict
from xlora.science.proteins.scope import Domain
from xlora.science.tasks.item import Item
from xlora.science.tasks.proteins import mechanics_item, structure_item


@dataclass(frozen=True)
class Split:
    """Rows of one dataset divided by homology cluster."""

    train: list[Any]
    test: list[Any]


def homology_split(rows: Sequence[Any], sequences: Sequence[str], test_fraction: float, seed: int = 0,
                   groups: Sequence[str] | None = None) -> Split:  # fmt: skip
    """`rows` divided so that no homology cluster (or group) is on both sides; about `test_fraction` test."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction: expected a number in (0, 1), got {test_fraction!r}")
    if len(rows) != len(sequences):
        raise ValueError(f"{len(rows)} rows but {len(sequences)} sequences")
    clusters = cluster_sequences(list(sequences), groups=list(groups) if groups is not None else None)
    parts = split_by_cluster(list(range(len(rows))), clusters, (1 - test_fraction, test_fraction), seed)
    train, test = parts
    return Split([rows[i] for i in train], [rows[i] for i in test])


def mechanics_items(rows: Sequence[dict], design: bool) -> list[Item]:
    """Task items from mechanics label rows (`mechanics.label_table`)."""
    return [mechanics_item(r["sequence"], r["frequency"], r["stiffness"], design) for r in rows]


def structure_items(domains: Sequence[Domain], design: bool) -> list[Item]:
    """Task items from SCOPe domains."""
    return [structure_item(d.sequence, d.helix_fraction, d.strand_fraction, d.scop_class, design) for d in domains]


def _errors(predicted: Sequence[float], true: Sequence[float]) -> list[float]:
    return [abs(float(p) - float(t)) for p, t in zip(predicted, true)]


def regression_baselines(
    train_seqs: Sequence[str], train_y: Sequence[float], test_seqs: Sequence[str], test_y: Sequence[float],
    resamples: int = 2000,
) -> dict[str, Interval]:  # fmt: skip
    """MAE with its interval of the training mean, the nearest training sequence, and the ridge oracle."""
    mean = float(np.mean(train_y))
    ridge = SequenceRegressor().fit(list(train_seqs), np.asarray(train_y, dtype=float))
    predictions: dict[str, Sequence[float]] = {
        "training mean": [mean] * len(test_y),
        "nearest neighbour": nearest_neighbour_predict(list(train_seqs), list(train_y), list(test_seqs)),
        "ridge oracle": list(np.ravel(ridge.predict(list(test_seqs)))),
    }
    return {name: bootstrap_mean(_errors(p, test_y), resamples=resamples) for name, p in predictions.items()}


def class_baselines(
    train_seqs: Sequence[str], train_labels: Sequence[str], test_seqs: Sequence[str], test_labels: Sequence[str],
    resamples: int = 2000,
) -> dict[str, Interval]:  # fmt: skip
    """Accuracy with its interval of the training majority class, the nearest sequence, the ridge oracle."""
    majority = Counter(train_labels).most_common(1)[0][0]
    classifier = SequenceClassifier().fit(list(train_seqs), list(train_labels))
    predictions: dict[str, Sequence[str]] = {
        "training majority": [majority] * len(test_labels),
        "nearest neighbour": nearest_neighbour_predict(list(train_seqs), list(train_labels), list(test_seqs)),
        "ridge oracle": classifier.predict(list(test_seqs)),
    }
    hits = {name: [float(p == t) for p, t in zip(pred, test_labels)] for name, pred in predictions.items()}
    return {name: bootstrap_mean(h, resamples=resamples) for name, h in hits.items()}


def helix_oracle(train: Sequence[Domain]) -> Callable[[Sequence[str]], list[float]]:
    """The inverse-design judge: helix content (%) predicted from sequence, fitted on `train` only."""
    model = SequenceRegressor().fit([d.sequence for d in train], np.array([d.helix_fraction for d in train]))
    return lambda seqs: [100.0 * float(v) for v in np.ravel(model.predict(list(seqs)))] if seqs else []


def interval_dict(interval: Interval) -> dict[str, float]:
    """An Interval as JSON numbers (NaN as None)."""
    fix = lambda v: None if isinstance(v, float) and math.isnan(v) else v  # noqa: E731
    return {"estimate": fix(interval.estimate), "low": fix(interval.low), "high": fix(interval.high), "n": interval.n}
