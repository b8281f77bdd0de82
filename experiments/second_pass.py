"""Is one pass over the data what holds an expert back? Continue a trained expert for a second pass
over its own training file (same batch size and learning rate, a fresh warm-up and optimizer), then
probe a peptide expert's antimicrobial yes/no: the logit of " yes" minus " no" right after
"antimicrobial:" on the test set's classification items, as accuracy and ROC AUC.

    python experiments/second_pass.py --work <reproduce work folder> --task peptides --out DIR

Backs the figures quoted in docs/science/analyses.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from xlora.bases.loading import load_base
from xlora.science.eval.evaluate import read_items
from xlora.science.recipe.pipeline import ReproduceConfig
from xlora.train.data import load_dataset
from xlora.train.loop import Trainer, TrainingArgs


def continue_training(base, tok, expert: Path, data: Path, out: Path, cfg: ReproduceConfig) -> Path:
    """`expert` trained `cfg.expert_steps` more steps on `data`; saved (PEFT format) at out/expert."""
    from peft import PeftModel

    target = out / "expert"
    if (target / "adapter_config.json").is_file():
        return target
    model = PeftModel.from_pretrained(base, expert, is_trainable=True)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    args = TrainingArgs(
        output_dir=str(target), run_dir=str(out / "run"), max_steps=cfg.expert_steps,
        batch_size=cfg.expert_batch_size, lr=cfg.expert_lr, warmup_steps=5, save_every=20, seed=cfg.seed + 1,
        resume="auto",
    )  # fmt: skip
    ds = load_dataset(data, tok, cfg.max_length)
    Trainer(
        model,
        trainable,
        ds,
        None,
        args,
        tok.pad_token_id or 0,
        identity={"kind": "second pass"},
        answer_logits_only=True,
    ).fit()
    model.save_pretrained(target)
    model.unload()
    return target


@torch.no_grad()
def amp_probe(base, tok, expert: Path, test: Path) -> tuple[float, float, int]:
    """(accuracy at logit difference 0, ROC AUC, n) of the yes/no decision on classification items."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(base, expert).eval()
    yes, no = (tok(w, add_special_tokens=False).input_ids[0] for w in (" yes", " no"))
    scores, labels = [], []
    for it in read_items(test):
        if it.meta.get("kind") != "classify" or it.meta.get("loss_only"):
            continue
        chat = tok.apply_chat_template(
            [{"role": "user", "content": it.prompt}], tokenize=False, add_generation_prompt=True
        )
        ids = tok(chat + "antimicrobial:", return_tensors="pt", add_special_tokens=False).input_ids
        logits = model(input_ids=ids).logits[0, -1]
        scores.append(float(logits[yes] - logits[no]))
        labels.append(bool(it.meta["antimicrobial"]))
    model.unload()
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    auc = sum((p > q) + 0.5 * (p == q) for p in pos for q in neg) / (len(pos) * len(neg))
    acc = sum((s > 0) == y for s, y in zip(scores, labels)) / len(scores)
    return acc, auc, len(scores)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--task", default="peptides")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    cfg = ReproduceConfig()
    base, tok = load_base(cfg.base)
    first = a.work / "experts" / a.task
    second = continue_training(base, tok, first, a.work / "data" / f"{a.task}-train.jsonl", a.out, cfg)
    if a.task == "peptides":
        for name, path in (("one pass", first), ("two passes", second)):
            acc, auc, n = amp_probe(base, tok, path, a.work / "data" / "peptides-test.jsonl")
            print(f"{name}: AMP accuracy {acc:.3f}, AUC {auc:.3f} (n={n})", flush=True)


if __name__ == "__main__":
    main()
