"""Protein tasks, forward and inverse: mechanics (elastic-network labels of real structures) and
structure (SCOPe secondary structure and class).

Forward answers are numbers parsed after their word; inverse answers are a sequence, scored by an
independent forward oracle (nothing offline folds a sequence, so a design is judged by a model
trained on the training split only, the way the paper's designs were checked), by validity
(standard amino acids, length within 10 % of the target) and by novelty (identity to the nearest
training sequence, computed by the caller).

Units: `frequency` and `stiffness` are the anisotropic network model's, with unit spring constant
and unit mass (`xlora.science.proteins.anm`): proxies for mechanics, not all-atom steered MD.
Helix and strand content are percentages of residues (DSSP H/G/I and E/B).
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Callable, Sequence

from xlora.science.tasks.item import AMINO, Item

MECHANICS, STRUCTURE = "protein-mechanics", "protein-structure"
PROTEIN_TASKS = (MECHANICS, STRUCTURE)
SCOP_CLASSES = {"a": "all-alpha", "b": "all-beta", "c": "alpha/beta", "d": "alpha+beta"}
LENGTH_TOLERANCE = 0.10  # a design's length may be off by this fraction of the target
HELIX_TOLERANCE = 15.0  # percentage points between the oracle's helix content and the target
STIFFNESS_TOLERANCE = 0.25  # relative error of the oracle's stiffness allowed for a design
_NUM = r"([-+]?\d+(?:\.\d+)?)"

Predictor = Callable[[Sequence[str]], Sequence[float]]
"""A forward oracle: sequences -> one predicted value each (helix %, stiffness, ...)."""


def mechanics_item(sequence: str, frequency: float, stiffness: float, design: bool) -> Item:
    """Forward: sequence -> lowest normal-mode frequency and end-to-end stiffness; inverse: a
    length and a target stiffness -> a sequence (the chain's own sequence is the reference)."""
    n, frequency, stiffness = len(sequence), round(frequency, 3), round(stiffness, 2)  # as the answer states them
    meta = {"frequency": frequency, "stiffness": stiffness, "length": n, "kind": "design" if design else "forward"}
    if design:
        prompt = f"Design a protein of about {n} residues with end-to-end stiffness {stiffness:.2f}."
        return Item(MECHANICS, prompt, sequence, meta)
    prompt = f"Protein {sequence}. Give its lowest normal-mode frequency and its end-to-end stiffness."
    return Item(MECHANICS, prompt, f"frequency {frequency:.3f}; stiffness {stiffness:.2f}", meta)


def structure_item(sequence: str, helix: float, strand: float, scop_class: str, design: bool) -> Item:
    """Forward: sequence -> helix and strand content (%) and SCOP class; inverse: a length and a
    class with its helix content -> a sequence. `helix`, `strand` are fractions in [0, 1]."""
    if scop_class not in SCOP_CLASSES:
        raise ValueError(f"scop_class: expected one of {', '.join(SCOP_CLASSES)}, got {scop_class!r}")
    n, h, e = len(sequence), round(100 * helix), round(100 * strand)
    meta = {"helix": h, "strand": e, "scop_class": scop_class, "length": n, "kind": "design" if design else "forward"}
    if design:
        mostly = {"a": "mostly alpha-helical", "b": "mostly beta-strand", "c": "alpha/beta", "d": "alpha+beta"}
        prompt = f"Design a sequence of {n} residues, {mostly[scop_class]} (about {h} % helix)."
        return Item(STRUCTURE, prompt, sequence, meta)
    prompt = f"Protein {sequence}. Give its helix and strand content and its SCOP class."
    answer = f"helix {h} %; strand {e} %; class {scop_class} ({SCOP_CLASSES[scop_class]})"
    return Item(STRUCTURE, prompt, answer, meta)


def number_after(word: str, answer: str) -> float | None:
    """The number after `word` (any case), or None."""
    m = re.search(rf"\b{word}\b:?\s*{_NUM}", answer, re.IGNORECASE)
    return float(m.group(1)) if m else None


def scop_class_of(answer: str) -> str | None:
    """The class letter after `class` (a, b, c or d), or None."""
    m = re.search(r"\bclass\b:?\s*([abcd])\b", answer, re.IGNORECASE)
    return m.group(1).lower() if m else None


def designed_sequence(answer: str) -> str:
    """The first word of the answer, letters only, upper case: the designed sequence ('' if none)."""
    words = answer.strip().split()
    return "".join(ch for ch in words[0] if ch.isalpha()).upper() if words else ""


def valid_design(sequence: str, length: int) -> bool:
    """Standard amino acids only, and a length within LENGTH_TOLERANCE of the target."""
    return bool(sequence) and set(sequence) <= AMINO and abs(len(sequence) - length) <= LENGTH_TOLERANCE * length


def _error(value: float | None, target: float) -> float | None:
    return None if value is None else abs(value - target)


def forward_outcomes(task: str, items: list[Item], answers: list[str]) -> dict[str, list[float | None]]:
    """Per-item absolute errors (None: unparsed) and, for structure, class hits (0/1)."""
    if task == MECHANICS:
        freq = [_error(number_after("frequency", a), it.meta["frequency"]) for it, a in zip(items, answers)]
        stiff = [_error(number_after("stiffness", a), it.meta["stiffness"]) for it, a in zip(items, answers)]
        return {"frequency_mae": freq, "stiffness_mae": stiff}
    if task == STRUCTURE:
        helix = [_error(number_after("helix", a), it.meta["helix"]) for it, a in zip(items, answers)]
        strand = [_error(number_after("strand", a), it.meta["strand"]) for it, a in zip(items, answers)]
        hits = [float(scop_class_of(a) == it.meta["scop_class"]) for it, a in zip(items, answers)]
        return {"helix_mae": helix, "strand_mae": strand, "class_accuracy": hits}
    raise ValueError(f"unknown protein task {task!r}; expected one of {PROTEIN_TASKS}")


def design_outcomes(task: str, items: list[Item], answers: list[str], oracle: Predictor) -> dict[str, list[float]]:
    """Per design: valid (0/1) and satisfied (valid and the oracle's prediction within tolerance of
    the target: helix points for structure, relative stiffness for mechanics), 0/1 each."""
    seqs = [designed_sequence(a) for a in answers]
    valid = [valid_design(s, it.meta["length"]) for s, it in zip(seqs, items)]
    predicted = list(oracle([s for s, ok in zip(seqs, valid) if ok])) if any(valid) else []
    satisfied, k = [], 0
    for ok, it in zip(valid, items):
        if not ok:
            satisfied.append(0.0)
            continue
        value, k = float(predicted[k]), k + 1
        if task == STRUCTURE:
            satisfied.append(float(abs(value - it.meta["helix"]) <= HELIX_TOLERANCE))
        elif task == MECHANICS:
            target = it.meta["stiffness"]
            satisfied.append(float(abs(value - target) <= STIFFNESS_TOLERANCE * abs(target)))
        else:
            raise ValueError(f"unknown protein task {task!r}; expected one of {PROTEIN_TASKS}")
    return {"valid_rate": [float(v) for v in valid], "design_satisfied_rate": satisfied}


def mean_errors(items: list[Item], train_items: list[Item], keys: Sequence[str]) -> dict[str, float]:
    """MAE of always answering the training mean of each meta key: the bar a model must clear."""
    out = {}
    for key in keys:
        mean = statistics.fmean(it.meta[key] for it in train_items)
        out[f"{key}_mae"] = statistics.fmean(abs(mean - it.meta[key]) for it in items)
    return out
