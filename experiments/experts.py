"""Each single expert on its own task's test set, greedy and sample-and-check decoding, with 95 %
bootstrap intervals and the always-the-training-mean baseline: the figures behind the README's
"What moved the experts" (issue 14's targets: gap MAE <= 0.45 eV, valid SMILES >= 0.9 with exact
formula >= 0.5, AMP accuracy >= 0.85, peptide design satisfied >= 0.5).

    python experiments/experts.py --work <reproduce work folder> [--experts <folder>] [--limit N]

`--experts` defaults to `<work>/experts`; the test sets are the work folder's `{task}-test.jsonl`
(disjoint from everything the experts and the gate saw).

Backs the figures quoted in docs/science/analyses.md.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path

import torch

from xlora import XLoraModel
from xlora.bases.loading import load_base
from xlora.science.eval.decoding import DecodeOptions
from xlora.science.eval.evaluate import read_items
from xlora.science.eval.scorecard import EvalOptions, score_model
from xlora.science.eval.stats import bootstrap_mean
from xlora.science.recipe.config import MAX_NEW_TOKENS
from xlora.science.tasks import TASKS, mean_baseline


def mean_baseline_interval(task: str, items, train_file: Path) -> dict[str, str]:
    """Always answering the training mean: MAE with its interval, per numeric metric."""
    answers = [json.loads(x)["messages"][-1]["content"] for x in train_file.read_text().splitlines() if x.strip()]
    out = {}
    for metric, word in {"gap_mae_ev": "gap", "dipole_mae_d": "dipole", "charge_mae": "charge"}.items():
        if metric not in mean_baseline(task, items, answers):
            continue
        values = [float(m.group(1)) for a in answers if (m := re.search(word + r"\s*([-+]?\d+(?:\.\d+)?)", a))]
        mean = statistics.fmean(values)
        scored = [it for it in items if not it.meta.get("loss_only") and it.meta.get("kind", "classify") == "classify"]
        errors = [abs(mean - it.meta[word]) for it in scored]  # the items whose answers are generated
        iv = bootstrap_mean(errors)
        out[metric] = f"{iv.estimate:.3f} [{iv.low:.3f}, {iv.high:.3f}] n={iv.n}"
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--experts", type=Path, default=None)
    p.add_argument("--tasks", nargs="+", default=list(TASKS))
    p.add_argument("--decodings", nargs="+", default=["greedy", "checked"])
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--limit", type=int, default=None, help="only the first N test records (a quick look)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    experts = a.experts or a.work / "experts"
    data = a.work / "data"
    base, tok = load_base("default")
    for task in a.tasks:
        items = read_items(data / f"{task}-test.jsonl")[: a.limit]
        model = XLoraModel.from_experts(base, {task: experts / task}).eval()
        print(f"\n## expert {task} on {len(items)} test items ({experts / task})", flush=True)
        for metric, cell in mean_baseline_interval(task, items, data / f"{task}-train.jsonl").items():
            print(f"always the training mean: {metric} {cell}")
        for mode in a.decodings:
            opts = EvalOptions(MAX_NEW_TOKENS[task], batch_size=a.batch_size, decoding=DecodeOptions(mode, a.samples))
            with model.static_scalings([1.0]):
                s = score_model(model, tok, f"expert {task}", task, items, opts)
            for metric, iv in s.intervals.items():
                if mode != "greedy" and metric == "eval_loss":
                    continue  # the loss does not depend on decoding
                print(f"{mode:8s} {metric:24s} {iv.estimate:.3f} [{iv.low:.3f}, {iv.high:.3f}] n={iv.n}", flush=True)
        base = model.unload()


if __name__ == "__main__":
    main()
