"""Retention, the fix tried: a gate that also sees general prompts answered by the base itself.

(v0.8, run on the five-expert checkpoint whose gate saw science prompts only; since v0.9
`xlora reproduce` puts these prompts into the gate data itself, `--gate-general`.)

The shipped gate trains on science prompts only and keeps none of the base's arithmetic (README,
"Knowledge retention"). Here a gate with the same recipe and step budget trains on the run's gate data
plus `--n` everyday word/knowledge prompts (`xlora.science.tasks.general`) whose targets are the base
model's own greedy answers, so it can learn to leave a general question to the base. Scored against
the shipped gate, paired on the same items (95 % bootstrap intervals):

- retention (arithmetic and unit conversions, a family the general prompts never show): correct
  rate, and the share of the base's right answers kept;
- held-out general prompts: how often X-LoRA's answer equals the base's;
- every science test set in `--test-dir`: the answer loss (with `--generate`, every metric),
  general-prompt gate minus shipped gate.

    python experiments/general_gate.py --work xlora-reproduce --checkpoint models/xlora-science \\
        --test-dir xlora-reproduce/data [--n 320] [--steps 240]

Backs the figures quoted in docs/science/retention.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from xlora import XLoraModel
from xlora.bases.loading import load_base
from xlora.cli import checkpoint_path
from xlora.science.eval.evaluate import generate_answers, read_items
from xlora.science.eval.scorecard import EvalOptions, paired_rows, score_model
from xlora.science.eval.stats import bootstrap_mean, paired_difference
from xlora.science.recipe.config import MAX_NEW_TOKENS, ReproduceConfig
from xlora.science.recipe.extra_gate import train_gate_plus
from xlora.science.tasks import TASKS, Item
from xlora.science.tasks.general import agreement, base_answered, general_prompts
from xlora.science.tasks.retention import RETENTION, retention_items


def base_answers(model, tok, prompts: list[str], cache: Path) -> list[str]:
    """The base model's greedy answers to `prompts` (experts off), cached in `cache`."""
    done = json.loads(cache.read_text()) if cache.is_file() else {}
    todo = [p for p in prompts if p not in done]
    if todo:
        items = [Item("general", p, "", {}) for p in todo]
        with model.disable_experts():
            done |= dict(zip(todo, generate_answers(model, tok, items, 32, batch_size=32)))
        cache.write_text(json.dumps(done, indent=1))
    return [done[p] for p in prompts]


def interval(values: list[float], seed: int) -> str:
    iv = bootstrap_mean(values, seed=seed)
    return f"{iv.estimate:.3f} [{iv.low:.3f}, {iv.high:.3f}] (n={iv.n})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, required=True, help="The reproduce work folder (data/gate-train.jsonl).")
    p.add_argument("--checkpoint", default="shipped")
    p.add_argument("--test-dir", type=Path, help="Folder with the {task}-test.jsonl files.")
    p.add_argument("--n", type=int, default=320, help="General prompts added to the gate data.")
    p.add_argument("--n-heldout", type=int, default=100)
    p.add_argument("--steps", type=int, default=ReproduceConfig.gate_steps, help="Gate steps (the shipped budget).")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--generate", action="store_true", help="Also generate and score the test answers (slow).")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)

    ck = checkpoint_path(Path(a.checkpoint))
    base, tok = load_base("default")
    shipped = XLoraModel.from_pretrained(base, ck).eval()
    train_prompts = general_prompts(a.n, a.seed)
    held_prompts = general_prompts(a.n_heldout, a.seed + 1, exclude=set(train_prompts))
    cache = a.work / "general-base-answers.json"
    train_items = base_answered(train_prompts, base_answers(shipped, tok, train_prompts, cache))
    held_items = base_answered(held_prompts, base_answers(shipped, tok, held_prompts, cache))

    gate = train_gate_plus(a.work, ck, train_items, "general-gate", steps=a.steps)
    other, _ = load_base("default")
    general = XLoraModel.from_pretrained(other, gate, adapters={n: ck / n for n in shipped.expert_names}).eval()
    models = {"shipped gate": shipped, "general-prompt gate": general}

    print(f"\n## retention: 200 questions (seed {a.seed}), greedy, 12 new tokens\n")
    items = retention_items(200, a.seed)
    opts = EvalOptions(max_new_tokens=12, batch_size=32)
    with shipped.disable_experts():
        base_right = score_model(shipped, tok, "base", RETENTION, items, opts).values["correct_rate"]
    known = [i for i, v in enumerate(base_right) if v == 1.0]
    scores = {name: score_model(m, tok, name, RETENTION, items, opts) for name, m in models.items()}
    print(f"| model | correct | kept of the base's {len(known)} right |\n|---|---:|---:|")
    print(f"| base | {interval(base_right, a.seed)} | 1.000 |")
    for name, s in scores.items():
        values = s.values["correct_rate"]
        print(f"| X-LoRA, {name} | {interval(values, a.seed)} | {interval([values[i] for i in known], a.seed)} |")
    g, s = (scores[k].values["correct_rate"] for k in ("general-prompt gate", "shipped gate"))
    d = paired_difference(g, s, seed=a.seed)
    print(f"\ngeneral minus shipped, paired: {d.estimate:+.3f} [{d.low:+.3f}, {d.high:+.3f}]")

    print(f"\n## held-out general prompts ({len(held_items)}): answer equals the base's\n")
    for name, m in models.items():
        answers = generate_answers(m, tok, held_items, 32, batch_size=32)
        print(f"- X-LoRA, {name}: {interval(agreement(held_items, answers), a.seed)}; e.g. {answers[0]!r}")
    print(f"  (base's answer to {held_items[0].prompt!r}: {held_items[0].answer!r})")

    if a.test_dir is None:
        return
    for task in TASKS:
        path = a.test_dir / f"{task}-test.jsonl"
        if not path.is_file():
            continue
        items = read_items(path)
        if not a.generate:
            for it in items:
                it.meta["loss_only"] = True
        opts = EvalOptions(MAX_NEW_TOKENS[task], batch_size=32)
        s = {name: score_model(m, tok, name, task, items, opts) for name, m in models.items()}
        print(f"\n## {task}: {len(items)} test items\n")
        for name, score in s.items():
            cells = ", ".join(
                f"{k} {iv.estimate:.3f} [{iv.low:.3f}, {iv.high:.3f}]" for k, iv in score.intervals.items()
            )
            print(f"- {name}: {cells}")
        print()
        print("\n".join(paired_rows(s["general-prompt gate"], s["shipped gate"], opts, "general minus shipped")))


if __name__ == "__main__":
    main()
