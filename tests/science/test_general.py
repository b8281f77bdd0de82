"""General prompts for the gate (xlora.science.tasks.general) and the paired rows comparing two models."""

from __future__ import annotations

import pytest

from xlora.science.eval.scorecard import EvalOptions, ModelScore, paired_rows
from xlora.science.tasks.general import TEMPLATES, agreement, base_answered, general_prompts
from xlora.science.tasks.retention import retention_items


def test_prompts_are_seeded_distinct_and_exclusions_hold():
    train = general_prompts(320, 0)
    assert len(set(train)) == 320 and train == general_prompts(320, 0) and train != general_prompts(320, 1)
    held = general_prompts(100, 1, exclude=set(train))
    assert not set(held) & set(train)
    # every template is used, and none shares a question with the retention set (transfer, not recall)
    starts = [t.split("{")[0] for t in TEMPLATES]
    assert all(sum(p.startswith(s) for p in train) >= 15 for s in starts)
    retention = {it.prompt for it in retention_items(200, 0)}
    assert not retention & set(train + held)
    with pytest.raises(ValueError, match="general prompts: expected 1.."):
        general_prompts(10_000, 0)


def test_base_answered_and_agreement():
    items = base_answered(["a?", "b?"], ["Apple  pie", "no"])
    assert [it.answer for it in items] == ["Apple  pie", "no"] and items[0].task == "general"
    assert agreement(items, ["apple pie", "yes"]) == [1.0, 0.0]  # whitespace and case do not count
    with pytest.raises(ValueError, match="2 prompts but 1 answers"):
        base_answered(["a?", "b?"], ["x"])


def test_paired_rows_are_a_minus_b_on_the_same_items():
    from xlora.science.eval.stats import Interval

    def score(values, losses):
        nan = Interval(0.0, 0.0, 0.0, 0)
        return ModelScore("m", {"correct_rate": values, "eval_loss": losses}, {"correct_rate": nan}, [1] * len(losses))

    a = score([1.0, 1.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0])
    b = score([0.0, 1.0, 0.0, 0.0], [2.0, 2.0, 2.0, 2.0])
    rows = paired_rows(a, b, EvalOptions(resamples=200), "a minus b")
    assert rows[0] == "| metric | a minus b [95 % CI] | n |"
    correct = next(r for r in rows if r.startswith("| correct_rate"))
    assert correct.split("|")[2].strip().startswith("+0.500") and correct.split("|")[3].strip() == "4"
    loss = next(r for r in rows if r.startswith("| eval_loss"))
    assert loss.split("|")[2].strip() == "-1.000 [-1.000, -1.000]"
