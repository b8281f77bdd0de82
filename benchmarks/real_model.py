"""Decode speed and held-out loss of every X-LoRA mode on a real model (the embedded SmolLM2-135M).

    python benchmarks/real_model.py [--checkpoint shipped] [--early-gate DIR] [--data DIR] [--runs 3]

128 greedy tokens (no early stop) after one chat prompt, batch 1, tokens/s as 128 / median wall time
(prefill included) of `--runs` runs, per dtype (fp32, bf16): our plain base (experts disabled, same
loop), transformers' `generate` on the plain base, and X-LoRA: full gate, early gate (the scaling
pass over the first k layers; `--early-gate` a gate trained that way, else the shipped gate run with
k as a cost-only row), reuse-after-4 fused, and reuse-after-4 with merged decoding. With `--data`
(a folder with `<task>-eval-chat.jsonl`) each mode gets its token-weighted held-out loss per domain;
reuse modes are scored by teacher forcing with the scalings frozen as generation freezes them. If
`mistralrs` is installed, its plain base runs the same prompt (fp32 and in-situ Q8_0) for the ratio.
"""

from __future__ import annotations

import argparse
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import median_time as timed  # noqa: E402  (median after one warm-up call)

PROMPT = "Peptide GLFDIVKKVVGALGSL. Is it antimicrobial, and what is its net charge at pH 7?"
NEW = 128
REUSE = 4


def ours(model, ids, reuse=None, merge=True, disabled=False):
    from xlora.core.generation import SamplingOptions, iter_generate

    opts = SamplingOptions(max_new_tokens=NEW, eos_token_id=[])
    with model.disable_experts() if disabled else ExitStack():
        steps = iter_generate(model, ids, None, opts, reuse_scalings_after=reuse, merge=merge)
        return torch.stack([s.tokens for s in steps])


def frozen_after(scalings: torch.Tensor, labels: torch.Tensor, reuse: int) -> torch.Tensor:
    """Scalings `[B, T, L, N]` as generation with `reuse_scalings_after=reuse` uses them on this text:
    from position prompt + reuse on, every position keeps those of position prompt + reuse - 1."""
    out = scalings.clone()
    for row in range(labels.shape[0]):
        start = int((labels[row] != -100).nonzero()[0])  # first answer token = the prompt's length
        keep = start + reuse - 1
        if keep < out.shape[1]:
            out[row, keep:] = out[row, keep]
    return out


@torch.no_grad()
def item_losses(model, tok, path: Path, reuse: int | None = None, limit: int | None = None, batch: int = 8):
    """Per item of a chat JSONL: (sum of the answer tokens' cross-entropy, their number), float64 `[n]`."""
    import torch.nn.functional as F

    from xlora.train.data import collate, load_dataset

    ds = load_dataset(path, tok, 128)
    n = len(ds) if limit is None else min(limit, len(ds))
    sums, counts = [], []
    for start in range(0, n, batch):
        b = collate([ds[i] for i in range(start, min(start + batch, n))], tok.pad_token_id or 0)
        inputs = {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}
        if reuse is None:
            logits = model(**inputs).logits
        else:
            with model.apply_scalings(frozen_after(model.route(**inputs), b["labels"], reuse)):
                logits = model.base(**inputs).logits
        labels = b["labels"][:, 1:]  # [B, T-1]
        ce = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels, ignore_index=-100, reduction="none")
        sums += ce.sum(1).tolist()
        counts += (labels != -100).sum(1).tolist()
    return torch.tensor(sums, dtype=torch.float64), torch.tensor(counts, dtype=torch.float64)


def held_out_loss(model, tok, data: Path, reuse: int | None = None, limit: int | None = None) -> dict[str, float]:
    """Token-weighted answer loss per task (`<task>-eval-chat.jsonl` in `data`)."""
    from xlora.science.tasks import TASKS

    out = {}
    for task in TASKS:
        s, c = item_losses(model, tok, data / f"{task}-eval-chat.jsonl", reuse, limit)
        out[task] = float(s.sum() / c.sum())
    return out


def expert_dirs(checkpoint: Path) -> dict[str, Path]:
    """The expert folders of a native checkpoint, by the names its config lists."""
    import json

    names = json.loads((checkpoint / "xlora_config.json").read_text())["adapters"]
    return {n: checkpoint / n for n in names}


def mistralrs_copy(out: Path) -> Path:
    """A copy of the embedded base that mistral.rs 0.9.5 loads: `rope_theta` at the top of config.json,
    no `quantization_config`, and an explicit `lm_head.weight` (SmolLM2 ties it to the embedding)."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    from xlora.bases.loading import default_base_dir

    src = default_base_dir()
    if (out / "model.safetensors").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    config = json.loads((src / "config.json").read_text())
    config.pop("quantization_config", None)
    config.setdefault("rope_theta", (config.get("rope_parameters") or {}).get("rope_theta", 10000.0))
    (out / "config.json").write_text(json.dumps(config, indent=1))
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja"):
        if (src / name).is_file():
            shutil.copy(src / name, out / name)
    weights = load_file(str(src / "model.safetensors"))
    weights.setdefault("lm_head.weight", weights["model.embed_tokens.weight"].clone())
    save_file(weights, str(out / "model.safetensors"))
    return out


def mistralrs_rates(prompt: str) -> dict[str, float]:
    """tokens/s of mistral.rs's plain base, fp32 and in-situ Q8_0, or {} when it is not installed."""
    try:
        import mistralrs
    except ImportError:
        return {}
    import tempfile

    base_dir = mistralrs_copy(Path(tempfile.gettempdir()) / "xlora-mistralrs-base")
    rates = {}
    for name, quant in (("fp32", None), ("Q8_0", "Q8_0")):
        kw = {"in_situ_quant": quant} if quant else {}
        which = mistralrs.Which.Plain(model_id=str(base_dir), dtype=mistralrs.ModelDType.F32)
        runner = mistralrs.Runner(which=which, **kw)
        req = mistralrs.ChatCompletionRequest(
            model="default",
            messages=[{"role": "user", "content": prompt}],
            max_tokens=NEW,
            temperature=0.0,
        )
        runner.send_chat_completion_request(req)  # warm-up
        t0 = time.perf_counter()
        res = runner.send_chat_completion_request(req)
        rates[name] = res.usage.completion_tokens / (time.perf_counter() - t0)
        del runner
    return rates


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="shipped")
    p.add_argument("--early-gate", type=Path, help="A gate trained with --scaling-pass-layers.")
    p.add_argument("--k", type=int, default=15, help="Layers of the cost-only early gate (no --early-gate).")
    p.add_argument("--data", type=Path, help="Folder with <task>-eval-chat.jsonl for held-out losses.")
    p.add_argument("--limit", type=int, help="Score only the first N held-out items per task.")
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-mistralrs", action="store_true", help="Skip the mistral.rs peer even if installed.")
    a = p.parse_args()
    torch.set_num_threads(a.threads)

    from xlora import XLoraModel
    from xlora.bases.loading import load_base
    from xlora.cli import checkpoint_path

    rows = []
    for dtype in a.dtypes:
        base, tok = load_base("default", dtype=dtype)
        chat = [{"role": "user", "content": PROMPT}]
        text = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        model = XLoraModel.from_pretrained(base, checkpoint_path(Path(a.checkpoint)))
        plain = model.unload()

        def hf_generate(m=plain, ids=ids):
            return m.generate(ids, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0)

        rows.append((dtype, "transformers generate, plain base", NEW / timed(hf_generate, a.runs), None))
        model = XLoraModel.from_pretrained(plain, checkpoint_path(Path(a.checkpoint)))
        rate = NEW / timed(lambda m=model, i=ids: ours(m, i, disabled=True), a.runs)
        rows.append((dtype, "our loop, plain base", rate, None))
        modes = [
            ("X-LoRA full gate", {}, None),
            (f"X-LoRA reuse after {REUSE}, fused", {"reuse": REUSE, "merge": False}, REUSE),
            (f"X-LoRA reuse after {REUSE} + merged", {"reuse": REUSE}, REUSE),
        ]
        for name, kw, reuse in modes:
            rate = NEW / timed(lambda kw=kw, m=model, i=ids: ours(m, i, **kw), a.runs)
            loss = held_out_loss(model, tok, a.data, reuse, a.limit) if a.data else None
            rows.append((dtype, name, rate, loss))
        plain = model.unload()
        if a.early_gate:
            # a gate folder of docs/data/early-gates holds no experts: it was trained on the checkpoint's
            ckpt = checkpoint_path(Path(a.checkpoint))
            experts = None if any(a.early_gate.glob("*/adapter_config.json")) else expert_dirs(ckpt)
            early = XLoraModel.from_pretrained(plain, a.early_gate, adapters=experts)
            name = f"X-LoRA early gate k={early.config.scaling_pass_layers}"
            loss = held_out_loss(early, tok, a.data, limit=a.limit) if a.data else None
        else:
            early = XLoraModel.from_pretrained(plain, checkpoint_path(Path(a.checkpoint)))
            early.config.scaling_pass_layers = a.k
            name, loss = f"X-LoRA early gate k={a.k} (shipped gate: cost only)", None
        rows.append((dtype, name, NEW / timed(lambda m=early, i=ids: ours(m, i), a.runs), loss))
        early.unload()

    print(f"SmolLM2-135M-Instruct, {a.threads} threads, batch 1, {NEW} greedy tokens, median of {a.runs} runs\n")
    tasks = list(rows[-1][3] or rows[2][3] or {})
    print("| dtype | mode | tokens/s | " + " | ".join(f"{t} loss" for t in tasks) + " |")
    print("|---|---|---:|" + "---:|" * len(tasks))
    for dtype, name, rate, loss in rows:
        cells = [f"{loss[t]:.3f}" if loss else "-" for t in tasks]
        print(f"| {dtype} | {name} | {rate:.1f} | " + " | ".join(cells) + " |")
    sys.stdout.flush()
    try:
        rates = {} if a.no_mistralrs else mistralrs_rates(PROMPT)
    except Exception as e:  # noqa: BLE001 - the peer is optional: report and keep our figures
        print(f"\nmistral.rs failed: {type(e).__name__}: {e}")
        rates = {}
    for name, rate in rates.items():
        print(f"\nmistral.rs 0.9.5 plain base, {name}: {rate:.1f} tokens/s (same prompt, {NEW} tokens)")
        for dtype, mode, ours_rate, _ in rows:
            if mode.startswith("X-LoRA"):
                print(f"  {dtype} {mode}: {ours_rate / rate:.2f} x its speed")
    print("\ngoal: X-LoRA with per-token routing >= 17 tokens/s (mistral.rs plain fp32 here), within 2x of its Q8_0")


if __name__ == "__main__":
    sys.exit(main())
