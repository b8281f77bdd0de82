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
from dataclasses import dataclass
from typing import Any

import torch

from .tasks import AMINO, Item

SMILES_CHARS = frozenset("CNOFcnoH()[]=#-+@123456789")
_ELEMENT = {"C": "C", "c": "C", "N": "N", "n": "N", "O": "O", "o": "O", "F": "F"}
# [nH], [NH3+], [C@@H], [O-]; the optional group makes every prefix match too ("" and "N@" included)
_BRACKET = re.compile(r"^(?:([CNOcno])(@{1,2})?(H\d?)?([+-]\d?)?)?$")


@dataclass(frozen=True)
class SmilesState:
    """Where a partial SMILES stands: heavy atoms used per element, open branches and ring bonds."""

    used: tuple[int, ...]  # per element of the grammar's budget
    depth: int = 0  # open '('
    rings: frozenset[str] = frozenset()  # open ring-bond digits
    last: str = "start"  # start | atom | bond | open | close | ring
    bracket: str | None = None  # text inside an open '[', else None
    here: frozenset[str] = frozenset()  # ring-bond digits opened on the latest atom


class SmilesGrammar:
    """SMILES with exactly a formula's heavy atoms (C, N, O, F); None from `for_formula` otherwise."""

    def __init__(self, budget: dict[str, int]) -> None:
        self.elements = tuple(sorted(budget))
        self.budget = tuple(budget[e] for e in self.elements)
        self.start = SmilesState(used=(0,) * len(self.elements))
        self.alphabet = SMILES_CHARS

    @classmethod
    def for_formula(cls, formula: str) -> SmilesGrammar | None:
        parts = re.findall(r"([A-Z][a-z]?)(\d*)", formula)
        if not parts or "".join(e + n for e, n in parts) != formula:
            return None
        budget = {e: int(n or 1) for e, n in parts if e != "H"}
        if not budget or set(budget) - set(_ELEMENT.values()):
            return None  # an element this grammar does not write (QM9 has C, N, O, F only)
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
        return SmilesState(used, s.depth, s.rings, "atom", None)

    def step(self, s: SmilesState, ch: str) -> SmilesState | None:
        """The state after one more character, or None where the text leaves the grammar."""
        if s.bracket is not None:
            if ch == "]":
                m = _BRACKET.match(s.bracket)
                if not m or not m.group(1):
                    return None
                return self._atom(SmilesState(s.used, s.depth, s.rings, s.last), _ELEMENT[m.group(1)])
            text = s.bracket + ch  # every prefix of a valid bracket atom matches the same pattern
            if not _BRACKET.match(text) or (not s.bracket and self._atom(s, _ELEMENT[ch]) is None):
                return None  # (its element must be one the formula still has)
            return SmilesState(s.used, s.depth, s.rings, s.last, text)
        after_atom = s.last in ("atom", "ring", "close")
        if ch in _ELEMENT:
            return self._atom(s, _ELEMENT[ch])
        if ch == "[":
            return SmilesState(s.used, s.depth, s.rings, s.last, "") if self.remaining(s) >= 1 else None
        if ch in "=#-":  # a bond needs an atom (or a ring closure) after it
            ok = s.last in ("atom", "ring", "close", "open") and self.remaining(s) >= 1
            return SmilesState(s.used, s.depth, s.rings, "bond", None, s.here) if ok else None
        if ch == "(":
            ok = after_atom and self.remaining(s) >= 1
            return SmilesState(s.used, s.depth + 1, s.rings, "open") if ok else None
        if ch == ")":
            ok = s.depth > 0 and after_atom
            return SmilesState(s.used, s.depth - 1, s.rings, "close") if ok else None
        if ch.isdigit():
            if s.last not in ("atom", "ring", "bond"):
                return None
            if ch in s.here:  # opened on this very atom: closing it here is no bond
                return None
            if ch in s.rings:  # closes a ring bond
                return SmilesState(s.used, s.depth, s.rings - {ch}, "ring", None, s.here)
            if s.last == "bond" or self.remaining(s) < 2:  # a new ring needs two more atoms to close on
                return None
            return SmilesState(s.used, s.depth, s.rings | {ch}, "ring", None, s.here | {ch})
        return None  # 'H', '@', '+' outside brackets

    def can_end(self, s: SmilesState) -> bool:
        done = s.used == self.budget and s.depth == 0 and not s.rings and s.bracket is None
        return done and s.last in ("atom", "ring", "close")


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


Grammar = SmilesGrammar | PeptideGrammar


def grammar_for(item: Item) -> Grammar | None:
    """The grammar a design prompt states, or None (not a design prompt: decoded unconstrained)."""
    if item.task == "molecule-design":
        m = re.search(r"formula\s+([A-Za-z0-9]+)", item.prompt)
        return SmilesGrammar.for_formula(m.group(1)) if m else None
    if item.task == "peptides":
        m = re.search(r"length\s+(\d+)\s+with net charge", item.prompt)
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
    """The vocabulary's token texts, and per grammar alphabet the tokens made only of its characters."""

    def __init__(self, tok) -> None:
        self.texts = [tok.decode([i]) for i in range(len(tok))]
        self._by_alphabet: dict[frozenset, list[int]] = {}

    def candidates(self, alphabet: frozenset) -> list[int]:
        if alphabet not in self._by_alphabet:
            self._by_alphabet[alphabet] = [i for i, t in enumerate(self.texts) if t and set(t) <= alphabet]
        return self._by_alphabet[alphabet]


def grammar_mask(table: TokenTable, grammar: Grammar, state, eos: list[int], vocab: int, memo: dict) -> torch.Tensor:
    """`[V]` bool: the tokens allowed after `state` (end of turn only where the answer is complete;
    if nothing is allowed, which the grammar avoids, end of turn)."""
    key = (grammar.key(), state)
    if key not in memo:
        mask = torch.zeros(vocab, dtype=torch.bool)
        allowed = [i for i in table.candidates(grammar.alphabet) if advance(grammar, state, table.texts[i]) is not None]
        mask[allowed] = True
        if grammar.can_end(state) or not allowed:
            mask[eos] = True
        memo[key] = mask
    return memo[key]


def constrained_sampler(
    table: TokenTable, grammars: list[Grammar | None], prompt_len: int, eos: list[int], base_sample: Callable
) -> Callable:
    """A generation sampler (`xlora.generation.iter_generate`) that masks each row's logits to its
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
                state = advance(grammar, state, table.texts[t])
            if state is None:  # cannot happen for tokens this sampler chose; be safe: end the answer
                state = grammar.start
            mask = grammar_mask(table, grammar, state, eos, logits.shape[-1], memo).to(logits.device)
            logits[b, ~mask[: logits.shape[-1]]] = float("-inf")
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
    from ..generation import SamplingOptions, default_sampler, iter_generate
    from .evaluate import encode_prompts

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
