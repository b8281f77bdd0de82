"""X-LoRA on fp32, bf16, 8-bit and 4-bit bases: quality, routing fidelity, memory and speed.

    python benchmarks/bases.py --checkpoint shipped --data xlora-reproduce/data     # SmolLM2 + science
    python benchmarks/bases.py --base DIR --checkpoint CK --device cuda              # any model, a GPU

Each precision runs in its own subprocess (so its peak RSS is its own) and writes what it saw; the
parent compares everything with fp32. Columns: per-domain held-out loss (the science sets'
assistant answers, when `--data` holds `<task>-eval-chat.jsonl`); routing fidelity against fp32
(mean |delta scalings| over every token and adapted module of the fidelity texts, and how often the
per-token dominant expert, averaged over modules, agrees); greedy-token agreement with fp32 on the
prompts (share of positions equal, up to the first difference counted as the rest differing);
base weight memory; peak RSS; prefill time of the first fidelity text; decode time per new token.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

PRECISIONS = {
    "fp32": ("float32", None),
    "bf16": ("bfloat16", None),
    "int8": ("float32", "int8"),
    "nf4": ("float32", "nf4"),
}
DEMO_PROMPTS = [
    "Molecule OC1=CC=CC=C1. Give its HOMO-LUMO gap in eV and its dipole in debye.",
    "Design a molecule with formula C4H5NO. Answer with a SMILES.",
    "Peptide GLFDIVKKVVGALGSL. Is it antimicrobial, and what is its net charge at pH 7?",
]


def encode(tok, text: str) -> torch.Tensor:
    if getattr(tok, "chat_template", None):
        msgs = [{"role": "user", "content": text}]
        return tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)[
            "input_ids"
        ]
    return tok(text, return_tensors="pt")["input_ids"]


def fidelity_texts(data: Path | None, per_task: int) -> list[str]:
    """Prompt + answer texts of the held-out sets (or the demo prompts) for the routing comparison."""
    if data is None:
        return DEMO_PROMPTS
    texts = []
    for path in sorted(data.glob("*-eval-chat.jsonl")):
        for line in path.read_text().splitlines()[:per_task]:
            msgs = json.loads(line)["messages"]
            texts.append(" ".join(m["content"] for m in msgs))
    return texts


def worker(args: argparse.Namespace) -> None:
    """One precision: load, measure, write a JSON report and the scalings to `args.out`."""
    from safetensors.torch import save_file

    from xlora import XLoraModel
    from xlora.bases.loading import load_base
    from xlora.cli import checkpoint_path

    torch.set_num_threads(args.threads)
    dtype, quant = PRECISIONS[args.worker]
    base, tok = load_base(args.base, device=args.device, dtype=dtype, quantization=quant)
    weight_bytes = sum(t.numel() * t.element_size() for t in [*base.parameters(), *base.buffers()])
    model = XLoraModel.from_pretrained(base, checkpoint_path(Path(args.checkpoint)))
    report: dict = {"precision": args.worker, "base_weight_mb": weight_bytes / 2**20, "losses": {}}
    if args.data:
        from xlora.science.eval.evaluate import eval_loss

        for path in sorted(Path(args.data).glob("*-eval-chat.jsonl")):
            report["losses"][path.name.removesuffix("-eval-chat.jsonl")] = eval_loss(model, tok, path)
    scalings = {}
    texts = fidelity_texts(Path(args.data) if args.data else None, args.per_task)
    with torch.no_grad():
        for i, text in enumerate(texts):
            model(input_ids=encode(tok, text).to(model.device))
            scalings[f"s{i}"] = model.get_latest_scalings()[0].float().cpu().contiguous()  # [T, L, N]
    save_file(scalings, str(Path(args.out).with_suffix(".safetensors")))
    prompts = [encode(tok, p) for p in DEMO_PROMPTS]
    report["greedy"] = [
        model.generate(p.to(model.device), max_new_tokens=args.new_tokens, eos_token_id=[])[0, p.shape[1] :].tolist()
        for p in prompts
    ]
    first = encode(tok, texts[0]).to(model.device)
    sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)

    def timed(fn) -> float:
        fn()  # warm-up
        times = []
        for _ in range(args.repeats):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    with torch.no_grad():
        report["prefill_ms"] = 1000 * timed(lambda: model(input_ids=first))
    n = args.new_tokens
    full = timed(lambda: model.generate(prompts[0].to(model.device), max_new_tokens=n, eos_token_id=[]))
    one = timed(lambda: model.generate(prompts[0].to(model.device), max_new_tokens=1, eos_token_id=[]))
    report["decode_ms_per_token"] = 1000 * (full - one) / (n - 1)
    report["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if model.device.type == "cuda":
        report["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    Path(args.out).write_text(json.dumps(report))


def agreement(a: list[int], b: list[int]) -> float:
    """Share of positions equal up to the first difference (after it, the texts diverge)."""
    same = 0
    for x, y in zip(a, b):
        if x != y:
            break
        same += 1
    return same / max(len(a), 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="default", help="'default' (embedded SmolLM2) or a local model dir")
    p.add_argument("--checkpoint", default="shipped", help="an X-LoRA checkpoint ('shipped': the science one)")
    p.add_argument("--data", default=None, help="folder with <task>-eval-chat.jsonl held-out sets")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precisions", default=",".join(PRECISIONS))
    p.add_argument("--per-task", type=int, default=8, help="held-out texts per task for routing fidelity")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)

    from safetensors.torch import load_file

    work = Path(tempfile.mkdtemp(prefix="xlora-bases-"))
    reports, scalings = {}, {}
    for name in args.precisions.split(","):
        out = work / f"{name}.json"
        cmd = [sys.executable, __file__, "--worker", name, "--out", str(out)]
        for flag in ("base", "checkpoint", "data", "device", "per_task", "new_tokens", "repeats", "threads"):
            value = getattr(args, flag)
            if value is not None:
                cmd += [f"--{flag.replace('_', '-')}", str(value)]
        r = subprocess.run(
            cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        )
        if r.returncode != 0:
            print(f"{name}: failed\n{r.stderr[-3000:]}", file=sys.stderr)
            continue
        reports[name] = json.loads(out.read_text())
        scalings[name] = load_file(str(out.with_suffix(".safetensors")))
    ref = reports.get("fp32")
    tasks = sorted(ref["losses"]) if ref else []
    device = args.device if args.device != "cuda" else f"cuda ({torch.cuda.get_device_name()})"
    n_texts = len(fidelity_texts(Path(args.data) if args.data else None, args.per_task))
    print(f"torch {torch.__version__}, device {device}, {args.threads} threads")
    print(f"base {args.base}; checkpoint {args.checkpoint}; routing fidelity over {n_texts} texts")
    print(
        f"greedy agreement over {len(DEMO_PROMPTS)} prompts x {args.new_tokens} tokens; times: median of {args.repeats}"
    )
    print()
    head = [
        "base",
        *[f"loss {t}" for t in tasks],
        "mean abs d-scalings",
        "dominant agrees",
        "greedy agrees",
        "weights (MB)",
        "peak RSS (MB)",
        "prefill (ms)",
        "decode (ms/token)",
    ]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for name, rep in reports.items():
        diffs, agree = [], []
        for key, s in scalings[name].items():
            r = scalings["fp32"][key] if ref else s
            diffs.append((s - r).abs().mean().item())
            agree.append((s.mean(1).argmax(-1) == r.mean(1).argmax(-1)).float().mean().item())
        greedy = statistics.mean(agreement(a, b) for a, b in zip(rep["greedy"], ref["greedy"])) if ref else 1.0
        row = [
            name,
            *[f"{rep['losses'].get(t, float('nan')):.3f}" for t in tasks],
            f"{statistics.mean(diffs):.4f}",
            f"{statistics.mean(agree):.3f}",
            f"{greedy:.2f}",
            f"{rep['base_weight_mb']:.1f}",
            f"{rep['peak_rss_mb']:.0f}",
            f"{rep['prefill_ms']:.0f}",
            f"{rep['decode_ms_per_token']:.1f}",
        ]
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
