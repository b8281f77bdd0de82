"""General-ability prompts for the gate: everyday word and knowledge questions, answered by the base.

A gate that only sees science prompts has nothing to teach it to leave a general question to the
base (README, "Knowledge retention"). These prompts, with the base model's own greedy answers as
targets, are what a gate can learn that from; `xlora reproduce` adds them to the gate data since
v0.9 (`ReproduceConfig.gate_general`). They share no template with the retention questions
(arithmetic and unit conversions), so a retention gain measured on those is transfer, not recall.
"""

from __future__ import annotations

import random

from xlora.science.tasks.item import Item

GENERAL = "general"
WORDS = (
    "apple", "river", "garden", "window", "pencil", "mountain", "basket", "candle", "doctor", "forest",
    "guitar", "island", "jacket", "kitchen", "ladder", "market", "needle", "orange", "pocket", "rabbit",
    "saddle", "teacher", "umbrella", "village", "wallet", "yellow", "bridge", "castle", "dragon", "engine",
    "feather", "harbor", "library", "mirror", "planet", "silver", "thunder", "valley", "winter", "butter",
    "camera", "desert", "farmer", "hammer", "lemon", "monkey", "ocean", "pepper", "rocket", "sugar",
    "anchor", "blanket", "cookie", "dinner", "eagle", "flower", "glove", "honey", "iron", "jungle",
    "kettle", "lantern", "meadow", "napkin", "oyster", "parrot", "quarter", "ribbon", "shadow", "tiger",
    "violin", "wagon", "bottle", "cotton", "button", "cherry", "pillow", "spider", "tunnel", "marble",
)  # fmt: skip
THINGS = (
    "the sky on a clear day", "grass", "snow", "a ripe banana", "coal", "a fire truck", "the sun",
    "milk", "a lemon", "an orange", "a crow", "chocolate", "the sea", "a strawberry", "a cloud",
)  # fmt: skip
TEMPLATES = (
    "Spell the word {w} backwards.",
    "Write the word {w} in capital letters.",
    "What is the first letter of the word {w}?",
    "Give a word that rhymes with {w}.",
    "Use the word {w} in a short sentence.",
    "What is the plural of {w}?",
    "What colour is {t}?",
)


def general_prompts(n: int, seed: int, exclude: set[str] = frozenset()) -> list[str]:
    """`n` distinct prompts, templates in turn, words drawn with `seed`; none of `exclude`."""
    space = len(WORDS) * (len(TEMPLATES) - 1) + len(THINGS)
    if not 1 <= n <= space - len(exclude):
        raise ValueError(f"general prompts: expected 1..{space - len(exclude)}, got {n}")
    rng = random.Random(seed)
    out: list[str] = []
    seen = set(exclude)
    i = 0
    while len(out) < n:
        template = TEMPLATES[i % len(TEMPLATES)]
        i += 1
        prompt = template.format(w=rng.choice(WORDS), t=rng.choice(THINGS))
        if prompt not in seen:
            seen.add(prompt)
            out.append(prompt)
    return out


def base_answered(prompts: list[str], answers: list[str]) -> list[Item]:
    """Items whose reference is the base model's own answer (self-distillation targets)."""
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    return [Item(GENERAL, p, a, {"base_answer": a}) for p, a in zip(prompts, answers)]


def agreement(items: list[Item], answers: list[str]) -> list[float]:
    """Per item, 1.0 when an answer equals the base's (whitespace-normalised), else 0.0."""

    def norm(s: str) -> str:
        return " ".join(s.split()).lower()

    return [float(norm(a) == norm(it.meta["base_answer"])) for it, a in zip(items, answers)]


__all__ = ["GENERAL", "agreement", "base_answered", "general_prompts"]
