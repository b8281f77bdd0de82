"""Protein mechanics: real chains from MDAnalysisTests, our ANM against ProDy's, the label table and its cache."""

from __future__ import annotations

import gzip
import importlib.util
import json
import shutil

import gemmi
import numpy as np
import prody
import pytest

from xlora.science.proteins import anm, mechanics, structures
from xlora.science.proteins.structures import Chain, load_chains, scan_structures

prody.confProDy(verbosity="none")
MISSING = importlib.util.find_spec("MDAnalysisTests") is None
needs_data = pytest.mark.skipif(MISSING, reason="MDAnalysisTests is not installed: pip install MDAnalysisTests")
ORACLE_CHAINS = [
    "mdanalysistests/mmcif/5PTI.cif.gz:A",
    "mdanalysistests/dssp/2cviA.pdb.gz:A",
    "mdanalysistests/4E43.pdb:A",
]
STANDARD = set("ACDEFGHIKLMNPQRSTVWY")


@pytest.fixture(scope="module")
def chains() -> list[Chain]:
    return load_chains()


@pytest.fixture(scope="module")
def oracle(chains) -> list[Chain]:
    """Three small real chains (58, 83 and 99 residues) for the comparisons with ProDy."""
    by_id = {c.id: c for c in chains}
    return [by_id[i] for i in ORACLE_CHAINS]


def prody_anm(ca: np.ndarray, cutoff: float, gamma: float) -> prody.ANM:
    """ProDy's ANM of the same trace, every non-trivial mode."""
    model = prody.ANM()
    model.buildHessian(ca, cutoff=cutoff, gamma=gamma)
    model.calcModes(n_modes=None)
    return model


@needs_data
@pytest.mark.parametrize(("cutoff", "gamma"), [(15.0, 1.0), (12.0, 2.5)])
def test_hessian_and_eigenvalues_equal_prodys(oracle, cutoff, gamma):
    for chain in oracle:
        ref = prody_anm(chain.ca, cutoff, gamma)
        np.testing.assert_allclose(anm.hessian(chain.ca, cutoff, gamma), ref.getHessian(), rtol=0, atol=1e-12)
        values, vectors = anm.normal_modes(chain.ca, None, cutoff, gamma)
        assert values.shape == (3 * len(chain.ca) - 6,) and vectors.shape == (3 * len(chain.ca), values.size)
        np.testing.assert_allclose(values, ref.getEigvals(), rtol=1e-6)
        assert anm.lowest_frequency(chain.ca, cutoff, gamma) == pytest.approx(np.sqrt(ref.getEigvals()[0]), rel=1e-6)


@needs_data
def test_stiffness_equals_prodys_calc_mech_stiff(oracle):
    for chain in oracle:
        ref = prody.calcMechStiff(prody_anm(chain.ca, 15.0, 1.0), chain.ca)  # [L, L]
        assert anm.end_to_end_stiffness(chain.ca) == pytest.approx(ref[0, -1], rel=1e-6)
        values, vectors = anm.normal_modes(chain.ca)
        i, j = 5, len(chain.ca) // 2  # an interior pair too
        assert anm.pair_stiffness(chain.ca, values, vectors, i, j) == pytest.approx(ref[i, j], rel=1e-6)
        m = anm.chain_mechanics(chain.ca)
        assert m is not None and m.stiffness == pytest.approx(ref[0, -1], rel=1e-6)


def two_clusters(gap: float) -> np.ndarray:
    """Two compact 12-point clusters [24, 3] whose centres are `gap` Angstrom apart."""
    rng = np.random.default_rng(0)
    one = rng.normal(scale=3.0, size=(12, 3))  # [12, 3]
    return np.concatenate([one, one + [gap, 0.0, 0.0]])  # [24, 3]


def test_a_disconnected_network_is_detected_and_dropped():
    far, near = two_clusters(100.0), two_clusters(8.0)
    assert anm.is_connected(near) and not anm.is_connected(far)
    assert anm.zero_mode_count(np.linalg.eigvalsh(anm.hessian(far))) == 12  # 6 per rigid cluster
    with pytest.raises(anm.DisconnectedNetwork, match="12 zero modes"):
        anm.normal_modes(far)
    assert anm.chain_mechanics(far) is None
    toy = [Chain("toy/far:A", "toy", "A" * 24, far), Chain("toy/near:A", "toy", "A" * 24, near)]
    table = mechanics.label_table(toy)
    assert table.dropped == ["toy/far:A"] and [row["id"] for row in table.labels] == ["toy/near:A"]


def test_bad_coordinates_are_clear_errors():
    with pytest.raises(ValueError, match=r"expected shape \[L >= 3, 3\]"):
        anm.hessian(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="coincide"):
        anm.hessian(np.array([[0.0, 0, 0], [0, 0, 0], [1, 2, 3]]))


@needs_data
def test_load_chains_gives_unique_standard_chains(chains):
    assert 60 <= len(chains) <= 90  # 71 with MDAnalysisTests 2.11.0
    assert len({c.sequence for c in chains}) == len(chains) and len({c.id for c in chains}) == len(chains)
    for c in chains:
        assert set(c.sequence) <= STANDARD and 30 <= len(c.sequence) <= 400
        assert c.ca.shape == (len(c.sequence), 3) and c.ca.dtype == np.float64
        assert c.source == "mdanalysistests" and c.id.startswith("mdanalysistests/")
    assert [c.id for c in load_chains()] == [c.id for c in chains]  # deterministic


@needs_data
def test_the_scan_drops_nonstandard_duplicate_and_unreadable(tmp_path):
    data = structures.default_sources()["mdanalysistests"]
    pti = gemmi.read_structure(str(data / "mmcif" / "5PTI.cif.gz"))
    pti.remove_alternative_conformations()
    first = pti[0]["A"][0]
    shutil.copy(data / "mmcif" / "5PTI.cif.gz", tmp_path / "a.cif.gz")
    shutil.copy(data / "mmcif" / "5PTI.cif.gz", tmp_path / "b_copy.cif.gz")  # a duplicate sequence
    (tmp_path / "c_broken.pdb").write_text("ATOM  garbage\nMODEL 1\nMODEL 1\n")  # unreadable
    with gzip.open(tmp_path / "d_broken.cif.gz", "wt") as f:
        f.write("data_x\nloop_\n_atom_site.id\n")  # unreadable too
    modified = gemmi.read_structure(str(data / "dssp" / "2cviA.pdb.gz"))
    modified[0][0][3].name = "MSE"  # a non-standard amino acid: the whole chain is dropped
    modified.write_pdb(str(tmp_path / "e_mse.pdb"))
    scan = scan_structures({"mine": tmp_path})
    assert [c.id for c in scan.chains] == ["mine/a.cif.gz:A"]
    assert scan.files == 5 and scan.duplicates == 1 and scan.nonstandard == 1 and len(scan.unreadable) == 2
    assert scan.chains[0].ca[0] == pytest.approx([first["CA"][0].pos.x, first["CA"][0].pos.y, first["CA"][0].pos.z])


def ca_line(serial: int, altloc: str, name: str, seq: int, x: float, y: float, occupancy: float) -> str:
    """One PDB ATOM record of a C-alpha (fixed columns)."""
    head = f"ATOM  {serial:5d}  CA {altloc}{name} A{seq:4d}    "
    return head + f"{x:8.3f}{y:8.3f}{0.0:8.3f}{occupancy:6.2f} 10.00           C"


def test_alternative_conformations_keep_the_first(tmp_path):
    lines = []
    for i, name in enumerate(["GLY", "ALA", "SER", "LYS"] * 8):
        lines.append(ca_line(2 * i + 1, "A", name, i + 1, 3.8 * i, 0.0, 0.6))
        lines.append(ca_line(2 * i + 2, "B", name, i + 1, 3.8 * i, 1.0, 0.4))
    (tmp_path / "alt.pdb").write_text("\n".join(lines) + "\nEND\n")
    [chain] = load_chains({"alt": tmp_path})
    assert chain.sequence == "GASK" * 8 and chain.ca.shape == (32, 3)
    assert np.all(chain.ca[:, 1] == 0.0)  # conformer A everywhere


def test_a_missing_data_package_names_it_and_the_pip_line(monkeypatch):
    real = importlib.util.find_spec
    hide = lambda name, *a: None if name == "MDAnalysisTests" else real(name, *a)  # noqa: E731
    monkeypatch.setattr(importlib.util, "find_spec", hide)
    assert "mdanalysistests" not in structures.structure_sources()
    with pytest.raises(FileNotFoundError, match=r"MDAnalysisTests.*pip install MDAnalysisTests"):
        load_chains()


def test_a_missing_user_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="structure folder 'mine' not found"):
        structures.structure_sources({"mine": tmp_path / "absent"})


def toy_table() -> mechanics.LabelTable:
    """A label table of two connected toy chains and one dropped."""
    toy = [Chain(f"toy/{g}:A", "toy", "GA" * 12, two_clusters(g)) for g in (6.0, 100.0, 9.0)]
    return mechanics.label_table(toy)


def test_cache_round_trip_is_atomic_and_exact(tmp_path):
    table = toy_table()
    path = tmp_path / "mechanics.json"
    mechanics.write_cache(path, table)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mechanics.json"]  # no temporary file left
    back = mechanics.read_cache(path)
    assert back.labels == table.labels and back.dropped == ["toy/100.0:A"] and back.cutoff == 15.0
    assert set(back.labels[0]) == {"id", "source", "sequence", "length", "frequency", "stiffness"}
    chains = [Chain(f"toy/{g}:A", "toy", "GA" * 12, two_clusters(g)) for g in (6.0, 100.0, 9.0)]
    assert mechanics.cached_label_table(path, chains).labels == table.labels  # read, not recomputed
    with pytest.raises(mechanics.MechanicsCacheError, match="cutoff 15.0, asked for 10.0"):
        mechanics.cached_label_table(path, chains, cutoff=10.0)
    with pytest.raises(mechanics.MechanicsCacheError, match="other chains"):
        mechanics.cached_label_table(path, chains[:2])


@pytest.mark.parametrize(
    "text",
    [
        '{"format": "xlora-protein-mechanics", "version": 1, "cut',  # truncated
        "[1, 2]",
        '{"format": "xlora-protein-mechanics", "version": 1, "cutoff": 15, "dropped": [],'
        ' "labels": [{"id": "x", "source": "s", "sequence": "GA", "length": 3, "frequency": 1, "stiffness": 1}]}',
        '{"format": "xlora-protein-mechanics", "version": 1, "cutoff": 15, "dropped": [],'
        ' "labels": [{"id": "x", "source": "s", "sequence": "GA", "length": 2, "frequency": NaN, "stiffness": 1}]}',
    ],
)
def test_a_corrupt_cache_is_an_error_naming_the_file(tmp_path, text):
    path = tmp_path / "mechanics.json"
    path.write_text(text)
    with pytest.raises(mechanics.MechanicsCacheError, match=rf"{path}: corrupt mechanics cache"):
        mechanics.read_cache(path)


def test_length_correlations_report_n_and_r():
    rows = [{"length": n, "stiffness": 2.0 * n, "frequency": 10.0 - n} for n in range(30, 40)]
    r = mechanics.length_correlations(rows)
    assert r["n"] == 10 and r["stiffness"] == pytest.approx(1.0) and r["frequency"] == pytest.approx(-1.0)
    assert json.dumps(r)  # plain floats
