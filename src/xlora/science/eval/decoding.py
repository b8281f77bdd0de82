"""How the science tasks' answers are decoded: greedy, or sample-and-check.

Greedy returns the model's single most likely answer. "checked" decoding, closer to how a chemist
uses a generator, also draws `samples` answers at `temperature` and combines them per task:

- design prompts (molecule-design, peptide design): the first answer, greedy first, that meets the
  constraints *the prompt states* (a valid SMILES with the asked formula; the asked length and net
  charge within 1), checked with RDKit / Biopython. When no answer meets them all, the first that
  meets the first of them (a valid molecule of another formula; a peptide of the asked length) is
  kept: a chemist would rather have a real molecule than a broken string. Only when none does is the
  greedy answer returned. The reference answer is never looked at, so this is a generate-and-test a
  user can run on any prompt; it measures "can the model produce a valid design within `samples + 1`
  tries", which is a different figure from greedy's and is reported as such.
- numbers (gap, dipole, peptide charge, Cv, ZPVE): the median of each number over the answers that give it.
  Greedy returns the mode of the model's distribution; the median is what minimises absolute error.
- antimicrobial and anticancer yes/no: the majority of the answers that give one (greedy breaks a tie).

"constrained" decoding is greedy with a design prompt's form enforced token by token (SMILES syntax
with the formula's heavy atoms; the peptide's length): `xlora.science.eval.constrained`.
"constrained-checked" is "checked" with every answer, greedy and sampled, decoded that way.
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Callable
from dataclasses import dataclass

from xlora.science.tasks import AMINO, Item, canonical, formula_of, net_charge, yes_no

DECODINGS = ("greedy", "checked", "constrained", "constrained-checked")
_NUM = r"([-+]?\d+(?:\.\d+)?)"


@dataclass
class DecodeOptions:
    """Greedy, or greedy plus `samples` sampled answers combined per task (module docstring)."""

    mode: str = "greedy"
    samples: int = 8
    temperature: float = 0.8
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in DECODINGS:
            raise ValueError(f"decoding: expected one of {', '.join(DECODINGS)}, got {self.mode!r}")
        if self.mode.endswith("checked") and self.samples < 1:
            raise ValueError(f"decoding: checked decoding needs samples >= 1, got {self.samples}")
        if not self.temperature > 0:
            raise ValueError(f"decoding: temperature must be > 0, got {self.temperature}")


def _numbers(word: str, answers: list[str]) -> list[float]:
    return [float(m.group(1)) for a in answers if (m := re.search(word + r"\s*" + _NUM, a))]


def _design_checks(task: str, item: Item) -> list[Callable[[str], bool]]:
    """A design prompt's own constraints, all of them first, then the first alone ([] for other prompts)."""
    if task == "molecule-design":
        asked = re.search(r"formula\s+([A-Za-z0-9]+)", item.prompt)
        if asked is None:
            return []

        def molecule(answer: str) -> str | None:  # the canonical SMILES of the answer, or None
            smiles = answer.strip().split()[0] if answer.strip() else ""
            return canonical(smiles) if smiles else None

        def molecule_ok(answer: str) -> bool:
            can = molecule(answer)
            return can is not None and formula_of(can) == asked.group(1)

        return [molecule_ok, lambda answer: molecule(answer) is not None]
    if task == "peptides":
        asked = re.search(r"length\s+(\d+)\s+with net charge\s+([-+]?\d+)", item.prompt)
        if asked is None:
            return []
        length, charge = int(asked.group(1)), int(asked.group(2))

        def peptide(answer: str) -> str:  # the answer's letters when they are all amino acids, else ""
            seq = "".join(ch for ch in answer.strip().split()[0] if ch.isalpha()) if answer.strip() else ""
            return seq if set(seq) <= AMINO else ""

        def peptide_ok(answer: str) -> bool:
            seq = peptide(answer)
            return bool(seq) and len(seq) == length and abs(net_charge(seq) - charge) <= 1.0

        return [peptide_ok, lambda answer: bool(peptide(answer)) and len(peptide(answer)) == length]
    return []


def combine(task: str, item: Item, answers: list[str]) -> str:
    """One answer from the greedy answer (`answers[0]`) and the sampled ones (module docstring)."""
    if not answers:
        raise ValueError("combine: no answers (the greedy answer comes first)")
    greedy = answers[0]
    checks = _design_checks(task, item)
    for check in checks:  # all the prompt's constraints met; failing that, its first one
        if (found := next((a for a in answers if check(a)), None)) is not None:
            return found
    if checks:
        return greedy
    if task == "molecule-properties":
        gaps, dipoles = _numbers("gap", answers), _numbers("dipole", answers)
        if not gaps or not dipoles:
            return greedy
        return f"gap {statistics.median(gaps):.2f} eV; dipole {statistics.median(dipoles):.2f} D"
    if task == "peptides":
        votes = [v for a in answers if (v := yes_no("antimicrobial", a))]
        charges = _numbers("charge", answers)
        if not votes or not charges:
            return greedy
        yes, no = votes.count("yes"), votes.count("no")
        label = ("yes" if yes > no else "no") if yes != no else votes[0]
        return f"antimicrobial: {label}; charge {statistics.median(charges):+.1f}"
    if task == "molecule-thermo":
        cvs, zpves = _numbers("Cv", answers), _numbers("ZPVE", answers)
        if not cvs or not zpves:
            return greedy
        return f"Cv {statistics.median(cvs):.2f} cal/mol K; ZPVE {statistics.median(zpves):.2f} eV"
    if task == "anticancer":
        votes = [v for a in answers if (v := yes_no("anticancer", a))]
        if not votes:
            return greedy
        yes, no = votes.count("yes"), votes.count("no")
        return f"anticancer: {('yes' if yes > no else 'no') if yes != no else votes[0]}"
    return greedy


def decode_answers(
    model, tok, task: str, items: list[Item], max_new_tokens: int, opts: DecodeOptions, batch_size: int = 8
) -> list[str]:
    """Answers to `items` under `opts`: greedy, or greedy and `opts.samples` samples combined per item."""
    from functools import partial

    from xlora.science.eval.evaluate import generate_answers

    generate = generate_answers
    if opts.mode.startswith("constrained"):
        from xlora.science.eval.constrained import TokenTable, generate_constrained

        generate = partial(generate_constrained, table=TokenTable(tok))
    greedy = generate(model, tok, items, max_new_tokens, batch_size)
    if not opts.mode.endswith("checked"):
        return greedy
    repeated = [it for it in items for _ in range(opts.samples)]  # each prompt `samples` times, adjacent
    sampled = generate(
        model, tok, repeated, max_new_tokens, max(batch_size, min(64, batch_size * opts.samples)), do_sample=True,
        temperature=opts.temperature, seed=opts.seed,
    )  # fmt: skip
    n = opts.samples
    return [combine(task, it, [greedy[i], *sampled[i * n : (i + 1) * n]]) for i, it in enumerate(items)]
