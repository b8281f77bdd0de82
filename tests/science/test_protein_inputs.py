"""Hostile inputs to the protein modules get a ValueError naming what is wrong, never a NaN or a stray error."""

from __future__ import annotations

import numpy as np
import pytest

from xlora.science.proteins import anm, homology, oracle, scope


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: oracle.features([""]), "every sequence must be a non-empty string"),
        (lambda: oracle.SequenceRegressor().fit(["ACDE", "KLMN", "PQRS"], [1.0, float("nan"), 2.0]), "NaN or infinite"),
        (lambda: oracle.mae([], []), "two equally long, non-empty lists"),
        (lambda: oracle.mae([1, 2], [1]), "got 2 and 1"),
        (lambda: anm.lowest_frequency("abc"), "C-alpha coordinates: expected"),
        (lambda: anm.lowest_frequency(np.eye(3) * 1e200), "expected Angstrom values"),
        (lambda: anm.lowest_frequency(np.random.default_rng(0).normal(size=(8, 3)), cutoff=float("nan")), "cutoff > 0"),
        (lambda: homology.cluster_sequences([1, 2]), "expected a protein sequence"),
    ],
)
def test_bad_inputs_are_named(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_a_corrupt_scope_file_is_named(tmp_path):
    bad = tmp_path / "dssp.json"
    bad.write_text("{oops")
    with pytest.raises(ValueError, match=f"{bad}: not the SCOPe DSSP JSON"):
        scope.load_domains(path=bad)
