"""Score models on the held-out sets: base, each single expert, a uniform static mix, X-LoRA."""

from __future__ import annotations

import json
import math
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch

from xlora.science.tasks import TASKS, Item, mean_baseline, score


def read_items(path: Path) -> list[Item]:
    """The JSONL records of an eval file, each checked to be {task, prompt, completion: text, meta: object}."""
    items = []
    for n, raw in enumerate(Path(path).read_bytes().splitlines(), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}:{n}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                             "save the file as UTF-8") from None  # fmt: skip
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not a JSON record ({e.msg})") from None
        if not isinstance(r, dict):
            raise ValueError(f"{path}:{n}: expected a JSON object, got {type(r).__name__}")
        for key in ("task", "prompt", "completion", "meta"):
            if key not in r:
                raise ValueError(f"{path}:{n}: eval records need 'task', 'prompt', 'completion' and 'meta'")
        for key in ("task", "prompt", "completion"):
            if not isinstance(r[key], str):
                raise ValueError(f"{path}:{n}: field {key!r}: expected text, got {r[key]!r}")
        if not isinstance(r["meta"], dict):
            raise ValueError(f"{path}:{n}: field 'meta': expected an object of the task's labels, got {r['meta']!r}")
        items.append(Item(r["task"], r["prompt"], r["completion"], r["meta"]))
    return items


def encode_prompts(tok, items: list[Item]) -> dict:
    """The items' prompts as one left-padded batch in the chat template, ready to generate from."""
    tok.padding_side = "left"
    texts = [
        tok.apply_chat_template([{"role": "user", "content": it.prompt}], tokenize=False, add_generation_prompt=True)
        for it in items
    ]
    return tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)


def generate_answers(
    model, tok, items: list[Item], max_new_tokens: int, batch_size: int = 8, **sampling: Any
) -> list[str]:
    """Answers to the items' prompts (chat template, left-padded batches): greedy, or sampled with
    `sampling` (`do_sample=True, temperature=..., seed=s`; batch k is seeded `s + k`, reproducibly)."""
    answers = []
    for start in range(0, len(items), batch_size):
        enc = encode_prompts(tok, items[start : start + batch_size])
        out = model.generate(
            enc["input_ids"],
            attention_mask=enc["attention_mask"],
            max_new_tokens=max_new_tokens,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            **({**sampling, "seed": sampling.get("seed", 0) + start} if sampling else {}),
        )
        for row in out[:, enc["input_ids"].shape[1] :]:
            answers.append(tok.decode(row, skip_special_tokens=True).strip())
    return answers


@torch.no_grad()
def eval_loss(model, tok, path: Path, max_length: int = 128) -> float:
    """Token-weighted cross-entropy of the held-out answers (assistant turns only)."""
    from xlora.train.data import collate, load_dataset
    from xlora.train.loop import token_ce_sum

    ds = load_dataset(path, tok, max_length)
    total, count = 0.0, 0
    for start in range(0, len(ds), 8):
        batch = collate([ds[i] for i in range(start, min(start + 8, len(ds)))], tok.pad_token_id or 0)
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        ce, n = token_ce_sum(out.logits, batch["labels"])
        total, count = total + float(ce), count + n
    return total / max(count, 1)


def variants(model) -> dict[str, object]:
    """name -> a context manager factory putting the model in that mode."""
    n = model.n_experts
    out = {"base": lambda: model.disable_experts()}
    for i, name in enumerate(model.expert_names):
        onehot = [1.0 if j == i else 0.0 for j in range(n)]
        out[f"expert {name}"] = lambda w=onehot: model.static_scalings(w)
    out["uniform mix (1/N)"] = lambda: model.static_scalings([1.0 / n] * n)
    out["X-LoRA (trained gate)"] = lambda: ExitStack()
    return out


def evaluate_all(cfg) -> dict:
    from xlora.bases.loading import load_base
    from xlora.core.model import XLoraModel
    from xlora.science.recipe.config import MAX_NEW_TOKENS

    results_path = cfg.out / "results.json"
    if results_path.is_file():
        return json.loads(results_path.read_text())
    base, tok = load_base(cfg.base)
    model = XLoraModel.from_pretrained(base, cfg.out)
    data = cfg.work / "data"
    train_answers = {
        task: [json.loads(x)["messages"][1]["content"] for x in (data / f"{task}-train.jsonl").read_text().splitlines()]
        for task in TASKS
    }
    train_smiles = set(train_answers["molecule-design"])  # canonical SMILES, for novelty
    results: dict = {"models": {}, "mean_baseline": {}}
    for task in TASKS:
        items = read_items(data / f"{task}-eval.jsonl")
        results["mean_baseline"][task] = mean_baseline(task, items, train_answers[task])
    for name, mode in variants(model).items():
        row = {}
        with mode():
            for task in TASKS:
                items = read_items(data / f"{task}-eval.jsonl")
                answers = generate_answers(model, tok, items, MAX_NEW_TOKENS[task])
                row.update({f"{task}/{k}": v for k, v in score(task, items, answers, train_smiles).items()})
                row[f"{task}/eval_loss"] = eval_loss(model, tok, data / f"{task}-eval-chat.jsonl")
                row[f"{task}/example"] = answers[0]
        print(f"evaluated {name}")
        results["models"][name] = row
    tmp = results_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1))
    tmp.replace(results_path)
    return results


COLUMNS = [
    ("molecule-properties/gap_mae_ev", "gap MAE (eV)", "low"),
    ("molecule-properties/dipole_mae_d", "dipole MAE (D)", "low"),
    ("molecule-properties/eval_loss", "props loss", "low"),
    ("molecule-design/valid_rate", "SMILES valid", "high"),
    ("molecule-design/exact_formula_rate", "exact formula", "high"),
    ("molecule-design/novel_rate", "novel", "high"),
    ("molecule-design/eval_loss", "design loss", "low"),
    ("peptides/amp_accuracy", "AMP accuracy", "high"),
    ("peptides/charge_mae", "charge MAE", "low"),
    ("peptides/design_satisfied_rate", "design ok", "high"),
    ("peptides/eval_loss", "peptide loss", "low"),
    ("molecule-thermo/cv_mae", "Cv MAE (cal/mol K)", "low"),
    ("molecule-thermo/zpve_mae_ev", "ZPVE MAE (eV)", "low"),
    ("molecule-thermo/eval_loss", "thermo loss", "low"),
    ("anticancer/acp_accuracy", "ACP accuracy", "high"),
    ("anticancer/eval_loss", "ACP loss", "low"),
]


def _fmt(v) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def results_table(results: dict) -> str:
    head = "| model | " + " | ".join(c[1] for c in COLUMNS) + " |"
    lines = [head, "|---|" + "---:|" * len(COLUMNS)]
    for name, row in results["models"].items():
        lines.append(f"| {name} | " + " | ".join(_fmt(row.get(k)) for k, _, _ in COLUMNS) + " |")
    baseline = {f"{t}/{k}": v for t, row in results.get("mean_baseline", {}).items() for k, v in row.items()}
    if baseline:
        cells = [_fmt(baseline[k]) if k in baseline else "-" for k, _, _ in COLUMNS]
        lines.append("| always the training mean | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_results(out: Path, results: dict) -> None:
    text = "# Results (held-out sets)\n\n" + results_table(results) + "\n"
    tmp = out / "results.md.tmp"
    tmp.write_text(text)
    tmp.replace(out / "results.md")


__all__ = ["evaluate_all", "generate_answers", "mean_baseline", "read_items", "results_table", "write_results"]
