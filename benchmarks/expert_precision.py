"""Expert-training step time in fp32 and in bf16 autocast: why `xlora reproduce` trains its longer
experts in bf16 (`ReproduceConfig.expert_precision`).

    python benchmarks/expert_precision.py --data xlora-reproduce/data/molecule-properties-train.jsonl

The embedded SmolLM2-135M with a fresh rank-8 PEFT LoRA on q,v,o,gate (the experts' shape), one
batch of the file's first `--batch` examples, AdamW, through `xlora.train.loop.autocast_dtype` as the
trainer uses it. Each precision runs `--steps` steps after one warm-up step; prints the median seconds
per step and the speed-up. On a CPU without AMX / AVX512-BF16 bf16 autocast is usually slower.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="A chat JSONL training file (xlora reproduce's).")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)

    from peft import LoraConfig, get_peft_model

    from xlora.bases.loading import load_base
    from xlora.train.data import collate, load_dataset
    from xlora.train.loop import autocast_dtype

    base, tok = load_base("default")
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj", "gate_proj"])
    model = get_peft_model(base, lora)
    ds = load_dataset(a.data, tok, 128)
    batch = collate([ds[i] for i in range(min(a.batch, len(ds)))], tok.pad_token_id or 0)
    tokens = int(batch["attention_mask"].sum())
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-4)
    medians = {}
    for precision in ("fp32", "bf16"):
        amp = autocast_dtype(precision, torch.device("cpu"))
        times = []
        for step in range(a.steps + 1):
            t0 = time.perf_counter()
            with torch.autocast("cpu", dtype=amp or torch.bfloat16, enabled=amp is not None):
                out = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "labels")})
            out.loss.backward()
            opt.step()
            opt.zero_grad()
            if step:  # the first step warms up
                times.append(time.perf_counter() - t0)
        medians[precision] = statistics.median(times)
        shape = f"{a.batch} x {tokens / a.batch:.0f} tokens"
        print(f"{precision}: {medians[precision]:.2f} s/step (median of {a.steps}; {shape})")
    print(f"bf16 speed-up: {medians['fp32'] / medians['bf16']:.2f}x ({torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
