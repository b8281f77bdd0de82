"""Training data: JSONL or CSV records -> token ids with loss masks.

Three record shapes, one per line (JSONL) or row (CSV):
- `{"prompt": ..., "completion": ...}`: loss on the completion only;
- `{"messages": [{"role": ..., "content": ...}, ...]}`: the tokenizer's chat template, loss on the
  assistant turns (in CSV, `messages` holds the JSON list);
- `{"text": ...}`: loss on every token.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

IGNORE = -100


class DataError(ValueError):
    """A data file or record is malformed; the message names the file and line."""


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE where no loss is taken


def read_records(path: str | Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, record) pairs from a .jsonl/.json-lines or .csv file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    records: list[tuple[int, dict[str, Any]]] = []
    if path.suffix.lower() == ".csv":
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            for lineno, row in enumerate(reader, start=2):
                if "messages" in row and row["messages"]:
                    try:
                        row = {**row, "messages": json.loads(row["messages"])}
                    except json.JSONDecodeError as e:
                        raise DataError(f"{path}:{lineno}: column 'messages' is not a JSON list ({e})") from None
                records.append((lineno, {k: v for k, v in row.items() if v not in (None, "")}))
    else:
        with path.open() as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
                if not isinstance(rec, dict):
                    raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
                records.append((lineno, rec))
    if not records:
        raise DataError(f"{path}: no records")
    return records


def _chat_example(tokenizer, messages: list[dict], where: str) -> Example:
    """Render the conversation once; label the character spans of assistant turns."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{where}: 'messages' records need a tokenizer with a chat template")
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: each message needs string 'role' and 'content'")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: no assistant message to learn from")
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True))
        end = len(tokenizer.apply_chat_template(messages[: i + 1], tokenize=False))
        spans.append((start, end))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    labels = []
    for tok, (a, b) in zip(enc["input_ids"], enc["offset_mapping"]):
        inside = any(s <= a and b <= e and b > a for s, e in spans)
        labels.append(tok if inside else IGNORE)
    return Example(list(enc["input_ids"]), labels)


def encode_record(tokenizer, record: dict[str, Any], where: str) -> Example:
    """One record -> token ids and labels (see the module docstring for the shapes)."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if "messages" in record:
        if not isinstance(record["messages"], list):
            raise DataError(f"{where}: 'messages' must be a list")
        return _chat_example(tokenizer, record["messages"], where)
    if "prompt" in record and "completion" in record:
        prompt, completion = record["prompt"], record["completion"]
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise DataError(f"{where}: 'prompt' and 'completion' must be strings")
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        c = tokenizer(completion, add_special_tokens=False)["input_ids"] + eos
        return Example(p + c, [IGNORE] * len(p) + c)
    if "text" in record:
        if not isinstance(record["text"], str):
            raise DataError(f"{where}: 'text' must be a string")
        ids = tokenizer(record["text"], add_special_tokens=False)["input_ids"] + eos
        return Example(ids, list(ids))
    raise DataError(f"{where}: expected keys 'prompt'+'completion', 'messages', or 'text'; got {sorted(record)}")


class TokenizedDataset(torch.utils.data.Dataset):
    """Examples truncated to `max_length`; examples without any loss token are dropped."""

    def __init__(self, examples: list[Example], max_length: int) -> None:
        self.examples = []
        for ex in examples:
            ids, labels = ex.input_ids[:max_length], ex.labels[:max_length]
            if any(label != IGNORE for label in labels[1:]):
                self.examples.append(Example(ids, labels))

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> Example:
        return self.examples[i]


def load_dataset(path: str | Path, tokenizer, max_length: int = 512) -> TokenizedDataset:
    """Read and tokenize a data file; errors name the file and line."""
    examples = [encode_record(tokenizer, rec, f"{path}:{line}") for line, rec in read_records(path)]
    ds = TokenizedDataset(examples, max_length)
    if len(ds) == 0:
        raise DataError(f"{path}: no example keeps a loss token within max_length={max_length}")
    return ds


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch: input_ids, attention_mask and labels `[B, T]`."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
