"""Protein mechanics labels on the real chains: counts, time per chain, and each label's tie to length.

    python benchmarks/protein_mechanics.py                      # MDAnalysisTests' structures, cutoff 15 A
    python benchmarks/protein_mechanics.py --folder pdbs/ --cutoff 12

Prints the structure scan, how many chains got labels and how many were dropped (disconnected network),
the mean ANM time per chain and per 200-residue chain (Hessian + full diagonalisation + stiffness), and
the Pearson r of stiffness and frequency with chain length (the figures in mechanics.py's docstring).

Measured on a shared 2-core machine: 0.035 s per 200-residue chain, 1.8 s for all 71 chains, with
OPENBLAS_NUM_THREADS=1; with OpenBLAS's default threads on the busy cores, 0.2-0.3 s per chain
(threads contending), so set that variable on small shared machines.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from xlora.science.proteins.anm import chain_mechanics
from xlora.science.proteins.mechanics import label_table, length_correlations
from xlora.science.proteins.structures import describe, scan_structures, structure_sources


def main() -> None:
    """Scan, label, time and correlate; print one line per figure."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--folder", type=Path, action="append", default=[], help="extra structure folder")
    ap.add_argument("--cutoff", type=float, default=15.0)
    args = ap.parse_args()
    sources = structure_sources({f.name: f for f in args.folder}) if args.folder else None
    start = time.perf_counter()
    scan = scan_structures(sources)
    print(f"scan: {describe(scan)} in {time.perf_counter() - start:.2f} s")
    start = time.perf_counter()
    table = label_table(scan.chains, args.cutoff)
    total = time.perf_counter() - start
    print(f"labels: {len(table.labels)} chains, {len(table.dropped)} dropped {table.dropped}")
    print(f"time: {total:.1f} s, {total / max(len(scan.chains), 1):.3f} s per chain")
    near = [c for c in scan.chains if 180 <= len(c.sequence) <= 220]
    if near:
        times = []
        for chain in near:
            t = time.perf_counter()
            chain_mechanics(chain.ca, args.cutoff)
            times.append(time.perf_counter() - t)
        print(f"time per 180-220-residue chain: {statistics.median(times):.3f} s (median of {len(near)})")
    r = length_correlations(table.labels)
    n, stiff, freq = int(r["n"]), r["stiffness"], r["frequency"]
    print(f"Pearson r with length (n = {n}): stiffness {stiff:+.2f}, frequency {freq:+.2f}")


if __name__ == "__main__":
    main()
