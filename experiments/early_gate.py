"""Early gate on the science setup: gates whose scaling pass runs only the first k of SmolLM2's 30
layers, trained with the shipped gate's recipe on the shipped experts and the same gate data.

    python experiments/early_gate.py train --work /tmp/sci-work --k 8 15 22 [--no-norm 15]
    python experiments/early_gate.py score --work /tmp/sci-work --k 8 15 22 [--no-norm 15] \
        [--heldout DIR_WITH_TASK-eval-chat.jsonl]

`train` is resumable (a killed run continues from its last checkpoint). `score` prints, per domain,
the held-out loss of each gate and its paired difference from the full gate (the shipped checkpoint,
trained by the same function with the same settings) with a 95 % bootstrap interval, and the
relative difference the issue asks to stay within 2 %.

Backs the figures quoted in docs/guide/fast-paths.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

from xlora import XLoraModel, shipped_checkpoint
from xlora.bases.loading import load_base
from xlora.science.recipe.pipeline import ReproduceConfig, gate_config, stage_args
from xlora.science.tasks import TASKS


def gate_dir(work: Path, k: int, norm: bool) -> Path:
    return work / "early-gates" / (f"k{k}" if norm else f"k{k}-raw")


def shipped_tasks() -> list[str]:
    """The shipped checkpoint's experts, in its order (three before v0.8, five since)."""
    import json

    return [t for t in json.loads((shipped_checkpoint() / "xlora_config.json").read_text())["adapters"] if t in TASKS]


def train(work: Path, k: int, norm: bool) -> Path:
    """One gate with the reproduce recipe, its scaling pass cut after decoder layer k."""
    from xlora.train import train_gate
    from xlora.train.data import load_dataset

    out = gate_dir(work, k, norm)
    if (out / "xlora_config.json").is_file():
        return out
    cfg = ReproduceConfig(work=work, out=out)
    base, tok = load_base(cfg.base)
    shipped = shipped_checkpoint()
    experts = {task: shipped / task for task in shipped_tasks()}
    torch.manual_seed(cfg.seed)
    gate = dataclasses.replace(gate_config(cfg), scaling_pass_layers=k, scaling_pass_norm=norm)
    model = XLoraModel.from_experts(base, experts, gate, base_model_id=cfg.base)
    ds = load_dataset(work / "data" / "gate-train.jsonl", tok, cfg.max_length)
    args = stage_args(cfg, out, f"early-gate-{out.name}", cfg.gate_steps, cfg.gate_lr)
    print(f"training gate k={k} norm={norm} ({len(ds)} examples, {cfg.gate_steps} steps)", flush=True)
    train_gate(model, ds, None, args, pad_token_id=tok.pad_token_id or 0)
    return out


def score(heldout: Path, gates: dict[str, Path], limit: int | None = None, runs: int = 3) -> None:
    from quantized_routing import paired

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from real_model import NEW, PROMPT, item_losses, ours, timed

    base, tok = load_base("default")
    chat = tok.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True)
    ids = tok(chat, return_tensors="pt", add_special_tokens=False)["input_ids"]
    long_ids = torch.randint(100, 40000, (1, 256), generator=torch.Generator().manual_seed(0))
    shipped = shipped_checkpoint()
    rows = {"full (k=30, shipped)": shipped, **gates}
    tasks = shipped_tasks()
    losses: dict[str, dict[str, tuple]] = {}
    cost: dict[str, tuple[float, float]] = {}  # name -> (prefill s of 256 tokens, decode tokens/s)
    for name, path in rows.items():
        model = XLoraModel.from_pretrained(base, path)
        losses[name] = {t: item_losses(model, tok, heldout / f"{t}-eval-chat.jsonl", limit=limit) for t in tasks}
        with torch.no_grad():
            prefill = timed(lambda m=model: m(input_ids=long_ids), runs)
        cost[name] = (prefill, NEW / timed(lambda m=model: ours(m, ids), runs))
        if name == "full (k=30, shipped)":
            with torch.no_grad(), model.disable_experts():
                cost["plain base"] = (timed(lambda m=model: m(input_ids=long_ids), runs), 0.0)
            cost["plain base"] = (cost["plain base"][0], NEW / timed(lambda m=model: ours(m, ids, disabled=True), runs))
        base = model.unload()
    ref = losses["full (k=30, shipped)"]
    n = {t: len(ref[t][0]) for t in tasks}
    pb, db = cost["plain base"]
    print(f"plain base: prefill 256 tokens {pb * 1e3:.0f} ms, decode {db:.1f} tokens/s ({NEW} greedy tokens)\n")
    head = " | ".join(f"{t} loss (n={n[t]})" for t in tasks)
    print(f"| gate | {head} | prefill / base | decode tokens/s | decode cost / base |")
    print("|---|" + "---:|" * (len(tasks) + 3))
    for name, per_task in losses.items():
        p, d = cost[name]
        cells = []
        for t in tasks:
            s, c = per_task[t]
            loss = float(s.sum() / c.sum())
            rel = loss / float(ref[t][0].sum() / ref[t][1].sum()) - 1
            diff = f" ({rel:+.1%}; {paired(ref[t], per_task[t])})" if per_task is not ref else ""
            cells.append(f"{loss:.3f}{diff}")
        cells += [f"{p / pb:.2f}", f"{d:.1f}", f"{db / d:.2f}"]
        print(f"| {name} | " + " | ".join(cells) + " |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["train", "score"])
    p.add_argument("--work", type=Path, required=True, help="The reproduce work folder (its data/ is used).")
    p.add_argument("--k", type=int, nargs="+", default=[8, 15, 22])
    p.add_argument("--no-norm", type=int, nargs="*", default=[], help="Also train these k without the final norm.")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--limit", type=int, help="score: only the first N held-out items per task (a quick look)")
    p.add_argument("--runs", type=int, default=3, help="score: timed runs per gate (median)")
    p.add_argument("--heldout", type=Path, help="Folder with <task>-eval-chat.jsonl (default WORK/data).")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    todo = [(k, True) for k in a.k] + [(k, False) for k in a.no_norm]
    if a.action == "train":
        for k, norm in todo:
            train(a.work, k, norm)
        return
    gates = {f"k={k}" + ("" if norm else " raw"): gate_dir(a.work, k, norm) for k, norm in todo}
    score(a.heldout or a.work / "data", gates, a.limit, a.runs)


if __name__ == "__main__":
    main()
