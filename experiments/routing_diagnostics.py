"""Where does a trained gate lose to the single experts? Held-out per-domain losses of one X-LoRA
checkpoint under inference-time changes (softmax temperature, top-1, global weight), with the
domain's expert forced on parts of the sequence (oracle, evaluation only), and of each single
expert at other scales.

    python experiments/routing_diagnostics.py --work xlora-reproduce  # checkpoint: the shipped one

Backs the figures quoted in docs/science/gate-investigation.md.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch

from xlora.bases.loading import load_base
from xlora.core.model import XLoraModel
from xlora.science.eval.evaluate import eval_loss
from xlora.science.tasks import TASKS
from xlora.train.data import collate, load_dataset
from xlora.train.loop import token_ce_sum

Where = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]  # (labels, positions, prefix) -> [B, T] bool


@torch.no_grad()
def forced_loss(model: XLoraModel, tok, path: Path, expert: int, where: Where, prefix: int) -> float:
    """Eval loss with the gate's scalings replaced by `expert` alone at the positions `where` picks."""
    ds = load_dataset(path, tok, 128)
    total, count = 0.0, 0
    for start in range(0, len(ds), 8):
        batch = collate([ds[i] for i in range(start, min(start + 8, len(ds)))], tok.pad_token_id or 0)
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        scalings = model.route(**inputs).clone()  # [B, T, L, N]
        positions = torch.arange(scalings.shape[1]).expand(scalings.shape[:2])  # [B, T]
        onehot = torch.zeros(model.n_experts)
        onehot[expert] = 1.0
        scalings[where(batch["labels"], positions, prefix)] = onehot
        with model.apply_scalings(scalings):
            out = model.base(**inputs)
        ce, n = token_ce_sum(out.logits, batch["labels"])
        total, count = total + float(ce), count + n
    return total / count


def predicts_answer(labels: torch.Tensor) -> torch.Tensor:
    """Positions whose next token is an answer token `[B, T]`."""
    out = torch.zeros_like(labels, dtype=torch.bool)
    out[:, :-1] = labels[:, 1:] != -100
    return out


WHERE: dict[str, Where] = {
    "shared chat-template prefix": lambda labels, pos, p: pos < p,
    "whole prompt": lambda labels, pos, p: ~predicts_answer(labels),
    "answer positions": lambda labels, pos, p: predicts_answer(labels),
    "everywhere (= single expert)": lambda labels, pos, p: torch.ones_like(pos, dtype=torch.bool),
}


def shared_prefix(tok, data: Path) -> int:
    """Number of leading tokens every task's prompts share (the chat template's system turn)."""
    firsts = [load_dataset(data / f"{t}-eval-chat.jsonl", tok, 128)[0].input_ids for t in TASKS]
    n = 0
    while all(len(f) > n and f[n] == firsts[0][n] for f in firsts):
        n += 1
    return n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, default=Path("src/xlora/science/shipped/xlora-science"))
    p.add_argument("--work", type=Path, default=Path("xlora-reproduce"))
    a = p.parse_args()
    data = a.work / "data"
    base, tok = load_base("default")
    model = XLoraModel.from_pretrained(base, a.checkpoint).eval()
    paths = [data / f"{t}-eval-chat.jsonl" for t in TASKS]
    experts = [model.expert_names.index(t) for t in TASKS]  # each task's own expert

    def show(label: str, context=nullcontext) -> None:
        with context():
            print(f"{label:45s}", " ".join(f"{eval_loss(model, tok, q):.3f}" for q in paths), flush=True)

    print(f"{'held-out loss':45s}", " ".join(TASKS))
    show("as trained")
    cfg = model.config
    if cfg.enable_softmax:
        for t in (0.5, 0.25, 0.1):
            cfg.softmax_temperature = t
            show(f"softmax temperature {t}")
        cfg.softmax_temperature = 1.0
    cfg.top_k_lora, cfg.enable_softmax_topk = 1, cfg.enable_softmax
    show("top-1 per module" + (" (renormalised)" if cfg.enable_softmax else ""))
    cfg.top_k_lora, cfg.enable_softmax_topk = None, False
    for g in (1.1, 1.25):
        model.set_global_scaling_weight(g)
        show(f"global scaling weight {g}")
    model.set_global_scaling_weight(1.0)
    prefix = shared_prefix(tok, data)
    for label, where in WHERE.items():
        losses = [forced_loss(model, tok, q, k, where, prefix) for k, q in zip(experts, paths)]
        print(f"{'domain expert forced: ' + label:45s}", " ".join(f"{x:.3f}" for x in losses), flush=True)
    print(f"(shared prefix: {prefix} tokens)")
    for scale in (1.0, 1.25, 1.5):
        losses = []
        for k, q in zip(experts, paths):
            w = [0.0] * model.n_experts
            w[k] = scale
            with model.static_scalings(w):
                losses.append(eval_loss(model, tok, q))
        print(f"{f'single domain expert at scale {scale}':45s}", " ".join(f"{x:.3f}" for x in losses), flush=True)


if __name__ == "__main__":
    main()
