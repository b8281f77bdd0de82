"""Training data: JSONL or CSV records -> token ids with loss masks.

Three record shapes, one per line (JSONL) or row (CSV):
- `{"prompt": ..., "completion": ...}`: loss on the completion only;
- `{"messages": [{"role": ..., "content": ...}, ...]}`: the tokenizer's chat template, loss on the
  assistant turns (in CSV, `messages` holds the JSON list);
- `{"text": ...}`: loss on every token.

Any record may also name the expert that should answer it, `"expert": "<name>"` (or `"base"` for no
expert): gate training can then add a routing prior (`TrainingArgs.route_weight`, see `train.py`).
"""

from __future__ import annotations

import csv
import io
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

IGNORE = -100


ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    """A data file or record is malformed; the message names the file and line."""


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE where no loss is taken
    route: str | None = None  # the record's "expert": who should answer it ("base": no expert); None: unsaid


def read_text(path: Path) -> str:
    """The file as UTF-8 text (a BOM is allowed); other encodings are a DataError naming file and line."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise DataError(
            f"{path}:{line}: not valid UTF-8 (byte 0x{data[e.start]:02x} at column {column}); save the file as UTF-8"
        ) from None


def _csv_records(path: Path, text: str) -> list[tuple[int, dict[str, Any]]]:
    records: list[tuple[int, dict[str, Any]]] = []
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        for row in reader:
            lineno = reader.line_num
            if None in row:
                raise DataError(f"{path}:{lineno}: more fields than the header's {len(reader.fieldnames or [])}")
            if "messages" in row and row["messages"]:
                try:
                    row = {**row, "messages": json.loads(row["messages"])}
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{lineno}: column 'messages' is not a JSON list ({e})") from None
            records.append((lineno, {k: v for k, v in row.items() if v not in (None, "")}))
    except csv.Error as e:
        raise DataError(f"{path}:{reader.line_num}: malformed CSV ({e})") from None
    return records


def _jsonl_records(path: Path, text: str) -> list[tuple[int, dict[str, Any]]]:
    records: list[tuple[int, dict[str, Any]]] = []
    # split on "\n" only: JSON strings may hold U+2028 and friends, which str.splitlines would cut at
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            hint = ""
            if lineno == 1 and line.strip() == "[":
                hint = "; expected JSON Lines (one object per line), not a JSON array"
            raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg}){hint}") from None
        if not isinstance(rec, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
        records.append((lineno, rec))
    return records


def read_records(path: str | Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, record) pairs from a UTF-8 .jsonl/.json-lines or .csv file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    text = read_text(path)
    records = _csv_records(path, text) if path.suffix.lower() == ".csv" else _jsonl_records(path, text)
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
        if m["role"] not in ROLES:  # the server's roles: what chat templates commonly render
            raise DataError(f"{where}: message role {m['role']!r}: expected one of {', '.join(ROLES)}")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: no assistant message to learn from")
    if messages[0]["role"] == "assistant":
        raise DataError(f"{where}: the first message is the assistant's; expected a user or system message first")
    try:
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            start = len(tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True))
            end = len(tokenizer.apply_chat_template(messages[: i + 1], tokenize=False))
            spans.append((start, end))
    except Exception as e:  # noqa: BLE001 - templates raise jinja2 errors of any kind for bad conversations
        raise DataError(f"{where}: the tokenizer's chat template refused these messages ({e})") from None
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    labels = []
    for tok, (a, b) in zip(enc["input_ids"], enc["offset_mapping"]):
        inside = any(s <= a and b <= e and b > a for s, e in spans)
        labels.append(tok if inside else IGNORE)
    return Example(list(enc["input_ids"]), labels)


def encode_record(tokenizer, record: dict[str, Any], where: str) -> Example:
    """One record -> token ids, labels and routing label (see the module docstring for the shapes)."""
    route = record.get("expert")
    if route is not None and (not isinstance(route, str) or not route):
        raise DataError(f"{where}: 'expert' must be an expert's name or \"base\", got {route!r}")
    example = _encode_text(tokenizer, record, where)
    example.route = route
    return example


def _encode_text(tokenizer, record: dict[str, Any], where: str) -> Example:
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


class DataWarning(UserWarning):
    """Some examples of a data file were dropped or truncated (the message says how many and why)."""


class TokenizedDataset(torch.utils.data.Dataset):
    """Examples truncated to `max_length`; examples without any loss token are dropped.

    Nothing goes silently: dropped and truncated examples are counted (`n_dropped`, `n_truncated`)
    and reported in one DataWarning naming `source` and `max_length`; if every example is dropped
    it is a DataError. `lines` (one per example) lets the warning name the first dropped lines.
    """

    def __init__(
        self, examples: list[Example], max_length: int, source: str | None = None, lines: list[int] | None = None
    ) -> None:
        where = source or "dataset"
        self.source = source
        self.example_lines: list[int] = []  # the file line of each kept example (when `lines` is given)
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
            raise DataError(f"{where}: max_length: expected an integer >= 2, got {max_length!r}")
        self.examples = []
        too_long: list[int] = []  # example numbers (or lines) whose loss tokens all lie beyond max_length
        no_loss: list[int] = []  # ... that have no loss token at all (e.g. an empty completion)
        self.n_truncated = 0
        for i, ex in enumerate(examples):
            ids, labels = ex.input_ids[:max_length], ex.labels[:max_length]
            if any(label != IGNORE for label in labels[1:]):
                self.examples.append(Example(ids, labels, ex.route))
                if lines:
                    self.example_lines.append(lines[i])
                self.n_truncated += len(ex.input_ids) > max_length
            else:
                has_loss = any(label != IGNORE for label in ex.labels[1:])
                (too_long if has_loss else no_loss).append(lines[i] if lines else i)
        self.n_dropped = len(too_long) + len(no_loss)
        if not (self.n_dropped or self.n_truncated):
            return
        unit = "line" if lines else "example"
        parts = []
        for items, why in ((too_long, f"no loss token within max_length={max_length}"), (no_loss, "no loss token")):
            if items:
                shown = ", ".join(map(str, items[:5])) + (", ..." if len(items) > 5 else "")
                parts.append(f"{len(items)} dropped ({why}; {unit} {shown})")
        if self.n_truncated:
            parts.append(f"{self.n_truncated} truncated to max_length={max_length}")
        message = f"{where}: of {len(examples)} examples, " + ", ".join(parts)
        if not self.examples:
            raise DataError(message + "; nothing left to train on (raise --max-length or shorten the examples)")
        warnings.warn(message, DataWarning, stacklevel=2)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> Example:
        return self.examples[i]


def load_dataset(path: str | Path, tokenizer, max_length: int = 512) -> TokenizedDataset:
    """Read and tokenize a data file; errors name the file and line, dropped examples are reported."""
    records = read_records(path)
    examples = [encode_record(tokenizer, rec, f"{path}:{line}") for line, rec in records]
    return TokenizedDataset(examples, max_length, source=str(path), lines=[line for line, _ in records])


def collate(examples: list[Example], pad_id: int, routes: dict[str, int] | None = None) -> dict[str, torch.Tensor]:
    """Right-pad a batch: input_ids, attention_mask and labels `[B, T]`; with `routes` (name -> expert
    index, "base" -> -1) also `route` `[B]`: each example's routing label, -2 where it has none or
    `routes` leaves its label out."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if routes is not None:
        batch["route"] = torch.tensor([routes.get(e.route, -2) if e.route is not None else -2 for e in examples])
    return batch
