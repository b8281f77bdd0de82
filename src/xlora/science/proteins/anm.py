"""Anisotropic network model (ANM) of a C-alpha trace, in numpy: Hessian, normal modes, mechanics.

Every pair of C-alpha atoms within `cutoff` (Angstrom, inclusive) is joined by a Hookean spring of
constant `gamma`; the Hessian's off-diagonal 3x3 super-element for such a pair is
-gamma * d d^T / |d|^2 (d the vector between them) and each diagonal block is minus the sum of its
row's off-diagonal blocks (Atilgan et al. 2001). Masses are all 1, so an eigenvalue lambda has units of
gamma and a frequency sqrt(lambda) has units of sqrt(gamma / mass). A rigid, connected network has
exactly 6 zero modes (3 translations, 3 rotations); more mean disconnected or floppy parts.

`pair_stiffness` is the effective spring constant between two residues along the line joining them
(Eyal & Bahar 2008, the definition behind ProDy's `calcMechStiff`): with c_k the projection of mode k's
relative displacement of the pair on their unit vector,
    k_ij = sum_k sqrt(lambda_k) |c_k| / sum_k |c_k| / sqrt(lambda_k)
over the non-trivial modes (kT cancels); its units are those of gamma.

Cost: one dense eigendecomposition of the 3L x 3L Hessian, about 0.04 s for L = 200 on one core
(`benchmarks/protein_mechanics.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

TRIVIAL_MODES = 6  # 3 rigid translations + 3 rigid rotations
ZERO_TOLERANCE = 1e-8  # an eigenvalue below this fraction of the largest counts as zero


class DisconnectedNetwork(ValueError):
    """The elastic network has more than the 6 trivial zero modes (disconnected or floppy parts)."""


@dataclass(frozen=True)
class Mechanics:
    """The two mechanics labels of one chain, from a single diagonalisation."""

    frequency: float  # sqrt of the lowest non-trivial eigenvalue, units sqrt(gamma / mass), unit mass
    stiffness: float  # end-to-end effective spring constant, units of gamma


def check_ca(ca: np.ndarray) -> np.ndarray:
    """The C-alpha coordinates as float64 [L, 3], with L >= 3 finite, distinct points."""
    try:
        ca = np.asarray(ca, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"C-alpha coordinates: expected numbers of shape [L, 3], got {type(ca).__name__}") from None
    if ca.ndim != 2 or ca.shape[1] != 3 or ca.shape[0] < 3:
        raise ValueError(f"C-alpha coordinates: expected shape [L >= 3, 3], got {list(ca.shape)}")
    if not np.isfinite(ca).all():
        raise ValueError("C-alpha coordinates: not all finite")
    if np.abs(ca).max() > 1e6:  # Angstrom: squared distances would overflow, and no protein is a kilometre wide
        raise ValueError(
            f"C-alpha coordinates: expected Angstrom values (|x| <= 1e6), got up to {np.abs(ca).max():.3g}"
        )
    return ca


def hessian(ca: np.ndarray, cutoff: float = 15.0, gamma: float = 1.0) -> np.ndarray:
    """The ANM Hessian [3L, 3L] of a C-alpha trace [L, 3] with springs of constant `gamma` within `cutoff`."""
    ca = check_ca(ca)
    if not (np.isfinite(cutoff) and np.isfinite(gamma)) or cutoff <= 0 or gamma <= 0:
        raise ValueError(f"ANM: expected cutoff > 0 and gamma > 0, got {cutoff}, {gamma}")
    n = ca.shape[0]
    d = ca[None, :, :] - ca[:, None, :]  # [L, L, 3], d[i, j] = ca[j] - ca[i]
    r2 = np.einsum("ijk,ijk->ij", d, d)  # [L, L]
    contact = r2 <= cutoff * cutoff
    np.fill_diagonal(contact, False)
    if (r2[contact] == 0).any():
        raise ValueError("C-alpha coordinates: two atoms coincide")
    weight = np.zeros_like(r2)  # [L, L]
    weight[contact] = -gamma / r2[contact]
    blocks = weight[:, :, None, None] * d[:, :, :, None] * d[:, :, None, :]  # [L, L, 3, 3]
    idx = np.arange(n)
    blocks[idx, idx] = -blocks.sum(axis=1)  # [L, 3, 3]: each row of blocks sums to zero
    return blocks.transpose(0, 2, 1, 3).reshape(3 * n, 3 * n)  # [3L, 3L]


def zero_mode_count(values: np.ndarray) -> int:
    """How many eigenvalues [3L] are numerically zero (relative to the largest)."""
    return int((values < ZERO_TOLERANCE * values.max()).sum())


def is_connected(ca: np.ndarray, cutoff: float = 15.0, gamma: float = 1.0) -> bool:
    """Whether the network is one rigid piece: exactly the 6 trivial zero modes."""
    values = np.linalg.eigvalsh(hessian(ca, cutoff, gamma))  # [3L]
    return zero_mode_count(values) == TRIVIAL_MODES


def normal_modes(
    ca: np.ndarray, n_modes: int | None = None, cutoff: float = 15.0, gamma: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """The lowest `n_modes` non-trivial eigenvalues [M] and unit eigenvectors [3L, M] (None: all 3L - 6).

    Raises DisconnectedNetwork when the network has more than the 6 trivial zero modes."""
    ca = check_ca(ca)
    available = 3 * ca.shape[0] - TRIVIAL_MODES
    if n_modes is not None and not 0 < n_modes <= available:
        raise ValueError(f"ANM: n_modes must be 1..{available}, got {n_modes}")
    values, vectors = np.linalg.eigh(hessian(ca, cutoff, gamma))  # [3L], [3L, 3L], ascending
    zeros = zero_mode_count(values)
    if zeros != TRIVIAL_MODES:
        raise DisconnectedNetwork(f"ANM: {zeros} zero modes, expected {TRIVIAL_MODES} (the network is not rigid)")
    stop = TRIVIAL_MODES + (available if n_modes is None else n_modes)
    return values[TRIVIAL_MODES:stop], vectors[:, TRIVIAL_MODES:stop]  # [M], [3L, M]


def lowest_frequency(ca: np.ndarray, cutoff: float = 15.0, gamma: float = 1.0) -> float:
    """sqrt of the lowest non-trivial eigenvalue: the slowest mode's frequency, in sqrt(gamma / mass), unit mass."""
    values, _ = normal_modes(ca, 1, cutoff, gamma)
    return float(np.sqrt(values[0]))


def pair_stiffness(ca: np.ndarray, values: np.ndarray, vectors: np.ndarray, i: int, j: int) -> float:
    """Effective spring constant between residues i and j along their line, from modes [M], [3L, M] (Eyal & Bahar)."""
    ca = check_ca(ca)
    if i == j:
        raise ValueError(f"stiffness: expected two different residues, got {i} twice")
    axis = ca[j] - ca[i]  # [3]
    axis = axis / np.linalg.norm(axis)
    modes = vectors.reshape(ca.shape[0], 3, -1)  # [L, 3, M]
    along = np.abs(axis @ (modes[j] - modes[i]))  # [M]: |projection of each mode's pair displacement|
    root = np.sqrt(values)  # [M]
    return float((root * along).sum() / (along / root).sum())


def end_to_end_stiffness(ca: np.ndarray, cutoff: float = 15.0, gamma: float = 1.0) -> float:
    """Effective spring constant between the first and last C-alpha along their line, all modes, units of gamma."""
    values, vectors = normal_modes(ca, None, cutoff, gamma)
    return pair_stiffness(ca, values, vectors, 0, len(ca) - 1)


def chain_mechanics(ca: np.ndarray, cutoff: float = 15.0, gamma: float = 1.0) -> Mechanics | None:
    """Lowest frequency and end-to-end stiffness from one diagonalisation; None for a disconnected network."""
    try:
        values, vectors = normal_modes(ca, None, cutoff, gamma)
    except DisconnectedNetwork:
        return None
    frequency = float(np.sqrt(values[0]))
    return Mechanics(frequency, pair_stiffness(ca, values, vectors, 0, len(ca) - 1))
