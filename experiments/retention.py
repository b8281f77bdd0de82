"""Knowledge retention: the base, each expert, the uniform mix and X-LoRA on generated arithmetic and
unit-conversion questions (checkable integer answers), with 95 % bootstrap intervals; then each
model on the items the base answers right (what the mixture keeps of what the base knew).

    python experiments/retention.py [--checkpoint shipped] [--n 200] [--seed 0]

Backs the figures quoted in docs/science/retention.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from xlora import XLoraModel
from xlora.bases.loading import load_base
from xlora.cli import checkpoint_path
from xlora.science.eval.scorecard import EvalOptions, evaluate_checkpoint, parse_models, scorecard_table
from xlora.science.eval.stats import bootstrap_mean
from xlora.science.tasks.retention import RETENTION, retention_items


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="shipped")
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--models", help="Only these baselines with X-LoRA (comma-separated: base, uniform, expert names).")
    a = p.parse_args()
    only = parse_models(a.models) if a.models is not None else None
    torch.set_num_threads(a.threads)

    items = retention_items(a.n, a.seed)
    base, tok = load_base("default")
    model = XLoraModel.from_pretrained(base, checkpoint_path(Path(a.checkpoint)))
    opts = EvalOptions(max_new_tokens=12)
    card = evaluate_checkpoint(model, tok, RETENTION, items, opts, baselines=True, progress=print, only=only)
    print(f"\nretention, {a.n} generated questions (seed {a.seed}), greedy, chat template\n")
    print(scorecard_table(card))

    scores = {s.name: s.values["correct_rate"] for s in card.models}
    base_name = "base"
    known = [i for i, v in enumerate(scores[base_name]) if v == 1.0]
    print(f"\non the {len(known)} items the base answers right: share each model still answers right\n")
    print("| model | kept [95 % CI] |\n|---|---:|")
    for name, values in scores.items():
        kept = bootstrap_mean([values[i] for i in known], seed=a.seed)
        print(f"| {name} | {kept.estimate:.3f} [{kept.low:.3f}, {kept.high:.3f}] |")
    kinds = sorted({it.meta["kind"] for it in items})
    print("\n| model | " + " | ".join(kinds) + " |\n|---|" + "---:|" * len(kinds))
    for name, values in scores.items():
        rates = []
        for kind in kinds:
            mine = [v for it, v in zip(items, values) if it.meta["kind"] == kind]
            rates.append(f"{sum(mine) / len(mine):.2f} (n={len(mine)})")
        print(f"| {name} | " + " | ".join(rates) + " |")


if __name__ == "__main__":
    main()
