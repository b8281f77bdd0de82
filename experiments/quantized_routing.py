"""Does a quantized base distort the gate, or only the base? Held-out losses on bf16 / 8-bit / 4-bit
bases with the gate's own routing vs the routing the same gate computes on the fp32 base (an oracle),
each as a paired difference from fp32 over the same held-out items, with a 95 % bootstrap interval.

    python experiments/quantized_routing.py --data xlora-reproduce/data [--checkpoint shipped]

If the oracle routing recovers the fp32 loss, the quantized scaling pass misleads the gate (retrain
it on that base); if not, the loss comes from the quantized base itself and routing is not the issue.

Backs the figures quoted in docs/guide/bases.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from xlora import XLoraModel
from xlora.bases.loading import load_base
from xlora.cli import checkpoint_path
from xlora.train.data import collate, load_dataset
from xlora.train.loop import token_ce_sum

BASES = {"bf16": ("bfloat16", None), "int8": ("float32", "int8"), "nf4": ("float32", "nf4")}


@torch.no_grad()
def item_losses(model, tok, path: Path, router=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per held-out item: (sum of answer-token CE, answer tokens); `router` supplies the scalings."""
    ds = load_dataset(path, tok, 128)
    sums, counts = [], []
    for i in range(len(ds)):  # one item at a time: per-item sums for the paired bootstrap
        batch = collate([ds[i]], tok.pad_token_id or 0)
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        if router is None:
            logits = model(**inputs).logits
        else:
            scalings = router.route(**inputs)  # [1, T, L, N] from the fp32 base
            with model.apply_scalings(scalings.to(model.device)):
                logits = model.base(**inputs).logits
        ce, n = token_ce_sum(logits, batch["labels"])
        sums.append(float(ce))
        counts.append(n)
    return torch.tensor(sums, dtype=torch.float64), torch.tensor(counts, dtype=torch.float64)


def paired(ref: tuple, other: tuple, n_boot: int = 2000) -> str:
    """Token-weighted loss difference other - ref over the same items, with a 95 % bootstrap interval."""
    (rs, rc), (os_, _) = ref, other
    diff = float(os_.sum() / rc.sum() - rs.sum() / rc.sum())
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, len(rs), (n_boot, len(rs)), generator=g)
    boot = (os_[idx].sum(1) - rs[idx].sum(1)) / rc[idx].sum(1)
    lo, hi = torch.quantile(boot, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return f"{diff:+.3f} [{lo:+.3f}, {hi:+.3f}]"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--checkpoint", default="shipped")
    p.add_argument("--bases", default=",".join(BASES))
    args = p.parse_args()
    torch.set_num_threads(2)
    ck = checkpoint_path(Path(args.checkpoint))
    ref_base, tok = load_base("default")
    ref = XLoraModel.from_pretrained(ref_base, ck)
    files = sorted(args.data.glob("*-eval-chat.jsonl"))
    tasks = [f.name.removesuffix("-eval-chat.jsonl") for f in files]
    fp32 = {t: item_losses(ref, tok, f) for t, f in zip(tasks, files)}
    n = {t: len(v[0]) for t, v in fp32.items()}
    print("loss difference from fp32 (same items, token-weighted), 95 % bootstrap interval over items;")
    print("fp32 losses: " + ", ".join(f"{t} {float(s.sum() / c.sum()):.3f} (n={n[t]})" for t, (s, c) in fp32.items()))
    print()
    print("| base | routing | " + " | ".join(tasks) + " |")
    print("|---|---|" + "---:|" * len(tasks))
    for name in args.bases.split(","):
        dtype, quant = BASES[name]
        model = XLoraModel.from_pretrained(load_base("default", dtype=dtype, quantization=quant)[0], ck)
        own = [paired(fp32[t], item_losses(model, tok, f)) for t, f in zip(tasks, files)]
        oracle = [paired(fp32[t], item_losses(model, tok, f, router=ref)) for t, f in zip(tasks, files)]
        print(f"| {name} | own | " + " | ".join(own) + " |")
        print(f"| {name} | fp32 gate's routing | " + " | ".join(oracle) + " |")


if __name__ == "__main__":
    main()
