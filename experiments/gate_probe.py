"""Train one gate variant over the experts of an `xlora reproduce` work dir and print its held-out
per-domain losses and routing mass: the cheap loop behind the README's gate investigation.

    python experiments/gate_probe.py NAME [--no-softmax] [--size 256] [--lr 5e-3] [--fresh 320] ...

Without options it trains the earlier shipped gate (softmax, width 64, lr 2e-3, 240 steps, no fresh
data), the baseline each option is compared with. Needs a finished `xlora reproduce --work DIR` (data and
experts). Results are appended to DIR/probes/results.jsonl; the probe's gate goes to DIR/probes/NAME.

Backs the figures quoted in docs/science/gate-investigation.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from xlora.bases.loading import load_base
from xlora.core.model import XLoraModel
from xlora.science.recipe.pipeline import (
    ReproduceConfig,
    build_items,
    chat_record,
    gate_records,
    train_gate_stage,
    write_jsonl,
)
from xlora.science.tasks import TASKS
from xlora.train.data import collate, load_dataset
from xlora.train.loop import token_ce_sum


@torch.no_grad()
def domain_report(model: XLoraModel, tok, data: Path) -> dict[str, dict]:
    """Per task: eval loss of the held-out answers and the mean scaling of each expert on them."""
    report = {}
    for task in TASKS:
        ds = load_dataset(data / f"{task}-eval-chat.jsonl", tok, 128)
        total, count, mass = 0.0, 0, torch.zeros(model.n_experts)
        for start in range(0, len(ds), 8):
            batch = collate([ds[i] for i in range(start, min(start + 8, len(ds)))], tok.pad_token_id or 0)
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            ce, n = token_ce_sum(out.logits, batch["labels"])
            total, count = total + float(ce), count + n
            answer = batch["labels"] != -100  # [B, T]
            mass += model.get_latest_scalings()[answer].mean(1).sum(0)  # [N]
        report[task] = {"loss": round(total / count, 4), "mass": [round(float(m), 2) for m in mass / count]}
    return report


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("name")
    p.add_argument("--work", type=Path, default=Path("xlora-reproduce"))
    p.add_argument("--base", default="default", help="the base model the work dir was made with")
    made = "default: the work dir's data/data-settings.json"
    p.add_argument("--n-train", type=int, default=None, help=f"as the work dir was made with ({made})")
    p.add_argument("--n-eval", type=int, default=None, help=f"as the work dir was made with ({made})")
    p.add_argument("--seed", type=int, default=None, help=f"as the work dir was made with ({made})")
    p.add_argument("--steps", type=int, default=240)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--no-softmax", action="store_true")
    p.add_argument("--not-layerwise", action="store_true")
    p.add_argument("--fresh", type=int, default=0, help="extra gate examples per task the experts never saw")
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    # the work dir's own data settings (stage_data writes them); --n-train/--n-eval/--seed override
    made = a.work / "data" / "data-settings.json"
    settings = json.loads(made.read_text()) if made.is_file() else {}
    sizes = {k: v for k, v in settings.items() if k not in ("gate_fresh", "tasks", "gate_labels")}
    sizes |= {k: v for k, v in (("n_train", a.n_train), ("n_eval", a.n_eval), ("seed", a.seed)) if v is not None}
    cfg = ReproduceConfig(
        work=a.work,
        base=a.base,
        **sizes,
        gate_steps=a.steps,
        gate_lr=a.lr,
        gate_size=a.size,
        gate_depth=a.depth,
        gate_softmax=not a.no_softmax,
        gate_layerwise=not a.not_layerwise,
        gate_fresh=a.fresh,
    )
    experts = {t: cfg.work / "experts" / t for t in TASKS}
    out = cfg.work / "probes" / a.name
    data = out / "gate-train.jsonl"
    if not data.is_file():
        train, _, fresh, _ = build_items(cfg)
        for task in TASKS:  # the fresh examples must come after the work dir's own samples
            if (cfg.work / "data" / f"{task}-train.jsonl").read_text() != "".join(
                json.dumps(chat_record(i)) + "\n" for i in train[task]
            ):
                raise SystemExit(f"{cfg.work}: pass the --n-train, --n-eval and --seed it was made with, or none")
        write_jsonl(data, gate_records(train, fresh, cfg.n_train))
    t0 = time.time()
    if not (out / "gate" / "xlora_config.json").is_file():
        train_gate_stage(cfg, experts, out / "gate", f"probe-{a.name}", data)
    seconds = round(time.time() - t0)
    base, tok = load_base(cfg.base)
    model = XLoraModel.from_pretrained(base, out / "gate").eval()
    row = {"name": a.name, "args": {k: str(v) for k, v in vars(a).items()}, "train_s": seconds}
    row["domains"] = domain_report(model, tok, cfg.work / "data")
    print(json.dumps(row))
    with open(cfg.work / "probes" / "results.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    return row


if __name__ == "__main__":
    main()
