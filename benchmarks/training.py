"""Gate-training step time and peak memory: our XLoraModel against PEFT's, same optimiser.

    python benchmarks/training.py [--runs 5]

Tiny Llama of the inference benchmark, 8 experts of rank 16 on all projections, depth-2 layerwise
classifier, batch 8 x 128 tokens, AdamW on the classifier only, fp32, 2 threads. Each side runs in
its own subprocess so that its peak resident memory (ru_maxrss) is its own; on CUDA the figure is
torch.cuda.max_memory_allocated instead. Prints a markdown table (copied into the README).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import load, make_experts, median_time, tiny_llama  # noqa: E402


def build(kind: str, root: Path):
    base_dir = root / "base"
    experts = {f"expert{i}": root / f"expert{i}" for i in range(8)}
    if kind == "ours":
        from xlora import XLoraConfig, XLoraModel

        model = XLoraModel.from_experts(load(base_dir), experts, XLoraConfig(xlora_depth=2, layerwise_scalings=True))
        params = list(model.classifier.parameters())
    else:
        from peft import XLoraConfig as PeftXLoraConfig
        from peft import get_peft_model

        cfg = PeftXLoraConfig(
            task_type="CAUSAL_LM",
            hidden_size=512,
            xlora_depth=2,
            layerwise_scalings=True,
            adapters={str(i): str(p) for i, p in enumerate(experts.values())},
        )
        model = get_peft_model(load(base_dir), cfg)
        params = [p for p in model.parameters() if p.requires_grad]
    return model, params


def measure(kind: str, root: Path, runs: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model, params = build(kind, root)
    model.train()
    opt = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(3, 32000, (8, 128))
    mask = torch.ones_like(ids)

    def step():
        loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    t = median_time(step, runs)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    n_trainable = sum(p.numel() for p in params)
    return {"kind": kind, "step_s": t, "peak_mb": peak_mb, "trainable": n_trainable}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", choices=["ours", "peft"])
    parser.add_argument("--root")
    parser.add_argument("--rounds", type=int, default=3, help="alternating subprocess rounds per side")
    args = parser.parse_args()
    if args.only:
        print(json.dumps(measure(args.only, Path(args.root), args.runs, args.threads)))
        return
    root = Path(tempfile.mkdtemp(prefix="xlora-train-bench-"))
    make_experts(tiny_llama(root / "base"), root)
    rounds: dict[str, list[dict]] = {"ours": [], "peft": []}
    for _ in range(args.rounds):  # alternate the sides so that machine noise hits both alike
        for kind in ("ours", "peft"):
            cmd = [sys.executable, __file__, "--only", kind, "--root", str(root)]
            cmd += ["--runs", str(args.runs), "--threads", str(args.threads)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            rounds[kind].append(json.loads(out.strip().splitlines()[-1]))
    ours, peft = (
        {**r[0], "step_s": statistics.median(x["step_s"] for x in r), "peak_mb": max(x["peak_mb"] for x in r)}
        for r in (rounds["ours"], rounds["peft"])
    )
    print(
        f"torch {torch.__version__}, {args.threads} threads, batch 8 x 128; step time = median over "
        f"{args.rounds} alternating subprocess rounds of the median of {args.runs} steps\n"
    )
    print("| | step (ms) | peak RSS (MB) | trainable params |")
    print("|---|---:|---:|---:|")
    for r in (ours, peft):
        print(f"| {r['kind']} | {r['step_s'] * 1e3:.0f} | {r['peak_mb']:.0f} | {r['trainable']:,} |")
    print(f"\nours / PEFT step time: {ours['step_s'] / peft['step_s']:.2f} (goal <= 0.7)")


if __name__ == "__main__":
    main()
