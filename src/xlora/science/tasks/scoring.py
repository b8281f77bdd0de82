"""Answer parsers and metrics of the five tasks."""

from __future__ import annotations

import math
import re
import statistics

from xlora.science.tasks.item import AMINO, TASKS, Item  # noqa: F401 - TASKS/AMINO re-exported
from xlora.science.tasks.molecules import canonical, formula_of
from xlora.science.tasks.peptides import net_charge

_NUM = r"([-+]?\d+(?:\.\d+)?)"


def yes_no(label: str, answer: str) -> str | None:
    """ "yes" / "no" after `label:` (any case; a whole word, so "not sure" is no answer), else None."""
    m = re.search(rf"(?<![\w-]){label}:\s*(yes|no)\b", answer, re.IGNORECASE)
    return m.group(1).lower() if m else None


def _mae(errors: list[float | None]) -> float:
    """Mean absolute error over the parsed answers (None = unparsed); NaN ("n/a") unless at least
    half parse, so a model that answers in the right format once is not ranked on that one answer."""
    parsed = [e for e in errors if e is not None]
    return statistics.fmean(parsed) if parsed and len(parsed) * 2 >= len(errors) else float("nan")


META_KEYS = {  # what scoring reads from each item's meta
    "molecule-properties": ("gap", "dipole"),
    "molecule-design": ("formula",),
    "peptides/classify": ("kind", "antimicrobial", "charge"),
    "peptides/design": ("kind", "length", "charge"),
    "molecule-thermo": ("cv", "zpve"),
    "anticancer": ("anticancer",),
}
# per-item absolute errors, None = unparsed
MAE_METRICS = ("gap_mae_ev", "dipole_mae_d", "charge_mae", "cv_mae", "zpve_mae_ev")


def _check_meta(task: str, it: Item, n: int) -> None:
    """A clear error for a record whose meta lacks what scoring reads (instead of a KeyError)."""
    key = task
    if task == "peptides":
        if it.meta.get("kind") not in ("classify", "design"):
            raise ValueError(
                f"peptides item {n}: meta 'kind' must be 'classify' or 'design', got {it.meta.get('kind')!r}"
            )
        key = f"peptides/{it.meta['kind']}"
    missing = [k for k in META_KEYS[key] if k not in it.meta]
    if missing:
        raise ValueError(f"{task} item {n}: its meta lacks {', '.join(missing)} (has {', '.join(sorted(it.meta))})")
    for k in META_KEYS[key]:
        v = it.meta[k]
        if k in _FLAGS and not isinstance(v, bool):
            raise ValueError(f"{task} item {n}: meta {k!r} must be true or false, got {v!r}")
        if k in _NUMBERS and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
            raise ValueError(f"{task} item {n}: meta {k!r} must be a finite number, got {v!r}")


_FLAGS = ("antimicrobial", "anticancer")
_NUMBERS = ("gap", "dipole", "charge", "cv", "zpve", "length")


def check_items(task: str, items: list[Item]) -> None:
    """A clear one-line error for the first item whose meta cannot be scored (before any answer is
    generated); tasks outside TASKS (composite, retention) check their own."""
    if task in TASKS:
        for n, it in enumerate(items, start=1):
            _check_meta(task, it, n)


def outcomes(
    task: str, items: list[Item], answers: list[str], train_smiles: set[str] | None = None
) -> dict[str, list[float | None]]:
    """Per-item values of each task metric, the raw material of `score` and of bootstrap intervals.

    metric -> one value per item the metric applies to, in item order (peptide classification
    metrics apply to classification items only, `design_satisfied_rate` to design items only), so
    two models' lists on the same items pair up. Rates are 0/1; MAE metrics are absolute errors,
    None where the answer did not parse."""
    if len(items) != len(answers):
        raise ValueError(f"{len(items)} items but {len(answers)} answers")
    check_items(task, items)
    if task == "molecule-properties":
        gaps: list[float | None] = []
        dips: list[float | None] = []
        for it, a in zip(items, answers):
            g = re.search(r"gap\s*" + _NUM, a)
            d = re.search(r"dipole\s*" + _NUM, a)
            gaps.append(abs(float(g.group(1)) - it.meta["gap"]) if g else None)
            dips.append(abs(float(d.group(1)) - it.meta["dipole"]) if d else None)
        return {"gap_mae_ev": gaps, "dipole_mae_d": dips, "parsed_rate": [float(x is not None) for x in gaps]}
    if task == "molecule-design":
        valid, exact, novel = [], [], []
        for it, a in zip(items, answers):
            smi = a.strip().split()[0] if a.strip() else ""
            can = canonical(smi) if smi else None
            valid.append(float(can is not None))
            exact.append(float(can is not None and formula_of(can) == it.meta["formula"]))
            novel.append(float(can is not None and (train_smiles is None or can not in train_smiles)))
        return {"valid_rate": valid, "exact_formula_rate": exact, "novel_rate": novel}
    if task == "peptides":
        acc: list[float | None] = []
        charge_err: list[float | None] = []
        sat: list[float | None] = []
        for it, a in zip(items, answers):
            if it.meta["kind"] == "classify":
                said = yes_no("antimicrobial", a)
                acc.append(float(said is not None and (said == "yes") == it.meta["antimicrobial"]))
                c = re.search(r"charge\s*" + _NUM, a)
                charge_err.append(abs(float(c.group(1)) - it.meta["charge"]) if c else None)
            else:
                seq = "".join(ch for ch in a.strip().split()[0] if ch.isalpha()) if a.strip() else ""
                ok = bool(seq) and set(seq) <= AMINO and len(seq) == it.meta["length"]
                sat.append(float(ok and abs(net_charge(seq) - it.meta["charge"]) <= 1.0))
        return {
            "amp_accuracy": acc,
            "charge_mae": charge_err,
            "charge_parsed_rate": [float(x is not None) for x in charge_err],
            "design_satisfied_rate": sat,
        }
    if task == "molecule-thermo":
        cvs: list[float | None] = []
        zpves: list[float | None] = []
        for it, a in zip(items, answers):
            c = re.search(r"Cv:?\s*" + _NUM, a)
            z = re.search(r"ZPVE:?\s*" + _NUM, a)
            cvs.append(abs(float(c.group(1)) - it.meta["cv"]) if c else None)
            zpves.append(abs(float(z.group(1)) - it.meta["zpve"]) if z else None)
        both = [float(c is not None and z is not None) for c, z in zip(cvs, zpves)]
        return {"cv_mae": cvs, "zpve_mae_ev": zpves, "parsed_rate": both}
    if task == "anticancer":
        acc_acp = []
        for it, a in zip(items, answers):
            said = yes_no("anticancer", a)
            acc_acp.append(float(said is not None and (said == "yes") == it.meta["anticancer"]))
        return {"acp_accuracy": acc_acp}
    if task == "composite":
        from xlora.science.tasks.composite import composite_outcomes

        return composite_outcomes(items, answers)
    if task == "retention":
        from xlora.science.tasks.retention import retention_outcomes

        return retention_outcomes(items, answers)
    raise ValueError(f"unknown task {task!r}; tasks are {TASKS}, composite and retention")


def score(task: str, items: list[Item], answers: list[str], train_smiles: set[str] | None = None) -> dict:
    """Task metrics of generated `answers` against `items` (same order): means of `outcomes`
    (0 when a metric has no items), MAEs by `_mae`'s half-parsed rule."""
    out = {}
    for metric, values in outcomes(task, items, answers, train_smiles).items():
        if metric in MAE_METRICS:
            out[metric] = _mae(values)
        else:
            out[metric] = sum(v or 0.0 for v in values) / max(len(values), 1)
    return out


def mean_baseline(task: str, items: list[Item], train_answers: list[str]) -> dict[str, float]:
    """MAE of always answering the training mean, for the task's numeric answers (gap, dipole,
    peptide charge, Cv, ZPVE), and for anticancer the accuracy of always giving the training set's
    majority answer: the bar a model has to clear to have learnt anything about the inputs."""
    fields = {
        "molecule-properties": [("gap_mae_ev", "gap"), ("dipole_mae_d", "dipole")],
        "peptides": [("charge_mae", "charge")],
        "molecule-thermo": [("cv_mae", "Cv"), ("zpve_mae_ev", "ZPVE")],  # meta keys: the word in lower case
    }
    check_items(task, items)
    out = {}
    for metric, word in fields.get(task, []):
        values = [float(m.group(1)) for a in train_answers if (m := re.search(word + r"\s*" + _NUM, a))]
        targets = [it.meta[word.lower()] for it in items if it.meta.get("kind", "classify") == "classify"]
        if values and targets:
            mean = statistics.fmean(values)
            out[metric] = statistics.fmean(abs(mean - t) for t in targets)
    if task == "anticancer":  # the training set's majority answer, always
        yes = sum("anticancer: yes" in a for a in train_answers) * 2 >= len(train_answers)
        out["acp_accuracy"] = statistics.fmean(float(it.meta["anticancer"] == yes) for it in items) if items else 0.0
    return out
