"""Does one token per residue help the peptide expert? SmolLM2's tokenizer cuts a peptide into
arbitrary pieces ("GL", "MS", "KG"); this trains a peptide expert on the same training items and
recipe with the residues space-separated (one token each) and scores it on the test set, greedy,
designs read back without the spaces. The README's "Results of the shipped run" reports it.

    python experiments/spaced_peptides.py --work <reproduce work folder> --out /tmp/spaced [--threads 2]

Backs the figures quoted in docs/science/analyses.md.
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import replace
from pathlib import Path

import torch

from xlora import XLoraModel
from xlora.bases.loading import load_base
from xlora.science.eval.evaluate import generate_answers, read_items
from xlora.science.eval.stats import bootstrap_mean
from xlora.science.recipe.pipeline import ReproduceConfig
from xlora.science.tasks import outcomes
from xlora.train import LoraOptions, train_expert
from xlora.train.data import load_dataset
from xlora.train.loop import TrainingArgs

_CLASSIFY = re.compile(r"Peptide ([A-Z]+)\. (.*)")


def spaced_prompt(prompt: str) -> str:
    """'Peptide GLF. Is it ...' -> 'Peptide G L F. Is it ...'; other prompts unchanged."""
    m = _CLASSIFY.match(prompt)
    return f"Peptide {' '.join(m.group(1))}. {m.group(2)}" if m else prompt


def spaced_training_file(src: Path, dst: Path) -> None:
    """The peptide training chats with residues spaced in classify prompts and in designed sequences."""
    rows = []
    for line in src.read_text().splitlines():
        r = json.loads(line)
        user, answer = r["messages"]
        if _CLASSIFY.match(user["content"]):
            user["content"] = spaced_prompt(user["content"])
        else:
            answer["content"] = " ".join(answer["content"])
        rows.append(json.dumps(r))
    dst.write_text("".join(x + "\n" for x in rows))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    cfg = ReproduceConfig()
    a.out.mkdir(parents=True, exist_ok=True)
    data = a.out / "peptides-train.jsonl"
    spaced_training_file(a.work / "data" / "peptides-train.jsonl", data)
    base, tok = load_base(cfg.base)
    expert = a.out / "expert"
    if not (expert / "adapter_config.json").is_file():
        args = TrainingArgs(
            output_dir=str(expert), run_dir=str(a.out / "run"), max_steps=cfg.expert_steps,
            batch_size=cfg.expert_batch_size, lr=cfg.expert_lr, warmup_steps=5, save_every=20, seed=cfg.seed,
            resume="auto",
        )  # fmt: skip
        options = LoraOptions(cfg.rank, cfg.alpha, list(cfg.targets), dropout=0.0)
        ds = load_dataset(data, tok, cfg.max_length)
        train_expert(base, ds, None, args, options, pad_token_id=tok.pad_token_id or 0)
    items = [i for i in read_items(a.work / "data" / "peptides-test.jsonl") if not i.meta.get("loss_only")]
    model = XLoraModel.from_experts(base, {"peptides": expert}).eval()
    with model.static_scalings([1.0]):
        prompts = [replace(it, prompt=spaced_prompt(it.prompt)) for it in items]
        answers = generate_answers(model, tok, prompts, 48, batch_size=32)
    answers = ["".join(x.split()) if it.meta["kind"] == "design" else x for it, x in zip(items, answers)]
    for metric, values in outcomes("peptides", items, answers).items():
        iv = bootstrap_mean([v for v in values if v is not None])
        print(f"{metric:24s} {iv.estimate:.3f} [{iv.low:.3f}, {iv.high:.3f}] n={iv.n}")


if __name__ == "__main__":
    main()
