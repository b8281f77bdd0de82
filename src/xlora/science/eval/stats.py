"""Bootstrap intervals for held-out metrics: how far a mean over n items can be trusted.

Every metric here is a mean over items: 0/1 outcomes (accuracy, valid SMILES), absolute errors
(MAE) or per-item losses weighted by their token counts (a token-weighted cross-entropy is
`sum(w * v) / sum(w)` with `v` the item's mean loss and `w` its number of answer tokens).

- `bootstrap_mean`: 95% percentile interval of one model's mean (resample items with replacement
  B times, take the 2.5% and 97.5% quantiles of the resampled means).
- `paired_difference`: interval of mean(A) - mean(B) when both models answered the *same* items.
  Each resample draws one set of item indices and uses it for both models, so the item-to-item
  spread that A and B share (hard molecules are hard for both) cancels; an unpaired comparison of
  two separate intervals would be far wider and could hide a real difference.

Seeded (`numpy.random.default_rng(seed)`), so a table is reproducible to the last digit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

DEFAULT_RESAMPLES = 2000
DEFAULT_LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    """A point estimate with its percentile bootstrap interval over `n` items."""

    estimate: float
    low: float
    high: float
    n: int
    level: float = DEFAULT_LEVEL

    @property
    def excludes_zero(self) -> bool:
        """True when the whole interval lies on one side of 0 (for a difference: a clear effect)."""
        return self.low > 0 or self.high < 0

    def format(self, digits: int = 3) -> str:
        """`0.645 [0.580, 0.712] n=100`; `n/a (n=0)` for an empty or undefined metric."""
        if self.n == 0 or math.isnan(self.estimate):
            return f"n/a (n={self.n})"
        return f"{self.estimate:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}] n={self.n}"


def _as_arrays(values: Sequence[float], weights: Sequence[float] | None, what: str) -> tuple[np.ndarray, np.ndarray]:
    v = np.asarray(values, dtype=np.float64)  # [n]
    if v.ndim != 1:
        raise ValueError(f"{what}: expected a flat list of per-item values, got shape {v.shape}")
    if v.size == 0:
        raise ValueError(f"{what}: no items to compute an interval from")
    if not np.isfinite(v).all():
        raise ValueError(f"{what}: values must be finite numbers (drop unparsed items first)")
    w = np.ones_like(v) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != v.shape:
        raise ValueError(f"{what}: {v.size} values but {w.size} weights")
    if (w < 0).any() or not np.isfinite(w).all() or w.sum() <= 0:
        raise ValueError(f"{what}: weights must be finite, non-negative and not all zero")
    return v, w


def _check_args(resamples: int, level: float) -> None:
    if isinstance(resamples, bool) or not isinstance(resamples, int) or resamples < 1:
        raise ValueError(f"resamples: expected a positive integer, got {resamples!r}")
    if not 0 < level < 1:
        raise ValueError(f"level: expected a number between 0 and 1, got {level!r}")


def _resampled_means(v: np.ndarray, w: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Weighted mean of each resample: idx [B, n] -> [B]. A resample whose drawn weights are all 0
    (possible only with zero weights) counts as NaN and is dropped by the quantile."""
    ws = w[idx]  # [B, n]
    total = ws.sum(axis=1)  # [B]
    with np.errstate(invalid="ignore", divide="ignore"):
        return (v[idx] * ws).sum(axis=1) / total


def _percentiles(means: np.ndarray, level: float) -> tuple[float, float]:
    tail = (1 - level) / 2 * 100
    lo, hi = np.nanpercentile(means, [tail, 100 - tail])
    return float(lo), float(hi)


def bootstrap_mean(
    values: Sequence[float],
    weights: Sequence[float] | None = None,
    *,
    resamples: int = DEFAULT_RESAMPLES,
    level: float = DEFAULT_LEVEL,
    seed: int = 0,
) -> Interval:
    """Percentile bootstrap interval of the (weighted) mean of per-item `values`.

    `values` are one number per item (0/1 outcomes, absolute errors, mean token losses);
    `weights` (optional, e.g. token counts) make the estimate `sum(w*v)/sum(w)`.
    """
    _check_args(resamples, level)
    v, w = _as_arrays(values, weights, "bootstrap_mean")
    estimate = float((v * w).sum() / w.sum())
    idx = np.random.default_rng(seed).integers(0, v.size, size=(resamples, v.size))  # [B, n]
    low, high = _percentiles(_resampled_means(v, w, idx), level)
    # float rounding can put a constant sample's quantiles a hair off the estimate
    return Interval(estimate, min(low, estimate), max(high, estimate), int(v.size), level)


def paired_difference(
    a: Sequence[float],
    b: Sequence[float],
    weights: Sequence[float] | None = None,
    *,
    resamples: int = DEFAULT_RESAMPLES,
    level: float = DEFAULT_LEVEL,
    seed: int = 0,
) -> Interval:
    """Interval of mean(a) - mean(b) where `a[i]` and `b[i]` are two models' values on item i.

    The same resampled item indices serve both models. `weights` (one per item, shared by both,
    e.g. the answer's token count) give token-weighted means as in `bootstrap_mean`.
    """
    _check_args(resamples, level)
    va, w = _as_arrays(a, weights, "paired_difference (first model)")
    vb, _ = _as_arrays(b, weights, "paired_difference (second model)")
    if va.size != vb.size:
        raise ValueError(f"paired_difference: the models have {va.size} and {vb.size} items; pairs need the same items")
    estimate = float((va * w).sum() / w.sum() - (vb * w).sum() / w.sum())
    idx = np.random.default_rng(seed).integers(0, va.size, size=(resamples, va.size))  # [B, n]
    diffs = _resampled_means(va, w, idx) - _resampled_means(vb, w, idx)  # [B]
    low, high = _percentiles(diffs, level)
    return Interval(estimate, min(low, estimate), max(high, estimate), int(va.size), level)


def paired_available(a: Sequence[float | None], b: Sequence[float | None]) -> tuple[list[float], list[float]]:
    """The items both models have a value for (an MAE skips unparsed answers, marked None)."""
    if len(a) != len(b):
        raise ValueError(f"paired values: {len(a)} and {len(b)} items; pairs need the same items")
    kept = [(x, y) for x, y in zip(a, b) if x is not None and y is not None]
    return [x for x, _ in kept], [y for _, y in kept]


__all__ = ["Interval", "bootstrap_mean", "paired_available", "paired_difference"]
