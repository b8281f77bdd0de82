"""Two checkpoints over the same experts, paired on the same test items: is one gate better?

For every task's test set in `--test-dir`, both X-LoRA models are scored (every metric with its 95 %
bootstrap interval) and checkpoint A minus checkpoint B is given as a paired difference per metric;
`--retention` adds the generated arithmetic / unit-conversion questions (and the base on them).

    python experiments/compare_checkpoints.py --a models/xlora-science --b shipped \\
        --test-dir xlora-reproduce/data [--retention] [--decoding greedy] [--batch-size 32]

Backs the figures quoted in docs/science/analyses.md and docs/science/retention.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from xlora import XLoraModel
from xlora.bases.loading import load_base
from xlora.cli import checkpoint_path
from xlora.science.eval.decoding import DecodeOptions
from xlora.science.eval.evaluate import read_items
from xlora.science.eval.scorecard import EvalOptions, paired_rows, score_model
from xlora.science.recipe.config import MAX_NEW_TOKENS
from xlora.science.tasks import TASKS
from xlora.science.tasks.retention import RETENTION, retention_items


def training_smiles(path: Path) -> set[str] | None:
    if not path.is_file():
        return None
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return {r["messages"][-1]["content"] for r in rows}


def compare(models: dict, tok, task: str, items, opts: EvalOptions) -> None:
    scores = {name: score_model(m, tok, name, task, items, opts) for name, m in models.items()}
    print(f"\n## {task}: {len(items)} items\n", flush=True)
    for name, s in scores.items():
        cells = ", ".join(f"{k} {iv.estimate:.3f} [{iv.low:.3f}, {iv.high:.3f}]" for k, iv in s.intervals.items())
        print(f"- {name}: {cells}")
    a, b = scores.values()
    print("\n" + "\n".join(paired_rows(a, b, opts, "A minus B")), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--a", required=True, help="Checkpoint A (a folder, or 'shipped').")
    p.add_argument("--b", default="shipped", help="Checkpoint B.")
    p.add_argument("--test-dir", type=Path, required=True, help="Folder with the {task}-test.jsonl files.")
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--retention", action="store_true", help="Also the 200 retention questions (seed 0).")
    p.add_argument("--decoding", default="greedy")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)

    models = {}
    for label, ck in (("A", a.a), ("B", a.b)):
        base, tok = load_base("default")
        models[f"{label} ({ck})"] = XLoraModel.from_pretrained(base, checkpoint_path(Path(ck))).eval()
    if list(models.values())[0].expert_names != list(models.values())[1].expert_names:
        raise SystemExit("the two checkpoints mix different experts: nothing to pair")
    decoding = DecodeOptions(a.decoding)
    for task in [t.strip() for t in a.tasks.split(",") if t.strip()]:
        path = a.test_dir / f"{task}-test.jsonl"
        smiles = training_smiles(a.test_dir / "molecule-design-train.jsonl") if task == "molecule-design" else None
        opts = EvalOptions(MAX_NEW_TOKENS[task], batch_size=a.batch_size, decoding=decoding, train_smiles=smiles)
        compare(models, tok, task, read_items(path), opts)
    if a.retention:
        items = retention_items(200, 0)
        opts = EvalOptions(max_new_tokens=12, batch_size=a.batch_size)
        first = list(models.values())[0]
        with first.disable_experts():
            base = score_model(first, tok, "base", RETENTION, items, opts)
        print(f"\nbase on retention: {base.intervals['correct_rate']}")
        compare(models, tok, RETENTION, items, opts)


if __name__ == "__main__":
    main()
