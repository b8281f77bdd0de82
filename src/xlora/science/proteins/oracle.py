"""Forward oracles from sequence alone, fit on a training split, to score protein designs and as baselines.

- `SequenceRegressor`: ridge regression (numpy, closed form) on amino-acid composition (20), dipeptide
  composition (400) and log length (1) -> any per-sequence number(s): helix/strand fraction, a
  stiffness label, ...; features are standardised with the training mean and spread.
- `SequenceClassifier`: the same features, one-vs-rest ridge on one-hot labels, argmax (SCOP class).
- `nearest_neighbour_predict`: the value of the training sequence with the highest 3-mer Jaccard
  similarity: the baseline a biologist tries first.

Test error on a homology split of the real data (SCOPe a-d, 25,964 unique domains; 1,239 clusters =
superfamilies merged by 5-mer links, `cluster_sequences(seqs, groups=superfamilies)`, then
`split_by_cluster(ids, clusters, (0.8, 0.2), seed=0)`): train n=20,771, test n=5,193.
No test domain shares a superfamily or a >~60% identical homolog with training (median nearest
training identity of 200 test domains 0.01, 95th percentile 0.05), so these are errors on new
superfamilies. Measured with `python -m xlora.science.proteins.oracle` (one core, 25 s):

    target             ridge MAE   nearest-neighbour MAE   training-mean MAE     (n = 5,193)
    helix_fraction     0.117       0.181                   0.154
    strand_fraction    0.093       0.136                   0.124

    scop_class (4)     ridge accuracy 0.511, nearest-neighbour 0.394, training majority (b) 0.202,
                       test majority with hindsight (c) 0.455

Across superfamilies the nearest neighbour is worse than the mean: it only helps with real homologs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from xlora.science.proteins.homology import ALPHABET, KmerIndex, encode, nearest_identity

N_AA = len(ALPHABET)


def composition(seq: str) -> np.ndarray:
    """Amino-acid frequencies, shape (20,), summing to 1."""
    return np.bincount(encode(seq), minlength=N_AA) / max(len(seq), 1)


def dipeptides(seq: str) -> np.ndarray:
    """Frequencies of adjacent residue pairs, shape (400,), summing to 1 (zeros when L < 2)."""
    x = encode(seq)
    if len(x) < 2:
        return np.zeros(N_AA * N_AA)
    return np.bincount(x[:-1] * N_AA + x[1:], minlength=N_AA * N_AA) / (len(x) - 1)


def features(seqs: Sequence[str]) -> np.ndarray:
    """Sequence features, shape (n, 421): composition, dipeptide composition, log length."""
    bad = next((s for s in seqs if not isinstance(s, str) or not s), None) if seqs is not None else None
    if bad is not None:
        raise ValueError(f"features: every sequence must be a non-empty string, got {bad!r}")
    rows = [np.concatenate([composition(s), dipeptides(s), [np.log(max(len(s), 1))]]) for s in seqs]
    return np.array(rows).reshape(len(seqs), N_AA + N_AA * N_AA + 1)


def ridge_solve(x: np.ndarray, y: np.ndarray, alpha: float) -> np.ndarray:
    """Weights w, shape (d, t), minimising |xw - y|^2 + alpha |w|^2 for centred x (n, d), y (n, t)."""
    gram = x.T @ x + alpha * np.eye(x.shape[1])
    return np.linalg.solve(gram, x.T @ y)


@dataclass
class SequenceRegressor:
    """Ridge on standardised sequence features -> one or more numbers per sequence."""

    alpha: float = 100.0
    mean_x: np.ndarray = field(default=None, repr=False)  # (d,)
    scale_x: np.ndarray = field(default=None, repr=False)  # (d,)
    mean_y: np.ndarray = field(default=None, repr=False)  # (t,)
    weights: np.ndarray = field(default=None, repr=False)  # (d, t)
    one_target: bool = True  # fitted on values of shape (n,)

    def fit(self, seqs: Sequence[str], values: np.ndarray | Sequence[float]) -> SequenceRegressor:
        """Fit on training sequences and their values, shape (n,) or (n, t)."""
        y = np.asarray(values, dtype=float)
        if len(seqs) == 0 or len(y) != len(seqs):
            raise ValueError(f"need one value per sequence, got {len(y)} values for {len(seqs)} sequences")
        if not np.isfinite(y).all():
            raise ValueError(f"values: {int((~np.isfinite(y)).sum())} are NaN or infinite; expected finite labels")
        y2 = y.reshape(len(seqs), -1)  # (n, t)
        x = features(seqs)
        self.mean_x, self.scale_x = x.mean(0), x.std(0) + 1e-8
        self.mean_y = y2.mean(0)
        self.weights = ridge_solve((x - self.mean_x) / self.scale_x, y2 - self.mean_y, self.alpha)
        self.one_target = y.ndim == 1
        return self

    def predict(self, seqs: Sequence[str]) -> np.ndarray:
        """Predictions, shape (n,) for a 1-d fit, else (n, t)."""
        if self.weights is None:
            raise RuntimeError("SequenceRegressor.predict before fit")
        out = ((features(seqs) - self.mean_x) / self.scale_x) @ self.weights + self.mean_y
        return out[:, 0] if self.one_target else out


@dataclass
class SequenceClassifier:
    """One-vs-rest ridge on one-hot labels over sequence features; predicts the highest score."""

    alpha: float = 100.0
    classes: list[str] = field(default_factory=list)
    regressor: SequenceRegressor | None = field(default=None, repr=False)

    def fit(self, seqs: Sequence[str], labels: Sequence[str]) -> SequenceClassifier:
        """Fit on training sequences and their labels."""
        self.classes = sorted(set(labels))
        onehot = np.array([[lab == c for c in self.classes] for lab in labels], dtype=float)  # (n, c)
        self.regressor = SequenceRegressor(self.alpha).fit(seqs, onehot.reshape(len(labels), len(self.classes)))
        return self

    def predict(self, seqs: Sequence[str]) -> list[str]:
        """The predicted label of each sequence."""
        if self.regressor is None:
            raise RuntimeError("SequenceClassifier.predict before fit")
        scores = self.regressor.predict(seqs).reshape(len(seqs), len(self.classes))
        return [self.classes[i] for i in scores.argmax(1)]


def nearest_neighbour_predict(
    train_seqs: Sequence[str] | KmerIndex, train_values: Sequence, query_seqs: Sequence[str]
) -> list:
    """For each query, the value of the training sequence with the highest 3-mer Jaccard (first on ties)."""
    index = train_seqs if isinstance(train_seqs, KmerIndex) else KmerIndex(train_seqs, k=3)
    if len(index.seqs) == 0 or len(train_values) != len(index.seqs):
        raise ValueError(f"need one value per training sequence, got {len(train_values)} for {len(index.seqs)}")
    return [train_values[int(np.argmax(index.jaccard(q)))] for q in query_seqs]


def mae(pred: Sequence[float], true: Sequence[float]) -> float:
    """Mean absolute error."""
    if len(pred) != len(true) or len(pred) == 0:
        raise ValueError(f"mae: expected two equally long, non-empty lists, got {len(pred)} and {len(true)}")
    return float(np.mean(np.abs(np.asarray(pred, dtype=float) - np.asarray(true, dtype=float))))


def report(seed: int = 0) -> None:
    """Print the docstring's table: each oracle's test error on a homology split of SCOPe a-d."""
    from xlora.science.proteins.homology import cluster_sequences, split_by_cluster
    from xlora.science.proteins.scope import load_domains

    domains = load_domains()
    seqs = [d.sequence for d in domains]
    clusters = cluster_sequences(seqs, groups=[d.superfamily for d in domains])
    train_ids, test_ids = split_by_cluster([d.id for d in domains], clusters, (0.8, 0.2), seed)
    by_id = {d.id: d for d in domains}
    train, test = [by_id[i] for i in train_ids], [by_id[i] for i in test_ids]
    print(f"train n={len(train)}, test n={len(test)}, clusters={max(clusters) + 1}")
    tr_s, te_s = [d.sequence for d in train], [d.sequence for d in test]
    index = KmerIndex(tr_s, k=3)
    for name in ("helix_fraction", "strand_fraction"):
        y_tr, y_te = [getattr(d, name) for d in train], [getattr(d, name) for d in test]
        ridge = SequenceRegressor().fit(tr_s, y_tr).predict(te_s)
        nn = nearest_neighbour_predict(index, y_tr, te_s)
        base = mae(np.full(len(y_te), np.mean(y_tr)), y_te)
        print(f"{name}: ridge {mae(ridge, y_te):.3f}  nn {mae(nn, y_te):.3f}  mean {base:.3f}")
    c_tr, c_te = [d.scop_class for d in train], [d.scop_class for d in test]
    pred = SequenceClassifier().fit(tr_s, c_tr).predict(te_s)
    nn_c = nearest_neighbour_predict(index, c_tr, te_s)
    majority, hindsight = max(set(c_tr), key=c_tr.count), max(set(c_te), key=c_te.count)
    guesses = (pred, nn_c, [majority] * len(c_te), [hindsight] * len(c_te))
    acc = [np.mean([p == t for p, t in zip(ps, c_te)]) for ps in guesses]
    print(f"scop_class: ridge {acc[0]:.3f}  nn {acc[1]:.3f}  train majority ({majority}) {acc[2]:.3f}", end="")
    print(f"  test majority ({hindsight}) {acc[3]:.3f}")
    sample = te_s[:: max(len(te_s) // 200, 1)]
    idents = [nearest_identity(q, index)[0] for q in sample]
    print(f"test -> train nearest identity: median {np.median(idents):.2f}, 95th pct {np.percentile(idents, 95):.2f}")


if __name__ == "__main__":
    report()
