"""Knowledge retention: does the mixture keep what the base model knew?

Generated questions with one checkable integer answer (arithmetic and unit conversions) that a
135M instruct model gets partly right. Scored for the base, each expert, the uniform mix and
X-LoRA; `experiments/retention.py` also reports each model on the items the base answers right.
"""

from __future__ import annotations

import random
import re

from xlora.science.tasks.item import Item

RETENTION = "retention"
KINDS = ("add", "subtract", "multiply", "convert")
_UNITS = (  # (from, to, factor, largest amount asked)
    ("meters", "centimeters", 100, 20),
    ("kilograms", "grams", 1000, 9),
    ("hours", "minutes", 60, 12),
    ("minutes", "seconds", 60, 12),
    ("days", "hours", 24, 7),
)
_INT = re.compile(r"-?\d[\d,]*")


def _question(kind: str, rng: random.Random) -> tuple[str, int]:
    if kind == "add":
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        return f"What is {a} plus {b}?", a + b
    if kind == "subtract":
        a = rng.randint(20, 99)
        b = rng.randint(1, a - 1)
        return f"What is {a} minus {b}?", a - b
    if kind == "multiply":
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        return f"What is {a} times {b}?", a * b
    src, dst, factor, top = rng.choice(_UNITS)
    n = rng.randint(2, top)
    return f"How many {dst} are in {n} {src}?", n * factor


def retention_items(n: int, seed: int) -> list[Item]:
    """`n` questions, the kinds in turn, drawn with `seed`; answers are bare integers."""
    if n < 1:
        raise ValueError(f"retention: expected a positive number of items, got {n}")
    rng = random.Random(seed)
    items = []
    for i in range(n):
        kind = KINDS[i % len(KINDS)]
        question, answer = _question(kind, rng)
        items.append(
            Item(RETENTION, f"{question} Answer with a number.", str(answer), {"answer": answer, "kind": kind})
        )
    return items


def parse_integer(answer: str) -> int | None:
    """The first integer in an answer ("1,200" reads as 1200), None when there is none."""
    m = _INT.search(answer)
    return int(m.group(0).replace(",", "")) if m else None


_ASKED = re.compile(r"What is (\d+) (?:plus|minus|times) (\d+)\?|How many \w+ are in (\d+) (\w+)\?")
_OPERATOR = r"\s*(?:plus|\+|minus|-|\u2212|times|multiplied by|\*|x|\u00d7)\s*"


def strip_restatement(prompt: str, answer: str) -> str:
    """`answer` without its restatements of the question ("4 * 6 = 24" -> " = 24", "3 kilograms is
    3000 grams" -> " is 3000 grams"): small models open with the question's own numbers, which are not
    their answer. A prompt not in the generated form leaves the answer as it is."""
    m = _ASKED.match(prompt)
    if m is None:
        return answer
    if m.group(1) is not None:
        echo = rf"(?<![\d.]){m.group(1)}{_OPERATOR}{m.group(2)}(?![\d.])"
    else:
        unit = re.escape(m.group(4).removesuffix("s"))
        echo = rf"(?<![\d.]){m.group(3)}\s*{unit}s?\b"
    return re.sub(echo, " ", answer, flags=re.IGNORECASE)


def retention_outcomes(items: list[Item], answers: list[str]) -> dict[str, list[float | None]]:
    """Per item: right (0/1: the first integer of the answer, after any restatement of the question's
    numbers is dropped, is the answer) and whether one parsed."""
    if len(items) != len(answers):
        raise ValueError(f"retention: {len(items)} items but {len(answers)} answers")
    right: list[float | None] = []
    parsed: list[float | None] = []
    for n, (it, a) in enumerate(zip(items, answers), start=1):
        if not isinstance(it.meta.get("answer"), int):
            raise ValueError(f"retention item {n}: its meta needs an integer 'answer', got {it.meta.get('answer')!r}")
        got = parse_integer(strip_restatement(it.prompt, a))
        right.append(float(got == it.meta["answer"]))
        parsed.append(float(got is not None))
    return {"correct_rate": right, "parsed_rate": parsed}
