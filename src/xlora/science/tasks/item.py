"""One prompt/answer pair of a task, and the task names."""

from __future__ import annotations

from dataclasses import dataclass

TASKS = ("molecule-properties", "molecule-design", "peptides", "molecule-thermo", "anticancer")
AMINO = set("ACDEFGHIKLMNPQRSTVWY")


@dataclass
class Item:
    """One prompt/answer pair, with what scoring needs."""

    task: str
    prompt: str
    answer: str
    meta: dict

    def record(self) -> dict:
        return {"task": self.task, "prompt": self.prompt, "completion": self.answer, "meta": self.meta}
