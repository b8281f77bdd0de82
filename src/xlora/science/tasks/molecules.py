"""Molecule tasks on QM9: properties (gap, dipole), thermochemistry (Cv, ZPVE), design from a formula."""

from __future__ import annotations

from xlora.science.tasks.datasets import Molecule
from xlora.science.tasks.item import Item


def canonical(smiles: str) -> str | None:
    from rdkit import Chem, RDLogger

    RDLogger.DisableLog("rdApp.*")
    mol = Chem.MolFromSmiles(smiles)
    return Chem.MolToSmiles(mol) if mol is not None else None


def formula_of(smiles: str) -> str | None:
    from rdkit import Chem, RDLogger
    from rdkit.Chem.rdMolDescriptors import CalcMolFormula

    RDLogger.DisableLog("rdApp.*")
    mol = Chem.MolFromSmiles(smiles)
    return CalcMolFormula(mol) if mol is not None else None


def property_item(m: Molecule) -> Item:
    return Item(
        "molecule-properties",
        f"Molecule {m.smiles}. Give its HOMO-LUMO gap in eV and its dipole in debye.",
        f"gap {m.gap_ev:.2f} eV; dipole {m.dipole:.2f} D",
        {"gap": m.gap_ev, "dipole": m.dipole, "id": m.id},
    )


def thermo_item(m: Molecule) -> Item:
    return Item(
        "molecule-thermo",
        f"Molecule {m.smiles}. Give its heat capacity Cv in cal/mol K and its zero-point energy in eV.",
        f"Cv {m.cv:.2f} cal/mol K; ZPVE {m.zpve_ev:.2f} eV",
        {"cv": m.cv, "zpve": m.zpve_ev, "id": m.id},
    )


def design_item(m: Molecule) -> Item:
    smiles = canonical(m.smiles) or m.smiles
    return Item(
        "molecule-design",
        f"Design a molecule with formula {m.formula}. Answer with a SMILES.",
        smiles,
        {"formula": m.formula, "id": m.id},
    )


def formula_item(m: Molecule) -> Item:
    """The design task's other direction, SMILES -> formula: training data of the design expert
    only (so that it knows SMILES <-> formula, as the composite task assumes); never scored."""
    return Item(
        "molecule-design",
        f"Molecule {m.smiles}. Give its molecular formula.",
        f"formula {m.formula}",
        {"formula": m.formula, "id": m.id, "kind": "formula"},
    )
