"""Constrained decoding for the design prompts: the answer's *form* is enforced token by token.

A design prompt states constraints a parser can hold the model to while it writes:

- molecule design ("formula C5H8N2O2"): the answer is SMILES syntax (balanced branches, every ring
  bond closed, bracket atoms well formed) with exactly the formula's heavy atoms (C, N, O, F; aromatic
  or not). Hydrogens, valences and bond orders are left to the model, so RDKit validity and the exact
  formula (its H count) still measure what the model knows.
- peptide design ("length 14 with net charge +3"): the answer is exactly that many amino-acid
  letters. The charge is left to the model, so "constraints satisfied" measures its charge knowledge.

At every step the tokens that would leave the grammar get -inf logits (end of turn only where the
answer is complete), then decoding is greedy or sampled as usual. This is `--decoding constrained`,
reported as its own rows: it measures model + decoder, not the model alone.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

from xlora.science.tasks import AMINO, Item

SMILES_CHARS = frozenset("CNOFcnoH()[]=#-+@123456789")
_ELEMENT = {"C": "C", "c": "C", "N": "N", "n": "N", "O": "O", "o": "O", "F": "F"}
# [nH], [NH3+], [C@@H], [O-]; the optional group makes every prefix match too ("" and "N@" included)
_BRACKET = re.compile(r"^(?:([CNOcno])(@{1,2})?(H\d?)?([+-]\d?)?)?$")


@dataclass(frozen=True)
class SmilesState:
    """Where a partial SMILES stands: heavy atoms used per element, the atom graph's open ends."""

    used: tuple[int, ...]  # per element of the grammar's budget
    n: int = 0  # atoms written
    cur: int = -1  # the latest atom
    parent: int = -1  # the atom `cur` is bonded to by the chain or branch (-1: none)
    attach: int = -1  # the atom the next atom, bond or branch attaches to (after ')': the branch's root)
    roots: tuple[int, ...] = ()  # open '(' branches: their root atoms
    rings: frozenset[tuple[str, int]] = frozenset()  # open ring bonds: (digit, opening atom)
    closed_here: frozenset[int] = frozenset()  # atoms `cur` got a ring bond to (no second bond to them)
    last: str = "start"  # start | atom (or a ring digit after it) | bond | bond-after-branch | open | close
    bracket: str | None = None  # text inside an open '[', else None


class SmilesGrammar:
    """SMILES with exactly a formula's heavy atoms (C, N, O, F); None from `for_formula` otherwise."""

    def __init__(self, budget: dict[str, int]) -> None:
        self.elements = tuple(sorted(budget))
        self.budget = tuple(budget[e] for e in self.elements)
        self.start = SmilesState(used=(0,) * len(self.elements))
        self.alphabet = SMILES_CHARS
        self._viable: dict[SmilesState, bool] = {}

    @classmethod
    def for_formula(cls, formula: str) -> SmilesGrammar | None:
        parts = re.findall(r"([A-Z][a-z]?)(\d*)", formula)
        if not parts or "".join(e + n for e, n in parts) != formula:
            return None
        budget: dict[str, int] = {}
        for e, n in parts:  # "CH3CH2OH" counts each element once per mention
            budget[e] = budget.get(e, 0) + int(n or 1)
        budget = {e: n for e, n in budget.items() if e != "H" and n > 0}
        if not budget or set(budget) - set(_ELEMENT.values()) or sum(budget.values()) > 64:
            return None  # nothing to write, or an element this grammar does not write (QM9: C, N, O, F)
        return cls(budget)

    def key(self) -> tuple:
        return ("smiles", self.elements, self.budget)

    def remaining(self, s: SmilesState) -> int:
        return sum(self.budget) - sum(s.used)

    def _atom(self, s: SmilesState, element: str) -> SmilesState | None:
        if element not in self.elements:
            return None
        i = self.elements.index(element)
        if s.used[i] >= self.budget[i]:
            return None
        used = s.used[:i] + (s.used[i] + 1,) + s.used[i + 1 :]
        return replace(
            s, used=used, n=s.n + 1, cur=s.n, parent=s.attach, attach=s.n, closed_here=frozenset(), last="atom",
            bracket=None,
        )  # fmt: skip

    def step(self, s: SmilesState, ch: str) -> SmilesState | None:
        """The state after one more character, or None where the text leaves SMILES syntax or the
        formula (dead ends are `viable`'s business)."""
        if s.bracket is not None:
            if ch == "]":
                m = _BRACKET.match(s.bracket)
                return self._atom(s, _ELEMENT[m.group(1)]) if m and m.group(1) else None
            text = s.bracket + ch  # every prefix of a valid bracket atom matches the same pattern
            if not _BRACKET.match(text) or (not s.bracket and self._atom(s, _ELEMENT[ch]) is None):
                return None  # (its element must be one the formula still has)
            return replace(s, bracket=text)
        if ch in _ELEMENT:
            return self._atom(s, _ELEMENT[ch])
        if ch == "[":
            return replace(s, bracket="")
        if ch in "=#-":  # a bond to the next atom, or (right after an atom) to a ring closure
            if s.last not in ("atom", "close", "open"):
                return None
            return replace(s, last="bond" if s.last == "atom" else "bond-after-branch")
        if ch == "(":
            return replace(s, roots=s.roots + (s.attach,), last="open") if s.last in ("atom", "close") else None
        if ch == ")":
            if not s.roots or s.last not in ("atom", "close"):
                return None
            return replace(s, roots=s.roots[:-1], attach=s.roots[-1], last="close")
        if ch.isdigit():
            if s.last not in ("atom", "bond") or s.cur != s.attach:  # a ring bond belongs to the latest atom
                return None
            opener = next((o for d, o in s.rings if d == ch), None)
            if opener is None:  # opens ring bond `ch` on this atom
                return replace(s, rings=s.rings | {(ch, s.cur)}, last="atom")
            if opener in (s.cur, s.parent) or opener in s.closed_here:  # no bond to itself, no second bond
                return None
            return replace(s, rings=s.rings - {(ch, opener)}, closed_here=s.closed_here | {opener}, last="atom")
        return None  # 'H', '@', '+' outside brackets

    def can_end(self, s: SmilesState) -> bool:
        done = s.used == self.budget and not s.roots and not s.rings and s.bracket is None
        return done and s.last in ("atom", "close")

    def viable(self, s: SmilesState) -> bool:
        """Whether some completion of `s` ends the answer: one is built (all atoms in a chain, closing
        ring bonds where they can, branches closed last or first), so a masked decoder never gets stuck."""
        if s not in self._viable:
            self._viable[s] = any(self._finish(s, branches_first) for branches_first in (False, True))
        return self._viable[s]

    def _finish(self, s: SmilesState | None, branches_first: bool) -> bool:
        def next_atom(s: SmilesState) -> SmilesState | None:
            element = next((e for e, u, b in zip(self.elements, s.used, self.budget) if u < b), None)
            return self._atom(s, element) if element is not None else None

        if s is not None and s.bracket is not None:
            s = next_atom(s) if s.bracket == "" else self.step(s, "]")
        for _ in range(2 * sum(self.budget) + 4):
            if s is None:
                return False
            if s.last in ("bond", "bond-after-branch", "open", "start"):
                s = next_atom(s)
                continue
            for d, _o in sorted(s.rings):  # close what can be closed on the latest atom
                s = (s.last == "atom" and self.step(s, d)) or s
            while branches_first and s.roots and not s.rings:
                s = self.step(s, ")")
            if self.remaining(s) == 0:
                break
            s = next_atom(s)
        while s is not None and s.roots:
            s = self.step(s, ")")
        return s is not None and self.can_end(s)


class PeptideGrammar:
    """Exactly `length` amino-acid letters."""

    def __init__(self, length: int) -> None:
        self.length = length
        self.start = 0
        self.alphabet = frozenset(AMINO)

    def key(self) -> tuple:
        return ("peptide", self.length)

    def step(self, n: int, ch: str) -> int | None:
        return n + 1 if ch in AMINO and n < self.length else None

    def can_end(self, n: int) -> bool:
        return n == self.length

    def viable(self, n: int) -> bool:
        return n <= self.length


Grammar = SmilesGrammar | PeptideGrammar


def grammar_for(item: Item) -> Grammar | None:
    """The grammar a design prompt states, or None (not a design prompt: decoded unconstrained)."""
    if item.task == "molecule-design":
        m = re.search(r"formula\s+([A-Za-z0-9]+)", item.prompt)
        return SmilesGrammar.for_formula(m.group(1)) if m else None
    if item.task == "peptides":
        m = re.search(r"length\s+(\d+)\s+with net charge\s+[-+]?\d+", item.prompt)  # as `decoding` reads it
        return PeptideGrammar(int(m.group(1))) if m and int(m.group(1)) > 0 else None
    return None


def advance(grammar: Grammar, state, text: str):
    """The state after `text`, or None where it leaves the grammar."""
    for ch in text:
        state = grammar.step(state, ch)
        if state is None:
            return None
    return state


class TokenTable:
    """The vocabulary's token texts as they read *inside* a text (a SentencePiece "▁C" is " C", which
    decoding the token alone would drop), and per alphabet the tokens made only of its characters."""

    def __init__(self, tok) -> None:
        anchor = tok.encode("a", add_special_tokens=False)[:1]
        lead = tok.decode(anchor)
        self.texts = [tok.decode(anchor + [i])[len(lead) :] for i in range(len(tok))]
        self._by_alphabet: dict[frozenset, list[int]] = {}

    def candidates(self, alphabet: frozenset) -> list[int]:
        if alphabet not in self._by_alphabet:
            self._by_alphabet[alphabet] = [i for i, t in enumerate(self.texts) if t and set(t) <= alphabet]
        return self._by_alphabet[alphabet]


def grammar_mask(table: TokenTable, grammar: Grammar, state, eos: list[int], vocab: int, memo: dict) -> torch.Tensor:
    """`[V]` bool: the tokens after which `state` can still be completed, and end of turn where the
    answer is complete (all False only when the tokenizer has no end-of-turn token)."""
    key = (grammar.key(), state)
    if key not in memo:
        mask = torch.zeros(vocab, dtype=torch.bool)
        for i in table.candidates(grammar.alphabet):
            if i < vocab and (after := advance(grammar, state, table.texts[i])) is not None:
                mask[i] = grammar.viable(after)
        if grammar.can_end(state):
            mask[[e for e in eos if e < vocab]] = True
        memo[key] = mask
    return memo[key]


def constrained_sampler(
    table: TokenTable, grammars: list[Grammar | None], prompt_len: int, eos: list[int], base_sample: Callable
) -> Callable:
    """A generation sampler (`xlora.core.generation.iter_generate`) that masks each row's logits to its
    grammar (rows without one are left alone), then picks with `base_sample`."""
    memo: dict = {}

    def sample(ids: torch.Tensor, logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        logits = logits.clone()
        for b, row in enumerate(rows.tolist()):
            grammar = grammars[row]
            if grammar is None:
                continue
            state = grammar.start
            for t in ids[b, prompt_len:].tolist():
                text = table.texts[t] if t < len(table.texts) else "\0"  # ids past the tokenizer: no text
                state = advance(grammar, state, text) if state is not None else None
            if state is None:  # only after a step with nothing allowed (no end-of-turn token): let it be
                continue
            mask = grammar_mask(table, grammar, state, eos, logits.shape[-1], memo).to(logits.device)
            if mask.any():
                logits[b, ~mask] = float("-inf")
        return base_sample(ids, logits, rows)

    return sample


def generate_constrained(
    model,
    tok,
    items: list[Item],
    max_new_tokens: int,
    batch_size: int = 8,
    table: TokenTable | None = None,
    **sampling: Any,
) -> list[str]:
    """Answers to `items` with each design prompt's grammar enforced (other prompts: unconstrained);
    greedy, or sampled with `sampling` (`do_sample=True, temperature=..., seed=s`; batch k seeded `s + k`)."""
    from xlora.core.generation import SamplingOptions, default_sampler, iter_generate
    from xlora.science.eval.evaluate import encode_prompts

    table = table or TokenTable(tok)
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    answers = []
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        opts = SamplingOptions(max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=tok.pad_token_id)
        if sampling:
            opts.do_sample, opts.temperature = True, sampling.get("temperature", 1.0)
            opts.seed = sampling.get("seed", 0) + start
        enc = encode_prompts(tok, chunk)
        grammars = [grammar_for(it) for it in chunk]
        pick = default_sampler(opts, model.device)
        sampler = constrained_sampler(table, grammars, enc["input_ids"].shape[1], eos, pick)
        steps = iter_generate(model, enc["input_ids"], enc["attention_mask"], opts, sampler=sampler)
        new = torch.stack([s.tokens for s in steps], dim=1)  # [b, new]
        answers += [tok.decode(row, skip_special_tokens=True).strip() for row in new]
    return answers


__all__ = ["PeptideGrammar", "SmilesGrammar", "TokenTable", "advance", "generate_constrained", "grammar_for"]
