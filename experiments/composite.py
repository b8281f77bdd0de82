"""The paper's claim head-on: a task whose answer needs two experts (a molecule's formula and its
HOMO-LUMO gap), scored for the base, each single expert, the uniform mix and X-LoRA with the existing
gate (zero-shot), with 95 % bootstrap intervals and X-LoRA minus the best expert (paired); with
`--work`, also X-LoRA with a gate trained on the reproduce run's gate data plus `--n-train` composite
examples (same experts, same recipe, one pass over the larger set), paired against the zero-shot gate.

    python experiments/composite.py [--checkpoint shipped] [--n 100] [--test-ids DIR/test-ids.json]
        [--work /tmp/sci-work --n-train 320]

Molecules come from QM9 rows no expert, gate or held-out/test set used (the checkpoint's manifest,
plus `--test-ids` from `xlora make-test-sets`). Also prints the routing along one X-LoRA answer:
per generated token, the mean scaling of each expert over the adapted modules.

Backs the figures quoted in docs/science/composite.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from xlora import XLoraModel
from xlora.bases.loading import load_base
from xlora.cli import checkpoint_path
from xlora.core.generation import SamplingOptions, iter_generate
from xlora.science.eval.scorecard import EvalOptions, evaluate_checkpoint, paired_rows, parse_models, scorecard_table
from xlora.science.eval.testsets import manifest_ids, used_ids
from xlora.science.recipe.extra_gate import train_gate_plus
from xlora.science.tasks.composite import COMPOSITE, composite_items
from xlora.science.tasks.datasets import load_qm9


def routing_along(model, tok, prompt: str, max_new_tokens: int = 32) -> list[str]:
    """Markdown rows: generated token, then each expert's mean scaling over the adapted modules."""
    chat = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    ids = tok(chat, return_tensors="pt", add_special_tokens=False)["input_ids"]
    opts = SamplingOptions(max_new_tokens=max_new_tokens, eos_token_id=tok.eos_token_id)
    rows = ["| token | " + " | ".join(model.expert_names) + " |", "|---|" + "---:|" * model.n_experts]
    for step in iter_generate(model, ids, None, opts):
        weights = step.scalings[0].float().mean(0)  # [N], mean over adapted modules
        text = tok.decode(step.tokens[:1]).replace("|", "\\|").replace("\n", "\\n")
        rows.append(f"| `{text}` | " + " | ".join(f"{w:.2f}" for w in weights.tolist()) + " |")
        if bool(step.finished[0]):
            break
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="shipped")
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--test-ids", type=Path, help="test-ids.json of `xlora make-test-sets` (also excluded).")
    p.add_argument("--out", type=Path, help="Write the items as JSONL here (for the record).")
    p.add_argument("--work", type=Path, help="A reproduce work folder (data/gate-train.jsonl): train a gate.")
    p.add_argument("--n-train", type=int, default=320, help="Composite examples added to the gate data.")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--models", help="Only these baselines with X-LoRA (comma-separated: base, uniform, expert names).")
    a = p.parse_args()
    only = parse_models(a.models) if a.models is not None else None
    torch.set_num_threads(a.threads)

    checkpoint = checkpoint_path(Path(a.checkpoint))
    ids, seed = manifest_ids(checkpoint)
    used = {str(i) for i in used_ids(ids)[0]}
    if a.test_ids:
        test = json.loads(a.test_ids.read_text())
        used |= {str(i) for k, v in test.items() if k.startswith("qm9") for i in v}
    molecules = load_qm9()
    items = composite_items(molecules, used, a.n, seed + 7919)
    train_items = composite_items(molecules, used | {it.meta["id"] for it in items}, a.n_train, seed + 104729)
    if a.out:
        a.out.write_text("".join(json.dumps(it.record()) + "\n" for it in items))

    base, tok = load_base("default")
    model = XLoraModel.from_pretrained(base, checkpoint)
    opts = EvalOptions(max_new_tokens=32)
    card = evaluate_checkpoint(model, tok, COMPOSITE, items, opts, baselines=True, progress=print, only=only)
    print(f"\ncomposite task, {a.n} unseen QM9 molecules, zero-shot (no expert or gate saw this format)\n")
    print(scorecard_table(card))
    print(f"\nrouting along one X-LoRA answer: {items[0].prompt} (reference: {items[0].answer})\n")
    print("\n".join(routing_along(model, tok, items[0].prompt)))
    if a.work is None:
        return
    gate = train_gate_plus(a.work, checkpoint, train_items, "composite-gate")
    experts = {n: checkpoint / n for n in model.expert_names}
    trained = XLoraModel.from_pretrained(model.unload(), gate, adapters=experts)
    card2 = evaluate_checkpoint(trained, tok, COMPOSITE, items, opts, baselines=False, progress=print)
    print(f"\nX-LoRA with the gate also trained on {a.n_train} composite examples (molecules disjoint from these)\n")
    print(scorecard_table(card2))
    print("\n" + "\n".join(paired_rows(card2.models[-1], card.models[-1], opts, "composite-trained minus zero-shot")))
    print("\nrouting along the same answer, composite-trained gate\n")
    print("\n".join(routing_along(trained, tok, items[0].prompt)))


if __name__ == "__main__":
    main()
