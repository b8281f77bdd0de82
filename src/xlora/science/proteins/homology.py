"""Sequence similarity for homology-aware splits and novelty: k-mer clustering and alignment identity.

- `cluster_sequences`: single-linkage clusters of the graph "shares >= 3 distinct 5-mers and >= 10%
  of the smaller sequence's 5-mers", optionally merged with known groups (SCOPe superfamilies); every
  pair above the threshold lands in one cluster, so `split_by_cluster` never puts it on both sides.
  Threshold from the real domains: of the 372,270 pairs at containment >= 0.1 all but 85 share a
  superfamily, and sampled ones (40 per bin) align at >= 0.58 identity (10th percentile); pairs that
  share only 1-2 5-mers are mostly noise (8% same superfamily). At 0.05 the superfamily-merged graph
  is one 19,785-domain component; at 0.1 it is 1,239 clusters, the largest 3,549 (immunoglobulins, b.1.1, chained by
  fusion constructs to c.94.1 and c.95.1).
- `nearest_identity`: a shared 3-mer prefilter picks a few training sequences, then an overlap
  (semi-global, free end gaps) alignment gives identity = identical aligned pairs / length of the
  shorter sequence (CD-HIT's convention): 1 for a copy or a fragment, (L-1)/L for one substitution.

Speed on one core, 25,964 SCOPe domains: `cluster_sequences` 2.2 s (k-mer matrix product in chunks),
`KmerIndex` of 20,000 sequences 0.6 s, then `nearest_identity` 15 ms per query (10 alignments).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp

ALPHABET = "ACDEFGHIKLMNPQRSTVWY"
CODE = np.full(256, -1, dtype=np.int64)
CODE[np.frombuffer(ALPHABET.encode(), dtype=np.uint8)] = np.arange(len(ALPHABET))
# break-even at 1/3 identity, so unrelated pairs align to almost nothing (random pairs: <= 0.07) while
# 40-60% identical homologs align in full; a substitution (-1) beats the two gaps (-6) that would dodge it
MATCH, MISMATCH, GAP = 2, -1, -3


def encode(seq: str) -> np.ndarray:
    """Residues -> codes 0..19, shape (L,); a clear error for anything outside the 20 amino acids."""
    if not isinstance(seq, str):
        raise ValueError(f"expected a protein sequence (a string of amino-acid letters), got {type(seq).__name__}")
    codes = CODE[np.frombuffer(seq.encode(), dtype=np.uint8)]
    if (codes < 0).any():
        raise ValueError(f"sequence has residues outside {ALPHABET}: {sorted(set(seq) - set(ALPHABET))}")
    return codes


def kmer_codes(seq: str, k: int) -> np.ndarray:
    """Distinct k-mers of `seq` as base-20 integers, sorted, shape (<= L-k+1,)."""
    x = encode(seq)
    if len(x) < k:
        return np.zeros(0, dtype=np.int64)
    windows = np.lib.stride_tricks.sliding_window_view(x, k)  # (L-k+1, k)
    return np.unique(windows @ (len(ALPHABET) ** np.arange(k - 1, -1, -1)))


def kmer_matrix(seqs: Sequence[str], k: int) -> sp.csr_matrix:
    """Binary presence matrix of distinct k-mers, shape (n_seqs, 20**k)."""
    rows = [kmer_codes(s, k) for s in seqs]
    indptr = np.concatenate([[0], np.cumsum([len(r) for r in rows], dtype=np.int64)])
    indices = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
    data = np.ones(len(indices), dtype=np.int32)
    return sp.csr_matrix((data, indices, indptr), shape=(len(seqs), len(ALPHABET) ** k))


def similar_pairs(
    seqs: Sequence[str], k: int = 5, threshold: float = 0.1, min_shared: int = 3, chunk: int = 2000
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs i < j sharing >= min_shared distinct k-mers and >= threshold of the smaller set:
    (i, j, containment), each shape (n_pairs,)."""
    m = kmer_matrix(seqs, k)
    size = np.asarray(m.sum(axis=1)).ravel()  # (n,)
    mt = m.T.tocsr()
    out_i, out_j, out_c = [], [], []
    for start in range(0, len(seqs), chunk):
        shared = (m[start : start + chunk] @ mt).tocoo()  # (chunk, n) shared k-mer counts
        i, j = shared.row + start, shared.col
        keep = i < j
        i, j, n = i[keep], j[keep], shared.data[keep]
        c = n / np.maximum(np.minimum(size[i], size[j]), 1)
        hit = (c >= threshold) & (n >= min_shared)
        out_i.append(i[hit])
        out_j.append(j[hit])
        out_c.append(c[hit])
    if not out_i:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), np.zeros(0)
    return np.concatenate(out_i), np.concatenate(out_j), np.concatenate(out_c)


def find_root(parent: np.ndarray, i: int) -> int:
    """Union-find root of `i`, halving the path on the way."""
    while parent[i] != i:
        parent[i] = parent[parent[i]]
        i = parent[i]
    return i


def components(n: int, edges_i: np.ndarray, edges_j: np.ndarray) -> list[int]:
    """Connected components of an n-node graph, labelled 0.. in order of first member."""
    parent = np.arange(n)
    for a, b in zip(edges_i.tolist(), edges_j.tolist()):
        ra, rb = find_root(parent, a), find_root(parent, b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    labels: dict[int, int] = {}
    return [labels.setdefault(find_root(parent, i), len(labels)) for i in range(n)]


def group_edges(groups: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Edges chaining each group's members (e.g. one SCOPe superfamily) to its first member."""
    first: dict[str, int] = {}
    pairs = [(first.setdefault(g, i), i) for i, g in enumerate(groups)]
    pairs = [(a, b) for a, b in pairs if a != b]
    arr = np.array(pairs, dtype=np.int64).reshape(-1, 2)
    return arr[:, 0], arr[:, 1]


def cluster_sequences(
    seqs: Sequence[str],
    k: int = 5,
    threshold: float = 0.1,
    min_shared: int = 3,
    groups: Sequence[str] | None = None,
) -> list[int]:
    """Cluster label per sequence: single linkage over k-mer containment >= threshold, merged with
    `groups` (same label -> same cluster) when given. Deterministic, labels in order of first member."""
    if groups is not None and len(groups) != len(seqs):
        raise ValueError(f"{len(groups)} groups for {len(seqs)} sequences")
    i, j, _ = similar_pairs(seqs, k, threshold, min_shared)
    if groups is not None:
        gi, gj = group_edges(groups)
        i, j = np.concatenate([i, gi]), np.concatenate([j, gj])
    return components(len(seqs), i, j)


def split_by_cluster(
    ids: Sequence[str], clusters: Sequence[int], fractions: Sequence[float], seed: int
) -> list[list[str]]:
    """Ids split into len(fractions) parts, whole clusters at a time, so no cluster straddles two parts.

    Clusters go largest first (seeded order among equal sizes) to the part furthest below its target
    share: sizes come out close to the fractions and the largest families land in the first part."""
    if len(ids) != len(clusters):
        raise ValueError(f"{len(clusters)} cluster labels for {len(ids)} ids")
    if not fractions or min(fractions) < 0 or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"fractions must be non-negative and sum to 1, got {list(fractions)}")
    members: dict[int, list[str]] = {}
    for id_, c in zip(ids, clusters):
        members.setdefault(c, []).append(id_)
    order = sorted(members)
    random.Random(seed).shuffle(order)
    order.sort(key=lambda c: -len(members[c]))  # stable: the shuffle breaks ties
    targets = [f * len(ids) for f in fractions]
    parts: list[list[str]] = [[] for _ in fractions]
    for c in order:
        deficit = [(t - len(p)) / t if t > 0 else -np.inf for t, p in zip(targets, parts)]
        parts[int(np.argmax(deficit))].extend(members[c])
    return parts


def score_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Overlap-alignment score matrix H, shape (len(a)+1, len(b)+1), free leading gaps."""
    m, n = len(a), len(b)
    h = np.zeros((m + 1, n + 1), dtype=np.int64)
    ramp = -GAP * np.arange(n + 1)  # (n+1,)
    for i in range(1, m + 1):
        sub = np.where(b == a[i - 1], MATCH, MISMATCH)  # (n,)
        best = np.empty(n + 1, dtype=np.int64)
        best[0] = 0
        best[1:] = np.maximum(h[i - 1, :-1] + sub, h[i - 1, 1:] + GAP)
        # a run of gaps in a along row i: H[i,j] = max_k best[k] + GAP*(j-k), a running max
        h[i] = np.maximum.accumulate(best + ramp) - ramp
    return h


def count_matches(h: np.ndarray, a: np.ndarray, b: np.ndarray) -> int:
    """Identical aligned pairs on the best overlap path (ends free), tracing back diagonal first."""
    m, n = len(a), len(b)
    i_end = int(np.argmax(h[:, n]))
    j_end = int(np.argmax(h[m, :]))
    i, j = (i_end, n) if h[i_end, n] >= h[m, j_end] else (m, j_end)
    matches = 0
    while i > 0 and j > 0:
        s = MATCH if a[i - 1] == b[j - 1] else MISMATCH
        if h[i, j] == h[i - 1, j - 1] + s:
            matches += int(s == MATCH)
            i, j = i - 1, j - 1
        elif h[i, j] == h[i - 1, j] + GAP:
            i -= 1
        else:
            j -= 1
    return matches


def alignment_identity(x: str, y: str) -> float:
    """Identity in [0, 1] of the best overlap alignment: identical pairs / length of the shorter."""
    a, b = encode(x), encode(y)
    if len(a) == 0 or len(b) == 0:
        return 0.0
    return count_matches(score_rows(a, b), a, b) / min(len(a), len(b))


class KmerIndex:
    """Distinct k-mers of reference sequences, inverted (k-mer -> sequences), for fast shared counts."""

    def __init__(self, seqs: Sequence[str], k: int = 3):
        self.seqs = list(seqs)
        self.k = k
        m = kmer_matrix(self.seqs, k)
        self.sizes = np.asarray(m.sum(axis=1)).ravel()  # (n,)
        self.postings = m.T.tocsr()  # (20**k, n)

    def shared(self, seq: str) -> tuple[np.ndarray, int]:
        """Shared distinct k-mer counts with every reference, shape (n,), and the query's k-mer count."""
        codes = kmer_codes(seq, self.k)
        p = self.postings
        hits = np.concatenate([p.indices[p.indptr[c] : p.indptr[c + 1]] for c in codes]) if len(codes) else []
        return np.bincount(np.asarray(hits, dtype=np.int64), minlength=len(self.seqs)), len(codes)

    def jaccard(self, seq: str) -> np.ndarray:
        """Jaccard similarity of distinct k-mer sets with every reference, shape (n,)."""
        shared, size = self.shared(seq)
        return shared / np.maximum(self.sizes + size - shared, 1)

    def candidates(self, seq: str, n: int) -> np.ndarray:
        """Indices of the n references sharing the most k-mers, best first, ties by index."""
        shared, _ = self.shared(seq)
        return np.argsort(-shared, kind="stable")[:n]


def nearest_identity(seq: str, train: Sequence[str] | KmerIndex, candidates: int = 10) -> tuple[float, int]:
    """(best alignment identity in [0, 1], its index in train) over the `candidates` training
    sequences sharing the most 3-mers; equal identities (a copy and a longer sequence holding it)
    go to the higher 3-mer Jaccard. Pass a KmerIndex to reuse it across queries."""
    index = train if isinstance(train, KmerIndex) else KmerIndex(train)
    if not index.seqs:
        raise ValueError("nearest_identity needs at least one training sequence")
    jaccard = index.jaccard(seq)  # (n,)
    best, best_i = (-1.0, -1.0), -1
    for i in index.candidates(seq, candidates).tolist():
        key = (alignment_identity(seq, index.seqs[i]), float(jaccard[i]))
        if key > best:
            best, best_i = key, i
    return best[0], best_i
