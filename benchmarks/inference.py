"""Inference speed of our X-LoRA against the plain base model and PEFT's XLoraModel.

    python benchmarks/inference.py [--runs 5] [--skip-peft-long]

Tiny Llama (hidden 512, 8 layers, vocab 32000), 8 experts of rank 16 on q,k,v,o,gate,up,down,
depth-2 layerwise classifier, fp32, 2 threads; every workload and the base run in alternating rounds
(`paired_times`), ratios are medians of same-round ratios. Prints a markdown table (copied into the README).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import load, make_experts, median_time, paired_times, tiny_llama  # noqa: E402

from xlora import XLoraConfig, XLoraModel  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (times then include a GPU synchronise)")
    parser.add_argument("--json", type=Path, default=None, help="also write the table's figures here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    root = Path(tempfile.mkdtemp(prefix="xlora-bench-"))
    base_dir = tiny_llama(root / "base")
    experts = make_experts(base_dir, root)
    cfg = XLoraConfig(xlora_depth=2, layerwise_scalings=True)

    dev = torch.device(args.device)
    base = load(base_dir).to(dev)
    ours = XLoraModel.from_experts(load(base_dir), experts, cfg).to(dev)

    from peft import XLoraConfig as PeftXLoraConfig
    from peft import get_peft_model

    peft_cfg = PeftXLoraConfig(
        task_type="CAUSAL_LM",
        hidden_size=512,
        xlora_depth=2,
        layerwise_scalings=True,
        adapters={str(i): str(p) for i, p in enumerate(experts.values())},
    )
    peft_model = get_peft_model(load(base_dir), peft_cfg).eval().to(dev)
    ours.classifier.load_state_dict(peft_model.base_model.internal_xlora_classifier.state_dict())

    g = torch.Generator().manual_seed(0)
    long_ids = torch.randint(3, 32000, (1, 256), generator=g).to(dev)
    prompt = torch.randint(3, 32000, (1, 32), generator=g).to(dev)

    def gen_base(n):
        return base.generate(
            input_ids=prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=True, pad_token_id=0
        )

    def gen_ours(n, reuse=None, merge=True):
        from xlora.core.generation import SamplingOptions, iter_generate

        opts = SamplingOptions(max_new_tokens=n, eos_token_id=[])
        return [s.tokens for s in iter_generate(ours, prompt, None, opts, reuse_scalings_after=reuse, merge=merge)]

    def early(fn):
        """Run `fn` with the early gate: the scaling pass over the first L/2 decoder layers."""

        def run():
            ours.config.scaling_pass_layers = base.config.num_hidden_layers // 2
            try:
                return fn()
            finally:
                ours.config.scaling_pass_layers = None

        return run

    def gen_peft(n):
        return peft_model.generate(
            input_ids=prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0
        )

    # correctness first: ours and PEFT agree on the greedy tokens
    same = torch.equal(ours.generate(prompt, max_new_tokens=64, eos_token_id=[]), gen_peft(64))

    def nograd(fn):
        def run():
            with torch.no_grad():
                return fn()

        return run

    prefill = paired_times(
        {
            "base": nograd(lambda: base(input_ids=long_ids)),
            "ours": nograd(lambda: ours(input_ids=long_ids)),
            "peft": nograd(lambda: peft_model(input_ids=long_ids)),
            "early": nograd(early(lambda: ours(input_ids=long_ids))),
        },
        "base",
        args.runs,
    )
    greedy = paired_times(
        {
            "base": lambda: gen_base(64),
            "ours": lambda: gen_ours(64),
            "reuse": lambda: gen_ours(64, reuse=4, merge=False),
            "merge": lambda: gen_ours(64, reuse=4),
            "early": early(lambda: gen_ours(64)),
        },
        "base",
        args.runs,
    )
    t_peft_64 = median_time(lambda: gen_peft(64), max(1, args.runs // 2), warmup=0)  # ~20 s a call
    long = paired_times({"base": lambda: gen_base(256), "ours": lambda: gen_ours(256)}, "base", args.runs)

    rows = [
        ("prefill 1x256", prefill["base"], prefill["ours"], prefill["peft"][0]),
        ("greedy 32 + 64 new", greedy["base"], greedy["ours"], t_peft_64),
        ("greedy 32 + 64 new, reuse_scalings_after=4 (fused, merge=False)", greedy["base"], greedy["reuse"], None),
        ("greedy 32 + 64 new, reuse_scalings_after=4 + merged decoding", greedy["base"], greedy["merge"], None),
        ("prefill 1x256, early gate k = L/2", prefill["base"], prefill["early"], None),
        ("greedy 32 + 64 new, early gate k = L/2", greedy["base"], greedy["early"], None),
        ("greedy 32 + 256 new", long["base"], long["ours"], None),
    ]
    print(
        f"torch {torch.__version__}, {args.threads} threads, {args.runs} paired rounds (medians; ratios are "
        f"medians of same-round ratios); greedy tokens ours == PEFT: {same}\n"
    )
    print("| workload | base (ms) | ours (ms) | PEFT (ms) | ours / base [min, max] | PEFT / base | PEFT / ours |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, (tb, *_), (to, ratio, lo, hi), tp in rows:
        peft, peft_base, peft_ours = (
            ("-", "-", "-") if tp is None else (f"{tp * 1e3:.0f}", f"{tp / tb:.2f}", f"{tp / to:.1f}")
        )
        ratio_cell = f"{ratio:.2f} [{lo:.2f}, {hi:.2f}]"
        print(f"| {name} | {tb * 1e3:.0f} | {to * 1e3:.0f} | {peft} | {ratio_cell} | {peft_base} | {peft_ours} |")
    if args.json is not None:
        figures = {
            "torch": torch.__version__,
            "device": torch.cuda.get_device_name(0) if dev.type == "cuda" else f"cpu, {args.threads} threads",
            "runs": args.runs,
            "greedy_equal_peft": same,
            "rows": [
                {
                    "workload": name,
                    "base_s": tb,
                    "ours_s": to,
                    "ratio": ratio,
                    "ratio_min": lo,
                    "ratio_max": hi,
                    "peft_s": tp,
                }
                for name, (tb, *_), (to, ratio, lo, hi), tp in rows
            ],
        }
        args.json.write_text(json.dumps(figures, indent=1))
    t_ours_prefill = prefill["ours"][0]
    per_tok_64 = (greedy["ours"][0] - t_ours_prefill * 32 / 256) / 64
    per_tok_256 = (long["ours"][0] - t_ours_prefill * 32 / 256) / 256
    print(
        f"\nour time per new token: {per_tok_64 * 1e3:.2f} ms over 64 tokens, {per_tok_256 * 1e3:.2f} ms over 256 "
        "(flat = linear total cost)"
    )
    print(
        "\ngoals: prefill ours/base <= 2.5; greedy ours/base <= 2.6; PEFT/ours >= 18; reuse/base <= 1.5; "
        "early gate k = L/2 prefill and greedy <= 1.6; reuse + merge <= 1.1"
    )


if __name__ == "__main__":
    main()
