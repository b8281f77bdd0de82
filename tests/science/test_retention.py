"""The retention set: generated questions whose answers are recomputed here from the question text,
and the scorer on hand-made answers."""

from __future__ import annotations

import re

import pytest

from xlora.science.tasks import Item, score
from xlora.science.tasks.retention import KINDS, parse_integer, retention_items, retention_outcomes

FACTORS = {("meters", "centimeters"): 100, ("kilograms", "grams"): 1000, ("hours", "minutes"): 60}
FACTORS |= {("minutes", "seconds"): 60, ("days", "hours"): 24}


def recompute(question: str) -> int:
    """The answer from the question's own words (an oracle independent of the generator)."""
    if m := re.match(r"What is (\d+) (plus|minus|times) (\d+)\?", question):
        a, op, b = int(m.group(1)), m.group(2), int(m.group(3))
        return {"plus": a + b, "minus": a - b, "times": a * b}[op]
    m = re.match(r"How many (\w+) are in (\d+) (\w+)\?", question)
    assert m, question
    return int(m.group(2)) * FACTORS[(m.group(3), m.group(1))]


def test_items_are_seeded_balanced_and_right():
    items = retention_items(40, seed=3)
    assert [it.record() for it in items] == [it.record() for it in retention_items(40, seed=3)]
    assert [it.record() for it in items] != [it.record() for it in retention_items(40, seed=4)]
    assert [it.meta["kind"] for it in items] == list(KINDS) * 10
    for it in items:
        assert it.prompt.endswith(" Answer with a number.")
        assert recompute(it.prompt) == it.meta["answer"] == int(it.answer)
    assert all(it.meta["answer"] > 0 for it in items if it.meta["kind"] == "subtract")
    with pytest.raises(ValueError, match="positive number of items"):
        retention_items(0, seed=0)


def test_parse_integer():
    assert parse_integer("The answer is 1,200 grams.") == 1200
    assert parse_integer("-5") == -5
    assert parse_integer("twelve") is None
    assert parse_integer("12. Then 13") == 12


def test_outcomes_and_score_on_hand_made_answers():
    items = [Item("retention", "q", "12", {"answer": 12, "kind": "add"}) for _ in range(4)]
    answers = ["12", "The answer is 12.", "13", "I do not know"]
    out = retention_outcomes(items, answers)
    assert out == {"correct_rate": [1.0, 1.0, 0.0, 0.0], "parsed_rate": [1.0, 1.0, 1.0, 0.0]}
    assert score("retention", items, answers) == {"correct_rate": 0.5, "parsed_rate": 0.75}
    with pytest.raises(ValueError, match="retention item 1: its meta needs an integer 'answer'"):
        retention_outcomes([Item("retention", "q", "1", {})], ["1"])
    with pytest.raises(ValueError, match="2 items but 1 answers"):
        retention_outcomes(items[:2], ["1"])
