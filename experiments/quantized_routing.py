"""Does a quantized base distort the gate, or only the base? Held-out losses on an 8-bit / 4-bit base
with the gate's own routing vs the routing the same gate computes on the fp32 base (an oracle).

    python experiments/quantized_routing.py --data xlora-reproduce/data [--checkpoint shipped]

If the oracle routing recovers the fp32 loss, the quantized scaling pass misleads the gate (retrain
it on that base); if not, the loss comes from the quantized base itself and routing is not the issue.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from xlora import XLoraModel
from xlora.base_models import load_base
from xlora.cli import checkpoint_path
from xlora.data import collate, load_dataset
from xlora.training import token_ce_sum


@torch.no_grad()
def losses(model, tok, path: Path, router=None) -> float:
    """Token-weighted held-out CE; `router` (another XLoraModel) supplies the scalings when given."""
    ds = load_dataset(path, tok, 128)
    total, count = 0.0, 0
    for start in range(0, len(ds), 8):
        batch = collate([ds[i] for i in range(start, min(start + 8, len(ds)))], tok.pad_token_id or 0)
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        if router is None:
            logits = model(**inputs).logits
        else:
            scalings = router.route(**inputs)  # [B, T, L, N] from the other base
            with model.apply_scalings(scalings.to(model.device)):
                logits = model.base(**inputs).logits
        ce, n = token_ce_sum(logits, batch["labels"])
        total, count = total + float(ce), count + n
    return total / max(count, 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--checkpoint", default="shipped")
    p.add_argument("--quantizations", default="int8,nf4")
    args = p.parse_args()
    torch.set_num_threads(2)
    ck = checkpoint_path(Path(args.checkpoint))
    ref_base, tok = load_base("default")
    ref = XLoraModel.from_pretrained(ref_base, ck)
    files = sorted(args.data.glob("*-eval-chat.jsonl"))
    tasks = [f.name.removesuffix("-eval-chat.jsonl") for f in files]
    print("| base | routing | " + " | ".join(tasks) + " |")
    print("|---|---|" + "---:|" * len(tasks))
    print("| fp32 | own | " + " | ".join(f"{losses(ref, tok, f):.3f}" for f in files) + " |")
    for quant in args.quantizations.split(","):
        model = XLoraModel.from_pretrained(load_base("default", quantization=quant)[0], ck)
        own = [losses(model, tok, f) for f in files]
        oracle = [losses(model, tok, f, router=ref) for f in files]
        print(f"| {quant} | own | " + " | ".join(f"{x:.3f}" for x in own) + " |")
        print(f"| {quant} | fp32 gate's routing | " + " | ".join(f"{x:.3f}" for x in oracle) + " |")


if __name__ == "__main__":
    main()
