"""A first protein-structure expert on the embedded SmolLM2, against the bars of the proteins page:
forward (helix / strand content, SCOP class) and design (valid, the ridge oracle's helix content
within 15 points of the target), on held-out SCOPe domains split by homology, 95 % intervals.

    python experiments/protein_structure_expert.py --work xlora-protein-expert [--steps 150] [--n-test 100]

Writes `<work>/data` (`xlora make-protein-data`), trains `<work>/expert` (`xlora train-expert`),
and prints and writes `<work>/result.json`. One run, one seed: an anecdote about what a small base
learns in a few minutes of CPU training, not a tuned result.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

from xlora import XLoraModel
from xlora.bases.loading import load_base
from xlora.science.eval.evaluate import generate_answers, read_items
from xlora.science.eval.stats import bootstrap_mean
from xlora.science.proteins.datasets import helix_oracle, homology_split
from xlora.science.proteins.scope import load_domains
from xlora.science.tasks.proteins import STRUCTURE, design_outcomes, forward_outcomes


def interval(values: list) -> dict:
    kept = [v for v in values if v is not None]
    i = bootstrap_mean(kept) if kept else None
    return {
        "n": len(kept),
        "of": len(values),
        **({} if i is None else {"mean": i.estimate, "low": i.low, "high": i.high}),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--n-train", type=int, default=2000)
    p.add_argument("--n-test", type=int, default=100)
    args = p.parse_args()
    data, expert = args.work / "data", args.work / "expert"
    cli = [sys.executable, "-m", "xlora.cli"]
    if not (data / f"{STRUCTURE}-test.jsonl").is_file():
        subprocess.run([*cli, "make-protein-data", "--out", str(data), "--n-structure-train", str(args.n_train),
                        "--n-structure-test", str(args.n_test)], check=True)  # fmt: skip
    if not (expert / "adapter_config.json").is_file():
        subprocess.run([*cli, "train-expert", "--data", str(data / f"{STRUCTURE}-train.jsonl"), "--out", str(expert),
                        "--steps", str(args.steps), "--batch-size", "8", "--max-length", "256", "--lr", "2e-3",
                        "--targets", "q_proj,v_proj,o_proj,gate_proj", "--precision", "bf16"], check=True)  # fmt: skip
    base, tok = load_base("default")
    model = XLoraModel.from_experts(base, {"structure": expert})
    items = read_items(data / f"{STRUCTURE}-test.jsonl")
    forward = [it for it in items if it.meta["kind"] == "forward"]
    design = [it for it in items if it.meta["kind"] == "design"]
    domains = load_domains()
    split = homology_split(domains, [d.sequence for d in domains], 0.2, seed=0, groups=[d.superfamily for d in domains])
    oracle = helix_oracle(split.train)  # the same split make-protein-data drew from (seed 0)
    with torch.no_grad(), model.static_scalings([1.0]):  # the expert alone, as a plain LoRA
        fwd_answers = generate_answers(model, tok, forward, max_new_tokens=32, batch_size=16)
        des_answers = generate_answers(model, tok, design, max_new_tokens=300, batch_size=16)
    fwd = forward_outcomes(STRUCTURE, forward, fwd_answers)
    des = design_outcomes(STRUCTURE, design, des_answers, oracle)
    result = {
        "steps": args.steps,
        "forward": {k: interval(v) for k, v in fwd.items()},
        "design": {k: interval(v) for k, v in des.items()},
        "examples": list(zip([it.prompt[:60] for it in forward[:3]], fwd_answers[:3])),
    }
    text = json.dumps(result, indent=1)
    print(text)
    (args.work / "result.json").write_text(text + "\n")


if __name__ == "__main__":
    main()
